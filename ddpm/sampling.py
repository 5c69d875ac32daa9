"""The sampling calls that inference.py, cond_inference.py and serve.py share: one batch of images, their PNGs,
and the frames of an interpolation. Not run directly:

    from sampling import Settings, sample_batch, interpolation_frames
    s = Settings(sampler="ddim", steps=50, cfg_scale=3.0)
    imgs = sample_batch(diffusion, model, seeds=[0, 1], labels=[2, 2], s=s)   # what inference.py writes for them
    frames = interpolation_frames(diffusion, model, "seeds", (3, 9), (2,), s, frames=8)   # PIL frames t = 0 .. 1

Why one place: serve.py must give the images the CLI writes for the same settings (pixel-identical, same
names), so both call these functions rather than copies of them. Interpolation is deterministic DDIM (eta 0):
between two seeds it slerps their initial noise (animation.slerp), between two classes it mixes the two rows
of the class embedding, (1 - t) e[a] + t e[b], with the unconditional branch of guidance kept at the "no class"
token. Each end point is sampled in a batch of its own, as a one-image CLI run samples it, so frame 0 and
the last frame are bit for bit the plain samples (oneDNN may sum a batch of another size in another order).
"""
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import animation
import conditional
import runtime as rt
from models import Diffusion, default_sampling_steps


@dataclass
class Settings:
    """What changes the images of a sampling run (besides seeds, classes and the condition)."""
    sampler: str = "ddim"
    steps: int = 50
    cfg_scale: float = 3.0
    eta: float = None  # None: the sampler's own (1 for ddpm, 0 for ddim; dpmsolver takes none)
    cond_scale: float = 1.0
    batch_size: int = 8
    amp_dtype: object = None
    channels_last: bool = False


def default_steps(sampler, noise_steps):
    """--sampling-steps when not given: all T for ddpm, 50 for ddim, 25 for dpmsolver (or T if fewer)."""
    return default_sampling_steps(sampler, noise_steps)


def make_diffusion(info, device):
    """The noise process of a loaded checkpoint (inference.load_model's info)."""
    m, d = info["model"], info["diffusion"]
    return Diffusion(d["noise_steps"], d["beta_start"], d["beta_end"], m["img_size"], device, d["schedule"],
                     m["c_in"], d.get("prediction_type") or "epsilon")


def sample_batch(diffusion, model, seeds, labels, s, as_float=False, cond=None, x_init=None, class_emb=None):
    """One forward batch: per-image seeds and class indices (None: no class) -> uint8 (or float [0, 1]) images."""
    device = next(model.parameters()).device
    y = torch.tensor(list(labels), device=device) if labels is not None else None
    return diffusion.sample(model, len(seeds), labels=y, cfg_scale=s.cfg_scale, sampler=s.sampler, steps=s.steps,
                            seeds=list(seeds), eta=s.eta, progress=False, autocast_dtype=s.amp_dtype,
                            channels_last=s.channels_last, as_float=as_float, cond=cond, cond_scale=s.cond_scale,
                            x_init=x_init, class_emb=class_emb)


def png_image(img, task, k=2):
    """A sampled image as the PNG the CLI writes: uint8 image (generate), label PNG (masks, segmentation from a
    float [0, 1] code) or the 8-bit rounding of a float image (writers.write_image_once's png)."""
    if task in conditional.MASK_TARGET_TASKS:
        lab = conditional.decode_mask(img[None].float() * 2 - 1, k)[0]
        return Image.fromarray(conditional.mask_png(lab, k))
    if img.dtype == torch.uint8:
        return rt.to_pil(img)
    arr = np.round(np.clip(img.detach().float().cpu().numpy(), 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0)))


def float_output(task):
    """True when the sampler's float output is what the task's PNGs are made from (masks, paired tasks)."""
    return task != "generate"


@torch.no_grad()
def interpolation_frames(diffusion, model, mode, seeds, classes, s, frames=8, task="generate", k=2, cond=None):
    """PIL frames t = 0 .. 1 of a deterministic DDIM interpolation.

    mode "seeds": seeds = (A, B), classes = (class index,) or (None,): slerp of the two initial noises;
    mode "classes": seeds = (S,), classes = (a, b): the class embedding mixed linearly, noise of S.
    cond: the encoded condition (Cc, H, W) of an image-conditioned model (one condition for every frame)."""
    s = Settings(**{**s.__dict__, "sampler": "ddim", "eta": 0.0})
    ts = animation.interp_weights(frames)
    device = next(model.parameters()).device
    channels = model.c_in
    if mode == "seeds":
        z0, z1 = diffusion.initial_noise([seeds[0]], channels, device)[0], diffusion.initial_noise(
            [seeds[1]], channels, device)[0]
        x = torch.stack([animation.slerp(z0, z1, t) for t in ts])
        emb, label = None, classes[0]
    elif mode == "classes":
        if cond is not None or not getattr(model, "num_classes", None):
            raise ValueError("class interpolation needs a class-conditional model without an image condition")
        x = diffusion.initial_noise([seeds[0]], channels, device).expand(frames, -1, -1, -1).clone()
        e0, e1 = (model.label_emb(torch.tensor([c], device=device)) for c in classes)
        emb, label = torch.cat([animation.lerp(e0, e1, t) for t in ts]), classes[0]
    else:
        raise ValueError(f"unknown interpolation mode {mode!r} (seeds or classes)")
    n, bs = frames, s.batch_size
    groups = [[0]] + [list(range(i, min(i + bs, n - 1))) for i in range(1, n - 1, bs)] + [[n - 1]]
    out = []
    for idx in groups:
        imgs = sample_batch(diffusion, model, [seeds[0]] * len(idx), None if label is None else [label] * len(idx),
                            s, as_float=float_output(task), x_init=x[idx],
                            cond=None if cond is None else torch.stack([cond] * len(idx)),
                            class_emb=None if emb is None else emb[idx])
        out += [png_image(img, task, k) for img in imgs.cpu()]
    return out


def interpolation_stem(mode, seeds, class_names, steps, cfg_scale, frames, extra=""):
    """animation.interpolation_stem with DDPM's choices: DDIM, guidance in the name only for a class."""
    named = [c for c in class_names if c is not None]
    return animation.interpolation_stem(mode, seeds, named, "ddim", steps, cfg_scale if named else None, frames,
                                        extra)
