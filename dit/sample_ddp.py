"""Generate many images (e.g. 50k for FID) over several processes, plus the ADM evaluator's .npz.

    torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py --ckpt results/000-DiT-B-2/checkpoints/0050000.pt \
        --num-fid-samples 50000 --cfg-scale 1.5
    python sample_ddp.py ... --class-subfolders     # one process; class sub-folders for per-class metrics

Image i (0 <= i < --num-fid-samples) is of class i mod K (or of --class-labels, round robin) and uses seed
--seed + i (alias --global-seed); rank r makes the images with i mod world == r. PNGs go to
<sample-dir>/<settings>/[<class_name>/]<class_name>_seed<N>.png and <sample-dir>/<settings>.npz (arr_0,
uint8 N x H x W x 3) is written at the end from the PNGs, in chunks. Rerunning skips existing images.
`--output-format png16 | nifti | dicom` writes .png (16-bit) / .nii.gz / .dcm files instead (no .npz then).
"""
import sys
from pathlib import Path

from tqdm.auto import tqdm

import inference as inf
import writers
from runtime import (FlagParser, UserError, barrier, check_writable, finish_distributed, resolve_precision,
                     run_main, setup_distributed, timing_summary)


def parse_args(argv=None):
    """sample_ddp.py flags."""
    p = FlagParser(description="Sample many DiT images in parallel (FID sets).")
    inf.add_model_args(p)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--num-fid-samples", type=int, default=50_000)
    p.add_argument("--per-proc-batch-size", type=int, default=32)
    p.add_argument("--sample-dir", default="samples")
    p.add_argument("--seed", aliases=["global_seed"], type=int, default=0, help="image i uses seed + i")
    p.add_argument("--class-labels", nargs="+", default=None, help="restrict to these classes")
    p.add_argument("--class-subfolders", action="store_true", help="one sub-folder per class")
    p.add_argument("--no-npz", action="store_true", help="skip the .npz")
    args = p.parse_args(argv)
    inf.check_sampling_args(args)
    if args.num_fid_samples < 1:
        raise UserError("--num-fid-samples must be at least 1")
    if args.per_proc_batch_size < 1:
        raise UserError("--per-proc-batch-size must be at least 1")
    return args


def main(args):
    """Each rank writes its share of the PNGs; rank 0 then writes the .npz."""
    rank, world, _, device = setup_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    precision = resolve_precision(args.mixed_precision, device)
    model, vae, vinfo, meta = inf.load_for_sampling(args, device, say, precision)
    if args.cfg_scale != 1.0 and not meta["has_null"]:
        raise UserError(f"{meta['source']} was trained without label dropout: use --cfg-scale 1")
    labels = (inf.parse_class_labels(args.class_labels, meta) if args.class_labels
              else list(range(meta["num_classes"])))
    names = meta["class_names"]
    fmt, window = inf.output_settings(args, meta, vinfo)
    out = Path(args.sample_dir) / inf.settings_tag(args, meta, vinfo, args.seed)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        check_writable(out)
        if args.class_subfolders:
            for lab in sorted(set(labels)):
                (out / names[lab]).mkdir(exist_ok=True)
    barrier()
    say(f"World size {world}; writing {args.num_fid_samples} images to {out}")

    def path_of(i):  # (label, seed, file in the chosen format)
        lab = labels[i % len(labels)]
        png = inf.image_path(out, names[lab], args.seed + i, args.class_subfolders)
        return lab, args.seed + i, writers.output_path(png, fmt)

    mine = [i for i in range(rank, args.num_fid_samples, world) if not path_of(i)[2].exists()]
    done = len(range(rank, args.num_fid_samples, world)) - len(mine)
    if done:
        say(f"rank 0: {done} of its images already exist: generating the rest")
    diffusion = inf.make_sampler(args)
    guide_all = inf.guide_all(model, args, meta)
    t0 = inf.now()
    bs = args.per_proc_batch_size
    for k in tqdm(range(0, len(mine), bs), desc="batches", disable=rank != 0 or not mine):
        jobs = [path_of(i) for i in mine[k:k + bs]]
        z = inf.sample_latents(model, diffusion, [j[0] for j in jobs], [j[1] for j in jobs], args.cfg_scale,
                               args.sampler, args.eta, device, precision, guide_all)
        inf.write_images(vae, vinfo, z, meta, [(names[lab], s, path) for lab, s, path in jobs], fmt, window, args)
    say(f"rank 0: {timing_summary(len(mine), args.num_sampling_steps, inf.now() - t0)}")
    barrier()
    if rank == 0:
        paths = [path_of(i)[2] for i in range(args.num_fid_samples)]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise UserError(f"{len(missing)} images are missing (e.g. {missing[0]}): rerun to complete")
        if fmt != "png":
            say(f"No .npz: it is made from --output-format png images (this run wrote {fmt})")
        elif not args.no_npz:
            npz = inf.write_npz(paths, Path(str(out) + ".npz"))  # next to the folder, as the reference does
            say(f"Wrote {npz} ({len(paths)} images)")
        say(f"Images: {out}")
    finish_distributed()


if __name__ == "__main__":
    run_main(lambda a: main(parse_args(a)), sys.argv[1:])
