"""Benchmark part `memorization`: speed of the memorization audit (evaluation/memorization.py, issue 15).

    python benchmarks/part_memorization.py --size paper --out /tmp/mem.json --workdir /tmp/bench

`paper`: 8,000 generated x 8,000 training images of 64 px plus 1,000 held-out images (random smooth RGB
textures; 1% of the generated images are planted near-copies of training images: flipped, shifted by 1-2 px,
contrast-changed or noisy). Variants, each timed over the whole `audit` call (validation, coarse ranking,
exact refinement of every generated and held-out image, calibration):
  pixel/rgb    pixel NCC over flips and shifts <= 2 px on colour images
  pixel/grey   the same on grey images copied to 3 channels (what the decoder gives for grey and medical
               data; the audit detects this and compares one channel)
  feature      cosine similarity of 2048-d features (what --feature_extractor / Inception give)
One round each at `paper` size (the pixel variants take tens of seconds); the planted copies found (with
their right source) are reported beside the time, so a fast but blind audit would show.
"""
import os
import time

from bench_common import median, part_args, say, side_by_side, setup_device, use_folder, write

use_folder("evaluation")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import memorization  # noqa: E402

SIZES = {"paper": dict(gen=8000, train=8000, heldout=1000, side=64, dim=2048),
         "small": dict(gen=200, train=200, heldout=100, side=32, dim=64)}


def textures(n, side, seed, grey=False):
    """n random smooth textures (bicubic upsampling of an 8x8 noise grid), float (N, 3, side, side) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, side, side)
    for s in range(0, n, 1000):
        m = min(1000, n - s)
        lo = torch.rand(m, 1 if grey else 3, 8, 8, generator=g)
        out[s:s + m] = F.interpolate(lo, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)
    return out


def plant(gen, train, seed):
    """Replace 1% of gen by altered copies of training images; returns {gen index: train index}."""
    rng = np.random.default_rng(seed)
    n = max(4, len(gen) // 100)
    gi = rng.choice(len(gen), n, replace=False)
    ti = rng.choice(len(train), n, replace=False)
    g = torch.Generator().manual_seed(seed)
    for k, (i, j) in enumerate(zip(gi, ti)):
        x = train[j]
        kind = k % 4
        if kind == 0:
            x = x.flip(-1)
        elif kind == 1:
            x = torch.roll(x, (1 + k % 2, -1), (1, 2))
        elif kind == 2:
            x = x * 0.7 + 0.15
        else:
            x = (x + 0.03 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        gen[i] = x
    return {int(i): int(j) for i, j in zip(gi, ti)}


def main():
    args = part_args(__doc__.splitlines()[0])
    load_start = os.getloadavg()
    device = setup_device(args.device)
    cfg = SIZES[args.size]
    sets = {}
    for name, grey in (("rgb", False), ("grey", True)):
        train = textures(cfg["train"], cfg["side"], 1, grey)
        gen = textures(cfg["gen"], cfg["side"], 2, grey)
        held = textures(cfg["heldout"], cfg["side"], 3, grey)
        sets[name] = (gen, train, held, plant(gen, train, 4))
    rng = np.random.default_rng(5)
    tf = rng.standard_normal((cfg["train"], cfg["dim"]), dtype=np.float32)
    feats = (rng.standard_normal((cfg["gen"], cfg["dim"]), dtype=np.float32), tf,
             rng.standard_normal((cfg["heldout"], cfg["dim"]), dtype=np.float32))
    planted_f = {i: i for i in range(0, cfg["gen"], 100)}
    for i in planted_f:
        feats[0][i] = tf[i] + 0.05 * rng.standard_normal(cfg["dim"], dtype=np.float32)
    results = {}

    def run(name):
        def fn():
            if name == "feature":
                res = memorization.audit(None, None, None, features=feats, device=device, progress=False)
                planted = planted_f
            else:
                gen, train, held, planted = sets[name.split("/")[1]]
                res = memorization.audit(gen, train, held, device=device, progress=False)
            found = {c["gen_index"]: c["train_index"] for c in res["copies"]}
            results[name] = dict(planted=len(planted), found=sum(found.get(i) == j for i, j in planted.items()),
                                 copy_rate=res["copy_rate"], threshold=res["threshold"],
                                 heldout_flag_rate=res["heldout_flag_rate"], inner_seconds=res["seconds"])
        return fn

    names = ["pixel/rgb", "pixel/grey", "feature"]
    fns = {n: run(n) for n in names}
    warm = textures(16, cfg["side"], 9)
    memorization.audit(warm[:8], warm[8:], warm[4:12], progress=False)  # first-call costs (FFT plans, oneDNN)
    say(f"memorization: {cfg['gen']} generated x {cfg['train']} training + {cfg['heldout']} held-out "
        f"{cfg['side']}px images, max_shift 2, {memorization.audit.__kwdefaults__['candidates']} candidates; "
        f"threads {torch.get_num_threads()}")
    rounds = 1 if args.size == "paper" else min(args.repeats, 2)
    times = side_by_side(fns, rounds, device, warmup=False, log=say)
    rows = {}
    queries = cfg["gen"] + cfg["heldout"]
    for n in names:
        med = median(times[n])
        r = results[n]
        rows[n] = {"name": n, "times_s": [round(t, 3) for t in times[n]], "median_s": med,
                   "images_per_s": queries / med, "pairs_per_s": cfg["gen"] * cfg["train"] / med, **r}
        say(f"  {n}: {med:.1f} s, {queries / med:.0f} images/s (generated + held-out queries), "
            f"planted copies found {r['found']}/{r['planted']}, copy rate {r['copy_rate']:.4f}, "
            f"held-out flag rate {r['heldout_flag_rate']:.4f}")
    write(args.out, {"memorization": rows, "n_gen": cfg["gen"], "n_train": cfg["train"],
                     "n_heldout": cfg["heldout"], "side": cfg["side"], "feature_dim": cfg["dim"],
                     "threads": torch.get_num_threads(), "load_avg_start": list(load_start),
                     "load_avg_end": list(os.getloadavg()),
                     "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})


if __name__ == "__main__":
    main()
