"""The evaluator's trust report end to end: memorization audit, bootstrap intervals, real-vs-real floor, TSTR.

    OMP_NUM_THREADS=1 python -m pytest tests/test_trust_report.py -q

Tiny textured image folders written here (train, held-out real, generated with planted copies of training
images), a tiny TorchScript feature extractor made here; no download, no pretrained network.
"""
import json
import sys
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from repo_helpers import load_folder, run_script
from eval_helpers import TinyFeatures  # noqa: E402

pr, images, report = load_folder("evaluation", "precision_recall", "images", "report")

LEVELS = {"bright": 170, "dark": 80}


@pytest.fixture(autouse=True)
def evaluation_modules(monkeypatch):
    """Pin evaluation's modules in sys.modules for each test: other test modules load other folders' copies of
    the same names (imaging, medical...)."""
    for mod in list(sys.modules.values()):
        if getattr(mod, "__file__", "") and "/evaluation/" in mod.__file__:
            monkeypatch.setitem(sys.modules, mod.__name__, mod)


def texture(rng, level, size=32):
    """A smooth random texture around a grey level (every draw is a new image)."""
    t = gaussian_filter(rng.normal(0, 1, (size, size)), 1.5)
    return np.clip(level + 60 * t / t.std(), 0, 255).astype(np.uint8)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# planted copies: generated name -> (training file, how it was altered)
PLANTED = {"bright/copy_exact.png": ("bright/train_3.png", lambda a: a),
           "bright/copy_flip.png": ("bright/train_5.png", lambda a: a[:, ::-1]),
           "dark/copy_bright.png": ("dark/train_1.png", lambda a: np.clip(a.astype(int) * 0.8 + 30, 0, 255))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    rng = np.random.default_rng(0)
    for role, n in (("train", 12), ("real", 12), ("gen", 9)):
        for cls, level in LEVELS.items():
            for i in range(n):
                save(d / role / cls / f"{role}_{i}.png", texture(rng, level))
    for name, (src, alter) in PLANTED.items():
        a = np.asarray(Image.open(d / "train" / src))
        save(d / "gen" / name, np.ascontiguousarray(alter(a)).astype(np.uint8))
    torch.jit.script(TinyFeatures()).save(str(d / "tiny.pt"))
    (d / "empty").mkdir()
    for i in range(4):
        save(d / "flat" / f"{i}.png", texture(rng, 120))
    return d


def run_main(capsys, args):
    try:
        pr.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_end_to_end_trust_report(folders, tmp_path):
    d = folders
    out = run_script("evaluation", [
        "precision_recall.py", "--real", d / "real", "--gen", d / "gen", "--train_dir", d / "train",
        "--metrics", "fid,precision,recall,memorization", "--feature_extractor", d / "tiny.pt",
        "--bootstrap", "20", "--floor", "--tstr", "--num_workers", "0", "--no_cache",
        "--json", tmp_path / "r.json"])
    r = json.loads((tmp_path / "r.json").read_text())
    mem = r["memorization"]
    assert mem["method"] == "pixel-ncc" and mem["false_flag_rate"] == 0.01 and mem["n_gen"] == 21
    assert {"copy_rate", "threshold", "heldout_flag_rate", "copies"} <= set(mem)
    found = {c["gen"]: c["train"] for c in mem["copies"]}
    for gen_name, (train_name, _) in PLANTED.items():
        assert found.get(gen_name) == train_name, (gen_name, found)  # flagged, with its source
    assert len(found) - len(PLANTED) <= 2  # novel images: about the calibrated rate (at most 1 of 24 held out)
    assert mem["copy_rate"] == pytest.approx(len(found) / 21)
    assert all(c["similarity"] > mem["threshold"] for c in mem["copies"])
    assert mem["feature_space"]["method"] == "feature-cosine"  # --feature_extractor: also in its space
    for key in ("fid", "precision", "recall"):
        iv = r["intervals"][key]
        assert iv["low"] <= r[key] <= iv["high"] and iv["n"] == 20, (key, iv, r[key])
    fl = r["floor"]
    assert fl["n_a"] + fl["n_b"] == 24 and {"fid", "precision", "recall"} <= set(fl)
    t = r["tstr"]
    assert t["task"] == "classification" and t["classes"] == ["bright", "dark"]
    for name, n_train in (("synthetic", 21), ("real", 24)):
        assert t[name]["n_train"] == n_train and t[name]["n_test"] == 24 and 0 <= t[name]["accuracy"] <= 1
    assert t["real"]["accuracy"] > 0.5  # the classes differ in brightness: a trained network sees it
    for line in ("Copy rate (pixel-ncc):", "Real-vs-real floor:", "TSTR accuracy:", "95% CI"):
        assert line in out.stdout, line
    md = (tmp_path / "r.md").read_text()
    assert "# Trust report" in md and "copy_exact.png" in md and "](r_gallery.png)" in md
    assert "Real-vs-real floor" in md and "TSTR" in md
    with Image.open(tmp_path / "r_gallery.png") as im:
        assert im.size[0] > 64 and im.size[1] > 64


def test_memorization_alone_needs_no_network(folders, tmp_path, capsys):
    d = folders
    boom = mock.Mock(side_effect=AssertionError("a network was built"))
    with mock.patch.object(pr, "build_inception", boom), mock.patch.object(pr, "build_vgg", boom), \
            mock.patch.object(pr, "load_torchscript", boom):
        code, out, err = run_main(capsys, ["--real", d / "real", "--gen", d / "gen", "--train-dir", d / "train",
                                           "--metrics", "memorization", "--num_workers", "0",
                                           "--json", tmp_path / "m.json", "--report", tmp_path / "m_report.md"])
    assert code == 0, err
    r = json.loads((tmp_path / "m.json").read_text())
    assert "fid" not in r and r["memorization"]["method"] == "pixel-ncc"
    assert "feature_space" not in r["memorization"]
    assert {c["gen"] for c in r["memorization"]["copies"]} >= set(PLANTED)
    assert (tmp_path / "m_report.md").exists() and (tmp_path / "m_gallery.png").exists()
    assert "Copy rate (pixel-ncc):" in out


def test_segmentation_tstr_on_pair_folders(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for role, n in (("train", 8), ("real", 6), ("gen", 6)):
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            y, x = rng.integers(2, 16, 2)
            mask[y:y + 12, x:x + 12] = 255
            img = np.clip(texture(rng, 60) * 0.5 + (mask > 0) * 140, 0, 255).astype(np.uint8)
            # ControlNet's inference names its output after the mask: <mask stem>_seed<N>.png
            name = f"m{i}_seed{i}.png" if role == "gen" else f"m{i}.png"
            save(tmp_path / role / "images" / name, img)
            save(tmp_path / role / "masks" / f"m{i}.png", mask)
    net = tmp_path / "tiny.pt"
    torch.jit.script(TinyFeatures()).save(str(net))
    code, out, err = run_main(capsys, ["--real", tmp_path / "real", "--gen", tmp_path / "gen", "--train_dir",
                                       tmp_path / "train", "--metrics", "fid", "--feature_extractor", net, "--tstr",
                                       "--num_workers", "0", "--no_cache", "--json", tmp_path / "s.json"])
    assert code == 0, err
    r = json.loads((tmp_path / "s.json").read_text())
    assert (r["n_real"], r["n_gen"]) == (6, 6)  # the masks are not counted as images
    t = r["tstr"]
    assert t["task"] == "segmentation" and t["synthetic"]["n_train"] == 6 and t["real"]["n_train"] == 8
    assert 0 <= t["synthetic"]["dice"] <= 1 and 0 <= t["real"]["dice"] <= 1
    assert "TSTR dice:" in out and "Real Data: real (6 images)" in out and (tmp_path / "s.md").exists()
    (tmp_path / "gen" / "masks" / "m5.png").unlink()  # an image without its mask: one line, before any work
    code, _, err = run_main(capsys, ["--real", tmp_path / "real", "--gen", tmp_path / "gen", "--metrics", "fid",
                                     "--feature_extractor", net, "--tstr", "--json", tmp_path / "t.json"])
    assert code == 2 and "m5_seed5.png has no mask" in err and not (tmp_path / "t.json").exists()


BAD = [
    ("memorization-without-train", lambda d: ["--metrics", "memorization"], "needs --train_dir"),
    ("train-dir-empty", lambda d: ["--train_dir", d / "empty"], "holds no images"),
    ("train-dir-missing", lambda d: ["--train_dir", d / "nope"], "--train_dir"),
    ("tstr-without-classes", lambda d: ["--gen", d / "flat", "--tstr", "--metrics", "fid"],
     "--tstr needs class subfolders"),
    ("tstr-train-layout", lambda d: ["--tstr", "--train_dir", d / "flat", "--metrics", "fid"],
     "must be laid out like --gen and --real"),
    ("bootstrap-negative", lambda d: ["--bootstrap", "-1"], "--bootstrap must be 0"),
    ("false-flag-rate", lambda d: ["--false_flag_rate", "0", "--train_dir", d / "train"], "--false_flag_rate"),
    ("max-shift", lambda d: ["--max_shift", "20", "--train_dir", d / "train"], "--audit_size"),
    ("report-suffix", lambda d: ["--report", d / "r.txt"], "must end with .md"),
    ("floor-memorization-only", lambda d: ["--floor", "--metrics", "memorization", "--train_dir", d / "train"],
     "--floor needs a feature metric"),
    ("bootstrap-without-metric", lambda d: ["--bootstrap", "10", "--metrics", "kid"], "--bootstrap gives"),
]


@pytest.mark.parametrize("make,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_one_line_nothing_written(folders, tmp_path, capsys, make, message):
    d = folders
    args = ["--real", d / "real", "--gen", d / "gen", "--feature_extractor", d / "tiny.pt", "--num_workers", "0",
            "--cache_dir", tmp_path / "cache"]
    extra = make(d)
    if "--gen" in extra:  # the case replaces --gen
        i = args.index("--gen")
        del args[i:i + 2]
    code, _, err = run_main(capsys, [*args, *extra, "--json", tmp_path / "x.json"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, (message, err)
    assert not list(tmp_path.iterdir())  # no JSON, report, gallery or cache entry


def test_floor_with_stats_only_npz_refused(folders, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", mu=np.zeros(8), sigma=np.eye(8))
    code, _, err = run_main(capsys, ["--real", tmp_path / "s.npz", "--gen", folders / "gen", "--feature_extractor",
                                     folders / "tiny.pt", "--metrics", "fid", "--floor", "--num_workers", "0"])
    assert code == 2 and "--floor needs the real images' features" in err
