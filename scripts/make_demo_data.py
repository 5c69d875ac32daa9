"""Write the demo data set from scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

    python scripts/make_demo_data.py --out demo_data [--size 32]

Layout written (grayscale PNGs, `--size` pixels square):
    demo_data/digits/digit_0 .. digit_9/<index>.png     class folders (DDPM, LDM, DiT, evaluation)
    demo_data/pairs/images/<index>.png                   image/mask pairs (ControlNet)
    demo_data/pairs/masks/<index>.png                    mask = the digit's foreground (0 or 255)
No download is needed: the digits ship inside scikit-learn.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def digit_images(size):
    """Return (uint8 images N x size x size, labels N) upscaled from the 8x8 digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for img in digits.images:  # values 0..16
        small = Image.fromarray(np.uint8(np.round(img / 16.0 * 255.0)), mode="L")
        out.append(np.asarray(small.resize((size, size), Image.BICUBIC)))
    return np.stack(out), digits.target.astype(int)


def main(argv=None):
    """Write the class-folder and the image/mask layouts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", "--out-dir", "--out_dir", dest="out", default="demo_data")
    parser.add_argument("--size", type=int, default=32, help="side of the written images in pixels")
    parser.add_argument("--mask_threshold", "--mask-threshold", type=int, default=96,
                        help="grey level (0-255) above which a pixel counts as the digit's foreground")
    args = parser.parse_args(argv)
    if args.size < 8:
        sys.exit(f"--size must be at least 8, got {args.size}")
    out = Path(args.out)
    images, labels = digit_images(args.size)
    for c in range(10):
        (out / "digits" / f"digit_{c}").mkdir(parents=True, exist_ok=True)
    (out / "pairs" / "images").mkdir(parents=True, exist_ok=True)
    (out / "pairs" / "masks").mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        name = f"{i:04d}.png"
        Image.fromarray(img, mode="L").save(out / "digits" / f"digit_{label}" / name)
        Image.fromarray(img, mode="L").save(out / "pairs" / "images" / name)
        mask = np.where(img > args.mask_threshold, 255, 0).astype(np.uint8)
        Image.fromarray(mask, mode="L").save(out / "pairs" / "masks" / name)
    print(f"Wrote {len(images)} digits ({args.size}x{args.size} grayscale) to {out / 'digits'} "
          f"(10 class folders) and image/mask pairs to {out / 'pairs'}")


if __name__ == "__main__":
    main()
