"""Image/mask (or high-res/low-res) pairing by file stem, per-file class labels from a CSV, and the Dice score.

VENDORED: the source is scripts/vendored/pairing.py; ddpm/ and controlnet/ each hold a byte-identical copy
(`python scripts/sync_vendored.py` refreshes them, tests/test_vendored.py fails on drift). Never edit a
copy: edit the source and run the sync script. Nothing to run here.

    data_root/images/001.png  <->  data_root/masks/001.png         (same stem; extensions may differ)
    data_root/images/Img_001.png <-> data_root/masks/seg_001.png   (--image_prefix Img_ --mask_prefix seg_)
    data_root/images/ct_001.nii.gz <-> data_root/masks/ct_001.nii.gz   (slice k with slice k; DICOM alike)

    pairs, unpaired_images, unpaired_masks, dropped = pair_slices("data/images", "data/masks", opts=opts)
    by_stem = read_class_labels("labels.csv", class_names)          # rows 'stem,class_name'
    dice(mask > 0, image > otsu_threshold(image))

DICOM / NIfTI files (medical.py, vendored) give one imaging.Source per slice / frame (stem
'<file stem>_<slice:04d>'); constant image slices are skipped and the mask slices that went with them
are dropped (returned apart, not reported as unpaired). Every problem is a runtime.UserError: one line
naming the folder or file and what to do.
"""
import csv
from pathlib import Path

import numpy as np
from PIL import Image

import medical
from imaging import ALL_EXTENSIONS, ImageError, Source, decode_image
from imaging import list_images as _list_image_files
from runtime import UserError

HEADER_NAMES = ("class", "class_name", "label", "name")  # a first CSV row naming its columns is skipped


def list_images(folder, what):
    """Sorted image files of a folder; UserError when it is missing, empty, or has two files with one stem."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} is not a folder")
    files = _list_image_files(folder)
    if not files:
        raise UserError(f"{what} {folder} has no images ({', '.join(ALL_EXTENSIONS)})")
    seen = {}
    for p in files:
        stem = Source(p).file_stem  # ct_001.nii.gz -> ct_001
        if stem in seen:
            raise UserError(f"{what} {folder}: {seen[stem].name} and {p.name} share the stem '{stem}'; "
                            f"keep one of them")
        seen[stem] = p
    return files


def expand_sources(files, opts, what, skip_empty=True):
    """medical.expand (one Source per 2-D file / slice / frame), an unusable file as UserError naming it."""
    try:
        return medical.expand(files, opts, skip_empty=skip_empty)
    except ImageError as e:
        raise UserError(f"{what} {e}") from None


def _key(stem, prefix):
    """Pairing key of a file stem: the stem without its prefix; None when the prefix is absent."""
    if not prefix:
        return stem
    return stem[len(prefix):] if stem.startswith(prefix) else None


def pair_files(images_dir, masks_dir, image_prefix="", mask_prefix="", opts=None):
    """Pair images with masks by stem (after removing the prefixes): (pairs, unpaired_images, unpaired_masks)."""
    return pair_slices(images_dir, masks_dir, image_prefix, mask_prefix, opts)[:3]


def pair_slices(images_dir, masks_dir, image_prefix="", mask_prefix="", opts=None, kinds=("image", "mask")):
    """pair_files over 2-D images / slices / frames (Sources) -> (pairs, unpaired images, unpaired masks, dropped).

    Slice k of images/ct_001.nii.gz pairs with slice k of masks/ct_001.nii.gz (Source.stem); `dropped` are
    the mask slices whose image slice was skipped as empty (constant): left out, not reported as unpaired.
    `kinds` names the two sides in messages (("image", "low-res image") for super-resolution pairs)."""
    image_files = list_images(images_dir, f"{kinds[0]}s folder")
    images = expand_sources(image_files, opts, kinds[0])
    masks = expand_sources(list_images(masks_dir, f"{kinds[1]}s folder"), opts, kinds[1], skip_empty=False)
    kept = set(images)
    skipped = {_key(s.stem, image_prefix) for s in expand_sources(image_files, opts, kinds[0], skip_empty=False)
               if s not in kept} - {None}
    mask_by_key = {}
    unpaired_masks = []
    for m in masks:
        k = _key(m.stem, mask_prefix)
        (unpaired_masks.append(m) if k is None else mask_by_key.__setitem__(k, m))
    pairs, unpaired_images, used = [], [], set()
    for im in images:
        k = _key(im.stem, image_prefix)
        if k is not None and k in mask_by_key:
            pairs.append((im, mask_by_key[k]))
            used.add(k)
        else:
            unpaired_images.append(im)
    dropped = [m for k, m in mask_by_key.items() if k not in used and k in skipped]
    unpaired_masks += [m for k, m in mask_by_key.items() if k not in used and k not in skipped]
    return pairs, unpaired_images, sorted(unpaired_masks), dropped


def describe_unpaired(unpaired_images, unpaired_masks, show=5, kinds=("image", "mask")):
    """One line naming how many files are unpaired and the first few of each kind."""
    def an(word):
        return ("an " if word[0] in "aeiou" else "a ") + word

    parts = []
    for files, what in ((unpaired_images, f"{kinds[0]}(s) without {an(kinds[1])}"),
                        (unpaired_masks, f"{kinds[1]}(s) without {an(kinds[0])}")):
        if files:
            names = ", ".join(p.name for p in files[:show]) + (", ..." if len(files) > show else "")
            parts.append(f"{len(files)} {what}: {names}")
    return "; ".join(parts)


def _csv_rows(csv_path):
    """(line number, stem, class name) of every non-empty row of a `stem,class_name` CSV; UserError if unusable."""
    path = Path(csv_path)
    if not path.is_file():
        raise UserError(f"--class_labels_csv {path} does not exist")
    try:
        with open(path, newline="") as f:
            for row_no, row in enumerate(csv.reader(f), 1):
                row = [c.strip() for c in row]
                if not row or not any(row):
                    continue
                if len(row) < 2:
                    raise UserError(f"--class_labels_csv {path} line {row_no}: expected 'stem,class_name'")
                yield row_no, row[0], row[1]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--class_labels_csv {path} is not a text CSV ({type(e).__name__}); "
                        f"save it as UTF-8 'stem,class_name' rows") from None


def csv_class_names(csv_path):
    """Sorted distinct class names of a `stem,class_name` CSV (a header row is skipped): a new run's classes."""
    names = sorted({name for row_no, _, name in _csv_rows(csv_path)
                    if not (row_no == 1 and name.lower() in HEADER_NAMES)})
    if not names:
        raise UserError(f"--class_labels_csv {csv_path} has no rows")
    return names


def read_class_labels(csv_path, class_names, whose="the known"):
    """Read `stem,class_name` rows (a header row is allowed) -> dict stem -> class index.

    `whose` words the unknown-class message ("...; the LDM's classes are: a, b")."""
    path = Path(csv_path)
    index = {n: i for i, n in enumerate(class_names)}
    labels = {}
    for row_no, stem, name in _csv_rows(path):
        if row_no == 1 and name not in index and name.lower() in HEADER_NAMES:
            continue
        if name not in index:
            raise UserError(f"--class_labels_csv {path} line {row_no}: unknown class '{name}'; {whose} "
                            f"classes are: {', '.join(class_names)}")
        labels[Source(stem).file_stem] = index[name]  # ct_001.nii.gz -> ct_001
    if not labels:
        raise UserError(f"--class_labels_csv {path} has no rows")
    return labels


def label_of(src, by_stem):
    """The class of an image or slice from read_class_labels' dict: its own stem, else its file's (a volume)."""
    return by_stem.get(src.stem, by_stem.get(src.file_stem))


# ------------------------------------------------------------------------------------------------- Dice
def otsu_threshold(gray):
    """Otsu's threshold of a uint8 image (hand-written: scikit-image is not a dependency)."""
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist / max(hist.sum(), 1)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return int(np.argmax(between[:-1]))  # foreground is > threshold


def dice(mask_fg, image_fg):
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    a, b = mask_fg.sum(), image_fg.sum()
    return 1.0 if a + b == 0 else float(2 * np.logical_and(mask_fg, image_fg).sum() / (a + b))


def check_dice_threshold(value):
    """--dice_threshold: 'otsu' or a grey level in [0, 1]; UserError otherwise."""
    if value != "otsu":
        try:
            if not 0 <= float(value) <= 1:
                raise ValueError
        except ValueError:
            raise UserError(f"--dice_threshold must be 'otsu' or a number in [0, 1], got {value}") from None


def image_dice(path, mask_fg, threshold="otsu", foreground="bright", png8=True):
    """The mask reports' Dice: (threshold, Dice of a mask's foreground and the generated image `path` cut at
    Otsu's threshold (or at the grey level `threshold` in [0, 1]); foreground 'bright' (> threshold) or 'dark').
    png8: the file is an 8-bit PNG (--output_format png); else it is read through its own window."""
    if png8 and Path(path).suffix.lower() == ".png":
        gray = np.asarray(Image.open(path).convert("L"))
    else:  # png16 / NIfTI / DICOM: [0, 1] through the file's own window, then 8-bit levels
        gray = np.round(decode_image(path, 1)[0].numpy() * 255).astype(np.uint8)
    thr = otsu_threshold(gray) if threshold == "otsu" else round(float(threshold) * 255)
    return thr, dice(mask_fg, gray > thr if foreground == "bright" else gray <= thr)
