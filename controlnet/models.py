"""ControlNet parts: rebuild the LDM from its checkpoint, build the ControlNet from its UNet, sample.

Used by train.py and inference.py (nothing to run here). Everything is built from diffusers parts:
the LDM checkpoint (written by ../ldm/train.py, read here only through the keys that README.md lists under
"What ControlNet reads from an LDM checkpoint", checked by validate_ldm_checkpoint) gives the
UNet2DConditionModel, the class embedder, the AutoencoderKL and the noise schedule; the ControlNet is
`diffusers.ControlNetModel.from_unet(unet)` with its conditioning embedding sized so that a mask at image
resolution lands exactly on the latent grid.
"""
import hashlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import (AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler,
                       DPMSolverMultistepScheduler, UNet2DConditionModel)
from diffusers.training_utils import compute_snr

from runtime import UserError, load_checkpoint  # UserError is re-exported: dataset.py imports it from here

SCHEDULERS = ("ddpm", "ddim", "dpmsolver")


def load_flagged_checkpoint(path, flag, trust=False, expect_type=None):
    """runtime.load_checkpoint (weights_only, the one pickle check) with the flag that named the file in front."""
    try:
        return load_checkpoint(path, trust=trust, expect_type=expect_type)
    except UserError as e:
        raise UserError(f"{flag} {e}") from None


# ------------------------------------------------------------------------------ the LDM -> ControlNet contract
# What ControlNet reads from a checkpoint of ../ldm/train.py (README: "What ControlNet reads from an LDM
# checkpoint"). key: (required, what it must be, test). Checked once, by validate_ldm_checkpoint.
LDM_FORMAT_VERSION = 1


def _int(v, lo=1):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _tensor_dict(v):
    return isinstance(v, dict) and len(v) > 0 and all(isinstance(k, str) and torch.is_tensor(t) for k, t in v.items())


def _embedder(v):
    return _tensor_dict(v) and "embedding.weight" in v and v["embedding.weight"].ndim == 2


def _noise_config(v):
    return (isinstance(v, dict) and _int(v.get("num_train_timesteps")) and isinstance(v.get("beta_schedule"), str)
            and all(isinstance(v.get(k), (int, float)) for k in ("beta_start", "beta_end"))
            and v.get("prediction_type") in ("epsilon", "v_prediction", "sample"))


LDM_CONTRACT = {
    "model_type": (True, "the string 'ldm'", lambda v: v == "ldm"),
    "format_version": (True, f"an int <= {LDM_FORMAT_VERSION}", lambda v: _int(v) and v <= LDM_FORMAT_VERSION),
    "unet_config": (True, "a dict (the UNet2DConditionModel config)", lambda v: isinstance(v, dict) and len(v) > 0),
    "unet": (True, "a state dict (name -> tensor)", _tensor_dict),
    "ema_unet": (False, "a state dict or None", lambda v: v is None or _tensor_dict(v)),
    "class_embedder": (True, "a state dict with a 2-D 'embedding.weight'", _embedder),
    "ema_class_embedder": (False, "a state dict with a 2-D 'embedding.weight', or None",
                           lambda v: v is None or _embedder(v)),
    "num_classes": (True, "an int >= 1", _int),
    "class_names": (True, "a list of strings", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                    and all(isinstance(n, str) for n in v)),
    "vae": (True, "a string (hub id or AutoencoderKL folder)", lambda v: isinstance(v, str) and len(v) > 0),
    "vae_scaling_factor": (True, "a number > 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                           and v > 0),
    "image_size": (True, "an int >= 1 (pixels)", _int),
    "image_channels": (True, "1 or 3", lambda v: v in (1, 3) and not isinstance(v, bool)),
    "noise_scheduler_config": (True, "a dict with num_train_timesteps, beta_schedule, beta_start, beta_end and "
                               "prediction_type (epsilon, v_prediction or sample)", _noise_config),
}


def validate_ldm_checkpoint(ck, path):
    """UserError (one line naming the key and the file) unless `ck` keeps the LDM -> ControlNet contract."""
    where = f"--ldm_checkpoint {path}"
    if not isinstance(ck, dict):
        raise UserError(f"{where} is not an LDM checkpoint (it holds a {type(ck).__name__}, not a dict)")
    if ck.get("model_type") != "ldm":
        raise UserError(f"{where} is not an LDM checkpoint (it is: {ck.get('model_type', 'no model_type')}); "
                        f"'model_type' must be 'ldm': pass the checkpoint_best.pt written by ldm/train.py")
    for key, (required, what, ok) in LDM_CONTRACT.items():
        if key not in ck:
            if required:
                raise UserError(f"{where} has no '{key}' ({what}); was it written by ldm/train.py?")
            continue
        if not ok(ck[key]):
            got = ck[key]
            shown = repr(got)[:60] if not isinstance(got, dict) else f"dict of {len(got)} keys"
            raise UserError(f"{where}: '{key}' must be {what}, got {type(got).__name__} {shown}")
    if len(ck["class_names"]) != ck["num_classes"]:
        raise UserError(f"{where}: 'class_names' has {len(ck['class_names'])} names but 'num_classes' is "
                        f"{ck['num_classes']}")
    for key in ("class_embedder", "ema_class_embedder"):
        w = (ck.get(key) or {}).get("embedding.weight")
        if w is not None and w.shape[0] != ck["num_classes"] + 1:
            raise UserError(f"{where}: '{key}' has {w.shape[0]} rows, expected num_classes + 1 = "
                            f"{ck['num_classes'] + 1} (the last row is the null class)")
    return ck


def plain(obj):
    """Config values as plain Python (lists, dicts, str, numbers) so weights_only loading accepts them."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def weights_sha256(state_dict):
    """sha256 over the names and raw bytes of a state dict (order independent, dtype exact)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].detach().to("cpu").contiguous().reshape(-1)
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ldm_fingerprint(unet_config, unet_state):
    """What a ControlNet records about the LDM it was trained from: hashes of the UNet config and weights."""
    cfg = json.dumps(plain(dict(unet_config)), sort_keys=True)
    return {"unet_config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
            "unet_weights_sha256": weights_sha256(unet_state)}


def check_same_ldm(recorded, actual, ckpt_path, ldm_path, recorded_path=None):
    """Refuse a ControlNet checkpoint used with another LDM than the one it was trained from."""
    if recorded is None:
        raise UserError(f"{ckpt_path} does not record the LDM it was trained from; it was not written by "
                        f"controlnet/train.py")
    if recorded != actual:
        what = "UNet configs" if recorded["unet_config_sha256"] != actual["unet_config_sha256"] else "UNet weights"
        raise UserError(f"{ckpt_path} was trained from another LDM ({what} differ: recorded "
                        f"{recorded['unet_weights_sha256'][:12]}, --ldm_checkpoint {ldm_path} has "
                        f"{actual['unet_weights_sha256'][:12]}); pass the LDM checkpoint it was trained from"
                        + (f" ({recorded_path})" if recorded_path else ""))


# ---------------------------------------------------------------------------------------------- conditioning
class ClassEmbedder(nn.Module):
    """The LDM's class embedder: labels (B,) -> (B, 1, dim); index num_classes is the learned null class."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding(labels).unsqueeze(1)


class DummyEncoder(nn.Module):
    """One learned vector used as encoder_hidden_states when there is no class: labels (B,) -> (B, 1, dim)."""

    def __init__(self, dim, init=None):
        super().__init__()
        # Starting from the LDM's null-class embedding makes the untrained ControlNet reproduce the LDM's
        # unconditional model exactly (controlnet_scale 0 == plain LDM).
        self.embedding = nn.Parameter(torch.zeros(1, 1, dim) if init is None else init.detach().clone().view(1, 1, dim))

    def forward(self, labels):
        return self.embedding.expand(labels.shape[0], -1, -1)


class ControlledUNet(nn.Module):
    """UNet + ControlNet + encoder in one module, so accelerate/DDP wraps whatever of them is trained."""

    def __init__(self, unet, controlnet, encoder):
        super().__init__()
        self.unet, self.controlnet, self.encoder = unet, controlnet, encoder

    def forward(self, latents, timesteps, labels, mask, controlnet_scale=1.0, embeddings=None):
        # embeddings (B, 1, dim): a condition given directly (class interpolation); else the encoder's of labels
        ehs = self.encoder(labels) if embeddings is None else embeddings
        down = mid = None
        if controlnet_scale != 0:  # scale 0: the mask is ignored, the ControlNet is not even run
            down, mid = self.controlnet(latents, timesteps, encoder_hidden_states=ehs, controlnet_cond=mask,
                                        conditioning_scale=float(controlnet_scale), return_dict=False)
        return self.unet(latents, timesteps, encoder_hidden_states=ehs, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, return_dict=False)[0]


def conditioning_widths(vae_factor):
    """Widths of the ControlNet's mask encoder: one stride-2 conv per factor of 2 of the VAE downsampling."""
    # diffusers' default (16, 32, 96, 256) downsamples by 8 (3 stride-2 convs) and only fits a factor-8 VAE;
    # the demo VAE downsamples by 4, so the mask encoder needs log2(factor) stride-2 convs instead.
    n = int(round(math.log2(vae_factor)))
    if 2 ** n != vae_factor:
        raise UserError(f"the VAE downsamples by {vae_factor}, which is not a power of 2")
    base = [16, 32, 96, 256]
    return tuple(base[: n + 1] if n + 1 <= len(base) else base + [256] * (n + 1 - len(base)))


def build_controlnet(unet, mask_channels, vae_factor):
    """A ControlNetModel whose encoder copies the UNet's (conv_in, time embedding, down and mid blocks)."""
    try:
        return ControlNetModel.from_unet(unet, conditioning_channels=mask_channels,
                                         conditioning_embedding_out_channels=conditioning_widths(vae_factor))
    except ValueError as e:
        raise UserError(f"the LDM's UNet cannot be turned into a ControlNet: {e}")


# ----------------------------------------------------------------------------------------------------- LDM
class LDM:
    """The parts of an LDM checkpoint: unet, class_embedder, vae and the facts needed around them."""


def load_vae(ref, ldm_path):
    """AutoencoderKL from a local diffusers folder (absolute, or relative to cwd / the checkpoint) or hub id."""
    candidates = [Path(ref)] if os.path.isabs(ref) else [Path(ref), Path(ldm_path).parent / ref]
    for c in candidates:
        if c.is_dir():
            try:
                return AutoencoderKL.from_pretrained(c), str(c.resolve())
            except Exception as e:
                raise UserError(f"cannot load the VAE folder {c} named by {ldm_path}: {e}")
    try:
        return AutoencoderKL.from_pretrained(ref), ref
    except Exception as e:
        raise UserError(f"cannot load the VAE '{ref}' named by {ldm_path} ({type(e).__name__}); pass --vae with "
                        f"the path of a local diffusers AutoencoderKL folder")


def load_ldm(path, trust=False, vae_override=None, use_ema=True):
    """Rebuild the LDM (EMA weights when present) from its checkpoint; UserError on anything else."""
    ck = validate_ldm_checkpoint(load_flagged_checkpoint(path, "--ldm_checkpoint", trust), path)
    ldm = LDM()
    ldm.path = str(path)
    ldm.unet_config = dict(ck["unet_config"])
    try:
        ldm.unet = UNet2DConditionModel.from_config(ldm.unet_config)
    except Exception as e:
        raise UserError(f"--ldm_checkpoint {path}: its unet_config does not build a UNet2DConditionModel ({e})")
    unet_sd = ck["ema_unet"] if use_ema and ck.get("ema_unet") is not None else ck["unet"]
    emb_sd = (ck["ema_class_embedder"] if use_ema and ck.get("ema_class_embedder") is not None
              else ck["class_embedder"])
    try:
        ldm.unet.load_state_dict(unet_sd)
        ldm.num_classes = int(ck["num_classes"])
        ldm.class_names = list(ck["class_names"])
        ldm.class_embedder = ClassEmbedder(ldm.num_classes, int(ldm.unet.config.cross_attention_dim))
        ldm.class_embedder.load_state_dict(emb_sd)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"--ldm_checkpoint {path}: weights do not match its stored config ({str(e)[:200]})")
    ldm.fingerprint = ldm_fingerprint(ldm.unet_config, unet_sd)
    ldm.vae, ldm.vae_ref = load_vae(vae_override or ck["vae"], path)
    ldm.scaling_factor = float(ck["vae_scaling_factor"])
    ldm.image_size = int(ck["image_size"])
    ldm.image_channels = int(ck["image_channels"])
    ldm.noise_scheduler_config = dict(ck["noise_scheduler_config"])
    cfg = ck.get("config")  # optional: the intensity window the LDM's images were read with (None: 8-bit / older)
    ldm.intensity = cfg.get("intensity") if isinstance(cfg, dict) and isinstance(cfg.get("intensity"), dict) else None
    ldm.vae_factor = 2 ** (len(ldm.vae.config.block_out_channels) - 1)
    ldm.latent_channels = int(ldm.vae.config.latent_channels)
    ldm.latent_size = ldm.image_size // ldm.vae_factor
    if ldm.latent_channels != ldm.unet.config.in_channels:
        raise UserError(f"the VAE {ldm.vae_ref} has {ldm.latent_channels} latent channels but the LDM's UNet "
                        f"expects {ldm.unet.config.in_channels}; pass the VAE the LDM was trained with (--vae)")
    for m in (ldm.unet, ldm.class_embedder, ldm.vae):
        m.requires_grad_(False).eval()
    return ldm


# ------------------------------------------------------------------------------------------------ the maths
def encode(vae, images, scaling_factor, generator=None):
    """Images in [-1, 1] (B, C, H, W) -> scaled latents (grayscale fed as equal channels)."""
    if images.shape[1] != vae.config.in_channels:
        images = images.expand(-1, vae.config.in_channels, -1, -1) if images.shape[1] == 1 else images
    return vae.encode(images.to(vae.dtype)).latent_dist.sample(generator) * scaling_factor


def decode(vae, latents, scaling_factor, image_channels):
    """Scaled latents -> images in [-1, 1] with image_channels channels."""
    x = vae.decode(latents.to(vae.dtype) / scaling_factor).sample.float().clamp(-1, 1)
    return x.mean(1, keepdim=True) if image_channels == 1 and x.shape[1] != 1 else x


def training_target(scheduler, latents, noise, timesteps):
    """What the UNet learns to predict under the LDM's prediction_type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise UserError(f"unsupported prediction_type '{kind}' in the LDM's noise_scheduler_config")


def min_snr_weights(scheduler, timesteps, snr_gamma):
    """Per-sample min-SNR-gamma loss weights (Hang et al. 2023) under the LDM's prediction_type."""
    snr = compute_snr(scheduler, timesteps)  # alpha_bar / (1 - alpha_bar)
    # The paper weights the x0-MSE by min(SNR, gamma); an eps-MSE is SNR x the x0-MSE, a v-MSE (SNR + 1) x it.
    # gamma / SNR clamped at 1 equals min(SNR, gamma) / SNR and stays finite where SNR underflows to 0.
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.clamp(snr_gamma / snr, max=1.0)
    if kind == "v_prediction":
        return torch.clamp(snr, max=snr_gamma) / (snr + 1)
    if kind == "sample":
        return torch.clamp(snr, max=snr_gamma)
    raise UserError(f"unsupported prediction_type '{kind}' in the LDM's noise_scheduler_config")


def _scheduler_kwargs(cls, cfg):
    """Keep only the schedule keys `cls` accepts (the LDM stores DDPMScheduler kwargs)."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "trained_betas")
    kw = {k: cfg[k] for k in keys if k in cfg}
    # Latents are not bounded to [-1, 1]: clipping the predicted x0 (diffusers' default for DDPM/DDIM) distorts.
    if cls in (DDPMScheduler, DDIMScheduler):
        kw["clip_sample"] = False
    return kw


def noise_scheduler(cfg):
    """The training noise process (DDPM) of the LDM."""
    return DDPMScheduler(**_scheduler_kwargs(DDPMScheduler, cfg))


def make_sampler(name, cfg):
    """ddpm | ddim (eta 0) | dpmsolver (DPM-Solver++ multistep, 2nd order) built on the LDM's schedule."""
    if name == "ddpm":
        return DDPMScheduler(**_scheduler_kwargs(DDPMScheduler, cfg))
    if name == "ddim":
        return DDIMScheduler(**_scheduler_kwargs(DDIMScheduler, cfg))
    if name == "dpmsolver":
        return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                           **_scheduler_kwargs(DPMSolverMultistepScheduler, cfg))
    raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got '{name}'")


def initial_latents(seeds, shape):
    """One independent Gaussian latent per seed (CPU generators: same numbers on any device)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    return torch.stack([torch.randn(shape, generator=g) for g in gens]), gens


@torch.no_grad()
def sample(model, sampler, latents, labels, mask, num_steps, controlnet_scale=1.0, generators=None,
           cfg_scale=1.0, null_label=None, progress=None, embeddings=None):
    """Run the reverse process from `latents`; returns denoised latents.

    With cfg_scale != 1 the prediction is guided away from the null class (classifier-free guidance);
    the mask drives both branches. `generators` (one per image) feed stochastic samplers (DDPM).
    `embeddings` (B, 1, dim) replace the encoder's embedding of `labels` in the conditional branch (class
    interpolation); the guidance branch stays the null class's embedding.
    """
    sampler.set_timesteps(num_steps)
    x = latents * sampler.init_noise_sigma
    guided = cfg_scale != 1.0 and null_label is not None
    steps = sampler.timesteps
    for t in (progress(steps) if progress else steps):
        inp = sampler.scale_model_input(x, t)
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        if guided:
            null = torch.full_like(labels, null_label)
            emb = None if embeddings is None else torch.cat([embeddings, model.encoder(null)])
            out = model(torch.cat([inp, inp]), torch.cat([tt, tt]), torch.cat([labels, null]),
                        torch.cat([mask, mask]), controlnet_scale, embeddings=emb)
            cond, uncond = out.float().chunk(2)
            pred = uncond + cfg_scale * (cond - uncond)
        else:
            pred = model(inp, tt, labels, mask, controlnet_scale, embeddings=embeddings).float()
        x = sampler.step(pred, t, x, generator=generators).prev_sample
    return x
