"""DDPM networks and noise process: a UNet with self-attention, the Gaussian diffusion (linear / cosine
schedule, DDPM ancestral, DDIM and DPM-Solver++(2M) sampling, classifier-free guidance, min-SNR-gamma loss
weights) and an EMA of the weights.

    from models import UNet, UNet_conditional, Diffusion, EMA, rebuild_model
    model = UNet_conditional(num_classes=10, img_size=64)         # default: 3 channels, width 64
    images = Diffusion(img_size=64, device="cpu").sample(model, n=4, labels=torch.arange(4), cfg_scale=3)
    old = UNet_conditional(num_classes=10, img_size=64, arch="dome272")  # layout of converted checkpoints

`arch="dome272"` is the layout of dome272/Diffusion-Models-pytorch's UNet (and of its variant with an
`attn_threshold`), whose checkpoints convert_checkpoint.py turns into ours; `load_state_dict` names the
constructor arguments a checkpoint needs instead of printing a size-mismatch traceback.

The UNet is written here rather than taken from diffusers because the spec's `UNet_conditional(...)`
signature and state-dict layout are our public interface; the sampler is hand-written because every
image gets its own seeded noise stream (output independent of batch size), which the diffusers
schedulers' shared-noise step does not give for a whole trajectory without extra plumbing. DPM-Solver++(2M)
lives in the same loop, not in diffusers' DPMSolverMultistepScheduler, for the same reason and so that it
shares DDIM's respaced timestep grid, v -> eps conversion, x0 clipping, guidance and image conditions (its
update is a few lines; the scheduler would bring its own grid and final-step conventions).
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime import EMA as _RuntimeEMA

from utils import UserError

COND_MODES = ("concat", "spade")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = ("ddpm", "ddim", "dpmsolver")
# Default steps of the few-step samplers (ddpm: all T). DPM-Solver++(2M) is second order: its 25 steps land
# ~5x closer to the exact ODE solution than DDIM's 50 on a Gaussian-data oracle (tests/test_ddpm_objectives.py).
DEFAULT_STEPS = {"ddim": 50, "dpmsolver": 25}

# Architecture presets: what differs between our default UNet and dome272's layout. Neither changes a
# tensor shape except where attention sits and the time MLP, so load_state_dict can tell them apart.
ARCHS = {
    "default": dict(attn_heads=None, norm_groups=None, time_mlp=True, attn_threshold=None),
    # 4 heads at every width, GroupNorm(1, C), raw sinusoidal time encoding, attention at every level
    # whose side is <= attn_threshold (64 in both dome272's code and its variant; full resolution included).
    "dome272": dict(attn_heads=4, norm_groups=1, time_mlp=False, attn_threshold=64),
}


class CheckpointMismatch(UserError, RuntimeError):
    """A state dict that does not fit the model; RuntimeError too, like torch's own load_state_dict error."""


def _groups(ch, norm_groups=None):
    """GroupNorm groups: 32 when possible, fewer for tiny widths (or a fixed count, e.g. 1)."""
    return norm_groups or math.gcd(32, ch)


def sinusoidal_embedding(t, dim):
    """Transformer-style sinusoidal embedding of (integer) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def pow_sinusoidal_embedding(t, dim):
    """The same encoding with the frequencies computed as 1 / 10000**(2i/dim) (dim even).

    Mathematically equal to sinusoidal_embedding, but exp(-ln(1e4) x) and 1e4**-x differ by up to 6e-5 after
    multiplying by t ~ 1000 in float32; converted dome272 checkpoints use this form to match that code."""
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=t.device).float() / dim))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class SPADE(nn.Module):
    """Spatially-adaptive modulation of a normalised feature map by the condition (Park et al. 2019).

    h * (1 + gamma(c)) + beta(c), with c the condition average-pooled to h's size (exact for the UNet's
    power-of-two sizes; a one-hot mask becomes label fractions). gamma and beta start at zero, so an
    untrained SPADE UNet is the plain UNet."""

    def __init__(self, cond_channels, ch, hidden=32):
        super().__init__()
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.SiLU())
        self.gamma = nn.Conv2d(hidden, ch, 3, padding=1)
        self.beta = nn.Conv2d(hidden, ch, 3, padding=1)
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h, cond):
        c = cond if cond.shape[-2:] == h.shape[-2:] else F.adaptive_avg_pool2d(cond, h.shape[-2:])
        c = self.shared(c.to(h.dtype))
        return h * (1 + self.gamma(c)) + self.beta(c)


class DoubleConv(nn.Module):
    """conv-norm-GELU-conv-norm, optionally residual (needs in == out); with spade_channels, each norm is
    followed by a SPADE modulation from the condition."""

    def __init__(self, c_in, c_out, mid=None, residual=False, groups=None, spade_channels=0):
        super().__init__()
        mid = mid or c_out
        self.residual = residual
        self.net = nn.Sequential(
            nn.Conv2d(c_in, mid, 3, padding=1, bias=False), nn.GroupNorm(_groups(mid, groups), mid), nn.GELU(),
            nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.GroupNorm(_groups(c_out, groups), c_out))
        self.spade = nn.ModuleList([SPADE(spade_channels, mid), SPADE(spade_channels, c_out)]) \
            if spade_channels else None

    def forward(self, x, cond=None):
        if self.spade is None:
            h = self.net(x)
        else:
            n = self.net
            h = n[2](self.spade[0](n[1](n[0](x)), cond))
            h = self.spade[1](n[4](n[3](h)), cond)
        return F.gelu(x + h) if self.residual else h


def _run(seq, x, cond):
    """Apply a Sequential whose DoubleConv members take the condition."""
    for m in seq:
        x = m(x, cond) if isinstance(m, DoubleConv) else m(x)
    return x


class Down(nn.Module):
    """Halve the resolution, two conv blocks, add the projected time(+class) embedding."""

    def __init__(self, c_in, c_out, emb_dim, groups=None, spade=0):
        super().__init__()
        self.conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(c_in, c_in, residual=True, groups=groups,
                                                              spade_channels=spade),
                                  DoubleConv(c_in, c_out, groups=groups, spade_channels=spade))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))

    def forward(self, x, emb, cond=None):
        return _run(self.conv, x, cond) + self.emb(emb)[:, :, None, None]


class Up(nn.Module):
    """Double the resolution, concatenate the skip, two conv blocks, add the embedding."""

    def __init__(self, c_in, c_out, emb_dim, groups=None, spade=0):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(DoubleConv(c_in, c_in, residual=True, groups=groups, spade_channels=spade),
                                  DoubleConv(c_in, c_out, c_in // 2, groups=groups, spade_channels=spade))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))

    def forward(self, x, skip, emb, cond=None):
        x = torch.cat([skip, self.up(x)], dim=1)
        return _run(self.conv, x, cond) + self.emb(emb)[:, :, None, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions + feed-forward (pre-norm, residual)."""

    def __init__(self, ch, head_dim=32, heads=None):
        super().__init__()
        self.heads = heads or max(1, ch // head_dim)
        if ch % self.heads:
            raise UserError(f"attention width {ch} is not divisible by {self.heads} heads")
        self.norm = nn.LayerNorm(ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = nn.Linear(ch, ch)
        self.ff = nn.Sequential(nn.LayerNorm(ch), nn.Linear(ch, ch), nn.GELU(), nn.Linear(ch, ch))

    def forward(self, x):
        b, c, h, w = x.shape
        seq = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(self.norm(seq)).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        # Flash / memory-efficient kernels on GPU keep attention at 128x128 positions affordable.
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        seq = seq + self.proj(att)
        seq = seq + self.ff(seq)
        return seq.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """UNet noise predictor eps(x_t, t[, y]) for square images whose side is divisible by 8.

    Widths base*(1,2,4,4) at resolutions 1, 1/2, 1/4, 1/8, a bottleneck of width base*8, and
    self-attention at 1/2, 1/4 and 1/8 (not at full resolution, where it would cost (H*W)^2).
    attn_threshold=N instead puts attention at each of the six levels (sa1..sa6, sa6 at full resolution)
    whose side is <= N. arch="dome272" is the layout of that code (see ARCHS); it sets attn_threshold=64
    unless given."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, img_size=64, base_channels=64, num_classes=None,
                 device=None, arch="default", attn_threshold=None, cond_channels=0, cond_mode="concat"):
        super().__init__()
        if img_size % 8 != 0 or img_size < 8:
            raise UserError(f"image size {img_size} is not divisible by 8 (the UNet halves it 3 times); "
                            f"use e.g. {max(8, img_size // 8 * 8)} or {img_size // 8 * 8 + 8}")
        if min(c_in, c_out) < 1 or (not cond_channels and (c_in not in (1, 3) or c_out not in (1, 3))):
            raise UserError(f"channels must be 1 or 3, got c_in={c_in} c_out={c_out}")
        if cond_mode not in COND_MODES:
            raise UserError(f"--cond_mode {cond_mode!r} is unknown (use {' or '.join(COND_MODES)})")
        if arch not in ARCHS:
            raise UserError(f"arch {arch!r} is unknown (use one of {', '.join(ARCHS)})")
        opts = dict(ARCHS[arch])
        if attn_threshold is not None:
            opts["attn_threshold"] = int(attn_threshold)
        if not opts["time_mlp"] and time_dim % 2:
            raise UserError(f"arch={arch!r} needs an even time_dim, got {time_dim}")
        b, g, heads, thr = base_channels, opts["norm_groups"], opts["attn_heads"], opts["attn_threshold"]
        self.c_in, self.c_out, self.img_size, self.time_dim = c_in, c_out, img_size, time_dim
        self.base_channels, self.num_classes = b, num_classes
        self.arch, self.attn_threshold = arch, thr
        # An image condition: concatenated to the input, or injected by SPADE after every normalisation.
        self.cond_channels, self.cond_mode = int(cond_channels), cond_mode
        cat = self.cond_channels if cond_mode == "concat" else 0
        sp = self.cond_channels if cond_mode == "spade" else 0

        def attn(ch, side, default_on):
            on = default_on if thr is None else side <= thr
            return SelfAttention(ch, heads=heads) if on else nn.Identity()  # Identity: no state-dict keys

        s = img_size
        # SPADE modulates the bottleneck and the decoder only (the encoder sees the noisy image), as in the
        # semantic diffusion model of Wang et al. (2022): half the cost of modulating every block.
        self.inc = DoubleConv(c_in + cat, b, groups=g)
        self.down1, self.sa1 = Down(b, 2 * b, time_dim, g), attn(2 * b, s // 2, True)
        self.down2, self.sa2 = Down(2 * b, 4 * b, time_dim, g), attn(4 * b, s // 4, True)
        self.down3, self.sa3 = Down(4 * b, 4 * b, time_dim, g), attn(4 * b, s // 8, True)
        self.bot1 = DoubleConv(4 * b, 8 * b, groups=g, spade_channels=sp)
        self.bot2 = DoubleConv(8 * b, 8 * b, groups=g, spade_channels=sp)
        self.bot3 = DoubleConv(8 * b, 4 * b, groups=g, spade_channels=sp)
        self.up1, self.sa4 = Up(8 * b, 2 * b, time_dim, g, sp), attn(2 * b, s // 4, True)
        self.up2, self.sa5 = Up(4 * b, b, time_dim, g, sp), attn(b, s // 2, True)
        self.up3, self.sa6 = Up(2 * b, b, time_dim, g, sp), attn(b, s, False)
        self.outc = nn.Conv2d(b, c_out, 1)
        if self.cond_channels:
            # A linear 1x1 path from the input (noisy target + condition) to the output. The first block's
            # GroupNorm (one channel per group at small widths) removes each map's mean, so without it the
            # network cannot see the mean of x_t or of the condition, and its noise estimate is off by a
            # constant that DDIM amplifies at large t into a brightness shift (seen in super-resolution).
            self.input_skip = nn.Conv2d(c_in + self.cond_channels, c_out, 1)
            nn.init.zeros_(self.input_skip.weight)
            nn.init.zeros_(self.input_skip.bias)
        if opts["time_mlp"]:
            self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            self.time_encoding = sinusoidal_embedding
        else:
            self.time_mlp, self.time_encoding = nn.Identity(), pow_sinusoidal_embedding
        if num_classes is not None:
            # Index num_classes is the learned "no class" token used for classifier-free guidance.
            self.label_emb = nn.Embedding(num_classes + 1, time_dim)
        if device is not None:
            self.to(device)

    def config(self):
        """Plain dict that rebuild_model() turns back into this architecture."""
        cfg = {"c_in": self.c_in, "c_out": self.c_out, "img_size": self.img_size, "time_dim": self.time_dim,
               "base_channels": self.base_channels, "num_classes": self.num_classes}
        if self.arch != "default" or self.attn_threshold is not None:  # older configs lack these keys
            cfg.update(arch=self.arch, attn_threshold=self.attn_threshold)
        if self.cond_channels:
            cfg.update(cond_channels=self.cond_channels, cond_mode=self.cond_mode)
        return cfg

    def embed(self, t, y=None, class_emb=None):
        """Time embedding, plus the class embedding for conditional models (y=None -> 'no class').

        class_emb (N, time_dim) replaces label_emb(y) (class interpolation: a mix of two classes' rows)."""
        emb = self.time_mlp(self.time_encoding(t, self.time_dim))
        if class_emb is not None:
            return emb + class_emb
        if self.num_classes is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, t, y=None, cond=None, class_emb=None):
        """Noise prediction; cond = the encoded condition (N, cond_channels, H, W), None = the null condition;
        class_emb: see embed (None: the embedding of y)."""
        emb = self.embed(t, y, class_emb)
        c = None
        if self.cond_channels:
            c = cond if cond is not None else x.new_zeros((x.shape[0], self.cond_channels, *x.shape[-2:]))
            if c.shape[1] != self.cond_channels or c.shape[-2:] != x.shape[-2:]:
                raise UserError(f"the condition has shape {tuple(c.shape[1:])}; this model takes "
                                f"({self.cond_channels}, {x.shape[-2]}, {x.shape[-1]})")
            xc = torch.cat([x, c.to(x.dtype)], dim=1)
            skip = self.input_skip(xc)
            if self.cond_mode == "concat":
                x, c = xc, None
        x1 = self.inc(x)
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.sa3(self.down3(x3, emb))
        x4 = self.bot3(self.bot2(self.bot1(x4, c), c), c)
        x = self.sa4(self.up1(x4, x3, emb, c))
        x = self.sa5(self.up2(x, x2, emb, c))
        x = self.sa6(self.up3(x, x1, emb, c))
        return self.outc(x) if not self.cond_channels else self.outc(x) + skip

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """torch's load_state_dict, but a checkpoint of another architecture fails with one sentence
        naming the constructor arguments it needs (e.g. c_in=1, c_out=1 for a grayscale run)."""
        problem = checkpoint_mismatch(self, state_dict, strict)
        if problem:
            raise CheckpointMismatch(problem)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class UNet_conditional(UNet):  # noqa: N801  (name fixed by the spec)
    """Class-conditional UNet (learned class embedding + a null token for classifier-free guidance)."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, num_classes=None, img_size=64, base_channels=64,
                 device=None, arch="default", attn_threshold=None, cond_channels=0, cond_mode="concat"):
        if num_classes is None or num_classes < 1:
            raise UserError("UNet_conditional needs num_classes >= 1")
        super().__init__(c_in, c_out, time_dim, img_size, base_channels, num_classes, device, arch, attn_threshold,
                         cond_channels, cond_mode)


def rebuild_model(cfg):
    """Build the UNet described by a stored config dict (see UNet.config)."""
    kw = {k: cfg[k] for k in ("c_in", "c_out", "img_size", "time_dim", "base_channels")}
    kw.update(arch=cfg.get("arch") or "default", attn_threshold=cfg.get("attn_threshold"),
              cond_channels=int(cfg.get("cond_channels") or 0), cond_mode=cfg.get("cond_mode") or "concat")
    if cfg.get("num_classes"):
        return UNet_conditional(num_classes=int(cfg["num_classes"]), **kw)
    return UNet(**kw)


# ---------------------------------------------------------------- reading a state dict's architecture
ATTN_LEVELS = {"sa1": 2, "sa2": 4, "sa3": 8, "sa4": 4, "sa5": 2, "sa6": 1}  # image side / feature-map side


def infer_config(sd, img_size):
    """Constructor arguments of our UNet that a state dict of our layout needs (img_size is not stored in
    the weights, so it is taken as given). Raises CheckpointMismatch for state dicts of other models."""
    if "inc.net.0.weight" not in sd or "outc.weight" not in sd:
        raise CheckpointMismatch(f"not a state dict of this DDPM UNet ({_describe_keys(sd)})")
    w = sd["inc.net.0.weight"]
    c_out = int(sd["outc.weight"].shape[0])
    spade = sd.get("up1.conv.0.spade.0.shared.0.weight")
    # The target is generated in its own channels (c_in == c_out), so extra input channels are a concatenated condition.
    cond = int(spade.shape[1]) if spade is not None else max(0, int(w.shape[1]) - c_out)
    cfg = {"c_in": int(w.shape[1]) - (0 if spade is not None else cond), "c_out": c_out, "img_size": int(img_size),
           "base_channels": int(w.shape[0]), "time_dim": int(sd["down1.emb.1.weight"].shape[1]) if
           "down1.emb.1.weight" in sd else 256,
           "num_classes": int(sd["label_emb.weight"].shape[0]) - 1 if "label_emb.weight" in sd else None}
    present = {name for name in ATTN_LEVELS if f"{name}.qkv.weight" in sd}
    arch = "default" if "time_mlp.0.weight" in sd else "dome272"
    thr = None
    if present != attention_levels(arch, None, img_size):
        sides = {n: img_size // d for n, d in ATTN_LEVELS.items()}
        thr = max((sides[n] for n in present), default=0)
        if attention_levels(arch, thr, img_size) != present:
            raise CheckpointMismatch(f"the checkpoint has attention at {', '.join(sorted(present)) or 'no level'}, "
                                     f"which no attn_threshold gives for {img_size}x{img_size} images; "
                                     f"check the image size it was trained at")
    cfg.update(arch=arch, attn_threshold=thr)
    if cond:
        cfg.update(cond_channels=cond, cond_mode="spade" if spade is not None else "concat")
    return cfg


def attention_levels(arch, attn_threshold, img_size):
    """Names of the attention blocks (sa1..sa6) a UNet of this layout has."""
    thr = ARCHS[arch]["attn_threshold"] if attn_threshold is None else attn_threshold
    if thr is None:
        return set(ATTN_LEVELS) - {"sa6"}
    return {n for n, d in ATTN_LEVELS.items() if img_size // d <= thr}


def _describe_keys(sd):
    """A few of a mapping's keys, for error messages."""
    if not isinstance(sd, dict) or not sd:
        return f"got {type(sd).__name__}" + (" (empty)" if isinstance(sd, dict) else "")
    keys = [str(k) for k in list(sd)[:3]]
    return f"its keys start with {', '.join(repr(k) for k in keys)}"


def _call(cfg):
    """The constructor call that builds cfg, written as the user would type it."""
    name = "UNet_conditional" if cfg["num_classes"] else "UNet"
    args = [f"num_classes={cfg['num_classes']}"] if cfg["num_classes"] else []
    args.append(f"img_size={cfg['img_size']}")
    for k, default in (("c_in", 3), ("c_out", 3), ("base_channels", 64), ("time_dim", 256)):
        if cfg[k] != default:
            args.append(f"{k}={cfg[k]}")
    if cfg["arch"] != "default":
        args.append(f"arch={cfg['arch']!r}")
    if cfg["attn_threshold"] is not None:
        args.append(f"attn_threshold={cfg['attn_threshold']}")
    if cfg.get("cond_channels"):
        args.append(f"cond_channels={cfg['cond_channels']}, cond_mode={cfg['cond_mode']!r}")
    return f"{name}({', '.join(args)})"


def checkpoint_mismatch(model, sd, strict=True):
    """None if sd loads into model, else one sentence saying why and what to build instead."""
    if not isinstance(sd, dict):
        return f"expected a state dict, got {type(sd).__name__}"
    own = model.state_dict()
    keys_differ = strict and set(sd) != set(own)
    shapes_differ = any(k in sd and torch.is_tensor(sd[k]) and sd[k].shape != v.shape for k, v in own.items())
    if not keys_differ and not shapes_differ:
        return None
    if "model_type" in sd:
        what = "a train_state.pt" if "model" in sd else f"a {sd['model_type']!r} checkpoint"
        return f"this is {what}, not a model state dict: load its ['model'] (or ['ema']) entry"
    if any(str(k).startswith(("module.", "_orig_mod.")) for k in sd):
        return ("the keys carry a 'module.' / '_orig_mod.' prefix (a DDP- or compile-wrapped model): strip it, "
                "e.g. {k.removeprefix('module.'): v for k, v in sd.items()}")
    if "inc.double_conv.0.weight" in sd:
        return ("this is a checkpoint of dome272/Diffusion-Models-pytorch's layout: convert it first with "
                "`python convert_checkpoint.py --src <ckpt.pt> --out-dir <folder>` (see README)")
    try:
        need = infer_config(sd, model.img_size)
    except CheckpointMismatch as e:
        return str(e)
    have = model.config()
    for cfg in (have, need):
        cfg.setdefault("arch", "default")
        cfg.setdefault("attn_threshold", None)
        cfg.setdefault("cond_channels", 0)
        cfg.setdefault("cond_mode", "concat")
    if not need["cond_channels"] and not have["cond_channels"]:
        need["cond_mode"] = have["cond_mode"]
    diff = [f"{k}={need[k]!r}" for k in need if k != "attn_threshold" and need[k] != have[k]]
    levels = attention_levels(need["arch"], need["attn_threshold"], model.img_size)
    if need["arch"] == have["arch"] and levels != attention_levels(have["arch"], have["attn_threshold"],
                                                                   model.img_size):
        diff.append(f"attention at {', '.join(sorted(levels)) or 'no level'}")
    if not diff:
        return None  # same architecture: let torch report whatever else is wrong
    return (f"the checkpoint does not fit this {_call(have)}: it was saved from a model with "
            f"{', '.join(diff)}; build it as {_call(need)}")


def count_parameters(model, trainable_only=False):
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def EMA(model, decay=0.995, start_step=2000):  # noqa: N802 - the spec's name for the EMA helper
    """The shared EMA (runtime.EMA): copies the weights for `start_step` steps, then a fixed `decay`."""
    return _RuntimeEMA(model, decay, start=start_step)


def make_betas(schedule, noise_steps, beta_start=1e-4, beta_end=0.02):
    """Beta schedule in float64: 'linear' (Ho et al. 2020) or 'cosine' (Nichol & Dhariwal 2021)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, noise_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda u: math.cos((u / noise_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(noise_steps)], dtype=torch.float64)
    raise UserError(f"--schedule {schedule!r} is unknown (use linear or cosine)")


def default_sampling_steps(sampler, noise_steps):
    """Steps when none are given: all T for ddpm, 50 for ddim, 25 for dpmsolver (at most T)."""
    return noise_steps if sampler == "ddpm" else min(DEFAULT_STEPS[sampler], noise_steps)


def check_sampler(sampler, eta=None):
    """UserError naming --sampler / --eta for an unknown sampler or an eta the sampler does not take."""
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r} is unknown (use {', '.join(SAMPLERS)})")
    if sampler == "dpmsolver" and eta not in (None, 0, 0.0):
        raise UserError(f"--eta {eta:g} applies to the ddpm and ddim samplers; dpmsolver is deterministic: drop --eta")


def sampling_timesteps(noise_steps, steps, spacing="uniform"):
    """Descending timesteps from noise_steps-1 down to 0: evenly spaced (DDIM / respaced DDPM), or
    "quadratic", t_k = (T-1) (k/(steps-1))^2 rounded, dense near t = 0 (dpmsolver), always `steps` of them."""
    if steps < 1 or steps > noise_steps:
        raise UserError(f"--sampling-steps {steps} must be between 1 and the model's {noise_steps} noise steps")
    if spacing == "quadratic":
        q = ((noise_steps - 1) * torch.linspace(1, 0, steps, dtype=torch.float64) ** 2).round().long().tolist()
        for j in range(len(q) - 2, -1, -1):  # near 0 rounding merges neighbours: push up by one (the top stays T-1)
            q[j] = max(q[j], q[j + 1] + 1)
        return q
    ts = torch.linspace(noise_steps - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.unique_consecutive(ts).tolist()


class Diffusion:
    """Gaussian diffusion: q(x_t|x_0) for training, DDPM / DDIM / DPM-Solver++ sampling with guidance."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device="cuda",
                 schedule="linear", channels=None, prediction_type="epsilon"):
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"--prediction-type {prediction_type!r} is unknown (use {' or '.join(PREDICTION_TYPES)})")
        self.noise_steps, self.img_size, self.device = noise_steps, img_size, torch.device(device)
        self.schedule, self.channels, self.prediction_type = schedule, channels, prediction_type
        self.beta64 = make_betas(schedule, noise_steps, beta_start, beta_end)
        self.alpha_hat64 = torch.cumprod(1.0 - self.beta64, dim=0)
        self.beta = self.beta64.float().to(self.device)
        self.alpha = 1.0 - self.beta
        self.alpha_hat = self.alpha_hat64.float().to(self.device)
        self.last_timing = None

    # ---- training
    def noise_images(self, x, t, noise=None, generator=None):
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I); returns (x_t, noise)."""
        if noise is None:
            noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        ah = self.alpha_hat.to(x.device)[t][:, None, None, None]
        return ah.sqrt() * x + (1 - ah).sqrt() * noise, noise

    def training_target(self, x0, noise, t):
        """What the network learns to output: the noise (epsilon), or v = sqrt(a) eps - sqrt(1 - a) x0
        (Salimans & Ho 2022), whose x0 estimate sqrt(a) x_t - sqrt(1 - a) v does not amplify the network's
        errors by 1 / sqrt(a) at large t (epsilon does: a constant error there becomes a brightness shift)."""
        if self.prediction_type == "epsilon":
            return noise
        ah = self.alpha_hat.to(x0.device)[t][:, None, None, None]
        return ah.sqrt() * noise - (1 - ah).sqrt() * x0

    def snr(self, t):
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at timesteps t, in float64."""
        ah = self.alpha_hat64.to(t.device)[t]
        return ah / (1 - ah)

    def loss_weights(self, t, snr_gamma=0.0):
        """Per-sample weights of the MSE on the training target for min-SNR-gamma (1 when snr_gamma is 0)."""
        if not snr_gamma:
            return torch.ones(t.shape, device=t.device)
        # Hang et al. (ICCV 2023) weight the x0 error by min(SNR, gamma): the large-SNR (small t) steps stop
        # dominating the gradient, which is what makes training converge ~3x faster. Our loss is on the
        # target instead: an eps error is sqrt(SNR) x0 errors, a v error 1/sqrt(1 - a) = sqrt(SNR + 1) x0
        # errors (x0 - x0_hat = sqrt(1 - a) (v_hat - v)), so the squared error is divided by SNR or SNR + 1.
        snr = self.snr(t)
        return (snr.clamp(max=float(snr_gamma)) / (snr if self.prediction_type == "epsilon" else snr + 1)).float()

    def _alpha_bar(self, t, x):
        """alpha_bar at t (an int, or one timestep per image) in float64, shaped to broadcast over x."""
        ah = self.alpha_hat64.to(x.device)[t]
        return ah.reshape(-1, *[1] * (x.dim() - 1)) if ah.dim() else ah

    def epsilon_from_output(self, x_t, t, out):
        """The network output as a noise estimate (float64); v -> eps = sqrt(1 - a) x_t + sqrt(a) v."""
        out = out.double()
        if self.prediction_type == "epsilon":
            return out
        a = self._alpha_bar(t, x_t)
        return (1 - a).sqrt() * x_t.double() + a.sqrt() * out

    def x0_from_output(self, x_t, t, out):
        """The x0 estimate of a network output (float64): (x_t - sqrt(1 - a) eps) / sqrt(a), or for v
        sqrt(a) x_t - sqrt(1 - a) v."""
        a = self._alpha_bar(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t.double() - (1 - a).sqrt() * out.double()) / a.sqrt()
        return a.sqrt() * x_t.double() - (1 - a).sqrt() * out.double()

    def sample_timesteps(self, n, generator=None, device=None):
        """Uniform training timesteps in [0, noise_steps)."""
        return torch.randint(0, self.noise_steps, (n,), generator=generator, device=device or self.device)

    # ---- sampling
    def initial_noise(self, seeds, channels, device="cpu"):
        """x_T of per-image seeds: exactly the first draw sample() makes for them (seed interpolation)."""
        shape = (channels, self.img_size, self.img_size)
        return torch.stack([torch.randn(shape, generator=torch.Generator(device=device).manual_seed(int(s)),
                                        device=device) for s in seeds])

    def _eps(self, model, x, t, labels, cfg_scale, dtype, cond=None, cond_scale=1.0, class_emb=None):
        """Noise prediction, with classifier-free guidance when labels are given and cfg_scale != 1 (and on the
        condition when one is given and cond_scale != 1). class_emb (N, time_dim) stands in for the class
        embedding of `labels` in the conditional branch; the unconditional branch stays the "no class" token."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        if cond is not None:
            return self._eps_conditioned(model, x, tt, labels, cfg_scale, dtype, cond, cond_scale)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            if class_emb is not None:
                if cfg_scale == 1:
                    return model(x, tt, class_emb=class_emb).float()
                null = model.label_emb(torch.full((x.shape[0],), model.num_classes, device=x.device,
                                                  dtype=torch.long))
                out = model(torch.cat([x, x]), torch.cat([tt, tt]),
                            class_emb=torch.cat([class_emb.to(null.dtype), null])).float()
            elif labels is None or not getattr(model, "num_classes", None):
                return model(x, tt).float()
            elif cfg_scale == 1:
                return model(x, tt, labels).float()
            else:
                null = torch.full_like(labels, model.num_classes)
                out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    @staticmethod
    def _eps_conditioned(model, x, tt, labels, cfg_scale, dtype, cond, cond_scale):
        """Guidance on an image condition and a class together, one batched forward pass:
        e = e(0, y) + s_c (e(c, y) - e(0, y)) + (s_y - 1) (e(c, y) - e(c, null)), 0 = the null condition
        (what condition dropout trains), null = the "no class" token. s_c = 0 is exactly e(0, y)."""
        classes = getattr(model, "num_classes", None)
        y = labels if labels is not None and classes else None
        if classes and y is None:
            y = torch.full((x.shape[0],), classes, device=x.device, dtype=torch.long)
        runs = [(y, cond)]
        if cond_scale != 1:
            runs.append((y, torch.zeros_like(cond)))
        if labels is not None and classes and cfg_scale != 1:
            runs.append((torch.full_like(y, classes), cond))
        k = len(runs)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(torch.cat([x] * k), torch.cat([tt] * k), None if y is None else torch.cat([r[0] for r in runs]),
                        cond=torch.cat([r[1] for r in runs])).float().chunk(k)
        full, rest = out[0], list(out[1:])
        e = full
        if cond_scale != 1:
            null_cond = rest.pop(0)
            e = null_cond + cond_scale * (full - null_cond)
        if rest:
            e = e + (cfg_scale - 1) * (full - rest.pop(0))
        return e

    @staticmethod
    def _dpmsolver_step(x, x0, a_t, a_prev, x0_last, h_last):
        """One DPM-Solver++(2M) step from alpha_bar a_t to a_prev -> (x at a_prev, x0, the log-SNR step h).

        Lu et al. 2022 (arXiv:2211.01095), algorithm 2: the exact solution of the probability-flow ODE in
        lambda = log(alpha / sigma) with the data prediction x0 linear in lambda between the last two points:
        x' = (sigma' / sigma) x - alpha' expm1(-h) D, D = (1 + 1/(2r)) x0 - 1/(2r) x0_last, r = h_last / h.
        The data (not noise) prediction is what lets x0 be clipped like the DDIM loop does (the paper's
        thresholding); the first step (no x0_last yet) is first order, i.e. exactly DDIM's step."""
        if a_prev >= 1:  # the last step to clean data: lambda' = inf, the first-order limit is x0 itself
            return x0, x0, None
        lam = 0.5 * (torch.log(a_t) - torch.log1p(-a_t))
        lam_prev = 0.5 * (torch.log(a_prev) - torch.log1p(-a_prev))
        h = lam_prev - lam
        d = x0
        if x0_last is not None:
            r = h_last / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_last
        x_prev = ((1 - a_prev) / (1 - a_t)).sqrt() * x - a_prev.sqrt() * torch.expm1(-h) * d
        return x_prev, x0, h

    @torch.no_grad()
    def sample(self, model, n, labels=None, cfg_scale=3, sampler="ddpm", steps=None, seeds=None, eta=None,
               log_time=False, progress=True, autocast_dtype=None, channels_last=False, as_float=False, cond=None,
               cond_scale=1.0, x_init=None, class_emb=None):
        """Generate n images; returns uint8 (n, C, H, W), or float32 in [0, 1] with as_float (16-bit / NIfTI output).

        sampler 'ddpm': ancestral sampling with the posterior variance (eta=1 on a respaced grid);
        sampler 'ddim': deterministic DDIM (eta=0) unless eta is given; sampler 'dpmsolver': DPM-Solver++(2M)
        (deterministic, no eta). steps defaults to all noise steps for ddpm, 50 for ddim and 25 for dpmsolver
        (default_sampling_steps). seeds: one int per image; image i's noise comes only from seeds[i], so
        the same seed gives the same image at any batch size. cond: the encoded condition (n, Cc, H, W) of an
        image-conditioned model (conditional.encode_condition), guided by cond_scale (1 = none, 0 = ignored).
        Interpolation hooks: x_init (n, C, H, W) is the initial noise instead of the seeds' draws (the seeds
        still give any later noise, eta > 0); class_emb (n, time_dim) replaces the class embedding of `labels`
        (model.label_emb rows; their mixes for class interpolation). Both None: the plain sampler."""
        from tqdm import tqdm

        check_sampler(sampler, eta)
        if steps is None:
            steps = default_sampling_steps(sampler, self.noise_steps)
        eta = (1.0 if sampler == "ddpm" else 0.0) if eta is None else float(eta)
        channels = getattr(model, "c_in", None) or self.channels or 3
        model_device = next(model.parameters()).device
        device = model_device
        if seeds is None:
            seeds = torch.randint(0, 2 ** 31 - 1, (n,)).tolist()
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} images")
        if labels is not None:
            labels = torch.as_tensor(labels, device=device).long().reshape(-1)
            if labels.numel() != n:
                raise ValueError(f"got {labels.numel()} labels for {n} images")
        if cond is not None:
            cond = torch.as_tensor(cond, device=device).float()
            if cond.shape[0] != n:
                raise ValueError(f"got {cond.shape[0]} conditions for {n} images")
        if class_emb is not None:
            if cond is not None or not getattr(model, "num_classes", None):
                raise ValueError("class_emb needs a class-conditional model without an image condition")
            class_emb = torch.as_tensor(class_emb, device=device)
            if class_emb.shape != (n, model.time_dim):
                raise ValueError(f"class_emb has shape {tuple(class_emb.shape)}; expected ({n}, {model.time_dim})")
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        shape = (channels, self.img_size, self.img_size)
        if x_init is not None:
            x_init = torch.as_tensor(x_init, device=device).float()
            if x_init.shape != (n, *shape):
                raise ValueError(f"x_init has shape {tuple(x_init.shape)}; expected {(n, *shape)}")

        def noise():
            return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])

        was_training = model.training
        model.eval()
        # dpmsolver steps on the quadratic grid of Song et al. (2021, appendix D.2): on the evenly spaced one
        # the last few steps jump from log-SNR ~2 to ~4.6, where a second-order extrapolation of x0 overshoots
        # and the solver gains little over DDIM; with the grid dense near t = 0 its error on an exactly
        # solvable Gaussian-data oracle is ~6x below DDIM's at 10 steps, ~10x at 25 (test_ddpm_objectives.py).
        ts = sampling_timesteps(self.noise_steps, steps, "quadratic" if sampler == "dpmsolver" else "uniform")
        ah = self.alpha_hat64.to(device)
        start = time.perf_counter()
        x = noise() if x_init is None else x_init.clone()
        x0_last, h_last = None, None  # DPM-Solver++(2M)'s previous data prediction and log-SNR step
        for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress, leave=False)):
            xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            c = cond.contiguous(memory_format=torch.channels_last) if channels_last and cond is not None else cond
            out = self._eps(model, xin, t, labels, cfg_scale, autocast_dtype, c, cond_scale, class_emb)
            eps = self.epsilon_from_output(x, t, out)  # v -> epsilon is linear, so guidance may act on v
            a_t = ah[t]
            a_prev = ah[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64, device=device)
            xd = x.double()
            x0 = ((xd - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
            if sampler == "dpmsolver":
                # Below 15 steps the step into t = 0 is first order ("lower order final", Lu et al. 2022):
                # it spans a wide log-SNR range where the extrapolated slope of x0 overshoots.
                last = x0_last if i + 2 < len(ts) or len(ts) >= 15 else None
                x_prev, x0_last, h_last = self._dpmsolver_step(xd, x0, a_t, a_prev, last, h_last)
                x = x_prev.float()
                continue
            eps = (xd - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # consistent with the clipped x0
            # Generalised DDIM step (Song et al. 2021, eq. 12); eta=1 is DDPM's posterior variance.
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
            x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
            if i + 1 < len(ts) and eta > 0:
                x_prev = x_prev + sigma * noise().double()
            x = x_prev.float()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        model.train(was_training)
        self.last_timing = {"images": n, "steps": len(ts), "seconds": elapsed}
        if log_time:
            print(f"sampled {n} images x {len(ts)} steps in {elapsed:.2f} s "
                  f"({elapsed / max(n, 1):.3f} s/image, {elapsed / max(len(ts), 1) * 1000:.1f} ms/step)")
        if as_float:
            return ((x.clamp(-1, 1) + 1) / 2).float()
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
