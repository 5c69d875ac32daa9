"""Tests of the image-conditioned DDPM sampler (ddpm/cond_inference.py via inference.py) and ddpm/metrics.py:
metrics against hand computations, names / seeds / write-once outputs, the reports of each task, one-line
errors for bad input, and a 2-process torchrun run.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ddpm_cond_inference.py -q
Tiny checkpoints trained in-process by ddpm/train.py (16 px, width 8, 2 steps); data written by the tests.
"""
import csv
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medical_files import write_nifti
from repo_helpers import free_port, load_folder, run_main_expect, run_script

train, inference, cond_inference, metrics, conditional, imaging = load_folder(
    "ddpm", "train", "inference", "cond_inference", "metrics", "conditional", "imaging")

S = 16
TINY = ["--image-size", str(S), "--base-channels", "8", "--time-dim", "16", "--noise-steps", "20",
        "--max-train-steps", "2", "--batch-size", "2", "--sample-every-epochs", "0", "--device", "cpu"]
FAST = ["--sampler", "ddim", "--sampling-steps", "3", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def square_mask(r, c, n=6):
    m = np.zeros((S, S), np.uint8)
    m[r:r + n, c:c + n] = 255
    return m


def write_pairs(root, n=4, seed=0):
    """root/images/case<i>.png (bright square on noise) + root/masks/case<i>.png (0/255 square)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        m = square_mask(*rng.integers(2, 8, 2))
        img = (rng.random((S, S)) * 60).astype(np.uint8)
        img[m > 0] = 220
        Image.fromarray(img).save(root / "images" / f"case{i}.png")
        Image.fromarray(m).save(root / "masks" / f"case{i}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One real train.py checkpoint per task (mask2image with the classes a / b)."""
    root = tmp_path_factory.mktemp("cond")
    data = write_pairs(root / "data")
    (root / "classes.csv").write_text("".join(f"case{i},{'ab'[i % 2]}\n" for i in range(4)))
    work = root / "work"
    extra = {"mask2image": ["--class-labels-csv", str(root / "classes.csv")], "superres": ["--sr-factor", "4"]}
    out = {"data": data, "root": root}
    for task in ("mask2image", "superres", "segmentation", "masks"):
        train.main(["--task", task, "--data-root", str(data / "masks" if task == "masks" else data),
                    "--work-dir", str(work), *TINY, *extra.get(task, [])])
        out[task] = work / "models" / f"DDPM_{task}" / "ema_ckpt.pt"
    return out


def sample(argv, capsys):
    inference.main([str(a) for a in argv])
    return capsys.readouterr().out


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png(path):
    return np.asarray(Image.open(path))


# ------------------------------------------------------------------ metrics against hand computations
def ssim_reference(a, b):
    """SSIM by explicit loops over every 11x11 window (Wang et al. 2004, Gaussian sigma 1.5), one channel."""
    g = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2, vals = 0.01 ** 2, 0.03 ** 2, []
    for r in range(a.shape[0] - 10):
        for c in range(a.shape[1] - 10):
            x, y = a[r:r + 11, c:c + 11], b[r:r + 11, c:c + 11]
            mx, my = (w * x).sum(), (w * y).sum()
            vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def test_psnr_and_ssim_match_hand_computations():
    rng = np.random.default_rng(1)
    a = torch.from_numpy(rng.random((1, 20, 18)))
    assert metrics.ssim(a, a) == pytest.approx(1.0) and metrics.psnr(a, a) == math.inf
    checker = torch.from_numpy(np.indices((S, S)).sum(0) % 2 * 2 - 1.0)[None]
    assert metrics.psnr(torch.full((1, S, S), 0.5), 0.5 + 0.1 * checker) == pytest.approx(20.0)  # MSE 0.01
    assert metrics.psnr(torch.zeros(1, S, S), torch.full((1, S, S), 0.5), data_range=2.0) == pytest.approx(
        10 * math.log10(4 / 0.25))
    # constant images: no variance, SSIM is the luminance term alone
    c1 = 0.01 ** 2
    assert metrics.ssim(torch.full((1, S, S), 0.3), torch.full((1, S, S), 0.6)) == pytest.approx(
        (2 * 0.18 + c1) / (0.09 + 0.36 + c1))
    b = (a + 0.2 * torch.from_numpy(rng.standard_normal(a.shape))).clamp(0, 1)
    assert metrics.ssim(a, b) == pytest.approx(ssim_reference(a[0].numpy(), b[0].numpy()), abs=1e-9)
    rgb_a, rgb_b = a.repeat(3, 1, 1), torch.cat([b, a, a])  # mean over channels
    assert metrics.ssim(rgb_a, rgb_b) == pytest.approx((ssim_reference(a[0].numpy(), b[0].numpy()) + 2) / 3)


def test_vote_entropy_majority_and_label_dice():
    agree = torch.ones(4, 2, 2, dtype=torch.long)
    assert metrics.label_entropy(agree, 2).abs().max() == 0
    split = torch.tensor([0, 1, 0, 1])[:, None, None].expand(4, 2, 2)
    assert torch.allclose(metrics.label_entropy(split, 2), torch.ones(2, 2, dtype=torch.float64))
    three_one = torch.tensor([1, 1, 1, 0])[:, None, None]
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert metrics.label_entropy(three_one, 2).item() == pytest.approx(h)
    assert metrics.label_entropy(torch.tensor([0, 1, 2])[:, None, None], 3).item() == pytest.approx(1.0)
    assert metrics.label_entropy(torch.tensor([0])[:, None, None], 2).item() == 0  # one sample: no spread
    assert metrics.majority_mask(three_one, 2).item() == 1
    assert metrics.majority_mask(torch.tensor([2, 1, 2, 1])[:, None, None], 3).item() == 1  # tie: lower label
    a = np.array([[1, 1, 2, 0]])
    b = np.array([[1, 0, 2, 2]])
    assert metrics.label_dice(a, b, 3) == pytest.approx((2 / 3 + 2 / 3) / 2)  # labels 1 and 2
    assert metrics.label_dice(a, b, 2) == pytest.approx(2 * 2 / (3 + 3))  # foreground = any label > 0
    assert metrics.label_dice(np.zeros((2, 2)), np.zeros((2, 2)), 4) == 1.0


# ------------------------------------------------------------------ mask2image
def otsu_by_hand(gray):
    """Otsu's threshold by trying every level: the largest between-class variance w0 w1 (mu0 - mu1)^2."""
    g, best, arg = gray.astype(np.float64).ravel(), -1.0, 0
    for t in range(255):
        lo, hi = g[g <= t], g[g > t]
        v = 0.0 if not len(lo) or not len(hi) else len(lo) * len(hi) / len(g) ** 2 * (lo.mean() - hi.mean()) ** 2
        if v > best + 1e-12:
            best, arg = v, t
    return arg


def test_mask2image_names_seeds_rerun_and_dice(runs, tmp_path, capsys):
    conds = tmp_path / "conds"
    (conds / "sub").mkdir(parents=True)
    for name, (r, c) in (("b0", (1, 1)), ("sub/a1", (8, 4)), ("c2", (5, 9))):
        Image.fromarray(square_mask(r, c)).save(conds / f"{name}.png")
    out = tmp_path / "out"
    argv = ["--ckpt", runs["mask2image"], "--condition", conds, "--samples-per-condition", "2", "--class-label", "b",
            "--batch-size", "4", "--seed", "10", "--report-dice", "--save-comparison", "--output-dir", out, *FAST]
    log = sample(argv, capsys)
    # conditions sorted by path (b0, c2, sub/a1); sample j of condition i has seed 10 + 2i + j
    names = ["b0_b_seed10.png", "b0_b_seed11.png", "c2_b_seed12.png", "c2_b_seed13.png", "a1_b_seed14.png",
             "a1_b_seed15.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    assert sorted(p.name for p in (out / "comparisons").glob("*.png")) == sorted(names)
    assert png(out / "comparisons" / names[0]).shape == (128, 2 * 128 + 16)  # mask | sample, 8x nearest
    assert "sampled 6 new images (0 already there)" in log and "s/image" in log and "ms/step" in log
    rows = read_csv(out / "dice.csv")
    assert [r["image"] for r in rows] == names and [r["seed"] for r in rows] == [str(s) for s in range(10, 16)]
    by_cond = {"b0": conds / "b0.png", "c2": conds / "c2.png", "a1": conds / "sub" / "a1.png"}
    hand = []
    for r in rows:
        gray = png(out / r["image"])
        thr = otsu_by_hand(gray)
        fg, mask = gray > thr, png(by_cond[r["image"].split("_")[0]]) > 0
        hand.append(2 * (fg & mask).sum() / (fg.sum() + mask.sum()))
        assert int(r["threshold"]) == thr and float(r["dice"]) == pytest.approx(hand[-1], abs=1e-4)
    assert float(re.search(r"mean Dice ([\d.]+) over 6 image\(s\)", log).group(1)) == pytest.approx(np.mean(hand),
                                                                                                 abs=1e-4)
    # a rerun writes nothing; another batch size gives the same images (per-image seeds)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert "sampled 0 new images (6 already there)" in sample(argv, capsys)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    out1 = tmp_path / "batch1"
    sample([a if a != "4" else "1" for a in argv[:-len(FAST) - 2]] + ["--output-dir", out1, *FAST], capsys)
    # (oneDNN may sum a batch of 1 in another order than one of 4: a pixel may land on the next 8-bit level)
    diff = np.stack([np.abs(png(out1 / n).astype(int) - png(out / n)) for n in names])
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.99
    # guidance on the condition changes the images; other settings are refused in the same folder
    out2 = tmp_path / "scale0"
    sample([*argv[:-len(FAST) - 2], "--output-dir", out2, "--cond-scale", "0", *FAST], capsys)
    assert (out2 / names[0]).read_bytes() != (out / names[0]).read_bytes()
    msg = run_main_expect(inference.main, [str(a) for a in argv] + ["--cond-scale", "2"], capsys)
    assert "holds samples made with other settings (cond_scale=1.0)" in msg


def test_class_per_condition_from_a_csv(runs, tmp_path, capsys):
    conds = tmp_path / "conds"
    conds.mkdir()
    for name, (r, c) in (("m0", (1, 1)), ("m1", (8, 4))):
        Image.fromarray(square_mask(r, c)).save(conds / f"{name}.png")
    (tmp_path / "cls.csv").write_text("stem,class_name\nm0,a\nm1,b\n")
    common = ["--ckpt", runs["mask2image"], "--condition", conds, "--seed", "3", *FAST]
    sample([*common, "--class-labels-csv", tmp_path / "cls.csv", "--output-dir", tmp_path / "csv"], capsys)
    assert sorted(p.name for p in (tmp_path / "csv").glob("*.png")) == ["m0_a_seed3.png", "m1_b_seed4.png"]
    # each condition gets its own class: the same as asking for that class alone
    sample([*common, "--class-label", "b", "--output-dir", tmp_path / "b"], capsys)
    same = png(tmp_path / "csv" / "m1_b_seed4.png").astype(int) - png(tmp_path / "b" / "m1_b_seed4.png")
    other = png(tmp_path / "csv" / "m0_a_seed3.png").astype(int) - png(tmp_path / "b" / "m0_b_seed3.png")
    assert np.abs(same).max() <= 1 and np.abs(other).max() > 1
    (tmp_path / "part.csv").write_text("m0,a\n")
    msg = run_main_expect(inference.main, [str(a) for a in common] + ["--class-labels-csv", str(tmp_path / "part.csv"),
                                                                      "--output-dir", str(tmp_path / "x")], capsys)
    assert "has no row for 1 condition(s): m1.png" in msg


def test_pair_layout_writes_a_paired_data_set(runs, tmp_path, capsys):
    out = tmp_path / "pairs"
    sample(["--ckpt", runs["mask2image"], "--condition", runs["data"] / "masks", "--pair-layout", "--seed", "3",
            "--ground-truth", runs["data"] / "images", "--save-comparison", "--output-dir", out, *FAST], capsys)
    stems = [f"case{i}" for i in range(4)]
    assert sorted(p.stem for p in (out / "images").iterdir()) == stems
    assert sorted(p.stem for p in (out / "masks").iterdir()) == stems
    for s in stems:
        assert np.array_equal(png(out / "masks" / f"{s}.png"), png(runs["data"] / "masks" / f"{s}.png"))
        assert png(out / "images" / f"{s}.png").shape == (S, S)
        assert png(out / "comparisons" / f"{s}.png").shape == (128, 3 * 128 + 2 * 16)  # mask | sample | truth
    assert read_csv(out / "pairs.csv") == [{"stem": s, "seed": str(3 + i), "condition_index": str(i)}
                                           for i, s in enumerate(stems)]


def test_nifti_mask_volume_gives_one_condition_per_slice(runs, tmp_path, capsys):
    vol = np.zeros((S, S, 3), np.int16)
    for k in range(3):
        vol[2 + 3 * k:8 + 3 * k, 4:10, k] = 1
    path = write_nifti(tmp_path / "vol.nii.gz", vol)
    out = tmp_path / "nii"
    sample(["--ckpt", runs["mask2image"], "--condition", path, "--pair-layout", "--output-dir", out, *FAST], capsys)
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"vol_{k:04d}.png" for k in range(3)]
    masks = [png(out / "masks" / f"vol_{k:04d}.png") for k in range(3)]
    for k, m in enumerate(masks):
        assert np.array_equal(m, conditional.read_label_map(imaging.Source(path, k), 2)[0].numpy() * 255)
        assert m.sum() == 36 * 255
    assert not np.array_equal(masks[0], masks[1])


# ------------------------------------------------------------------ super-resolution
def test_superres_metrics_have_bicubic_rows_equal_to_a_hand_computation(runs, tmp_path, capsys):
    out = tmp_path / "sr"
    log = sample(["--ckpt", runs["superres"], "--ground-truth", runs["data"] / "images", "--samples-per-condition",
                  "2", "--output-dir", out, *FAST], capsys)
    rows = read_csv(out / "sr_metrics.csv")
    assert [r["method"] for r in rows] == ["bicubic", "ddpm", "ddpm"] * 4
    for r in rows:
        gt = png(r["ground_truth"]).astype(np.float64) / 255
        if r["method"] == "bicubic":  # degraded as in training: antialiased bicubic down x4, bicubic back up
            x = torch.from_numpy(gt)[None, None].float() * 2 - 1
            low = F.interpolate(x, size=(4, 4), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
            pred = (F.interpolate(low, size=(S, S), mode="bicubic", align_corners=False).clamp(-1, 1)[0, 0].double()
                    .numpy() + 1) / 2
        else:
            pred = png(out / r["image"]) / 255
        assert float(r["psnr"]) == pytest.approx(10 * math.log10(1 / ((pred - gt) ** 2).mean()), abs=2e-4)
    assert re.search(r"bicubic: mean PSNR [\d.]+ dB, mean SSIM [-\d.]+ over 4 image\(s\)", log)
    # low-res files of the model's input size give the same bicubic baseline
    low_dir = tmp_path / "low"
    low_dir.mkdir()
    for p in sorted((runs["data"] / "images").iterdir()):
        Image.fromarray(png(p)[::4, ::4]).save(low_dir / p.name)
    out2 = tmp_path / "sr_low"
    sample(["--ckpt", runs["superres"], "--condition", low_dir, "--ground-truth", runs["data"] / "images",
            "--output-dir", out2, *FAST], capsys)
    low = torch.from_numpy(png(low_dir / "case0.png").copy()).float()[None, None] / 255 * 2 - 1
    base = (F.interpolate(low, size=(S, S), mode="bicubic", align_corners=False).clamp(-1, 1)[0, 0].double() + 1) / 2
    gt = torch.from_numpy(png(runs["data"] / "images" / "case0.png") / 255)
    first = read_csv(out2 / "sr_metrics.csv")[0]
    assert first["method"] == "bicubic" and float(first["psnr"]) == pytest.approx(
        10 * math.log10(1 / float(((base - gt) ** 2).mean())), abs=2e-4)


# ------------------------------------------------------------------ segmentation (a fake sampler)
class FakeDiffusion:
    """Stands in for models.Diffusion: sample s is the left half as foreground, odd seeds the whole image."""

    def __init__(self, *args, **kwargs):
        self.calls = []

    def sample(self, model, n, seeds=None, cond=None, as_float=False, **kw):
        assert as_float and cond.shape == (n, 2, S, S) and bool((cond[:, 1] == 1).all())  # image + present channel
        self.calls.append(seeds)
        x = torch.zeros(n, 1, S, S)
        for k, s in enumerate(seeds):
            x[k, :, :, :S // 2] = 1
            if s % 2:
                x[k] = 1
        return x


def test_segmentation_mean_mask_uncertainty_and_dice(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cond_inference, "Diffusion", FakeDiffusion)
    gt = tmp_path / "gt"
    gt.mkdir()
    left = np.zeros((S, S), np.uint8)
    left[:, :S // 2] = 255
    for i in range(2):
        Image.fromarray(left).save(gt / f"case{i}.png")
    conds = tmp_path / "conds"
    conds.mkdir()
    for i in range(2):
        (conds / f"case{i}.png").write_bytes((runs["data"] / "images" / f"case{i}.png").read_bytes())
    out = tmp_path / "seg"
    state = runs["segmentation"].parent / "train_state.pt"  # the model rebuilt from the training config
    log = sample(["--ckpt", state, "--condition", conds, "--ground-truth", gt,
                  "--samples-per-condition", "3", "--output-dir", out, *FAST], capsys)
    # condition 0: seeds 0, 1, 2 -> two left halves, one full; condition 1: seeds 3, 4, 5 -> two full, one left
    assert png(out / "case0_seed1.png").min() == 255 and np.array_equal(png(out / "case0_seed0.png"), left)
    assert np.array_equal(png(out / "case0_mean.png"), left)
    assert png(out / "case1_mean.png").min() == 255
    h = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))  # 2 : 1 split of 3 votes
    for i in range(2):
        unc = png(out / f"case{i}_uncertainty.png")
        assert unc[:, :S // 2].max() == 0 and (unc[:, S // 2:] == round(h * 255)).all()
    rows = read_csv(out / "seg_metrics.csv")
    full = 2 * 128 / (128 + 256)  # a full mask against the left half
    assert [float(r["dice_mean_mask"]) for r in rows] == pytest.approx([1.0, full], abs=1e-4)
    assert [float(r["dice_samples_mean"]) for r in rows] == pytest.approx([(2 + full) / 3, (1 + 2 * full) / 3],
                                                                          abs=1e-4)
    assert [float(r["dice_samples_best"]) for r in rows] == [1.0, 1.0]
    assert f"mean Dice of the mean mask {(1 + full) / 2:.4f}" in log


def test_masks_checkpoint_writes_label_pngs(runs, tmp_path, capsys):
    out = tmp_path / "masks"
    sample(["--ckpt", runs["masks"], "--num-samples", "3", "--output-dir", out, *FAST], capsys)
    assert sorted(p.name for p in out.glob("*.png")) == [f"sample_seed{i}.png" for i in range(3)]
    for p in out.glob("*.png"):
        assert Image.open(p).mode == "L" and set(np.unique(png(p))) <= {0, 255}


# ------------------------------------------------------------------ bad input: one line each
def bad_inputs(runs, tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(odd / "x.png")
    d = runs["data"]
    return {
        "missing condition": (["--ckpt", runs["mask2image"]], "--condition is required for a mask2image"),
        "sr size": (["--ckpt", runs["superres"], "--condition", odd], f"condition {odd / 'x.png'} is 5x5 but this "
                                                                      f"superres model takes 4x4 low-res inputs"),
        "unknown class": (["--ckpt", runs["mask2image"], "--condition", d / "masks", "--class-label", "zz"],
                          "--class_label 'zz' is not a class of"),
        "no ground truth": (["--ckpt", runs["segmentation"], "--condition", d / "images", "--ground-truth", odd],
                            "has no file with the stem of 4 condition(s): case0.png, case1.png"),
        "unconditioned": (["--ckpt", runs["masks"], "--condition", d / "masks"], "without an image condition"),
        "dice on seg": (["--ckpt", runs["segmentation"], "--condition", d / "images", "--report-dice"],
                        "--report_dice is for mask2image"),
        "output inside condition": (["--ckpt", runs["mask2image"], "--condition", odd], f"is inside {odd}"),
    }


@pytest.mark.parametrize("case", ["missing condition", "sr size", "unknown class", "no ground truth",
                                  "unconditioned", "dice on seg", "output inside condition"])
def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys, case):
    argv, wanted = bad_inputs(runs, tmp_path)[case]
    out = tmp_path / ("odd" if case == "output inside condition" else "") / "never"
    msg = run_main_expect(inference.main, [str(a) for a in argv] + ["--output-dir", str(out), *FAST], capsys)
    assert wanted in msg, msg
    assert not out.exists()
    if case == "unknown class":
        assert "valid: a, b" in msg


# ------------------------------------------------------------------ torchrun: conditions over 2 ranks
def test_torchrun_segmentation_matches_one_process(runs, tmp_path, capsys):
    d = runs["data"]
    flags = ["--ckpt", runs["segmentation"], "--condition", d / "images", "--ground-truth", d / "masks",
             "--samples-per-condition", "2", *FAST]
    one, two = tmp_path / "one", tmp_path / "two"
    sample([*flags, "--output-dir", one], capsys)
    proc = run_script("ddpm", ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}", "inference.py",
                               *map(str, flags), "--output-dir", str(two)])
    assert "world size 2" in proc.stdout and "sampled 8 new images" in proc.stdout
    assert (two / "seg_metrics.csv").read_text() == (one / "seg_metrics.csv").read_text()
    files = sorted(p.name for p in one.glob("*.png"))
    assert len(files) == 4 * 4 and files == sorted(p.name for p in two.glob("*.png"))
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
