"""Finding, validating and decoding images for evaluation (PNG/JPEG/BMP/WebP/TIFF, DICOM, NIfTI -> network input).

Not run directly; `precision_recall.py` uses it. Pixels follow the repository's one image rule
(imaging.py, vendored; "How images are read" in the top README), the same as training reads them:
integers / their type's maximum (16-bit never clipped), float images must be in [0, 1], alpha dropped
(not composited), palettes expanded, grayscale repeated to 3 channels. DICOM and NIfTI files (medical.py,
vendored) give one image per slice / frame, mapped to [0, 1] through the intensity window the evaluator
fits once on the real side. Each image is decoded once, in a DataLoader worker, and the same tensor later
feeds every network, which then does its own resizing and normalisation (features.py).
"""
import re
from pathlib import Path

import numpy as np
import torch

import medical
from imaging import ALL_EXTENSIONS, IMAGE_EXTENSIONS, ImageError, Source, check_image, decode_image  # noqa: F401
from imaging import read_pixels, resize_image, resize_mask
from imaging import list_images as _list_image_files

# --scaling of precision_recall.py: kept so the flag still parses; every value decodes by the one rule.
SCALINGS = ("minmax", "full")


class UserError(Exception):
    """Bad input or settings: printed as one `error: ...` line, exit code 2, no traceback."""


def list_images(root):
    """Relative paths (sorted) of all images under root, recursive, extensions case-insensitive."""
    return [str(p.relative_to(root)) for p in _list_image_files(root, recursive=True)]


def slice_name(rel, src):
    """A relative name that identifies one 2-D image: the file's path, plus '[index]' for a slice / frame."""
    return str(rel) if src.index is None else f"{rel}[{src.index}]"


def list_sources(root, opts):
    """(Sources, relative names) of every 2-D image under root: files, DICOM frames, NIfTI slices (in order)."""
    rel_files = list_images(root)
    try:
        sources = medical.expand([Path(root) / r for r in rel_files], opts)
    except ImageError as exc:
        raise UserError(str(exc)) from None
    rel_of = {Path(root) / r: r for r in rel_files}
    return sources, [slice_name(rel_of[s.path], s) for s in sources]


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


def pair_layout(root):
    """True for an image / mask pair folder: root/images and root/masks (ControlNet's data layout)."""
    root = Path(root)
    return (root / "images").is_dir() and (root / "masks").is_dir()


def pair_masks(root, rel_files):
    """Mask file of every image of a pair folder (root/images/<rel>): same stem, or for ControlNet's output
    (`<mask stem>[_<class>]_seed<N>.png`) the longest mask stem the image stem starts with, then `_`."""
    masks = {}
    for p in sorted(Path(root, "masks").rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            masks.setdefault(re.sub(r"(\.nii)?\.[^.]+$", "", p.name, flags=re.I), p)
    by_length = sorted(masks, key=len, reverse=True)
    out = []
    for rel in rel_files:
        stem = re.sub(r"(\.nii)?\.[^.]+$", "", Path(re.sub(r"\[\d+\]$", "", rel)).name, flags=re.I)
        hit = masks.get(stem) or next((masks[m] for m in by_length if stem.startswith(m + "_")), None)
        if hit is None:
            raise UserError(f"{Path(root) / 'images' / rel} has no mask in {Path(root) / 'masks'} (same stem, or "
                            "the stem ControlNet's inference names it after)")
        out.append(hit)
    return out


class _Resized(torch.utils.data.Dataset):
    """Decoded images at size x size by the one resize rule (imaging.resize_image): float C x size x size in [0, 1]."""

    def __init__(self, paths, size, opts):
        self.paths, self.size, self.opts = list(paths), size, opts

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return resize_image(decode_image(self.paths[i], 3, self.opts), self.size)


def load_pixels(paths, size, opts=None, num_workers=0, batch_size=64):
    """(N, C, size, size) float32 in [0, 1] of images / Sources (C = 1 when every image is grey)."""
    loader = torch.utils.data.DataLoader(_Resized(paths, size, opts), batch_size=batch_size,
                                         num_workers=num_workers, shuffle=False)
    batches = list(loader)
    if all(torch.equal(b[:, 0], b[:, 1]) and torch.equal(b[:, 0], b[:, 2]) for b in batches):
        batches = [b[:, :1] for b in batches]
    return torch.cat(batches)


def load_masks(paths, size):
    """(N, 1, size, size) int64 label masks, read and resized as the model folders read masks (imaging.read_pixels
    keeping palette indices, resize_mask: nearest on the images' geometry); 0/255 masks become 0/1."""
    out = []
    for p in paths:
        try:
            m = read_pixels(p, expand_palette=False)[..., :1]  # labels / 255 (8-bit and label-map volumes)
        except ImageError as exc:
            raise UserError(f"mask {exc}") from None
        labels = torch.from_numpy(np.round(m * 255).astype(np.int64)).permute(2, 0, 1)
        out.append(resize_mask(labels, size).round().long())
    masks = torch.stack(out)
    if set(torch.unique(masks).tolist()) <= {0, 255}:
        masks = masks // 255
    return masks


def validate_images(root, items, label, opts=None):
    """Decode every image once (as extraction will); name the first bad file. Returns notes for users.

    items: relative paths under root, or Sources (slices / frames); opts: the fitted medical.ReadOptions."""
    infos, sizes = [], set()
    for item in items:
        src = item if isinstance(item, Source) else Source(Path(root) / item)
        try:
            info = check_image(src, opts=opts)
        except ImageError as exc:
            raise UserError(str(exc)) from None
        infos.append(info)
        sizes.add(info.size)
    notes = []
    n_alpha = sum(i.alpha for i in infos)
    n_medical = sum(i.mode.startswith(("DICOM", "NIfTI")) for i in infos)
    windowed = opts is not None and opts.windows_2d() and opts.window is not None
    n_high = sum(i.dtype not in ("uint8", "bool") for i in infos) - n_medical
    if n_alpha:
        notes.append(f"{label}: {n_alpha} image(s) have an alpha channel; it is dropped (not composited)")
    if n_high:
        how = "through the intensity window, in their stored units" if windowed else \
            "(integers / their type's maximum, floats as stored in [0, 1])"
        notes.append(f"{label}: {n_high} image(s) are 16-bit/32-bit/float; read at full precision {how}")
    if n_medical:
        notes.append(f"{label}: {n_medical} DICOM / NIfTI image(s) (slices, frames) read through the intensity window")
    if len(sizes) > 1:
        notes.append(f"{label}: images come in {len(sizes)} sizes; each network resizes them to its input")
    return notes


def load_rgb(path, opts=None):
    """Decode one image (path or Source) to a uint8 H x W x 3 array (the [0, 1] values rounded to 8 bits)."""
    x = decode_image(path, 3, opts).permute(1, 2, 0).numpy()
    return np.round(x * 255.0).astype(np.uint8)


class ImageFiles(torch.utils.data.Dataset):
    """Items are (index, float32 3 x H x W tensor on the 0..255 scale or None, error text or None).

    The tensor is the decoder's [0, 1] image times 255, unrounded: features.extract divides by 255 as
    torchvision's ToTensor does (bit-identical to it for 8-bit files) and 16-bit/float images keep their
    precision."""

    def __init__(self, paths, opts=None):
        self.paths, self.opts = list(paths), opts  # paths or Sources; opts: the fitted ReadOptions

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            x = decode_image(self.paths[i], 3, self.opts)
        except ImageError as exc:  # reported by the main process, which adds what to do
            return i, None, f"{exc.path} {exc.problem}"
        return i, x * 255.0, None


def collate_images(items):
    """Keep images as a list: sizes may differ; the extractor stacks same-size groups itself."""
    return [it[0] for it in items], [it[1] for it in items], [it[2] for it in items]
