"""Image/mask pairs for ControlNet training: pairing, up-front validation, loading, identical augmentation.

    data_root/images/001.png  <->  data_root/masks/001.png         (same stem; extensions may differ)
    data_root/images/Img_001.png <-> data_root/masks/seg_001.png   (--image_prefix Img_ --mask_prefix seg_)
    data_root/images/ct_001.nii.gz <-> data_root/masks/ct_001.nii.gz   (slice k with slice k; DICOM alike)

Both follow the repository's one image rule (imaging.py, vendored; "How images are read" in the top
README). Images become tensors in [-1, 1] with the LDM's channel count. Masks keep their stored values
(scaled to [0, 1] by their type's maximum: 8-bit /255, 16-bit /65535; a palette mask keeps its indices
/255, alpha is dropped) and use the same shorter-side resize + centre crop with nearest neighbour only,
so they stay aligned with their images and no new value appears. Used by train.py and inference.py.
DICOM / NIfTI files (medical.py, vendored) give one image per slice / frame (an imaging.Source whose stem
is '<file stem>_<slice:04d>'), images read through the LDM's intensity window, masks as label maps
(integers 0..255, / 255); constant image slices are skipped, and the mask slices that went with them are
dropped (counted, not reported as unpaired). The pairing itself and the class-label CSV are pairing.py
(vendored, shared with ddpm/); their names stay importable from here.
"""
import numpy as np
import torch

import medical
import pairing
from imaging import IMAGE_EXTENSIONS, ImageError, check_image, decode_image, read_pixels, resize_image, resize_mask
from models import UserError
from pairing import (_key, describe_unpaired, expand_sources, label_of, list_images,  # noqa: F401 (re-exported)
                     pair_files, pair_slices)

IMAGE_EXTS = IMAGE_EXTENSIONS
ONE_CHANNEL_MODES = ("1", "L", "LA", "P", "PA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "NIfTI",
                     "DICOM MONOCHROME1", "DICOM MONOCHROME2")
THREE_CHANNEL_MODES = ("RGB", "RGBA", "DICOM RGB")


def check_mask_mode(path, mode, mask_channels):
    """UserError naming the file when a mask's channel count differs from --mask_channels."""
    ch = 1 if mode in ONE_CHANNEL_MODES else 3 if mode in THREE_CHANNEL_MODES else None
    if ch is None:
        raise UserError(f"mask {path} has the unsupported image mode {mode}; save it as 8/16-bit grayscale or RGB")
    if ch != mask_channels:
        raise UserError(f"mask {path} has {ch} channel(s) (mode {mode}) but --mask_channels is {mask_channels}; "
                        f"pass --mask_channels {ch} or convert the masks")


def verify_file(path, what, opts=None):
    """Decode an image or mask fully (as training will); return its mode; UserError naming the file if unusable."""
    try:
        return check_image(path, expand_palette=what != "mask", opts=opts).mode
    except ImageError as e:
        raise UserError(f"{what} {e}") from None


def validate_pairs(pairs, mask_channels, opts=None):
    """Verify every image and mask header up front; check each mask's channel count."""
    for im, m in pairs:
        verify_file(im, "image", opts)
        check_mask_mode(m, verify_file(m, "mask", opts), mask_channels)


def read_class_labels(csv_path, class_names):
    """pairing.read_class_labels, its unknown-class message naming the LDM's classes."""
    return pairing.read_class_labels(csv_path, class_names, whose="the LDM's")


def read_options(args, ldm_intensity, stored, images):
    """The ReadOptions training reads with: the LDM's window (a different --intensity_window is an error).

    Slicing (--slice_axis, --slice_range, --group_regex) is this data set's own. On --resume the
    checkpoint's stored options are used and other read flags are refused. An LDM without a window
    (8-bit data, or older) leaves the window to this data (--intensity_window, fitted once on `images`)."""
    try:
        cli = medical.options_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    if stored:
        try:
            return medical.resume_options(cli, stored)
        except ValueError as e:
            raise UserError(f"--resume: {e}") from None
    base = medical.ReadOptions.from_config(ldm_intensity) if ldm_intensity else None
    if base is not None and base.window is not None:
        same = cli.mode == base.mode or (cli.window is not None and np.allclose(cli.window, base.window))
        if cli.mode[0] != "auto" and not same:
            lo, hi = base.window
            raise UserError(f"--intensity_window {cli.spec} differs from the window the LDM was trained with "
                            f"([{lo:g}, {hi:g}], {base.origin or base.spec}); the ControlNet reads images as its LDM "
                            f"did: drop the flag (that window is used) or pass --intensity_window {lo:g},{hi:g}")
        cfg = dict(base.to_config(), slice_axis=cli.slice_axis, group_regex=cli.group_regex,
                   slice_range=list(cli.slice_range) if cli.slice_range else None)
        return medical.ReadOptions.from_config(cfg)
    try:
        return cli.fit(images)
    except (ValueError, ImageError) as e:
        raise UserError(str(e)) from None


# ------------------------------------------------------------------------------------------------- loading
def load_image(path, channels, size, opts=None):
    """Image file -> float tensor (channels, size, size) in [-1, 1] (shorter side + centre crop, bilinear)."""
    try:
        x = resize_image(decode_image(path, channels, opts), size)
    except ImageError as e:
        raise UserError(f"image {e}") from None
    return (x * 2 - 1).clamp(-1, 1).contiguous()


def load_mask(path, channels, size, opts=None):
    """Mask file -> float tensor (channels, size, size) in [0, 1]; nearest-neighbour resize keeps its values."""
    try:
        arr = read_pixels(path, expand_palette=False, opts=opts)
    except ImageError as e:
        raise UserError(f"mask {e}") from None
    if arr.shape[2] != channels:
        raise UserError(f"mask {path} has {arr.shape[2]} channel(s) but --mask_channels is {channels}; "
                        f"pass --mask_channels {arr.shape[2]} or convert the masks")
    return resize_mask(torch.from_numpy(arr).permute(2, 0, 1), size)


def flips_for(seed, epoch, index, hflip, vflip):
    """(horizontal, vertical) flip decisions: a function of (seed, epoch, sample index) only."""
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])
    h, v = rng.random(2)
    return bool(hflip and h < 0.5), bool(vflip and v < 0.5)


class PairDataset(torch.utils.data.Dataset):
    """Image/mask pairs; item key (index, epoch) draws flips for that epoch, a plain index does none."""

    def __init__(self, pairs, image_channels, mask_channels, image_size, labels=None, null_label=0,
                 seed=0, hflip=False, vflip=False, opts=None):
        self.pairs, self.labels, self.opts = list(pairs), labels, opts
        self.image_channels, self.mask_channels, self.image_size = image_channels, mask_channels, image_size
        self.null_label, self.seed, self.hflip, self.vflip = null_label, seed, hflip, vflip

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        im_path, mask_path = self.pairs[index]
        image = load_image(im_path, self.image_channels, self.image_size, self.opts)
        mask = load_mask(mask_path, self.mask_channels, self.image_size, self.opts)
        if epoch is not None:
            h, v = flips_for(self.seed, epoch, index, self.hflip, self.vflip)
            dims = ([2] if h else []) + ([1] if v else [])
            if dims:  # the same flip for image and mask, so the pair stays aligned
                image, mask = image.flip(dims), mask.flip(dims)
        label = self.null_label if self.labels is None else self.labels[index]
        return {"image": image, "mask": mask, "label": torch.tensor(label, dtype=torch.long),
                "index": torch.tensor(index, dtype=torch.long)}


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a (seed, epoch) permutation, in whole global batches, from batch `start` on."""

    def __init__(self, indices, batch_size, world_size, rank, seed, shuffle=True):
        self.indices, self.batch_size, self.world_size, self.rank = list(indices), batch_size, world_size, rank
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0

    def batches_per_epoch(self):
        """Global batches per epoch (the last incomplete one is dropped so every rank steps together)."""
        return len(self.indices) // (self.batch_size * self.world_size)

    def set_epoch(self, epoch, start=0):
        """Epoch whose permutation to use, and how many of its batches were already consumed."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = [order[i] for i in perm.tolist()]
        g = self.batch_size * self.world_size
        for b in range(self.start, self.batches_per_epoch()):
            for i in order[b * g + self.rank * self.batch_size: b * g + (self.rank + 1) * self.batch_size]:
                yield (i, self.epoch) if self.shuffle else i

    def __len__(self):
        return (self.batches_per_epoch() - self.start) * self.batch_size


def split_indices(n, val_fraction, seed, groups=None):
    """Deterministic (train, val) index split; val gets about round(n * fraction) items (at least 1 if fraction > 0).

    Whole groups only (medical.group_split): the slices of one patient / study / volume (`groups`, one key
    per pair, from its image) never land on both sides; without groups every pair is its own group."""
    groups = list(range(n)) if groups is None else list(groups)
    try:
        return medical.group_split(groups, [0] * n, val_fraction, seed)
    except ValueError:
        raise UserError(f"--val_fraction {val_fraction}: the {n} pairs come from {len(set(groups))} patient / "
                        f"volume group(s); none can be held out whole for validation with training pairs left; "
                        f"add patients or pass --val_fraction 0") from None


def groups_of(pairs, opts):
    """The patient / study / volume of every pair's image (medical.group_of); UserError for a --group_regex miss."""
    try:
        return [medical.group_of(im, opts) for im, _ in pairs]
    except ImageError as e:
        raise UserError(f"--group_regex: {e}") from None
