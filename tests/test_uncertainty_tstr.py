"""Bootstrap intervals, the real-vs-real split, small-set warnings and TSTR (evaluation/uncertainty.py, tstr.py).

    OMP_NUM_THREADS=1 python -m pytest tests/test_uncertainty_tstr.py -q

Toy data made here (Gaussian features, striped / checkered patterns, bright squares with masks); CPU, seconds.
"""
import numpy as np
import pytest
import torch

from repo_helpers import load_folder

uncertainty, tstr, metrics = load_folder("evaluation", "uncertainty", "tstr", "metrics")

KNN = ["precision", "recall", "density", "coverage"]


def gaussians(n, d=8, shift=0.3, seed=0):
    g = np.random.default_rng(seed)
    return g.normal(size=(n, d)), g.normal(size=(n, d)) + shift


def width(iv):
    return iv["high"] - iv["low"]


# ------------------------------------------------------------------------------------------ bootstrap


def test_intervals_hold_the_estimate_and_shrink_with_more_samples():
    small, big = (uncertainty.metric_intervals(*gaussians(n), *gaussians(n), ["fid"] + KNN, n=60, seed=1)
                  for n in (100, 1600))
    for size, ivs in ((100, small), (1600, big)):
        r, g = gaussians(size)
        point = dict(fid=metrics.frechet_distance_from_features(r, g),
                     **dict(zip(["precision", "recall"], metrics.precision_recall(r, g))),
                     **dict(zip(["density", "coverage"], metrics.density_coverage(r, g))))
        for m, iv in ivs.items():
            assert iv["n"] == 60 and iv["std"] > 0
            assert iv["estimate"] == pytest.approx(point[m], rel=1e-9), m  # the same figure metrics.py gives
            assert iv["low"] < point[m] < iv["high"], (m, size, iv)
    for m in ["fid"] + KNN:  # 16x the samples: about a quarter of the width
        assert width(big[m]) < 0.5 * width(small[m]), (m, small[m], big[m])


def test_fd_interval_is_recentred_on_the_estimate():
    """Raw resamples hold ~63% distinct points, which inflates their FD; the reported interval corrects that."""
    r, g = gaussians(100, d=16)
    raw = uncertainty.bootstrap(r, g, uncertainty.fd, n=60, seed=0, center=False)
    fixed = uncertainty.bootstrap(r, g, uncertainty.fd, n=60, seed=0)
    assert raw["low"] > raw["estimate"]  # the artefact the re-centring removes
    assert fixed["low"] < fixed["estimate"] < fixed["high"]
    assert width(fixed) == pytest.approx(width(raw)) and fixed["std"] == raw["std"]


def test_bootstrap_spread_matches_the_sampling_spread_of_a_mean():
    g = np.random.default_rng(3)
    r, s = g.normal(size=(400, 1)), g.normal(size=(400, 1))
    iv = uncertainty.bootstrap(r, s, lambda a, b: float(a.mean() - b.mean()), n=400, seed=0)
    assert iv["std"] == pytest.approx(np.sqrt(2 / 400), rel=0.15)
    assert width(iv) == pytest.approx(2 * 1.96 * np.sqrt(2 / 400), rel=0.2)


def test_bootstrap_is_seeded():
    r, g = gaussians(80)
    a = uncertainty.metric_intervals(r, g, r, g, "fid,precision,coverage", n=20, seed=4)
    assert a == uncertainty.metric_intervals(r, g, r, g, "fid,precision,coverage", n=20, seed=4)
    assert a != uncertainty.metric_intervals(r, g, r, g, "fid,precision,coverage", n=20, seed=5)
    assert list(a) == ["fid", "precision", "coverage"]


def test_knn_replicate_is_the_weighted_metric_with_full_set_radii():
    """One replicate, checked against a direct computation on the full distance matrix."""
    r, g = gaussians(60, seed=2)
    rng = np.random.default_rng(0)
    wr = np.bincount(rng.integers(0, 60, 60), minlength=60).astype(float)
    wg = np.bincount(rng.integers(0, 60, 60), minlength=60).astype(float)
    two = lambda w: torch.tensor(np.stack([w, w], 1), dtype=torch.float32)  # noqa: E731 (low = high = the replicate)
    iv = uncertainty.knn_bootstrap(r, g, KNN, real_weights=two(wr), gen_weights=two(wg), center=False,
                                   chunk_bytes=8 * 60 * 7)  # several chunks
    d = ((g[:, None] - r[None]) ** 2).sum(-1)  # (gen, real)
    rad = lambda x, k: np.sort(((x[:, None] - x[None]) ** 2).sum(-1), 1)[:, k]  # noqa: E731 (col 0 is itself)
    r3, g3, r5 = rad(r, 3), rad(g, 3), rad(r, 5)
    present = wr > 0
    want = {"precision": (wg * ((d <= r3) & present).any(1)).sum() / 60,
            "recall": (wr * ((d <= g3[:, None]) & (wg > 0)[:, None]).any(0)).sum() / 60,
            "density": (wg * ((d < r5) * wr).sum(1)).sum() / (5 * 60),
            "coverage": (wr * ((d < r5) & (wg > 0)[:, None]).any(0)).sum() / 60}
    for m in KNN:
        assert iv[m]["low"] == iv[m]["high"] == pytest.approx(want[m]), m


def test_knn_replicates_keep_density_centred():
    """Fixed radii: raw density replicates centre on the estimate (recomputed radii sat ~0.09 below it)."""
    r, g = gaussians(200, d=16, shift=0.2, seed=1)
    iv = uncertainty.knn_bootstrap(r, g, ["density"], n=60, seed=0, center=False)["density"]
    assert abs((iv["low"] + iv["high"]) / 2 - iv["estimate"]) < 0.04, iv


@pytest.mark.bad_input
@pytest.mark.parametrize("call, words", [
    (lambda: uncertainty.bootstrap(np.zeros((0, 4)), np.ones((5, 4)), uncertainty.fd, 10), "non-empty"),
    (lambda: uncertainty.bootstrap(np.ones((5, 4)), np.ones((5, 3)), uncertainty.fd, 10), "feature dimensions"),
    (lambda: uncertainty.bootstrap(np.ones((5, 4)), np.ones((5, 4)), uncertainty.fd, 1), "at least 2"),
    (lambda: uncertainty.metric_intervals(None, None, np.ones((3, 2)), np.ones((3, 2)), ["precision"], 10),
     "too few"),
    (lambda: uncertainty.metric_intervals(None, None, None, None, ["fid"], 10), "needed"),
])
def test_bad_bootstrap_inputs_raise_one_line(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert words in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ floor split


def test_split_halves_keeps_patients_whole_and_is_reproducible():
    g = np.random.default_rng(0)
    groups = [f"patient{p}" for p in range(30) for _ in range(g.integers(1, 9))]
    a, b = uncertainty.split_halves(groups, seed=7)
    assert sorted(a + b) == list(range(len(groups))) and not set(a) & set(b)
    assert not {groups[i] for i in a} & {groups[i] for i in b}  # no patient on both sides
    assert abs(len(a) - len(b)) <= 0.3 * len(groups)
    assert (a, b) == uncertainty.split_halves(groups, seed=7)
    assert (a, b) != uncertainty.split_halves(groups, seed=8)
    a, b = uncertainty.split_halves(10, seed=0)  # every image its own group
    assert sorted(a + b) == list(range(10)) and len(a) == len(b) == 5


@pytest.mark.bad_input
@pytest.mark.parametrize("groups", [1, [], ["p1"] * 6])
def test_split_halves_refuses_what_cannot_be_split(groups):
    with pytest.raises(ValueError, match="at least 2 images in 2 groups"):
        uncertainty.split_halves(groups)


# ------------------------------------------------------------------------------------------ warnings


def test_size_warnings_fire_for_tiny_sets_only():
    tiny = uncertainty.size_warnings(12, 12, ["fid", "precision", "recall", "density", "coverage", "kid"],
                                     dims=64, bootstrap=20)
    assert all("\n" not in w for w in tiny)
    for m in ("fid:", "precision:", "recall:", "density:", "coverage:", "kid:"):
        assert sum(w.startswith(m) for w in tiny) == 1, (m, tiny)
    assert any("rank-deficient" in w for w in tiny)
    assert sum(w.startswith("bootstrap:") for w in tiny) == 2  # few replicates and few images
    assert any("need more than k" in w for w in uncertainty.size_warnings(3, 50, ["precision"]))
    assert uncertainty.size_warnings(5000, 5000, ["fid", "precision", "recall", "density", "coverage", "kid"],
                                     dims=64, bootstrap=100) == []
    assert uncertainty.size_warnings(5000, 5000, "fid", dims=2048) == []


# ------------------------------------------------------------------------------------------ TSTR


def patterns(n, seed, size=16):
    """Three classes: horizontal stripes, vertical stripes, checkerboard, with noise."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 3, n)
    yy, xx = np.mgrid[:size, :size]
    base = [np.sin(yy * 1.2) > 0, np.sin(xx * 1.2) > 0, (yy // 4 + xx // 4) % 2 == 0]
    x = np.stack([base[c] * 0.6 + 0.2 for c in y]) + g.normal(0, 0.15, (n, size, size))
    return torch.from_numpy(np.clip(x, 0, 1)[:, None]).float(), torch.from_numpy(y)


def squares(n, seed, size=16, labels=False):
    """Bright squares on a dark noisy background and their masks (labels: a dimmer second class of squares)."""
    g = np.random.default_rng(seed)
    x, m = np.full((n, 1, size, size), 0.15), np.zeros((n, 1, size, size), np.int64)
    for i in range(n):
        for cls in ((1, 2) if labels else (1,)):
            s = g.integers(4, 7)
            r, c = g.integers(0, size - s, 2)
            m[i, 0, r:r + s, c:c + s] = cls
    x = x + np.where(m == 1, 0.6, np.where(m == 2, 0.3, 0)) + g.normal(0, 0.08, x.shape)
    mask = torch.from_numpy(m) if labels else torch.from_numpy(m).float()
    return torch.from_numpy(np.clip(x, 0, 1)).float(), mask


def test_tstr_beats_chance_and_shuffled_labels_do_not():
    gen_x, gen_y = patterns(120, seed=0)
    real_x, real_y = patterns(90, seed=1)
    res = tstr.classify(gen_x, gen_y, real_x, real_y, seed=0)
    assert res["accuracy"] >= 0.9 and res["classes"] == 3 and (res["n_train"], res["n_test"]) == (120, 90)
    shuffled = gen_y[torch.from_numpy(np.random.default_rng(5).permutation(len(gen_y)))]
    bad = tstr.classify(gen_x, shuffled, real_x, real_y, seed=0)
    assert bad["accuracy"] <= res["chance"] + 0.2 and bad["accuracy"] < res["accuracy"] - 0.4


def test_tstr_is_reproducible_and_leaves_the_callers_rng_alone():
    x, y = patterns(60, seed=2)
    tx, ty = patterns(30, seed=3)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = tstr.classify(x, y, tx, ty, seed=3, epochs=2)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    b = tstr.classify(x, y, tx, ty, seed=3, epochs=2)
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    sa = tstr.segment(*squares(16, 0), *squares(8, 1), seed=3, epochs=2)
    sb = tstr.segment(*squares(16, 0), *squares(8, 1), seed=3, epochs=2)
    assert sa["dice"] == sb["dice"]


def test_segmenter_learns_squares_and_not_from_mismatched_masks():
    img, mask = squares(48, seed=0)
    test_img, test_mask = squares(32, seed=1)
    good = tstr.segment(img, mask, test_img, test_mask, seed=0)
    assert good["dice"] >= 0.9 and good["labels"] == 2 and good["n_test"] == 32
    mismatched = tstr.segment(img, mask.roll(1, 0), test_img, test_mask, seed=0)
    assert mismatched["dice"] < good["dice"] - 0.3


def test_segmenter_on_label_masks():
    img, mask = squares(48, seed=0, labels=True)
    test_img, test_mask = squares(32, seed=1, labels=True)
    res = tstr.segment(img, mask, test_img, test_mask, seed=0)
    assert res["labels"] == 3 and res["dice"] >= 0.8


def test_dice_is_controlnets_definition():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[0, 1, 1, 0]], bool)
    assert tstr.dice(a, b) == pytest.approx(0.5) and tstr.dice(a & False, b & False) == 1.0
    truth = np.zeros((2, 1, 4, 4), np.int64)
    truth[0, 0, :2, :2] = 1  # image 1: empty truth and empty prediction -> 1.0
    assert tstr.mean_dice(truth, truth, 2) == 1.0
    assert tstr.mean_dice(np.zeros_like(truth), truth, 2) == 0.5


@pytest.mark.bad_input
@pytest.mark.parametrize("call, words", [
    (lambda x, y, m: tstr.classify(x[:0], y[:0], x, y), "non-empty"),
    (lambda x, y, m: tstr.classify(x, y[:-1], x, y), "labels but"),
    (lambda x, y, m: tstr.classify(x, y.float(), x, y), "integer class labels"),
    (lambda x, y, m: tstr.classify(x * 255, y, x, y), "[0, 1]"),
    (lambda x, y, m: tstr.classify(x, y, x[:, :, :8], y), "resize"),
    (lambda x, y, m: tstr.classify(x, y, x, y, epochs=0), "epochs"),
    (lambda x, y, m: tstr.segment(x, m[:, :, :8], x, m), "(H, W)"),
    (lambda x, y, m: tstr.segment(x, m[:-1], x, m), "masks but"),
    (lambda x, y, m: tstr.segment(x, m[:, 0], x, m), "(N, 1, H, W)"),
    (lambda x, y, m: tstr.segment(x, m * 1.5, x, m), "fractional"),
])
def test_bad_tstr_inputs_raise_one_line(call, words):
    x, mask = squares(6, seed=0)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError) as err:
        call(x, y, mask)
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("n, d", [(30, 8), (12, 20), (20, 20), (25, 20)])
def test_fast_fd_equals_metrics(n, d):
    """Both routes of uncertainty.fd (N <= D and N > D) against metrics.py's two FD functions."""
    g = np.random.default_rng(n)
    x, y = g.normal(size=(n, d)), g.normal(size=(n + 3, d)) * 1.3 + 0.2
    want = metrics.frechet_distance(*metrics.feature_stats(x), *metrics.feature_stats(y))
    assert uncertainty.fd(x, y) == pytest.approx(want, rel=1e-9)
    assert uncertainty.fd(x, y) == pytest.approx(metrics.frechet_distance_from_features(x, y), rel=1e-9)
    assert uncertainty.fd(y, x) == pytest.approx(want, rel=1e-9)  # the larger set first: the other Gram side
    flat = x.copy()
    flat[:, 0] = 1.0  # a constant feature: singular covariance, the Cholesky fallback
    assert uncertainty.fd(flat, y) == pytest.approx(metrics.frechet_distance_from_features(flat, y), rel=1e-9)
