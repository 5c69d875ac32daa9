"""Class-folder image data for DiT, a resumable epoch sampler, and the latent cache.

    data_root/<class_name>/*.png|jpg|...   (ImageNet-style; classes sorted by name -> labels 0..K-1)

Images become float tensors in [-1, 1] with the VAE's channel count (1 = grayscale kept grayscale) by the
repository's one image rule (imaging.py, vendored; "How images are read" in the top README): integers /
their type's maximum (16-bit never clipped), float must be in [0, 1], alpha dropped, shorter side resized
(antialiased bilinear) and centre-cropped. Horizontal flips are decided by the sampler from (seed, epoch,
index), so augmentation does not depend on DataLoader workers and survives a resume.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from imaging import IMAGE_EXTENSIONS, ImageError, check_image, decode_image, list_images, resize_image
from utils import UserError


def scan_class_folders(root):
    """(class_names, [(path, label)]) of an ImageNet-style folder; UserError on an unusable folder."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-path {root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS]
        hint = " (images must sit in one sub-folder per class)" if loose else ""
        raise UserError(f"--data-path {root} has no class folders{hint}")
    samples = []
    for label, name in enumerate(classes):
        files = list_images(root / name, recursive=True)
        if not files:
            raise UserError(f"class folder {root / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [(str(p), label) for p in files]
    return classes, samples


def verify_images(samples):
    """Decode every file once (as training will); UserError naming the first bad file.
    Returns True when every image is grayscale (samples are then written as 1-channel PNGs)."""
    gray = True
    for path, _ in samples:
        try:
            gray = check_image(path).channels == 1 and gray
        except ImageError as e:
            raise UserError(str(e)) from None
    return gray


def load_image(path, channels):
    """File -> float32 array (H, W, channels) in [0, 1] by the one image rule (imaging.decode_image)."""
    try:
        return decode_image(path, channels).permute(1, 2, 0).numpy()
    except ImageError as e:
        raise UserError(str(e)) from None


def center_crop_resize(x, size):
    """(C, H, W) -> (C, size, size): shorter side to size (antialiased bilinear), centre crop."""
    return resize_image(x, size)


class ImageFolderDataset(Dataset):
    """Items are (index, flip) pairs from ResumableSampler -> (image in [-1, 1], label)."""

    def __init__(self, root, image_size, channels, verify=True):
        # channels: the VAE's; None until it is known (train.py checks the data before loading the VAE).
        # `grayscale` below is about the files (samples are then saved as 1-channel PNGs).
        self.root = str(root)
        self.classes, self.samples = scan_class_folders(root)
        self.grayscale = verify_images(self.samples) if verify else channels == 1
        self.image_size = image_size
        self.channels = channels

    def __len__(self):
        return len(self.samples)

    def load(self, index):
        """Image `index` as a (C, S, S) tensor in [-1, 1], unflipped."""
        path, _ = self.samples[index]
        x = torch.from_numpy(load_image(path, self.channels)).permute(2, 0, 1).contiguous()
        return center_crop_resize(x, self.image_size) * 2 - 1

    def __getitem__(self, item):
        index, flip = item if isinstance(item, tuple) else (item, False)
        x = self.load(index)
        if flip:
            x = x.flip(-1)
        return x, self.samples[index][1]


class CachedLatentDataset(Dataset):
    """Items (index, flip) -> (posterior mean, posterior std, label) from a latent cache."""

    def __init__(self, cache, labels):
        self.mean, self.std = cache["mean"], cache["std"]  # (N, 2, C, h, w); [:, 1] = flipped image
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, item):
        index, flip = item
        f = int(bool(flip))
        return self.mean[index, f], self.std[index, f], self.labels[index]


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
def data_fingerprint(samples, classes, image_size, channels):
    """Hash of the file list (path, size, mtime) + preprocessing: changes when any file changes."""
    h = hashlib.sha256(json.dumps([classes, image_size, channels]).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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
