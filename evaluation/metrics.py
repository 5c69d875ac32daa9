"""The math of the metrics: Frechet distance, precision/recall, density/coverage, KID.

Not run directly; `precision_recall.py` calls these on feature arrays (N x D). Everything is float64.
Nearest-neighbour metrics never build the full N x M distance matrix: distances are computed in row chunks
(`chunk_rows` rows against the whole other set), so 50k x 50k sets fit in memory; all of them compare
squared distances, which orders exactly like distances.
"""
import numpy as np
import torch

DEFAULT_CHUNK_BYTES = 256 * 2 ** 20


def feature_stats(features):
    """Mean and covariance (unbiased, rows are samples) in float64, as pytorch-fid computes them."""
    f = np.asarray(features, dtype=np.float64)
    if f.shape[0] < 2:
        raise ValueError("at least 2 feature vectors are needed for a covariance")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed stably in float64.

    Tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which equal those of the
    symmetric PSD matrix sqrt(S1) S2 sqrt(S1); `eigvalsh` on it cannot produce the complex parts that
    `scipy.linalg.sqrtm(S1 @ S2)` does on near-singular products (pytorch-fid then needs `disp`, removed in
    SciPy 1.18). If an eigendecomposition fails to converge, eps is added to both diagonals, as
    pytorch-fid does on failure. On full-rank statistics this equals pytorch-fid's value to rounding; on
    rank-deficient ones it is closer to the exact value than `sqrtm`.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    try:
        root1 = _sqrt_psd(s1)
        inner = root1 @ s2 @ root1
        eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    except np.linalg.LinAlgError:
        offset = np.eye(s1.shape[0]) * eps
        root1 = _sqrt_psd(s1 + offset)
        inner = root1 @ (s2 + offset) @ root1
        eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    # Eigenvalues that are zero in exact arithmetic (rank-deficient covariances: fewer images than
    # dimensions) come out as +-1e-13 rounding noise whose square roots would add up to ~1e-3; zero them.
    tol = eig.size * np.finfo(np.float64).eps * max(np.abs(eig).max(), 1e-300)
    tr_covmean = np.sqrt(np.where(eig > tol, eig, 0.0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_from_features(x, y):
    """The Frechet distance of two feature sets' Gaussians via an SVD, exact and fast when N < D.

    With S1 = A1^T A1 and S2 = A2^T A2 (A = centred features / sqrt(N-1)), the non-zero eigenvalues of
    S1 S2 are the squared singular values of A1 A2^T (N1 x N2), so Tr((S1 S2)^(1/2)) is that matrix's
    nuclear norm: no D x D eigendecomposition is needed for small sets (per-class figures, tests).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("at least 2 feature vectors per set are needed for a covariance")
    mu1, mu2 = x.mean(0), y.mean(0)
    a1, a2 = (x - mu1) / np.sqrt(len(x) - 1), (y - mu2) / np.sqrt(len(y) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear)


def _as_tensor(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)


def _rows_per_chunk(n_cols, chunk_rows=None):
    if chunk_rows:
        return int(chunk_rows)
    return max(1, DEFAULT_CHUNK_BYTES // (8 * max(1, n_cols)))


def _sq_dists(a, b, b_sq):
    """Squared Euclidean distances between rows of a and b (clamped at 0 against rounding)."""
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + b_sq[None, :]
    return d.clamp_min_(0)


def kth_nn_sq_radius(x, k, chunk_rows=None, device="cpu"):
    """Squared distance of each row of x to its k-th nearest neighbour in x, the point itself excluded."""
    xt = _as_tensor(x, device)
    n = xt.shape[0]
    if n <= k:
        raise ValueError(f"{n} samples are too few for k={k} nearest neighbours (need more than k)")
    x_sq = (xt * xt).sum(1)
    out = torch.empty(n, dtype=torch.float64, device=device)
    step = _rows_per_chunk(n, chunk_rows)
    for start in range(0, n, step):
        d = _sq_dists(xt[start:start + step], xt, x_sq)
        rows = torch.arange(d.shape[0], device=device)
        d[rows, rows + start] = float("inf")  # exclude the point itself, even when duplicates exist
        out[start:start + step] = torch.topk(d, k, dim=1, largest=False).values[:, k - 1]
    return out


def _count_inside(probe, ref, ref_sq_radius, chunk_rows, device, strict=False):
    """Per probe: number of reference balls holding it (radii None: 0) and sq. distance to the nearest."""
    p, r = _as_tensor(probe, device), _as_tensor(ref, device)
    r_sq = (r * r).sum(1)
    counts = torch.zeros(p.shape[0], dtype=torch.int64, device=device)
    nearest = torch.empty(p.shape[0], dtype=torch.float64, device=device)
    step = _rows_per_chunk(r.shape[0], chunk_rows)
    for start in range(0, p.shape[0], step):
        d = _sq_dists(p[start:start + step], r, r_sq)
        if ref_sq_radius is not None:
            inside = d < ref_sq_radius[None, :] if strict else d <= ref_sq_radius[None, :]
            counts[start:start + step] = inside.sum(1)
        nearest[start:start + step] = d.min(1).values
    return counts, nearest


def precision_recall(real, gen, k=3, chunk_rows=None, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    A point's radius is the distance to its k-th nearest neighbour within its own set (itself excluded);
    precision = share of generated points within (<=) the radius of some real point; recall = share of
    real points within the radius of some generated point.
    """
    real, gen = _as_tensor(real, device), _as_tensor(gen, device)  # converted once (50k x 4096 is 1.6 GB)
    r_rad = kth_nn_sq_radius(real, k, chunk_rows, device)
    g_rad = kth_nn_sq_radius(gen, k, chunk_rows, device)
    in_real, _ = _count_inside(gen, real, r_rad, chunk_rows, device)
    in_gen, _ = _count_inside(real, gen, g_rad, chunk_rows, device)
    return float((in_real > 0).double().mean()), float((in_gen > 0).double().mean())


def density_coverage(real, gen, k=5, chunk_rows=None, device="cpu"):
    """Density and coverage (Naeem et al. 2020) around the real points' k-NN balls.

    density = (1 / (k M)) * sum over generated points of the number of real balls holding it;
    coverage = share of real points whose nearest generated point lies inside their ball.
    Ball membership is strict (<), as in the authors' reference code.
    """
    real, gen = _as_tensor(real, device), _as_tensor(gen, device)
    r_rad = kth_nn_sq_radius(real, k, chunk_rows, device)
    counts, _ = _count_inside(gen, real, r_rad, chunk_rows, device, strict=True)
    density = counts.double().sum() / (k * counts.shape[0])
    _, nearest_gen = _count_inside(real, gen, None, chunk_rows, device)
    coverage = (nearest_gen < r_rad).double().mean()
    return float(density), float(coverage)


def kid(real, gen, num_subsets=100, subset_size=1000, seed=0):
    """Kernel Inception Distance: unbiased MMD^2 with k(x,y) = (x.y/d + 1)^3, mean and std over subsets.

    Each subset draws `subset_size` (capped at the smaller set) points of each set without replacement
    from a NumPy generator seeded with `seed`, so the value is reproducible.
    """
    real = np.asarray(real, np.float64)
    gen = np.asarray(gen, np.float64)
    m = min(subset_size, len(real), len(gen))
    if m < 2:
        raise ValueError("KID needs at least 2 images in each set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = gen[rng.choice(len(gen), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = within - 2 * kxy.mean()
    return float(values.mean()), float(values.std())
