"""Generate class-conditional images from an LDM checkpoint with classifier-free guidance.

    cd ldm
    python inference.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt --output_dir ./generated \
        --num_samples 10 --cfg_scale 3.0 --save_grid                      # every class
    python inference.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt --class_label "class_name" \
        --num_samples 20 --cfg_scale 4.0 --seed 42                        # one class, by name

Images go to <output_dir>/<checkpoint>_<scheduler><steps>_cfg<scale>_seed<seed>[_raw][_bf16|_fp16]/ as
<class_name>_seed<S>.png, one PNG per image; image j of class c uses seed + 1000000*c + j, so the
output does not depend on --batch_size. --mixed_precision bf16 (or auto: bf16 where the hardware has it)
runs the UNet and the VAE decode under autocast (~1.85x faster with DDIM-50 on a 2-core AMX CPU, 256 px);
its images differ slightly from fp32 ones (README: "Precision"), hence the suffix. Existing files are
never overwritten: a rerun only fills in what is missing. The model is rebuilt from the checkpoint (EMA
weights unless --no_ema).
--output_format png16 | nifti | dicom (writers.py) writes <class_name>_seed<S>.png / .nii.gz / .dcm
instead; nifti and dicom map the image back to physical units (e.g. HU) through the intensity window
stored in the checkpoint.

Interpolation (deterministic DDIM, eta 0; --num_inference_steps and --cfg_scale as above):
    python inference.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt --interpolate_seeds 3 9 \
        --class_label "class_name" --interp_frames 8          # slerp of the initial noise of seeds 3 and 9
    python inference.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt --interpolate_classes cls_a cls_b \
        --seed 42                                             # class token (1-t) e[a] + t e[b], noise of seed 42
write <output_dir>/interpolation_<checkpoint>[_raw][_bf16]/<stem>.png (the frames side by side) and <stem>.gif,
stem = interp_seeds3-9_<class>_ddim50_cfg3_f8 or interp_classes_<a>-<b>_seed42_ddim50_cfg3_f8. The seeds
are per-image seeds (those in <class>_seed<S>.png): frame 0 is that plain sample, the last frame the other.
"""
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import animation
import writers
from imaging import decode_image
from models import SCHEDULERS, denoiser_from_checkpoint, initial_noise, load_vae, sample_images
from runtime import (FlagParser, UserError, autocast, check_writable, pick_device, resolve_precision, run_main,
                     save_png_once, save_png_replace, setup_cuda_speedups, to_pil)
from utils import load_checkpoint

REQUIRED_KEYS = ("unet_config", "unet", "class_embedder", "class_names", "num_classes", "vae",
                 "vae_scaling_factor", "image_size", "image_channels", "noise_scheduler_config")
SEED_STRIDE = 1_000_000  # seeds of different classes never collide for < 1e6 images per class


def add_sampling_flags(p):
    """Flags shared by inference.py and inference_per_class.py (p: a runtime.FlagParser, both spellings)."""
    p.add_argument("--checkpoint", required=True, help="LDM checkpoint (checkpoint_best.pt / checkpoint_last.pt)")
    p.add_argument("--cfg_scale", type=float, default=3.0, help="classifier-free guidance strength (1 = off)")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="diffusers sampler")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (memory)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--mixed_precision", default="no", choices=["auto", "no", "fp16", "bf16"],
                   help="UNet + VAE decode in bf16/fp16 (auto: bf16 where native, fp16 on older GPUs, else "
                        "fp32); images differ slightly from fp32 and go to a folder named after the precision")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights even if EMA weights exist")
    p.add_argument("--vae", default=None, help="override the VAE recorded in the checkpoint (hub id or folder)")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow loading pickled checkpoints")
    writers.add_output_flag(p)  # --output_format png | png16 | nifti | dicom


def check_sampling_args(a):
    """Range checks naming the flag."""
    if a.num_inference_steps < 1:
        raise UserError("--num_inference_steps must be >= 1")
    if a.batch_size < 1:
        raise UserError("--batch_size must be >= 1")
    if a.cfg_scale < 0:
        raise UserError("--cfg_scale must be >= 0")
    if a.scheduler == "ddpm" and a.num_inference_steps > 1000:
        raise UserError("--num_inference_steps must be <= the training timesteps (1000)")


def load_ldm(path, trust=False):
    """Load and sanity-check an LDM checkpoint."""
    ckpt = load_checkpoint(path, trust=trust, expect_type="ldm")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is an incomplete LDM checkpoint (missing {missing})")
    return ckpt


def resolve_classes(ckpt, names):
    """Class names -> indices; an unknown name is an error listing the valid ones."""
    valid = list(ckpt["class_names"])
    if not names:
        return list(range(len(valid)))
    out = []
    for n in names:
        if n not in valid:
            raise UserError(f"unknown class '{n}'; valid class names: {', '.join(valid)}")
        out.append(valid.index(n))
    return out


def image_seed(base, class_idx, j):
    """Seed of the j-th image of a class."""
    return base + SEED_STRIDE * class_idx + j


def float_to_pil(img):
    """(C,H,W) float in [0,1] -> 8-bit grayscale or RGB PIL image."""
    return to_pil((img.clamp(0, 1) * 255).round().to(torch.uint8))


def precision_tag(precision):
    """'' for fp32 (the names of earlier versions), else '_bf16' / '_fp16': such images differ from fp32."""
    return "" if precision in (None, "no") else f"_{precision}"


def sample_tag(checkpoint, scheduler, steps, cfg_scale, seed, no_ema=False, precision="no"):
    """The output sub-folder of plain samples: every setting that changes the images is in the name."""
    return (f"{Path(checkpoint).stem}_{scheduler}{steps}_cfg{cfg_scale:g}_seed{seed}{'_raw' if no_ema else ''}"
            f"{precision_tag(precision)}")


def interpolation_tag(checkpoint, no_ema=False, precision="no"):
    """The output sub-folder of interpolations (the stem names seeds, classes, steps, guidance, frames)."""
    return (f"interpolation_{animation.safe_part(Path(checkpoint).stem)}{'_raw' if no_ema else ''}"
            f"{precision_tag(precision)}")


def interpolation_name(mode, names, class_a, class_b, seed_a, seed_b, steps, cfg_scale, frames):
    """animation.interpolation_stem for an LDM interpolation (always deterministic DDIM)."""
    if mode == "seeds":
        return animation.interpolation_stem("seeds", (seed_a, seed_b), (names[class_a],), "ddim", steps,
                                            cfg_scale, frames)
    return animation.interpolation_stem("classes", (seed_a,), (names[class_a], names[class_b]), "ddim", steps,
                                        cfg_scale, frames)


class Generator:
    """Loaded model + VAE + settings; `run(jobs)` writes the images of [(class_idx, seed, path)] in batches.

    `images()` and `interpolation()` return the same images as PIL (serve.py calls them: one code path)."""

    def __init__(self, args, log=print):
        self.args, self.log = args, log
        self.ckpt = load_ldm(args.checkpoint, args.trust_checkpoint)
        vae_name = args.vae or self.ckpt["vae"]
        self.vae, _ = load_vae(vae_name)
        c = self.ckpt
        self.factor = c["image_size"] // c["unet_config"]["sample_size"]
        self.latent_size = c["unet_config"]["sample_size"]
        self.latent_channels = c["unet_config"]["in_channels"]
        if self.vae.config.latent_channels != self.latent_channels:
            raise UserError(f"VAE '{vae_name}' has {self.vae.config.latent_channels} latent channels but the "
                            f"checkpoint's UNet expects {self.latent_channels}; pass the VAE it was trained with")
        self.fmt = getattr(args, "output_format", "png")
        # resolved now (cheap), not in setup(): the output folder's name carries it
        self.device = pick_device(getattr(args, "device", "auto"))
        self.precision = resolve_precision(args.mixed_precision, self.device)
        try:  # the training data's window (None: 8-bit data, or a checkpoint from before windows)
            self.window = writers.output_window(self.fmt, c["image_channels"], (c.get("config") or {}).get("intensity"),
                                                args.checkpoint)
        except ValueError as e:
            raise UserError(str(e)) from None

    def target(self, path):
        """Where the image of job path `path` (written .png) really goes under --output_format."""
        return Path(path) if self.fmt == "png" else writers.output_path(path, self.fmt)

    def describe(self, class_idx, seed):
        """The description stored in a NIfTI / DICOM output: model settings only, never a training file."""
        a, c = self.args, self.ckpt
        return (f"synthetic LDM image; class {c['class_names'][class_idx]}; seed {seed}; {a.scheduler} "
                f"{a.num_inference_steps} steps; cfg {a.cfg_scale:g}; {'raw' if a.no_ema else 'EMA'} weights; "
                f"training step {c.get('step', '?')}")

    def setup(self):
        """Move to the device, build the denoiser (heavy part, after all checks)."""
        setup_cuda_speedups(self.device)
        prec = self.precision
        self.autocast = (lambda: autocast(prec, self.device)) if prec != "no" else None  # a factory: single-use contexts
        self.denoiser, self.used_ema = denoiser_from_checkpoint(self.ckpt, use_ema=not self.args.no_ema)
        self.denoiser.to(self.device)
        if self.device.type == "cuda":
            self.denoiser.unet.to(memory_format=torch.channels_last)
        self.vae.to(self.device)
        if prec != "no":  # oneDNN bf16 convolutions: ~2x faster channels-last (AMX)
            self.vae.to(memory_format=torch.channels_last)
        self.log(f"model: {'EMA' if self.used_ema else 'raw'} weights, {self.ckpt['num_classes']} classes, "
                 f"{self.ckpt['image_size']}px, latents {self.latent_channels}x{self.latent_size}x{self.latent_size}; "
                 f"sampler {self.args.scheduler} {self.args.num_inference_steps} steps, cfg {self.args.cfg_scale}, "
                 f"device {self.device}, precision {prec}")

    def sample(self, classes, seeds, scheduler=None, steps=None, cfg_scale=None, latents=None,
               class_embeddings=None):
        """One batch: class indices + per-image seeds -> float images (B, C, H, W) in [0, 1] on the CPU.

        scheduler / steps / cfg_scale default to the flags; latents / class_embeddings: interpolation."""
        a, c = self.args, self.ckpt
        return sample_images(self.denoiser, self.vae, list(classes), list(seeds), latent_channels=self.latent_channels,
                             latent_size=self.latent_size, scaling_factor=c["vae_scaling_factor"],
                             image_channels=c["image_channels"], noise_config=c["noise_scheduler_config"],
                             scheduler=scheduler or a.scheduler,
                             num_steps=steps if steps is not None else a.num_inference_steps,
                             cfg_scale=cfg_scale if cfg_scale is not None else a.cfg_scale, device=self.device,
                             autocast=self.autocast, latents=latents, class_embeddings=class_embeddings).cpu()

    def images(self, classes, seeds, **settings):
        """Any number of images in batches of --batch_size -> list of 8-bit PIL images (what the CLI writes)."""
        out, bs = [], self.args.batch_size
        for i in range(0, len(seeds), bs):
            out += [float_to_pil(x) for x in self.sample(classes[i:i + bs], seeds[i:i + bs], **settings)]
        return out

    @torch.no_grad()
    def interpolation(self, mode, class_a, seed_a, class_b=None, seed_b=None, frames=8, steps=None,
                      cfg_scale=None):
        """Frames (8-bit PIL) of a seed or class interpolation, deterministic DDIM (eta 0).

        mode "seeds": slerp between the initial noises of per-image seeds seed_a and seed_b, class class_a;
        mode "classes": (1-t) e[class_a] + t e[class_b] as the class token, noise of seed_a. The end points
        are sampled in batches of their own (one image, as a plain one-image run) so that frame 0 and frame
        N-1 are bit for bit the plain samples of seed_a / seed_b (class_a / class_b)."""
        ts = animation.interp_weights(frames)
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        if mode == "seeds":
            z0, z1 = initial_noise([seed_a], shape)[0], initial_noise([seed_b], shape)[0]
            noise = torch.stack([animation.slerp(z0, z1, t) for t in ts])
            tokens = None
        elif mode == "classes":
            noise = initial_noise([seed_a], shape).expand(frames, *shape).clone()
            emb = self.denoiser.class_embedder
            e0, e1 = (emb(torch.tensor([k], device=self.device)).cpu() for k in (class_a, class_b))
            tokens = torch.cat([animation.lerp(e0, e1, t) for t in ts])
        else:
            raise ValueError(f"unknown interpolation mode {mode!r}")
        bs, n = self.args.batch_size, frames
        groups = [[0]] + [list(range(i, min(i + bs, n - 1))) for i in range(1, n - 1, bs)] + [[n - 1]]
        out = []
        for idx in groups:
            x = self.sample([class_a] * len(idx), [seed_a] * len(idx), scheduler="ddim", steps=steps,
                            cfg_scale=cfg_scale, latents=noise[idx],
                            class_embeddings=None if tokens is None else tokens[idx])
            out += [float_to_pil(img) for img in x]
        return out

    def run(self, jobs):
        """Generate the missing images of `jobs`; return (written, batches, seconds)."""
        from tqdm import tqdm
        a = self.args
        todo = [j for j in jobs if not self.target(j[2]).exists()]
        if len(todo) < len(jobs):
            self.log(f"{len(jobs) - len(todo)} of {len(jobs)} images already exist; generating the other {len(todo)}")
        written, batches, t0 = 0, 0, time.time()
        bar = tqdm(total=len(todo), desc="sampling", unit="img", dynamic_ncols=True)
        for i in range(0, len(todo), a.batch_size):
            chunk = todo[i:i + a.batch_size]
            imgs = self.sample([j[0] for j in chunk], [j[1] for j in chunk])
            for img, (cls, seed, path) in zip(imgs, chunk):
                if self.fmt == "png":
                    written += save_png_once(float_to_pil(img), path)  # never overwrites a concurrent run's file
                else:
                    written += writers.write_image_once(img, path, self.fmt, self.window,
                                                        self.describe(cls, seed)) is not None
            batches += 1
            bar.update(len(chunk))
        bar.close()
        return written, batches, time.time() - t0

    def report(self, written, batches, seconds):
        """Timing statistics after sampling."""
        steps = self.args.num_inference_steps
        self.log(f"images generated: {written}, inference steps: {steps}, total time: {seconds:.2f}s")
        if written:
            self.log(f"time per image: {seconds / written:.3f}s, per denoising step (one batch): "
                     f"{seconds / max(1, batches * steps) * 1000:.1f} ms")


def write_grid(rows_of_paths, image_channels, path, fmt="png"):
    """Rows = classes, columns = that class's images (existing files only); written via atomic replace."""
    import torchvision
    tiles, ncol = [], max(len(r) for r in rows_of_paths)
    for row in rows_of_paths:
        for f in row:
            if fmt == "png":
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                tiles.append(torch.from_numpy(arr).permute(2, 0, 1))
            else:  # png16 / NIfTI / DICOM outputs: read back through their own window to [0, 1]
                tiles.append(decode_image(f, 3))
        tiles += [torch.ones_like(tiles[-1])] * (ncol - len(row)) if tiles else []
    if not tiles:
        return None
    grid = torchvision.utils.make_grid(torch.stack(tiles), nrow=ncol, padding=2, pad_value=1.0)
    img = float_to_pil(grid)
    if image_channels == 1:
        img = img.convert("L")
    save_png_replace(img, path)  # a unique temporary file, then os.replace: concurrent runs cannot collide
    return path


def add_interpolation_flags(p):
    """--interpolate_seeds A B / --interpolate_classes A B / --interp_frames N (both spellings)."""
    p.add_argument("--interpolate_seeds", type=int, nargs=2, metavar=("A", "B"), default=None,
                   help="interpolate the initial noise of per-image seeds A and B (slerp; class: --class_label)")
    p.add_argument("--interpolate_classes", nargs=2, metavar=("A", "B"), default=None,
                   help="interpolate the class embedding between class names A and B (noise of --seed)")
    p.add_argument("--interp_frames", type=int, default=8, help="interpolation frames, both end points included")


def check_interpolation_args(a):
    """The interpolation flags' own rules, named."""
    if a.interpolate_seeds is not None and a.interpolate_classes is not None:
        raise UserError("give either --interpolate_seeds or --interpolate_classes, not both")
    if a.interp_frames < 2:
        raise UserError("--interp_frames must be >= 2 (both end points are frames)")
    if a.scheduler != "ddim":
        raise UserError(f"interpolation samples with deterministic DDIM (eta 0); drop --scheduler {a.scheduler}")
    if a.output_format != "png":
        raise UserError("interpolation writes a PNG strip and a GIF; drop --output_format")


def interpolation_request(args, ckpt):
    """(mode, class_a, class_b, seed_a, seed_b) from the CLI flags (class names checked)."""
    if args.interpolate_seeds is not None:
        c = resolve_classes(ckpt, [args.class_label] if args.class_label is not None else None)[0]
        return "seeds", c, None, args.interpolate_seeds[0], args.interpolate_seeds[1]
    a, b = resolve_classes(ckpt, list(args.interpolate_classes))
    return "classes", a, b, args.seed, None


def run_interpolation(args):
    """--interpolate_seeds / --interpolate_classes: write <tag>/<stem>.png (strip) and <stem>.gif once."""
    check_interpolation_args(args)
    gen = Generator(args)
    mode, ca, cb, sa, sb = interpolation_request(args, gen.ckpt)
    names = gen.ckpt["class_names"]
    folder = Path(args.output_dir).expanduser() / interpolation_tag(args.checkpoint, args.no_ema, gen.precision)
    stem = interpolation_name(mode, names, ca, cb, sa, sb, args.num_inference_steps, args.cfg_scale,
                              args.interp_frames)
    png, gif = folder / f"{stem}.png", folder / f"{stem}.gif"
    if png.exists() and gif.exists():
        print(f"{png} and {gif} already exist; skipped (never overwritten)")
        return 0
    check_writable(folder)
    gen.setup()
    t0 = time.time()
    frames = gen.interpolation(mode, ca, sa, cb, sb, args.interp_frames)
    png, gif, wrote = animation.write_interpolation(frames, folder, stem)
    print(f"interpolation ({len(frames)} frames, {time.time() - t0:.2f}s): strip {png}, animation {gif}"
          + ("" if wrote else " (already there; not overwritten)"))
    return 0


def main(argv=None):
    """Parse flags, check inputs, generate (or interpolate)."""
    p = FlagParser(description="Generate images from an LDM checkpoint.")
    add_sampling_flags(p)
    p.add_argument("--output_dir", default="./generated")
    p.add_argument("--num_samples", type=int, default=10, help="images per class")
    p.add_argument("--class_label", default=None, help="class name to generate (default: every class)")
    p.add_argument("--save_grid", action="store_true", help="also write grid.png (one row per class)")
    add_interpolation_flags(p)
    args = p.parse_args(argv)
    check_sampling_args(args)
    if args.interpolate_seeds is not None or args.interpolate_classes is not None:
        return run_interpolation(args)
    if args.num_samples < 1:
        raise UserError("--num_samples must be >= 1")
    gen = Generator(args)
    names = gen.ckpt["class_names"]
    classes = resolve_classes(gen.ckpt, [args.class_label] if args.class_label is not None else None)
    tag = sample_tag(args.checkpoint, args.scheduler, args.num_inference_steps, args.cfg_scale, args.seed,
                     args.no_ema, gen.precision)
    folder = Path(args.output_dir).expanduser() / tag
    check_writable(folder)
    gen.setup()
    jobs = [(c, image_seed(args.seed, c, j), folder / f"{names[c]}_seed{image_seed(args.seed, c, j)}.png")
            for c in classes for j in range(args.num_samples)]
    written, batches, secs = gen.run(jobs)
    gen.report(written, batches, secs)
    if args.save_grid:
        rows = [[gen.target(j[2]) for j in jobs if j[0] == c and gen.target(j[2]).exists()] for c in classes]
        grid = write_grid(rows, gen.ckpt["image_channels"], folder / "grid.png", gen.fmt)
        print(f"grid: {grid}")
    print(f"images in {folder}")
    return 0


if __name__ == "__main__":
    run_main(main)
