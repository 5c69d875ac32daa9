"""Train a small digit CNN on a class-folder image set and export it as two TorchScript files (demo stage).

    python demo_classifier.py --data DATA/digits --out OUT/evaluation [--epochs 8]

The held-out accuracy it prints is measured on a tenth of each class, held out as whole patients
(medical.group_split on medical.group_of: DICOM PatientID, then StudyInstanceUID; one NIfTI volume; else
one file; or --group_regex); the demo digits are one file each.

Writes `digit_features.pt` (images -> 64-d penultimate-layer features, for --feature_extractor) and
`digit_classifier.pt` (images -> class logits, with the class names stored in the module, for
--classifier). Both take what precision_recall.py feeds every network: float images in [0, 1],
B x 3 x H x W, any size (they average the channels and resize to 32x32 themselves). About a minute on
a CPU for the 1,797-image demo set. This is a domain network in the sense of --feature_extractor: its
numbers are comparable between models evaluated with the same file, not with published FIDs.
"""
import argparse
import sys
import warnings
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import medical
from images import ImageError, UserError, class_layout, list_images, list_sources, load_rgb


class DigitNet(nn.Module):
    """Three conv blocks and a dense layer -> 64-d features -> linear classifier."""

    def __init__(self, num_classes, size=32):
        super().__init__()
        self.size = size
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * (size // 8) ** 2, 64), nn.ReLU())
        self.head = nn.Linear(64, num_classes)

    def features(self, x):
        """[0,1] RGB of any size -> 64-d features."""
        x = x.mean(1, keepdim=True)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        return self.body((x - 0.5) / 0.5)

    def forward(self, x):
        return self.head(self.features(x))


class FeatureExport(nn.Module):
    """TorchScript wrapper: features only."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.features(x)


class ClassifierExport(nn.Module):
    """TorchScript wrapper: logits, plus the class names in index order."""

    class_names: List[str]

    def __init__(self, net, class_names):
        super().__init__()
        self.net = net
        self.class_names = list(class_names)

    def forward(self, x):
        return self.net(x)


def held_out_split(groups, labels, seed):
    """(train, val) index tensors, about a tenth of each class held out as whole patients (none if impossible)."""
    try:
        train, val = medical.group_split(groups, list(labels), 0.1, seed)
    except ValueError as exc:
        print(f"note: no held-out accuracy ({exc}); training on every image", flush=True)
        train, val = list(range(len(groups))), []
    return torch.tensor(train, dtype=torch.long), torch.tensor(val, dtype=torch.long)


def main(argv=None):
    """Train, report held-out accuracy, export."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="folder with one subfolder of images per class")
    p.add_argument("--out", required=True, help="folder for the two TorchScript files")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    medical.add_read_flags(p)  # --intensity_window for DICOM / NIfTI data, --group_regex for the held-out split
    args = p.parse_args(argv)
    try:
        if args.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {args.epochs}")
        try:
            opts = medical.options_from_args(args)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        files = list_images(args.data) if Path(args.data).is_dir() else []
        sources, rel = list_sources(args.data, opts) if files else ([], [])
        names, labels = class_layout(args.data, rel) if files else (None, None)
        if not names:
            raise UserError(f"--data {args.data} must hold one subfolder of images per class")
        try:
            opts = opts.fit(sources)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        groups = [medical.group_of(s, opts) for s in sources]
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except (UserError, ImageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # A network this small gains nothing from more threads, and on a busy machine their spin-waits made
    # training 20x slower (measured here: 1 s vs 55 ms per step).
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.time()
    try:
        pixels = [load_rgb(s, opts) for s in sources]
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if len({a.shape for a in pixels}) > 1:
        print(f"error: --data {args.data}: the images differ in size; the demo network needs one size", file=sys.stderr)
        sys.exit(2)
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    x = x.float().div(255)
    y = torch.from_numpy(labels)
    train, val = held_out_split(groups, labels.tolist(), args.seed)
    net = DigitNet(len(names))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(args.seed + 1)
    for epoch in range(args.epochs):
        net.train()
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), 32):
            b = order[i:i + 32]
            loss = F.cross_entropy(net(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x[val]).argmax(1) == y[val]).float().mean().item() if len(val) else float("nan")
        print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.4f}  held-out accuracy {acc:.4f}", flush=True)
    net.eval()
    feat_path, cls_path = Path(args.out) / "digit_features.pt", Path(args.out) / "digit_classifier.pt"
    warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=FutureWarning)
    torch.jit.script(FeatureExport(net)).save(str(feat_path))
    torch.jit.script(ClassifierExport(net, names)).save(str(cls_path))
    print(f"trained on {len(train)} images in {time.time() - t0:.1f}s; wrote {feat_path} and {cls_path}")


if __name__ == "__main__":
    main()
