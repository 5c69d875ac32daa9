"""Feature networks (FID Inception, VGG16 fc2, user TorchScript modules), one-pass extraction, feature cache.

Not run directly; `precision_recall.py` uses it. Every network takes a float32 batch in [0, 1]
(B x 3 x H x W, decoded once) and applies its own preprocessing, so one decoded batch feeds all of them.
Real-folder features are cached per network under a key made of the image list (names with the slice /
frame index, sizes, modification times), the decoding settings with the resolved intensity window and
the network's identity (weight file path, size, mtime; Inception's output dimension).
"""
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from tqdm import tqdm

from images import ImageFiles, UserError, collate_images
from inception import FID_WEIGHTS_FILE, FID_WEIGHTS_URL, FIDInceptionV3

CACHE_VERSION = 3  # 3: DICOM / NIfTI slices and intensity windows; 2: the one decoder of imaging.py
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# pytorch-fid's InceptionV3 wrapper stores the same layers as blocks.<i>.<j>; map them back.
_FID_BLOCK_NAMES = {
    "blocks.0.0.": "Conv2d_1a_3x3.", "blocks.0.1.": "Conv2d_2a_3x3.", "blocks.0.2.": "Conv2d_2b_3x3.",
    "blocks.1.0.": "Conv2d_3b_1x1.", "blocks.1.1.": "Conv2d_4a_3x3.",
    **{f"blocks.2.{i}.": f"Mixed_{n}." for i, n in enumerate(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e"])},
    **{f"blocks.3.{i}.": f"Mixed_{n}." for i, n in enumerate(["7a", "7b", "7c"])},
}


def default_cache_dir():
    """$EVAL_CACHE_DIR, else $XDG_CACHE_HOME/diffusion_eval, else ~/.cache/diffusion_eval."""
    if os.environ.get("EVAL_CACHE_DIR"):
        return Path(os.environ["EVAL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffusion_eval"


def file_identity(path):
    """Absolute path, size and modification time: cheap identity of a weights file for cache keys."""
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def load_state_dict(path, flag, trust=False):
    """torch.load a weights file safely (weights_only); unwrap {'state_dict': ...} and 'module.' prefixes."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as exc:
        if not trust and "Weights only load failed" in str(exc):
            raise UserError(f"{path} is not a plain checkpoint (it holds pickled Python objects, which can "
                            "run code when loaded). If you trust this file, pass --trust_checkpoint to load "
                            "it anyway.") from None
        raise UserError(f"{flag} {path} is not a PyTorch weights file ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{flag} {path} is not a state dict (a dict of tensors)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def _download_hint(what, file, url, flag):
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return (f"cannot load the {what} weights {file}: not in {hub} and the download failed (offline?). "
            f"Download {url} on a machine with internet access and pass {flag} /path/to/{file} "
            f"(or copy it into {hub})")


def build_inception(weights, trust=False, dims=2048):
    """FID Inception (pytorch-fid's `dims` output) with its weights from `weights` or the release download."""
    if weights:
        sd = load_state_dict(weights, "--inception_weights", trust)
    else:
        try:
            sd = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True, map_location="cpu",
                                                    weights_only=True)
        except Exception:
            raise UserError(_download_hint("FID Inception", FID_WEIGHTS_FILE, FID_WEIGHTS_URL,
                                           "--inception_weights")) from None
    for old, new in _FID_BLOCK_NAMES.items():
        sd = {(new + k[len(old):]) if k.startswith(old) else k: v for k, v in sd.items()}
    net = FIDInceptionV3(dims)
    try:
        missing, unexpected = net.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        raise UserError(f"--inception_weights {weights}: shapes do not match the FID Inception network "
                        f"({str(exc).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise UserError(f"--inception_weights {weights} is not a pytorch-fid Inception state dict "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]}); expected {FID_WEIGHTS_FILE}")
    return net.eval()


class VGGFc2(nn.Module):
    """torchvision VGG16 up to fc2 + ReLU (4096-d): resize to 224x224, ImageNet normalisation."""

    def __init__(self, vgg):
        super().__init__()
        self.vgg = vgg
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x):
        # antialias: large medical images are downsampled without aliasing (no effect when upsampling)
        x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        x = torch.flatten(self.vgg.avgpool(self.vgg.features(x)), 1)
        return self.vgg.classifier[:5](x)  # fc1, ReLU, dropout (off in eval), fc2, ReLU


def build_vgg(weights, trust=False):
    """VGG16 fc2 features with weights from `weights` or torchvision's IMAGENET1K_V1 download."""
    if weights:
        sd = load_state_dict(weights, "--vgg_weights", trust)
    else:
        w = torchvision.models.VGG16_Weights.IMAGENET1K_V1
        try:
            sd = w.get_state_dict(progress=True)
        except Exception:
            raise UserError(_download_hint("VGG16", Path(w.url).name, w.url, "--vgg_weights")) from None
    with torch.device("meta"):  # skip the random init of 138M parameters; the weights replace them
        vgg = torchvision.models.vgg16(weights=None)
    try:
        vgg.load_state_dict(sd, assign=True)
    except RuntimeError as exc:
        raise UserError(f"--vgg_weights {weights} is not a torchvision vgg16 state dict "
                        f"({str(exc).splitlines()[0][:200]})") from None
    return VGGFc2(vgg).eval()


class Scripted(nn.Module):
    """A user TorchScript module; outputs flattened to B x D (features or class logits)."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.flatten(out, 1)


def load_torchscript(path, flag):
    """torch.jit.load a TorchScript file (on CPU first, moved later)."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; it still loads fine
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise UserError(f"{flag} {path} is not a TorchScript module (save one with "
                        f"torch.jit.script(model).save(path)): {type(exc).__name__}") from None
    return Scripted(module).eval()


def net_identity(name, path, dims=None):
    """What makes a network's features differ: its kind, the weight file (or the standard download), the
    output dimension picked (Inception's --dims)."""
    ident = {"net": name, "weights": file_identity(path) if path else "standard-download"}
    if dims is not None:
        ident["dims"] = int(dims)
    return ident


def folder_key(root, rel_files, decoding, sources=None, opts=None):
    """Identity of an image folder's content for the cache: names (slice index included), sizes, mtimes,
    the decoding setting and the resolved intensity window (medical.ReadOptions after fit)."""
    entries = []
    for i, rel in enumerate(rel_files):
        src = sources[i] if sources is not None else None
        st = os.stat(src.path if src is not None else Path(root) / rel)
        entries.append([rel, None if src is None else src.index, st.st_size, st.st_mtime_ns])
    intensity = None
    if opts is not None:  # what changes the pixels (not the grouping regex)
        intensity = {"window": list(opts.window) if opts.window is not None else None,
                     "windows_2d": opts.windows_2d(), "slice_axis": opts.slice_axis,
                     "slice_range": list(opts.slice_range) if opts.slice_range else None}
    return {"version": CACHE_VERSION, "root": str(Path(root).resolve()), "files": entries,
            "decoding": decoding, "intensity": intensity}


def cache_path(cache_dir, fkey, ident):
    """The .npz holding one network's features of one folder state."""
    blob = json.dumps({"folder": fkey, "net": ident}, sort_keys=True).encode()
    return Path(cache_dir) / f"{ident['net']}-{hashlib.sha256(blob).hexdigest()[:24]}.npz"


def read_cache(path, n):
    """Cached features (N x D float32) or None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as f:
            feats = f["features"]
        return feats if feats.shape[0] == n else None
    except Exception:
        return None


def write_cache(path, feats):
    """Write atomically; a cache that cannot be written is only a lost speed-up (returns the error)."""
    tmp = Path(str(path) + f".tmp{os.getpid()}.npz")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, features=feats)
        os.replace(tmp, path)
        return None
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return f"could not write the feature cache {path}: {exc.strerror or exc}"


@torch.inference_mode()
def extract(paths, nets, batch_size, num_workers, device, desc, opts=None):
    """Run every net in `nets` (name -> module on device) over the images; one decode per image.

    paths: files or Sources (slices); opts: the fitted medical.ReadOptions (the intensity window).
    Returns name -> float32 array N x D, in the order of `paths`.
    """
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, opts), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda",
        persistent_workers=False)
    out = {name: None for name in nets}
    for idx, imgs, errors in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
        bad = [e for e in errors if e]
        if bad:
            raise UserError(bad[0] + "; remove or replace it")
        groups = {}
        for pos, img in enumerate(imgs):  # same-size images are resized together, as a batch
            groups.setdefault(tuple(img.shape), []).append(pos)
        for positions in groups.values():
            x = torch.stack([imgs[p] for p in positions]).to(device, non_blocking=True)
            x = x.float().div(255)  # exactly torchvision's ToTensor, which pytorch-fid uses
            rows = np.asarray([idx[p] for p in positions])
            for name, net in nets.items():
                f = net(x).float().cpu().numpy()
                if out[name] is None:
                    out[name] = np.zeros((len(paths), f.shape[1]), dtype=np.float32)
                out[name][rows] = f
    return out
