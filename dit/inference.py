"""Sampling from a DiT checkpoint (ours, an official training checkpoint, or the official pretrained
weights): the shared code behind sample.py and sample_ddp.py.

    python sample.py --ckpt results/000-DiT-B-2/checkpoints/0050000.pt --output-dir samples
    torchrun --nproc_per_node=N sample_ddp.py --ckpt ... --num-fid-samples 50000 --cfg-scale 1.5

Every image i of a run has its own seed (seed + i) for its initial noise and every sampling step, so
images do not depend on the batch size or the number of GPUs. Images are written once (temp file +
os.link), so a rerun completes an interrupted run and never overwrites. `--output-format png` (default),
`png16`, `nifti` (1-channel models; values mapped back through the checkpoint's intensity window, e.g. to
HU) or `dicom` (secondary capture, new UIDs, nothing copied from a training file); grids and the .npz are
made from png output only.
"""
import math
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import animation
import flow
import writers
from diffusion import create_diffusion
from download import PRETRAINED, download_model, pretrained_name
from models import ALL_MODELS, model_config
from runtime import (TrainingError, UserError, autocast, load_checkpoint, pick_device, resolve_precision,
                     save_png_once, save_png_replace, setup_cuda_speedups, to_pil)
from utils import load_vae

# The class labels the official sample.py shows for ImageNet models.
OFFICIAL_EXAMPLE_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
INTERP_STEPS = 50  # DDIM steps of an interpolation unless --num-sampling-steps says otherwise
# --sampler per objective (the checkpoint's config["objective"]); the first is the default.
SAMPLERS = {"diffusion": ("ddpm", "ddim"), "flow": flow.SAMPLERS}
DETERMINISTIC = {"diffusion": "ddim", "flow": "heun"}  # the interpolation sampler of each objective
DEFAULT_STEPS = {"diffusion": 250, "flow": flow.DEFAULT_STEPS}


def add_model_args(p):
    """Flags that select the model, VAE, sampler and guidance (shared by sample.py and sample_ddp.py)."""
    p.add_argument("--model", choices=list(ALL_MODELS), default=None,
                   help="DiT size (default: read from the checkpoint; DiT-B/2 in the docs' commands); "
                        "an error if it contradicts the checkpoint")
    p.add_argument("--ckpt", default=None,
                   help="checkpoint .pt (ours or official); default: the official DiT-XL/2 (downloaded)")
    p.add_argument("--image-size", type=int, default=None,
                   help="default: the checkpoint's (256 for the official weights; 256 or 512 picks the file)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="default: the checkpoint's; an error if it contradicts the checkpoint")
    p.add_argument("--vae", default=None,
                   help="ema | mse | <hub id> | <folder>; default: the training VAE (mse for official weights)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun", "sde"], default=None,
                   help="diffusion checkpoints: respaced ancestral DDPM (the paper's; the default) or DDIM "
                        "(deterministic with --eta 0; always for an interpolation); flow checkpoints: the ODE with "
                        "heun (the default) or euler steps, or sde (Euler-Maruyama); default: the checkpoint's")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic)")
    p.add_argument("--num-sampling-steps", type=int, default=None,
                   help="default 250 for diffusion checkpoints, 50 for flow ones (sample.py: 50 for an interpolation)")
    p.add_argument("--cfg-channels", choices=["auto", "3", "all"], default="auto",
                   help="eps channels that CFG guides: 3 = the official code's rule (its published FIDs), "
                        "all = standard CFG; auto = 3 for official weights, all for our checkpoints")
    p.add_argument("--guide-all-channels", action="store_true", help="same as --cfg-channels all")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="no",
                   help="DiT + VAE decode under bf16/fp16 autocast (auto: bf16 where native, fp16 on older GPUs, "
                        "else fp32); images differ slightly from fp32 and go to a folder named after it")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a checkpoint that contains pickled Python objects")
    writers.add_output_flag(p)  # --output_format png | png16 | nifti | dicom


def check_sampling_args(args):
    """Range checks of the shared flags (before anything heavy); fills in the sampler and step defaults."""
    interp = bool(getattr(args, "interpolate_seeds", None) or getattr(args, "interpolate_classes", None))
    if interp and args.sampler == "ddpm":
        raise UserError("an interpolation is sampled with deterministic DDIM: leave out --sampler ddpm")
    if interp and args.sampler == "sde":
        raise UserError("an interpolation is sampled deterministically (flow checkpoints: the ODE, heun or euler): "
                        "leave out --sampler sde")
    if interp and args.eta:
        raise UserError("an interpolation is sampled with deterministic DDIM (eta 0): leave out --eta")
    if args.num_sampling_steps is None and interp:
        args.num_sampling_steps = INTERP_STEPS
    # --sampler and the other step defaults depend on the checkpoint's objective: resolve_sampler fills them.
    if args.image_size is not None and (args.image_size <= 0 or args.image_size % 8):
        raise UserError("--image-size must be a positive multiple of 8")
    if args.num_classes is not None and args.num_classes < 1:
        raise UserError("--num-classes must be at least 1")
    if args.num_sampling_steps is not None and not 1 <= args.num_sampling_steps <= 1000:
        raise UserError("--num-sampling-steps must be between 1 and 1000")
    if args.cfg_scale < 0:
        raise UserError("--cfg-scale must be >= 0 (1 = no guidance)")
    if args.eta < 0:
        raise UserError("--eta must be >= 0")


def resolve_sampler(args, objective):
    """--sampler / --num-sampling-steps for a checkpoint of this objective: the defaults filled in, a sampler of
    the other objective one error line (before the VAE is loaded)."""
    allowed = SAMPLERS[objective]
    interp = bool(getattr(args, "interpolate_seeds", None) or getattr(args, "interpolate_classes", None))
    if args.sampler is None:
        args.sampler = DETERMINISTIC[objective] if interp else allowed[0]
    if args.sampler not in allowed:
        raise UserError(f"--sampler {args.sampler}: {args.ckpt or 'this checkpoint'} was trained with the {objective} "
                        f"objective; its samplers are {' | '.join(allowed)}")
    if args.eta and args.sampler != "ddim":
        raise UserError(f"--eta is DDIM's noise; --sampler {args.sampler} takes none: leave out --eta")
    if args.num_sampling_steps is None:
        args.num_sampling_steps = DEFAULT_STEPS[objective]


# ----------------------------------------------------------------------------- loading
def arch_from_state_dict(sd, source):
    """Registry name and sizes of a DiT state dict, from its tensor shapes."""
    try:
        hidden = sd["pos_embed"].shape[-1]
        tokens = sd["pos_embed"].shape[1]
        w = sd["x_embedder.proj.weight"]
        patch, in_ch = w.shape[-1], w.shape[1]
        out_ch = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
        rows = sd["y_embedder.embedding_table.weight"].shape[0]
    except (KeyError, AttributeError, IndexError):
        raise UserError(f"{source} does not hold DiT weights (no pos_embed / x_embedder / y_embedder)") from None
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    names = [n for n in ALL_MODELS if (lambda c: (c["depth"], c["hidden_size"], c["patch_size"]))(
        model_config(n)) == (depth, hidden, patch)]
    if not names:
        raise UserError(f"{source} holds a DiT of depth {depth}, width {hidden}, patch {patch}: not a size "
                        f"of the registry ({', '.join(ALL_MODELS)})")
    side = int(round(math.sqrt(tokens)))
    return {"model": names[0], "input_size": side * patch, "in_channels": in_ch,
            "learn_sigma": out_ch == 2 * in_ch, "table_rows": rows}


def load_for_sampling(args, device, logger, precision="no"):
    """(model in eval mode, VAE, VAE info, meta) for the flags; UserError on any mismatch."""
    meta = {"official": False}
    if args.ckpt is None:
        name = pretrained_name(args.image_size or 256)
        path = download_model(name)
        sd = load_checkpoint(path)
        meta.update(official=True, official_arch_rule=True, ckpt_tag=f"pretrained-{Path(name).stem}", source=str(path),
                    num_classes=1000, class_names=[f"class{i:04d}" for i in range(1000)],
                    vae=args.vae or "mse", image_size=PRETRAINED[name])
    else:
        ckpt = load_checkpoint(args.ckpt, trust=args.trust_checkpoint)
        src = args.ckpt
        if not isinstance(ckpt, dict):
            raise UserError(f"{src} is not a DiT checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
        p = Path(args.ckpt)
        meta["ckpt_tag"] = f"{p.parent.parent.name}-{p.stem}" if p.parent.name == "checkpoints" else p.stem
        meta["source"] = src
        meta["step"] = ckpt.get("step") if isinstance(ckpt.get("step"), int) else None
        mtype = ckpt.get("model_type")
        if mtype is not None and mtype != "dit":
            raise UserError(f"{src} is a checkpoint of the '{mtype}' model, not of DiT: use the {mtype}/ "
                            f"folder's inference script")
        if mtype == "dit":
            sd = ckpt["ema"]
            cfg = ckpt["config"]
            meta.update(num_classes=cfg["num_classes"], class_names=ckpt.get("class_names"),
                        vae=args.vae or ckpt["vae"]["vae"], image_size=cfg["image_size"],
                        class_dropout_prob=cfg.get("class_dropout_prob"), grayscale=cfg.get("grayscale", False),
                        intensity=cfg.get("intensity"), objective=cfg.get("objective", "diffusion"))
        elif "ema" in ckpt and isinstance(ckpt.get("args"), dict):  # official training checkpoint
            sd, old = ckpt["ema"], ckpt["args"]
            meta.update(official_arch_rule=True, num_classes=old.get("num_classes"), vae=args.vae or old.get("vae", "mse"),
                        image_size=old.get("image_size"))
        elif "pos_embed" in ckpt:  # a bare state dict, like the official pretrained files
            sd = ckpt
            meta.update(vae=args.vae or "mse", official_arch_rule=True)
        else:
            raise UserError(f"{src} is not a DiT checkpoint (no model_type 'dit', no 'ema' weights, "
                            f"no DiT state dict)")
    arch = arch_from_state_dict(sd, meta["source"])
    if "objective" not in meta:
        # Official weights learn the variance; a bare state dict without it is a flow model exported from here.
        meta["objective"] = "diffusion" if arch["learn_sigma"] else "flow"
        meta["official_arch_rule"] = meta.get("official_arch_rule", False) and arch["learn_sigma"]
    resolve_sampler(args, meta["objective"])
    if meta.get("num_classes") is None:
        meta["num_classes"] = arch["table_rows"] - 1  # the last row is the null (CFG) class
    num_classes = meta["num_classes"]
    has_null = arch["table_rows"] == num_classes + 1
    if not meta.get("class_names"):
        meta["class_names"] = [f"class{i:04d}" if num_classes > 100 else f"class{i}" for i in range(num_classes)]
    if args.model is not None and args.model != arch["model"]:
        raise UserError(f"{meta['source']} holds a {arch['model']} model, not --model {args.model}: "
                        f"pass --model {arch['model']} or leave --model out")
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UserError(f"{meta['source']} was trained with {num_classes} classes, not --num-classes "
                        f"{args.num_classes}: pass --num-classes {num_classes} or leave it out")
    vae, vinfo = load_vae(meta["vae"], device)
    vinfo["precision"] = precision  # resolved (no | bf16 | fp16): the decode and the folder names read it
    if precision != "no":  # oneDNN bf16 convolutions: ~2x faster channels-last (AMX)
        vae.to(memory_format=torch.channels_last)
    image_size = arch["input_size"] * vinfo["factor"]
    if args.image_size is not None and args.image_size != image_size:
        raise UserError(f"--image-size {args.image_size}: {meta['source']} generates {image_size}x{image_size} "
                        f"images ({arch['input_size']}x{arch['input_size']} latents, VAE factor "
                        f"{vinfo['factor']}); pass --image-size {image_size} or leave it out")
    if vinfo["latent_channels"] != arch["in_channels"]:
        raise UserError(f"--vae {meta['vae']} has {vinfo['latent_channels']} latent channels but the model "
                        f"takes {arch['in_channels']}: use the VAE it was trained with")
    meta.update(model=arch["model"], image_size=image_size, latent_size=arch["input_size"], has_null=has_null)
    model = ALL_MODELS[arch["model"]](input_size=arch["input_size"], in_channels=arch["in_channels"],
                                      num_classes=num_classes, learn_sigma=arch["learn_sigma"],
                                      class_dropout_prob=0.1 if has_null else 0.0)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{meta['source']}: weights do not fit {arch['model']} "
                        f"({str(e).splitlines()[0][:200]})") from None
    model.to(device).eval()
    logger(f"Loaded {arch['model']} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{num_classes} classes, {image_size}px, {meta['objective']} objective) from {meta['source']}; "
           f"VAE {vinfo['vae']}")
    return model, vae, vinfo, meta


def parse_class_labels(tokens, meta, flag="--class-labels"):
    """--class-labels values (indices or class names) -> list of ints; default: all classes."""
    names, k = meta["class_names"], meta["num_classes"]
    if not tokens:
        return list(OFFICIAL_EXAMPLE_LABELS) if meta["official"] else list(range(k))
    labels = []
    for tok in tokens:
        tok = str(tok)
        if tok.lstrip("-").isdigit():
            lab = int(tok)
            if not 0 <= lab < k:
                raise UserError(f"{flag} {lab} is out of range: the model has {k} classes (0..{k - 1})")
        elif tok in names:
            lab = names.index(tok)
        else:
            shown = ", ".join(names[:20]) + (" ..." if len(names) > 20 else "")
            raise UserError(f"{flag} {tok}: unknown class name; valid: {shown} (or 0..{k - 1})")
        labels.append(lab)
    return labels


# ----------------------------------------------------------------------------- sampling
def _model_tag(meta, vinfo):
    """The part of a folder name that names the weights: checkpoint, image size, VAE."""
    vae = Path(vinfo["vae"]).name if os.path.isabs(vinfo["vae"]) else vinfo["vae"].replace("/", "-")
    model = meta["model"].replace("/", "-")
    # Our checkpoints are tagged like 000-DiT-B-2-0050000: the model name is in there already.
    head = meta["ckpt_tag"] if model in meta["ckpt_tag"] else f"{model}-{meta['ckpt_tag']}"
    return f"{head}-size-{meta['image_size']}-vae-{vae}"


def _precision_tag(vinfo):
    """'' for fp32 (the folder names of earlier versions), else -bf16 / -fp16: such images differ from fp32."""
    prec = vinfo.get("precision", "no")
    return "" if prec in (None, "no") else f"-{prec}"


def _guide_tag(args):
    return "-cfgch3" if args.cfg_channels == "3" else "-cfgchall" if args.cfg_channels == "all" else ""


def settings_tag(args, meta, vinfo, seed):
    """Folder name carrying everything that changes the images."""
    eta = f"-eta{args.eta:g}" if args.sampler == "ddim" and args.eta else ""
    fmt = getattr(args, "output_format", "png")
    fmt = "" if fmt == "png" else f"-{fmt}"  # png16 shares .png names: another format is another folder
    return (f"{_model_tag(meta, vinfo)}-cfg-{args.cfg_scale:g}{_guide_tag(args)}"
            f"-{args.sampler}{args.num_sampling_steps}{eta}-seed-{seed}{_precision_tag(vinfo)}{fmt}")


def interpolation_tag(args, meta, vinfo):
    """Folder of the interpolations of one checkpoint (seeds, classes, steps, cfg and frames name the files)."""
    return f"interpolation_{_model_tag(meta, vinfo)}{_guide_tag(args)}{_precision_tag(vinfo)}"


class FlowSteps:
    """What make_sampler gives for a flow sampler: the number of steps (flow.sample does the rest)."""

    def __init__(self, steps):
        self.steps = int(steps)


def make_sampler(args):
    """The respaced diffusion used for sampling (a FlowSteps for the flow samplers)."""
    if args.sampler in flow.SAMPLERS:
        return FlowSteps(args.num_sampling_steps)
    return create_diffusion(str(args.num_sampling_steps))


def guide_all(model, args, meta):
    """Whether CFG guides every eps channel (the official rule guides 3 of 4 channels)."""
    if args.guide_all_channels or args.cfg_channels == "all" or model.in_channels != 4:
        return True
    return args.cfg_channels == "auto" and not meta.get("official_arch_rule", False)


def initial_noise(model, seed, device="cpu"):
    """The initial latent of the image with this seed (the first draw of its own generator)."""
    device = torch.device(device)
    g = torch.Generator(device).manual_seed(int(seed))
    return torch.randn((model.in_channels, model.input_size, model.input_size), generator=g, device=device)


@torch.no_grad()
def sample_latents(model, diffusion, labels, seeds, cfg_scale, sampler="ddpm", eta=0.0, device="cpu",
                   precision="no", guide_all_channels=False, progress=False, noise=None, class_emb=None):
    """Latents for (label, seed) pairs; each sample draws all its noise from its own seeded generator.

    Interpolation: `noise` (N, C, H, W) replaces the seeds' initial latents, `class_emb` (N, D) replaces the
    labels' rows of the class table (the null row of the unconditional half stays the table's)."""
    device = torch.device(device)
    gens = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
    shape = (model.in_channels, model.input_size, model.input_size)
    if noise is None:
        z = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    else:
        z = noise.to(device)
        for g in gens:  # the generators continue as after their own initial draw (DDPM / eta > 0 steps)
            torch.randn(shape, generator=g, device=device)
    y = torch.tensor(labels, device=device) if class_emb is None else class_emb.to(device)
    if sampler in flow.SAMPLERS:  # per-image generators drive the SDE's noise; every sample has its own
        null = torch.full((len(seeds),), model.num_classes, dtype=torch.long, device=device)
        null = null if class_emb is None else model.y_embedder.embedding_table(null)
        velocity = flow.guided_velocity(model, y, cfg_scale, null, guide_all_channels)
        with autocast(precision, device):
            return flow.sample(velocity, z, diffusion.steps, sampler, gens, progress).float()
    if cfg_scale != 1.0:
        # Batch [cond; uncond] with the null class; forward_with_cfg mixes the two halves.
        z = torch.cat([z, z])
        null = torch.full((len(seeds),), model.num_classes, dtype=torch.long, device=device)
        y = torch.cat([y, null if class_emb is None else model.y_embedder.embedding_table(null)])
        fn, kwargs = model.forward_with_cfg, {"y": y, "cfg_scale": cfg_scale,
                                              "guide_all_channels": guide_all_channels}
    else:
        fn, kwargs = model.forward, {"y": y}
    with autocast(precision, device):
        if sampler == "ddim":
            out = diffusion.ddim_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                             device=device, progress=progress, eta=eta, generators=gens)
        else:
            out = diffusion.p_sample_loop(fn, z.shape, z, clip_denoised=False, model_kwargs=kwargs,
                                          device=device, progress=progress, generators=gens)
    return out[: len(seeds)].float()


def image_jobs(labels, seed, num_samples):
    """(label, seed) of image i = 0 .. N-1: class labels[i mod len(labels)], seed + i (sample.py's rule)."""
    return [(labels[i % len(labels)], seed + i) for i in range(num_samples)]


def sample_batches(model, diffusion, jobs, args, device, precision, guide_all_channels, progress=True):
    """(jobs, latents) per --batch-size jobs, in order: the one sampling loop of sample.py and serve.py.

    Same jobs and batch size, same bits: on CPU a batch of several images differs from the same images
    sampled alone in the last float bits (GEMM blocking), so the server batches exactly as the CLI does."""
    steps = range(0, len(jobs), args.batch_size)
    for i in tqdm(steps, desc="batches", disable=not progress or not jobs):
        batch = jobs[i:i + args.batch_size]
        yield batch, sample_latents(model, diffusion, [b[0] for b in batch], [b[1] for b in batch], args.cfg_scale,
                                    args.sampler, args.eta, device, precision, guide_all_channels)


def render_png(vae, vinfo, latents, meta):
    """Latents -> PIL images exactly as the png output writes them (8-bit; 'L' for grayscale models)."""
    return [to_pil(img) for img in decode_to_uint8(vae, vinfo, latents, meta.get("grayscale", False))]


def interpolation_stem(args, meta, mode, seeds, labels, frames):
    """<stem> of an interpolation's .png / .gif: seeds, class names, <sampler><steps> (ddim, or heun / euler for
    flow checkpoints), cfg and frames."""
    names = [meta["class_names"][lab] for lab in labels]
    return animation.interpolation_stem(mode, seeds, names, args.sampler, args.num_sampling_steps, args.cfg_scale,
                                        frames)


def interpolation_frames(model, vae, vinfo, meta, mode, seeds, labels, frames, args, device, precision, guide):
    """PIL frames t = 0 .. 1 of a seed interpolation (seeds (A, B), labels (c,): slerp of the two initial
    noises) or a class interpolation (seeds (S,), labels (a, b): (1-t) e[a] + t e[b] of the class table rows),
    sampled with deterministic DDIM (eta 0; flow checkpoints: the ODE, args.sampler heun or euler),
    args.num_sampling_steps steps and args.cfg_scale.

    The two end points are sampled and decoded alone, the way sample.py makes the image of that seed with
    --num-samples 1, so they are bit-identical to it; the frames between are batched (--batch-size)."""
    diffusion = make_sampler(args)
    inner = animation.interp_weights(frames)[1:-1]

    def run(labs, sds, **override):
        z = sample_latents(model, diffusion, labs, sds, args.cfg_scale, args.sampler, 0.0, device, precision, guide,
                           **override)
        return render_png(vae, vinfo, z, meta)

    if mode == "seeds":
        (a, b), (c,) = seeds, labels
        first, last = run([c], [a]), run([c], [b])
        za, zb = initial_noise(model, a, device), initial_noise(model, b, device)
    elif mode == "classes":
        (s,), (a, b) = seeds, labels
        first, last = run([a], [s]), run([b], [s])
        table = model.y_embedder.embedding_table.weight.detach()
    else:
        raise ValueError(f"unknown interpolation mode {mode!r}")
    middle = []
    for i in range(0, len(inner), args.batch_size):
        ts = inner[i:i + args.batch_size]
        if mode == "seeds":
            noise = torch.stack([animation.slerp(za, zb, t) for t in ts])
            middle += run([c] * len(ts), [a] * len(ts), noise=noise)
        else:  # the noise of seed S for every frame; only the class embedding moves
            emb = torch.stack([animation.lerp(table[a], table[b], t) for t in ts])
            middle += run([a] * len(ts), [s] * len(ts), class_emb=emb)
    return first + middle + last


def _decode(vae, vinfo, latents):
    """Latents -> VAE output in float32, under the autocast of the sampling precision."""
    # The decode is most of a 256 px image's time at 25-50 steps; bf16 (channels-last) makes it ~5x faster on AMX.
    with autocast(vinfo.get("precision", "no"), latents.device):
        return vae.decode(latents / vinfo["scaling_factor"] + vinfo["shift_factor"]).sample.float()


@torch.no_grad()
def decode_to_uint8(vae, vinfo, latents, grayscale=False):
    """Latents -> uint8 images (N, C, H, W) on the CPU; grayscale=True turns an RGB VAE's output into
    1-channel luma (the training images were grayscale, so the samples stay grayscale)."""
    x = _decode(vae, vinfo, latents)
    if grayscale and x.shape[1] == 3:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    return torch.clamp(127.5 * x + 128.0, 0, 255).to("cpu", dtype=torch.uint8)


@torch.no_grad()
def decode_to_float(vae, vinfo, latents, grayscale=False):
    """Latents -> float32 images (N, C, H, W) in [0, 1] on the CPU (png16 / NIfTI / DICOM output); the
    channel rule of decode_to_uint8."""
    x = _decode(vae, vinfo, latents)
    if grayscale and x.shape[1] == 3:
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    return ((x + 1) / 2).clamp(0, 1).cpu()


def output_settings(args, meta, vinfo):
    """(format, window) of the output; UserError before sampling for NIfTI from a colour model."""
    fmt = args.output_format
    channels = 1 if meta.get("grayscale") or vinfo["image_channels"] == 1 else vinfo["image_channels"]
    try:  # None: 8-bit data, [0, 1] written
        return fmt, writers.output_window(fmt, channels, meta.get("intensity"), meta["source"])
    except ValueError as e:
        raise UserError(str(e)) from None


def description(meta, class_name, seed, args):
    """What a NIfTI / DICOM file says about itself: model, class, seed, sampler (never a training file name)."""
    return (f"synthetic DiT sample; class {class_name}; seed {seed}; {args.sampler} {args.num_sampling_steps} "
            f"steps, cfg {args.cfg_scale:g}; model {meta['model']} {meta['ckpt_tag']}")


def write_images(vae, vinfo, z, meta, jobs, fmt, window, args):
    """Decode latents and write each image once: jobs are (class name, seed, .png path) per latent; png keeps
    the 8-bit path (render_png + save_png_once), other formats go through writers.write_image_once."""
    if fmt == "png":
        for (_, _, path), img in zip(jobs, render_png(vae, vinfo, z, meta)):
            save_png_once(img, path)
        return
    for (name, seed, path), img in zip(jobs, decode_to_float(vae, vinfo, z, meta.get("grayscale", False))):
        writers.write_image_once(img, path, fmt, window, description(meta, name, seed, args))


def image_path(folder, class_name, seed, subfolders=True):
    """Where image (class, seed) goes."""
    return Path(folder) / (class_name if subfolders else "") / f"{class_name}_seed{seed}.png"


def write_grid(paths, out_path, nrow=8):
    """A grid PNG of up to 64 images read back from disk (not kept in memory while sampling)."""
    from torchvision.utils import make_grid
    paths = list(paths)[:64]
    if not paths:
        return None
    imgs = [torch.from_numpy(np.array(Image.open(p))) for p in paths]
    imgs = [t[None] if t.ndim == 2 else t.permute(2, 0, 1) for t in imgs]
    grid = make_grid(torch.stack(imgs), nrow=min(nrow, len(imgs)), padding=2, pad_value=0)
    if imgs[0].shape[0] == 1:
        grid = grid[:1]  # make_grid repeats a gray channel three times
    save_png_replace(to_pil(grid), out_path)  # a grid is a summary of the run: refreshed, not accumulated
    return Path(out_path)


def write_npz(paths, npz_path, chunk=256):
    """The ADM evaluator's .npz (arr_0: uint8 N x H x W x 3), streamed from the PNGs in chunks."""
    first = np.array(Image.open(paths[0]).convert("RGB"))
    h, w = first.shape[:2]
    npz_path = Path(npz_path)
    tmp = npz_path.with_name(f".{npz_path.name}.tmp{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": (len(paths), h, w, 3)})
                for i in range(0, len(paths), chunk):
                    block = np.stack([np.array(Image.open(p).convert("RGB")) for p in paths[i:i + chunk]])
                    f.write(np.ascontiguousarray(block, dtype=np.uint8).tobytes())
        os.replace(tmp, npz_path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TrainingError(f"cannot write {npz_path}: {e.strerror or e}") from None
    return npz_path


def resolve_device_precision(requested, device="auto"):
    """(device, precision) for sampling on one process."""
    device = pick_device(device)
    setup_cuda_speedups(device)
    return device, resolve_precision(requested, device)


def now():
    return time.time()
