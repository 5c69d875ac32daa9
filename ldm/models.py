"""LDM networks: the frozen VAE, the class-conditional diffusers UNet, the class embedder, samplers.

Not run directly. The UNet is diffusers' `UNet2DConditionModel`; the class enters through
cross-attention as a single token: `ClassEmbedder(labels) -> (B, 1, cross_attention_dim)`, with
index `num_classes` as the learned null class used for classifier-free guidance.
diffusers' attention already runs through `F.scaled_dot_product_attention` (AttnProcessor2_0).
"""
import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DConditionModel)

from runtime import UserError

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"

# Presets: widths per level (each extra level halves the latent once), ResNet layers per level,
# class-token width, and attention heads (diffusers calls the head count `attention_head_dim`).
UNET_PRESETS = {
    "tiny": dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64,
                 attention_head_dim=4, norm_num_groups=16),
    "small": dict(block_out_channels=[64, 128, 256], layers_per_block=2, cross_attention_dim=256,
                  attention_head_dim=8, norm_num_groups=32),
    "base": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, cross_attention_dim=512,
                 attention_head_dim=8, norm_num_groups=32),
}

# Stable Diffusion's noise schedule (scaled-linear betas); stored in every checkpoint.
DEFAULT_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="epsilon")


def unet_kwargs(preset="base", **overrides):
    """Resolved UNet2DConditionModel size kwargs: the preset with any non-None override applied."""
    if preset not in UNET_PRESETS:
        raise UserError(f"--unet_preset {preset!r} is unknown; choose one of {', '.join(UNET_PRESETS)}")
    kw = dict(UNET_PRESETS[preset])
    kw.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides.items() if v is not None})
    return kw


def build_unet(latent_size, latent_channels, block_out_channels, layers_per_block, cross_attention_dim,
               attention_head_dim, norm_num_groups):
    """A UNet2DConditionModel: cross-attention at every level but the last, SD-style."""
    n = len(block_out_channels)
    if any(c % norm_num_groups for c in block_out_channels):
        raise UserError(f"every --block_out_channels value must be divisible by --norm_num_groups "
                        f"{norm_num_groups}, got {list(block_out_channels)}")
    if latent_size % (2 ** (n - 1)):
        raise UserError(f"the latent size {latent_size} must be divisible by 2**(levels-1) = {2 ** (n - 1)} "
                        f"for a UNet with {n} levels; use a larger --image_size or fewer --block_out_channels")
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=list(block_out_channels),
        layers_per_block=layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups)


def plain_config(config):
    """A diffusers config as JSON-able plain Python (tuples -> lists, private keys dropped)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")},
                                 default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


class ClassEmbedder(nn.Module):
    """labels (B,) -> (B, 1, dim) tokens; row `num_classes` is the learned null class (for CFG)."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding(labels).unsqueeze(1)

    def drop_labels(self, labels, p, generator=None):
        """Replace each label by the null class with probability p (classifier-free guidance training)."""
        if p <= 0:
            return labels
        u = torch.rand(labels.shape, generator=generator, device=labels.device)
        return torch.where(u < p, torch.full_like(labels, self.num_classes), labels)


class Denoiser(nn.Module):
    """UNet + class embedder as one module so DDP / torch.compile / EMA see both."""

    def __init__(self, unet, class_embedder):
        super().__init__()
        self.unet, self.class_embedder = unet, class_embedder

    def forward(self, latents, timesteps, labels):
        return self.unet(latents, timesteps, encoder_hidden_states=self.class_embedder(labels)).sample


def is_hub_id(name):
    """True for 'owner/name' strings that are not an existing local path."""
    return not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def load_vae(name):
    """Frozen AutoencoderKL from a local diffusers folder or a hub id; a one-line error if unavailable."""
    hint = ("pass --vae /path/to/folder (a diffusers AutoencoderKL folder, e.g. one written by "
            "train_vae.py)")
    path = Path(name).expanduser()
    if path.exists() or not is_hub_id(name):
        if not (path / "config.json").is_file():
            raise UserError(f"VAE folder {path} does not exist or has no config.json; {hint}")
        source = str(path.resolve())
    else:
        source = name
    try:
        with warnings.catch_warnings():  # hub/offline warnings would bury the one-line error
            warnings.simplefilter("ignore")
            vae = AutoencoderKL.from_pretrained(source)
    except Exception as e:
        if not path.exists():  # a hub id (an absolute folder path also equals its resolved source)
            raise UserError(f"cannot load VAE '{name}' from the model hub (offline, no network, or no such "
                            f"model); {hint}") from None
        raise UserError(f"cannot load VAE from folder {source}: {str(e).splitlines()[0][:160]}; {hint}") from None
    vae.requires_grad_(False).eval()
    return vae, source


def vae_identity(vae, source):
    """String that changes when the VAE changes (its config, and for folders the weight files' stats)."""
    parts = [source, json.dumps(plain_config(vae.config), sort_keys=True)]
    if Path(source).is_dir():
        for f in sorted(Path(source).iterdir()):
            if f.suffix in (".safetensors", ".bin"):
                st = os.stat(f)
                parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def vae_downsample_factor(vae):
    """Spatial factor between image and latent: one halving per encoder level but the last."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def check_image_size(image_size, factor):
    """image_size must be divisible by 8 (spec) and by the VAE's factor."""
    if image_size <= 0 or image_size % 8:
        raise UserError(f"--image_size must be a positive multiple of 8, got {image_size}")
    if image_size % factor:
        raise UserError(f"--image_size {image_size} is not divisible by the VAE's downsampling factor {factor}")


def to_vae_input(x, vae_channels):
    """Grayscale (B,1,H,W) -> the VAE's channel count by repeating; colour left as is."""
    if x.shape[1] == vae_channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, vae_channels, -1, -1)
    return x.mean(1, keepdim=True).expand(-1, vae_channels, -1, -1)


def vae_posterior(vae, x):
    """(mean, std) of q(z|x) for images in [-1,1] (unscaled latents)."""
    dist = vae.encode(to_vae_input(x, vae.config.in_channels).to(vae.dtype)).latent_dist
    return dist.mean, dist.std


def decode_to_images(vae, latents, scaling_factor, image_channels):
    """Scaled latents -> float images in [0,1], 1-channel (mean of RGB) when the data was grayscale."""
    x = vae.decode((latents / scaling_factor).to(vae.dtype)).sample.float()
    x = ((x.clamp(-1, 1) + 1) / 2)
    if image_channels == 1 and x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return x


SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}


def make_sampler(name, noise_config):
    """A diffusers sampler built from the training noise schedule (no x0 clipping: latents are unbounded)."""
    cfg = dict(noise_config)
    if name == "ddpm":
        return DDPMScheduler(**cfg, clip_sample=False)
    if name == "ddim":
        return DDIMScheduler(**cfg, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2)
    raise UserError(f"--scheduler {name!r} is unknown; choose one of {', '.join(SCHEDULERS)}")


def initial_noise(seeds, latent_shape, device="cpu"):
    """The initial latents of per-image seeds: exactly what sample_latents draws for them (CPU generators)."""
    from diffusers.utils.torch_utils import randn_tensor
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return randn_tensor((len(gens), *latent_shape), generator=gens, device=torch.device(device))


@torch.no_grad()
def sample_latents(denoiser, sampler, labels, generators, latent_shape, num_steps, cfg_scale, device,
                   autocast=None, progress=None, latents=None, class_embeddings=None):
    """CFG sampling; one CPU generator per image (batch-size independent); `autocast`: context factory or None.

    latents: given initial noise (B, *latent_shape) instead of drawing it from `generators` (seed
    interpolation); class_embeddings: (B, 1, dim) tokens replacing class_embedder(labels) in the conditional
    branch (class interpolation; the null branch stays the learned null class)."""
    from diffusers.utils.torch_utils import randn_tensor
    b = len(labels)
    if latents is None:
        latents = randn_tensor((b, *latent_shape), generator=generators, device=torch.device(device))
    else:
        latents = latents.to(device)
    sampler.set_timesteps(num_steps, device=device)
    latents = latents * sampler.init_noise_sigma
    null = torch.full_like(labels, denoiser.class_embedder.num_classes)
    cond_labels = torch.cat([labels, null]) if cfg_scale != 1.0 else labels
    if class_embeddings is None:
        model = lambda x, t: denoiser(x, t, cond_labels)  # noqa: E731
    else:
        tokens = class_embeddings.to(device)
        tokens = torch.cat([tokens, denoiser.class_embedder(null)]) if cfg_scale != 1.0 else tokens
        model = lambda x, t: denoiser.unet(x, t, encoder_hidden_states=tokens).sample  # noqa: E731
    ctx = autocast or contextlib.nullcontext  # a factory: autocast contexts are single-use
    steps = sampler.timesteps
    for t in (progress(steps) if progress else steps):
        inp = sampler.scale_model_input(latents, t)
        inp = torch.cat([inp, inp]) if cfg_scale != 1.0 else inp
        with ctx():
            out = model(inp, t.expand(inp.shape[0]).to(device)).float()
        if cfg_scale != 1.0:
            cond, uncond = out.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        latents = sampler.step(out, t, latents, generator=generators).prev_sample
    return latents


def denoiser_from_checkpoint(ckpt, use_ema=True):
    """Rebuild UNet + class embedder from an LDM checkpoint (EMA weights when present and wanted)."""
    unet = UNet2DConditionModel.from_config(ckpt["unet_config"])
    emb = ClassEmbedder(ckpt["num_classes"], ckpt["unet_config"]["cross_attention_dim"])
    ema = use_ema and ckpt.get("ema_unet") is not None
    unet.load_state_dict(ckpt["ema_unet"] if ema else ckpt["unet"])
    emb.load_state_dict(ckpt["ema_class_embedder"] if ema and ckpt.get("ema_class_embedder") is not None
                        else ckpt["class_embedder"])
    return Denoiser(unet, emb).eval(), ema


@torch.no_grad()
def sample_images(denoiser, vae, labels, seeds, *, latent_channels, latent_size, scaling_factor,
                  image_channels, noise_config, scheduler="dpmsolver", num_steps=25, cfg_scale=3.0,
                  device="cpu", autocast=None, progress=None, latents=None, class_embeddings=None):
    """Labels + per-image seeds -> float images in [0,1] (B, image_channels, H, W).

    latents / class_embeddings: see sample_latents (interpolation); without them the seeds decide the noise."""
    sampler = make_sampler(scheduler, noise_config)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    z = sample_latents(denoiser, sampler, labels, gens, (latent_channels, latent_size, latent_size),
                       num_steps, cfg_scale, device, autocast=autocast, progress=progress, latents=latents,
                       class_embeddings=class_embeddings)
    with (autocast or contextlib.nullcontext)():
        return decode_to_images(vae, z.float(), scaling_factor, image_channels).float()
