"""Generate a fixed total number of images split evenly over the classes (for per-class FID).

    cd ldm
    python inference_per_class.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt \
        --output_dir ./generated_per_class --total_samples 8000 --batch_size 16 --cfg_scale 3.0

Writes <output_dir>/<class_name>/<class_name>_seed<S>.png (the layout evaluation/ reads; .nii.gz / .dcm
with --output_format nifti / dicom). With C
classes each gets total_samples // C images, the first total_samples % C classes one more. Resumable:
a rerun with the same settings fills in only the missing files; the settings are recorded in
<output_dir>/generation_settings.json and a rerun with other settings is refused rather than mixed in.
"""
import json
from pathlib import Path

from inference import Generator, add_sampling_flags, check_sampling_args, image_seed, resolve_classes
from runtime import FlagParser, UserError, atomic_write_text, check_writable, run_main

SETTINGS_THAT_CHANGE_IMAGES = ("checkpoint", "cfg_scale", "num_inference_steps", "scheduler", "seed", "no_ema",
                               "mixed_precision")


def per_class_counts(total, num_classes):
    """Split `total` as evenly as possible over `num_classes`."""
    return [total // num_classes + (1 if c < total % num_classes else 0) for c in range(num_classes)]


def check_settings(out, args, precision=None):
    """Record the generation settings (precision: the resolved one); refuse to mix settings in one folder."""
    path = out / "generation_settings.json"
    now = {k: (str(Path(v).expanduser().resolve()) if k == "checkpoint" else v)
           for k, v in vars(args).items() if k in SETTINGS_THAT_CHANGE_IMAGES}
    if precision is not None:  # what ran, not what was asked: `auto` differs between machines
        now["mixed_precision"] = precision
    if args.output_format != "png":  # recorded only when not png: folders of earlier versions stay valid
        now["output_format"] = args.output_format
    if path.is_file():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
        if before is not None and before != now:
            diff = {k: (before.get(k), now.get(k)) for k in {**before, **now} if before.get(k) != now.get(k)}
            raise UserError(f"{out} already holds images generated with other settings {diff}; "
                            f"use another --output_dir (or the same settings to complete it)")
    return path, now


def main(argv=None):
    """Parse flags, check inputs, generate the missing images per class."""
    p = FlagParser(description="Generate N images split evenly over an LDM's classes.")
    add_sampling_flags(p)
    p.add_argument("--output_dir", default="./generated_per_class")
    p.add_argument("--total_samples", type=int, default=8000, help="images over all classes")
    p.add_argument("--classes", nargs="+", default=None, help="only these class names (default: all)")
    args = p.parse_args(argv)
    check_sampling_args(args)
    if args.total_samples < 1:
        raise UserError("--total_samples must be >= 1")
    gen = Generator(args)
    names = gen.ckpt["class_names"]
    classes = resolve_classes(gen.ckpt, args.classes)
    out = Path(args.output_dir).expanduser()
    settings_path, settings = check_settings(out, args, gen.precision)
    for c in classes:
        check_writable(out / names[c])
    if not settings_path.is_file():
        atomic_write_text(json.dumps(settings, indent=1), settings_path)
    gen.setup()
    counts = per_class_counts(args.total_samples, len(classes))
    jobs = []
    for c, n in zip(classes, counts):
        for j in range(n):
            s = image_seed(args.seed, c, j)
            jobs.append((c, s, out / names[c] / f"{names[c]}_seed{s}.png"))
    print(f"{len(classes)} classes x ~{counts[0]} images = {sum(counts)} -> {out}/<class_name>/")
    written, batches, secs = gen.run(jobs)
    gen.report(written, batches, secs)
    have = {names[c]: sum(1 for j in jobs if j[0] == c and gen.target(j[2]).exists()) for c in classes}
    print(f"per-class counts: {have}")
    return 0


if __name__ == "__main__":
    run_main(main)
