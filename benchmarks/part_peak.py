"""Benchmark part: the matmul peak (FLOP/s of a 2048^3 matmul) in fp32 and bf16, the MFU denominator.

    python benchmarks/part_peak.py --size paper --repeats 3 --device cpu --out peak.json --workdir /tmp/x

The three operand layouts (A@B, A@B^T, A^T@B) are timed: MKL/cuBLAS run them alike, but CPUs without
AVX-512 bf16 take a non-BLAS bf16 path whose speed depends strongly on the layout. The peak is the best
layout. A layout whose 2048^3 product would take longer than ~20 s (estimated from a 512^3 probe), or
that runs below a quarter of the best layout at 512^3, is skipped and reported with its 512^3 figure.
"""
import torch

from bench_common import bf16_native, part_args, say, setup_device, side_by_side, median, timed, write

LAYOUTS = ("A@B", "A@B^T", "A^T@B")


def operands(n, dtype, device, layout):
    """Two n x n operands whose product has the given layout."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    if layout == "A@B":
        return lambda: a @ b
    if layout == "A@B^T":
        return lambda: a @ b.t()
    return lambda: a.t() @ b


def main():
    args = part_args(__doc__.splitlines()[0])
    device = setup_device(args.device)
    n = 2048 if args.size == "paper" else 512
    flops = 2 * n ** 3
    res = {"n": n, "bf16_native": bf16_native(device), "layouts": {}}
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        fns, probes = {}, {}
        for layout in LAYOUTS:
            probe = operands(512, dtype, device, layout)
            probe()
            probes[layout] = 2 * 512 ** 3 / min(timed(probe, device) for _ in range(2))
        for layout in LAYOUTS:
            # A layout far below the best one cannot be the peak, and emulated bf16 kernels get slower
            # with size (A@B: 1.5 GFLOP/s at 512^3, 0.3 at 2048^3 here): do not spend minutes on it.
            if probes[layout] < 0.25 * max(probes.values()) or flops / probes[layout] > 20:
                say(f"peak {label} {layout}: skipped at {n}^3 (512^3 runs at {probes[layout] / 1e9:.2f} GFLOP/s)")
                continue
            fns[layout] = operands(n, dtype, device, layout)
        times = side_by_side(fns, args.repeats, device)
        per = {}
        for layout in LAYOUTS:
            if layout in times:
                per[layout] = {"gflops": flops / median(times[layout]) / 1e9, "n": n}
            else:
                per[layout] = {"gflops": probes[layout] / 1e9, "n": 512, "skipped_at_full_size": True}
        best = max((v["gflops"] for v in per.values() if v["n"] == n), default=None)
        res["layouts"][label] = per
        res[f"peak_{label}_gflops"] = best
        say(f"peak {label}: " + ", ".join(f"{k} {v['gflops']:.2f}" for k, v in per.items()) + " GFLOP/s")
    write(args.out, res)


if __name__ == "__main__":
    main()
