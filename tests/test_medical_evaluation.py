"""The evaluator (evaluation/) on medical data: DICOM vs its windowed 8-bit export, NIfTI in HU vs DICOM, splits.

    OMP_NUM_THREADS=1 python -m pytest tests/test_medical_evaluation.py -q

Every file is written here (tests/medical_files.py) from values in HU. The feature extractor is a tiny
TorchScript network made here (no download), so FD ~0 means the two sides gave the same features.
"""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import load_folder, run_main_expect
from eval_helpers import TinyFeatures  # noqa: E402

pr, images, features, demo_classifier, medical, imaging, writers = load_folder(
    "evaluation", "precision_recall", "images", "features", "demo_classifier", "medical", "imaging", "writers")
from medical_files import ct_volume, windowed, write_ct_series, write_dicom, write_nifti  # noqa: E402

CT = ct_volume(n_slices=6, size=24)


@pytest.fixture(autouse=True)
def evaluation_modules(monkeypatch):
    """Pin evaluation's modules in sys.modules for each test: other test modules load other folders' copies of
    the same names (imaging, medical...)."""
    for mod in (pr, images, features, demo_classifier, medical, imaging, writers):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "tiny_features.pt"
    torch.jit.script(TinyFeatures()).save(str(path))
    return str(path)


def evaluate(capsys, tmp_path, real, gen, tiny, *flags):
    """precision_recall.main in this process -> (JSON results, stdout)."""
    out = tmp_path / "r.json"
    out.unlink(missing_ok=True)
    pr.main(["--real", str(real), "--gen", str(gen), "--feature_extractor", tiny, "--metrics", "fid,precision",
             "--num_workers", "0", "--cache_dir", str(tmp_path / "cache"), "--json", str(out), *map(str, flags)])
    return json.loads(out.read_text()), capsys.readouterr().out


def tensors(folder, opts):
    """What the evaluator's loader feeds the networks: N x 3 x H x W in [0, 1], read with `opts`."""
    sources, _ = images.list_sources(folder, opts)
    ds = images.ImageFiles(sources, opts)
    return torch.stack([ds[i][1] for i in range(len(ds))]).div(255)


def export_png(folder, hu, low, high):
    """The 8-bit PNG export of a CT series under the window [low, high] (what a viewer's export writes)."""
    folder.mkdir(parents=True)
    for k, sl in enumerate(hu):
        png = np.round(windowed(sl, low, high) * 255).astype(np.uint8)
        Image.fromarray(png).save(folder / f"P001_slice_{k:03d}.png")


@pytest.mark.parametrize("tags,flag,low,high", [
    ((40.5, 255), "auto", -87.0, 168.0),     # the files' own window, width 255: k / 255, bit-identical
    ((40, 80), "-160,240", -160.0, 240.0),   # a named window overrides the tags; within 0.5 / 255
], ids=["own-window-w255", "named-window-w400"])
def test_dicom_equals_windowed_png_export_and_fd_zero(tmp_path, tiny, capsys, tags, flag, low, high):
    write_ct_series(tmp_path / "dicom", CT, "P001", slope=0.5, intercept=-1024, window=tags)
    export_png(tmp_path / "png", CT, low, high)
    opts = medical.ReadOptions(flag)
    opts = opts.fit(images.list_sources(tmp_path / "dicom", opts)[0])
    assert opts.window == (low, high)
    a, b = tensors(tmp_path / "dicom", opts), tensors(tmp_path / "png", opts)
    assert a.shape == b.shape == (6, 3, 24, 24) and 0.1 < a.mean() < 0.9
    if high - low == 255:
        assert torch.equal(a, b)
    else:
        assert (a - b).abs().max() <= 0.5 / 255 + 1e-7 and not torch.equal(a, b)
    res, out = evaluate(capsys, tmp_path, tmp_path / "dicom", tmp_path / "png", tiny, "--intensity_window", flag)
    assert abs(res["fid"]) < (1e-9 if high - low == 255 else 1e-4) and res["precision"] == 1.0
    assert res["n_real"] == res["n_gen"] == 6
    assert res["settings"]["intensity"]["window"] == [low, high]
    assert f"intensity window [{low:g}, {high:g}]" in out
    # another window changes the DICOM side only (8-bit files pass unchanged), and is not served from the cache
    res2, out2 = evaluate(capsys, tmp_path, tmp_path / "dicom", tmp_path / "png", tiny, "--intensity_window", "bone")
    assert res2["fid"] > 100 * max(abs(res["fid"]), 1e-6) and "cached features" not in out2
    _, out3 = evaluate(capsys, tmp_path, tmp_path / "dicom", tmp_path / "png", tiny, "--intensity_window", flag)
    assert "real: cached features of custom reused" in out3


def test_generated_nifti_in_hu_read_like_the_real_dicom(tmp_path, tiny, capsys):
    """The window is fitted once on the real DICOM (its own window tags) and reads the NIfTI side too."""
    write_ct_series(tmp_path / "real", CT, "P001", window=(40, 400))
    opts = medical.ReadOptions("auto")
    opts = opts.fit(images.list_sources(tmp_path / "real", opts)[0])
    assert opts.window == (-160.0, 240.0)
    real = tensors(tmp_path / "real", opts)
    # a generator's output: each image in HU through the checkpoint's window (what inference writes) ...
    (tmp_path / "gen").mkdir()
    for k in range(len(CT)):
        assert writers.write_image_once(real[k, :1], tmp_path / "gen" / f"seed{k:04d}.png", "nifti", opts.window)
    # ... and one 3-D volume in HU without cal_min / cal_max: only the real side's window can map it
    vol = np.stack([sl[::-1, ::-1].T for sl in CT], axis=2)  # displayed slice k (axial) == CT[k]
    (tmp_path / "vol").mkdir()
    write_nifti(tmp_path / "vol" / "ct.nii.gz", vol)
    np.testing.assert_allclose(tensors(tmp_path / "gen", opts), real, atol=1e-5)
    assert torch.equal(tensors(tmp_path / "vol", opts), real)
    for gen in ("gen", "vol"):
        res, out = evaluate(capsys, tmp_path, tmp_path / "real", tmp_path / gen, tiny, "--save_stats",
                            tmp_path / "real.npz")
        assert abs(res["fid"]) < 1e-6 and res["n_gen"] == 6, gen
        assert res["settings"]["intensity"]["window"] == pytest.approx(list(opts.window))
        assert "intensity window [-160, 240] (the files' own window (6 of 6 images))" in out
    # read on its own, the volume (no window of its own) would get its percentiles: other numbers
    assert (tensors(tmp_path / "vol", medical.ReadOptions("auto")) - real).abs().max() > 0.1
    # real statistics from --save_stats record the window: the .npz alone maps the NIfTI side the same way
    res, out = evaluate(capsys, tmp_path, tmp_path / "real.npz", tmp_path / "vol", tiny)
    assert abs(res["fid"]) < 1e-6 and res["settings"]["intensity"]["window"] == pytest.approx(list(opts.window))
    msg = run_main_expect(pr.main, ["--real", str(tmp_path / "real.npz"), "--gen", str(tmp_path / "vol"),
                                    "--feature_extractor", tiny, "--intensity_window", "lung", "--num_workers", "0",
                                    "--json", str(tmp_path / "x.json")], capsys)
    assert "--intensity_window lung differs from the window the --real .npz" in msg
    assert not (tmp_path / "x.json").exists()


def test_demo_classifier_holds_out_whole_patients(tmp_path, capsys):
    src = tmp_path / "data"
    for c, cls in enumerate(("ct_a", "ct_b")):
        for p in range(6):  # 6 patients per class, 2 or 3 slices each, file names that do not say the patient
            hu = ct_volume(2 + p % 2, 16, seed=10 * c + p)
            for k, sl in enumerate(hu):
                (src / cls).mkdir(parents=True, exist_ok=True)
                write_dicom(src / cls / f"img_{p}{k}", sl, patient_id=f"{cls}-{p}")  # no extension: DICM preamble
    demo_classifier.main(["--data", str(src), "--out", str(tmp_path / "nets"), "--epochs", "1"])
    assert "held-out accuracy" in capsys.readouterr().out
    assert (tmp_path / "nets" / "digit_features.pt").is_file() and (tmp_path / "nets" / "digit_classifier.pt").is_file()
    sources, rel = images.list_sources(src, None)
    names, labels = images.class_layout(src, rel)
    gs = [medical.group_of(s) for s in sources]
    assert len(set(gs)) == 12
    train, val = demo_classifier.held_out_split(gs, labels.tolist(), 0)
    assert len(val) and not {gs[i] for i in train.tolist()} & {gs[i] for i in val.tolist()}
    assert sorted(train.tolist() + val.tolist()) == list(range(len(gs)))


@pytest.fixture(scope="module")
def medical_bad(tmp_path_factory):
    d = tmp_path_factory.mktemp("medical_bad")
    write_ct_series(d / "real", CT[:3], "P001")
    write_ct_series(d / "corrupt", CT[:3], "P001")
    good = (d / "corrupt" / "P001_slice_000.dcm").read_bytes()
    (d / "corrupt" / "broken.dcm").write_bytes(good[:len(good) // 2])  # a truncated transfer
    (d / "four_d").mkdir()
    write_nifti(d / "four_d" / "fmri.nii.gz", np.zeros((8, 8, 4, 3)))
    return d


@pytest.mark.bad_input
@pytest.mark.parametrize("real,gen,extra,message", [
    ("real", "real", ["--intensity_window", "bogus"], "--intensity_window: unknown intensity window 'bogus'"),
    ("corrupt", "real", [], "broken.dcm has unreadable DICOM pixel data"),
    ("real", "four_d", [], "fmri.nii.gz is a 4-D volume"),
], ids=["bogus-window", "corrupt-dicom", "4d-nifti"])
def test_bad_medical_input_one_line_nothing_written(medical_bad, tiny, tmp_path, capsys, real, gen, extra, message):
    d = medical_bad
    msg = run_main_expect(pr.main, ["--real", str(d / real), "--gen", str(d / gen), "--feature_extractor", tiny,
                                    "--num_workers", "0", "--cache_dir", str(tmp_path / "cache"), "--json",
                                    str(tmp_path / "x.json"), "--save_stats", str(tmp_path / "s.npz"), *extra], capsys)
    assert message in msg, msg
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "s.npz").exists()
    assert not (tmp_path / "cache").exists()


def test_class_folders_of_slices(tmp_path, tiny, capsys):
    """Class subfolders hold DICOM series (real) and NIfTI volumes (gen): figures per class count slices."""
    for c, (lo, hi) in enumerate(((0, 4), (2, 6))):
        write_ct_series(tmp_path / "real" / f"c{c}", CT[lo:hi], f"P{c}")
        (tmp_path / "gen" / f"c{c}").mkdir(parents=True)
        write_nifti(tmp_path / "gen" / f"c{c}" / "vol.nii.gz", np.stack([sl[::-1, ::-1].T for sl in CT[lo:hi]], 2))
    res, out = evaluate(capsys, tmp_path, tmp_path / "real", tmp_path / "gen", tiny, "--slice_range", "1:")
    assert (res["n_real"], res["n_gen"]) == (8, 6)  # the range applies to volumes: 3 of each volume's 4 slices
    assert {c: (v["n_real"], v["n_gen"]) for c, v in res["per_class"].items()} == {"c0": (4, 3), "c1": (4, 3)}
    assert all(np.isfinite(v["fid"]) for v in res["per_class"].values())
