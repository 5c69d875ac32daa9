"""Finding, validating and decoding images for evaluation (8-bit RGB out of any PNG/JPEG/TIFF/... input).

Not run directly; `precision_recall.py` uses it. Medical images are handled explicitly: 16-bit, 32-bit
integer and float images are scaled to 8 bits per image (min-max by default, or by the type's full range),
never clipped the way PIL's `convert("RGB")` clips 16-bit values at 255; grayscale becomes 3 equal
channels; an alpha channel is dropped (not composited). Each image is decoded once, in a DataLoader
worker, and the same uint8 tensor later feeds every network.
"""
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
HIGH_DEPTH_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SCALINGS = ("minmax", "full")


class UserError(Exception):
    """Bad input or settings: printed as one `error: ...` line, exit code 2, no traceback."""


def list_images(root):
    """Relative paths (sorted) of all images under root, recursive, extensions case-insensitive."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def class_layout(root, rel_files):
    """(class names, label per file) when every image sits in a class subfolder of root, else (None, None)."""
    if not rel_files or any(len(Path(f).parts) < 2 for f in rel_files):
        return None, None
    names = sorted({Path(f).parts[0] for f in rel_files})
    for sub in sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in names:
            raise UserError(f"class folder {sub} holds no images; add images or remove the folder")
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index[Path(f).parts[0]] for f in rel_files], dtype=np.int64)


def validate_images(root, rel_files, label):
    """Open every file's header (and verify PNG chunks); name the first bad file. Returns notes for users."""
    modes, sizes = {}, set()
    for rel in rel_files:
        path = Path(root) / rel
        try:
            with Image.open(path) as im:
                modes[im.mode] = modes.get(im.mode, 0) + 1
                sizes.add(im.size)
                im.verify()
        except Exception as exc:  # PIL raises many types for corrupt files
            raise UserError(f"{path} is not a readable image ({type(exc).__name__}: {exc}); "
                            "remove or replace it") from None
    notes = []
    n_alpha = sum(c for m, c in modes.items() if m in ALPHA_MODES)
    n_high = sum(c for m, c in modes.items() if m in HIGH_DEPTH_MODES or m.startswith("I;"))
    if n_alpha:
        notes.append(f"{label}: {n_alpha} image(s) have an alpha channel; it is dropped (not composited)")
    if n_high:
        notes.append(f"{label}: {n_high} image(s) are 16-bit/32-bit/float; scaled to 8 bits explicitly")
    if len(sizes) > 1:
        notes.append(f"{label}: images come in {len(sizes)} sizes; each network resizes them to its input")
    return notes


def to_uint8(array, scaling="minmax"):
    """Scale a high-depth single-channel array to uint8 without clipping (per-image min-max or full range)."""
    a = np.asarray(array, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if scaling == "minmax":
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    else:  # "full": the value range of the stored type
        if np.issubdtype(np.asarray(array).dtype, np.floating):
            lo, hi = 0.0, 1.0  # float images are taken to be in [0, 1]
        else:
            lo, hi = 0.0, 65535.0 if a.max() <= 65535 else float(np.iinfo(np.int32).max)
        scaled = np.clip((a - lo) / (hi - lo), 0, 1)
    return np.round(scaled * 255.0).astype(np.uint8)


def load_rgb(path, scaling="minmax"):
    """Decode one image to a uint8 H x W x 3 array."""
    with Image.open(path) as im:
        im.seek(0)
        mode = im.mode
        if mode in HIGH_DEPTH_MODES or mode.startswith("I;"):
            gray = to_uint8(np.asarray(im), scaling)
        elif mode in ("LA", "La"):
            gray = np.asarray(im.getchannel(0))
        elif mode == "L":
            gray = np.asarray(im)
        else:  # RGB, RGBA (alpha dropped), P, CMYK, YCbCr, 1 ...
            return np.array(im.convert("RGB"))  # a writable copy (torch.from_numpy needs one)
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


class ImageFiles(torch.utils.data.Dataset):
    """Items are (index, uint8 3 x H x W tensor or None, error text or None)."""

    def __init__(self, paths, scaling="minmax"):
        self.paths, self.scaling = list(paths), scaling

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            rgb = load_rgb(self.paths[i], self.scaling)
        except Exception as exc:  # reported by the main process with the file name
            return i, None, f"{self.paths[i]} could not be decoded ({type(exc).__name__}: {exc})"
        return i, torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), None


def collate_images(items):
    """Keep images as a list: sizes may differ; the extractor stacks same-size groups itself."""
    return [it[0] for it in items], [it[1] for it in items], [it[2] for it in items]
