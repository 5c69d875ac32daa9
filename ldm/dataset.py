"""Class-folder image data for the LDM: validation, loading to [-1, 1], splits, batch order, latent cache.

    data_root/<class_name>/<image>.png   (class names sorted -> labels 0..C-1)
    data_root/<class_name>/[<patient>/]<slice>.dcm, <volume>.nii.gz ...   (medical.py: one image per slice)

Not run directly; `train.py` and `train_vae.py` use it. Every file is decoded once up front so a broken
file is named before any training starts. Pixels follow the repository's one image rule (imaging.py,
vendored; "How images are read" in the top README): integers / their type's maximum (16-bit never
clipped), float must be in [0, 1], alpha dropped, palettes expanded, shorter side resized (antialiased
bilinear) and centre-cropped. Grayscale data stays 1-channel here. DICOM / NIfTI files (medical.py,
vendored) become one sample per 2-D slice or frame (an imaging.Source), read through one intensity
window fixed from the data before training (`fit_window`) and stored in every checkpoint; validation
splits keep every patient / study / volume on one side (`split_train_val` with `groups`).
Randomness (order, flips) is a pure function of (seed, epoch, index), so resumed runs and any
`--num_workers` see the same batches.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import medical
from imaging import (ALL_EXTENSIONS, IMAGE_EXTENSIONS, ImageError, as_source, check_image, decode_image,
                     resize_image)
from imaging import list_images as _list_image_files
from utils import UserError

IMAGE_EXTS = IMAGE_EXTENSIONS


def list_images(folder):
    """Sorted image files (by extension, hidden files skipped) directly inside `folder`."""
    return _list_image_files(folder)


def scan_class_folders(root, opts=None):
    """Validate `root/<class>/<images>` (images anywhere below the class folder, e.g. one folder per patient);
    return (class_names, [(Source, label)], channels 1 or 3).

    DICOM / NIfTI files give one Source per slice / frame (medical.expand: --slice_range, constant slices
    skipped); `opts` (medical.ReadOptions) is what every image is checked with."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = list_images(root)
        hint = (f" (it holds {len(loose)} images directly; put them in one subfolder per class)"
                if loose else " (it is empty)")
        raise UserError(f"--data_root {root} has no class subfolders{hint}")
    samples, channels = [], 1
    for label, name in enumerate(classes):
        files = _list_image_files(root / name, recursive=True)  # a DICOM series usually sits in patient folders
        if not files:
            raise UserError(f"class folder {root / name} has no images ({', '.join(sorted(ALL_EXTENSIONS))}); "
                            f"add images or remove the folder")
        try:
            sources = medical.expand(files, opts)
        except ImageError as e:
            raise UserError(str(e)) from None
        for src in sources:
            channels = max(channels, verify_image(src, opts).channels)
            samples.append((src, label))
    return classes, samples, channels


def verify_image(src, opts=None):
    """Decode an image (file or slice) fully, as training will; its ImageInfo, or UserError naming it."""
    try:
        return check_image(src, opts=opts)
    except ImageError as e:
        raise UserError(str(e)) from None


def read_options(args, stored=None):
    """medical.ReadOptions of the read flags (UserError naming a bad flag); on --resume the stored ones.

    `stored` is the "intensity" dict of a resumed checkpoint's config: its window is used as it is (never
    re-fitted); a read flag given with another value than the first run's is refused (medical.resume_options)."""
    try:
        opts = medical.options_from_args(args)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        return medical.resume_options(opts, stored)
    except ValueError as e:
        raise UserError(f"--resume: {e}") from None


def fit_window(opts, samples):
    """opts with the window fixed from the data once (auto / percentiles); UserError for an impossible mode."""
    try:
        return opts.fit([src for src, _ in samples])
    except (ValueError, ImageError) as e:
        raise UserError(str(e)) from None


def groups_of(samples, opts):
    """The patient / study / volume of every sample (medical.group_of), for splits; UserError for a regex miss."""
    try:
        return [medical.group_of(src, opts) for src, _ in samples]
    except ImageError as e:
        raise UserError(f"--group_regex: {e}") from None


def load_image(src, image_size, channels, opts=None):
    """Decode to float [0,1], resize shorter side + centre crop, return (channels,H,W) in [-1,1]."""
    try:
        x = resize_image(decode_image(src, channels, opts), image_size)
    except ImageError as e:
        raise UserError(str(e)) from None
    return x * 2 - 1


def resize_center_crop(x, size):
    """Resize (C,H,W) so the shorter side is `size` (antialiased bilinear), then centre-crop to size x size."""
    return resize_image(x, size)


def flip_decision(seed, epoch, index):
    """Whether sample `index` is flipped in `epoch`: a pure function, independent of workers and resume."""
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)


def split_train_val(labels, class_names, val_split, seed, groups=None):
    """Stratified split holding out about round(val_split * n) (at least 1) images per class -> index lists.

    Whole groups only (medical.group_split): the slices of one patient / study / volume (`groups`, one
    key per image) never land on both sides; without groups every image is its own group."""
    labels = np.asarray(labels)
    if val_split <= 0:
        return list(range(len(labels))), []
    for c, name in enumerate(class_names):
        n = int((labels == c).sum())
        n_val = max(1, int(round(val_split * n)))
        if n - n_val < 1:
            raise UserError(f"class '{name}' has {n} image(s); --val_split {val_split} needs at least "
                            f"{n_val + 1} per class (validation + training); add images or pass --val_split 0")
    groups = list(range(len(labels))) if groups is None else list(groups)
    try:  # class names as labels: the one-line error names the class
        return medical.group_split(groups, [class_names[c] for c in labels], val_split, seed)
    except ValueError as e:
        raise UserError(f"--val_split {val_split}: {e}; add patients or pass --val_split 0") from None


class ImageDataset(torch.utils.data.Dataset):
    """Items are (image in [-1,1], label, index); keys are (index, epoch) so flips follow (seed, epoch, index)."""

    def __init__(self, samples, image_size, channels, seed=0, random_flip=False, opts=None):
        self.samples, self.image_size, self.channels = samples, image_size, channels
        self.seed, self.random_flip, self.opts = seed, random_flip, opts

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        src, label = self.samples[index]
        x = load_image(src, self.image_size, self.channels, self.opts)
        if self.random_flip and epoch >= 0 and flip_decision(self.seed, epoch, index):
            x = x.flip(-1)
        return x, label, index


class LatentDataset(torch.utils.data.Dataset):
    """Cached posterior (mean, std) per image; the flipped image's posterior when the flip says so."""

    def __init__(self, cache, labels, seed=0, random_flip=False):
        self.cache, self.labels, self.seed, self.random_flip = cache, labels, seed, random_flip

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        index, epoch = key if isinstance(key, tuple) else (key, -1)
        c = self.cache
        if self.random_flip and epoch >= 0 and flip_decision(self.seed, epoch, index):
            return c["mean_flip"][index], c["std_flip"][index], self.labels[index], index
        return c["mean"][index], c["std"][index], self.labels[index], index


class EpochBatches(torch.utils.data.Sampler):
    """This rank's batches of one epoch: a permutation seeded by (seed, epoch), cut into global batches.

    Each global batch of batch_size * world_size indices is split by rank; the last incomplete global
    batch is dropped so every rank takes the same number of steps. `start` skips batches already
    consumed before a resume.
    """

    def __init__(self, indices, batch_size, world_size, rank, seed, epoch, start=0, shuffle=True):
        self.indices, self.batch_size, self.world, self.rank = list(indices), batch_size, world_size, rank
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle

    @staticmethod
    def num_batches(n, batch_size, world_size):
        """Batches per epoch per rank."""
        return n // (batch_size * world_size)

    def __len__(self):
        return max(0, self.num_batches(len(self.indices), self.batch_size, self.world) - self.start)

    def __iter__(self):
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()]
        gb = self.batch_size * self.world
        for b in range(self.start, self.num_batches(len(order), self.batch_size, self.world)):
            chunk = order[b * gb + self.rank * self.batch_size: b * gb + (self.rank + 1) * self.batch_size]
            yield [(i, self.epoch) for i in chunk]


def data_fingerprint(samples, root):
    """Names, slice indices, sizes and mtimes of every sample (what decides whether a latent cache is valid)."""
    root = Path(root)
    out = []
    for src, label in samples:
        src = as_source(src)
        st = os.stat(src.path)
        out.append([str(src.path.relative_to(root)), src.index, label, st.st_size, st.st_mtime_ns])
    return out


def cache_key(samples, root, image_size, random_flip, vae_identity, intensity=None):
    """Hex digest of everything the cached latents depend on (files, slices, size, flips, VAE, window)."""
    blob = json.dumps({"files": data_fingerprint(samples, root), "image_size": image_size,
                       "flip": bool(random_flip), "vae": vae_identity, "intensity": intensity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_latent_cache(path, key):
    """The cache dict at `path` if its key matches, else None."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return cache if isinstance(cache, dict) and cache.get("key") == key else None


@torch.no_grad()
def encode_dataset(samples, image_size, channels, encode, batch_size, random_flip, num_workers=0, opts=None):
    """Run `encode(images) -> (mean, std)` over every sample (and its mirror image if flips are on)."""
    ds = ImageDataset(samples, image_size, channels, opts=opts)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    out = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
    for x, _, _ in loader:
        m, s = encode(x)
        out["mean"].append(m.float().cpu())
        out["std"].append(s.float().cpu())
        if random_flip:
            m, s = encode(x.flip(-1))
            out["mean_flip"].append(m.float().cpu())
            out["std_flip"].append(s.float().cpu())
    return {k: (torch.cat(v) if v else None) for k, v in out.items()}
