"""Closed-form helpers for Gaussian diffusion: KL between Gaussians and discretised log-likelihoods.

Formulas from Ho et al. 2020 (sec. 3.3) and Nichol & Dhariwal 2021; log-likelihoods are in nats.
"""
import math

import numpy as np
import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise; scalars broadcast."""
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    logvar1, logvar2 = (v if isinstance(v, torch.Tensor) else torch.tensor(v).to(ref)
                        for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Fast tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def continuous_gaussian_log_likelihood(x, *, means, log_scales):
    """Log density of x under N(means, exp(log_scales)^2)."""
    z = (x - means) * torch.exp(-log_scales)
    return torch.distributions.Normal(torch.zeros_like(x), torch.ones_like(x)).log_prob(z)


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log probability of 8-bit data x in [-1, 1] (bins of width 2/255) under a Gaussian."""
    assert x.shape == means.shape == log_scales.shape
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The outermost bins extend to -inf / +inf.
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def mean_flat(tensor):
    """Mean over every dimension except the batch."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def log2(x):
    """Nats -> bits helper constant."""
    return x / np.log(2.0)
