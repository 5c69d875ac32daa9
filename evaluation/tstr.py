"""Downstream utility of synthetic data: train on synthetic, test on real (TSTR) with a small CNN or segmenter.

Not run directly; `precision_recall.py` calls it. Example on float tensors (N, C, H, W) in [0, 1]:

    import tstr
    tstr_acc = tstr.classify(gen_x, gen_y, real_test_x, real_test_y, seed=0)["accuracy"]
    trtr_acc = tstr.classify(real_train_x, real_train_y, real_test_x, real_test_y, seed=0)["accuracy"]
    dice = tstr.segment(gen_img, gen_mask, real_img, real_mask, seed=0)["dice"]

Both networks are tiny (a few thousand parameters) and train for a few epochs on one CPU thread: the figure
is a comparison between training sets (synthetic vs real, same network, same seed), not a state-of-the-art
score. Seeded and deterministic: initialisation, batch order and ops depend only on `seed` (the caller's
global RNG and thread count are restored afterwards). Resizing is the caller's job; all images of a call
share one C, H, W.

Dice is controlnet/inference.py's definition (`--report_dice`): 2|A n B| / (|A| + |B|) of two boolean
foregrounds, 1.0 when both are empty, averaged over the test images. Binary masks (values in [0, 1]) have the
foreground > 0.5; integer label masks (0 = background, 1..L-1 classes) get the mean Dice over the classes
present in the truth or the prediction of each image.
"""
import contextlib
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 32
# Small synthetic sets get as many optimizer steps as large ones: with epochs alone, 200 demo samples saw 70
# steps and the classifier stayed near chance (0.21 held-out accuracy, 0.69 with 420 steps; 1,200 real
# images reach 0.90 in 10 epochs = 380 steps), which would have measured the set size, not its usefulness.
MIN_STEPS = 400


class SmallCNN(nn.Module):
    """Three 3x3 conv blocks (8, 16, 16 channels), global average pooling, a linear head: ~4k parameters."""

    def __init__(self, channels, classes, width=8):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * w, classes)

    def forward(self, x):
        return self.head(self.body((x - 0.5) / 0.5))


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class TinyUNet(nn.Module):
    """A two-level U-Net (8 and 16 channels, one skip): ~6k parameters; any H, W (odd sizes are padded)."""

    def __init__(self, channels, outputs, width=8):
        super().__init__()
        self.enc = _block(channels, width)
        self.mid = _block(width, 2 * width)
        self.dec = _block(3 * width, width)
        self.out = nn.Conv2d(width, outputs, 1)

    def forward(self, x):
        e = self.enc((x - 0.5) / 0.5)
        m = self.mid(F.max_pool2d(e, 2, ceil_mode=True))
        up = F.interpolate(m, size=e.shape[-2:], mode="nearest")
        return self.out(self.dec(torch.cat([e, up], 1)))


@contextlib.contextmanager
def _seeded(seed):
    """Seed torch inside, restore the caller's RNG, thread count and determinism flag outside."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # One thread: a network this small gains nothing from more, results do not depend on the machine's
        # thread count, and a busy machine's spin-waits made such training 20x slower (demo_classifier.py).
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(det)


def _images(x, name):
    """Float32 (N, C, H, W) tensor in [0, 1]; ValueError naming the argument otherwise."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{name}: expected a non-empty (N, C, H, W) image tensor, got shape {tuple(x.shape)}")
    x = x.detach().cpu().float()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"{name}: image values must be finite and in [0, 1] (got {x.min():.3g} to {x.max():.3g})")
    return x


def _labels(y, n, name, images_name):
    """Int64 (N,) labels matching n images."""
    y = torch.as_tensor(np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y))
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"{name}: expected a 1-D array of integer class labels, got {y.dtype} {tuple(y.shape)}")
    if len(y) != n:
        raise ValueError(f"{name} has {len(y)} labels but {images_name} has {n} images")
    return y.long()


def _same_shape(a, b, names):
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"{names[0]} is {tuple(a.shape[1:])} (C, H, W) but {names[1]} is {tuple(b.shape[1:])}; "
                         f"resize both to one size")


def _check_run(epochs, device):
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    return torch.device(device)


def _train(net, x, target, loss_fn, epochs, lr, seed, device, min_steps=MIN_STEPS):
    """AdamW over seeded mini-batches, `epochs` or more so that at least `min_steps` steps are taken; the loop every
    TSTR network shares."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed + 1)
    net.train()
    per_epoch = max(1, len(x) // BATCH + (len(x) % BATCH >= 2))
    epochs = max(epochs, -(-min_steps // per_epoch))
    # The learning rate decays to zero (cosine): at a constant rate the last step decided the score (held-out
    # accuracy of one demo classifier ranged 0.64-0.97 between 10 and 20 epochs and between seeds).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k / (epochs * per_epoch), 1))))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order), BATCH):
            b = order[i:i + BATCH]
            if len(b) < 2 and len(order) > 1:  # a batch of 1 breaks BatchNorm statistics; fold it away
                continue
            loss = loss_fn(net(x[b].to(device)), target[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


@torch.no_grad()
def _predict(net, x, device):
    return torch.cat([net(x[i:i + 256].to(device)).cpu() for i in range(0, len(x), 256)])


def classify(train_x, train_y, test_x, test_y, *, seed=0, epochs=10, device="cpu", lr=3e-3, width=8):
    """{"accuracy", "n_train", "n_test", "classes", "chance", "seconds"}: a small CNN trained on train, scored on test.

    Labels are any integers; they are mapped onto the sorted union of train and test labels (a test class
    never seen in training counts as errors). "chance" is the test share of the most common test class.
    """
    t0 = time.time()
    train_x, test_x = _images(train_x, "train_x"), _images(test_x, "test_x")
    train_y = _labels(train_y, len(train_x), "train_y", "train_x")
    test_y = _labels(test_y, len(test_x), "test_y", "test_x")
    _same_shape(train_x, test_x, ("train_x", "test_x"))
    device = _check_run(epochs, device)
    classes = torch.unique(torch.cat([train_y, test_y]))
    ytr, yte = torch.searchsorted(classes, train_y), torch.searchsorted(classes, test_y)
    with _seeded(seed):
        net = SmallCNN(train_x.shape[1], len(classes), width).to(device)
        _train(net, train_x, ytr, F.cross_entropy, epochs, lr, seed, device)
        pred = _predict(net, test_x, device).argmax(1)
    return {"accuracy": float((pred == yte).double().mean()), "n_train": len(train_x), "n_test": len(test_x),
            "classes": len(classes), "chance": torch.bincount(yte).max().item() / len(yte),
            "seconds": round(time.time() - t0, 3)}


def _masks(m, images, name, images_name):
    """(N, 1, H, W) mask tensor matching the images -> (int64 labels, number of labels, binary?)."""
    if not isinstance(m, torch.Tensor):
        m = torch.as_tensor(np.asarray(m))
    m = m.detach().cpu()
    if m.dim() != 4 or m.shape[1] != 1:
        raise ValueError(f"{name}: expected an (N, 1, H, W) mask tensor, got shape {tuple(m.shape)}")
    if len(m) != len(images):
        raise ValueError(f"{name} has {len(m)} masks but {images_name} has {len(images)} images")
    if m.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"{name} masks are {tuple(m.shape[-2:])} (H, W) but {images_name} images are "
                         f"{tuple(images.shape[-2:])}")
    if m.dtype == torch.bool:
        return m.long(), 2, True
    if m.dtype.is_floating_point:
        if not torch.isfinite(m).all() or m.min() < 0:
            raise ValueError(f"{name}: mask values must be finite and non-negative")
        if m.max() <= 1:
            return (m > 0.5).long(), 2, True
        if not torch.equal(m, m.round()):
            raise ValueError(f"{name}: float masks are binary in [0, 1] or integer labels; got fractional values "
                             f"above 1")
    if m.min() < 0:
        raise ValueError(f"{name}: label masks must be non-negative (0 = background)")
    m = m.long()
    top = int(m.max())
    return m, max(top + 1, 2), top <= 1


def dice(mask_fg, image_fg):
    """Dice overlap of two boolean arrays (1.0 when both are empty): controlnet/inference.py's definition."""
    a, b = mask_fg.sum(), image_fg.sum()
    return 1.0 if a + b == 0 else float(2 * np.logical_and(mask_fg, image_fg).sum() / (a + b))


def mean_dice(pred, truth, labels):
    """Mean over images of Dice (binary: the foreground; labels: mean over classes present in either)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    scores = []
    for p, t in zip(pred, truth):
        if labels <= 2:
            scores.append(dice(t > 0, p > 0))
            continue
        per = [dice(t == c, p == c) for c in range(1, labels) if (t == c).any() or (p == c).any()]
        scores.append(float(np.mean(per)) if per else 1.0)
    return float(np.mean(scores))


def _soft_dice_loss(logits, target):
    p = torch.sigmoid(logits)
    inter = (p * target).sum((1, 2, 3))
    return (1 - (2 * inter + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)).mean()


def segment(train_img, train_mask, test_img, test_mask, *, seed=0, epochs=30, device="cpu", lr=1e-2, width=8):
    """{"dice", "n_train", "n_test", "labels", "seconds"}: a tiny U-Net trained on train pairs, mean Dice on test."""
    t0 = time.time()
    train_img, test_img = _images(train_img, "train_img"), _images(test_img, "test_img")
    _same_shape(train_img, test_img, ("train_img", "test_img"))
    ytr, ltr, _ = _masks(train_mask, train_img, "train_mask", "train_img")
    yte, lte, _ = _masks(test_mask, test_img, "test_mask", "test_img")
    device = _check_run(epochs, device)
    labels = max(ltr, lte)
    with _seeded(seed):
        if labels == 2:  # binary: BCE + soft Dice, so a small foreground is not drowned by the background
            net = TinyUNet(train_img.shape[1], 1, width).to(device)
            target = ytr.float()
            loss = lambda out, t: F.binary_cross_entropy_with_logits(out, t) + _soft_dice_loss(out, t)  # noqa: E731
            _train(net, train_img, target, loss, epochs, lr, seed, device)
            pred = (_predict(net, test_img, device) > 0).long()
        else:
            net = TinyUNet(train_img.shape[1], labels, width).to(device)
            _train(net, train_img, ytr[:, 0], F.cross_entropy, epochs, lr, seed, device)
            pred = _predict(net, test_img, device).argmax(1, keepdim=True)
    return {"dice": mean_dice(pred.numpy(), yte.numpy(), labels), "n_train": len(train_img),
            "n_test": len(test_img), "labels": labels, "seconds": round(time.time() - t0, 3)}
