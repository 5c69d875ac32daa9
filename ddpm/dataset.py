"""Image-folder data set for DDPM: class folders (conditional) or any folder of images (unconditional).

    data_root/class_a/*.png, data_root/class_b/*.png ...    -> labels 0..C-1 in sorted folder order

Images come out as float tensors in [-1, 1], decoded, resized and centre-cropped to a square `image_size`
by the repository's one image rule (imaging.py, vendored; see "How images are read" in the top README):
integers / their type's maximum, float must be in [0, 1], alpha dropped, RGB -> gray by ITU-R 601 luma.
Grayscale stays 1 channel, colour is 3 channels (`channels="auto"` picks from the data). DICOM and NIfTI
files (medical.py, vendored) become one image per 2-D file, DICOM frame or NIfTI slice, read through the
intensity window (medical.ReadOptions, fitted once on the whole folder). The whole folder is decoded once
up front, so a corrupt file is named before any training starts. Used by train.py; there is nothing to
run here.
"""
from pathlib import Path

import torch

import medical
from imaging import ALL_EXTENSIONS, ImageError, check_image, decode_image, is_image_file, list_images, resize_image
from utils import UserError


def _list_images(folder):
    """Sorted image files under `folder` (recursive, hidden files skipped)."""
    return list_images(folder, recursive=True)


def _verify(src, opts=None):
    """Decode one image (a file, slice or frame); return its ImageInfo or raise UserError naming it."""
    try:
        return check_image(src, opts=opts)
    except ImageError as e:
        raise UserError(str(e)) from None


def _expand(files, opts):
    """One Source per 2-D file, DICOM frame and NIfTI slice; UserError naming a bad file."""
    try:
        return medical.expand(files, opts)
    except ImageError as e:
        raise UserError(str(e)) from None


def scan_folder(root, conditional=True, num_classes=None, opts=None, fit=True):
    """Validate the data folder; return (sources, labels, class_names, infos, opts). Raises UserError.

    opts (medical.ReadOptions, default: the defaults) is fitted on the whole folder when `fit` (a new run);
    a resumed run passes the stored window and fit=False."""
    opts = opts if opts is not None else medical.ReadOptions()
    root = Path(root)
    if not root.exists():
        hint = " (edit args.dataset_path in launch() or pass --dataset-path)" if str(root) == "/path/to/dataset" else ""
        raise UserError(f"--dataset-path {root} does not exist{hint}")
    if not root.is_dir():
        raise UserError(f"--dataset-path {root} is not a folder")
    if conditional:
        class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        if not class_dirs:
            if loose:
                raise UserError(f"--dataset-path {root} holds images but no class folders; a conditional "
                                f"model needs {root}/<class_name>/*.png (or train unconditionally)")
            raise UserError(f"--dataset-path {root} is empty: expected class folders {root}/<class_name>/*.png")
        files, labels = [], []
        for c, d in enumerate(class_dirs):
            imgs = _expand(_list_images(d), opts)
            if not imgs:
                raise UserError(f"class folder {d} has no images ({', '.join(sorted(ALL_EXTENSIONS))}); "
                                f"add images or remove the folder")
            files += imgs
            labels += [c] * len(imgs)
        class_names = [d.name for d in class_dirs]
        if num_classes is not None and num_classes != len(class_names):
            raise UserError(f"--num-classes {num_classes} disagrees with {root}, which has {len(class_names)} "
                            f"class folders ({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''})")
    else:
        files = _expand(_list_images(root), opts)
        if not files:
            raise UserError(f"--dataset-path {root} has no images ({', '.join(sorted(ALL_EXTENSIONS))})")
        labels = [0] * len(files)
        class_names = []
    if fit:
        try:
            opts = opts.fit(files)  # the window, fixed once from the whole training set
        except (ImageError, ValueError) as e:
            raise UserError(str(e)) from None
    infos = [_verify(src, opts) for src in files]
    return files, labels, class_names, infos, opts


def channels_from_modes(infos):
    """1 if every image is grayscale (after the channel rule: alpha dropped, palettes are colour), else 3."""
    return 1 if all(i.channels == 1 for i in infos) else 3


def load_image(src, channels, image_size, opts=None):
    """Decode one image (file, slice or frame) to a float tensor (channels, image_size, image_size) in [-1, 1]."""
    try:
        x = resize_image(decode_image(src, channels, opts), image_size)
    except ImageError as e:
        raise UserError(str(e)) from None
    return (x * 2.0 - 1.0).clamp(-1.0, 1.0).contiguous()


class ImageFolderDataset(torch.utils.data.Dataset):
    """Validated list of (image source, label); items are (image in [-1,1], label, index).

    `files` holds one imaging.Source per image (a file, or a slice / frame of one); `opts` the fitted
    medical.ReadOptions the images are read with (stored in checkpoints under "intensity")."""

    def __init__(self, root, image_size, channels="auto", conditional=True, num_classes=None, opts=None, fit=True):
        self.root = Path(root)
        self.files, self.labels, self.class_names, infos, self.opts = scan_folder(root, conditional, num_classes,
                                                                                  opts, fit)
        self.channels = channels_from_modes(infos) if channels == "auto" else int(channels)
        self.image_size = image_size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return load_image(self.files[i], self.channels, self.image_size, self.opts), self.labels[i], i


def flip_mask(indices, seed, epoch):
    """Per-sample horizontal-flip decisions as a pure function of (seed, epoch, sample index).

    Independent of worker processes and of resuming, so an interrupted run sees the same flips."""
    idx = indices.to(torch.int64)
    h = idx * 0x9E3779B1 + (seed * 1000003 + epoch * 7919) % (2 ** 31)
    h = (h ^ (h >> 13)) * 0x5BD1E995
    h = h ^ (h >> 15)
    return (h & 1).bool()
