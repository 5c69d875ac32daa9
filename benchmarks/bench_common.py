"""Helpers shared by the benchmark parts: device and precision, side-by-side timing, FLOP counting.

Not run directly. Each `part_*.py` runs in its own process (started by `run.py`) with one model
folder first on sys.path, so folders with equal module names (`models`, `train`, ...) never collide
and the RSS high-water mark of a part is its own. This file's name must not clash with a folder module.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

REPO = Path(__file__).resolve().parents[1]


def use_folder(name):
    """Put REPO/name first on sys.path so its flat imports (`from models import ...`) resolve."""
    sys.path.insert(0, str(REPO / name))


def part_args(description):
    """Flags every part takes (run.py passes them)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--size", choices=["small", "paper"], default="small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="JSON file for this part's results")
    p.add_argument("--workdir", required=True, help="scratch folder of this run")
    p.add_argument("--bf16", choices=["auto", "all", "none"], default="auto")
    return p.parse_args()


def bf16_plan(args, device):
    """'full': every bf16 variant; 'reduced': only those the issue's targets need, at a small batch and
    one round (bf16 emulated: 10-40x slower than fp32, minutes per step); 'none': fp32 only."""
    if args.bf16 == "none":
        return "none"
    if args.bf16 == "all" or bf16_native(device):
        return "full"
    return "reduced"


def bf16_batch_repeats(args, device, batch, emulated_batch):
    """Batch and rounds of bf16 runs: the fp32 ones on native hardware, else smaller and fewer."""
    if bf16_native(device):
        return batch, args.repeats
    return emulated_batch, 1 if bf16_plan(args, device) == "reduced" else max(1, min(args.repeats, 2))


def bf16_native(device):
    """bf16 has hardware support: Ampere+ GPU, or a CPU with AVX-512 bf16 (else it is emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def setup_device(name):
    """torch.device for --device; TF32 on for CUDA matmuls (the models' training setting)."""
    device = torch.device(name)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return device


def autocast(precision, device):
    """bf16 autocast for 'bf16', nothing for 'fp32'."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def sync(device):
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds one call of fn takes."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def side_by_side(fns, repeats, device, warmup=True, log=None, max_rounds=None):
    """Time the callables of `fns` (name -> fn) alternately, `repeats` rounds; returns name -> all times.

    Each round runs every variant once, rotating the order, so slow drifts of the machine's load hit
    all variants alike; compare medians. One untimed warm-up call each first (allocator, oneDNN
    primitive caches, lazy init). max_rounds (name -> n) caps the rounds of very slow variants.
    """
    names = list(fns)
    if warmup:
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            if max_rounds and len(times[n]) >= max_rounds.get(n, repeats):
                continue
            times[n].append(timed(fns[n], device))
            if log:
                log(f"  {n}: {times[n][-1]:.3f} s")
    return times


def median(xs):
    return statistics.median(xs) if xs else None


# CPU SDPA ops have no formula in torch's FlopCounterMode (they would count 0); same counts as flash on GPU.
_CUSTOM_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
}


def count_flops(fn):
    """FLOPs (multiply-add = 2) of one call of fn, counted by torch.utils.flop_counter (matmuls, convs, SDPA).

    Called on a whole training step it also serves as that step's warm-up; the optimizer and EMA
    add no counted FLOPs (element-wise ops are not counted), so this is forward + backward."""
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as fc:
        fn()
    return int(fc.get_total_flops())


def adamw(params, device, lr=1e-4):
    """AdamW as the training scripts build it: fused on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused, foreach=None if fused else True)


@torch.no_grad()
def ema_update(ema_params, params, decay=0.9999):
    """The EMA update every training script does after the optimizer step."""
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)


def train_step(model, loss_fn, precision, device, ema=True):
    """A callable doing one full training step: forward+loss under autocast, backward, AdamW, EMA."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, device)
    ema_params = [p.detach().clone() for p in params] if ema else None

    def step():
        with autocast(precision, device):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema_params is not None:
            ema_update(ema_params, params)
        return loss

    return step


def entry(name, batch, times, **extra):
    """One result row: median seconds per call and images/s."""
    med = median(times)
    row = {"name": name, "batch": batch, "times_s": [round(t, 4) for t in times], "median_s": med,
           "images_per_s": batch / med if med else None}
    row.update(extra)
    return row


def write(path, obj):
    """Write the part's JSON."""
    Path(path).write_text(json.dumps(obj, indent=1, default=float))


def say(*a):
    print(*a, file=sys.stderr, flush=True)


def threads():
    return torch.get_num_threads()


def env_info():
    return {"threads": threads(), "omp": os.environ.get("OMP_NUM_THREADS")}
