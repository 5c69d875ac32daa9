"""Tests of evaluation/: metric math vs closed forms and brute force, the image loader, the CLI end to end.

    OMP_NUM_THREADS=1 python -m pytest tests/test_evaluation.py -q

No downloads: the Inception and VGG16 weights are random state dicts of the real architectures written to
tmp dirs and passed by --inception_weights / --vgg_weights; pytorch-fid (if installed) is given the same
random weights with its download patched out, as a reference for our Inception features.
"""
import argparse
import json
import math
import shutil
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from scipy.spatial.distance import cdist

from repo_helpers import REPO, load_folder, run_script
from eval_helpers import TinyFeatures  # noqa: E402

pr, metrics, images, features, inception = load_folder(
    "evaluation", "precision_recall", "metrics", "images", "features", "inception")


# ---------------------------------------------------------------- helpers
def write_png(path, array):
    """Save a uint8/uint16 array as PNG, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def digit_like(rng, level, size=32):
    """A random blob image of mean grey level `level`."""
    img = np.clip(rng.normal(level, 25, (size, size)), 0, 255).astype(np.uint8)
    img[size // 4: size // 2, size // 4: 3 * size // 4] = 255 - level
    return img


def make_class_folders(root, counts, seed, size=32):
    """root/<class>/<i>.png with class 'bright' (level 200) and 'dark' (level 50)."""
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        for i in range(n):
            write_png(root / cls / f"{cls}_{i}.png", digit_like(rng, 200 if cls == "bright" else 50, size))
    return root


def brute_pr(real, gen, k):
    """Kynkaanniemi precision/recall with full distance matrices (reference)."""
    def radii(x):
        d = cdist(x, x)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    rr, rg = radii(real), radii(gen)
    d = cdist(gen, real)
    return float((d <= rr[None, :]).any(1).mean()), float((d.T <= rg[None, :]).any(1).mean())


class BrightnessClassifier(nn.Module):
    """Logits [bright, dark] from the mean intensity; class names stored on the module."""

    def __init__(self):
        super().__init__()
        self.class_names = ["bright", "dark"]

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([m - 0.5, 0.5 - m], 1)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random state dicts of the FID Inception network and torchvision's VGG16, saved once."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    net = inception.FIDInceptionV3()
    for m in net.modules():  # variance-keeping init, so random features are not all ~0
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save(net.state_dict(), d / "inception.pth")
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), d / "vgg16.pth")
    torch.jit.script(TinyFeatures()).save(str(d / "tiny_features.pt"))
    torch.jit.script(BrightnessClassifier()).save(str(d / "brightness.pt"))
    yield d
    shutil.rmtree(d, ignore_errors=True)  # 650 MB of random weights: do not leave them in pytest's tmp


# ---------------------------------------------------------------- metric math
def test_frechet_closed_forms_and_scipy():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(d, d))
    s1 = a @ a.T + d * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    assert metrics.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9)
    # 1-D: (m1 - m2)^2 + (sd1 - sd2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 1, rel=1e-12)
    for seed in range(3):
        r = np.random.default_rng(seed)
        b, c = r.normal(size=(d, d)), r.normal(size=(d, d))
        s1, s2 = b @ b.T + 0.1 * np.eye(d), c @ c.T + 0.1 * np.eye(d)
        m1, m2 = r.normal(size=d), r.normal(size=d)
        ref = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
        assert metrics.frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-9)
    # from features (SVD path, used when N < D) == from statistics, also rank-deficient
    x, y = rng.normal(size=(20, 64)), rng.normal(size=(15, 64)) * 1.5 + 0.3
    via_stats = metrics.frechet_distance(*metrics.feature_stats(x), *metrics.feature_stats(y))
    assert metrics.frechet_distance_from_features(x, y) == pytest.approx(via_stats, rel=1e-9)


def test_nn_metrics_match_brute_force_and_chunking():
    rng = np.random.default_rng(1)
    real, gen = rng.normal(size=(120, 5)), rng.normal(size=(90, 5)) * 1.3 + 0.2
    p, r = metrics.precision_recall(real, gen, k=3)
    assert (p, r) == pytest.approx(brute_pr(real, gen, 3), abs=1e-12)
    assert metrics.precision_recall(real, gen, k=3, chunk_rows=7) == (p, r)
    assert metrics.density_coverage(real, gen, k=5, chunk_rows=11) == metrics.density_coverage(real, gen, k=5)
    radius = np.sqrt(metrics.kth_nn_sq_radius(real, 3, chunk_rows=13).numpy())
    assert radius == pytest.approx(np.sort(cdist(real, real), axis=1)[:, 3], abs=1e-9)


def test_swap_symmetry_and_mode_collapse():
    rng = np.random.default_rng(2)
    real, gen = rng.normal(size=(200, 8)), rng.normal(size=(150, 8)) * 0.8
    p, r = metrics.precision_recall(real, gen)
    assert metrics.precision_recall(gen, real) == pytest.approx((r, p), abs=1e-12)
    collapsed = real[:3][rng.integers(0, 3, 200)] + 0.01 * rng.normal(size=(200, 8))
    p, r = metrics.precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.1


def test_kid_reproducible_and_sensitive():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    first = metrics.kid(a, b, num_subsets=20, subset_size=100, seed=5)
    assert metrics.kid(a, b, num_subsets=20, subset_size=100, seed=5) == first
    assert metrics.kid(a, b, num_subsets=20, subset_size=100, seed=6) != first
    assert abs(first[0]) < 3 * first[1] + 1e-3
    shifted = metrics.kid(a, b + 1.0, num_subsets=20, subset_size=100, seed=5)
    assert shifted[0] > 10 * max(abs(first[0]), first[1])


def test_density_coverage_identical_gaussians():
    rng = np.random.default_rng(4)
    real, gen = rng.normal(size=(1500, 8)), rng.normal(size=(1500, 8))
    density, coverage = metrics.density_coverage(real, gen, k=5)
    # Naeem et al. 2020: E[density] = 1 and E[coverage] -> 1 - 2^-k for identical distributions
    assert density == pytest.approx(1.0, abs=0.1)
    assert coverage == pytest.approx(1 - 0.5 ** 5, abs=0.03)


# ---------------------------------------------------------------- loader
def test_loader_16bit_uppercase_gray_alpha(tmp_path):
    ramp = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    write_png(tmp_path / "sub" / "ramp.PNG", ramp)
    write_png(tmp_path / "gray.png", np.arange(100, dtype=np.uint8).reshape(10, 10))
    write_png(tmp_path / "rgba.png", np.full((6, 7, 4), 77, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    assert images.list_images(tmp_path) == ["gray.png", "rgba.png", "sub/ramp.PNG"]
    rgb = images.load_rgb(tmp_path / "sub" / "ramp.PNG")
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb)) == 256  # the whole range is kept (PIL's convert would clip to 255 here)
    clipped = np.asarray(Image.open(tmp_path / "sub" / "ramp.PNG").convert("RGB"))
    assert len(np.unique(clipped)) < 20  # the trap avoided: PIL clips 16-bit values at 255
    # one rule, no per-image min-max: 16-bit values / 65535 (see tests/test_decoder.py)
    assert (rgb[..., 0] == np.round(ramp / 65535 * 255)).all()
    gray = images.load_rgb(tmp_path / "gray.png")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert (gray[..., 0] == np.arange(100).reshape(10, 10)).all()
    assert images.load_rgb(tmp_path / "rgba.png").shape == (6, 7, 3)
    notes = images.validate_images(tmp_path, images.list_images(tmp_path), "t")
    assert any("alpha" in n for n in notes) and any("16-bit" in n for n in notes)


def test_weight_errors_name_file_and_flag(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(images.UserError, match="pt_inception-2015-12-05-6726825d.pth.*--inception_weights"):
        features.build_inception(None)
    monkeypatch.setattr(torchvision.models.VGG16_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(images.UserError, match="vgg16-397923af.pth.*--vgg_weights"):
        features.build_vgg(None)
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(images.UserError, match="--trust_checkpoint"):
        features.load_state_dict(tmp_path / "pickled.pth", "--vgg_weights")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(images.UserError, match="not a PyTorch weights file"):
        features.load_state_dict(tmp_path / "text.pth", "--vgg_weights")


# ---------------------------------------------------------------- reference: pytorch-fid
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_inception_features_equal_pytorch_fid(tmp_path, weights):
    pfi = pytest.importorskip("pytorch_fid.inception")
    pfs = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(5)
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        write_png(files[-1], rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    ours = features.extract([str(f) for f in files], {"inception": features.build_inception(
        str(weights / "inception.pth"))}, 3, 0, torch.device("cpu"), "test")["inception"]
    sd = torch.load(weights / "inception.pth", weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: sd):
        ref_net = pfi.InceptionV3([3]).eval()
    ref = pfs.get_activations(files, ref_net, batch_size=3, dims=2048, device="cpu", num_workers=0)
    assert ours.std() > 1e-3  # the random network gives informative features
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    # the Frechet distance of our features equals pytorch-fid's on its own (first 64 dims: sqrtm is slow)
    half_ref = pfs.calculate_frechet_distance(*metrics.feature_stats(ref[:2, :64]),
                                              *metrics.feature_stats(ref[1:, :64]))
    half_ours = metrics.frechet_distance(*metrics.feature_stats(ours[:2, :64]),
                                         *metrics.feature_stats(ours[1:, :64]))
    assert half_ours == pytest.approx(half_ref, rel=1e-4, abs=1e-3)
    # a state dict saved from pytorch-fid's wrapper (blocks.* names, no fc) loads too
    torch.save(ref_net.state_dict(), tmp_path / "wrapper.pth")
    net = features.build_inception(str(tmp_path / "wrapper.pth"))
    with torch.no_grad():
        x = torch.rand(1, 3, 30, 30)
        torch.testing.assert_close(net(x), ref_net(x)[0].flatten(1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- CLI
def test_cli_standard_networks_save_stats_and_npz_roundtrip(tmp_path, weights):
    real = make_class_folders(tmp_path / "real", {"bright": 3, "dark": 3}, seed=0)
    gen = make_class_folders(tmp_path / "gen", {"bright": 2, "dark": 2}, seed=1, size=24)
    common = ["--inception_weights", str(weights / "inception.pth"), "--vgg_weights", str(weights / "vgg16.pth"),
              "--metrics", "fid,precision,recall,kid,density,coverage", "--dc_k", "3", "--num_workers", "0",
              "--batch_size", "4", "--cache_dir", str(tmp_path / "cache")]
    out = run_script("evaluation", ["precision_recall.py", "--real", str(real), "--gen", str(gen), *common,
                                    "--save_stats", str(tmp_path / "real.npz"), "--json", str(tmp_path / "a.json")])
    assert "FINAL EVALUATION REPORT" in out.stdout and "FID (InceptionV3):" in out.stdout
    assert "Real Data: real (6 images)" in out.stdout and "Gen Data:  gen (4 images)" in out.stdout
    assert "fewer than 2,048" in out.stdout and "differ in size" in out.stdout
    a = json.loads((tmp_path / "a.json").read_text())
    for key in ("fid", "precision", "recall", "kid_mean", "kid_std", "density", "coverage"):
        assert math.isfinite(a[key]), key
    assert a["fid"] > 0 and (a["n_real"], a["n_gen"]) == (6, 4)
    assert set(a["per_class"]) == {"bright", "dark"} and a["per_class"]["dark"]["n_real"] == 3
    assert a["settings"]["inception_weights"].endswith("inception.pth")
    with np.load(tmp_path / "real.npz") as f:
        assert f["inception_features"].shape == (6, 2048) and f["vgg_features"].shape == (6, 4096)
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048)
        np.testing.assert_allclose(f["mu"], f["inception_features"].astype(np.float64).mean(0))
    # the saved real statistics give the same numbers without the real folder
    run_script("evaluation", ["precision_recall.py", "--real", str(tmp_path / "real.npz"), "--gen", str(gen),
                              *common, "--json", str(tmp_path / "b.json")])
    b = json.loads((tmp_path / "b.json").read_text())
    for key in ("fid", "precision", "recall", "kid_mean", "density", "coverage"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert set(b["per_class"]) == {"bright", "dark"}


def run_main(capsys, args):
    """precision_recall.main in this process (same code path as the CLI, without interpreter start-up)."""
    try:
        pr.main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_feature_extractor_classifier_cache_and_constants(tmp_path, weights, capsys):
    real = make_class_folders(tmp_path / "real", {"bright": 5, "dark": 5}, seed=0)
    gen = make_class_folders(tmp_path / "gen", {"bright": 4, "dark": 4}, seed=1, size=20)
    rng = np.random.default_rng(9)
    write_png(gen / "bright" / "odd_one.png", digit_like(rng, 50, 28))  # a dark image in 'bright', other size
    args = ["--real", str(real), "--gen", str(gen), "--feature_extractor",
            str(weights / "tiny_features.pt"), "--classifier", str(weights / "brightness.pt"),
            "--metrics", "fid,precision,recall,kid", "--num_workers", "2", "--cache_dir", str(tmp_path / "cache"),
            "--json", str(tmp_path / "r.json")]
    out = run_script("evaluation", ["precision_recall.py", *args])
    assert "FD (tiny_features.pt):" in out.stdout and "cached features" not in out.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["class_accuracy"] == {"gen": pytest.approx(8 / 9), "real": 1.0}
    assert r["per_class"]["bright"]["class_accuracy_gen"] == pytest.approx(0.8)
    assert r["per_class"]["dark"]["class_accuracy_gen"] == 1.0 and r["n_gen"] == 9
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # extractor + classifier features of real
    code, stdout, _ = run_main(capsys, args)
    assert code == 0 and "real: cached features of classifier, custom reused" in stdout
    assert json.loads((tmp_path / "r.json").read_text())["fid"] == pytest.approx(r["fid"], rel=1e-12)
    # a changed real file invalidates the cache
    write_png(real / "dark" / "dark_0.png", digit_like(rng, 60))
    code, stdout, _ = run_main(capsys, args)
    assert code == 0 and "cached features" not in stdout
    # constants at the top of the file are used when --real/--gen are not given
    copy = tmp_path / "evaluation_copy"
    shutil.copytree(REPO / "evaluation", copy, ignore=shutil.ignore_patterns("__pycache__"))
    src = (copy / "precision_recall.py").read_text()
    src = src.replace('REAL_IMAGES_DIR = "/path/to/real/images"', f'REAL_IMAGES_DIR = "{real}"')
    src = src.replace('GEN_IMAGES_DIR = "/path/to/generated/images"', f'GEN_IMAGES_DIR = "{gen}"')
    (copy / "precision_recall.py").write_text(src)
    out = run_script(copy, ["precision_recall.py", "--feature_extractor", str(weights / "tiny_features.pt"),
                            "--no_cache", "--num_workers", "0"])
    assert "Real Data: real (10 images)" in out.stdout and "Gen Data:  gen (9 images)" in out.stdout


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, weights):
    """The folders and files the bad-input cases point at, made once."""
    d = tmp_path_factory.mktemp("bad_inputs")
    real = make_class_folders(d / "real", {"bright": 4, "dark": 4}, seed=0)
    write_png(d / "flat" / "a.png", np.zeros((8, 8), np.uint8))
    (d / "empty").mkdir()
    make_class_folders(d / "medium_gen", {"medium": 4}, seed=4)
    bad = make_class_folders(d / "bad", {"bright": 2}, seed=3)
    (bad / "bright" / "broken.png").write_text("this is text, not a PNG")
    np.savez(d / "nothing.npz", foo=np.zeros(3))
    return {"d": d, "real": real, "features": str(weights / "tiny_features.pt"),
            "classifier": str(weights / "brightness.pt"), "inception": str(weights / "inception.pth")}


def _ext(b, tmp_path):
    return ["--feature_extractor", b["features"], "--num_workers", "0", "--no_cache", "--json", str(tmp_path / "x.json")]


# (id, flags built from the fixture's paths, what the one error line must say)
BAD_CLI_CASES = [
    ("empty-gen", lambda b, d: ["--real", b["real"], "--gen", d / "empty"], "holds no images"),
    ("unknown-metric", lambda b, d: ["--real", b["real"], "--gen", b["real"], "--metrics", "fid,sharpness"],
     "--metrics: unknown sharpness"),
    ("npz-without-stats", lambda b, d: ["--real", d / "nothing.npz", "--gen", b["real"]], "holds none of mu+sigma"),
    ("classifier-flat-gen", lambda b, d: ["--real", b["real"], "--gen", d / "flat", "--classifier", b["classifier"]],
     "--classifier needs class subfolders"),
    ("batch-size-0", lambda b, d: ["--real", b["real"], "--gen", b["real"], "--batch_size", "0"],
     "--batch_size must be at least 1"),
    ("unknown-gen-class", lambda b, d: ["--real", b["real"], "--gen", d / "medium_gen", "--classifier",
                                        b["classifier"]],
     "medium of --gen are not among the classifier's classes: bright, dark"),
    ("missing-real", lambda b, d: ["--real", d / "missing", "--gen", b["real"]], "REAL_IMAGES_DIR"),
    ("missing-inception-weights", lambda b, d: ["--real", b["real"], "--gen", b["real"], "--inception_weights",
                                                d / "nope.pth"], "--inception_weights"),
    ("unwritable-stats", lambda b, d: ["--real", b["real"], "--gen", b["real"], "--save_stats",
                                       d / "no_dir" / "s.npz"], "not writable"),
]


def test_cli_bad_input_as_a_process(bad_inputs, tmp_path):
    """One case as a real process: exit code 2, one line on stderr, no traceback, nothing written."""
    b = bad_inputs
    proc = run_script("evaluation", ["precision_recall.py", "--real", str(b["real"]), "--gen", str(b["d"] / "bad"),
                                     *_ext(b, tmp_path)], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "broken.png" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("make_args,message", [c[1:] for c in BAD_CLI_CASES], ids=[c[0] for c in BAD_CLI_CASES])
def test_cli_bad_input(bad_inputs, tmp_path, capsys, make_args, message):
    code, _, err = run_main(capsys, [str(x) for x in make_args(bad_inputs, bad_inputs["d"])] + _ext(bad_inputs, tmp_path))
    assert code == 2, err
    assert err.startswith("error: ") and message in err, (message, err)
    assert not (tmp_path / "x.json").exists()


def test_cli_npz_statistics_limits(bad_inputs, tmp_path, capsys):
    real, ext = bad_inputs["real"], _ext(bad_inputs, tmp_path)
    # an .npz with only mu/sigma: FID works; explicitly asked precision is refused with a reason
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code, _, err = run_main(capsys, ["--real", str(tmp_path / "stats.npz"), "--gen", str(real), "--metrics",
                                     "fid,precision", *ext[2:]])
    assert code == 2 and "--metrics precision" in err
    np.savez(tmp_path / "small.npz", mu=np.zeros(8), sigma=np.eye(8))
    code, _, err = run_main(capsys, ["--real", str(tmp_path / "small.npz"), "--gen", str(real), *ext[2:]])
    assert code == 2 and "8-d" in err and "2048" in err


# ---------------------------------------------------------------- pytorch-fid parity: statistics files, --dims
@pytest.mark.filterwarnings("ignore:Matrix is singular")
@pytest.mark.parametrize("dim", [256, 32])
def test_npz_statistics_of_any_dimension_give_pytorch_fid_distance(tmp_path, capsys, dim):
    pfs = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(dim)
    stats = []
    for name, scale in (("a", 1.0), ("b", 1.3)):
        x = rng.normal(size=(3 * dim, dim)) * scale + (0.2 if name == "b" else 0)
        mu, sigma = x.mean(0), np.cov(x, rowvar=False)
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)  # pytorch-fid's own format: nothing else
        stats.append((mu, sigma))
    ref = pfs.calculate_frechet_distance(*stats[0], *stats[1])
    # no weight files, no network: building one would need a download, which fails here
    with mock.patch.object(pr, "build_inception", side_effect=AssertionError("network built")):
        code, out, err = run_main(capsys, ["--real", str(tmp_path / "a.npz"), "--gen", str(tmp_path / "b.npz"),
                                           "--metrics", "fid", "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["fid"] == pytest.approx(ref, rel=1e-7) and r["settings"]["dims"] == dim
    assert f"FD (.npz, {dim}-d):" in out
    # a pytorch-fid file of the other dimension: one line naming both files and dimensions
    other = 32 if dim == 256 else 256
    np.savez(tmp_path / "c.npz", mu=np.zeros(other), sigma=np.eye(other))
    code, _, err = run_main(capsys, ["--real", str(tmp_path / "a.npz"), "--gen", str(tmp_path / "c.npz"),
                                     "--metrics", "fid", "--json", str(tmp_path / "x.json")])
    assert code == 2 and err.count("\n") == 1 and f"{dim}-d" in err and f"{other}-d" in err
    assert not (tmp_path / "x.json").exists()


def test_npz_feature_files_of_any_dimension_give_all_metrics(tmp_path, capsys):
    rng = np.random.default_rng(7)
    real, gen = rng.normal(size=(60, 32)), rng.normal(size=(50, 32)) * 1.2 + 0.1
    for key in ("features", "vgg_features"):  # an extractor's file, or 32-d "VGG" features from elsewhere
        np.savez(tmp_path / "r.npz", **{key: real})
        np.savez(tmp_path / "g.npz", **{key: gen})
        code, out, err = run_main(capsys, ["--real", str(tmp_path / "r.npz"), "--gen", str(tmp_path / "g.npz"),
                                           "--metrics", "precision,recall,density,coverage" + (
                                               ",fid,kid" if key == "features" else ""),
                                           "--kid_subsets", "5", "--json", str(tmp_path / "r.json")])
        assert code == 0, err
        r = json.loads((tmp_path / "r.json").read_text())
        assert (r["precision"], r["recall"]) == pytest.approx(brute_pr(real, gen, 3), abs=1e-12)
        assert (r["density"], r["coverage"]) == pytest.approx(metrics.density_coverage(real, gen, 5), abs=1e-12)
        if key == "features":
            assert r["fid"] == pytest.approx(metrics.frechet_distance_from_features(real, gen), rel=1e-9)
    np.savez(tmp_path / "g16.npz", vgg_features=gen[:, :16])
    code, _, err = run_main(capsys, ["--real", str(tmp_path / "r.npz"), "--gen", str(tmp_path / "g16.npz"),
                                     "--metrics", "precision"])
    assert code == 2 and err.count("\n") == 1 and "32-d" in err and "16-d" in err


@pytest.mark.parametrize("dim", [64, 192, 768])
def test_inception_dims_blocks_equal_pytorch_fid(tmp_path, weights, dim):
    pfi = pytest.importorskip("pytorch_fid.inception")
    pfs = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(dim)
    files = []
    for i in range(2):
        files.append(tmp_path / f"{i}.png")
        write_png(files[-1], rng.integers(0, 256, (36, 36, 3), dtype=np.uint8))
    net = features.build_inception(str(weights / "inception.pth"), dims=dim)
    ours = features.extract([str(f) for f in files], {"inception": net}, 2, 0, torch.device("cpu"),
                            "test")["inception"]
    sd = torch.load(weights / "inception.pth", weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: sd):
        ref_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dim]]).eval()
    ref = pfs.get_activations(files, ref_net, batch_size=2, dims=dim, device="cpu", num_workers=0)
    assert ours.shape == (2, dim) and ours.std() > 1e-3
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="64, 192, 768, 2048"):
        inception.FIDInceptionV3(100)


def test_cli_dims_cached_per_dims_and_save_stats_fid_needs_no_vgg(tmp_path, weights, capsys):
    real = make_class_folders(tmp_path / "real", {"bright": 3, "dark": 3}, seed=0)
    gen = make_class_folders(tmp_path / "gen", {"bright": 2, "dark": 2}, seed=1, size=24)
    base = ["--real", str(real), "--gen", str(gen), "--inception_weights", str(weights / "inception.pth"),
            "--metrics", "fid", "--num_workers", "0", "--cache_dir", str(tmp_path / "cache")]
    # no --vgg_weights: building VGG16 would download (and fail offline); --metrics fid must not need it
    with mock.patch.object(pr, "build_vgg", side_effect=AssertionError("VGG16 built")):
        code, out, err = run_main(capsys, [*base, "--dims", "64", "--save_stats", str(tmp_path / "s64.npz"),
                                           "--json", str(tmp_path / "a.json")])
        assert code == 0, err
        assert "FID (InceptionV3 64-d):" in out
        with np.load(tmp_path / "s64.npz") as f:
            assert f["inception_features"].shape == (6, 64) and f["mu"].shape == (64,)
            assert f["sigma"].shape == (64, 64) and "vgg_features" not in f.files and int(f["dims"]) == 64
        code, out, err = run_main(capsys, [*base, "--dims", "192", "--json", str(tmp_path / "b.json")])
        assert code == 0 and "cached features" not in out  # another dims: its own cache entry
        assert len(list((tmp_path / "cache").glob("inception-*.npz"))) == 2
        code, out, err = run_main(capsys, [*base, "--dims", "64", "--json", str(tmp_path / "c.json")])
        assert code == 0 and "real: cached features of inception reused" in out
        a, c = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "c.json"))
        assert c["fid"] == pytest.approx(a["fid"], rel=1e-12) and a["settings"]["dims"] == 64
        # the 64-d statistics file with the folder: needs the same --dims, said in one line
        code, _, err = run_main(capsys, ["--real", str(tmp_path / "s64.npz"), *base[2:]])
        assert code == 2 and "64-d" in err and "--dims 64" in err
        code, _, err = run_main(capsys, ["--real", str(tmp_path / "s64.npz"), *base[2:], "--dims", "64",
                                         "--json", str(tmp_path / "d.json")])
        assert code == 0, err
        assert json.loads((tmp_path / "d.json").read_text())["fid"] == pytest.approx(a["fid"], rel=1e-6)
    # with a --feature_extractor the file holds only its statistics
    code, _, err = run_main(capsys, [*base[:4], "--feature_extractor", str(weights / "tiny_features.pt"),
                                     "--metrics", "fid", "--num_workers", "0", "--no_cache",
                                     "--save_stats", str(tmp_path / "custom.npz")])
    assert code == 0, err
    with np.load(tmp_path / "custom.npz") as f:
        assert set(f.files) >= {"features", "mu", "sigma"} and f["features"].shape == (6, 8)
        assert not {"inception_features", "vgg_features"} & set(f.files)
    code, _, err = run_main(capsys, [*base[:4], "--feature_extractor", str(weights / "tiny_features.pt"),
                                     "--dims", "64"])
    assert code == 2 and "--dims" in err
