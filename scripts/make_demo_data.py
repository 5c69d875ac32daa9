"""Write the demo data set from scikit-learn's bundled 8x8 digits (1,797 images, 10 classes).

    python scripts/make_demo_data.py --out demo_data [--size 32]

Layout written (grayscale PNGs, `--size` pixels square):
    demo_data/digits/digit_0 .. digit_9/<index>.png     training class folders (DDPM, LDM, DiT)
    demo_data/pairs/images/<index>.png                   training image/mask pairs (ControlNet)
    demo_data/pairs/masks/<index>.png                    mask = the digit's foreground (0 or 255)
    demo_data/heldout/digits/..., demo_data/heldout/pairs/...   the same layouts for the held-out digits
    demo_data/labels.csv                                 stem,class_name of every digit (class of each pair)
    demo_data/heldout/demo_masks/<index>.png             ten held-out masks per digit: what the mask-guided
                                                         demo stages generate from
The held-out third (--heldout_fraction) is never trained on: the evaluation stage compares samples with it,
calibrates the memorization audit on it and tests the synthetic-trained classifier on it. It is split off per
class by whole "patients" (medical.group_split; each digit is its own here), as a medical data set would be.
No download is needed: the digits ship inside scikit-learn.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent / "vendored"))
import medical  # noqa: E402  (the repository's one patient-level split)


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
    parser.add_argument("--heldout_fraction", "--heldout-fraction", type=float, default=1 / 3,
                        help="share of each class held out from training (0 < f < 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split")
    parser.add_argument("--demo_masks", "--demo-masks", type=int, default=10,
                        help="held-out masks per digit copied to heldout/demo_masks/")
    args = parser.parse_args(argv)
    if args.size < 8:
        sys.exit(f"--size must be at least 8, got {args.size}")
    if not 0 < args.heldout_fraction < 1:
        sys.exit(f"--heldout_fraction must be between 0 and 1, got {args.heldout_fraction}")
    out = Path(args.out)
    images, labels = digit_images(args.size)
    train, heldout = medical.group_split([f"digit:{i}" for i in range(len(labels))], labels.tolist(),
                                         args.heldout_fraction, args.seed)
    rows = ["stem,class_name"] + [f"{i:04d},digit_{labels[i]}" for i in sorted(train + heldout)]
    (out / "heldout" / "demo_masks").mkdir(parents=True, exist_ok=True)
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    per_class = {c: sorted(i for i in heldout if labels[i] == c)[:args.demo_masks] for c in range(10)}
    demo_masks = {i for chosen in per_class.values() for i in chosen}
    for part, indices in ((out, train), (out / "heldout", heldout)):
        for c in range(10):
            (part / "digits" / f"digit_{c}").mkdir(parents=True, exist_ok=True)
        (part / "pairs" / "images").mkdir(parents=True, exist_ok=True)
        (part / "pairs" / "masks").mkdir(parents=True, exist_ok=True)
        for i in indices:
            img, name = images[i], f"{i:04d}.png"
            Image.fromarray(img, mode="L").save(part / "digits" / f"digit_{labels[i]}" / name)
            Image.fromarray(img, mode="L").save(part / "pairs" / "images" / name)
            mask = np.where(img > args.mask_threshold, 255, 0).astype(np.uint8)
            Image.fromarray(mask, mode="L").save(part / "pairs" / "masks" / name)
            if part != out and i in demo_masks:
                Image.fromarray(mask, mode="L").save(part / "demo_masks" / name)
    print(f"Wrote {len(images)} digits ({args.size}x{args.size} grayscale): {len(train)} for training in "
          f"{out / 'digits'} (10 class folders) and {out / 'pairs'} (image/mask pairs), {len(heldout)} held out "
          f"in {out / 'heldout'} (same layouts)")


if __name__ == "__main__":
    main()
