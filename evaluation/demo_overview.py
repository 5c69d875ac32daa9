"""One picture of the demo: a row of real held-out images, then a row of samples per model, one column per class.

    python demo_overview.py --real DATA/heldout/digits --out OUT/evaluation/overview.png \
        ddpm=OUT/ddpm/samples ldm=OUT/ldm/samples controlnet=OUT/controlnet/samples dit=OUT/dit/samples

Every folder has one subfolder per class (the same names). For each class the image with the lowest seed in its
file name (`..._seed7...`, `...seed0007...`) is shown, so every model's column shows the same class and, as far as
the models name their files by seed, the same seed; a folder without seeds in its names gives its first file.
Models whose folder is missing are left out. Written atomically (temporary file, then os.replace).
"""
import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imaging import decode_image, list_images, resize_image

SEED = re.compile(r"seed_?(\d+)", re.IGNORECASE)
CELL, LABEL_W = 64, 110


def pick(folder):
    """The file with the lowest seed in its name (else the first by name) of a class folder, or None."""
    files = list_images(folder, recursive=True)
    if not files:
        return None
    return min(files, key=lambda f: (int(m.group(1)) if (m := SEED.search(f.name)) else 10 ** 9, f.name))


def row_images(root, classes):
    """One CELL x CELL gray uint8 image per class (black where the class has no image)."""
    out = []
    for c in classes:
        f = pick(root / c) if (root / c).is_dir() else None
        x = resize_image(decode_image(f, 1), CELL)[0].numpy() if f is not None else np.zeros((CELL, CELL))
        out.append(np.round(x * 255).astype(np.uint8))
    return out


def main(argv=None):
    """Write the overview image."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", required=True, help="real class folders (the first row)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("models", nargs="*", help="NAME=FOLDER of class subfolders, one row each")
    args = p.parse_args(argv)
    real = Path(args.real)
    if not real.is_dir():
        sys.exit(f"error: --real {real} is not a folder")
    classes = sorted(d.name for d in real.iterdir() if d.is_dir() and not d.name.startswith("."))
    rows = [("real (held out)", row_images(real, classes))]
    for pair in args.models:
        name, folder = pair.split("=", 1)
        if Path(folder).is_dir():
            rows.append((name, row_images(Path(folder), classes)))
    canvas = Image.new("L", (LABEL_W + CELL * len(classes), 16 + CELL * len(rows)), 255)
    draw = ImageDraw.Draw(canvas)
    for j, c in enumerate(classes):
        draw.text((LABEL_W + j * CELL + 4, 2), c[-12:], fill=0)
    for i, (name, cells) in enumerate(rows):
        draw.text((4, 16 + i * CELL + CELL // 2 - 6), name[:18], fill=0)
        for j, cell in enumerate(cells):
            canvas.paste(Image.fromarray(cell), (LABEL_W + j * CELL, 16 + i * CELL))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        canvas.save(tmp, format="PNG")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"[evaluation] overview ({len(rows) - 1} model rows under the real row, {len(classes)} classes): {out}")


if __name__ == "__main__":
    main()
