"""Class-conditional DDPM on one or many GPUs: training and sampling behind one `--mode` flag.

    torchrun --nnodes=1 --nproc_per_node=4 ddpm_conditional_ddp.py --mode train_ddp \
        --dataset-path /path/to/dataset --num-classes 8 --image-size 256 --batch-size 8 --epochs 100
    torchrun --nnodes=1 --nproc_per_node=4 ddpm_conditional_ddp.py --mode train_ddp --dataset-path /path/to/dataset --resume
    torchrun --nnodes=1 --nproc_per_node=4 ddpm_conditional_ddp.py --mode sample_ddp \
        --ckpt ./models/DDPM_conditional/ckpt.pt --use-ema --num-samples 8000 --num-classes 8 --batch-size 8 \
        --output-dir ./samples
    python ddpm_conditional_ddp.py --mode sample --ckpt ./models/DDPM_conditional/ema_ckpt.pt \
        --num-samples 100 --class-labels 0 1 2 3 --cfg-scale 3

train_ddp takes the flags of train.py (DICOM / NIfTI data: `--intensity-window -160,240` ...), sample_ddp /
sample those of inference.py (`--output-format png|png16|nifti|dicom`; `--help` after `--mode X` lists them). `sample` additionally writes grids to <output-dir>_grids/. Every mode also runs
as a single plain `python` process.
"""
import sys

import inference
import train
from runtime import FlagParser


def main(argv=None):
    """Dispatch on --mode to the training or the sampling CLI."""
    parser = FlagParser(description=__doc__.splitlines()[0], add_help=False)
    parser.add_argument("--mode", choices=["train_ddp", "sample_ddp", "sample"], default="train_ddp")
    args, rest = parser.parse_known_args(argv)
    if args.mode == "train_ddp":
        train.main(rest)
    else:
        inference.main(rest, save_grid_default=args.mode == "sample")


if __name__ == "__main__":
    main(sys.argv[1:])
