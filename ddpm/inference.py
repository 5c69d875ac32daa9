"""Sample images from a trained DDPM: one process or torchrun (images spread over ranks and classes).

    cd ddpm
    python inference.py --ckpt models/DDPM_conditional/ema_ckpt.pt --num-samples 100 --class-labels 0 1 2 3 \
        --cfg-scale 3 --sampler ddim --sampling-steps 50
    python inference.py --ckpt models/DDPM_conditional/ema_ckpt.pt --sampler dpmsolver   # DPM-Solver++, 25 steps
    torchrun --nproc_per_node=4 inference.py --ckpt models/DDPM_conditional/ckpt.pt --use-ema \
        --num-samples 8000 --batch-size 8 --output-dir ./samples --class-subfolders

The model is rebuilt from `config.json` beside the checkpoint (written by train.py), so no architecture
flags are needed. `--ckpt` may be ckpt.pt, ema_ckpt.pt or train_state.pt; `--use-ema` picks the EMA
weights (ema_ckpt.pt beside ckpt.pt, or the "ema" entry of train_state.pt).

Image i of a run is class `labels[i % len(labels)]` with seed `--seed + i`, written as
`<class_name>_seed<seed>.png` (into `<output-dir>/<class_name>/` with --class-subfolders). Existing files are
never overwritten: a rerun skips them, so an interrupted run is completed by running it again. The output
folder remembers its settings (settings.json) and refuses samples made with other settings.

Interpolation (deterministic DDIM, eta 0; --sampling-steps, default 50, and --cfg-scale as above):
    python inference.py --ckpt models/DDPM_conditional/ema_ckpt.pt --interpolate_seeds 3 9 --class-labels cat
    python inference.py --ckpt models/DDPM_conditional/ema_ckpt.pt --interpolate_classes cat dog --seed 42
    python inference.py --ckpt models/m2i/ema_ckpt.pt --interpolate_seeds 0 1 --condition masks/case1.png
--interpolate_seeds A B slerps the initial noise of the per-image seeds A and B (those in <class>_seed<S>.png;
class from --class-labels, one, default the first; unconditional and mask2image checkpoints too),
--interpolate_classes A B (names or indices) mixes the class embedding (1 - t) e[A] + t e[B] with the noise of
--seed; --interp_frames N (default 8) frames include both end points, which equal the plain one-image samples.
Writes <stem>.png (the frames side by side) and <stem>.gif into --output-dir (default
samples/interpolation_<run>_<ckpt>), stem = interp_seeds3-9_cat_ddim50_cfg3_f8 or
interp_classes_cat-dog_seed42_ddim50_cfg3_f8 (+ _<condition stem>_cond<s> for a condition); never overwritten.

`--output-format png` (default, 8-bit), `png16`, `nifti` (`.nii.gz`, 1-channel models: values mapped back
through the checkpoint's intensity window, e.g. to HU) or `dicom` (`.dcm`, secondary capture with new UIDs;
nothing is copied from any training file). Grids are made for png output only.

The checkpoint's training task decides what is made: "generate" images as above; "masks" label masks as PNGs
(0/255 for binary masks, else the labels 0..K-1), named as above; mask2image, superres and segmentation
checkpoints sample from --condition (and --ground_truth) in cond_inference.py, which documents those flags.
"""
import json
import os
import time
from pathlib import Path

import torch

import animation
import cond_inference
import conditional
import sampling
import writers
import runtime as rt
from models import SAMPLERS, check_sampler, count_parameters, rebuild_model
from runtime import UserError
from utils import MODEL_TYPE, read_json, save_grid


def add_sample_args(p):
    """Sampling flags on a runtime.FlagParser (every flag in both --dash-case and --snake_case)."""
    def add(name, aliases=(), **kw):
        p.add_argument(f"--{name.replace('-', '_')}", aliases=aliases, **kw)

    add("ckpt", required=True, help="ckpt.pt, ema_ckpt.pt or train_state.pt of a DDPM run")
    add("use-ema", action="store_true", help="sample with the EMA weights")
    add("num-samples", type=int, default=8, help="total images (spread evenly over the classes)")
    add("class-labels", nargs="+", help="class indices or names to generate (default: all)")
    add("num-classes", type=int, help="optional check: must equal the checkpoint's number of classes")
    add("image-size", type=int, help="optional check: must equal the checkpoint's image size")
    add("batch-size", type=int, default=8, help="images per forward pass per process")
    add("cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (1 = no guidance)")
    add("sampler", choices=list(SAMPLERS), help="ancestral DDPM (default), deterministic DDIM, or DPM-Solver++(2M) "
        "(dpmsolver: deterministic, second order, good images in 25 steps)")
    add("sampling-steps", aliases=["num_sampling_steps"], type=int,
        help="denoising steps (default: all T for ddpm, 50 for ddim, 25 for dpmsolver)")
    add("eta", type=float, help="DDIM eta (default 0 for ddim, 1 for ddpm; not for dpmsolver)")
    add("seed", type=int, default=0, help="image i gets seed + i")
    add("output-dir", help="folder for the PNGs (default: samples/<run>_<ckpt>_<sampler><steps>_cfg<s>_seed<n>)")
    add("class-subfolders", action="store_true", help="write <output-dir>/<class_name>/*.png")
    add("save-grid", action="store_true", help="also write grids to <output-dir>_grids/")
    add("grid-dir", help="write a grid per class (+ all_classes.png) to this folder")
    add("mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast while sampling")
    add("channels-last", action="store_true", help="channels_last memory format")
    add("device", default="auto", help="auto (default), cpu, cuda")
    add("trust-checkpoint", action="store_true", help="allow loading a pickled (non-plain) checkpoint")
    writers.add_output_flag(p)  # --output_format png | png16 | nifti | dicom
    # image-conditioned checkpoints (mask2image, superres, segmentation): cond_inference.py
    add("condition", help="condition file or folder (recursive): masks, low-res or input images")
    add("ground-truth", help="file or folder paired with the conditions by stem (metrics, comparisons)")
    add("samples-per-condition", type=int, default=1, help="samples per condition (seed + i*N + j)")
    add("cond-scale", type=float, default=1.0, help="guidance on the condition (1 = none, 0 = ignore it)")
    add("save-comparison", action="store_true", help="also write condition | sample | ground truth")
    add("report-dice", action="store_true", help="mask2image: Dice of mask vs thresholded image (dice.csv)")
    add("dice-threshold", default="otsu", help="'otsu' or a grey level in [0, 1] for the image foreground")
    add("dice-foreground", default="bright", choices=("bright", "dark"), help="which side of the threshold")
    add("class-label", help="class name for every condition (models trained with classes and conditions)")
    add("class-labels-csv", help="CSV of 'stem,class_name' rows: the class of each condition")
    add("pair-layout", action="store_true", help="mask2image: write images/ + masks/ + pairs.csv (synthetic pairs)")
    # interpolation (deterministic DDIM): a strip PNG + a GIF instead of separate images
    add("interpolate-seeds", type=int, nargs=2, metavar=("A", "B"),
        help="slerp between the initial noise of per-image seeds A and B (class: --class-labels, one)")
    add("interpolate-classes", nargs=2, metavar=("A", "B"),
        help="mix the class embedding from class A to class B (names or indices; noise of --seed)")
    add("interp-frames", type=int, default=8, help="interpolation frames, both end points included (>= 2)")
    return p


COND_FLAGS = ("condition", "ground_truth", "save_comparison", "report_dice", "class_label", "class_labels_csv",
              "pair_layout")


def build_parser():
    """Parser of `python inference.py`."""
    return add_sample_args(rt.FlagParser(description="Sample from a trained DDPM."))


def _is_state_dict(obj):
    return isinstance(obj, dict) and obj and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def load_model(ckpt, use_ema=False, trust=False):
    """Rebuild the UNet from the run's stored config and load the weights.

    Returns (model on CPU, info dict with model / diffusion config and class_names, weights path)."""
    ckpt = Path(ckpt)
    obj = rt.load_checkpoint(ckpt, trust)
    if isinstance(obj, dict) and "model_type" in obj:  # a train_state.pt
        if obj["model_type"] != MODEL_TYPE:
            raise UserError(f"{ckpt} is a {obj['model_type']!r} checkpoint, not a DDPM one")
        cfg = obj.get("config") or {}
        info = {"model": conditional.unet_config(cfg, cfg["channels"], cfg["num_classes"]),
                "diffusion": {k: cfg.get(k) for k in ("noise_steps", "schedule", "beta_start", "beta_end",
                                                      "prediction_type")},
                "class_names": obj.get("class_names", []), "intensity": cfg.get("intensity"), "train": cfg}
        weights, wpath = obj["ema" if use_ema else "model"], ckpt
    else:
        if not _is_state_dict(obj):
            raise UserError(f"{ckpt} is not a DDPM checkpoint (expected a state dict of tensors, got "
                            f"{type(obj).__name__}{' with keys ' + ', '.join(map(str, list(obj)[:5])) if isinstance(obj, dict) else ''})")
        cfg_path = ckpt.parent / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path} is missing: inference rebuilds the model from the config.json that "
                            f"train.py writes beside ckpt.pt; copy it next to {ckpt.name}")
        try:
            info = read_json(cfg_path)
        except (OSError, ValueError) as e:
            raise UserError(f"{cfg_path} is not valid JSON ({e})") from None
        if info.get("model_type") != MODEL_TYPE:
            raise UserError(f"{cfg_path} describes a {info.get('model_type')!r} model, not a DDPM one")
        weights, wpath = obj, ckpt
        if use_ema and ckpt.name != "ema_ckpt.pt":
            wpath = ckpt.parent / "ema_ckpt.pt"
            if not wpath.is_file():
                raise UserError(f"--use-ema: {wpath} does not exist beside {ckpt}")
            weights = rt.load_checkpoint(wpath, trust)
            if not _is_state_dict(weights):
                raise UserError(f"{wpath} is not a DDPM checkpoint (expected a state dict of tensors)")
    model = rebuild_model(info["model"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = [ln.strip() for ln in str(e).splitlines() if ln.strip()][1:2] or [str(e)[:150]]
        raise UserError(f"{wpath} does not match the architecture in its config ({describe(info)}): it is a "
                        f"checkpoint of another architecture or size ({first[0][:160]})")
    return model.eval(), info, wpath


def task_of(info):
    """The training task of a checkpoint ("generate" for runs from before tasks)."""
    return (info.get("train") or {}).get("task", "generate")


def describe(info):
    """Short text of a stored model config."""
    m = info["model"]
    return (f"{m['img_size']}x{m['img_size']}x{m['c_in']}, base width {m['base_channels']}, "
            f"{m['num_classes'] or 'no'} classes")


def resolve_labels(requested, class_names):
    """--class-labels (indices or names) -> list of class indices."""
    if not class_names:
        if requested:
            raise UserError("--class-labels given, but this checkpoint is unconditional")
        return None
    if not requested:
        return list(range(len(class_names)))
    out = []
    for r in requested:
        if r in class_names:
            out.append(class_names.index(r))
        elif r.lstrip("-").isdigit() and 0 <= int(r) < len(class_names):
            out.append(int(r))
        else:
            raise UserError(f"--class-labels: unknown class {r!r}; valid are 0..{len(class_names) - 1} or "
                            f"the names {', '.join(class_names)}")
    return out


def checkpoint_tag(ckpt, wpath, use_ema):
    """<run>_<weights stem>[_ema]: how output folders name the checkpoint (train_state.pt: EMA or not)."""
    return f"{Path(ckpt).parent.name}_{Path(wpath).stem}{'_ema' if use_ema and Path(wpath).name == 'train_state.pt' else ''}"


def samples_tag(ckpt_tag, sampler, steps, cfg_scale, seed, fmt="png"):
    """The default output folder's name under samples/ (png16 / nifti / dicom get their own folder)."""
    return f"{ckpt_tag}_{sampler}{steps}_cfg{cfg_scale:g}_seed{seed}{'' if fmt == 'png' else f'_{fmt}'}"


def image_path(out, i, seed, labels, class_names, subfolders):
    """File of global image index i (class and seed in the name)."""
    if labels is None:
        return out / f"sample_seed{seed + i}.png"
    name = class_names[labels[i % len(labels)]]
    return (out / name if subfolders else out) / f"{name}_seed{seed + i}.png"


def description(i, seed, labels, class_names, args, steps, ckpt_tag):
    """What a NIfTI / DICOM file says about itself: model, class, seed, sampler (never a training file name)."""
    cls = f"class {class_names[labels[i % len(labels)]]}; " if labels is not None else ""
    eta = args.eta if args.eta is not None else (1.0 if args.sampler == "ddpm" else 0.0)
    return (f"synthetic DDPM sample; {cls}seed {seed + i}; {args.sampler} {steps} steps, eta {eta:g}, "
            f"cfg {args.cfg_scale:g}; model {ckpt_tag}")


def write_grids(out, grid_dir, labels, class_names, subfolders, seed, num_samples):
    """Assemble grids from the written files (no re-sampling): one per class and all_classes.png."""
    import numpy as np
    from PIL import Image

    grid_dir.mkdir(parents=True, exist_ok=True)

    def read(p):
        a = np.asarray(Image.open(p))
        return torch.from_numpy(np.array(a[None] if a.ndim == 2 else a.transpose(2, 0, 1)))

    idx = range(num_samples)
    if labels is None:
        imgs = [read(image_path(out, i, seed, None, class_names, subfolders)) for i in list(idx)[:64]]
        save_grid(torch.stack(imgs), grid_dir / "samples.png")
        return [grid_dir / "samples.png"]
    written, rows = [], []
    for c in dict.fromkeys(labels[i % len(labels)] for i in idx):
        files = [image_path(out, i, seed, labels, class_names, subfolders) for i in idx
                 if labels[i % len(labels)] == c][:64]
        imgs = torch.stack([read(p) for p in files])
        path = grid_dir / f"{class_names[c]}.png"
        save_grid(imgs, path)
        written.append(path)
        rows.append(imgs[:10])
    width = min(len(r) for r in rows)
    all_path = grid_dir / "all_classes.png"
    save_grid(torch.cat([r[:width] for r in rows]), all_path, width)
    return written + [all_path]


def resolve_steps(args, diffusion_cfg):
    """--sampling-steps, or the sampler's default; UserError outside 1..T."""
    T = diffusion_cfg["noise_steps"]
    steps = args.sampling_steps or sampling.default_steps(args.sampler, T)
    if not 1 <= steps <= T:
        raise UserError(f"--sampling-steps {steps} must be between 1 and the model's {T} noise steps")
    return steps


def check_interpolation_args(args):
    """The interpolation flags' own rules (before the checkpoint is read), each naming the flag."""
    if args.interpolate_seeds is not None and args.interpolate_classes is not None:
        raise UserError("give either --interpolate_seeds or --interpolate_classes, not both")
    if args.interp_frames < 2:
        raise UserError(f"--interp_frames {args.interp_frames} must be >= 2 (both end points are frames)")
    if args.sampler not in (None, "ddim") or args.eta not in (None, 0.0):
        raise UserError("interpolation samples with deterministic DDIM (eta 0); drop --sampler / --eta")
    if args.output_format != "png":
        raise UserError(f"--output_format {args.output_format}: interpolation writes a PNG strip and a GIF; "
                        f"drop the flag")
    extra = [f"--{k.replace('_', '-')}" for k in ("save_grid", "grid_dir", "class_subfolders", "ground_truth",
                                                 "save_comparison", "report_dice", "pair_layout", "class_labels_csv")
             if getattr(args, k)]
    if args.samples_per_condition != 1:
        extra.append("--samples-per-condition")
    if extra:
        raise UserError(f"{' '.join(extra)}: not used by an interpolation (one strip + one GIF); drop "
                        f"{'it' if len(extra) == 1 else 'them'}")


def interpolation_request(args, info, task):
    """(mode, seeds, class indices) of the interpolation flags, classes checked against the checkpoint."""
    m = info["model"]
    names = (info.get("class_names") or []) if m["num_classes"] else []
    paired = task in conditional.PAIRED_TASKS
    if args.interpolate_classes is not None:
        if paired:
            raise UserError(f"--interpolate_classes: {args.ckpt} is a {task} checkpoint; class interpolation is "
                            f"for generate and masks checkpoints (use --interpolate_seeds)")
        if not names:
            raise UserError(f"--interpolate_classes: {args.ckpt} is unconditional (no classes); use "
                            f"--interpolate_seeds")
        if args.class_labels:
            raise UserError("--class-labels: --interpolate_classes names both classes; drop --class-labels")
        a, b = resolve_labels(list(args.interpolate_classes), names)
        return "classes", (args.seed,), (a, b)
    if paired:  # the class of a conditioned model: --class_label (cond_inference.resolve_class)
        return "seeds", tuple(args.interpolate_seeds), (None,)
    if args.class_labels and len(args.class_labels) > 1:
        raise UserError(f"--class-labels {' '.join(args.class_labels)}: an interpolation between seeds has one "
                        f"class; give one")
    labels = resolve_labels(args.class_labels, names)
    return "seeds", tuple(args.interpolate_seeds), ((labels[0],) if labels is not None else (None,))


def interpolation_tag(ckpt_tag):
    """interpolation_<run>_<ckpt>[_ema]: the folder of a checkpoint's interpolations (the stems say the rest)."""
    return f"interpolation_{animation.safe_part(ckpt_tag)}"


def interpolation_folder(args, wpath):
    """--output-dir, or samples/interpolation_<run>_<ckpt>[_ema]."""
    tag = interpolation_tag(checkpoint_tag(args.ckpt, wpath, args.use_ema))
    return Path(args.output_dir) if args.output_dir else Path("samples") / tag, tag


def interpolate(args, model, info, wpath, task):
    """--interpolate_seeds / --interpolate_classes: write <stem>.png (strip) and <stem>.gif once."""
    d, names = info["diffusion"], info.get("class_names") or []
    steps = resolve_steps(args, d)
    mode, seeds, classes = interpolation_request(args, info, task)
    k = int(info["train"].get("num_mask_classes", 2))
    cond, extra = None, ""
    if task in conditional.PAIRED_TASKS:
        inputs, labels = cond_inference.single_condition(args, info)
        cond, extra = cond_inference.encoded(inputs, 0), f"{inputs.conds[0].stem}_cond{args.cond_scale:g}"
        classes = (labels[0],)
    elif args.condition or args.class_label or args.cond_scale != 1.0:
        raise UserError(f"--condition / --class_label / --cond-scale: {args.ckpt} is a {task} checkpoint without an image "
                        f"condition; drop them")
    out, _ = interpolation_folder(args, wpath)
    stem = sampling.interpolation_stem(mode, seeds, [None if c is None else names[c] for c in classes], steps,
                                       args.cfg_scale, args.interp_frames, extra)
    png, gif = out / f"{stem}.png", out / f"{stem}.gif"
    if int(os.environ.get("RANK", "0")) != 0:  # one strip: under torchrun, rank 0 makes it alone
        return out
    if png.exists() and gif.exists():
        print(f"{png} and {gif} already exist; skipped (never overwritten)", flush=True)
        return out
    rt.check_writable(out)
    device = rt.pick_device(args.device)
    logger = rt.get_logger(None, 0, "ddpm.sample")
    amp = rt.autocast_dtype(rt.resolve_precision(args.mixed_precision, device, logger))
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    s = sampling.Settings("ddim", steps, args.cfg_scale, 0.0, args.cond_scale, args.batch_size, amp,
                          args.channels_last)
    start = time.perf_counter()
    frames = sampling.interpolation_frames(sampling.make_diffusion(info, device), model, mode, seeds, classes, s,
                                           args.interp_frames, task, k,
                                           None if cond is None else cond.to(device))
    png, gif, wrote = animation.write_interpolation(frames, out, stem)
    logger.info(f"interpolation of {len(frames)} frames (ddim {steps} steps) in {time.perf_counter() - start:.1f} s: "
                f"strip {png}, animation {gif}" + ("" if wrote else " (already there; not overwritten)"))
    return out


def sample(args):
    """Validate, then generate args.num_samples images over all ranks; returns the output folder."""
    for key, low in (("num_samples", 1), ("batch_size", 1)):
        if getattr(args, key) < low:
            raise UserError(f"--{key.replace('_', '-')} {getattr(args, key)} must be >= {low}")
    if args.cfg_scale < 0:
        raise UserError(f"--cfg-scale {args.cfg_scale} must be >= 0")
    interpolating = args.interpolate_seeds is not None or args.interpolate_classes is not None
    if interpolating:
        check_interpolation_args(args)
    args.sampler = args.sampler or ("ddim" if interpolating else "ddpm")
    check_sampler(args.sampler, args.eta)
    model, info, wpath = load_model(args.ckpt, args.use_ema, args.trust_checkpoint)
    m, d = info["model"], info["diffusion"]
    class_names = info.get("class_names") or []
    if args.num_classes is not None and args.num_classes != (m["num_classes"] or 0):
        raise UserError(f"--num-classes {args.num_classes} disagrees with {args.ckpt}, which was trained with "
                        f"{m['num_classes'] or 0} classes ({', '.join(class_names[:10])})")
    if args.image_size is not None and args.image_size != m["img_size"]:
        raise UserError(f"--image-size {args.image_size} disagrees with {args.ckpt}, which makes "
                        f"{m['img_size']}x{m['img_size']} images")
    task = task_of(info)
    if interpolating:
        return interpolate(args, model, info, wpath, task)
    if task in conditional.PAIRED_TASKS:
        return cond_inference.sample_conditional(args, model, info, wpath)
    given = [f"--{k.replace('_', '-')}" for k in COND_FLAGS if getattr(args, k)]
    given += [f"--{k.replace('_', '-')}" for k, v in (("samples_per_condition", 1), ("cond_scale", 1.0))
              if getattr(args, k) != v]
    if given:
        raise UserError(f"{' '.join(given)}: {args.ckpt} is a {task} checkpoint without an image condition; "
                        f"drop {'it' if len(given) == 1 else 'them'} (they are for mask2image, superres and "
                        f"segmentation checkpoints)")
    masks = task == "masks"
    k = int(info["train"].get("num_mask_classes", 2)) if masks else 2
    if masks and args.output_format != "png":
        raise UserError(f"--output_format {args.output_format}: a masks checkpoint writes label PNGs; drop the flag")
    labels = resolve_labels(args.class_labels, class_names if m["num_classes"] else [])
    steps = resolve_steps(args, d)
    fmt = args.output_format
    try:  # None: 8-bit data, [0, 1] written
        window = writers.output_window(fmt, m["c_in"], info.get("intensity"), args.ckpt)
    except ValueError as e:
        raise UserError(str(e)) from None
    ckpt_tag = checkpoint_tag(args.ckpt, wpath, args.use_ema)
    # png16 shares .png names: another format is another folder
    out = Path(args.output_dir or f"samples/{samples_tag(ckpt_tag, args.sampler, steps, args.cfg_scale, args.seed, fmt)}")
    settings = {"model_type": MODEL_TYPE, "weights": str(Path(wpath).resolve()), "use_ema": bool(args.use_ema),
                "sampler": args.sampler, "steps": steps, "eta": args.eta, "cfg_scale": args.cfg_scale,
                "seed": args.seed, "class_subfolders": bool(args.class_subfolders)}
    if fmt == "png16":  # the one format that shares png's file names: never mixed into one folder
        settings["png_bits"] = 16
    settings_path = out / "settings.json"
    if settings_path.is_file():
        old = read_json(settings_path)
        diff = [k for k in list(settings) + ["png_bits"] * ("png_bits" in old) if old.get(k) != settings.get(k)]
        if diff:
            raise UserError(f"{out} holds samples made with other settings ({', '.join(f'{k}={old.get(k)}' for k in diff)}); "
                            f"choose another --output-dir")
    rt.check_writable(out)

    rank, world, _, device = rt.setup_distributed(args.device)  # also TF32 / cudnn autotuning on a GPU
    logger = rt.get_logger(None, rank, "ddpm.sample")
    amp_dtype = rt.autocast_dtype(rt.resolve_precision(args.mixed_precision, device, logger))
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diffusion = sampling.make_diffusion(info, device)
    s = sampling.Settings(args.sampler, steps, args.cfg_scale, args.eta, batch_size=args.batch_size,
                          amp_dtype=amp_dtype, channels_last=args.channels_last)
    logger.info(f"loaded {wpath} ({describe(info)}, {count_parameters(model):,} parameters); world size {world}")
    if fmt in ("nifti", "dicom"):
        logger.info(f"{fmt} output in the training data's units: " + (
            f"intensity window [{window[0]:g}, {window[1]:g}]" if window else "no window stored (8-bit data): 0..1"))
    if rank == 0:
        rt.atomic_write_text(json.dumps(settings, indent=2), settings_path)
        if labels is not None and args.class_subfolders:
            for c in set(labels):
                (out / class_names[c]).mkdir(parents=True, exist_ok=True)
    rt.barrier()

    def target(i):  # the file of image i in the chosen format (.png, .nii.gz, .dcm)
        return writers.output_path(image_path(out, i, args.seed, labels, class_names, args.class_subfolders), fmt)

    mine = [i for i in range(rank, args.num_samples, world)]
    todo = [i for i in mine if not target(i).exists()]
    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=f"rank {rank} images", disable=rank != 0)
    written, start = 0, time.perf_counter()
    for b in range(0, len(todo), args.batch_size):
        chunk = todo[b:b + args.batch_size]
        y = [labels[i % len(labels)] for i in chunk] if labels is not None else None
        imgs = sampling.sample_batch(diffusion, model, [args.seed + i for i in chunk], y, s,
                                     as_float=fmt != "png" or masks)
        for i, img in zip(chunk, imgs.cpu()):
            if fmt == "png":  # masks: label maps, 0/255 for binary masks, else the labels 0..K-1
                written += rt.save_png_once(sampling.png_image(img, task, k), image_path(
                    out, i, args.seed, labels, class_names, args.class_subfolders))
            else:
                written += writers.write_image_once(img, target(i), fmt, window, description(
                    i, args.seed, labels, class_names, args, steps, ckpt_tag)) is not None
        bar.update(len(chunk))
    bar.close()
    elapsed = time.perf_counter() - start
    counts = torch.tensor([written, len(mine) - len(todo)], dtype=torch.float64)
    if rt.is_dist():
        torch.distributed.all_reduce(counts)
    n_new, n_skip = int(counts[0]), int(counts[1])
    logger.info(f"sampled {n_new} new images ({n_skip} already there) with {args.sampler}, {steps} steps, cfg "
                f"{args.cfg_scale:g}, world size {world}, batches of up to {args.batch_size}: "
                + rt.timing_summary(n_new, steps, elapsed))
    rt.barrier()
    if rank == 0:
        logger.info(f"images: {out.resolve()}" + (" (one folder per class)" if args.class_subfolders else ""))
        grid_dir = Path(args.grid_dir) if args.grid_dir else (Path(str(out) + "_grids") if args.save_grid else None)
        if grid_dir is not None and fmt != "png":
            logger.info(f"no grids: they are made for --output-format png only (this run wrote {fmt})")
        elif grid_dir is not None:
            grids = write_grids(out, grid_dir, labels, class_names, args.class_subfolders, args.seed,
                                args.num_samples)
            logger.info(f"grids: {', '.join(str(g) for g in grids[-1:])} and {len(grids) - 1} more in {grid_dir}")
    rt.finish_distributed()
    return out


def main(argv=None, save_grid_default=False):
    """CLI entry: parse flags, sample, turn input errors into one-line messages."""
    parser = build_parser()
    if save_grid_default:
        parser.set_defaults(save_grid=True)
    rt.run_main(sample, parser.parse_args(argv))


if __name__ == "__main__":
    main()
