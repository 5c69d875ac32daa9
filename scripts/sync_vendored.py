"""Refresh the vendored copies of the shared modules in every folder, or check that none has drifted.

    python scripts/sync_vendored.py           # copy scripts/vendored/*.py into the folders listed below
    python scripts/sync_vendored.py --check   # exit 1 and name each copy that differs from its source

Each model folder runs from its own directory and can be copied out alone, so what they all need
(the image decoder, checkpoint I/O, seeds, precision, distributed setup, stop flags, logging, EMA...)
is not imported from a sibling: one canonical source lives in scripts/vendored/ and each folder holds a
byte-identical copy, the way diffusers keeps its `# Copied from` code in step (`make fix-copies`).
tests/test_vendored.py runs the check.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "scripts" / "vendored"
# module -> folders that get a copy (evaluation only decodes images: it needs no training runtime)
COPIES = {
    "runtime.py": ["ddpm", "ldm", "controlnet", "dit"],
    "imaging.py": ["ddpm", "ldm", "controlnet", "dit", "evaluation"],
    "medical.py": ["ddpm", "ldm", "controlnet", "dit", "evaluation"],
    "writers.py": ["ddpm", "ldm", "controlnet", "dit", "evaluation"],
    "pairing.py": ["ddpm", "controlnet"],  # image/mask pairing: the folders that train on pairs
    "animation.py": ["ddpm", "ldm", "controlnet", "dit"],  # interpolation strips / GIFs, progress.gif
    "serving.py": ["ddpm", "ldm", "controlnet", "dit"],  # serve.py: web page + HTTP API (optional deps)
    "posthoc_ema.py": ["ddpm", "ldm", "controlnet", "dit"],  # EDM2 post-hoc EMA: snapshots + rebuild command
}


def drifted():
    """[(source, copy)] for every copy that is missing or differs from its source."""
    out = []
    for name, folders in COPIES.items():
        src = SOURCE / name
        if not src.is_file():
            raise SystemExit(f"error: the source {src} is missing")
        for folder in folders:
            dst = REPO / folder / name
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                out.append((src, dst))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report drifted copies (exit 1 if any)")
    args = p.parse_args(argv)
    bad = drifted()
    if args.check:
        for src, dst in bad:
            print(f"{dst.relative_to(REPO)} differs from {src.relative_to(REPO)}: "
                  f"run python scripts/sync_vendored.py", file=sys.stderr)
        return 1 if bad else 0
    for src, dst in bad:
        dst.write_bytes(src.read_bytes())
        print(f"updated {dst.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
