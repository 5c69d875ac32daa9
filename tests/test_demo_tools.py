"""The demo's evaluation helpers: the comparison table and the overview image (evaluation/demo_*.py)."""
import json

import numpy as np
from PIL import Image

from repo_helpers import load_folder

demo_table, demo_overview = load_folder("evaluation", "demo_table", "demo_overview")


def test_table_shows_intervals_copy_rate_tstr_and_the_floor(tmp_path, capsys):
    model = {"n_gen": 200, "fid": 96.93, "intervals": {"fid": {"low": 57.28, "high": 169.87}}, "precision": 0.59,
             "recall": 0.63, "class_accuracy": {"gen": 0.95}, "memorization": {"copy_rate": 0.005},
             "tstr": {"synthetic": {"accuracy": 0.62}, "real": {"accuracy": 0.90}},
             "floor": {"fid": 18.94, "precision": 0.88, "recall": 0.96, "n_a": 299, "n_b": 300}}
    pairs = {"tstr": {"synthetic": {"dice": 0.95}, "real": {"dice": 0.99}}, "memorization": {"copy_rate": 0.0}}
    (tmp_path / "ldm.json").write_text(json.dumps(model))
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    demo_table.main([f"ldm={tmp_path / 'ldm.json'}", f"gone={tmp_path / 'missing.json'}",
                     "--segmentation", f"controlnet={tmp_path / 'pairs.json'}"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ldm "))
    assert row.split()[1:] == ["200", "96.93", "[57.28,", "169.87]", "0.5900", "0.6300", "0.9500", "0.0050", "0.6200"]
    floor = next(line for line in out.splitlines() if line.startswith("real vs real (floor, 299 vs 300)"))
    assert "18.94" in floor and "0.8800" in floor
    assert "gone" not in out and "reaches 0.9000 on the held-out images" in out
    assert "controlnet image/mask pairs: segmenter trained on them reaches Dice 0.9500" in out


def test_table_dice_column_and_pixel_task_lines(tmp_path, capsys):
    model = {"n_gen": 4, "fid": 10.0, "precision": 0.5, "recall": 0.5}
    (tmp_path / "m.json").write_text(json.dumps(model))
    (tmp_path / "dice.csv").write_text("image,dice\na.png,0.9000\nb.png,0.8000\n")
    (tmp_path / "sr.csv").write_text("method,psnr,ssim\nbicubic,20.0,0.8\nddpm,24.0,0.9\nddpm,26.0,0.7\n")
    (tmp_path / "seg.csv").write_text("samples,dice_mean_mask,dice_samples_mean,dice_samples_best\n"
                                      "4,0.9,0.8,0.95\n4,0.7,0.6,0.85\n")
    demo_table.main([f"m={tmp_path / 'm.json'}", "--dice", f"m={tmp_path / 'dice.csv'}",
                     "--superres", str(tmp_path / "sr.csv"), "--seg_metrics", str(tmp_path / "seg.csv")])
    out = capsys.readouterr().out
    assert "mask Dice" in out and next(ln for ln in out.splitlines() if ln.startswith("m ")).split()[-1] == "0.8500"
    assert "super-resolution of 1 held-out images (2 samples): PSNR 25.00 dB (bicubic 20.00 dB)" in out
    assert "SSIM 0.8000 (bicubic 0.8000)" in out
    assert "Dice of the mean mask 0.8000, of the samples 0.7000 (best of 4: 0.9000)" in out


def test_link_samples_by_class_and_as_pairs(tmp_path):
    import subprocess
    import sys

    from repo_helpers import REPO

    gen, masks = tmp_path / "generated", tmp_path / "masks"
    (gen / "comparisons").mkdir(parents=True)
    masks.mkdir()
    for stem in ("0001", "0002"):
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(masks / f"{stem}.png")
    for name in ("0001_digit_1_seed0.png", "0002_digit_2_seed2.png", "0003_digit_3_seed4.png",
                 "comparisons/0001_digit_1_seed0.png"):
        Image.fromarray(np.full((4, 4), 7, np.uint8)).save(gen / name)
    (tmp_path / "labels.csv").write_text("stem,class_name\n0001,digit_1\n0002,digit_2\n0003,digit_3\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(REPO / "scripts" / "demo_link_samples.py"), str(gen), str(out), "--labels",
                    str(tmp_path / "labels.csv"), "--masks", str(masks)], check=True, capture_output=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "pairs/images/0001_digit_1_seed0.png", "pairs/images/0002_digit_2_seed2.png",
        "pairs/masks/0001_digit_1_seed0.png", "pairs/masks/0002_digit_2_seed2.png",
        "samples/digit_1/0001_digit_1_seed0.png", "samples/digit_2/0002_digit_2_seed2.png"]  # 0003 has no mask
    assert np.asarray(Image.open(out / "pairs/masks/0001_digit_1_seed0.png")).min() == 255  # the mask, not the image


def test_overview_has_a_row_per_model_and_picks_the_lowest_seed(tmp_path):
    for root, names in (("real", ["a.png"]), ("m1", ["x_seed10.png", "x_seed2.png"]), ("m2", ["only.png"])):
        for c in ("c0", "c1"):
            (tmp_path / root / c).mkdir(parents=True)
            for name in names:
                value = 200 if "seed2." in name else 60
                Image.fromarray(np.full((8, 8), value, np.uint8)).save(tmp_path / root / c / name)
    out = tmp_path / "ov" / "overview.png"
    demo_overview.main(["--real", str(tmp_path / "real"), "--out", str(out), f"m1={tmp_path / 'm1'}",
                        f"m2={tmp_path / 'm2'}", f"absent={tmp_path / 'nothing'}"])
    img = np.asarray(Image.open(out))
    cell, label = demo_overview.CELL, demo_overview.LABEL_W
    assert img.shape == (16 + 3 * cell, label + 2 * cell)  # real row + 2 models (the absent one left out)
    m1_cell = img[16 + cell:16 + 2 * cell, label:label + cell]
    assert m1_cell.min() == m1_cell.max() == 200  # seed 2, not seed 10
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
