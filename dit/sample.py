"""Generate images with a trained DiT (or the official pretrained DiT-XL/2 when --ckpt is left out).

    python sample.py --ckpt ./results/000-DiT-B-2/checkpoints/0050000.pt --output-dir ./samples
    python sample.py --ckpt ... --class-labels 0 --num-samples 50 --batch-size 16
    python sample.py --ckpt ... --sampler ddim --num-sampling-steps 50

Writes <output-dir>/<settings>/<class_name>/<class_name>_seed<N>.png and grid_<class_name>.png, where
<settings> names the model, checkpoint, VAE, cfg scale, sampler, steps and seed. Image i uses seed
--seed + i, so any --batch-size gives the same images; existing images are kept (rerun to complete).
`--output-format png16 | nifti | dicom` writes .png (16-bit) / .nii.gz / .dcm instead (no grids then).

    python sample.py --ckpt ... --output-format nifti      # values in the training data's units (e.g. HU)
"""
import sys
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

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
    args = p.parse_args(argv)
    inf.check_sampling_args(args)
    if args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    return args


def main(args):
    """Sample, write PNGs per class and a grid per class, print timings."""
    device, precision = inf.resolve_device_precision(args.mixed_precision)
    model, vae, vinfo, meta = inf.load_for_sampling(args, device, print)
    labels = inf.parse_class_labels(args.class_labels, meta)
    if args.cfg_scale != 1.0 and not meta["has_null"]:
        raise UserError(f"{meta['source']} was trained without label dropout (no null class): "
                        f"use --cfg-scale 1")
    fmt, window = inf.output_settings(args, meta, vinfo)
    out = Path(args.output_dir) if args.exact_output_dir else Path(args.output_dir) / inf.settings_tag(
        args, meta, vinfo, args.seed)
    names = meta["class_names"]
    jobs = [(labels[i % len(labels)], args.seed + i) for i in range(args.num_samples)]
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
    for i in tqdm(range(0, len(todo), args.batch_size), desc="batches", disable=not todo):
        batch = todo[i:i + args.batch_size]
        z = inf.sample_latents(model, diffusion, [b[0] for b in batch], [b[1] for b in batch],
                               args.cfg_scale, args.sampler, args.eta, device, precision, guide_all)
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


if __name__ == "__main__":
    run_main(lambda a: main(parse_args(a)), sys.argv[1:])
