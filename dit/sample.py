"""Generate images with a trained DiT (or the official pretrained DiT-XL/2 when --ckpt is left out).

    python sample.py --ckpt ./results/000-DiT-B-2/checkpoints/0050000.pt --output-dir ./samples
    python sample.py --ckpt ... --class-labels 0 --num-samples 50 --batch-size 16
    python sample.py --ckpt ... --sampler ddim --num-sampling-steps 50

Writes <output-dir>/<settings>/<class_name>/<class_name>_seed<N>.png and grid_<class_name>.png, where
<settings> names the model, checkpoint, VAE, cfg scale, sampler, steps, seed and a precision other than fp32
(--mixed-precision bf16: DiT and VAE decode under autocast, faster where bf16 is native, images within a stated
tolerance of fp32). Image i uses seed --seed + i, so any --batch-size gives the same images; existing images
are kept (rerun to complete).
`--output-format png16 | nifti | dicom` writes .png (16-bit) / .nii.gz / .dcm instead (no grids then).

    python sample.py --ckpt ... --output-format nifti      # values in the training data's units (e.g. HU)

Interpolation (deterministic DDIM, 50 steps unless --num-sampling-steps; a strip .png and a looping .gif in
<output-dir>/interpolation_<checkpoint, size, VAE>/, never overwritten):

    python sample.py --ckpt ... --interpolate_seeds 0 7 --class-labels 2      # slerp of the two initial noises
    python sample.py --ckpt ... --interpolate_classes 0 3 --seed 5            # (1-t) e[0] + t e[3], noise of seed 5
"""
import sys
from collections import defaultdict
from pathlib import Path

import animation
import inference as inf
import writers
from runtime import FlagParser, UserError, check_writable, run_main, timing_summary


def parse_args(argv=None):
    """sample.py flags (the spec's names and defaults)."""
    p = FlagParser(description="Sample images from a DiT checkpoint.")
    inf.add_model_args(p)
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance (1 = off)")
    p.add_argument("--class-labels", nargs="+", default=None,
                   help="class indices or names (default: all classes, round robin)")
    p.add_argument("--num-samples", type=int, default=8, help="total images")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output-dir", default="samples")
    p.add_argument("--exact-output-dir", action="store_true",
                   help="write into --output-dir itself instead of a settings-named sub-folder")
    p.add_argument("--grid-dir", default=None, help="where the per-class grids go (default: the image folder)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpolate_seeds", nargs=2, type=int, default=None, metavar=("A", "B"),
                   help="frames between the images of seeds A and B (slerp of their initial noise; class: "
                        "--class-labels, default the first)")
    p.add_argument("--interpolate_classes", nargs=2, default=None, metavar=("A", "B"),
                   help="frames between classes A and B (names or indices; interpolated class embedding, "
                        "noise of --seed)")
    p.add_argument("--interp_frames", type=int, default=8, help="frames of an interpolation incl. both ends")
    args = p.parse_args(argv)
    inf.check_sampling_args(args)
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if args.interpolate_seeds or args.interpolate_classes:
        check_interpolation_args(args)
    return args


def check_interpolation_args(args):
    """The interpolation flags against each other (before loading anything)."""
    if args.interpolate_seeds and args.interpolate_classes:
        raise UserError("--interpolate_seeds and --interpolate_classes: choose one interpolation per run")
    if args.interp_frames < 2:
        raise UserError("--interp_frames must be at least 2 (both end points)")
    if args.output_format != "png":
        raise UserError("an interpolation is written as a .png strip and a .gif: leave out --output-format")
    if args.interpolate_seeds and any(s < 0 for s in args.interpolate_seeds):
        raise UserError("--interpolate_seeds takes two seeds >= 0")
    if args.interpolate_seeds and args.class_labels and len(args.class_labels) > 1:
        raise UserError("--interpolate_seeds uses one class: give one --class-labels value")
    if args.interpolate_classes and args.class_labels:
        raise UserError("--interpolate_classes names both classes: leave out --class-labels")


def main(args):
    """Sample, write PNGs per class and a grid per class, print timings (or write one interpolation)."""
    device, precision = inf.resolve_device_precision(args.mixed_precision)
    model, vae, vinfo, meta = inf.load_for_sampling(args, device, print, precision)
    if args.cfg_scale != 1.0 and not meta["has_null"]:
        raise UserError(f"{meta['source']} was trained without label dropout (no null class): "
                        f"use --cfg-scale 1")
    if args.interpolate_seeds or args.interpolate_classes:
        return interpolate(args, model, vae, vinfo, meta, device, precision)
    labels = inf.parse_class_labels(args.class_labels, meta)
    fmt, window = inf.output_settings(args, meta, vinfo)
    out = Path(args.output_dir) if args.exact_output_dir else Path(args.output_dir) / inf.settings_tag(
        args, meta, vinfo, args.seed)
    names = meta["class_names"]
    jobs = inf.image_jobs(labels, args.seed, args.num_samples)
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    for lab in sorted({lab for lab, _ in jobs}):
        (out / names[lab]).mkdir(exist_ok=True)
    todo = [(lab, s) for lab, s in jobs if not writers.output_path(inf.image_path(out, names[lab], s), fmt).exists()]
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} images already exist in {out}: generating the rest")
    diffusion = inf.make_sampler(args)
    guide_all = inf.guide_all(model, args, meta)
    t0 = inf.now()
    for batch, z in inf.sample_batches(model, diffusion, todo, args, device, precision, guide_all):
        inf.write_images(vae, vinfo, z, meta, [(names[lab], s, inf.image_path(out, names[lab], s)) for lab, s in batch],
                         fmt, window, args)
    print(timing_summary(len(todo), args.num_sampling_steps, inf.now() - t0))
    if fmt != "png":
        print(f"Images ({fmt}): {out}/<class_name>/   (grids are made for --output-format png only)")
        return
    per_class = defaultdict(list)
    for lab, s in jobs:
        per_class[lab].append(inf.image_path(out, names[lab], s))
    grid_dir = Path(args.grid_dir) if args.grid_dir else out
    grid_dir.mkdir(parents=True, exist_ok=True)
    for lab, paths in per_class.items():
        inf.write_grid(paths, grid_dir / f"grid_{names[lab]}.png")
    print(f"Images: {out}/<class_name>/   grids: {grid_dir}/grid_<class_name>.png")


def interpolation_plan(args, meta):
    """(mode, seeds, labels) of the interpolation flags: ("seeds", (A, B), (class,)) or ("classes", (S,), (a, b))."""
    if args.interpolate_seeds:
        return "seeds", tuple(args.interpolate_seeds), tuple(inf.parse_class_labels(args.class_labels, meta)[:1])
    labels = inf.parse_class_labels(args.interpolate_classes, meta, "--interpolate_classes")
    return "classes", (args.seed,), tuple(labels)


def interpolate(args, model, vae, vinfo, meta, device, precision):
    """Write <output-dir>/interpolation_<...>/<stem>.png (strip) and <stem>.gif; an existing pair is kept."""
    mode, seeds, labels = interpolation_plan(args, meta)
    out = Path(args.output_dir) if args.exact_output_dir else Path(args.output_dir) / inf.interpolation_tag(
        args, meta, vinfo)
    stem = inf.interpolation_stem(args, meta, mode, seeds, labels, args.interp_frames)
    if (out / f"{stem}.png").exists() and (out / f"{stem}.gif").exists():
        print(f"{out / stem}.png and .gif exist already: skipped (delete them to sample again)")
        return
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out)
    t0 = inf.now()
    frames = inf.interpolation_frames(model, vae, vinfo, meta, mode, seeds, labels, args.interp_frames, args,
                                      device, precision, inf.guide_all(model, args, meta))
    print(timing_summary(len(frames), args.num_sampling_steps, inf.now() - t0))
    png, gif, _ = animation.write_interpolation(frames, out, stem)
    print(f"Interpolation ({len(frames)} frames, {mode}): {png}  {gif}")


if __name__ == "__main__":
    run_main(lambda a: main(parse_args(a)), sys.argv[1:])
