"""Benchmark part: evaluation. Our one-pass FID + precision/recall (evaluation/precision_recall.py) vs the
two-library sequence: pytorch-fid, then a separate torchvision VGG16 pass over the same folders.

    python benchmarks/part_eval.py --size paper --repeats 2 --device cpu --out eval.json --workdir /tmp/x

At most 2 rounds (each round runs the four variants over both folders).

Both sides use the same random weights (Inception in pytorch-fid's layout, torchvision VGG16), saved to
files, since no weights can be downloaded here; cost does not depend on the values. pytorch-fid's
weight download is replaced by those random weights. Four variants, alternated per round:
  ours            precision_recall.run() on real + gen folders, empty feature cache (it fills it)
  ours/cached     the same with the real folder's features already cached
  baseline        pytorch-fid statistics of both folders + VGG16 fc2 features of both folders
                  (decoded again) + precision/recall on them
  baseline/cached pytorch-fid with the real statistics from an .npz + the VGG16 pass over both folders
                  (a precision/recall script has no feature cache)
pytorch-fid's Frechet distance (scipy sqrtm of a 2048x2048 matrix, retried with an offset when the
covariance is singular) costs seconds to minutes on a CPU whatever the folder size: it is timed once and
added to both baseline variants, and the figures are also given without it (extraction only).
"""
import shutil
import sys
import time
from pathlib import Path

from bench_common import median, part_args, say, setup_device, side_by_side, use_folder, write

use_folder("evaluation")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

import pytorch_fid.inception as pfi  # noqa: E402
from pytorch_fid import fid_score  # noqa: E402

import precision_recall as ours_pr  # noqa: E402
from metrics import precision_recall  # noqa: E402

# Inception + VGG16 cost ~40 GFLOP per image whatever its size (resized to 299 / 224): small folders
# keep the part near 3 minutes on 2 CPU cores; images/s does not depend much on the folder size.
SIZES = {"paper": dict(n=12, side=256, batch=12), "small": dict(n=4, side=16, batch=4)}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_images(folder, n, side, seed):
    """n smooth random RGB PNGs (upsampled noise: compresses and decodes like real images)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = F.interpolate(torch.rand(1, 3, side // 8, side // 8, generator=g), size=(side, side), mode="bicubic")
        arr = (x[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(folder / f"img_{i:05d}.png")


def random_weights(work):
    """Random Inception (pytorch-fid layout = torchvision Inception3 with 1008 classes) and VGG16 files."""
    torch.manual_seed(0)
    inc = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    inc_sd = inc.state_dict()
    vgg_sd = torchvision.models.vgg16(weights=None).state_dict()
    torch.save(inc_sd, work / "inception.pth")
    torch.save(vgg_sd, work / "vgg16.pth")
    return inc_sd, vgg_sd


class Files(torch.utils.data.Dataset):
    """The baseline's VGG pass reads the images again, as a separate script does."""

    def __init__(self, folder):
        self.files = sorted(p for p in folder.iterdir() if p.suffix == ".png")
        self.tf = torchvision.transforms.Compose([
            torchvision.transforms.Resize((224, 224), antialias=True), torchvision.transforms.ToTensor(),
            torchvision.transforms.Normalize(MEAN, STD)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self.tf(Image.open(self.files[i]).convert("RGB"))


@torch.inference_mode()
def vgg_features(vgg, folder, batch, device):
    out = []
    for x in torch.utils.data.DataLoader(Files(folder), batch_size=batch, num_workers=0):
        h = torch.flatten(vgg.avgpool(vgg.features(x.to(device))), 1)
        out.append(vgg.classifier[:5](h).cpu().numpy())
    return np.concatenate(out)


def main():
    args = part_args(__doc__.splitlines()[0])
    device = setup_device(args.device)
    cfg = SIZES[args.size]
    work = Path(args.workdir) / "eval"
    shutil.rmtree(work, ignore_errors=True)
    real, gen = work / "real", work / "gen"
    write_images(real, cfg["n"], cfg["side"], 1)
    write_images(gen, cfg["n"], cfg["side"], 2)
    inc_sd, _ = random_weights(work)
    pfi.load_state_dict_from_url = lambda *a, **k: inc_sd  # pytorch-fid's download -> our random weights
    dims, bs = 2048, cfg["batch"]
    stats_npz = work / "real_stats.npz"
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).to(device)
    m, s = fid_score.compute_statistics_of_path(str(real), net, bs, dims, device, 0)
    np.savez(stats_npz, mu=m, sigma=s)
    del net

    counter = [0]
    warm = work / "cache_warm"

    def ours(cache_dir):
        argv = ["--real", str(real), "--gen", str(gen), "--inception_weights", str(work / "inception.pth"),
                "--vgg_weights", str(work / "vgg16.pth"), "--batch_size", str(bs), "--num_workers", "0",
                "--device", str(device), "--cache_dir", str(cache_dir)]
        ours_pr.run(ours_pr.parse_args(argv))

    def ours_cold():
        counter[0] += 1
        ours(work / f"cache_cold{counter[0]}")  # a new, empty cache every time

    def baseline(cached):
        net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).to(device)
        real_src = str(stats_npz) if cached else str(real)
        stats.append(fid_score.compute_statistics_of_path(real_src, net, bs, dims, device, 0))
        stats.append(fid_score.compute_statistics_of_path(str(gen), net, bs, dims, device, 0))
        with torch.device("meta"):  # the separate VGG script loads its weight file, as ours does
            vgg = torchvision.models.vgg16(weights=None)
        vgg.load_state_dict(torch.load(work / "vgg16.pth", map_location="cpu", weights_only=True), assign=True)
        vgg = vgg.eval().to(device)
        fr, fg = vgg_features(vgg, real, bs, device), vgg_features(vgg, gen, bs, device)
        precision_recall(fr, fg, k=3)

    stats = []
    ours(warm)  # fills the warm cache (and warms up every code path)
    baseline(False)
    say(f"eval: {cfg['n']} real + {cfg['n']} generated {cfg['side']}px images, batch {bs}")
    fns = {"ours": ours_cold, "ours/cached": lambda: ours(warm), "baseline": lambda: baseline(False),
           "baseline/cached": lambda: baseline(True)}
    devnull = open("/dev/null", "w")
    real_stdout, sys.stdout = sys.stdout, devnull  # the reports of 2 x repeats runs are noise here
    try:
        times = side_by_side(fns, min(args.repeats, 2), device, warmup=False, log=say)
    finally:
        sys.stdout = real_stdout
    (m1, s1), (m2, s2) = stats[0], stats[1]
    t0 = time.perf_counter()
    fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    fd_seconds = time.perf_counter() - t0
    say(f"  pytorch-fid Frechet distance (sqrtm): {fd_seconds:.1f} s")
    n_img = 2 * cfg["n"]
    rows = {}
    for k, ts in times.items():
        med = median(ts)
        total = med + (fd_seconds if k.startswith("baseline") else 0.0)
        rows[k] = {"name": k, "times_s": [round(t, 3) for t in ts], "median_s": med, "total_s": total,
                   "images": n_img, "images_per_s": n_img / total, "extraction_images_per_s": n_img / med}
    write(args.out, {"eval": rows, "fd_sqrtm_s": fd_seconds, "n_per_side": cfg["n"], "side": cfg["side"],
                     "batch": bs})


if __name__ == "__main__":
    main()
