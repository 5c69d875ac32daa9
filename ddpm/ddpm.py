"""Unconditional DDPM: edit the settings in launch() below, then run `python ddpm.py` (from ddpm/).

    cd ddpm && python ddpm.py
    python ddpm.py --epochs 10 --dataset-path /data/imgs     # flags given here override launch()

launch() is the only in-file configuration; it calls the same training code as train.py (see train.py
for every setting and its default). Checkpoints go to models/<run_name>/ckpt.pt and ema_ckpt.pt.
"""
import sys

from models import Diffusion, UNet  # noqa: F401  (`from ddpm import Diffusion` like the spec's snippet)
from train import build_parser, default_args, train
from utils import run_main


def cli_overrides(argv):
    """Only the flags actually given on the command line (so they override launch() settings)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = None if action.dest != "help" else action.default
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v not in (None, False)}


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
    vars(args).update(overrides)
    return run_main(train, args)


if __name__ == "__main__":
    launch(**cli_overrides(sys.argv[1:]))
