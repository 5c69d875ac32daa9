"""Interpolation and animation helpers shared by every model folder (vendored: scripts/vendored/animation.py).

    slerp(z0, z1, t)                      spherical interpolation of two initial noises (one sample or a batch)
    lerp(a, b, t)                         linear interpolation of two class embeddings
    interp_weights(frames)                the frames' positions 0 .. 1 (both end points included)
    interpolation_stem(...)               the file stem that names an interpolation by seeds, classes, steps
    write_interpolation(frames, folder, stem)   <stem>.png (the frames side by side) + <stem>.gif, never overwritten
    update_progress_gif(frame_files, gif)       training animation: progress.gif from the periodic sample grids
    refresh_progress_gif(frames_dir, pattern, unit, gif)   the same from the grid files a trainer wrote
    save_progress_frame(grid, run_dir, step)    a grid tensor -> samples/step_NNNNNNN.png, then the GIF (LDM, DiT)

Why by hand: diffusers and torchvision have no slerp for noise tensors and no GIF writer; Pillow writes the
GIF, this file only decides frames, order and names. Edit the source in scripts/vendored/ and run
`python scripts/sync_vendored.py`; tests/test_vendored.py fails when a copy drifts.
"""
import io
import os
import re
from pathlib import Path

import numpy as np
import torch

from runtime import _temp_in, save_png_replace  # _temp_in: hidden, beside the target, the user's permissions

GIF_FRAME_MS = 250       # interpolation GIFs: 4 frames per second
PROGRESS_FRAME_MS = 400  # training animation: slower, one frame per sample grid
MAX_PROGRESS_FRAMES = 120  # a long run keeps an even selection (always the first and the last grid)


def interp_weights(frames):
    """`frames` positions from 0 to 1 inclusive, as Python floats (frames >= 2)."""
    if frames < 2:
        raise ValueError("an interpolation needs at least 2 frames")
    return [i / (frames - 1) for i in range(frames)]


def slerp(z0, z1, t, eps=1e-7):
    """Spherical interpolation between two noise tensors of the same shape, per leading sample.

    Gaussian noise lives near a sphere of radius sqrt(dim): a straight line between two draws passes
    through low-norm points the model never saw, the great circle keeps the norm (Shoemake 1985; used
    for diffusion latents since DDIM, Song et al. 2021, sec. 5.3). t = 0 and t = 1 return z0 and z1
    exactly (the end points of an interpolation equal the plain samples of the two seeds)."""
    if z0.shape != z1.shape:
        raise ValueError(f"slerp: shapes differ ({tuple(z0.shape)} vs {tuple(z1.shape)})")
    if t == 0:
        return z0.clone()
    if t == 1:
        return z1.clone()
    a, b = z0.double().flatten(), z1.double().flatten()
    cos = torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(eps), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-4:  # (almost) the same direction: the circle is a line
        out = (1 - t) * a + t * b
    else:
        out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return out.reshape(z0.shape).to(z0.dtype)


def lerp(a, b, t):
    """Linear interpolation of two embeddings (class interpolation); exact at t = 0 and t = 1."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    return (1 - t) * a + t * b


def safe_part(text):
    """A class name or tag made safe for one file-name component (no separators, no dots at the start)."""
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(text)).strip(".-")
    return s or "x"


def interpolation_stem(mode, seeds, classes, sampler, steps, guidance=None, frames=None, extra=""):
    """interp_seeds<A>-<B>_<class>_... or interp_classes_<a>-<b>_seed<S>_...: what made it is in the name.

    mode "seeds": seeds = (A, B), classes = (class,) or () for an unconditional model;
    mode "classes": seeds = (S,), classes = (a, b)."""
    cls = [safe_part(c) for c in classes]
    if mode == "seeds":
        head = f"interp_seeds{seeds[0]}-{seeds[1]}" + (f"_{cls[0]}" if cls else "")
    elif mode == "classes":
        head = f"interp_classes_{cls[0]}-{cls[1]}_seed{seeds[0]}"
    else:
        raise ValueError(f"unknown interpolation mode {mode!r} (seeds or classes)")
    tail = f"_{sampler}{steps}"
    if guidance is not None:
        tail += f"_cfg{guidance:g}"
    if frames is not None:
        tail += f"_f{frames}"
    return head + tail + (f"_{safe_part(extra)}" if extra else "")


def to_pil_frame(image):
    """(C,H,W) uint8 / float-in-[0,1] tensor or array, or a PIL image -> PIL 'L' or 'RGB'."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image if image.mode in ("L", "RGB") else image.convert("RGB")
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    return Image.fromarray(np.ascontiguousarray(arr))


def strip(frames, pad=2):
    """The frames side by side on a white background, left (t = 0) to right (t = 1)."""
    from PIL import Image
    ims = [to_pil_frame(f) for f in frames]
    mode = "L" if all(im.mode == "L" for im in ims) else "RGB"
    ims = [im.convert(mode) for im in ims]
    w, h = ims[0].size
    out = Image.new(mode, (len(ims) * w + (len(ims) - 1) * pad, h), 255 if mode == "L" else (255, 255, 255))
    for i, im in enumerate(ims):
        out.paste(im, (i * (w + pad), 0))
    return out


def gif_bytes(frames, duration_ms=GIF_FRAME_MS, boomerang=True):
    """An endlessly looping GIF of the frames (forward, then back when `boomerang`), as bytes."""
    ims = [to_pil_frame(f).convert("RGB") for f in frames]
    if boomerang and len(ims) > 2:
        ims = ims + ims[-2:0:-1]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=duration_ms, loop=0,
                optimize=False, disposal=1)
    return buf.getvalue()


def png_bytes(image):
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    to_pil_frame(image).save(buf, format="PNG")
    return buf.getvalue()


def _write_once(data, path):
    """Bytes to `path` unless a file is there (temporary file + os.link, as runtime.save_png_once)."""
    path = Path(path)
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_in(path.parent, path.stem)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    finally:
        os.unlink(tmp)


def write_interpolation(frames, folder, stem, duration_ms=GIF_FRAME_MS):
    """Write <folder>/<stem>.png (strip) and <stem>.gif; existing files are kept. -> (png, gif, written)."""
    folder = Path(folder)
    png, gif = folder / f"{stem}.png", folder / f"{stem}.gif"
    wrote = _write_once(png_bytes(strip(frames)), png)
    wrote = _write_once(gif_bytes(frames, duration_ms), gif) or wrote
    return png, gif, wrote


def _caption(im, text):
    """The frame with a white band below it that says `text` (e.g. "step 1200")."""
    from PIL import Image, ImageDraw
    band = 12
    out = Image.new("RGB", (im.width, im.height + band), (255, 255, 255))
    out.paste(im.convert("RGB"), (0, 0))
    ImageDraw.Draw(out).text((2, im.height), text, fill=(0, 0, 0))
    return out


def progress_frames(files, max_frames=MAX_PROGRESS_FRAMES):
    """An even selection of at most max_frames files that always keeps the first and the last."""
    files = list(files)
    if len(files) <= max_frames:
        return files
    idx = np.unique(np.round(np.linspace(0, len(files) - 1, max_frames)).astype(int))
    return [files[i] for i in idx]


def update_progress_gif(frame_files, gif_path, captions=None, duration_ms=PROGRESS_FRAME_MS,
                        max_frames=MAX_PROGRESS_FRAMES):
    """(Re)build the training animation from the sample grids written so far, in the given order.

    The trainers sample their grids from the same seeds every time, so the GIF shows one set of images
    improving. Rewritten atomically after every grid (a temporary file, then os.replace): a crash never
    leaves a broken GIF, and a resumed run continues the animation from its earlier grids. Frames of
    another size (a grid from before a config change) are resized to the newest grid's size."""
    from PIL import Image
    files = [Path(f) for f in frame_files]
    captions = list(captions) if captions is not None else [None] * len(files)
    pairs = progress_frames(list(zip(files, captions)), max_frames)
    if not pairs:
        return None
    ims = []
    for f, cap in pairs:
        with Image.open(f) as im:
            im = im.convert("RGB")
        ims.append(_caption(im, cap) if cap else im)
    size = ims[-1].size
    ims = [im if im.size == size else im.resize(size, Image.NEAREST) for im in ims]
    gif_path = Path(gif_path)
    tmp = _temp_in(gif_path.parent, "progress", ".gif.tmp")
    try:
        ims[0].save(tmp, format="GIF", save_all=True, append_images=ims[1:], duration=duration_ms, loop=0)
        os.replace(tmp, gif_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return gif_path


def refresh_progress_gif(frames_dir, pattern, unit, gif_path, upto=None, log=None):
    """progress.gif from the grids in frames_dir whose names match `pattern` (its one group: the step or epoch
    number), in number order, captioned "<unit> N"; frames numbered past `upto` (an older, longer run in the
    same folder) are left out. Any failure is a warning through `log`: an animation never stops training."""
    try:
        found = sorted((int(m.group(1)), f) for f in Path(frames_dir).iterdir()
                       if (m := re.fullmatch(pattern, f.name)) and (upto is None or int(m.group(1)) <= upto))
        return update_progress_gif([f for _, f in found], gif_path, captions=[f"{unit} {n}" for n, _ in found])
    except Exception as e:  # noqa: BLE001 - disk full, a broken old frame, Pillow's many error types
        if log is not None:
            log.warning(f"warning: could not update {gif_path} (cannot write the animation: {type(e).__name__}: "
                        f"{str(e)[:200]})")
        return None


def save_progress_frame(grid, run_dir, step, gray=False, log=None):
    """A sample grid ((C,H,W) floats in [0, 1]) as <run_dir>/samples/step_NNNNNNN.png ('L' when `gray`), then
    <run_dir>/progress.gif rebuilt from every frame up to `step` (trainers that log grids only to TensorBoard)."""
    run_dir = Path(run_dir)
    frames = run_dir / "samples"
    try:
        frames.mkdir(parents=True, exist_ok=True)
        img = to_pil_frame(grid.float().clamp(0, 1))
        save_png_replace(img.convert("L") if gray else img, frames / f"step_{step:07d}.png")
    except Exception as e:  # noqa: BLE001 - as above: a preview only
        if log is not None:
            log.warning(f"warning: could not update {run_dir / 'progress.gif'} (cannot write the frame of step "
                        f"{step}: {str(e)[:200]})")
        return None
    return refresh_progress_gif(frames, r"step_(\d+)\.png", "step", run_dir / "progress.gif", upto=step, log=log)


def gif_frame_count(path):
    """Number of frames in a GIF (tests and logs)."""
    from PIL import Image
    with Image.open(path) as im:
        return getattr(im, "n_frames", 1)
