"""Print the demo's comparison table from precision_recall.py --json results.

    python demo_table.py NAME=result.json [NAME=result.json ...] [--inception NAME=fid.json ...] \
        [--segmentation NAME=pairs.json ...] [--dice NAME=dice.csv ...] [--superres sr_metrics.csv] \
        [--seg_metrics seg_metrics.csv]

One row per model: FD with its 95% bootstrap interval, precision, recall (on the demo feature extractor), class
accuracy of the generated images (demo classifier), the memorization audit's copy rate, TSTR accuracy (a small
classifier trained on the samples, tested on the held-out real images) and the image count; FID (InceptionV3)
where an Inception result is given. Under the rows: the real-versus-real floor (two halves of the held-out real
images) and the TSTR accuracy of the same classifier trained on the real training images. --segmentation adds a
line per image/mask pair result (the segmenter's Dice, synthetic-trained vs real-trained). --dice adds a column:
the mean Dice of a mask-guided model's dice.csv (mask vs thresholded image, ControlNet's definition). --superres
and --seg_metrics print the pixel DDPM's super-resolution (PSNR / SSIM, next to bicubic) and segmentation (Dice of
the mean mask and of the samples) results from the CSVs its inference writes.
"""
import csv
import argparse
import json
from pathlib import Path


def load(pairs):
    """NAME=path pairs -> {name: json dict} (missing files are skipped)."""
    out = {}
    for pair in pairs:
        name, path = pair.split("=", 1)
        if Path(path).is_file():
            out[name] = json.loads(Path(path).read_text())
    return out


def cell(v, fmt="{:.4f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else "-"


def with_interval(r, key, fmt="{:.2f}"):
    """'value [low, high]' when the result has a bootstrap interval for `key`."""
    v, iv = r.get(key), (r.get("intervals") or {}).get(key)
    if not isinstance(v, (int, float)):
        return "-"
    return f"{fmt.format(v)} [{fmt.format(iv['low'])}, {fmt.format(iv['high'])}]" if iv else fmt.format(v)


def csv_rows(path):
    """The rows of a metrics CSV (empty when the file is missing)."""
    if not path or not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_mean(rows, key):
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(vals) / len(vals) if vals else None


def tstr_value(r, side, key="accuracy"):
    return ((r.get("tstr") or {}).get(side) or {}).get(key)


def print_table(table):
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print(line)
    print(line)


def main(argv=None):
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--inception", nargs="*", default=[])
    p.add_argument("--segmentation", nargs="*", default=[])
    p.add_argument("--dice", nargs="*", default=[])
    p.add_argument("--superres")
    p.add_argument("--seg_metrics")
    args = p.parse_args(argv)
    rows, fid = load(args.results), load(args.inception)
    dice = {name: csv_mean(csv_rows(path), "dice") for name, path in (d.split("=", 1) for d in args.dice)}
    cols = ["model", "n_gen", "FD [95% CI]", "precision", "recall", "class acc", "copy rate", "TSTR acc"] + (
        ["mask Dice"] if dice else []) + (["FID (Inception)"] if fid else [])
    table = [cols]
    for name, r in rows.items():
        acc = (r.get("class_accuracy") or {}).get("gen")
        copy = (r.get("memorization") or {}).get("copy_rate")
        table.append([name, str(r.get("n_gen")), with_interval(r, "fid"), cell(r.get("precision")),
                      cell(r.get("recall")), cell(acc), cell(copy), cell(tstr_value(r, "synthetic"))]
                     + ([cell(dice.get(name))] if dice else []) + ([cell(fid.get(name, {}).get("fid"))] if fid else []))
    floor = next((r["floor"] for r in rows.values() if r.get("floor") and not r["floor"].get("skipped")), None)
    if floor:
        table.append([f"real vs real (floor, {floor.get('n_a')} vs {floor.get('n_b')})", "-",
                      cell(floor.get("fid"), "{:.2f}"), cell(floor.get("precision")), cell(floor.get("recall")),
                      "-", "-", "-"] + (["-"] if dice else []) + (["-"] if fid else []))
    print_table(table)
    real_acc = next((tstr_value(r, "real") for r in rows.values() if tstr_value(r, "real") is not None), None)
    if real_acc is not None:
        print(f"TSTR reference: the same classifier trained on the real training images reaches {real_acc:.4f} "
              f"on the held-out images")
    for name, r in load(args.segmentation).items():
        syn, real = tstr_value(r, "synthetic", "dice"), tstr_value(r, "real", "dice")
        copy = (r.get("memorization") or {}).get("copy_rate")
        print(f"{name} image/mask pairs: segmenter trained on them reaches Dice {cell(syn)} on the held-out pairs "
              f"(trained on the real training pairs: {cell(real)}); copy rate {cell(copy)}")
    sr = csv_rows(args.superres)
    if sr:
        ours, base = [r for r in sr if r["method"] == "ddpm"], [r for r in sr if r["method"] == "bicubic"]
        print(f"pixel DDPM super-resolution of {len(base)} held-out images ({len(ours)} samples): PSNR "
              f"{cell(csv_mean(ours, 'psnr'), '{:.2f}')} dB (bicubic {cell(csv_mean(base, 'psnr'), '{:.2f}')} dB), "
              f"SSIM {cell(csv_mean(ours, 'ssim'))} (bicubic {cell(csv_mean(base, 'ssim'))})")
    seg = csv_rows(args.seg_metrics)
    if seg:
        print(f"pixel DDPM segmentation of {len(seg)} held-out images ({seg[0]['samples']} samples each): Dice of the "
              f"mean mask {cell(csv_mean(seg, 'dice_mean_mask'))}, of the samples {cell(csv_mean(seg, 'dice_samples_mean'))} "
              f"(best of {seg[0]['samples']}: {cell(csv_mean(seg, 'dice_samples_best'))})")


if __name__ == "__main__":
    main()
