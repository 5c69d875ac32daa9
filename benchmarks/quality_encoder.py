"""Train the frozen encoder that REPA aligns to in the quality benchmark, and export it as TorchScript.

    python benchmarks/quality_encoder.py --data DATA/digits --out ENC.pt [--epochs 4] [--seed 1]

REPA (Yu et al. 2024) needs a pretrained self-/supervised image encoder; no hub download is possible here, so
the benchmark trains a small one on the TRAINING digits only (class folders DATA/digits/<class>/*.png). It must
not be the network that scores the benchmark (evaluation/demo_classifier.py's DigitNet: ReLU, max-pooling,
a 64-d dense layer): aligning DiT tokens to the judge's own features would flatter the FD. So this is another
architecture (residual blocks, GroupNorm, SiLU, strided convolutions, no dense layer), another seed, and data
augmentation the judge never saw. The file takes what dit/train.py --repa_encoder feeds it: images in [0, 1],
(N, C, H, W), any C and size (channels averaged, resized to 32x32), and returns a 4x4 grid of tokens,
(N, 16, 96): the token grid of DiT-Ti/2 on the demo VAE's 8x8 latents.
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class ResBlock(nn.Module):
    """Pre-activation residual block; stride 2 halves the grid."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.n1 = nn.GroupNorm(8, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.n2 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1, stride)

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class TokenEncoder(nn.Module):
    """[0,1] images -> (N, 16, 96) tokens; a linear head on their mean is used only to train it."""

    def __init__(self, num_classes=10, size=32):
        super().__init__()
        self.size = size
        self.stem = nn.Conv2d(1, 32, 3, 1, 1)
        self.blocks = nn.Sequential(ResBlock(32, 48, 2), ResBlock(48, 64, 2), ResBlock(64, 96, 2))
        self.norm = nn.GroupNorm(8, 96)
        self.head = nn.Linear(96, num_classes)

    def tokens(self, x):
        """(N, C, H, W) in [0, 1] -> (N, 16, 96)."""
        x = x.mean(1, keepdim=True)
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        h = F.silu(self.norm(self.blocks(self.stem(x * 2 - 1))))
        return h.flatten(2).transpose(1, 2)

    def forward(self, x):
        return self.head(self.tokens(x).mean(1))


class TokenExport(nn.Module):
    """TorchScript wrapper: tokens only (what REPA aligns to)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.tokens(x)


def load_class_folders(root):
    """(float images N x 1 x H x W in [0, 1], labels N) of DATA/digits/<class>/*."""
    classes = sorted(p for p in Path(root).iterdir() if p.is_dir())
    xs, ys = [], []
    for label, folder in enumerate(classes):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in SUFFIXES:
                xs.append(np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0)
                ys.append(label)
    if not xs or len(classes) < 2:
        raise ValueError(f"--data {root} must hold at least two class folders of images")
    return torch.from_numpy(np.stack(xs))[:, None], torch.tensor(ys), len(classes)


def shift(x, gen, pixels=2):
    """Random translations of up to `pixels` (the digits are centred; a judge-free augmentation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=gen)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


def train_encoder(data, out, epochs=4, seed=1, batch_size=64):
    """Train on the class folders in `data`, write the TorchScript token encoder to `out`; returns train accuracy."""
    x, y, num_classes = load_class_folders(data)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = TokenEncoder(num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        net.train()
        for b in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = F.cross_entropy(net(shift(x[b], gen)), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = torch.cat([net(xb).argmax(1) for xb in x.split(256)]).eq(y).float().mean().item()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # torch 2.x marks TorchScript deprecated; dit/train.py still loads it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(TokenExport(net)).save(str(out))
    return acc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="training class folders (never the held-out digits)")
    p.add_argument("--out", required=True, help="TorchScript file to write")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if args.epochs < 1:
        sys.exit(f"error: --epochs must be at least 1, got {args.epochs}")
    if not Path(args.data).is_dir():
        sys.exit(f"error: --data {args.data}: no such folder")
    t0 = time.time()
    try:
        acc = train_encoder(args.data, args.out, args.epochs, args.seed)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    print(f"REPA encoder: training accuracy {acc:.3f}, {time.time() - t0:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
