"""Fetch the official pretrained DiT checkpoints (DiT-XL/2 at 256 and 512 px) and cache them.

    python download.py                       # both files into pretrained_models/
    python download.py DiT-XL-2-256x256.pt

The files are plain state dicts (they load with weights_only=True). Offline, the error names the file,
its URL and where to put a copy. The weights carry the licence of their authors (see README.md).
"""
import os
import sys
import urllib.error
from pathlib import Path

import torch

from runtime import UserError, load_checkpoint, run_main

PRETRAINED = {"DiT-XL-2-256x256.pt": 256, "DiT-XL-2-512x512.pt": 512}
URL = "https://dl.fbaipublicfiles.com/DiT/models/{}"
CACHE_DIR = Path(__file__).resolve().parent / "pretrained_models"


def pretrained_name(image_size):
    """The official file for an image size (256 or 512)."""
    name = f"DiT-XL-2-{image_size}x{image_size}.pt"
    if name not in PRETRAINED:
        raise UserError(f"no official DiT-XL/2 checkpoint for --image-size {image_size} (there are 256 and 512)")
    return name


def download_model(model_name, cache_dir=CACHE_DIR):
    """Path of the cached official checkpoint, downloading it first if needed."""
    if model_name not in PRETRAINED:
        raise UserError(f"unknown pretrained model {model_name}; choose one of {', '.join(PRETRAINED)}")
    path = Path(cache_dir) / model_name
    if path.is_file():
        return path
    url = URL.format(model_name)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"Downloading {url} -> {path}", flush=True)
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        os.replace(tmp, path)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()  # leave no empty cache folder behind
        raise UserError(f"cannot download {model_name} from {url} ({e}). Without internet access, download "
                        f"it elsewhere and put it at {path}") from None
    return path


def find_model(model_name, trust=False):
    """State dict of an official name (downloaded/cached) or of a checkpoint file (its EMA if present)."""
    path = download_model(model_name) if model_name in PRETRAINED else model_name
    ckpt = load_checkpoint(path, trust=trust)
    return ckpt["ema"] if "ema" in ckpt else ckpt


def main(argv):
    """Download the named (or all) official checkpoints."""
    names = argv or list(PRETRAINED)
    for name in names:
        print(f"{name}: {download_model(name)}")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
