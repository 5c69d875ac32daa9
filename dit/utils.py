"""What only the DiT folder needs beside the shared runtime (runtime.py): the frozen VAE (--vae names,
loading, its fingerprint for the latent cache). Errors, flags, logging, devices, distributed runs,
precision, checkpoints, seeds and stop flags come from runtime.py.

Not a script; see train.py, sample.py and sample_ddp.py.
"""
import hashlib
import json
import os

from runtime import UserError

# UserError is re-exported for dataset.py (`from utils import UserError`).
__all__ = ["UserError", "VAE_SHORTCUTS", "resolve_vae_name", "load_vae", "vae_fingerprint"]

# --vae shortcuts: the Stable Diffusion VAEs fine-tuned by Stability AI, as in the DiT paper.
VAE_SHORTCUTS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def resolve_vae_name(spec):
    """--vae value -> hub id or absolute folder path."""
    if spec in VAE_SHORTCUTS:
        return VAE_SHORTCUTS[spec]
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    if os.path.exists(spec) or spec.startswith((".", "/", "~")):
        raise UserError(f"--vae {spec}: not a folder with a diffusers AutoencoderKL (config.json + weights)")
    return spec


def load_vae(spec, device):
    """The frozen AutoencoderKL named by --vae, in eval mode, plus a dict describing it."""
    from diffusers.models import AutoencoderKL
    name = resolve_vae_name(spec)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"--vae {spec}: {name} has no config.json (expected a folder written by "
                        f"AutoencoderKL.save_pretrained)")
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - offline hub, missing files, wrong folder
        raise UserError(f"--vae {spec}: cannot load an AutoencoderKL from {name} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without internet access, "
                        f"pass --vae <folder> with a local copy (AutoencoderKL.save_pretrained)") from None
    vae.requires_grad_(False).eval().to(device)
    cfg = vae.config
    info = {
        "vae": spec if spec in VAE_SHORTCUTS else name,
        "factor": 2 ** (len(cfg.block_out_channels) - 1),
        "latent_channels": int(cfg.latent_channels),
        "image_channels": int(cfg.in_channels),
        "scaling_factor": float(getattr(cfg, "scaling_factor", None) or 0.18215),
        # Some VAEs also centre their latents: z = (sample - shift_factor) * scaling_factor.
        "shift_factor": float(getattr(cfg, "shift_factor", None) or 0.0),
    }
    return vae, info


def vae_fingerprint(vae):
    """Hash of a VAE's config and weights (invalidates latent caches when the VAE changes)."""
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for k, v in vae.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
