"""Memorization audit: is a generated image a near-copy of a training image? Calibrated on held-out real images.

Not run directly; `precision_recall.py --train_dir DIR` calls `audit` and `save_gallery`. From Python:

    import memorization
    res = memorization.audit(gen, train, heldout)            # (N, C, H, W) float tensors in [0, 1]
    memorization.save_gallery(gen, train, res, "closest_pairs.png")

Pixel mode (the default, offline, no network): the similarity of two images is their normalised
cross-correlation (NCC: each image minus its mean, divided by its norm, so brightness and contrast changes
do not matter) maximised over a horizontal flip and every integer shift of up to `max_shift` pixels, after a
light blur that takes out most JPEG and sensor noise. The search is coarse to fine: all training images are
ranked per query by the NCC of 16 px grey thumbnails (flip-invariant; one matrix product per chunk), and the
`candidates` best are scored exactly at full resolution, every shift at once by FFT cross-correlation.
Near-copies always rank among the candidates (tests compare with an exhaustive search); for novel images the
reported similarity is the best over the candidates, a lower bound of the exhaustive one (on 8,000 64 px
textures 0.06 lower on average), and held-out images get the very same search, so the threshold matches.
Feature mode (`features=(gen_f, train_f, heldout_f)`): cosine similarity in the given feature space.
Held-out images (real images NOT in the training set) go through exactly the same search; the copy threshold
is the (1 - false_flag_rate) quantile of their best similarities, so at most that share of genuinely new
real images would be called copies. A generated image is a copy when its best similarity is above it.
"""
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CHUNK_BYTES = 128 * 2 ** 20  # working memory per chunk (similarity rows, spectra)
SPECTRA_BYTES = 2 ** 30      # training-set spectra up to this size are computed once, not per candidate
COARSE_SIDE = 16             # thumbnails of about this side rank the candidates
NEAR_IDENTICAL = 0.99        # held-out images this similar to a training image are suspicious


def _bar(total, desc, progress):
    """A tqdm bar on stderr (a no-op object when progress is off or tqdm is missing)."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a requirement of the evaluator
        progress = False
    if not progress:
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Null()
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True)


# ----------------------------------------------------------------------------- validation
def _images(x, label):
    """A float32 CPU tensor (N, C, H, W) from a tensor or array; ValueError naming `label` otherwise."""
    if x is None:
        raise ValueError(f"{label}: no images given")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 4:
        raise ValueError(f"{label}: expected images of shape (N, C, H, W), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{label}: the set is empty")
    if t.shape[1] < 1 or t.shape[2] < 8 or t.shape[3] < 8:
        raise ValueError(f"{label}: images of shape {tuple(t.shape[1:])} are too small (need C >= 1, H, W >= 8)")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{label}: images contain NaN or infinite values")
    return t


def _features(f, label):
    """A float32 (N, D) array; ValueError naming `label` otherwise."""
    a = np.asarray(f, dtype=np.float32) if f is not None else None
    if a is None or a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{label}: expected a non-empty (N, D) feature array, got "
                         f"{'nothing' if a is None else 'shape ' + str(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{label}: features contain NaN or infinite values")
    return a


def _check_names(names, n, label):
    if names is not None and len(names) != n:
        raise ValueError(f"{label}: {len(names)} names for {n} images")


def _check_settings(false_flag_rate, max_shift, candidates, batch):
    try:
        ffr = float(false_flag_rate)
    except (TypeError, ValueError):
        raise ValueError(f"false_flag_rate must be a number in (0, 1), got {false_flag_rate!r}") from None
    if not 0.0 < ffr < 1.0:
        raise ValueError(f"false_flag_rate must be in (0, 1), got {false_flag_rate!r}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"max_shift must be an integer >= 0, got {max_shift!r}")
    if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1):
        raise ValueError(f"batch must be an integer >= 1 or None, got {batch!r}")
    return ffr


# ----------------------------------------------------------------------------- pixel mode
def _blur(x):
    """3x3 binomial blur per channel (reflect padding): damps JPEG blocks and pixel noise, keeps structure."""
    p = F.pad(x, (1, 1, 1, 1), mode="reflect")
    p = 0.25 * p[..., :-2] + 0.5 * p[..., 1:-1] + 0.25 * p[..., 2:]
    return 0.25 * p[..., :-2, :] + 0.5 * p[..., 1:-1, :] + 0.25 * p[..., 2:, :]


def _grey_replicated(x):
    """True when every channel equals the first (grey images copied to 3 channels, as the decoder does)."""
    return x.shape[1] == 1 or all(torch.equal(x[:, 0], x[:, c]) for c in range(1, x.shape[1]))


def prepare(x, grey, chunk=512):
    """Images as the pixel search compares them: grey (channel mean) if asked, blurred, each minus its mean."""
    n, c, h, w = x.shape
    out = torch.empty(n, 1 if grey else c, h, w, dtype=torch.float32)
    for s in range(0, n, chunk):
        b = x[s:s + chunk]
        if grey:
            b = b.mean(1, keepdim=True)
        b = _blur(b)
        out[s:s + chunk] = b - b.mean((1, 2, 3), keepdim=True)
    return out


def _thumbs(p):
    """Unit-norm, zero-mean grey thumbnails of prepared images (N, d) and of their mirror images."""
    f = max(1, min(p.shape[2], p.shape[3]) // COARSE_SIDE)
    g = p.mean(1, keepdim=True)
    if f > 1:
        g = F.avg_pool2d(g, f, f)
    t = g.flatten(1)
    tf = g.flip(-1).flatten(1)

    def unit(v):
        v = v - v.mean(1, keepdim=True)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit(t), unit(tf)


def _coarse(q, qf, t, k, device, bar):
    """Indices (Nq, k) of the k training thumbnails closest to each query (max over the flip), sorted."""
    rows = max(1, CHUNK_BYTES // (8 * t.shape[0]))
    tt = t.to(device).T.contiguous()
    out = torch.empty(q.shape[0], k, dtype=torch.long)
    for s in range(0, q.shape[0], rows):
        a, af = q[s:s + rows].to(device), qf[s:s + rows].to(device)
        sim = torch.maximum(a @ tt, af @ tt)
        out[s:s + rows] = sim.topk(k, dim=1).indices.sort(dim=1).values.cpu()
        bar.update(a.shape[0])
    return out


def _window_norms(t, s, chunk=256):
    """Per training image (N, S, S): norm of every (H-2s, W-2s) window minus its own mean (integral images)."""
    n, c, h, w = t.shape
    hh, ww, size = h - 2 * s, w - 2 * s, 2 * s + 1
    m = c * hh * ww
    out = torch.empty(n, size, size, dtype=torch.float32)
    for i in range(0, n, chunk):
        b = t[i:i + chunk].double()
        s1, s2 = b.sum(1), (b * b).sum(1)

        def box(v):
            ii = F.pad(v.cumsum(1).cumsum(2), (1, 0, 1, 0))
            return ii[:, hh:, ww:] - ii[:, :size, ww:] - ii[:, hh:, :size] + ii[:, :size, :size]
        var = box(s2) - box(s1) ** 2 / m
        out[i:i + chunk] = var.clamp_min(0).sqrt().float()
    return out


def _train_spectra(tp, device, chunk=256):
    """rfft2 of every prepared training image, or None when they would take more than SPECTRA_BYTES."""
    n, c, h, w = tp.shape
    if n * c * h * (w // 2 + 1) * 8 > SPECTRA_BYTES:
        return None
    out = torch.empty(n, c, h, w // 2 + 1, dtype=torch.complex64)
    for i in range(0, n, chunk):
        out[i:i + chunk] = torch.fft.rfft2(tp[i:i + chunk].to(device)).cpu()
    return out


def _refine(qp, tp, tspec_all, tnorm, cand, s, device, batch, bar):
    """Exact best NCC of each query over its candidates, both flips and every shift up to s pixels.

    The query's central (H-2s, W-2s) crop is the template; its cross-correlation with the whole training
    image at all (2s+1)^2 offsets comes from one FFT product (the crop is zero-padded to H x W, and offsets
    0..2s never wrap). The template has zero mean, so the numerator needs no window mean; the window's
    norm comes from integral images (`_window_norms`). Returns best similarity, train index, flip, shift.
    """
    nq, c, h, w = qp.shape
    k = cand.shape[1]
    hh, ww, size = h - 2 * s, w - 2 * s, 2 * s + 1
    per_pair = 4 * c * h * w * 3 + 8 * c * h * (w // 2 + 1) * 2 + 8 * 2 * h * (w // 2 + 1) + 4 * 2 * h * w
    step = batch or max(1, CHUNK_BYTES // (per_pair * k))
    best = torch.empty(nq)
    nearest = torch.empty(nq, dtype=torch.long)
    flip = torch.empty(nq, dtype=torch.bool)
    shift = torch.empty(nq, 2, dtype=torch.long)
    for i in range(0, nq, step):
        crop = qp[i:i + step, :, s:s + hh, s:s + ww].to(device)
        crop = crop - crop.mean((1, 2, 3), keepdim=True)
        crop = crop / crop.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
        tmpl = torch.stack([crop, crop.flip(-1)], 1)                         # (B, 2, C, hh, ww)
        ci = cand[i:i + step]
        if tspec_all is not None:
            tspec = tspec_all[ci].to(device)                                 # (B, k, C, H, W/2+1)
        else:
            tspec = torch.fft.rfft2(tp[ci].to(device))
        qspec = torch.fft.rfft2(tmpl, s=(h, w))                              # (B, 2, C, H, W/2+1)
        prod = torch.einsum("bfcyx,bkcyx->bkfyx", qspec.conj(), tspec)
        num = torch.fft.irfft2(prod, s=(h, w))[..., :size, :size]            # (B, k, 2, S, S)
        den = tnorm[ci].to(device)[:, :, None]                               # (B, k, 1, S, S)
        ncc = torch.where(den > 1e-6, num / den.clamp_min(1e-6), torch.zeros_like(num)).clamp(-1, 1)
        flat = ncc.flatten(1).cpu()
        val, arg = flat.max(1)  # first maximum on ties: lowest train index, unflipped, smallest offset
        kk, rest = arg // (2 * size * size), arg % (2 * size * size)
        best[i:i + step] = val
        nearest[i:i + step] = ci.gather(1, kk[:, None])[:, 0]
        flip[i:i + step] = (rest // (size * size)) == 1
        shift[i:i + step, 0] = (rest % (size * size)) // size - s
        shift[i:i + step, 1] = rest % size - s
        bar.update(crop.shape[0])
    return best, nearest, flip, shift


def _pixel_search(queries, tp, thumbs_t, tnorm, s, k, device, batch, grey, progress, label):
    """Coarse ranking then exact refinement of each query set against the prepared training images."""
    tspec = _train_spectra(tp, device)
    out = []
    for q, name in zip(queries, label):
        qp = prepare(q, grey)
        th, thf = _thumbs(qp)
        bar = _bar(2 * q.shape[0], f"memorization: {name}", progress)
        cand = _coarse(th, thf, thumbs_t, k, device, bar)
        out.append(_refine(qp, tp, tspec, tnorm, cand, s, device, batch, bar))
        bar.close()
    return out


# ----------------------------------------------------------------------------- feature mode
def _cosine_top1(q, t, device, bar):
    """Best cosine similarity of each query row to the training rows, and the index of that row."""
    def unit(a):
        a = torch.as_tensor(a, dtype=torch.float32)
        return a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q, tt = unit(q), unit(t).to(device).T.contiguous()
    rows = max(1, CHUNK_BYTES // (4 * tt.shape[1]))
    best, idx = torch.empty(q.shape[0]), torch.empty(q.shape[0], dtype=torch.long)
    for s in range(0, q.shape[0], rows):
        v, j = (q[s:s + rows].to(device) @ tt).max(1)
        best[s:s + rows], idx[s:s + rows] = v.cpu(), j.cpu()
        bar.update(v.shape[0])
    return best.clamp(-1, 1), idx


# ----------------------------------------------------------------------------- calibration
def calibrate(heldout_sim, false_flag_rate):
    """Threshold = the ceil((1 - rate) n)-th smallest held-out similarity: at most rate * n are above it."""
    h = np.sort(np.asarray(heldout_sim, dtype=np.float64))
    k = min(len(h), max(1, math.ceil((1.0 - false_flag_rate) * len(h) - 1e-9)))
    return float(h[k - 1])


def audit(gen, train, heldout, *, false_flag_rate=0.01, max_shift=2, features=None, gen_names=None,
          train_names=None, device="cpu", batch=None, progress=True, candidates=10):
    """Find each generated image's most similar training image; flag those above the held-out threshold.

    gen / train / heldout: (N, C, H, W) float images in [0, 1] (same C, H, W); in feature mode they may be
    None (then `save_gallery` cannot be used). features: None (pixel NCC) or (gen_f, train_f, heldout_f).
    candidates: training images per query that the coarse stage passes to the exact pixel search.
    batch: queries per refinement chunk (default: as many as fit in ~128 MB). Returns a plain dict: the
    contract's keys plus `heldout_similarity` / `heldout_nearest`, `n_copies`, `warnings` (a held-out set too
    small for the rate, held-out images that look like training images) and, per copy, `gen_index`,
    `train_index` and in pixel mode `flipped` and `shift` [dy, dx]: gen (mirrored if flipped)[y, x] ~
    train[y + dy, x + dx].
    """
    t0 = time.perf_counter()
    ffr = _check_settings(false_flag_rate, max_shift, candidates, batch)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: use cpu, cuda or cuda:N") from None
    warnings = []
    if features is None:
        g, t, h = _images(gen, "gen"), _images(train, "train"), _images(heldout, "heldout")
        shapes = {tuple(x.shape[2:]) for x in (g, t, h)}
        if len(shapes) != 1:
            raise ValueError(f"gen, train and heldout images must have the same height and width, got "
                             f"{tuple(g.shape[2:])}, {tuple(t.shape[2:])}, {tuple(h.shape[2:])}; resize them first")
        side = min(g.shape[2], g.shape[3])
        if 4 * max_shift >= side:
            raise ValueError(f"max_shift {max_shift} is too large for {g.shape[2]}x{g.shape[3]} images "
                             f"(at most {(side - 1) // 4})")
        n_gen, n_train, n_held = len(g), len(t), len(h)
        _check_names(gen_names, n_gen, "gen_names")
        _check_names(train_names, n_train, "train_names")
        chans = {x.shape[1] for x in (g, t, h)}
        grey = len(chans) > 1 or all(_grey_replicated(x) for x in (g, t, h))
        tp = prepare(t, grey)
        thumbs_t, _ = _thumbs(tp)
        tnorm = _window_norms(tp, max_shift)
        k = min(int(candidates), n_train)
        (gs, gn, gflip, gshift), (hs, hn, _, _) = _pixel_search(
            (g, h), tp, thumbs_t, tnorm, int(max_shift), k, dev, batch, grey, progress, ("gen", "held-out"))
        method = "pixel-ncc"
    else:
        if not isinstance(features, (tuple, list)) or len(features) != 3:
            raise ValueError("features must be a tuple (gen_features, train_features, heldout_features)")
        gf, tf, hf = (_features(f, n) for f, n in zip(features, ("gen features", "train features",
                                                                 "heldout features")))
        if not gf.shape[1] == tf.shape[1] == hf.shape[1]:
            raise ValueError(f"feature dimensions differ: gen {gf.shape[1]}, train {tf.shape[1]}, "
                             f"heldout {hf.shape[1]}")
        for imgs, f, name in ((gen, gf, "gen"), (train, tf, "train"), (heldout, hf, "heldout")):
            if imgs is not None and len(imgs) != len(f):
                raise ValueError(f"{name}: {len(imgs)} images but {len(f)} feature rows")
        n_gen, n_train, n_held = len(gf), len(tf), len(hf)
        _check_names(gen_names, n_gen, "gen_names")
        _check_names(train_names, n_train, "train_names")
        bar = _bar(n_gen + n_held, "memorization: features", progress)
        gs, gn = _cosine_top1(gf, tf, dev, bar)
        hs, hn = _cosine_top1(hf, tf, dev, bar)
        bar.close()
        gflip = gshift = None
        method = "feature-cosine"
    gs_np, hs_np = gs.double().numpy(), hs.double().numpy()
    threshold = calibrate(hs_np, ffr)
    flagged = gs_np > threshold
    if n_held * ffr < 1:
        warnings.append(f"{n_held} held-out images cannot resolve a false-flag rate of {ffr:g} "
                        f"(needs at least {math.ceil(1 / ffr)}): the threshold is the highest held-out similarity")
    near = int((hs_np >= NEAR_IDENTICAL).sum()) if method == "pixel-ncc" else 0
    if near > max(1, ffr * n_held):
        warnings.append(f"{near} of {n_held} held-out images are near-identical to training images "
                        f"(similarity >= {NEAR_IDENTICAL}): are they really held out of training?")
    order = sorted(np.flatnonzero(flagged), key=lambda i: (-gs_np[i], i))
    copies = []
    for i in order:
        j = int(gn[i])
        c = {"gen": gen_names[i] if gen_names is not None else int(i),
             "train": train_names[j] if train_names is not None else j,
             "similarity": float(gs_np[i]), "gen_index": int(i), "train_index": j}
        if gflip is not None:
            c["flipped"] = bool(gflip[i])
            c["shift"] = [int(gshift[i, 0]), int(gshift[i, 1])]
        copies.append(c)
    return {"method": method, "threshold": threshold, "false_flag_rate": ffr,
            "heldout_flag_rate": float((hs_np > threshold).mean()), "copy_rate": float(flagged.mean()),
            "n_gen": n_gen, "n_train": n_train, "n_heldout": n_held, "n_copies": len(copies),
            "similarity": [float(v) for v in gs_np], "nearest": [int(v) for v in gn],
            "heldout_similarity": [float(v) for v in hs_np], "heldout_nearest": [int(v) for v in hn],
            "copies": copies, "max_shift": int(max_shift) if method == "pixel-ncc" else None,
            "candidates": int(candidates) if method == "pixel-ncc" else None, "warnings": warnings,
            "seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- gallery
def gallery_layout(h, w, n, cols=4):
    """Sizes of the gallery grid: (scale, frame, caption, tile_w, tile_h, cols, rows, width, height)."""
    scale = max(1, 64 // max(h, w))
    hs, ws = h * scale, w * scale
    frame, caption = max(2, ws // 32), 12
    tile_w, tile_h = 2 * ws + 3 * frame, hs + 2 * frame + caption
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    return scale, frame, caption, tile_w, tile_h, cols, rows, cols * tile_w, rows * tile_h


def _to_rgb_uint8(x, scale):
    x = x.detach().float().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] != 3:
        x = x[:3] if x.shape[0] > 3 else x.mean(0, keepdim=True).expand(3, -1, -1)
    a = (x * 255).round().byte().permute(1, 2, 0).numpy()
    if scale > 1:
        a = a.repeat(scale, 0).repeat(scale, 1)
    return a


def save_gallery(gen, train, result, path, max_pairs=16):
    """PNG grid of the closest pairs (generated | training), most similar first; flagged pairs framed in red.

    Each tile is framed (red: flagged as a copy, grey: not) with the similarity written under it; images
    smaller than 64 px are enlarged by an integer factor (`gallery_layout` gives the exact size).
    Written to a temporary file in the same folder, then moved into place. Returns the path.
    """
    from PIL import Image, ImageDraw

    if not isinstance(max_pairs, (int, np.integer)) or isinstance(max_pairs, bool) or max_pairs < 1:
        raise ValueError(f"max_pairs must be an integer >= 1, got {max_pairs!r}")
    for key in ("similarity", "nearest", "threshold"):
        if key not in result:
            raise ValueError(f"result: not an audit result (no '{key}')")
    g, t = _images(gen, "gen"), _images(train, "train")
    sim, near = result["similarity"], result["nearest"]
    if len(sim) != len(g) or (near and max(near) >= len(t)):
        raise ValueError(f"result: made for {len(sim)} generated / {result.get('n_train')} training images, "
                         f"given {len(g)} / {len(t)}")
    if g.shape[2:] != t.shape[2:]:
        raise ValueError(f"gen and train images differ in size: {tuple(g.shape[2:])} vs {tuple(t.shape[2:])}")
    order = sorted(range(len(sim)), key=lambda i: (-sim[i], i))[:max_pairs]
    scale, frame, caption, tile_w, tile_h, cols, rows, width, height = gallery_layout(
        g.shape[2], g.shape[3], len(order))
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    ws = g.shape[3] * scale
    for n, i in enumerate(order):
        x0, y0 = (n % cols) * tile_w, (n // cols) * tile_h
        flagged = sim[i] > result["threshold"]
        draw.rectangle([x0, y0, x0 + tile_w - 1, y0 + tile_h - caption - 1],
                       fill=(220, 0, 0) if flagged else (160, 160, 160))
        canvas.paste(Image.fromarray(_to_rgb_uint8(g[i], scale)), (x0 + frame, y0 + frame))
        canvas.paste(Image.fromarray(_to_rgb_uint8(t[near[i]], scale)), (x0 + 2 * frame + ws, y0 + frame))
        label = f"{sim[i]:.3f}{' copy' if flagged else ''}"
        draw.text((x0 + frame, y0 + tile_h - caption), label, fill=(220, 0, 0) if flagged else (0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            canvas.save(fh, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)
