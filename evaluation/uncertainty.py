"""Uncertainty of the metrics: bootstrap intervals, the real-versus-real floor split, small-set warnings.

Not run directly; `precision_recall.py` calls it (`--bootstrap N`). Example on feature arrays (N x D):

    import uncertainty
    ci = uncertainty.metric_intervals(real_f, gen_f, real_nn, gen_nn, ["fid", "precision"], n=100)
    a, b = uncertainty.split_halves(groups, seed=0)          # two halves of the real set, whole patients
    for line in uncertainty.size_warnings(len(real_f), len(gen_f), ["fid"], dims=2048): print(line)

Intervals are percentile bootstrap intervals: both sets are resampled with replacement `n` times (seeded
NumPy generator, so the same seed gives the same interval) and the (alpha/2, 1 - alpha/2) quantiles of the
replicates are reported with their standard deviation, re-centred on the point estimate (shifted by
estimate - median of the replicates; `center=False` gives the raw percentile interval). Why: a resample holds
only ~63% distinct images, which by itself moves every replicate: measured on 16-d Gaussians (N = 100 per
set, 40 draws) the raw replicates of FD sat +1.6 above the estimate and precision / recall / coverage
-0.09 to -0.11 below it, so the raw 95% interval missed its own estimate in 0-70% of draws. Their spread is
right (bootstrap std within ~20% of the std over fresh samples), so the re-centred interval keeps it; it then
covered the mean of fresh-sample estimates in 88-97% of draws (N = 100 and 400). It describes how much the
number moves with another sample of the same size; FD's own small-set bias (the same for every model at
equal sizes) is not removed.

The k-NN metrics (precision, recall, density, coverage) are bootstrapped with the radii of the full sets held
fixed: a resample repeats points, and a repeated point's copies lie at distance 0 from it, so radii recomputed
on a resample shrink. Measured (200 points a set, 16-d and 64-d Gaussians, 10 draws), the median replicate
minus the estimate was density -0.09 / -0.08 and coverage -0.17 / -0.18 with recomputed radii, against
0.00 / +0.01 and -0.08 / -0.09 with fixed radii; precision and recall move by about -0.1 either way (a
resample has fewer distinct ball centres), which the re-centring removes. With fixed radii each replicate
still resamples which points are ball centres and which are probes, with multiplicity, and with no
resampling it reproduces metrics.py's values exactly. All replicates come out of ONE chunked pass over the
real x generated distances (one matrix product per chunk), so the cost is about one more evaluation of the
metric, not n of them.
The FD is recomputed per replicate (`fd`: metrics.py's value to rounding, ~3x faster): measured on this
machine's 2 shared cores at 2048-d, 3-8 s per replicate for 2,000-4,000 images a set (load-dependent), so
`--bootstrap 100` adds 5-13 minutes there (the k-NN intervals: 6 s for all 100 replicates at 2,000 x 2,000,
4096-d, as long as one evaluation of the four metrics). Hence the default n of 100, not 1,000.
"""
import math

import numpy as np
import torch

import medical
import metrics

DEFAULT_BOOTSTRAP = 100
MIN_BOOTSTRAP = 50     # fewer replicates give a 95% interval from its 1-2 most extreme values
MIN_BOOTSTRAP_SET = 20  # fewer images: a resample has too few distinct points to vary like a new sample
MIN_FD = 2048          # the report's usual threshold: FD is biased upwards below it (compare equal sizes only)
MIN_KNN = 100          # below this the k-NN balls are so coarse that one image moves a figure by >= 1%
KNN_METRICS = ("precision", "recall", "density", "coverage")
CHUNK_BYTES = 64 * 2 ** 20


def _features(x, name):
    """(N, D) float64 array; ValueError naming the argument when it is not one."""
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty N x D feature array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return a


def _check_pair(real_f, gen_f, names=("real_f", "gen_f")):
    real_f, gen_f = _features(real_f, names[0]), _features(gen_f, names[1])
    if real_f.shape[1] != gen_f.shape[1]:
        raise ValueError(f"{names[0]} has {real_f.shape[1]} feature dimensions, {names[1]} {gen_f.shape[1]}")
    return real_f, gen_f


def _check_n(n, alpha):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"bootstrap n must be an integer of at least 2 replicates, got {n!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _interval(values, estimate, alpha, center=True):
    """Percentile interval (re-centred on the estimate unless center=False), std and count of the replicates."""
    v = np.asarray(values, np.float64)
    low, high = np.quantile(v, [alpha / 2, 1 - alpha / 2])
    shift = float(estimate) - float(np.median(v)) if center else 0.0
    return {"low": float(low + shift), "high": float(high + shift), "std": float(v.std(ddof=1)), "n": int(v.size),
            "estimate": float(estimate)}


def _draws(rng, size, n):
    """n resamples of range(size) with replacement, as an (n, size) index array."""
    return rng.integers(0, size, size=(n, size))


def _sqrt_sum(eig):
    """Sum of square roots of PSD eigenvalues, rounding-level ones (metrics.frechet_distance's rule) as 0."""
    tol = eig.size * np.finfo(np.float64).eps * max(np.abs(eig).max(), 1e-300)
    return float(np.sqrt(np.where(eig > tol, eig, 0.0)).sum())


def fd(real_f, gen_f):
    """Frechet distance of two feature sets, metrics.py's value to rounding, ~3x faster (bootstrap replicates).

    N <= D: Tr((S1 S2)^(1/2)) is the nuclear norm of C = A1 A2^T (metrics.frechet_distance_from_features),
    taken as the square roots of the eigenvalues of the smaller of C C^T / C^T C (eigvalsh, not an SVD).
    N > D: the eigenvalues of S1 S2 are those of L^T S2 L with S1 = L L^T (one Cholesky and one eigvalsh,
    not two eigendecompositions); a singular S1 falls back to metrics.frechet_distance.
    Measured at 2048-d on 2 shared cores: the trace term 3 s instead of 9.5 s (SVD) at 2,000 images a set,
    6 s instead of 19 s (metrics.frechet_distance) at 4,000.
    """
    x, y = np.asarray(real_f, np.float64), np.asarray(gen_f, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("at least 2 feature vectors per set are needed for a covariance")
    mu1, mu2 = x.mean(0), y.mean(0)
    diff = mu1 - mu2
    if min(len(x), len(y)) <= x.shape[1]:
        a1, a2 = (x - mu1) / np.sqrt(len(x) - 1), (y - mu2) / np.sqrt(len(y) - 1)
        c = a1 @ a2.T
        gram = c @ c.T if c.shape[0] <= c.shape[1] else c.T @ c
        return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * _sqrt_sum(np.linalg.eigvalsh(gram)))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    try:
        low = np.linalg.cholesky(s1)
    except np.linalg.LinAlgError:
        return metrics.frechet_distance(mu1, s1, mu2, s2)
    inner = low.T @ s2 @ low
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * _sqrt_sum(np.linalg.eigvalsh((inner + inner.T) / 2)))


def bootstrap(real_f, gen_f, metric_fn, n=DEFAULT_BOOTSTRAP, seed=0, alpha=0.05, center=True):
    """{"low", "high", "std", "n", "estimate"}: interval of metric_fn(real_f, gen_f) over n resamples of both sets."""
    real_f, gen_f = _check_pair(real_f, gen_f)
    _check_n(n, alpha)
    rng = np.random.default_rng(seed)
    ri, gi = _draws(rng, len(real_f), n), _draws(rng, len(gen_f), n)
    estimate = float(metric_fn(real_f, gen_f))
    return _interval([float(metric_fn(real_f[ri[b]], gen_f[gi[b]])) for b in range(n)], estimate, alpha, center)


def _weights(rng, size, n):
    """(size, n) float32 multiplicities of each point in n resamples with replacement (columns sum to size)."""
    idx = _draws(rng, size, n)
    w = np.zeros((n, size), np.float32)
    np.add.at(w, (np.repeat(np.arange(n), size), idx.ravel()), 1)
    return torch.from_numpy(np.ascontiguousarray(w.T))


def knn_bootstrap(real, gen, metric_names, n=DEFAULT_BOOTSTRAP, seed=0, alpha=0.05, k_pr=3, k_dc=5,
                  device="cpu", chunk_bytes=CHUNK_BYTES, real_weights=None, gen_weights=None, center=True):
    """Bootstrap intervals of precision / recall / density / coverage with the full sets' radii held fixed.

    Weights (the multiplicity of each point in each replicate, one column per replicate) are drawn from
    `seed` unless given. The point estimate is one more all-ones column of the same pass, so it equals
    metrics.py's value. Returns {metric: interval}.
    """
    real, gen = _check_pair(real, gen, ("real_nn", "gen_nn"))
    wanted = [m for m in metric_names if m in KNN_METRICS]
    unknown = [m for m in metric_names if m not in KNN_METRICS]
    if unknown:
        raise ValueError(f"knn_bootstrap: unknown metric {unknown[0]!r} (choose from {', '.join(KNN_METRICS)})")
    for m, k in (("precision", k_pr), ("recall", k_pr), ("density", k_dc), ("coverage", k_dc)):
        side = min(len(real), len(gen)) if m in ("precision", "recall") else len(real)
        if m in wanted and side <= k:
            raise ValueError(f"{m}: {side} images are too few for k={k} nearest neighbours (need more than k)")
    if real_weights is None:
        _check_n(n, alpha)
        rng = np.random.default_rng(seed)
        real_weights, gen_weights = _weights(rng, len(real), n), _weights(rng, len(gen), n)
    ones = (torch.ones(len(real), 1), torch.ones(len(gen), 1))  # column 0: the point estimate
    wr = torch.cat([ones[0], real_weights.float()], 1).to(device)
    wg = torch.cat([ones[1], gen_weights.float()], 1).to(device)
    nb = wr.shape[1]
    pr = any(m in wanted for m in ("precision", "recall"))
    dc = any(m in wanted for m in ("density", "coverage"))
    rt, gt = metrics._as_tensor(real, device), metrics._as_tensor(gen, device)
    r_pr = metrics.kth_nn_sq_radius(rt, k_pr, device=device) if pr else None
    g_pr = metrics.kth_nn_sq_radius(gt, k_pr, device=device) if pr else None
    r_dc = metrics.kth_nn_sq_radius(rt, k_dc, device=device) if dc else None
    r_sq = (rt * rt).sum(1)
    prec = torch.zeros(nb, dtype=torch.float64, device=device)
    dens = torch.zeros(nb, dtype=torch.float64, device=device)
    in_gen = torch.zeros(len(real), nb, dtype=torch.float32, device=device)   # recall: gen balls holding real i
    covered = torch.zeros(len(real), nb, dtype=torch.float32, device=device)  # coverage: gen points in ball i
    step = max(1, chunk_bytes // (8 * len(real)))
    for s in range(0, len(gen), step):
        d = metrics._sq_dists(gt[s:s + step], rt, r_sq)  # (chunk, N_real)
        w = wg[s:s + step]
        if pr:
            prec += (w * ((d <= r_pr[None]).float() @ wr > 0)).sum(0, dtype=torch.float64)
            in_gen += (d <= g_pr[s:s + step, None]).float().T @ w
        if dc:
            inside = (d < r_dc[None]).float()
            dens += (w * (inside @ wr)).sum(0, dtype=torch.float64)
            covered += inside.T @ w
    values = {"precision": prec / len(gen), "density": dens / (k_dc * len(gen)),
              "recall": (wr * (in_gen > 0)).sum(0, dtype=torch.float64) / len(real),
              "coverage": (wr * (covered > 0)).sum(0, dtype=torch.float64) / len(real)}
    return {m: _interval(values[m][1:].cpu().numpy(), values[m][0].item(), alpha, center) for m in wanted}


def metric_intervals(real_f, gen_f, real_nn, gen_nn, metrics_wanted, n=DEFAULT_BOOTSTRAP, seed=0, k_pr=3, k_dc=5,
                     device="cpu", alpha=0.05, center=True):
    """{metric: {"low", "high", "std", "n"}} for "fid" (FD of real_f / gen_f) and the k-NN metrics (real_nn / gen_nn).

    Metrics other than fid / precision / recall / density / coverage (kid, memorization...) are ignored.
    """
    if isinstance(metrics_wanted, str):
        metrics_wanted = [m.strip() for m in metrics_wanted.split(",") if m.strip()]
    out = {}
    if "fid" in metrics_wanted:
        if real_f is None or gen_f is None:
            raise ValueError("fid interval: real_f and gen_f features are needed")
        out["fid"] = bootstrap(real_f, gen_f, fd, n, seed, alpha, center)
    knn = [m for m in KNN_METRICS if m in metrics_wanted]
    if knn:
        if real_nn is None or gen_nn is None:
            raise ValueError(f"{knn[0]} interval: real_nn and gen_nn features are needed")
        out.update(knn_bootstrap(real_nn, gen_nn, knn, n, seed + 1, alpha, k_pr, k_dc, device, center=center))
    return {m: out[m] for m in metrics_wanted if m in out}


def split_halves(n_or_groups, seed=0):
    """(idx_a, idx_b): two disjoint halves of the real set, whole groups only; an int n = n one-image groups."""
    if isinstance(n_or_groups, (int, np.integer)) and not isinstance(n_or_groups, bool):
        groups = list(range(int(n_or_groups)))
    else:
        groups = list(n_or_groups)
    n_groups = len(set(groups))
    if len(groups) < 2 or n_groups < 2:
        raise ValueError(f"the real-vs-real floor needs at least 2 images in 2 groups (patients); got "
                         f"{len(groups)} image(s) in {n_groups} group(s)")
    try:
        a, b = medical.group_split(groups, [0] * len(groups), 0.5, seed)
    except ValueError as exc:  # cannot happen with >= 2 groups and one class, kept for a one-line message
        raise ValueError(f"cannot split the real set into two halves by group: {exc}") from None
    return [int(i) for i in a], [int(i) for i in b]


def size_warnings(n_real, n_gen, metrics_wanted, *, dims=None, k_pr=3, k_dc=5, bootstrap=None, n_test=None):
    """One line per metric whose sets are too small to trust (empty list when all are fine).

    metrics: names as in --metrics (fid, kid, precision, recall, density, coverage; "tstr" / "segment" with
    n_test, the real test images). dims: feature dimension of FD; bootstrap: the number of replicates.
    """
    if isinstance(metrics_wanted, str):
        metrics_wanted = [m.strip() for m in metrics_wanted.split(",") if m.strip()]
    n_real, n_gen = int(n_real), int(n_gen)
    small = min(n_real, n_gen)
    out = []
    for m in metrics_wanted:
        if m == "fid":
            if small < 2:
                out.append(f"fid: {small} image(s) in a set; a covariance needs at least 2")
            elif dims and small <= dims:
                out.append(f"fid: {small} images but {dims} feature dimensions: the covariance is rank-deficient and "
                           f"FD is strongly biased upwards; compare only runs with equal set sizes")
            elif small < MIN_FD:
                out.append(f"fid: {small} images (fewer than {MIN_FD:,}): FD is biased upwards; compare only runs "
                           f"with equal set sizes")
        elif m == "kid":
            if small < 2:
                out.append(f"kid: {small} image(s) in a set; KID needs at least 2 per set")
            elif small < MIN_KNN:
                out.append(f"kid: subsets of {small} images (fewer than {MIN_KNN}): its standard deviation is large")
        elif m in KNN_METRICS:
            k = k_pr if m in ("precision", "recall") else k_dc
            side = n_real if m in ("density", "coverage") else small  # the sets whose k-NN radii are needed
            if side <= k:
                out.append(f"{m}: {side} images are too few for k={k} nearest neighbours (need more than k)")
            elif small < MIN_KNN:
                out.append(f"{m}: {small} images (fewer than {MIN_KNN}): the k={k} nearest-neighbour balls are coarse "
                           f"and one image moves the figure by {100 / small:.0f}%")
        elif m in ("tstr", "segment") and n_test is not None and n_test < MIN_KNN:
            half = 100 * 1.96 * math.sqrt(0.25 / max(n_test, 1))
            out.append(f"{m}: {n_test} real test images (fewer than {MIN_KNN}): the score is uncertain by about "
                       f"+-{half:.0f} points")
    if bootstrap:
        if bootstrap < MIN_BOOTSTRAP:
            out.append(f"bootstrap: {bootstrap} replicates (fewer than {MIN_BOOTSTRAP}): the interval ends are "
                       f"single extreme values; use --bootstrap 100 or more")
        if small < MIN_BOOTSTRAP_SET:
            out.append(f"bootstrap: {small} images in a set (fewer than {MIN_BOOTSTRAP_SET}): resamples repeat "
                       f"too few distinct images for the interval to mean much")
    return out
