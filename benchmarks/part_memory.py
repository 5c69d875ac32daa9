"""Benchmark part: peak memory of sample_ddp-style generation at 1k vs 8k images (must not grow with N).

    python benchmarks/part_memory.py --size paper --out mem.json --workdir /tmp/x

Runs `python ddpm_conditional_ddp.py --mode sample_ddp ...` (the DDPM folder's many-image sampler, as a
user would, one process) on a tiny random-weight checkpoint with a 2-step DDIM sampler, so thousands of
images are cheap, and reads the RSS high-water mark of that process from the kernel (os.wait4).
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_common import REPO, part_args, say, use_folder, write

use_folder("ddpm")
import torch  # noqa: E402

from models import UNet_conditional  # noqa: E402

SIZES = {"paper": (1000, 8000), "small": (20, 160)}


def tiny_checkpoint(folder):
    """ckpt.pt + config.json as ddpm/train.py writes them, for a width-8 16x16 UNet with 10 classes."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    m = UNet_conditional(c_in=1, c_out=1, num_classes=10, img_size=16, base_channels=8)
    torch.save(m.state_dict(), folder / "ckpt.pt")
    info = {"model_type": "ddpm", "model": m.config(),
            "diffusion": {"noise_steps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02},
            "class_names": [f"digit_{i}" for i in range(10)], "step": 0, "epoch": 0, "train": {}}
    (folder / "config.json").write_text(json.dumps(info))
    return folder / "ckpt.pt"


def peak_rss(cmd, cwd):
    """(peak RSS in MB, seconds, exit code) of one child process."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CUDA_VISIBLE_DEVICES="")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        say(err.decode()[-2000:])
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, proc.returncode


def main():
    args = part_args(__doc__.splitlines()[0])
    work = Path(args.workdir) / "memory"
    shutil.rmtree(work, ignore_errors=True)
    ckpt = tiny_checkpoint(work / "run")
    rows = []
    for n in SIZES[args.size]:
        out = work / f"samples_{n}"
        cmd = [sys.executable, "ddpm_conditional_ddp.py", "--mode", "sample_ddp", "--ckpt", str(ckpt),
               "--num-samples", str(n), "--batch-size", "64", "--sampler", "ddim", "--sampling-steps", "2",
               "--cfg-scale", "3", "--output-dir", str(out), "--class-subfolders", "--device", "cpu"]
        rss, sec, code = peak_rss(cmd, REPO / "ddpm")
        files = sum(1 for _ in out.rglob("*.png"))
        say(f"memory: {n} images -> peak RSS {rss:.0f} MB in {sec:.1f} s ({files} PNGs, exit {code})")
        rows.append({"images": n, "peak_rss_mb": rss, "seconds": sec, "pngs_written": files, "exit_code": code})
        shutil.rmtree(out, ignore_errors=True)
    write(args.out, {"memory": rows, "growth": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1})


if __name__ == "__main__":
    main()
