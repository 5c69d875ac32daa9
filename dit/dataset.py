"""Class-folder image data for DiT, a resumable epoch sampler, and the latent cache.

    data_root/<class_name>/*.png|jpg|...   (ImageNet-style; classes sorted by name -> labels 0..K-1)

Images become float tensors in [-1, 1] with the VAE's channel count (1 = grayscale kept grayscale) by the
repository's one image rule (imaging.py, vendored; "How images are read" in the top README): integers /
their type's maximum (16-bit never clipped), float must be in [0, 1], alpha dropped, shorter side resized
(antialiased bilinear) and centre-cropped. Horizontal flips are decided by the sampler from (seed, epoch,
index), so augmentation does not depend on DataLoader workers and survives a resume. DICOM and NIfTI files
(medical.py, vendored) give one image per 2-D file, DICOM frame or NIfTI slice, read through the intensity
window (medical.ReadOptions, fitted once on the whole data set; train.py stores it in every checkpoint).
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

import medical
from imaging import (ALL_EXTENSIONS, ImageError, check_image, decode_image, is_image_file, list_images,
                     resize_image)
from runtime import atomic_save, barrier
from utils import UserError


def scan_class_folders(root, opts=None):
    """(class_names, [(imaging.Source, label)]) of an ImageNet-style folder, one Source per 2-D file, DICOM
    frame or NIfTI slice; UserError on an unusable folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-path {root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.is_file() and is_image_file(p)]
        hint = " (images must sit in one sub-folder per class)" if loose else ""
        raise UserError(f"--data-path {root} has no class folders{hint}")
    samples = []
    for label, name in enumerate(classes):
        try:
            files = medical.expand(list_images(root / name, recursive=True), opts)
        except ImageError as e:
            raise UserError(str(e)) from None
        if not files:
            raise UserError(f"class folder {root / name} has no images ({', '.join(ALL_EXTENSIONS)})")
        samples += [(src, label) for src in files]
    return classes, samples


def verify_images(samples, opts=None):
    """Decode every image once (as training will); UserError naming the first bad file.
    Returns True when every image is grayscale (samples are then written as 1-channel PNGs)."""
    gray = True
    for src, _ in samples:
        try:
            gray = check_image(src, opts=opts).channels == 1 and gray
        except ImageError as e:
            raise UserError(str(e)) from None
    return gray


def load_image(src, channels, opts=None):
    """File / slice -> float32 array (H, W, channels) in [0, 1] by the one image rule (imaging.decode_image)."""
    try:
        return decode_image(src, channels, opts).permute(1, 2, 0).numpy()
    except ImageError as e:
        raise UserError(str(e)) from None


def center_crop_resize(x, size):
    """(C, H, W) -> (C, size, size): shorter side to size (antialiased bilinear), centre crop."""
    return resize_image(x, size)


class ImageFolderDataset(Dataset):
    """Items are (index, flip) pairs from ResumableSampler -> (image in [-1, 1], label).

    `sources` holds one imaging.Source per image, `samples` (str(source), label) pairs; `opts` the fitted
    medical.ReadOptions (a new run fits the window on the data once; a resumed run passes fit=False)."""

    def __init__(self, root, image_size, channels, verify=True, opts=None, fit=True):
        # channels: the VAE's; None until it is known (train.py checks the data before loading the VAE).
        # `grayscale` below is about the files (samples are then saved as 1-channel PNGs).
        self.root = str(root)
        opts = opts if opts is not None else medical.ReadOptions()
        self.classes, found = scan_class_folders(root, opts)
        self.sources = [src for src, _ in found]
        self.samples = [(str(src), label) for src, label in found]
        if fit:
            try:
                opts = opts.fit(self.sources)
            except (ImageError, ValueError) as e:
                raise UserError(str(e)) from None
        self.opts = opts
        self.grayscale = verify_images(found, opts) if verify else channels == 1
        self.image_size = image_size
        self.channels = channels

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """Image `index` as a (C, S, S) tensor in [-1, 1], unflipped."""
        x = torch.from_numpy(load_image(self.sources[index], self.channels, self.opts)).permute(2, 0, 1).contiguous()
        return center_crop_resize(x, self.image_size) * 2 - 1

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        x = self.load(index)
        if flip:
            x = x.flip(-1)
        return x, self.samples[index][1]


class CachedLatentDataset(Dataset):
    """Items (index, flip) -> (posterior mean, posterior std, label) from a latent cache, plus the REPA targets
    of that image (and flip) when `features` (N, 2, ...) is given."""

    def __init__(self, cache, labels, features=None):
        self.mean, self.std = cache["mean"], cache["std"]  # (N, 2, C, h, w); [:, 1] = flipped image
        self.labels = labels
        self.features = features

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, flip = item
        f = int(bool(flip))
        if self.features is None:
            return self.mean[index, f], self.std[index, f], self.labels[index]
        return self.mean[index, f], self.std[index, f], self.labels[index], self.features[index, f]


class ResumableSampler(Sampler):
    """This rank's (index, flip) pairs for an epoch: a permutation and flip bits drawn from
    (seed, epoch), cut to whole global batches and dealt round-robin to the ranks; set_epoch can skip
    the batches a resumed run already consumed."""

    def __init__(self, num_samples, rank, world_size, local_batch, seed, flip=True):
        self.n, self.rank, self.world = num_samples, rank, world_size
        self.local_batch, self.seed, self.flip = local_batch, seed, flip
        self.batches_per_epoch = num_samples // (world_size * local_batch)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip_batches=0):
        self.epoch, self.skip = epoch, skip_batches

    def order(self, epoch):
        """(permutation, flips) of an epoch, identical on every rank."""
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        perm = torch.randperm(self.n, generator=g)
        flips = torch.randint(0, 2, (self.n,), generator=g) if self.flip else torch.zeros(self.n, dtype=torch.long)
        return perm, flips

    def __iter__(self):
        perm, flips = self.order(self.epoch)
        used = perm[: self.batches_per_epoch * self.world * self.local_batch]
        mine = used[self.rank::self.world][self.skip * self.local_batch:]
        return iter([(int(i), bool(flips[i])) for i in mine])

    def __len__(self):
        return (self.batches_per_epoch - self.skip) * self.local_batch


# ----------------------------------------------------------------------------- latent cache
def data_fingerprint(samples, classes, image_size, channels, opts=None):
    """Hash of the image list (path or slice, size, mtime) + preprocessing (incl. an intensity window):
    changes when any file or the window changes. samples: (path or imaging.Source, label) pairs."""
    h = hashlib.sha256(json.dumps([classes, image_size, channels]).encode())
    if opts is not None and (opts.window is not None or opts.windows_2d()):  # 8-bit data: hash as before
        h.update(json.dumps(opts.to_config(), sort_keys=True).encode())
    for src, label in samples:
        st = os.stat(getattr(src, "path", src))
        h.update(f"{src}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def encode_posterior(vae, x):
    """(posterior mean, posterior std) of images x in [-1, 1] under the VAE (float32)."""
    dist = vae.encode(x).latent_dist
    return dist.mean.float().contiguous(), dist.std.float().contiguous()


def cache_path(results_dir, data_path, image_size, vae_name):
    """Where the latent cache of (data folder, image size, VAE) lives."""
    key = hashlib.sha256(json.dumps([os.path.abspath(data_path), image_size, vae_name]).encode())
    return Path(results_dir) / "latent_cache" / f"latents-{key.hexdigest()[:16]}.pt"


def build_cache(path, fingerprint, dataset, encode, rank, world, logger, words, meta=None):
    """Per-image tensors of the image and its mirror image, computed once and reused while `fingerprint` holds.

    encode(x) -> {name: (B, 2, ...) CPU tensor} for images x (B, C, S, S) in [-1, 1] ([:, 1]: of x.flip(-1));
    each rank encodes every world-th image, rank 0 merges the parts. words: (reusing, stale, encoding)
    messages, each formatted with path and n. Returns the cache (memory-mapped)."""
    reuse, stale, encoding = words
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt
            cache = {}
        if cache.get("fingerprint") == fingerprint:
            logger.info(reuse.format(path=path, n=len(dataset)))
            return cache
        logger.info(stale.format(path=path, n=len(dataset)))
    logger.info(encoding.format(path=path, n=len(dataset)))
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(dataset), world))
    parts, bs = {}, 32
    for i in range(0, len(mine), bs):
        x = torch.stack([dataset.load(j) for j in mine[i:i + bs]])
        for name, t in encode(x).items():
            parts.setdefault(name, []).append(t)
    part = path.with_name(path.name + f".part{rank}")
    atomic_save({"idx": torch.tensor(mine), **{k: torch.cat(v) for k, v in parts.items()}}, part)
    barrier()
    if rank == 0:
        pieces = [torch.load(path.with_name(path.name + f".part{r}"), weights_only=True) for r in range(world)]
        names = [k for k in pieces[0] if k != "idx"]
        full = {k: torch.empty(len(dataset), *pieces[0][k].shape[1:], dtype=pieces[0][k].dtype) for k in names}
        for prt in pieces:
            for k in names:
                full[k][prt["idx"]] = prt[k]
        atomic_save({"fingerprint": fingerprint, **full, **(meta or {})}, path)
        for r in range(world):
            path.with_name(path.name + f".part{r}").unlink()
    barrier()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
