"""Class-conditional DDPM with classifier-free guidance: edit launch() below, then `python ddpm_conditional.py`.

    cd ddpm && python ddpm_conditional.py
    python ddpm_conditional.py --epochs 10 --dataset-path /data/classes   # flags given here override launch()

Data: one sub-folder per class. launch() is the only in-file configuration and calls the same training
code as train.py. Also the spec's import point for sampling:

    from modules import UNet_conditional
    from ddpm_conditional import Diffusion
    images = Diffusion(img_size=64, device="cuda").sample(model, n=4, labels=labels, cfg_scale=3)  # uint8
"""
import sys

from ddpm import cli_overrides
from models import Diffusion, UNet_conditional  # noqa: F401  (re-exported for the spec's snippet)
from train import default_args, train
from utils import run_main


def launch(**overrides):
    """Training settings of the conditional model; keyword arguments (tests, notebooks) override them."""
    args = default_args(conditional=True)
    args.run_name = "DDPM_conditional"
    args.epochs = 300
    args.batch_size = 14
    args.image_size = 64
    args.num_classes = 10
    args.dataset_path = "/path/to/dataset"
    args.device = "cuda"  # falls back to the CPU with a warning when there is no GPU
    args.lr = 3e-4
    args.cfg_dropout = 0.1  # share of labels replaced by "no class" (classifier-free guidance)
    # DICOM / NIfTI (and 16-bit with a named window): "auto" (the files' own window), "-160,240" (HU), a preset
    # such as "abdomen" or "lung", or percentiles "p1,p99"; fixed once on the data and stored in the checkpoint
    args.intensity_window = "auto"
    vars(args).update(overrides)
    return run_main(train, args)


if __name__ == "__main__":
    launch(**cli_overrides(sys.argv[1:]))
