"""Print the demo's comparison table from precision_recall.py --json results.

    python demo_table.py NAME=result.json [NAME=result.json ...] [--inception NAME=fid.json ...]

One row per model: FD, precision, recall (on the demo feature extractor), class accuracy of the generated
images (demo classifier), image counts, and FID (InceptionV3) where an Inception result is given.
"""
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


def main(argv=None):
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--inception", nargs="*", default=[])
    args = p.parse_args(argv)
    rows, fid = load(args.results), load(args.inception)
    cols = ["model", "n_real", "n_gen", "FD", "precision", "recall", "class acc"] + (["FID (Inception)"] if fid else [])
    table = [cols]
    for name, r in rows.items():
        acc = (r.get("class_accuracy") or {}).get("gen")
        table.append([name, str(r.get("n_real")), str(r.get("n_gen")), cell(r.get("fid")), cell(r.get("precision")),
                      cell(r.get("recall")), cell(acc)] + ([cell(fid.get(name, {}).get("fid"))] if fid else []))
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print(line)
    print(line)


if __name__ == "__main__":
    main()
