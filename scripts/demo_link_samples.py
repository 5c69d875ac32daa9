"""Link the images of a mask-guided demo stage by class and as image/mask pairs, for the evaluation stage.

    python scripts/demo_link_samples.py GENERATED OUT --labels DATA/labels.csv --masks DATA/heldout/demo_masks

Every `<mask stem>[_<class>]_seed<N>.png` under GENERATED (ControlNet's and the pixel DDPM's names) is hard-
linked into OUT/samples/<class_name>/ (what evaluation/demo.sh evaluates) and OUT/pairs/images/, with a copy of
the mask it was generated from in OUT/pairs/masks/ (the segmentation TSTR). Existing links are kept.
"""
import argparse
import csv
import os
import shutil
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generated")
    p.add_argument("out")
    p.add_argument("--labels", required=True, help="stem,class_name CSV")
    p.add_argument("--masks", required=True, help="the folder of masks the images were generated from")
    args = p.parse_args(argv)
    out, masks = Path(args.out), Path(args.masks)
    with open(args.labels, newline="") as f:
        label = {r["stem"]: r["class_name"] for r in csv.DictReader(f)}
    n = 0
    for img in sorted(Path(args.generated).rglob("*_seed*.png")):
        if "comparisons" in img.parts:
            continue
        stem = img.name.split("_")[0]
        mask = masks / f"{stem}.png"
        if stem not in label or not mask.is_file():
            continue
        for dest, src in ((out / "samples" / label[stem] / img.name, img), (out / "pairs" / "images" / img.name, img),
                          (out / "pairs" / "masks" / img.name, None)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                os.link(img, dest) if src is not None else shutil.copy(mask, dest)
        n += 1
    print(f"linked {n} images by class into {out / 'samples'} and as pairs into {out / 'pairs'}")


if __name__ == "__main__":
    main()
