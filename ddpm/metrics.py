"""Image and mask metrics of conditional DDPM inference: PSNR / SSIM (super-resolution), vote entropy and the
mean mask of N samples (segmentation), Dice over labels. Used by cond_inference.py; nothing to run here.

PSNR and SSIM are written here because neither scikit-image nor torchmetrics is a dependency of ddpm/. SSIM is
Wang et al. 2004 as usually reported (scikit-image's gaussian_weights=True, use_sample_covariance=False): an
11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, averaged over the channels and the window positions
that lie wholly inside the image ("valid" region). Dice of binary masks is pairing.dice, the one definition
the repository has (ControlNet's --report_dice uses it too).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from pairing import dice


def psnr(a, b, data_range=1.0):
    """Peak signal-to-noise ratio in dB of two float tensors (C, H, W); inf for identical images."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def _gaussian_window(size, sigma=1.5):
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a, b, data_range=1.0):
    """Structural similarity of two float tensors (C, H, W) in [0, data_range] (see the module docstring).

    Images smaller than 11 px (8 px models) use the largest odd window that fits, with the same sigma."""
    size = min(11, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2
    w = _gaussian_window(size)
    x, y = a.double()[:, None], b.double()[:, None]  # channels as a batch: per-channel SSIM maps
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx, vy = F.conv2d(x * x, w) - mx ** 2, F.conv2d(y * y, w) - my ** 2
    cxy = F.conv2d(x * y, w) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def vote_counts(votes, k):
    """Label votes (N, H, W) long -> counts (K, H, W): how many of the N samples chose each label."""
    return F.one_hot(votes.long(), k).sum(0).permute(2, 0, 1)


def majority_mask(votes, k):
    """The mean mask of N sampled masks: per pixel the label most samples chose (ties -> the lower label)."""
    return vote_counts(votes, k).argmax(0)


def label_entropy(votes, k):
    """Per-pixel entropy of N label votes (N, H, W), divided by its largest value log(min(N, K)): in [0, 1],
    0 where all samples agree, 1 for an even split (a single sample: all 0)."""
    n = votes.shape[0]
    if min(n, k) < 2:
        return torch.zeros(votes.shape[1:], dtype=torch.float64)
    p = vote_counts(votes, k).double() / n
    h = -(p * torch.log(p.clamp(min=1e-300))).sum(0)
    return (h / math.log(min(n, k))).clamp(0, 1)


def label_dice(a, b, k):
    """Dice of two label maps (H, W): binary masks their foreground; K > 2 the mean over the labels > 0
    present in either (1.0 when both are all background)."""
    a, b = np.asarray(a), np.asarray(b)
    if k == 2:
        return dice(a > 0, b > 0)
    labels = [v for v in range(1, k) if (a == v).any() or (b == v).any()]
    return float(np.mean([dice(a == v, b == v) for v in labels])) if labels else 1.0
