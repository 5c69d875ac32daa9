"""Data sets of the image-conditioned DDPM tasks: image/mask pairs, high-/low-res pairs, folders of masks.

    task          data_root layout                                  item: (target, cond_raw, label, index)
    mask2image    images/001.png + masks/001.png (same stem)        image (C,S,S) [-1,1], mask (1,S,S) long
    segmentation  images/001.png + masks/001.png                    mask (1,S,S) long, image (C,S,S) [-1,1]
    superres      images/001.png [+ <lowres_folder>/001.png]        image, low-res upsampled to S (C,S,S) [-1,1]
    masks         data_root/**/*.png (a folder of masks)            mask (1,S,S) long, torch.zeros(0)

Pairs are made by stem as in ControlNet (pairing.py, vendored): Img_001.png <-> seg_001.png with --image_prefix
Img_ --mask_prefix seg_; slice k of images/ct_001.nii.gz with slice k of masks/ct_001.nii.gz (DICOM alike).
Without --lowres_folder the super-resolution condition is made from the target (conditional.degrade: down by
--sr_factor with --sr_filter, bicubic back up); with it, each high-res file pairs with the low-res file of its
stem, which must be exactly sr_factor times smaller. Masks hold labels 0..K-1 (conditional.read_label_map;
K = 2: any non-zero value is foreground) and are resized with nearest neighbour in the images' geometry
(imaging.resize_mask), so they stay aligned and no new label appears; they are never windowed. Images read
through the intensity window fitted once on all images (medical.ReadOptions). Everything is decoded and
checked in __init__, so a bad file is one line naming it before training starts. Used by train.py.
"""
from pathlib import Path

import torch

import imaging
import medical
from conditional import PAIRED_TASKS, SR_FILTERS, degrade, read_label_map, upsample
from dataset import channels_from_modes, load_image
from imaging import ALL_EXTENSIONS, ImageError, check_image
from pairing import _key, csv_class_names, describe_unpaired, expand_sources, label_of, pair_slices, read_class_labels
from runtime import UserError

DATA_TASKS = ("masks",) + PAIRED_TASKS
SHOW = 5  # files named in a message


def _names(files):
    """The first few names of a list of Sources, for one-line messages."""
    return ", ".join(s.name for s in files[:SHOW]) + (", ..." if len(files) > SHOW else "")


def _subfolder(root, name, flag, layout, flags):
    """data_root/name as a folder that holds images; UserError naming the flag when it is missing or empty."""
    d = root / name
    if not d.is_dir():
        raise UserError(f"--data_root {root} has no {name}/ folder (expected {layout}, or set {flags})")
    if not imaging.list_images(d):
        raise UserError(f"{flag} {d} has no images ({', '.join(ALL_EXTENSIONS)}); add them or set {flag}")
    return d


def check_settings(task, image_size, channels, num_mask_classes, sr_factor, sr_filter):
    """UserError naming the flag for settings no data could satisfy."""
    if task not in DATA_TASKS:
        raise UserError(f"--task {task!r} has no paired data set (use {', '.join(DATA_TASKS)})")
    if str(channels) not in ("auto", "1", "3"):
        raise UserError(f"--channels must be auto, 1 or 3, not {channels}")
    if not isinstance(num_mask_classes, int) or num_mask_classes < 2:
        raise UserError(f"--num_mask_classes must be an integer >= 2 (background + labels), not {num_mask_classes}")
    if task == "superres":
        if not isinstance(sr_factor, int) or sr_factor < 2:
            raise UserError(f"--sr_factor must be an integer >= 2, not {sr_factor}")
        if image_size % sr_factor:
            raise UserError(f"--sr_factor {sr_factor} does not divide --image_size {image_size}")
        if sr_filter not in SR_FILTERS:
            raise UserError(f"--sr_filter {sr_filter!r} is unknown (use {', '.join(SR_FILTERS)})")


def find_pairs(task, root, images_folder, masks_folder, lowres_folder, image_prefix, mask_prefix,
               skip_unpaired, opts):
    """(pairs, warnings): (image, mask) / (high-res, low-res or None) / (mask, None) Sources, per the task."""
    if (image_prefix or mask_prefix) and task in ("masks", "superres"):
        raise UserError(f"--image_prefix/--mask_prefix pair images with masks; the {task} task pairs none "
                        f"(low-res files pair by their stem): drop them")
    if task == "masks":
        if (root / images_folder).is_dir() and (root / masks_folder).is_dir():
            raise UserError(f"--data_root {root} holds {images_folder}/ and {masks_folder}/ (image/mask pairs); "
                            f"the masks task trains on masks alone: pass --data_root {root / masks_folder}")
        masks = expand_sources(imaging.list_images(root, recursive=True), opts, "mask", skip_empty=False)
        if not masks:
            raise UserError(f"--data_root {root} has no mask images ({', '.join(ALL_EXTENSIONS)})")
        return [(m, None) for m in masks], []
    if task == "superres" and not lowres_folder:
        d = _subfolder(root, images_folder, "--images_folder", f"{root / images_folder}", "--images_folder")
        return [(s, None) for s in expand_sources(imaging.list_images(d), opts, "image")], []
    if task == "superres":
        kinds, second = ("image", "low-res image"), (lowres_folder, "--lowres_folder")
        flags = "--images_folder/--lowres_folder"
    else:
        kinds, second, flags = ("image", "mask"), (masks_folder, "--masks_folder"), "--images_folder/--masks_folder"
    layout = f"{root / images_folder} and {root / second[0]}"
    first = _subfolder(root, images_folder, "--images_folder", layout, flags)
    other = _subfolder(root, second[0], second[1], layout, flags)
    pairs, un_a, un_b, dropped = pair_slices(first, other, image_prefix, mask_prefix, opts, kinds)
    warnings = []
    hint = " (or --image_prefix/--mask_prefix)" if task != "superres" else ""
    if un_a or un_b:
        msg = describe_unpaired(un_a, un_b, SHOW, kinds)
        if not pairs:
            raise UserError(f"no {kinds[0]}/{kinds[1]} pairs in {root} ({msg}); check the names{hint} and {flags}")
        if not skip_unpaired:
            raise UserError(f"{msg}; fix the names{hint}, or --skip_unpaired trains on the {len(pairs)} pairs found")
        warnings.append(f"--skip_unpaired: left out {msg}; training on the {len(pairs)} pairs found")
    if dropped:
        warnings.append(f"{len(dropped)} {kinds[1]} slice(s) left out because their image slice is empty (constant)")
    return pairs, warnings


def _info(src, what, opts):
    """ImageInfo of a fully decoded image; UserError naming it if unusable."""
    try:
        return check_image(src, opts=opts)
    except ImageError as e:
        raise UserError(f"{what} {e}") from None


def _wxh(size):
    """(width, height) as 'WxH'."""
    return f"{size[0]}x{size[1]}"


def validate(task, pairs, num_mask_classes, sr_factor, opts):
    """Decode every image and mask once: (ImageInfos of the images, sorted mask labels found). UserError on a bad one."""
    infos, found = [], set()
    for a, b in pairs:
        if task == "masks":
            found.update(read_label_map(a, num_mask_classes, opts).unique().tolist())
            continue
        info = _info(a, "image", opts)
        infos.append(info)
        if task == "superres" and b is not None:
            low = _info(b, "low-res image", opts)
            infos.append(low)
            if (low.size[0] * sr_factor, low.size[1] * sr_factor) != tuple(info.size):
                raise UserError(f"low-res image {b} is {_wxh(low.size)} but its high-res image {a} is "
                                f"{_wxh(info.size)}; with --sr_factor {sr_factor} it must be "
                                f"{info.size[0] / sr_factor:g}x{info.size[1] / sr_factor:g}: resize it or "
                                f"pass the --sr_factor the pairs were made with")
        elif task != "superres":
            labels = read_label_map(b, num_mask_classes, opts)
            if (labels.shape[2], labels.shape[1]) != tuple(info.size):
                raise UserError(f"mask {b} is {labels.shape[2]}x{labels.shape[1]} but its image {a} is "
                                f"{_wxh(info.size)}; a mask must have its image's size (pixel-aligned): "
                                f"re-export or resize the mask (nearest neighbour)")
            found.update(labels.unique().tolist())
    return infos, sorted(int(v) for v in found)


def class_labels(pairs, csv_path, class_names, key_prefix):
    """(labels, class_names) from --class_labels_csv (keyed by pair key or file stem); ([0...], []) without it."""
    if not csv_path:
        if class_names:
            raise UserError(f"the resumed run was trained with classes ({', '.join(class_names[:10])}); "
                            f"pass its --class_labels_csv")
        return [0] * len(pairs), []
    names = list(class_names) if class_names else csv_class_names(csv_path)
    by_stem = read_class_labels(csv_path, names, whose="the resumed run's" if class_names else "the")

    def of(src):
        for k in (_key(src.stem, key_prefix), _key(src.file_stem, key_prefix)):
            if k is not None and k in by_stem:
                return by_stem[k]
        return label_of(src, by_stem)

    labels = [of(a) for a, _ in pairs]
    missing = [a for (a, _), lab in zip(pairs, labels) if lab is None]
    if missing:
        raise UserError(f"--class_labels_csv {csv_path} has no class for {len(missing)} of {len(pairs)} "
                        f"file(s): {_names(missing)}; add 'stem,class_name' rows for them")
    return labels, names


class PairedDataset(torch.utils.data.Dataset):
    """A validated data set of one conditional task; items are (target, cond_raw, label, index) (module docstring).

    `files` are the image-side Sources (the masks for the masks task; what medical.describe_data summarises),
    `cond_files` the other side (masks, low-res files; [] when the condition is made on the fly), `pairs`
    both, `opts` the fitted medical.ReadOptions (stored in checkpoints under "intensity"), `labels_found`
    the mask labels present, `warnings` what --skip_unpaired left out (for the log)."""

    def __init__(self, task, data_root, image_size, channels="auto", num_mask_classes=2,
                 images_folder="images", masks_folder="masks", lowres_folder=None, image_prefix="",
                 mask_prefix="", skip_unpaired=False, sr_factor=4, sr_filter="bicubic",
                 class_labels_csv=None, class_names=None, opts=None, fit=True):
        check_settings(task, image_size, channels, num_mask_classes, sr_factor, sr_filter)
        root = Path(data_root)
        if not root.exists():
            raise UserError(f"--data_root {root} does not exist")
        if not root.is_dir():
            raise UserError(f"--data_root {root} is not a folder")
        self.task, self.image_size, self.num_mask_classes = task, int(image_size), int(num_mask_classes)
        self.sr_factor, self.sr_filter = sr_factor, sr_filter
        opts = opts if opts is not None else medical.ReadOptions()
        self.pairs, self.warnings = find_pairs(task, root, images_folder, masks_folder, lowres_folder, image_prefix,
                                               mask_prefix, skip_unpaired, opts)
        self.files = [a for a, _ in self.pairs]
        self.cond_files = [b for _, b in self.pairs if b is not None]
        if fit and task != "masks":  # the window, fixed once from every image; masks are label maps
            try:
                opts = opts.fit(self.files + (self.cond_files if task == "superres" else []))
            except (ImageError, ValueError) as e:
                raise UserError(str(e)) from None
        self.opts = opts
        infos, self.labels_found = validate(task, self.pairs, self.num_mask_classes, sr_factor, opts)
        self.channels = channels_from_modes(infos) if str(channels) == "auto" else int(channels)
        self.labels, self.class_names = class_labels(self.pairs, class_labels_csv, class_names or [], image_prefix)

    def __len__(self):
        return len(self.pairs)

    def _image(self, src, size=None):
        """An image (file, slice or frame) as (C, size, size) in [-1, 1] through the fitted window."""
        return load_image(src, self.channels, size or self.image_size, self.opts)

    def _mask(self, src):
        """A mask as its labels (1, S, S) long, nearest-resized in the images' geometry."""
        labels = read_label_map(src, self.num_mask_classes, self.opts)
        return imaging.resize_mask(labels, self.image_size).long()

    def __getitem__(self, i):
        a, b = self.pairs[i]
        if self.task == "masks":
            target, cond = self._mask(a), torch.zeros(0)
        elif self.task == "mask2image":
            target, cond = self._image(a), self._mask(b)
        elif self.task == "segmentation":
            target, cond = self._mask(b), self._image(a)
        else:
            target = self._image(a)
            cond = (degrade(target, self.sr_factor, self.sr_filter) if b is None else
                    upsample(self._image(b, self.image_size // self.sr_factor), self.image_size))
        return target, cond, self.labels[i], i
