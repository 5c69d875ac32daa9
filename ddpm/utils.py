"""What only the DDPM scripts share: the checkpoint's model type, image grids, JSON reading.

Everything the model folders have in common (errors, logging, distributed setup, precision, checkpoint
I/O, seeds, stop flags, EMA, write-once files) is the vendored runtime.py; UserError, TrainingError and
run_main are re-exported here for the files that import them from utils. Not run directly (flat
imports, so the folder runs from its own directory: `cd ddpm && python train.py ...`).
"""
import json
import math

import torch

from runtime import TrainingError, UserError, run_main, save_png_replace, to_pil  # noqa: F401 (re-exported)

MODEL_TYPE = "ddpm"


def read_json(path):
    """Parse a JSON file (never eval)."""
    with open(path) as f:
        return json.load(f)


def grid_columns(n):
    """A near-square number of columns for n images."""
    return max(1, int(math.ceil(math.sqrt(n))))


def make_grid(images, nrow):
    """(N,C,H,W) uint8 -> one (C,H',W') uint8 grid with 2-pixel padding (torchvision.utils.make_grid)."""
    import torchvision

    grid = torchvision.utils.make_grid(images.float(), nrow=max(1, nrow), padding=2, pad_value=0)
    if images.shape[1] == 1:
        grid = grid[:1]  # make_grid repeats 1-channel images to 3; keep grayscale grayscale
    return grid.round().clamp(0, 255).to(torch.uint8)


def save_grid(images, path, nrow=None):
    """Write (N,C,H,W) uint8 images as one PNG grid (replacing an older grid of that name); returns the grid."""
    grid = make_grid(images, nrow or grid_columns(len(images)))
    save_png_replace(to_pil(grid), path)
    return grid
