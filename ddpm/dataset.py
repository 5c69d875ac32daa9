"""Image-folder data set for DDPM: class folders (conditional) or any folder of images (unconditional).

    data_root/class_a/*.png, data_root/class_b/*.png ...    -> labels 0..C-1 in sorted folder order

Images come out as float tensors in [-1, 1], resized (shorter side) and centre-cropped to a square
`image_size`. Grayscale stays 1 channel, colour is 3 channels (`channels="auto"` picks from the data).
16-bit PNGs are scaled explicitly (/65535) instead of clipped; alpha channels are dropped.
The whole folder is checked up front (every file's header opened and verified), so a corrupt file is
named before any training starts. Used by train.py; there is nothing to run here.
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from utils import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def _list_images(folder):
    """Sorted image files under `folder` (recursive, hidden files skipped)."""
    return sorted(p for p in Path(folder).rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _verify(path):
    """Open and verify one image file cheaply; return its PIL mode or raise UserError naming it."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.verify()
        return mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path} is not a readable image ({type(e).__name__}: {str(e)[:120]}); "
                        f"remove or replace it")


def scan_folder(root, conditional=True, num_classes=None):
    """Validate the data folder; return (files, labels, class_names, modes). Raises UserError."""
    root = Path(root)
    if not root.exists():
        hint = " (edit args.dataset_path in launch() or pass --dataset-path)" if str(root) == "/path/to/dataset" else ""
        raise UserError(f"--dataset-path {root} does not exist{hint}")
    if not root.is_dir():
        raise UserError(f"--dataset-path {root} is not a folder")
    if conditional:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not class_dirs:
            if loose:
                raise UserError(f"--dataset-path {root} holds images but no class folders; a conditional "
                                f"model needs {root}/<class_name>/*.png (or train unconditionally)")
            raise UserError(f"--dataset-path {root} is empty: expected class folders {root}/<class_name>/*.png")
        files, labels = [], []
        for c, d in enumerate(class_dirs):
            imgs = _list_images(d)
            if not imgs:
                raise UserError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                                f"add images or remove the folder")
            files += imgs
            labels += [c] * len(imgs)
        class_names = [d.name for d in class_dirs]
        if num_classes is not None and num_classes != len(class_names):
            raise UserError(f"--num-classes {num_classes} disagrees with {root}, which has {len(class_names)} "
                            f"class folders ({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''})")
    else:
        files = _list_images(root)
        if not files:
            raise UserError(f"--dataset-path {root} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        labels = [0] * len(files)
        class_names = []
    modes = [_verify(p) for p in files]
    return files, labels, class_names, modes


def channels_from_modes(modes):
    """1 if every image is grayscale, else 3."""
    return 1 if all(m in GRAY_MODES for m in modes) else 3


def load_image(path, channels, image_size):
    """Decode one file to a float tensor (channels, image_size, image_size) in [-1, 1]."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                # 16-bit grayscale: scale the full 16-bit range explicitly (converting to "L" would clip).
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                arr = np.clip(arr, 0.0, 1.0)[None]
                if channels == 3:
                    arr = np.repeat(arr, 3, axis=0)
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                arr = ((arr - lo) / (hi - lo if hi > lo else 1.0))[None]
                if channels == 3:
                    arr = np.repeat(arr, 3, axis=0)
            else:
                # convert() drops alpha (RGBA->RGB, LA->L) and expands palettes.
                im = im.convert("L" if channels == 1 else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
                arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    except (OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path} could not be decoded ({e}); remove or replace it")
    x = torch.from_numpy(np.ascontiguousarray(arr))
    h, w = x.shape[1:]
    if (h, w) != (image_size, image_size):
        # Resize the shorter side to image_size (antialiased), then centre-crop to a square.
        scale = image_size / min(h, w)
        nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
        top, left = (nh - image_size) // 2, (nw - image_size) // 2
        x = x[:, top:top + image_size, left:left + image_size]
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Validated list of (file, label); items are (image in [-1,1], label, index)."""

    def __init__(self, root, image_size, channels="auto", conditional=True, num_classes=None):
        self.root = Path(root)
        self.files, self.labels, self.class_names, modes = scan_folder(root, conditional, num_classes)
        self.channels = channels_from_modes(modes) if channels == "auto" else int(channels)
        self.image_size = image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i], self.channels, self.image_size), self.labels[i], i


def flip_mask(indices, seed, epoch):
    """Per-sample horizontal-flip decisions as a pure function of (seed, epoch, sample index).

    Independent of worker processes and of resuming, so an interrupted run sees the same flips."""
    idx = indices.to(torch.int64)
    h = idx * 0x9E3779B1 + (seed * 1000003 + epoch * 7919) % (2 ** 31)
    h = (h ^ (h >> 13)) * 0x5BD1E995
    h = h ^ (h >> 15)
    return (h & 1).bool()
