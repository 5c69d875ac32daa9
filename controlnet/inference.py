"""Generate images that follow segmentation masks with a trained ControlNet on top of its LDM.

    python inference.py --checkpoint ./controlnet_checkpoints/checkpoint_best.pt \
        --ldm_checkpoint ../ldm/ldm_checkpoints/checkpoint_best.pt --mask mask.png --output_dir ./generated \
        --controlnet_scale 1.0 --save_comparison [--report_dice]
    python inference.py ... --mask_folder masks/ --num_images 4 --scheduler dpmsolver --num_inference_steps 20

Writes OUTPUT_DIR/<checkpoint>-step<N>-<ema|raw>-<scheduler><steps>-scale<s>[-<class>-cfg<g>]/
<mask_stem>[_<class>]_seed<seed>.png (image i of the run uses seed + i), comparisons/ (mask | generated) with
--save_comparison and dice.csv with --report_dice. Existing images are never overwritten: a rerun skips them.
Interpolation (one --mask, deterministic DDIM, --num_inference_steps; --cfg_scale and --controlnet_scale apply):
    python inference.py ... --mask mask.png --interpolate_seeds 3 7 --interp_frames 8 [--class_label NAME]
    python inference.py ... --mask mask.png --interpolate_classes NAME_A NAME_B --seed 3
writes OUTPUT_DIR/interpolation_<checkpoint>-step<N>-<ema|raw>/<stem>.png (the frames side by side) and .gif, the
stem naming seeds, classes, steps, guidance, frames, mask and scale (animation.interpolation_stem); frame 0 and
the last frame equal the plain images of `--seed A --num_images 1` (and B; or the two classes), never overwritten.
--mask / --mask_folder may be NIfTI volumes or DICOM files: every slice is a mask (<file stem>_<slice:04d>,
empty slices kept), sliced along the training run's --slice_axis unless given. --output_format png16 | nifti |
dicom (writers.py) writes .png / .nii.gz / .dcm, nifti and dicom in the training window's physical units.
"""
import csv
import io
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import animation
import medical
import writers
from dataset import check_mask_mode, load_mask, read_class_labels, verify_file
from imaging import ALL_EXTENSIONS, is_image_file
from models import (SCHEDULERS, ClassEmbedder, ControlledUNet, DummyEncoder, UserError, check_same_ldm, decode,
                    initial_latents, load_flagged_checkpoint, load_ldm, make_sampler, sample)
from pairing import check_dice_threshold, expand_sources, image_dice, label_of, list_images
from pairing import dice, otsu_threshold  # noqa: F401 - the Dice definition, importable from here as before
from runtime import (FlagParser, atomic_write_text, autocast, autocast_dtype, pick_device, resolve_precision,
                     run_main, save_png_once, setup_cuda_speedups, timing_summary)
from diffusers import ControlNetModel


def parse_args(argv=None):
    """Command line -> argparse.Namespace (both -/_ spellings of every flag)."""
    p = FlagParser(description="Generate mask-guided images with a trained ControlNet.")

    def add(name, **kw):
        p.add_argument(f"--{name}", **kw)

    add("checkpoint", required=True, help="ControlNet checkpoint (checkpoint_best.pt of train.py)")
    add("ldm_checkpoint", required=True, help="the LDM checkpoint the ControlNet was trained from")
    add("vae", default=None, help="override the VAE folder recorded in the LDM checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mask", help="one mask image")
    src.add_argument("--mask_folder", "--mask-folder", dest="mask_folder", help="a folder of mask images")
    add("output_dir", default="./generated")
    add("num_images", type=int, default=1, help="images per mask")
    add("controlnet_scale", type=float, default=1.0, help="mask influence: 0 ignores the mask, 1 normal")
    add("num_inference_steps", type=int, default=50)
    add("scheduler", default="ddim", choices=SCHEDULERS, help="ddpm | ddim | dpmsolver (DPM-Solver++)")
    add("seed", type=int, default=42, help="image i of the run uses seed + i")
    add("batch_size", type=int, default=16)
    add("class_label", default=None, help="class name for every mask (ControlNets trained with class labels)")
    add("class_labels_csv", default=None, help="CSV of 'mask_stem,class_name' rows: a class per mask")
    add("cfg_scale", type=float, default=1.0, help="classifier-free guidance towards the class (1: none)")
    add("no_ema", action="store_true", help="use the raw ControlNet weights instead of the EMA")
    add("mixed_precision", default="no", choices=("auto", "no", "fp16", "bf16"),
        help="autocast for sampling (UNet, ControlNet, VAE decode): fp16 on CUDA, bf16 where the hardware "
             "supports it, auto = bf16 where native; the output folder name then ends in -bfloat16 / -float16")
    add("save_comparison", action="store_true", help="also write mask | generated side by side")
    add("report_dice", action="store_true", help="Dice of mask vs thresholded image, printed and in dice.csv")
    add("dice_threshold", default="otsu", help="'otsu' or a grey level in [0, 1] for the image foreground")
    add("dice_foreground", default="bright", choices=("bright", "dark"), help="which side of the threshold")
    add("trust_checkpoint", action="store_true", help="allow checkpoints that hold pickled Python objects")
    add("slice_axis", default=None, help="NIfTI masks: axial, coronal or sagittal slices (default: as in training)")
    add("slice_range", default=None, metavar="START:END", help="NIfTI masks: only these slices (default: all)")
    writers.add_output_flag(p)  # --output_format png | png16 | nifti | dicom
    interp = p.add_mutually_exclusive_group()
    interp.add_argument("--interpolate_seeds", "--interpolate-seeds", dest="interpolate_seeds", type=int, nargs=2,
                        metavar=("A", "B"), help="with one --mask: frames between the initial noises of seeds A and "
                        "B (spherical), deterministic DDIM -> a PNG strip and a GIF")
    interp.add_argument("--interpolate_classes", "--interpolate-classes", dest="interpolate_classes", nargs=2,
                        metavar=("A", "B"), help="with one --mask: frames between the embeddings of classes A and B "
                        "(names), noise of --seed, deterministic DDIM -> a PNG strip and a GIF")
    add("interp_frames", type=int, default=8, help="frames of an interpolation, both end points included (>= 2)")
    args = p.parse_args(argv)
    for flag, ok in (("num_images", args.num_images >= 1), ("controlnet_scale", args.controlnet_scale >= 0),
                     ("num_inference_steps", args.num_inference_steps >= 1), ("batch_size", args.batch_size >= 1),
                     ("cfg_scale", args.cfg_scale >= 0), ("interp_frames", args.interp_frames >= 2)):
        if not ok:
            raise UserError(f"--{flag} is out of range: {getattr(args, flag)}")
    check_dice_threshold(args.dice_threshold)
    return args


def to_uint8(x):
    """(C, H, W) in [-1, 1] -> uint8 HxW (1 channel) or HxWx3."""
    a = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return a[..., 0] if a.shape[2] == 1 else a


def write_png_new(array, path):
    """Write a PNG that must not exist yet (runtime.save_png_once: a concurrent run's file is kept)."""
    save_png_once(Image.fromarray(array), path)


def load_controlnet(args):
    """Checkpoint + LDM -> (model, ldm, checkpoint dict); refuses a checkpoint of another LDM."""
    ck = load_flagged_checkpoint(args.checkpoint, "--checkpoint", args.trust_checkpoint)
    if not isinstance(ck, dict) or ck.get("model_type") != "controlnet":
        kind = ck.get("model_type", "no model_type") if isinstance(ck, dict) else type(ck).__name__
        raise UserError(f"--checkpoint {args.checkpoint} is not a ControlNet checkpoint (it is: {kind})"
                        + ("; it goes to --ldm_checkpoint" if kind == "ldm" else ""))
    ldm = load_ldm(args.ldm_checkpoint, args.trust_checkpoint, args.vae)
    check_same_ldm(ck.get("ldm_fingerprint"), ldm.fingerprint, args.checkpoint, args.ldm_checkpoint,
                   ck.get("ldm_checkpoint"))
    controlnet = ControlNetModel.from_config(ck["controlnet_config"])
    controlnet.load_state_dict(ck["ema_controlnet"] if ck.get("ema_controlnet") and not args.no_ema
                               else ck["controlnet"])
    if ck.get("unet") is not None:
        ldm.unet.load_state_dict(ck["unet"])
    dim = ldm.unet.config.cross_attention_dim
    encoder = ClassEmbedder(ldm.num_classes, dim) if ck["encoder_type"] == "class" else DummyEncoder(dim)
    encoder.load_state_dict(ck["encoder"])
    model = ControlledUNet(ldm.unet, controlnet, encoder).eval().requires_grad_(False)
    return model, ldm, ck


def main(argv=None):
    """Entry point: UserError -> one `error:` line and exit 2, TrainingError -> exit 1 (runtime.run_main)."""
    return run_main(lambda: run(parse_args(argv)))


def run(args):
    """Images for the masks, or (--interpolate_seeds / --interpolate_classes) one interpolation."""
    return interpolate(args) if args.interpolate_seeds or args.interpolate_classes else generate(args)


# ------------------------------------------------------------------------- shared with serve.py
def mask_files(args):
    """--mask / --mask_folder -> mask files (UserError naming the flag)."""
    if args.mask:
        if not is_image_file(args.mask) or not Path(args.mask).is_file():
            raise UserError(f"--mask {args.mask} is not an image file ({', '.join(ALL_EXTENSIONS)})")
        return [Path(args.mask)]
    return list_images(args.mask_folder, "--mask_folder")


def open_model(args, device="auto"):
    """Load the ControlNet + LDM once and put them on the device -> namespace used by every sampling call."""
    model, ldm, ck = load_controlnet(args)
    trained = medical.ReadOptions.from_config((ck.get("config") or {}).get("intensity") or ldm.intensity)
    try:  # masks are label maps: only the slicing matters (the training run's axis unless given)
        opts = medical.ReadOptions("auto", args.slice_axis or str(trained.slice_axis), args.slice_range)
    except ValueError as e:
        raise UserError(f"--{'slice_axis' if 'axis' in str(e) else 'slice_range'}: {e}") from None
    device = pick_device(device)
    setup_cuda_speedups(device)
    model.to(device)
    ldm.vae.to(device)
    precision = resolve_precision(args.mixed_precision, device)
    if precision != "no":  # oneDNN bf16 convolutions: ~2x faster channels-last (AMX)
        ldm.vae.to(memory_format=torch.channels_last)
    return SimpleNamespace(model=model, ldm=ldm, ck=ck, trained=trained, opts=opts, mc=int(ck["mask_channels"]),
                           device=device, precision=precision, amp=autocast_dtype(precision),
                           step=ck.get("global_step", 0), conditional=ck["encoder_type"] == "class",
                           class_names=ldm.class_names, null=ldm.num_classes, size=ldm.image_size,
                           shape=(ldm.latent_channels, ldm.latent_size, ldm.latent_size))


def read_masks(files, opts, mask_channels):
    """Mask files -> one Source per 2-D mask / slice, every one decoded and its channels checked."""
    masks = expand_sources(files, opts, "mask", skip_empty=False)
    for m in masks:  # every mask checked before any work or write
        check_mask_mode(m, verify_file(m, "mask", opts), mask_channels)
    return masks


def class_index(name, flag, s, checkpoint):
    """A class name -> its index (UserError for an unknown class or a ControlNet trained without classes)."""
    if not s.conditional:
        raise UserError(f"{checkpoint} was trained without class labels; drop {flag}")
    if name not in s.class_names:
        raise UserError(f"{flag} '{name}' is not a class of this LDM; valid: {', '.join(s.class_names)}")
    return s.class_names.index(name)


def output_tag(args, s):
    """The output folder of a run: checkpoint, step, EMA/raw, sampler, steps, scale, precision, class, cfg."""
    tag = f"{Path(args.checkpoint).stem}-step{s.step}-{'raw' if args.no_ema else 'ema'}-{args.scheduler}" \
          f"{args.num_inference_steps}-scale{args.controlnet_scale:g}"
    if s.amp is not None:
        tag += f"-{str(s.amp).split('.')[-1]}"
    if args.class_label is not None:
        tag += f"-{args.class_label}-cfg{args.cfg_scale:g}"
    elif args.class_labels_csv:
        tag += f"-csvclasses-cfg{args.cfg_scale:g}"
    return tag


def plan_jobs(stems, per_mask, class_names, seed, num_images):
    """(mask index, seed, file name) of every image: image j of mask i has seed + i * num_images + j."""
    jobs = []
    for mi, stem in enumerate(stems):
        cls = "" if per_mask[mi] is None else f"_{class_names[per_mask[mi]]}"
        for j in range(num_images):
            sd = seed + mi * num_images + j
            jobs.append((mi, sd, f"{stem}{cls}_seed{sd}.png"))
    return jobs


def denoise(s, latents, mask_t, labels, scheduler, steps, controlnet_scale, cfg_scale, generators=None,
            embeddings=None):
    """One batch: initial latents -> decoded images (B, C, H, W) in [-1, 1] on the CPU."""
    sampler = make_sampler(scheduler, s.ldm.noise_scheduler_config)
    with autocast(s.precision, s.device):
        x = sample(s.model, sampler, latents.to(s.device), labels, mask_t, steps, controlnet_scale=controlnet_scale,
                   generators=generators, cfg_scale=cfg_scale, null_label=s.null, embeddings=embeddings)
    with torch.no_grad(), autocast(s.precision, s.device):  # the VAE decode too: seconds per 256 px image in fp32
        return decode(s.ldm.vae, x.float(), s.ldm.scaling_factor, s.ldm.image_channels).cpu()


def sample_jobs(s, args, jobs, per_mask, mask_of, progress=None):
    """Yield (job, image, mask) for the jobs in batches of --batch_size (the CLI's and the server's path)."""
    starts = range(0, len(jobs), args.batch_size)
    guided = any(c is not None for c in per_mask)  # guidance only towards a class
    for b in (progress(starts) if progress else starts):
        batch = jobs[b:b + args.batch_size]
        mask_t = torch.stack([mask_of(mi) for mi, _, _ in batch]).to(s.device)
        labels = torch.tensor([s.null if per_mask[mi] is None else per_mask[mi] for mi, _, _ in batch],
                              device=s.device)
        lat, gens = initial_latents([sd for _, sd, _ in batch], s.shape)
        imgs = denoise(s, lat, mask_t, labels, args.scheduler, args.num_inference_steps, args.controlnet_scale,
                       args.cfg_scale if guided else 1.0, generators=gens)
        yield from zip(batch, imgs, mask_t.cpu())


def generate(args):
    """Validate everything, then write the images (see the module docstring)."""
    from tqdm import tqdm

    files = mask_files(args)
    s = open_model(args)
    masks = read_masks(files, s.opts, s.mc)
    fmt = args.output_format
    try:  # outputs in the training data's units
        window = writers.output_window(fmt, s.ldm.image_channels, s.trained.to_config(), args.checkpoint)
    except ValueError as e:
        raise UserError(str(e)) from None
    class_names = s.class_names
    per_mask = [None] * len(masks)
    if args.class_label is not None or args.class_labels_csv:
        if not s.conditional:
            raise UserError(f"{args.checkpoint} was trained without class labels; drop --class_label/"
                            f"--class_labels_csv")
        if args.class_label is not None:
            per_mask = [class_index(args.class_label, "--class_label", s, args.checkpoint)] * len(masks)
        else:
            by_stem = read_class_labels(args.class_labels_csv, class_names)
            missing = [m.name for m in masks if label_of(m, by_stem) is None]
            if missing:
                raise UserError(f"--class_labels_csv has no class for {len(missing)} mask(s): {', '.join(missing[:5])}")
            per_mask = [label_of(m, by_stem) for m in masks]

    step = s.step
    out = Path(args.output_dir) / output_tag(args, s)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.save_comparison:
            (out / "comparisons").mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --output_dir {args.output_dir}: {e.strerror or e}")

    jobs = plan_jobs([m.stem for m in masks], per_mask, class_names, args.seed, args.num_images)
    target = (lambda name: out / name) if fmt == "png" else (lambda name: writers.output_path(out / name, fmt))
    todo = [j for j in jobs if not target(j[2]).exists()]
    print(f"{len(jobs)} image(s) for {len(masks)} mask(s) -> {out} ({len(jobs) - len(todo)} already there, "
          f"skipped); {args.scheduler} {args.num_inference_steps} steps, controlnet_scale {args.controlnet_scale:g}"
          f", device {s.device}")

    mask_cache = {}

    def mask_of(mi):
        if mi not in mask_cache:
            mask_cache.clear()  # masks come in order: keep only the current one in memory
            mask_cache[mi] = load_mask(masks[mi], s.mc, s.size, s.opts)
        return mask_cache[mi]

    t0 = time.time()
    bar = lambda starts: tqdm(starts, desc="batches", disable=not todo)  # noqa: E731
    for (mi, seed, name), img, m in sample_jobs(s, args, todo, per_mask, mask_of, progress=bar):
        if fmt == "png":
            write_png_new(to_uint8(img), out / name)
        else:  # settings only in the file: never a mask's or a training file's name
            desc = (f"synthetic ControlNet image; mask {mi}; seed {seed}; {args.scheduler} "
                    f"{args.num_inference_steps} steps; controlnet_scale {args.controlnet_scale:g}; step {step}"
                    + ("" if per_mask[mi] is None else f"; class {class_names[per_mask[mi]]}"))
            writers.write_image_once((img.float().clamp(-1, 1) + 1) / 2, out / name, fmt, window, desc)
        if args.save_comparison:
            write_png_new(comparison(m, img), out / "comparisons" / name)
    elapsed = time.time() - t0
    n_batches = -(-len(todo) // args.batch_size)

    if args.report_dice:
        report_dice(args, jobs, masks, s.mc, s.size, out, class_names, per_mask, target, s.opts)
    print(f"Generated {len(todo)} image(s): {timing_summary(len(todo), args.num_inference_steps, elapsed)} "
          f"({n_batches} batch(es) of up to {args.batch_size})")
    print(f"Images in {out}" + (f"; comparisons (mask | generated) in {out / 'comparisons'}"
                                if args.save_comparison else ""))
    return out


# ------------------------------------------------------------------------------------------ interpolation
def plan_interpolation(args, s, mask_stem):
    """What an interpolation is: mode, seeds, class indices, output folder tag and file stem."""
    if args.interpolate_classes:
        mode, seeds = "classes", (args.seed,)
        classes = tuple(class_index(c, "--interpolate_classes", s, args.checkpoint) for c in args.interpolate_classes)
    else:
        mode, seeds = "seeds", tuple(args.interpolate_seeds)
        if args.class_label is not None:
            classes = (class_index(args.class_label, "--class_label", s, args.checkpoint),)
        else:  # a class-conditioned ControlNet interpolates within its first class unless told
            classes = (0,) if s.conditional else ()
    tag = f"interpolation_{Path(args.checkpoint).stem}-step{s.step}-{'raw' if args.no_ema else 'ema'}"
    if s.amp is not None:
        tag += f"-{str(s.amp).split('.')[-1]}"
    stem = animation.interpolation_stem(mode, seeds, [s.class_names[c] for c in classes], "ddim",
                                        args.num_inference_steps, args.cfg_scale if s.conditional else None,
                                        args.interp_frames, extra=f"{mask_stem}-scale{args.controlnet_scale:g}")
    return SimpleNamespace(mode=mode, seeds=seeds, classes=classes, tag=tag, stem=stem)


def interpolation_frames(s, args, plan, mask):
    """The frames t = 0 .. 1 (PIL) of a planned interpolation for one mask (C, H, W), deterministic DDIM.

    Seeds: slerp of the two seeds' initial noises; classes: (1 - t) e[a] + t e[b] of the class embeddings
    with the noise of --seed. The two end points are sampled alone (batch of 1), as `--seed S --num_images 1`
    samples them, so they equal those plain images exactly; the frames between go in batches of --batch_size."""
    n = args.interp_frames
    weights = animation.interp_weights(n)
    if plan.mode == "seeds":
        z = initial_latents(plan.seeds, s.shape)[0]
        latents = [animation.slerp(z[0], z[1], t) for t in weights]
        label, embs = (plan.classes[0] if plan.classes else s.null), None
    else:
        z = initial_latents(plan.seeds, s.shape)[0][0]
        latents = [z] * n
        table = s.model.encoder.embedding.weight.detach()
        a, b = plan.classes
        label, embs = a, [animation.lerp(table[a], table[b], t).view(1, -1) for t in weights]
    inner = list(range(1, n - 1))
    groups = [[0], [n - 1]] + [inner[i:i + args.batch_size] for i in range(0, len(inner), args.batch_size)]
    frames = [None] * n
    for idx in groups:
        mask_t = torch.stack([mask] * len(idx)).to(s.device)
        labels = torch.full((len(idx),), label, dtype=torch.long, device=s.device)
        emb = None if embs is None else torch.stack([embs[i] for i in idx]).to(s.device)
        imgs = denoise(s, torch.stack([latents[i] for i in idx]), mask_t, labels, "ddim", args.num_inference_steps,
                       args.controlnet_scale, args.cfg_scale if s.conditional else 1.0, embeddings=emb)
        for i, img in zip(idx, imgs):
            frames[i] = Image.fromarray(to_uint8(img))
    return frames


def interpolate(args):
    """--interpolate_seeds / --interpolate_classes with one --mask: <tag>/<stem>.png (strip) and .gif."""
    flag = "--interpolate_seeds" if args.interpolate_seeds else "--interpolate_classes"
    for other, used in (("--mask_folder", args.mask_folder), ("--class_labels_csv", args.class_labels_csv),
                        ("--save_comparison", args.save_comparison), ("--report_dice", args.report_dice),
                        ("--output_format " + args.output_format, args.output_format != "png"),
                        ("--scheduler " + args.scheduler, args.scheduler != "ddim")):
        if used:
            raise UserError(f"{other} does not go with {flag}: an interpolation takes one --mask and samples "
                            f"with deterministic DDIM into a PNG strip and a GIF")
    if args.interpolate_classes and args.class_label is not None:
        raise UserError("--class_label does not go with --interpolate_classes: its two names are the classes")
    files = mask_files(args)
    s = open_model(args)
    masks = read_masks(files, s.opts, s.mc)
    if len(masks) != 1:
        raise UserError(f"--mask {args.mask} holds {len(masks)} slices; {flag} takes one 2-D mask "
                        f"(pick a slice with --slice_range K:K+1)")
    plan = plan_interpolation(args, s, masks[0].stem)
    folder = Path(args.output_dir) / plan.tag
    png, gif = folder / f"{plan.stem}.png", folder / f"{plan.stem}.gif"
    if png.exists() and gif.exists():
        print(f"{png} and {gif.name} exist already: skipped (an interpolation is never overwritten)")
        return png, gif
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write --output_dir {args.output_dir}: {e.strerror or e}")
    t0 = time.time()
    frames = interpolation_frames(s, args, plan, load_mask(masks[0], s.mc, s.size, s.opts))
    png, gif, _ = animation.write_interpolation(frames, folder, plan.stem)
    print(f"Interpolated {len(frames)} frame(s): "
          f"{timing_summary(len(frames), args.num_inference_steps, time.time() - t0)}")
    print(f"Strip {png}, animation {gif}")
    return png, gif


def comparison(mask, img):
    """mask | generated as one uint8 array, upscaled (nearest) to at least 128 px high for viewing."""
    c = max(mask.shape[0], img.shape[0])
    m = mask * 2 - 1
    m, g = (t.expand(c, -1, -1) if t.shape[0] == 1 else t for t in (m, img))
    pad = torch.ones(c, img.shape[1], 2)
    both = torch.cat([m, pad, g], dim=2)
    k = max(1, -(-128 // img.shape[1]))
    both = both.repeat_interleave(k, 1).repeat_interleave(k, 2)
    return to_uint8(both)


def report_dice(args, jobs, masks, mc, size, out, class_names, per_mask, target=None, opts=None):
    """Dice between each mask's foreground (any non-zero value) and its image's thresholded foreground."""
    rows = []
    for mi, seed, name in jobs:
        path = out / name if target is None else target(name)
        mask_fg = (load_mask(masks[mi], mc, size, opts) > 0).any(0).numpy()
        thr, d = image_dice(path, mask_fg, args.dice_threshold, args.dice_foreground, args.output_format == "png")
        cls = "" if per_mask[mi] is None else class_names[per_mask[mi]]
        rows.append({"image": name, "mask": str(masks[mi]), "seed": seed, "class": cls, "threshold": thr,
                     "dice": f"{d:.4f}"})
        print(f"dice {d:.4f}  {name} (threshold {thr})")
    path = out / "dice.csv"
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(text.getvalue(), path)
    print(f"mean Dice {np.mean([float(r['dice']) for r in rows]):.4f} over {len(rows)} image(s); per image in {path}")


if __name__ == "__main__":
    main()
