"""Performance benchmark of the repository (issue 8): training and sampling images/s of every model,
evaluation images/s, and the issue's side-by-side ratios, in one run on CPU or GPU.

    python benchmarks/run.py                               # every part at the issue's sizes (~15 min on 2 cores)
    python benchmarks/run.py --parts dit,eval --repeats 5 --json results.json
    python benchmarks/run.py --sizes small                 # tiny configurations: checks the harness in ~2 min
    python benchmarks/run.py --device cuda

Each part runs in its own Python process with one model folder on sys.path (folders share module names),
so its memory high-water mark is its own. Within a part, the variants being compared run alternately
(one call of each per round, rotating order, several rounds) and medians are compared. The matmul peak
(part `peak`) is measured in the same run and is the denominator of the model FLOP utilisation (MFU):
FLOPs of a training step (torch.utils.flop_counter, forward + backward) / its median time / peak.
Prints a table of results and targets, then the JSON (or writes it to --json).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PARTS = ("peak", "ddpm", "ldm", "controlnet", "dit", "eval", "memorization", "memory", "quality")
# quality (steps to a target FD, issue 18) trains 7 models for ~30-35 min on 2 cores: only when asked for
DEFAULT_PARTS = tuple(p for p in PARTS if p != "quality")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma list of {','.join(PARTS)} (default: all but quality, which takes ~35 min)")
    p.add_argument("--sizes", "--size", choices=["small", "paper"], default="paper",
                   help="paper: the issue's configurations (default); small: tiny ones, to check the harness")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per comparison (median); default 3")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--bf16", choices=["auto", "all", "none"], default="auto",
                   help="auto (default): every bf16 variant where bf16 is native (Ampere+ GPU, AVX-512 bf16), "
                        "else only those the targets need, at batch 1 and one round (emulated bf16 takes "
                        "minutes per step); all: every variant anyway; none: fp32 only")
    p.add_argument("--json", default=None, help="write the results here instead of printing them")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds after which a part is stopped")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        fail(f"--parts: unknown part {', '.join(bad) or '(empty)'}; choose from {', '.join(PARTS)}")
    if args.repeats < 1:
        fail(f"--repeats {args.repeats}: must be >= 1")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        fail(f"--device {args.device}: use auto, cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: no CUDA device is available; use --device cpu")
    if args.json:
        folder = Path(args.json).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            fail(f"--json {args.json}: cannot write into {folder}")
    args.parts = [x for x in PARTS if x in parts]  # peak first: the MFU denominator
    return args


def fail(msg):
    """Bad input: one line, exit code 2, before any benchmark runs."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def machine(device):
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_avg_start": os.getloadavg(), "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def run_part(name, args, work):
    """Run part_<name>.py in a child process; returns its JSON plus wall time and peak RSS."""
    out = work / f"{name}.json"
    cmd = [sys.executable, str(HERE / f"part_{name}.py"), "--size", args.sizes, "--repeats", str(args.repeats),
           "--device", args.device, "--out", str(out), "--workdir", str(work), "--bf16", args.bf16]
    print(f"[{time.strftime('%H:%M:%S')}] part {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    log = open(work / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    try:
        _, status, usage = _wait(proc, args.timeout)
    except TimeoutError:
        proc.kill()
        proc.wait()
        return {"error": f"timed out after {args.timeout:.0f} s (log {work / (name + '.log')})"}
    log.close()
    code = os.waitstatus_to_exitcode(status)
    sec = time.perf_counter() - t0
    text = (work / f"{name}.log").read_text(errors="replace")
    for line in text.splitlines():
        if not any(s in line for s in ("it/s]", "s/it]", "batch/s]", "%|")):  # progress lines of tqdm
            print(f"    {line}", file=sys.stderr)
    if code != 0 or not out.is_file():
        return {"error": f"exit code {code}; last lines: {text.strip().splitlines()[-3:]}",
                "seconds": sec}
    res = json.loads(out.read_text())
    res.update(seconds=sec, peak_rss_mb=usage.ru_maxrss / 1024)
    print(f"    part {name}: {sec:.0f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MB", file=sys.stderr, flush=True)
    return res


def _wait(proc, timeout):
    """os.wait4 with a deadline (rusage of exactly this child)."""
    deadline = time.time() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return pid, status, usage
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.2)


# ----------------------------------------------------------------------------- summary
def find(rows, **kw):
    """First row whose fields equal kw."""
    for r in rows or []:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def ratio(a, b):
    return a / b if a and b else None


def summarize(res):
    """Derived figures: MFU of each training row, and the issue's targets with met / missed."""
    peak = res.get("peak", {})
    peaks = {"fp32": peak.get("peak_fp32_gflops"), "bf16": peak.get("peak_bf16_gflops")}
    for part in ("ddpm", "ldm", "controlnet", "dit"):
        for r in res.get(part, {}).get("train", []):
            achieved = r["flops_per_image"] * r["images_per_s"] / 1e9 if r.get("flops_per_image") else None
            r["achieved_gflops"] = achieved
            r["mfu"] = ratio(achieved, peaks.get(r.get("precision")))
    targets = []

    def target(name, value, goal, note="", at_most=False):
        met = None if value is None else (value <= goal if at_most else value >= goal)
        targets.append({"target": name, "value": value, "goal": goal, "at_most": at_most, "met": met,
                        "note": note})

    dit = res.get("dit", {}).get("train", [])
    models = []
    for r in dit:
        if r["model"] not in models:
            models.append(r["model"])
    if models:
        first = models[0]
        b16 = find(dit, model=first, variant="ours/cached", precision="bf16")
        f32 = find(dit, model=first, variant="ours/cached", precision="fp32")
        enc = find(dit, model=first, variant="ours/encode", precision="fp32")
        target(f"{first} cached latents + bf16 vs VAE encode every step, fp32 (x)",
               ratio(b16 and b16["images_per_s"], enc and enc["images_per_s"]), 10.0,
               f"cached fp32 vs encode fp32: "
               f"{_fmt(ratio(f32 and f32['images_per_s'], enc and enc['images_per_s']))}x")
        for m in models:
            for prec, goal in (("bf16", 0.60 if m.endswith("S/2") else 0.70), ("fp32", 0.85)):
                r = find(dit, model=m, variant="ours/cached", precision=prec)
                target(f"{m} {prec} training step MFU", r and r["mfu"], goal, f"batch {r and r['batch']}")
            for prec in ("fp32", "bf16"):
                o = find(dit, model=m, variant="ours/cached", precision=prec)
                d = find(dit, model=m, variant="diffusers/cached", precision=prec)
                target(f"{m} ours vs diffusers DiTTransformer2DModel, {prec} (x)",
                       ratio(o and o["images_per_s"], d and d["images_per_s"]), 1.0,
                       f"batch {o and o['batch']}")
    dd = res.get("ddpm", {}).get("train", [])
    if dd:
        f32 = find(dd, variant="fp32")
        target("DDPM UNet fp32 training MFU", f32 and f32["mfu"], 0.45, f"batch {f32 and f32['batch']}")
        b16 = find(dd, variant="bf16")
        same = find(dd, variant="fp32 (bf16 batch)") or f32
        target("DDPM UNet bf16 vs fp32 images/s (x)", ratio(b16 and b16["images_per_s"], same and same["images_per_s"]),
               1.5, f"both at batch {b16 and b16['batch']}")
    ld = res.get("ldm", {}).get("train", [])
    if ld:
        b16 = find(ld, variant="cached", precision="bf16")
        same = find(ld, variant="cached", precision="fp32", batch=b16 and b16["batch"])
        target("LDM UNet bf16 vs fp32 images/s (x)", ratio(b16 and b16["images_per_s"], same and same["images_per_s"]),
               1.5, f"both at batch {b16 and b16['batch']}")
        f32, heads2 = find(ld, variant="cached", precision="fp32"), find(ld, variant="cached, 2 heads")
        speedup = ratio(heads2 and heads2["images_per_s"], f32 and f32["images_per_s"])
        target("LDM UNet fp32 training MFU", f32 and f32["mfu"], 0.60,
               f"batch {f32 and f32['batch']}; with 2 attention heads instead of 8 (a model change): "
               f"{mfu_text(heads2 and heads2['mfu'])}, {_fmt(speedup)}x the images/s")
    for part in ("ldm", "dit"):  # issue 18: bf16 sampling, denoiser steps + VAE decode, as the CLIs run it
        sm = res.get(part, {}).get("sampling", [])
        f32, b16 = (find(sm, sampler="ddim", steps=50, precision=p) for p in ("fp32", "bf16"))
        if f32:
            name = f32["name"].split(" ")[0] if part == "dit" else "LDM"
            steps = ratio(b16 and b16["latent_images_per_s"], f32["latent_images_per_s"])
            dec = ratio(f32["decode_s_per_image"], b16 and b16["decode_s_per_image"])
            target(f"{name} sampling bf16 vs fp32, DDIM-50 + VAE decode (x)",
                   ratio(b16 and b16["images_per_s"], f32["images_per_s"]), 1.7,
                   f"batch {f32['batch']}; denoiser steps alone {_fmt(steps)}x, decode alone {_fmt(dec)}x")
    ev = res.get("eval", {}).get("eval")
    if ev:
        target("evaluation: one pass vs pytorch-fid + separate VGG16 pass (x)",
               ratio(ev["baseline"]["total_s"], ev["ours"]["total_s"]), 1.3,
               f"extraction only: {_fmt(ratio(ev['baseline']['median_s'], ev['ours']['median_s']))}x")
        target("evaluation with cached real statistics (x)",
               ratio(ev["baseline/cached"]["total_s"], ev["ours/cached"]["total_s"]), 1.8,
               f"vs the uncached baseline: {_fmt(ratio(ev['baseline']['total_s'], ev['ours/cached']['total_s']))}x; "
               f"extraction only: {_fmt(ratio(ev['baseline/cached']['median_s'], ev['ours/cached']['median_s']))}x")
    for fam, name in (("ddpm", "DDPM min-SNR / v-prediction"), ("dit", "DiT flow matching (+REPA)")):
        f = res.get("quality", {}).get("families", {}).get(fam)
        if f:
            best = f.get("best_ratio") or {}
            target(f"quality: {name}, steps to the baseline's final FD / baseline steps", best.get("ratio"), 0.5,
                   (f"best: {best['variant']}{' (upper bound)' if best.get('upper_bound') else ''}; " if best else
                    "no variant reached it; ") + f"baseline "
                   f"{f['variants'][0]['name']} FD {_fmt(f.get('target_fd'), '.1f')} at {f['steps'][-1]} steps",
                   at_most=True)
    audit = res.get("memorization", {})
    rgb = audit.get("memorization", {}).get("pixel/rgb")
    if rgb:
        target(f"memorization audit, {audit['n_gen']} gen x {audit['n_train']} train at {audit['side']} px, "
               f"pixel NCC (s)", rgb["median_s"], 300.0,
               f"{rgb['images_per_s']:.0f} images/s; planted copies found {rgb['found']}/{rgb['planted']}",
               at_most=True)
    mem = res.get("memory", {}).get("memory")
    if mem:
        growth = res["memory"]["growth"]
        target(f"generation peak RSS growth, {mem[0]['images']} -> {mem[-1]['images']} images (%)",
               100 * growth, 10.0, f"{mem[0]['peak_rss_mb']:.0f} MB -> {mem[-1]['peak_rss_mb']:.0f} MB",
               at_most=True)
    return targets


def mfu_text(mfu):
    return "-" if mfu is None else f"{100 * mfu:.0f}%"


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def table(res, targets):
    """The human-readable report."""
    lines = []
    m = res["machine"]
    lines.append(f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads, "
                 f"{m['cpu_capability']}, AVX-512 bf16: {m['avx512_bf16']}), torch {m['torch']}, device "
                 f"{m['device']}{', ' + m['gpu'] if 'gpu' in m else ''}; load average at start "
                 f"{m['load_avg_start'][0]:.2f}, at end {m['load_avg_end'][0]:.2f}; sizes {res['sizes']}, "
                 f"{res['repeats']} repeats")
    pk = res.get("peak")
    if pk and "error" not in pk:
        lines.append(f"Matmul peak ({pk['n']}^3, best layout): fp32 {_fmt(pk['peak_fp32_gflops'], '.1f')} "
                     f"GFLOP/s, bf16 {_fmt(pk['peak_bf16_gflops'], '.1f')} GFLOP/s")
        for prec, per in pk["layouts"].items():
            lines.append(f"  {prec}: " + ", ".join(
                f"{k} {v['gflops']:.2f}{'' if v['n'] == pk['n'] else ' (at 512^3, too slow at full size)'}"
                for k, v in per.items()))
    lines.append("")
    hdr = f"{'training':<34}{'prec':>6}{'batch':>6}{'img/s':>10}{'GFLOP/img':>11}{'GFLOP/s':>9}{'MFU':>7}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for part in ("ddpm", "ldm", "controlnet", "dit"):
        for r in res.get(part, {}).get("train", []):
            name = r["name"] if part != "ddpm" else r["name"].replace(f" {r['precision']}", "") or r["name"]
            lines.append(f"{name[:34]:<34}{r['precision']:>6}{r['batch']:>6}{_fmt(r['images_per_s'], '.3f'):>10}"
                         f"{_fmt(r['flops_per_image'] and r['flops_per_image'] / 1e9, '.2f'):>11}"
                         f"{_fmt(r.get('achieved_gflops'), '.1f'):>9}{mfu_text(r.get('mfu')):>7}")
    lines.append("")
    hdr = f"{'sampling (timed steps scaled)':<38}{'prec':>6}{'batch':>6}{'s/step':>9}{'img/s':>10}{'latent img/s':>14}"
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for part in ("ddpm", "ldm", "controlnet", "dit"):
        for r in res.get(part, {}).get("sampling", []):
            lines.append(f"{r['name'][:38]:<38}{r.get('precision', 'fp32'):>6}{r['batch']:>6}"
                         f"{r['seconds_per_step']:>9.3f}"
                         f"{_fmt(r.get('images_per_s'), '.4f'):>10}{_fmt(r.get('latent_images_per_s'), '.4f'):>14}")
    for part in ("ldm", "dit"):
        s = res.get(part, {}).get("sampling")
        if s:
            dec = {r.get("precision", "fp32"): r["decode_s_per_image"] for r in s}
            lines.append(f"  {part}: VAE decode " + ", ".join(f"{v:.2f} s/image in {p}" for p, v in dec.items())
                         + " is included in img/s")
    ev = res.get("eval", {}).get("eval")
    if ev:
        lines.append("")
        e = res["eval"]
        lines.append(f"evaluation ({e['n_per_side']} real + {e['n_per_side']} generated {e['side']}px images, "
                     f"batch {e['batch']}; pytorch-fid sqrtm {e['fd_sqrtm_s']:.1f} s added to the baselines)")
        lines.append(f"{'variant':<20}{'median s':>10}{'total s':>10}{'img/s':>8}")
        for k, r in ev.items():
            lines.append(f"{k:<20}{r['median_s']:>10.2f}{r['total_s']:>10.2f}{r['images_per_s']:>8.2f}")
    audit = res.get("memorization", {})
    if audit.get("memorization"):
        lines.append("")
        lines.append(f"memorization audit ({audit['n_gen']} generated x {audit['n_train']} training + "
                     f"{audit['n_heldout']} held-out {audit['side']}px images; max shift 2 px, flips)")
        lines.append(f"{'variant':<14}{'median s':>10}{'img/s':>9}{'copies found':>14}{'copy rate':>11}")
        for k, r in audit["memorization"].items():
            lines.append(f"{k:<14}{r['median_s']:>10.2f}{r['images_per_s']:>9.0f}"
                         f"{str(r['found']) + '/' + str(r['planted']):>14}{r['copy_rate']:>11.4f}")
    mem = res.get("memory", {}).get("memory")
    if mem:
        lines.append("")
        lines.append("generation memory (ddpm_conditional_ddp.py --mode sample_ddp, tiny model, 2 DDIM steps)")
        for r in mem:
            lines.append(f"  {r['images']:>6} images: peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s, "
                         f"{r['pngs_written']} PNGs")
    if res.get("quality", {}).get("text"):
        lines += ["", res["quality"]["text"]]
    for part in res["parts"]:
        if "error" in res.get(part, {}):
            lines.append(f"part {part} FAILED: {res[part]['error']}")
    lines.append("")
    lines.append(f"{'target':<70}{'value':>8}{'goal':>9}  status")
    for t in targets:
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        val = t["value"]
        pct = "MFU" in t["target"]
        goal = (f"{100 * t['goal']:.0f}%" if pct else _fmt(t["goal"], ".2f"))
        goal = ("<=" if t["at_most"] else ">=") + goal
        lines.append(f"{t['target'][:70]:<70}{_fmt(val and (100 * val if pct else val), '.1f' if pct else '.2f'):>8}"
                     f"{goal:>9}  {status}"
                     + (f"  ({t['note']})" if t["note"] else ""))
    if res["sizes"] != "paper":
        lines.append("(targets refer to the paper sizes; with --sizes small they only check the harness)")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    res = {"machine": machine(args.device), "sizes": args.sizes, "repeats": args.repeats, "parts": args.parts,
           "bf16": args.bf16}
    t0 = time.perf_counter()
    for part in args.parts:
        res[part] = run_part(part, args, work)
    res["machine"]["load_avg_end"] = os.getloadavg()
    res["seconds"] = time.perf_counter() - t0
    res["targets"] = summarize(res)
    print(table(res, res["targets"]))
    print(f"\ntotal {res['seconds']:.0f} s; scratch files in {work}")
    text = json.dumps(res, indent=1, default=float)
    if args.json:
        Path(args.json).write_text(text)
        print(f"JSON written to {args.json}")
    else:
        print(text)
    return 1 if any("error" in res.get(p, {}) for p in args.parts) else 0


if __name__ == "__main__":
    sys.exit(main())
