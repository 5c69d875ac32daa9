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
