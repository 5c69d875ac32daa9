"""Unconditional DDPM: edit the settings in launch() below, then run `python ddpm.py` (from ddpm/).

    cd ddpm && python ddpm.py
    python ddpm.py --epochs 10 --dataset-path /data/imgs     # flags given here override launch()

launch() is the only in-file configuration; it calls the same training code as train.py (see train.py
for every setting and its default). Checkpoints go to models/<run_name>/ckpt.pt and ema_ckpt.pt.
"""
import argparse
import sys

from models import Diffusion, UNet  # noqa: F401  (`from ddpm import Diffusion` like the spec's snippet)
from train import build_parser, default_args, train
from utils import run_main


def cli_overrides(argv):
    """Exactly the flags given on the command line, whatever their value, so they override launch().

    Defaults are suppressed rather than filtered by value: `--ema-start 0`, `--cfg-dropout 0` or
    `--no-random-flip` (False) are real choices, not "unset"."""
    parser = build_parser()
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def launch(**overrides):
    """Training settings of the unconditional model; keyword arguments (tests, notebooks) override them."""
    args = default_args(conditional=False)
    args.run_name = "DDPM_Unconditional"
    args.epochs = 500
    args.batch_size = 12
    args.image_size = 64
    args.dataset_path = "/path/to/dataset"
    args.device = "cuda"  # falls back to the CPU with a warning when there is no GPU
    args.lr = 3e-4
    # DICOM / NIfTI (and 16-bit with a named window): "auto" (the files' own window), "-160,240" (HU), a preset
    # such as "abdomen" or "lung", or percentiles "p1,p99"; fixed once on the data and stored in the checkpoint
    args.intensity_window = "auto"
    vars(args).update(overrides)
    return run_main(train, args)


if __name__ == "__main__":
    launch(**cli_overrides(sys.argv[1:]))
