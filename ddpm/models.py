"""DDPM networks and noise process: a UNet with self-attention, the Gaussian diffusion (linear / cosine
schedule, DDPM ancestral and DDIM sampling, classifier-free guidance) and an EMA of the weights.

    from models import UNet, UNet_conditional, Diffusion, EMA, build_model
    model = UNet_conditional(num_classes=10, img_size=64)         # default: 3 channels, width 64
    images = Diffusion(img_size=64, device="cpu").sample(model, n=4, labels=torch.arange(4), cfg_scale=3)

The UNet is written here rather than taken from diffusers because the spec's `UNet_conditional(...)`
signature and state-dict layout are our public interface; the sampler is hand-written because every
image gets its own seeded noise stream (output independent of batch size), which the diffusers
schedulers' shared-noise step does not give for a whole trajectory without extra plumbing.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import UserError

def _groups(ch):
    """GroupNorm groups: 32 when possible, fewer for tiny widths."""
    return math.gcd(32, ch)


def sinusoidal_embedding(t, dim):
    """Transformer-style sinusoidal embedding of (integer) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class DoubleConv(nn.Module):
    """conv-norm-GELU-conv-norm, optionally residual (needs in == out)."""

    def __init__(self, c_in, c_out, mid=None, residual=False):
        super().__init__()
        mid = mid or c_out
        self.residual = residual
        self.net = nn.Sequential(
            nn.Conv2d(c_in, mid, 3, padding=1, bias=False), nn.GroupNorm(_groups(mid), mid), nn.GELU(),
            nn.Conv2d(mid, c_out, 3, padding=1, bias=False), nn.GroupNorm(_groups(c_out), c_out))

    def forward(self, x):
        return F.gelu(x + self.net(x)) if self.residual else self.net(x)


class Down(nn.Module):
    """Halve the resolution, two conv blocks, add the projected time(+class) embedding."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(c_in, c_in, residual=True), DoubleConv(c_in, c_out))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))

    def forward(self, x, emb):
        return self.conv(x) + self.emb(emb)[:, :, None, None]


class Up(nn.Module):
    """Double the resolution, concatenate the skip, two conv blocks, add the embedding."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(DoubleConv(c_in, c_in, residual=True), DoubleConv(c_in, c_out, c_in // 2))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))

    def forward(self, x, skip, emb):
        x = torch.cat([skip, self.up(x)], dim=1)
        return self.conv(x) + self.emb(emb)[:, :, None, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions + feed-forward (pre-norm, residual)."""

    def __init__(self, ch, head_dim=32):
        super().__init__()
        self.heads = max(1, ch // head_dim)
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
    self-attention at 1/2, 1/4 and 1/8 (not at full resolution, where it would cost (H*W)^2)."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, img_size=64, base_channels=64, num_classes=None,
                 device=None):
        super().__init__()
        if img_size % 8 != 0 or img_size < 8:
            raise UserError(f"image size {img_size} is not divisible by 8 (the UNet halves it 3 times); "
                            f"use e.g. {max(8, img_size // 8 * 8)} or {img_size // 8 * 8 + 8}")
        if c_in not in (1, 3) or c_out not in (1, 3):
            raise UserError(f"channels must be 1 or 3, got c_in={c_in} c_out={c_out}")
        b = base_channels
        self.c_in, self.c_out, self.img_size, self.time_dim = c_in, c_out, img_size, time_dim
        self.base_channels, self.num_classes = b, num_classes
        self.inc = DoubleConv(c_in, b)
        self.down1, self.sa1 = Down(b, 2 * b, time_dim), SelfAttention(2 * b)
        self.down2, self.sa2 = Down(2 * b, 4 * b, time_dim), SelfAttention(4 * b)
        self.down3, self.sa3 = Down(4 * b, 4 * b, time_dim), SelfAttention(4 * b)
        self.bot1 = DoubleConv(4 * b, 8 * b)
        self.bot2 = DoubleConv(8 * b, 8 * b)
        self.bot3 = DoubleConv(8 * b, 4 * b)
        self.up1, self.sa4 = Up(8 * b, 2 * b, time_dim), SelfAttention(2 * b)
        self.up2, self.sa5 = Up(4 * b, b, time_dim), SelfAttention(b)
        self.up3 = Up(2 * b, b, time_dim)
        self.outc = nn.Conv2d(b, c_out, 1)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        if num_classes is not None:
            # Index num_classes is the learned "no class" token used for classifier-free guidance.
            self.label_emb = nn.Embedding(num_classes + 1, time_dim)
        if device is not None:
            self.to(device)

    def config(self):
        """Plain dict that rebuild_model() turns back into this architecture."""
        return {"c_in": self.c_in, "c_out": self.c_out, "img_size": self.img_size, "time_dim": self.time_dim,
                "base_channels": self.base_channels, "num_classes": self.num_classes}

    def embed(self, t, y=None):
        """Time embedding, plus the class embedding for conditional models (y=None -> 'no class')."""
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        if self.num_classes is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, t, y=None):
        emb = self.embed(t, y)
        x1 = self.inc(x)
        x2 = self.sa1(self.down1(x1, emb))
        x3 = self.sa2(self.down2(x2, emb))
        x4 = self.sa3(self.down3(x3, emb))
        x4 = self.bot3(self.bot2(self.bot1(x4)))
        x = self.sa4(self.up1(x4, x3, emb))
        x = self.sa5(self.up2(x, x2, emb))
        x = self.up3(x, x1, emb)
        return self.outc(x)


class UNet_conditional(UNet):  # noqa: N801  (name fixed by the spec)
    """Class-conditional UNet (learned class embedding + a null token for classifier-free guidance)."""

    def __init__(self, c_in=3, c_out=3, time_dim=256, num_classes=None, img_size=64, base_channels=64,
                 device=None):
        if num_classes is None or num_classes < 1:
            raise UserError("UNet_conditional needs num_classes >= 1")
        super().__init__(c_in, c_out, time_dim, img_size, base_channels, num_classes, device)


def rebuild_model(cfg):
    """Build the UNet described by a stored config dict (see UNet.config)."""
    kw = {k: cfg[k] for k in ("c_in", "c_out", "img_size", "time_dim", "base_channels")}
    if cfg.get("num_classes"):
        return UNet_conditional(num_classes=int(cfg["num_classes"]), **kw)
    return UNet(**kw)


def count_parameters(model, trainable_only=False):
    """Number of (trainable) parameters of a module."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class EMA:
    """Exponential moving average of a model's weights, kept as a frozen copy of the module.

    Before `start_step` optimizer steps the copy just follows the model (early weights are noise)."""

    def __init__(self, model, decay=0.995, start_step=2000):
        import copy

        self.decay, self.start_step = decay, start_step
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        """Blend model weights into the EMA copy (step = optimizer steps done so far)."""
        src = list(model.state_dict().values())
        dst = list(self.model.state_dict().values())
        if step < self.start_step:
            for d, s in zip(dst, src):
                d.copy_(s)
            return
        floats = [(d, s) for d, s in zip(dst, src) if d.is_floating_point()]
        torch._foreach_lerp_([d for d, _ in floats], [s for _, s in floats], 1.0 - self.decay)
        for d, s in zip(dst, src):
            if not d.is_floating_point():
                d.copy_(s)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, sd):
        self.model.load_state_dict(sd)


def make_betas(schedule, noise_steps, beta_start=1e-4, beta_end=0.02):
    """Beta schedule in float64: 'linear' (Ho et al. 2020) or 'cosine' (Nichol & Dhariwal 2021)."""
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, noise_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = lambda u: math.cos((u / noise_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(noise_steps)], dtype=torch.float64)
    raise UserError(f"--schedule {schedule!r} is unknown (use linear or cosine)")


def sampling_timesteps(noise_steps, steps):
    """Descending, evenly spaced timesteps from noise_steps-1 down to 0 (DDIM / respaced DDPM)."""
    if steps < 1 or steps > noise_steps:
        raise UserError(f"--sampling-steps {steps} must be between 1 and the model's {noise_steps} noise steps")
    ts = torch.linspace(noise_steps - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.unique_consecutive(ts).tolist()


class Diffusion:
    """Gaussian diffusion: q(x_t|x_0) for training, DDPM / DDIM sampling with classifier-free guidance."""

    def __init__(self, noise_steps=1000, beta_start=1e-4, beta_end=0.02, img_size=64, device="cuda",
                 schedule="linear", channels=None):
        if isinstance(device, str) and device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.noise_steps, self.img_size, self.device = noise_steps, img_size, torch.device(device)
        self.schedule, self.channels = schedule, channels
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

    def sample_timesteps(self, n, generator=None, device=None):
        """Uniform training timesteps in [0, noise_steps)."""
        return torch.randint(0, self.noise_steps, (n,), generator=generator, device=device or self.device)

    # ---- sampling
    def _eps(self, model, x, t, labels, cfg_scale, dtype):
        """Noise prediction, with classifier-free guidance when labels are given and cfg_scale != 1."""
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            if labels is None or not getattr(model, "num_classes", None):
                return model(x, tt).float()
            if cfg_scale == 1:
                return model(x, tt, labels).float()
            null = torch.full_like(labels, model.num_classes)
            out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null])).float()
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    @torch.no_grad()
    def sample(self, model, n, labels=None, cfg_scale=3, sampler="ddpm", steps=None, seeds=None, eta=None,
               log_time=False, progress=True, autocast_dtype=None, channels_last=False):
        """Generate n images; returns uint8 (n, C, H, W).

        sampler 'ddpm': ancestral sampling with the posterior variance (eta=1 on a respaced grid);
        sampler 'ddim': deterministic DDIM (eta=0) unless eta is given. steps defaults to all noise steps
        for ddpm and 50 for ddim. seeds: one int per image; image i's noise comes only from seeds[i], so
        the same seed gives the same image at any batch size."""
        from tqdm import tqdm

        if sampler not in ("ddpm", "ddim"):
            raise UserError(f"--sampler {sampler!r} is unknown (use ddpm or ddim)")
        if steps is None:
            steps = self.noise_steps if sampler == "ddpm" else min(50, self.noise_steps)
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
        gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        shape = (channels, self.img_size, self.img_size)

        def noise():
            return torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])

        was_training = model.training
        model.eval()
        ts = sampling_timesteps(self.noise_steps, steps)
        ah = self.alpha_hat64.to(device)
        start = time.perf_counter()
        x = noise()
        for i, t in enumerate(tqdm(ts, desc=f"{sampler} sampling", disable=not progress, leave=False)):
            xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            eps = self._eps(model, xin, t, labels, cfg_scale, autocast_dtype).double()
            a_t = ah[t]
            a_prev = ah[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64, device=device)
            xd = x.double()
            x0 = ((xd - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
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
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
