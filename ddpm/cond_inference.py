"""Sampling from an image-conditioned DDPM: images from masks (mask2image), high-res from low-res images
(superres), masks from images (segmentation), with the metrics each task is judged by. inference.py calls
sample_conditional for a checkpoint whose training task is one of these:

    cd ddpm
    python inference.py --ckpt models/m2i/ema_ckpt.pt --condition masks/ --samples_per_condition 4 \
        --sampler ddim --sampling_steps 50 --save_comparison --report_dice
    python inference.py --ckpt models/sr/ema_ckpt.pt --ground_truth hr/   # hr/ degraded as in training
    python inference.py --ckpt models/seg/ema_ckpt.pt --condition images/ --ground_truth masks/ \
        --samples_per_condition 8
    torchrun --nproc_per_node 4 inference.py --ckpt ... --condition ...   # conditions spread over ranks

Conditions (a file or a folder, recursive; DICOM / NIfTI give one per slice) are sorted; sample j of
condition i has seed `--seed + i*N + j` (N = --samples_per_condition) and is written once as
`<condition stem>[_<class>]_seed<seed>.png` (masks as label PNGs: 0/255 for binary masks, else the labels).
--ground_truth pairs by stem. Reports (rewritten from the files on every run, so a rerun that only skips
still reports): dice.csv (mask2image --report_dice, ControlNet's definition), sr_metrics.csv (PSNR / SSIM of
each sample and of bicubic upsampling of the same low-res input), seg_metrics.csv (Dice of the mean mask,
mean and best of the N samples) beside `<stem>_mean.png` (majority vote) and `<stem>_uncertainty.png`
(normalised vote entropy x 255). --pair_layout writes images/<stem>.png + masks/<stem>.png + pairs.csv: a
synthetic paired data set in the layout train.py reads.
"""
import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import conditional as cd
import imaging
import medical
import runtime as rt
import sampling
import writers
from metrics import label_dice, label_entropy, majority_mask, psnr, ssim
from models import Diffusion, count_parameters
from pairing import check_dice_threshold, image_dice, label_of, read_class_labels
from runtime import UserError
from utils import MODEL_TYPE, read_json


def list_sources(path, flag, opts):
    """--condition / --ground_truth: a file or a folder (recursive) -> sorted Sources with distinct stems."""
    p = Path(path)
    if p.is_dir():
        files = imaging.list_images(p, recursive=True)
    elif p.is_file() and imaging.is_image_file(p):
        files = [p]
    else:
        raise UserError(f"{flag} {p} is not an image file or a folder of images")
    if not files:
        raise UserError(f"{flag} {p} has no images ({', '.join(imaging.ALL_EXTENSIONS)})")
    try:
        srcs = medical.expand(files, opts, skip_empty=False)
    except imaging.ImageError as e:
        raise UserError(f"{flag} {e}") from None
    seen = {}
    for s in srcs:  # outputs are named by stem: two inputs with one stem would share files
        if s.stem in seen:
            raise UserError(f"{flag} {p}: {seen[s.stem]} and {s} share the stem '{s.stem}'; rename or remove one")
        seen[s.stem] = s
    return srcs


def read_image(src, channels, opts, what):
    """An image file or slice -> float (C, H, W) in [0, 1] at its own size, through the training window."""
    try:
        return imaging.decode_image(src, channels, opts)
    except imaging.ImageError as e:
        raise UserError(f"{what} {e}") from None


class Inputs:
    """Conditions, ground truth and the reading rules of one checkpoint (the training rules)."""

    def __init__(self, args, info):
        cfg = info["train"]
        self.task, self.k = cfg["task"], int(cfg.get("num_mask_classes", 2))
        self.size, self.channels = int(info["model"]["img_size"]), int(cfg["channels"])
        self.factor, self.filt = int(cfg.get("sr_factor", 4)), cfg.get("sr_filter", "bicubic")
        self.opts = medical.ReadOptions.from_config(info.get("intensity"))
        self.mask_opts = medical.ReadOptions("auto", str(self.opts.slice_axis), self.opts.slice_range)
        self.degrade = self.task == "superres" and not args.condition
        if not args.condition and not (self.degrade and args.ground_truth):
            what = {"mask2image": "masks", "segmentation": "images"}.get(self.task, "low-res images, or give "
                                                                         "--ground_truth high-res images to degrade")
            raise UserError(f"--condition is required for a {self.task} checkpoint (a file or folder of {what})")
        cond_opts = self.mask_opts if self.task == "mask2image" else self.opts
        gt_opts = self.mask_opts if self.task == "segmentation" else self.opts
        self.truth = list_sources(args.ground_truth, "--ground_truth", gt_opts) if args.ground_truth else None
        self.conds = self.truth if self.degrade else list_sources(args.condition, "--condition", cond_opts)
        self.gt = None
        if self.truth is not None:
            by_stem = {s.stem: s for s in self.truth}
            missing = [c.name for c in self.conds if c.stem not in by_stem]
            if missing:
                raise UserError(f"--ground_truth {args.ground_truth} has no file with the stem of {len(missing)} "
                                f"condition(s): {', '.join(missing[:5])}{', ...' * (len(missing) > 5)}")
            self.gt = [by_stem[c.stem] for c in self.conds]

    def mask(self, src):
        """A label mask at the model size (nearest), long (1, S, S)."""
        return imaging.resize_mask(cd.read_label_map(src, self.k, self.mask_opts), self.size).long()

    def image(self, src, what):
        """An image at the model size by the training rule (shorter side, centre crop), [0, 1]."""
        return imaging.resize_image(read_image(src, self.channels, self.opts, what), self.size)

    def condition(self, i):
        """Raw condition i as training feeds it: a mask (1, S, S) long or an image (C, S, S) in [-1, 1]."""
        src = self.conds[i]
        if self.task == "mask2image":
            return self.mask(src)
        if self.task == "segmentation":
            return self.image(src, "condition") * 2 - 1
        if self.degrade:
            return cd.degrade(self.image(src, "ground truth") * 2 - 1, self.factor, self.filt)
        x = read_image(src, self.channels, self.opts, "condition")
        low = self.size // self.factor
        if tuple(x.shape[-2:]) not in ((low, low), (self.size, self.size)):
            raise UserError(f"condition {src} is {x.shape[-1]}x{x.shape[-2]} but this superres model takes "
                            f"{low}x{low} low-res inputs (image size {self.size} / sr_factor {self.factor}) or "
                            f"{self.size}x{self.size} upsampled ones; resize it or use --ground_truth instead")
        return cd.upsample(x * 2 - 1, self.size)

    def truth_of(self, i):
        """Ground truth i at the model size: a label map (1, S, S) (segmentation) or an image [0, 1]."""
        return self.mask(self.gt[i]) if self.task == "segmentation" else self.image(self.gt[i], "ground truth")


def encoded(inputs, i):
    """Condition i as the UNet sees it (conditional.encode_condition), (Cc, S, S)."""
    return cd.encode_condition(inputs.task, inputs.condition(i)[None], inputs.k)[0]


def sample_name(stem, cls, seed):
    """<condition stem>[_<class>]_seed<seed>.png: the file of one sample."""
    return f"{stem}{cls}_seed{seed}.png"


def single_condition(args, info):
    """Inputs of exactly one condition (an interpolation, one served upload) and its class -> (inputs, labels)."""
    validate(args, info["train"]["task"])
    inputs = Inputs(args, info)
    if len(inputs.conds) != 1:
        raise UserError(f"--condition {args.condition or args.ground_truth} holds {len(inputs.conds)} conditions; "
                        f"an interpolation takes one file (or slice)")
    labels = resolve_class(args, info, inputs.conds)
    encoded(inputs, 0)  # read and checked before any work
    return inputs, labels


def settings_of(args, task, wpath, steps):
    """What makes the images of an output folder (settings.json): a rerun with other settings is refused."""
    s = {"model_type": MODEL_TYPE, "task": task, "weights": str(Path(wpath).resolve()), "use_ema": bool(args.use_ema),
         "sampler": args.sampler, "steps": steps, "eta": args.eta, "cfg_scale": args.cfg_scale,
         "cond_scale": args.cond_scale, "seed": args.seed, "samples_per_condition": args.samples_per_condition,
         "class_label": args.class_label, "pair_layout": bool(args.pair_layout),
         "class_labels_csv": str(Path(args.class_labels_csv).resolve()) if args.class_labels_csv else None,
         "condition": str(Path(args.condition or args.ground_truth).resolve())}
    if args.output_format == "png16":
        s["png_bits"] = 16
    return s


def check_settings(out, settings):
    """UserError when `out` holds samples made with other settings."""
    path = out / "settings.json"
    if path.is_file():
        old = read_json(path)
        diff = [k for k in list(settings) + ["png_bits"] * ("png_bits" in old) if old.get(k) != settings.get(k)]
        if diff:
            was = ", ".join(f"{k}={old.get(k)}" for k in diff)
            raise UserError(f"{out} holds samples made with other settings ({was}); choose another --output-dir")


def resolve_class(args, info, conds):
    """--class_label NAME or --class_labels_csv -> the class index of each condition (None: the model's
    'no class' token), as ControlNet's inference takes them."""
    names, classes = info.get("class_names") or [], info["model"].get("num_classes")
    if args.class_labels:
        raise UserError("--class-labels is for generate / masks checkpoints; give one --class_label NAME "
                        "(or --class_labels_csv)")
    if args.class_label is None and not args.class_labels_csv:
        return [None] * len(conds)
    given = "--class_label" if args.class_label is not None else "--class_labels_csv"
    if args.class_label is not None and args.class_labels_csv:
        raise UserError("--class_label and --class_labels_csv: give one of them")
    if not classes:
        raise UserError(f"{given}: {args.ckpt} was trained without class labels; drop it")
    if args.class_label is not None:
        if args.class_label not in names:
            raise UserError(f"--class_label '{args.class_label}' is not a class of {args.ckpt}; valid: {', '.join(names)}")
        return [names.index(args.class_label)] * len(conds)
    by_stem = read_class_labels(args.class_labels_csv, names, whose="the checkpoint's")
    labels = [label_of(c, by_stem) for c in conds]
    missing = [c.name for c, lab in zip(conds, labels) if lab is None]
    if missing:
        raise UserError(f"--class_labels_csv {args.class_labels_csv} has no row for {len(missing)} condition(s): "
                        f"{', '.join(missing[:5])}{', ...' * (len(missing) > 5)}")
    return labels


def validate(args, task):
    """Flag ranges and the flags that only some tasks take."""
    for flag, ok in (("samples_per_condition", args.samples_per_condition >= 1), ("batch_size", args.batch_size >= 1),
                     ("cond_scale", args.cond_scale >= 0)):
        if not ok:
            raise UserError(f"--{flag} is out of range: {getattr(args, flag)}")
    if args.report_dice and task != "mask2image":
        raise UserError(f"--report_dice is for mask2image checkpoints; this one is {task} "
                        + ("(it reports Dice against --ground_truth masks itself)" if task == "segmentation" else ""))
    if args.pair_layout and (task != "mask2image" or args.samples_per_condition != 1):
        raise UserError("--pair_layout writes one image per mask: it needs a mask2image checkpoint and "
                        "--samples_per_condition 1")
    if task == "segmentation" and args.output_format != "png":
        raise UserError(f"--output_format {args.output_format}: masks are written as label PNGs; drop the flag")
    check_dice_threshold(args.dice_threshold)


def comparison(parts):
    """Pictures side by side (2 px white gaps), nearest-upscaled to >= 128 px high -> uint8 array."""
    c = max(p.shape[0] for p in parts)
    parts = [p.expand(c, -1, -1) for p in parts]
    gap = torch.ones(c, parts[0].shape[1], 2)
    both = torch.cat([t for p in parts for t in (p, gap)][:-1], dim=2)
    k = max(1, -(-128 // both.shape[1]))
    a = (both.repeat_interleave(k, 1).repeat_interleave(k, 2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
    return a[..., 0].numpy() if c == 1 else a.numpy()


def write_csv(rows, path):
    """Rows (dicts) -> CSV, floats to 4 decimals, atomically (a report of all files, rewritten by every run)."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows([{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])
    rt.atomic_write_text(text.getvalue(), path)


def gather(rows):
    """Every rank's rows on every rank, in condition order ('_i' keys dropped)."""
    if rt.is_dist():
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, rows)
        rows = [r for p in parts for r in p]
    return [{k: v for k, v in r.items() if k != "_i"} for r in sorted(rows, key=lambda r: r["_i"])]


def mean(rows, key):
    return float(np.mean([r[key] for r in rows]))


def output_folder(args, task, wpath, steps, cls):
    """--output_dir, or samples/<run>_<ckpt>_<task>_<sampler><steps>_cond<s>[_<class>_cfg<g>]_seed<n>[_<format>]."""
    ema = "_ema" if args.use_ema and wpath.name == "train_state.pt" else ""
    tag = f"{Path(args.ckpt).parent.name}_{Path(wpath).stem}{ema}"
    fmt = "" if args.output_format == "png" else f"_{args.output_format}"
    return Path(args.output_dir or f"samples/{tag}_{task}_{args.sampler}{steps}_cond{args.cond_scale:g}"
                f"{cls}{f'_cfg{args.cfg_scale:g}' if cls else ''}_seed{args.seed}{fmt}"), tag


def sample_conditional(args, model, info, wpath):
    """Validate, sample every condition's N images over all ranks, write the reports; returns the output folder."""
    task, d = info["train"]["task"], info["diffusion"]
    validate(args, task)
    inputs = Inputs(args, info)
    labels = resolve_class(args, info, inputs.conds)
    names = info.get("class_names") or []

    def cls_of(i):  # "_<class>" in the names of condition i's outputs
        return "" if labels[i] is None else f"_{names[labels[i]]}"

    steps = args.sampling_steps or sampling.default_steps(args.sampler, d["noise_steps"])
    if not 1 <= steps <= d["noise_steps"]:
        raise UserError(f"--sampling-steps {steps} must be between 1 and the model's {d['noise_steps']} noise steps")
    try:
        window = writers.output_window(args.output_format, inputs.channels, info.get("intensity"), args.ckpt)
    except ValueError as e:
        raise UserError(str(e)) from None
    for i in range(len(inputs.conds)):  # every input read (and size-checked) before any work or write
        inputs.condition(i)
        if inputs.gt is not None:
            inputs.truth_of(i)
    cls = f"_{args.class_label}" if args.class_label else "_classes" if args.class_labels_csv else ""
    out, tag = output_folder(args, task, wpath, steps, cls)
    inside = [f for f in (args.condition, args.ground_truth) if f and Path(f).is_dir() and
              out.resolve().is_relative_to(Path(f).resolve())]
    if inside:  # a recursive listing would read this run's outputs as inputs the next time
        raise UserError(f"--output-dir {out} is inside {inside[0]}, which is read recursively; choose a folder outside")
    settings = settings_of(args, task, wpath, steps)
    check_settings(out, settings)
    rt.check_writable(out)

    rank, world, _, device = rt.setup_distributed(args.device)
    logger = rt.get_logger(None, rank, "ddpm.sample")
    amp = rt.autocast_dtype(rt.resolve_precision(args.mixed_precision, device, logger))
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    diffusion = Diffusion(d["noise_steps"], d["beta_start"], d["beta_end"], inputs.size, device, d["schedule"],
                          info["model"]["c_in"], d.get("prediction_type") or "epsilon")
    n_per = args.samples_per_condition
    logger.info(f"loaded {wpath} ({task}, {count_parameters(model):,} parameters); {len(inputs.conds)} condition(s) "
                f"x {n_per} sample(s); world size {world}")
    if rank == 0:
        rt.atomic_write_text(json.dumps(settings, indent=2), out / "settings.json")
        for sub in ["comparisons"] * args.save_comparison + ["images", "masks"] * args.pair_layout:
            (out / sub).mkdir(exist_ok=True)
    rt.barrier()

    def name(i, j):  # the output of sample j of condition i (seed, condition stem, class)
        stem = inputs.conds[i].stem
        return f"images/{stem}.png" if args.pair_layout else sample_name(stem, cls_of(i), args.seed + i * n_per + j)

    def path(i, j):
        return out / name(i, j) if task == "segmentation" else writers.output_path(out / name(i, j), args.output_format)

    mine = list(range(rank, len(inputs.conds), world))
    jobs = [(i, j) for i in mine for j in range(n_per)]
    todo = [job for job in jobs if not path(*job).exists()]
    start = time.perf_counter()
    written = sample_jobs(args, diffusion, model, inputs, todo, path, labels, steps, amp, window, tag, rank, device)
    counts = torch.tensor([written, len(jobs) - len(todo)], dtype=torch.float64)
    if rt.is_dist():
        torch.distributed.all_reduce(counts)
    logger.info(f"sampled {int(counts[0])} new images ({int(counts[1])} already there) with {args.sampler}, {steps} "
                f"steps, cond_scale {args.cond_scale:g}, world size {world}: "
                + rt.timing_summary(int(counts[0]), steps, time.perf_counter() - start))
    rows = {"dice": [], "sr": [], "seg": []}
    for i in mine:  # reports from the files on disk: complete after a rerun that only skipped
        report(args, inputs, i, [path(i, j) for j in range(n_per)], [name(i, j) for j in range(n_per)], out, rows,
               cls_of(i))
    rows = {key: gather(r) for key, r in rows.items()}
    if rank == 0:
        summarise(rows, out, logger)
        if args.pair_layout:
            write_csv([{"stem": c.stem, "seed": args.seed + i, "condition_index": i}
                       for i, c in enumerate(inputs.conds)], out / "pairs.csv")
        logger.info(f"outputs: {out.resolve()}" + (" (images/ + masks/ + pairs.csv)" if args.pair_layout else ""))
    rt.finish_distributed()
    return out


def sample_jobs(args, diffusion, model, inputs, todo, path, labels, steps, amp, window, tag, rank, device):
    """Sample the (condition, sample) jobs in batches and write each file once; returns how many were written."""
    from tqdm import tqdm

    task, k, n_per, written = inputs.task, inputs.k, args.samples_per_condition, 0
    s = settings(args, steps, amp)
    for b in tqdm(range(0, len(todo), args.batch_size), desc="batches", disable=rank != 0 or not todo):
        chunk = todo[b:b + args.batch_size]
        enc = {i: encoded(inputs, i) for i in {i for i, _ in chunk}}
        x = sampling.sample_batch(diffusion, model, [args.seed + i * n_per + j for i, j in chunk],
                                  None if labels[0] is None else [labels[i] for i, _ in chunk], s, as_float=True,
                                  cond=torch.stack([enc[i] for i, _ in chunk]).to(device))
        for (i, j), img in zip(chunk, x.cpu()):
            if task == "segmentation" or args.output_format == "png":  # label PNGs / 8-bit images
                written += rt.save_png_once(sampling.png_image(img, task, k), path(i, j))
            else:  # the file says what made it; never a training file's name
                desc = (f"synthetic DDPM {task} sample; condition {i}; seed {args.seed + i * n_per + j}; "
                        f"{args.sampler} {steps} steps; cond_scale {args.cond_scale:g}; model {tag}")
                written += writers.write_image_once(img, path(i, j), args.output_format, window, desc) is not None
    return written


def settings(args, steps, amp):
    """sampling.Settings of the flags."""
    return sampling.Settings(args.sampler, steps, args.cfg_scale, args.eta, args.cond_scale, args.batch_size, amp,
                             args.channels_last)


def read_back(path, inputs):
    """A written sample as the metrics see it: a label map (H, W) or an image (C, H, W) in [0, 1]."""
    if inputs.task == "segmentation":
        return cd.read_label_map(path, inputs.k)[0]
    return read_image(path, inputs.channels, None, "sample")


def report(args, inputs, i, paths, names, out, rows, cls=""):
    """Comparisons, pair masks, mean / uncertainty maps and the metric rows of condition i."""
    task, k, src = inputs.task, inputs.k, inputs.conds[i]
    raw, samples = inputs.condition(i), [read_back(p, inputs) for p in paths]
    truth = inputs.truth_of(i) if inputs.gt is not None else None
    row = {"condition": str(src), "ground_truth": str(inputs.gt[i]) if truth is not None else ""}
    seeds = [args.seed + i * len(paths) + j for j in range(len(paths))]
    if args.pair_layout:
        rt.save_png_once(Image.fromarray(cd.mask_png(raw[0], k)), out / "masks" / f"{src.stem}.png")
    if args.save_comparison:  # condition | sample | ground truth; label maps spread over the grey range
        spread = max(k - 1, 1)
        shown = raw.float() / spread if task == "mask2image" else (raw + 1) / 2
        for s, n in zip(samples, names):
            parts = [x.reshape(-1, *x.shape[-2:]).float() for x in (s, truth) if x is not None]
            if task == "segmentation":
                parts = [x / spread for x in parts]
            rt.save_png_once(Image.fromarray(comparison([shown, *parts])), out / "comparisons" / Path(n).name)
    if task == "mask2image" and args.report_dice:
        for j, (p, n) in enumerate(zip(paths, names)):
            thr, d = image_dice(p, raw[0].numpy() > 0, args.dice_threshold, args.dice_foreground,
                                args.output_format == "png")
            rows["dice"].append({"_i": (i, j), "image": n, "mask": str(src), "seed": seeds[j],
                                 "class": cls[1:], "threshold": thr, "dice": d})
    if task == "superres" and truth is not None:
        base = (raw + 1) / 2  # the condition is the bicubic upsampling of the low-res input
        rows["sr"] += [{"_i": (i, -1), **row, "method": "bicubic", "image": "", "seed": "", "psnr": psnr(base, truth),
                        "ssim": ssim(base, truth)}]
        rows["sr"] += [{"_i": (i, j), **row, "method": "ddpm", "image": n, "seed": seeds[j], "psnr": psnr(s, truth),
                        "ssim": ssim(s, truth)} for j, (s, n) in enumerate(zip(samples, names))]
    if task == "segmentation":
        votes = torch.stack(samples)
        mean_mask, stem = majority_mask(votes, k), f"{src.stem}{cls}"
        rt.save_png_once(Image.fromarray(cd.mask_png(mean_mask, k)), out / f"{stem}_mean.png")
        unc = (label_entropy(votes, k) * 255).round().to(torch.uint8).numpy()
        rt.save_png_once(Image.fromarray(unc), out / f"{stem}_uncertainty.png")
        if truth is not None:
            per = [label_dice(s.numpy(), truth[0].numpy(), k) for s in samples]
            rows["seg"].append({"_i": (i, 0), **row, "samples": len(samples),
                                "dice_mean_mask": label_dice(mean_mask.numpy(), truth[0].numpy(), k),
                                "dice_samples_mean": float(np.mean(per)), "dice_samples_best": max(per)})


def summarise(rows, out, logger):
    """Write dice.csv / sr_metrics.csv / seg_metrics.csv and log their means (rank 0)."""
    if rows["dice"]:
        write_csv(rows["dice"], out / "dice.csv")
        logger.info(f"mean Dice {mean(rows['dice'], 'dice'):.4f} over {len(rows['dice'])} image(s); per image in "
                    f"{out / 'dice.csv'}")
    if rows["sr"]:
        write_csv(rows["sr"], out / "sr_metrics.csv")
        for method in ("ddpm", "bicubic"):
            r = [x for x in rows["sr"] if x["method"] == method]
            logger.info(f"{method}: mean PSNR {mean(r, 'psnr'):.2f} dB, mean SSIM {mean(r, 'ssim'):.4f} over "
                        f"{len(r)} image(s)")
        logger.info(f"per image in {out / 'sr_metrics.csv'}")
    if rows["seg"]:
        write_csv(rows["seg"], out / "seg_metrics.csv")
        r = rows["seg"]
        logger.info(f"mean Dice of the mean mask {mean(r, 'dice_mean_mask'):.4f}, of the samples "
                    f"{mean(r, 'dice_samples_mean'):.4f} (best of N {mean(r, 'dice_samples_best'):.4f}) over "
                    f"{len(r)} image(s); per image in {out / 'seg_metrics.csv'}")
