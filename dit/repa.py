"""REPA: representation alignment (Yu et al. 2024) for DiT training (`train.py --repa_encoder SPEC`); not a script.

A frozen vision encoder sees the clean images of the batch; a small MLP (the projector) maps the DiT's hidden
tokens after block `--repa_depth` to the encoder's feature size, and the loss gains
`--repa_weight` * mean over tokens of -cos(projected token, encoder token). Written from the paper (sec. 3):
the projector is a 3-layer MLP with SiLU (hidden width 2048 there), the encoder's patch tokens are the
targets, and the alignment only touches the first blocks, so sampling uses the DiT alone.

SPEC is either
- a TorchScript file (torch.jit.load): images in [0, 1] of shape (N, C, H, W), C the data's channels (1 for
  grayscale data), H = W = --image_size -> features (N, D) or patch tokens (N, T, D) with T a square (an
  extra leading class token, T = s*s + 1, is dropped); it does its own resizing / normalisation, or
- a torch.hub id `owner/repo[:ref]:entry`, e.g. `facebookresearch/dinov2:dinov2_vitb14` (online, or in the
  hub cache): images are made RGB, resized to 224 px and ImageNet-normalised, and DINOv2's normalised patch
  tokens (`forward_features(...)["x_norm_patchtokens"]`) are the targets.
Encoder tokens are pooled (area average; bilinear when the encoder's grid is the coarser) to the DiT's token
grid; an encoder that
gives one vector per image is compared with the mean of the projected tokens.

The encoder is never saved (the checkpoint stores SPEC and a fingerprint of it); the projector's weights are
stored under "repa_projector", never in "model" / "ema", so the exported DiT keeps the official layout.
"""
import hashlib
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset import build_cache, cache_path, data_fingerprint
from models import model_config
from runtime import UserError, autocast

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?:[\w.-]+$")  # owner/repo[:ref]:entry
HUB_SIZE = 224  # DINOv2's training resolution (16 x 16 patches of 14 px)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_PROJECTOR_WIDTH = 2048  # the paper's


def default_depth(depth):
    """--repa_depth default: a third of the blocks (the paper aligns block 8 of SiT-XL's 28), at least 1."""
    return max(1, depth // 3)


def default_projector_width(hidden):
    """--repa_projector_dim default: the paper's 2048, or 4x the DiT width when that is smaller (tiny models)."""
    return min(MAX_PROJECTOR_WIDTH, 4 * hidden)


class HubEncoder(nn.Module):
    """A torch.hub backbone behind the TorchScript contract: images in [0, 1] (N, C, H, W) -> patch tokens."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(HUB_SIZE, HUB_SIZE), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        if hasattr(self.net, "forward_features"):
            out = self.net.forward_features(x)
            if isinstance(out, dict):
                out = out.get("x_norm_patchtokens", next(iter(out.values())))
            return out
        return self.net(x)


def load_encoder(spec, device):
    """The frozen encoder named by --repa_encoder (eval mode, no gradients); one-line UserError otherwise."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            enc = torch.jit.load(str(path), map_location=device)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise UserError(f"--repa_encoder {spec}: not a TorchScript file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); write one with "
                            f"torch.jit.save(torch.jit.script(encoder), path)") from None
    elif HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        repo, entry = spec.rsplit(":", 1)
        try:
            enc = HubEncoder(torch.hub.load(repo, entry, trust_repo=True, verbose=False)).to(device)
        except Exception as e:  # noqa: BLE001 - offline, unknown repo or entry
            raise UserError(f"--repa_encoder {spec}: cannot load it from torch.hub ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''}); offline, pass a TorchScript "
                            f"file of the encoder instead") from None
    else:
        raise UserError(f"--repa_encoder {spec}: no such file, and not a torch.hub id (owner/repo:entry, e.g. "
                        f"facebookresearch/dinov2:dinov2_vitb14): pass a TorchScript file or a hub id")
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def fingerprint(spec):
    """What identifies the encoder: the bytes of a TorchScript file, or the hub id itself."""
    path = Path(spec).expanduser()
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()
    return "hub:" + spec


def _grid_side(tokens):
    """(side, drop_first) of T patch tokens: T = side^2, or side^2 + 1 with a leading class token."""
    for drop in (0, 1):
        side = math.isqrt(max(tokens - drop, 0))
        if side > 0 and side * side == tokens - drop:
            return side, bool(drop)
    return None, False


def probe(encoder, channels, image_size, device, spec):
    """(feature dim D, tokens per image or None for one vector) of the encoder on one grey image; one-line
    UserError when it does not take (1, C, S, S) images in [0, 1] or returns something else."""
    x = torch.full((1, channels, image_size, image_size), 0.5, device=device)
    try:
        with torch.no_grad():
            out = encoder(x)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--repa_encoder {spec}: it fails on a (1, {channels}, {image_size}, {image_size}) image "
                        f"in [0, 1] ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not torch.is_tensor(out) or out.dim() not in (2, 3) or out.shape[0] != 1:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"--repa_encoder {spec}: it returns {shape}; expected features (N, D) or tokens (N, T, D)")
    if out.dim() == 3 and _grid_side(out.shape[1])[0] is None:
        raise UserError(f"--repa_encoder {spec}: its {out.shape[1]} tokens are not a square grid (T = s*s, or "
                        f"s*s + 1 with a class token)")
    return int(out.shape[-1]), (int(out.shape[1]) if out.dim() == 3 else None)


def to_grid(feats, grid):
    """Encoder output (N, T, D) -> unit-length targets (N, grid*grid, D) on the DiT token grid; (N, D) -> (N, D).

    Unit length: the loss is a cosine, and normalised targets can be cached in float16 without overflow."""
    feats = feats.float()
    if feats.dim() == 3:
        n, t, d = feats.shape
        side, drop = _grid_side(t)
        feats = feats[:, 1:] if drop else feats
        if side != grid:
            # Shrinking: each DiT token gets the mean of the encoder tokens over its patch (adaptive average
            # pooling); growing (an encoder coarser than the DiT's grid): bilinear.
            f = feats.transpose(1, 2).reshape(n, d, side, side)
            f = (F.adaptive_avg_pool2d(f, grid) if side > grid
                 else F.interpolate(f, size=(grid, grid), mode="bilinear", align_corners=False))
            feats = f.flatten(2).transpose(1, 2)
    return F.normalize(feats, dim=-1)


@torch.no_grad()
def targets(encoder, images, grid):
    """Targets of images in [-1, 1] (the training batch): the encoder sees them in [0, 1], in float32."""
    return to_grid(encoder((images.float() + 1) / 2), grid)


def make_projector(hidden, enc_dim, width):
    """The paper's projector: Linear-SiLU-Linear-SiLU-Linear from the DiT width to the encoder's."""
    return nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, enc_dim))


def loss(projected, target):
    """Mean negative cosine similarity (over images and tokens); one-vector targets meet the token mean."""
    if target.dim() == 2:
        projected = projected.mean(dim=1)
    return -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


class WithProjector(nn.Module):
    """The DiT and the projector as one module for DDP (both get their gradients averaged over ranks);
    forward -> (DiT output, projected tokens after block `depth`). Never saved: its parts are."""

    def __init__(self, dit, projector, depth):
        super().__init__()
        self.dit, self.projector, self.depth = dit, projector, int(depth)

    def forward(self, x, t, y):
        out, tokens = self.dit(x, t, y, return_tokens_at=self.depth)
        return out, self.projector(tokens)


# ----------------------------------------------------------------------------- train.py
def setup(args, info, latent_size, device, logger, resumed):
    """The frozen REPA encoder (or None) and its numbers in args (checked against the model, stored in every
    checkpoint): encoder dim and tokens, alignment depth, weight, projector width."""
    if args.repa_encoder is None:
        return None
    try:
        encoder = load_encoder(args.repa_encoder, device)
    except UserError as e:
        if resumed:  # the spec came from the checkpoint
            raise UserError(f"{e} (the run being resumed uses it: pass --repa_encoder with its new path)") from None
        raise
    fp = fingerprint(args.repa_encoder)
    if resumed and args.repa_encoder_fingerprint not in (None, fp):
        raise UserError(f"--repa_encoder {args.repa_encoder}: not the encoder the run being resumed was trained "
                        f"with (its contents changed): restore that file, or start a new run")
    args.repa_encoder_fingerprint = fp
    if Path(args.repa_encoder).expanduser().is_file():  # stored absolute: a resume from another folder finds it
        args.repa_encoder = str(Path(args.repa_encoder).expanduser().resolve())
    dim, tokens = probe(encoder, info["image_channels"], args.image_size, device, args.repa_encoder)
    stored = (args.repa_encoder_dim, args.repa_encoder_tokens)
    if resumed and args.repa_encoder_dim is not None and stored != (dim, tokens):
        raise UserError(f"--repa_encoder {args.repa_encoder} now gives features of another shape than when the run "
                        f"started: restore the encoder, or start a new run")
    args.repa_encoder_dim, args.repa_encoder_tokens = dim, tokens
    cfg = model_config(args.model)
    args.repa_depth = args.repa_depth or default_depth(cfg["depth"])
    if args.repa_depth > cfg["depth"]:
        raise UserError(f"--repa-depth {args.repa_depth}: {args.model} has {cfg['depth']} blocks")
    args.repa_weight = 0.5 if args.repa_weight is None else args.repa_weight
    args.repa_projector_dim = args.repa_projector_dim or default_projector_width(cfg["hidden_size"])
    grid = latent_size // cfg["patch_size"]
    logger.info(f"REPA: encoder {args.repa_encoder} ({'one vector' if tokens is None else f'{tokens} tokens'} of "
                f"dim {dim} per image -> the {grid}x{grid} token grid), tokens after block {args.repa_depth}, "
                f"projector width {args.repa_projector_dim}, weight {args.repa_weight:g}")
    return encoder


def batch_targets(batch, encoder, cached, grid, device, precision):
    """The REPA targets of a batch: cached ones, or the frozen encoder on its (flipped) clean images."""
    if cached:
        return batch[3].to(device, non_blocking=True).float()
    with autocast(precision, device):
        return targets(encoder, batch[0].to(device, non_blocking=True), grid)


def build_cache_of(dataset, encoder, args, grid, rank, world, device, precision, logger):
    """The REPA targets of every image and its mirror (float16 unit vectors), computed once like the latents."""
    key = [args.image_size, args.repa_encoder_fingerprint, grid]
    path = cache_path(args.results_dir, dataset.root, args.image_size, "repa" + json.dumps(key))
    data_key = data_fingerprint(list(zip(dataset.sources, (lab for _, lab in dataset.samples))), dataset.classes,
                                args.image_size, dataset.channels, dataset.opts) + json.dumps(key)

    def encode(x):
        x = x.to(device)
        with autocast(precision, device):
            pair = [targets(encoder, x, grid), targets(encoder, x.flip(-1), grid)]
        return {"feat": torch.stack(pair, 1).half().cpu()}

    words = ("Reusing cached REPA targets {path} ({n} images)", "REPA target cache {path} is stale (data or "
             "encoder changed): recomputing", "Computing the REPA targets of {n} images (and their mirror images) "
             "into {path}")
    return build_cache(path.with_name(path.name.replace("latents-", "repa-")), data_key, dataset, encode, rank,
                       world, logger, words)["feat"]
