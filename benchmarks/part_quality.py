"""Benchmark part `quality` (issue 18): training steps to a target FD for each objective, on the demo digits.

    python benchmarks/run.py --parts quality                       # ~30-35 min on 2 cores (not in the default parts)
    python benchmarks/part_quality.py --size paper --out q.json --workdir /tmp/bench
    python benchmarks/part_quality.py --size small --out q.json --workdir /tmp/bench   # harness check, ~2 min

Writes the demo data (scripts/make_demo_data.py: 32x32 grey digits, 10 classes, a held-out third), trains the
evaluation's demo CNN on the training digits (evaluation/demo_classifier.py), then trains every variant from the
same seed through the folders' own command lines (subprocesses, cwd = the folder, as users run them):
  DDPM  the demo recipe of ddpm/scripts/demo.sh (base width 16, cosine schedule, batch 32, lr 1e-3):
        epsilon (baseline), epsilon + --snr-gamma 5, v_prediction, v_prediction + --snr-gamma 5
  DiT   DiT-Ti/2 on the demo VAE's latents as dit/scripts/demo.sh (the VAE trained first as ldm/scripts/demo.sh
        does): diffusion (baseline), --objective flow, --objective flow + --repa_encoder ENC.pt (REPA weight and
        depth at the DiT defaults; ENC.pt: benchmarks/quality_encoder.py, another CNN trained on the training
        digits only, never the network that computes the FD)
At evenly spaced checkpoints (25/50/75/100% of --ddpm_steps / --dit_steps) the EMA weights sample a fixed set
of seeds and classes (--per_class per class) with one sampler per family (DDPM and DiT diffusion: DDIM 25 steps;
DiT flow: Heun 25 steps; CFG 3), and the samples are scored against the held-out digits: FD on the demo CNN's
64-d features and class accuracy by its classifier. For each variant: the steps at which it reaches the
baseline's final FD (linear between checkpoints; "not reached" if never) and their ratio to the baseline's steps.
A variant whose flag the folder does not accept (yet) is reported as "n/a (flag missing)"; one that fails, as
its error; neither stops the others. Results: --out (JSON for run.py) and quality.json / quality.txt /
quality.png in --results_dir (default benchmarks/results at --size paper, the scratch folder at --size small, so
a harness check never overwrites the published figures). --jobs 2 (default) trains two variants at once, one per
core with one thread each: the figures do not depend on it, the seconds per step are then those of a shared
machine.
"""
import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_common import REPO, say, use_folder, write

use_folder("evaluation")
import numpy as np  # noqa: E402
import torch  # noqa: E402

import features  # noqa: E402
from images import class_layout, list_images  # noqa: E402
from metrics import frechet_distance_from_features  # noqa: E402
from quality_encoder import train_encoder  # noqa: E402
from quality_report import add_steps_to_target, family_table, missing_flag, plot  # noqa: E402

SIZES = {
    # paper: the demo stages' sizes (DDPM: about 1,000 steps in its 3 minutes; DiT: the demo's 2,400 steps)
    "paper": dict(ddpm_steps=1000, dit_steps=2400, checkpoints=4, per_class=20, sampling_steps=25, vae_steps=100,
                  classifier_epochs=8, encoder_epochs=4),
    # small: every stage of the harness at the least work that still gives two FD points per variant
    "small": dict(ddpm_steps=4, dit_steps=4, checkpoints=2, per_class=2, sampling_steps=2, vae_steps=2,
                  classifier_epochs=1, encoder_epochs=1),
}
CFG_SCALE = 3.0
SEED = 0

# ddpm/scripts/demo.sh's training flags, less its time budget (--max-minutes) and objective
DDPM_RECIPE = ["--image-size", "32", "--channels", "auto", "--base-channels", "16", "--time-dim", "128",
               "--schedule", "cosine", "--batch-size", "32", "--learning-rate", "1e-3", "--warmup-steps", "50",
               "--ema-decay", "0.99", "--ema-start", "200", "--num-epochs", "1000", "--sample-every-epochs", "0",
               "--log-every-steps", "50"]
# dit/scripts/demo.sh's training flags, less the step count and checkpoint cadence
DIT_RECIPE = ["--model", "DiT-Ti/2", "--image_size", "32", "--num_classes", "10", "--global_batch_size", "32",
              "--num_epochs", "1000", "--learning_rate", "1e-3", "--ema_decay", "0.99", "--num_workers", "0",
              "--log_every_steps", "100", "--sample_every_steps", "0", "--cache_latents", "--no_random_flip"]
# ldm/scripts/demo.sh's VAE flags, less the step count
VAE_RECIPE = ["--image_size", "32", "--preset", "tiny", "--batch_size", "32", "--num_epochs", "10",
              "--learning_rate", "2e-3", "--scale_images", "512", "--log_every_steps", "25"]

# key, shown name, training flags, flags train.py must accept, sampler, word sample.py's help must contain
FAMILIES = {
    "ddpm": [
        ("eps", "epsilon", ["--prediction-type", "epsilon"], [], "ddim", None),
        ("eps_snr5", "epsilon + min-SNR 5", ["--prediction-type", "epsilon", "--snr-gamma", "5"],
         ["--snr_gamma"], "ddim", None),
        ("v", "v_prediction", ["--prediction-type", "v_prediction"], [], "ddim", None),
        ("v_snr5", "v_prediction + min-SNR 5", ["--prediction-type", "v_prediction", "--snr-gamma", "5"],
         ["--snr_gamma"], "ddim", None),
    ],
    "dit": [
        ("diffusion", "diffusion (DDIM)", [], [], "ddim", None),
        ("flow", "flow (Heun)", ["--objective", "flow"], ["--objective"], "heun", "heun"),
        ("flow_repa", "flow + REPA (Heun)", ["--objective", "flow", "--repa_encoder", "{encoder}"],
         ["--objective", "--repa_encoder"], "heun", "heun"),
    ],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--out", required=True, help="JSON file for this part's results (run.py reads it)")
    p.add_argument("--workdir", required=True, help="scratch folder (a new quality-* folder is made in it)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (DDPM scripts; the DiT ones pick CUDA when present)")
    p.add_argument("--repeats", type=int, default=1, help="ignored (run.py passes it to every part)")
    p.add_argument("--bf16", default="auto", help="ignored (run.py passes it to every part)")
    for k, help_ in (("ddpm_steps", "DDPM training steps of every variant"),
                     ("dit_steps", "DiT training steps of every variant"),
                     ("checkpoints", "evaluated checkpoints, evenly spaced (steps must divide evenly)"),
                     ("per_class", "images sampled per class at each checkpoint"),
                     ("sampling_steps", "sampler steps (DDIM / Heun)")):
        p.add_argument(*dict.fromkeys([f"--{k}", f"--{k.replace('_', '-')}"]), type=int, default=None,
                       help=f"{help_} (default: {SIZES['paper'][k]} at paper size, {SIZES['small'][k]} at small)")
    p.add_argument("--families", default="ddpm,dit", help="comma list of ddpm, dit (default both)")
    p.add_argument("--jobs", type=int, default=2,
                   help="variants trained at once (default 2: one per core, each with OMP_NUM_THREADS=1 unless set)")
    p.add_argument("--variants", default=None,
                   help="comma list of variant keys to run besides each family's baseline (default all): "
                        + ", ".join(k for f in FAMILIES.values() for k, *_ in f[1:]))
    p.add_argument("--results_dir", "--results-dir", default=None,
                   help="where quality.json / .txt / .png go (default: benchmarks/results at paper size, "
                        "the scratch folder at small size)")
    args = p.parse_args(argv)
    cfg = dict(SIZES[args.size])
    for k in cfg:
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    keys = {k for f in FAMILIES.values() for k, *_ in f}
    wanted = None if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    problems = [(f"--families {args.families}: choose from ddpm, dit", not fams or any(f not in FAMILIES for f in fams)),
                (f"--variants {args.variants}: choose from {', '.join(sorted(keys))}",
                 wanted is not None and any(v not in keys for v in wanted))]
    for k in ("ddpm_steps", "dit_steps", "checkpoints", "per_class", "sampling_steps"):
        problems.append((f"--{k} {cfg[k]}: must be >= 1", cfg[k] < 1))
    problems.append((f"--jobs {args.jobs}: must be >= 1", args.jobs < 1))
    for k in ("ddpm_steps", "dit_steps"):
        problems.append((f"--{k} {cfg[k]}: must be a multiple of --checkpoints {cfg['checkpoints']} "
                         f"(checkpoints are evenly spaced)", cfg[k] % max(cfg["checkpoints"], 1) != 0))
    for msg, bad in problems:
        if bad:
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
    args.cfg, args.fams, args.wanted = cfg, fams, wanted
    return args


# ----------------------------------------------------------------------------- subprocesses
def _die_with_parent():
    """Linux: the child gets SIGKILL when this part dies (run.py's --timeout kills only the part's process)."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run(cmd, cwd, log, ctx):
    """Run a command as a user would (cwd = the folder), output to `log`, in one of the --jobs slots; returns
    (ok, seconds it ran, last lines)."""
    cmd = [str(c) for c in cmd]
    with ctx["slots"], open(log, "w") as f:
        t0 = time.perf_counter()
        f.write(f"$ cd {cwd} && {' '.join(cmd)}\n")
        f.flush()
        code = subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
                               env=ctx["env"])
        sec = time.perf_counter() - t0
    lines = [ln for ln in Path(log).read_text(errors="replace").splitlines()
             if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    err = [ln for ln in lines if ln.startswith("error:")]
    tail = err[-1] if err else " | ".join(lines[-2:])
    return code == 0, sec, f"exit code {code}: {tail[-300:]}"


def help_text(folder, script):
    """`python script --help` of a folder (what flags it accepts today)."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO / folder, capture_output=True, text=True)
    return out.stdout + out.stderr


# ----------------------------------------------------------------------------- evaluation
class Judge:
    """FD on the demo CNN's features against the held-out digits, and class accuracy by its classifier."""

    def __init__(self, eval_dir, heldout, device):
        self.device = device
        self.fd_net = features.load_torchscript(eval_dir / "digit_features.pt", "--feature_extractor").to(device)
        self.clf = features.load_torchscript(eval_dir / "digit_classifier.pt", "--classifier").to(device)
        self.class_names = list(self.clf.module.class_names)
        self.real = self.features(heldout)[0]

    def features(self, root, per_class=None):
        """(64-d features, logits, class index per image) of the images in root's class folders."""
        rel = list_images(root)
        names, labels = class_layout(root, rel)
        if names is None:
            raise RuntimeError(f"{root}: no class folders of images")
        if per_class:
            keep = [i for c in range(len(names)) for i in np.flatnonzero(labels == c)[:per_class]]
            rel, labels = [rel[i] for i in keep], labels[keep]
        out = features.extract([Path(root) / r for r in rel], {"fd": self.fd_net, "cls": self.clf}, 100, 0,
                               self.device, f"features {Path(root).name}")
        index = np.array([self.class_names.index(names[lab]) for lab in labels])
        return out["fd"], out["cls"], index

    def score(self, root):
        """FD and class accuracy of the samples in root (one subfolder per class)."""
        gen, logits, target = self.features(root)
        return {"fd": frechet_distance_from_features(self.real, gen),
                "class_accuracy": float((logits.argmax(1) == target).mean()), "images": int(len(gen))}


# ----------------------------------------------------------------------------- families
def variant_entry(key, name, flags, status="ok"):
    return {"key": key, "name": name, "flags": flags, "status": status, "checkpoints": [],
            "train_seconds": 0.0, "seconds_per_step": None}


def train_ddpm(spec, ctx, steps):
    """One DDPM variant: train to each checkpoint (resuming the same run, exact); each checkpoint's EMA weights
    are copied aside and sampled while the next stage trains."""
    key, name, flags, _, sampler, _ = spec
    v = variant_entry(key, name, flags)
    run_root, samples = ctx["scratch"] / "ddpm" / key, ctx["scratch"] / "samples" / "ddpm" / key
    run_dir = run_root / "models" / key
    pending = []
    with ThreadPoolExecutor(max_workers=len(steps)) as sampling:
        for k, step in enumerate(steps):
            cmd = [sys.executable, "train.py", "--data-root", ctx["data"] / "digits", "--work-dir", run_root,
                   "--run-name", key, "--seed", SEED, "--device", ctx["device"], *DDPM_RECIPE, *flags,
                   "--max-train-steps", step] + (["--resume"] if k else [])
            ok, sec, tail = run(cmd, REPO / "ddpm", ctx["logs"] / f"ddpm_{key}_train_{step}.log", ctx)
            v["train_seconds"] += sec
            if not ok:
                v["status"] = f"error in training to step {step}: {tail}"
                break
            snap = run_root / "snapshots" / f"{step:07d}"  # the next stage overwrites ema_ckpt.pt
            snap.mkdir(parents=True)
            for f in ("ema_ckpt.pt", "config.json"):
                shutil.copy2(run_dir / f, snap / f)
            out = samples / f"{step:07d}"
            cmd = [sys.executable, "inference.py", "--ckpt", snap / "ema_ckpt.pt", "--num-samples", ctx["n_samples"],
                   "--batch-size", 100, "--sampler", sampler, "--sampling-steps", ctx["sampling_steps"],
                   "--cfg-scale", CFG_SCALE, "--seed", SEED, "--output-dir", out, "--class-subfolders",
                   "--device", ctx["device"]]
            pending.append(sampling.submit(evaluate, v, step, cmd, REPO / "ddpm", out, ctx,
                                           f"ddpm_{key}_sample_{step}"))
        for f in pending:
            f.result()
    if v["status"] == "ok":
        v["seconds_per_step"] = v["train_seconds"] / steps[-1]
    v["checkpoints"].sort(key=lambda c: c["step"])
    return v


def train_dit(spec, ctx, steps):
    """One DiT variant: one run with a checkpoint at every evaluated step, then sample and score each."""
    key, name, flags, _, sampler, _ = spec
    flags = [f.replace("{encoder}", str(ctx.get("encoder"))) for f in flags]
    v = variant_entry(key, name, flags)
    run_root, samples = ctx["scratch"] / "dit" / key, ctx["scratch"] / "samples" / "dit" / key
    cmd = [sys.executable, "train.py", "--data_root", ctx["data"] / "digits", "--results_dir", run_root,
           "--vae", ctx["vae"], "--seed", SEED, *DIT_RECIPE, *flags, "--max_train_steps", steps[-1],
           "--ckpt_every_steps", steps[0]]
    ok, sec, tail = run(cmd, REPO / "dit", ctx["logs"] / f"dit_{key}_train.log", ctx)
    v["train_seconds"] = sec
    if not ok:
        v["status"] = f"error in training: {tail}"
        return v
    v["seconds_per_step"] = sec / steps[-1]
    jobs = []
    for step in steps:
        found = sorted(run_root.glob(f"*/checkpoints/{step:07d}.pt"))
        if not found:
            v["status"] = f"error: no checkpoint {step:07d}.pt under {run_root}"
            return v
        out = samples / f"{step:07d}"
        cmd = [sys.executable, "sample.py", "--ckpt", found[-1], "--num-samples", ctx["n_samples"],
               "--batch-size", 100, "--cfg-scale", CFG_SCALE, "--sampler", sampler,
               "--num-sampling-steps", ctx["sampling_steps"], "--seed", SEED, "--output-dir", out,
               "--exact-output-dir", "--grid-dir", samples / f"grids_{step:07d}"]
        jobs.append((v, step, cmd, REPO / "dit", out, ctx, f"dit_{key}_sample_{step}"))
    with ThreadPoolExecutor(max_workers=len(jobs)) as sampling:
        list(sampling.map(lambda job: evaluate(*job), jobs))
    v["checkpoints"].sort(key=lambda c: c["step"])
    return v


def evaluate(v, step, cmd, cwd, out, ctx, log_name):
    """Sample with cmd, score the images in `out`, append the checkpoint's figures; False on failure."""
    ok, sec, tail = run(cmd, cwd, ctx["logs"] / f"{log_name}.log", ctx)
    if not ok:
        v["status"] = f"error in sampling at step {step}: {tail}"
        return False
    with ctx["lock"]:
        fig = ctx["judge"].score(out)
    fig.update(step=step, sampling_seconds=sec)
    v["checkpoints"].append(fig)
    say(f"  {v['name']} @ {step}: FD {fig['fd']:.1f}, class accuracy {fig['class_accuracy']:.2f} "
        f"({v['train_seconds']:.0f} s of training so far)")
    return True


def family_title(fam, cfg, n_real):
    n = cfg["per_class"] * 10
    if fam == "ddpm":
        return (f"DDPM, pixel UNet (ddpm/scripts/demo.sh recipe: base 16, cosine, batch 32); DDIM {cfg['sampling_steps']}"
                f" steps, CFG {CFG_SCALE:g}, EMA; {n} samples vs {n_real} held-out digits")
    k = cfg["sampling_steps"]
    return (f"DiT-Ti/2 on the demo VAE's latents (dit/scripts/demo.sh recipe, batch 32); diffusion: DDIM {k} steps, "
            f"flow: Heun {k} steps ({2 * k - 1} evaluations); CFG {CFG_SCALE:g}, EMA; {n} samples vs {n_real} held-out digits")


def plan_family(fam, args, ctx):
    """A family's record and the variants to train; the shared pieces (VAE, REPA encoder) are made here, first."""
    cfg = args.cfg
    total = cfg[f"{fam}_steps"]
    steps = [total * (k + 1) // cfg["checkpoints"] for k in range(cfg["checkpoints"])]
    short = (f"DDPM pixel UNet: DDIM {cfg['sampling_steps']}" if fam == "ddpm" else
             f"DiT-Ti/2 latents: DDIM / Heun {cfg['sampling_steps']}") + f", CFG {CFG_SCALE:g}, {cfg['per_class'] * 10} samples"
    family = {"family": fam, "title": family_title(fam, cfg, len(ctx["judge"].real)), "short_title": short, "steps": steps,
              "sampler_steps": cfg["sampling_steps"], "cfg_scale": CFG_SCALE, "images": cfg["per_class"] * 10,
              "variants": []}
    specs = [s for i, s in enumerate(FAMILIES[fam]) if i == 0 or args.wanted is None or s[0] in args.wanted]
    # what the folder accepts today (flags being added by others may be missing): one --help each, when needed
    train_help = help_text(fam, "train.py") if any(s[3] for s in specs) else ""
    sample_help = help_text(fam, "sample.py" if fam == "dit" else "inference.py") if any(s[5] for s in specs) else ""
    if fam == "dit":
        ok, sec, tail = run([sys.executable, "train_vae.py", "--data_root", ctx["data"] / "digits", "--output_dir",
                             ctx["vae"], "--seed", SEED, *VAE_RECIPE, "--max_train_steps", cfg["vae_steps"]],
                            REPO / "ldm", ctx["logs"] / "ldm_vae.log", ctx)
        family["vae_seconds"] = sec
        if not ok:
            family["variants"] = [variant_entry(s[0], s[1], s[2], f"error in VAE training: {tail}") for s in specs]
            return family, []
    jobs = []
    for spec in specs:
        key, name, flags, needs, sampler, sample_word = spec
        status = missing_flag(needs, sample_word, train_help, sample_help)
        family["variants"].append(variant_entry(key, name, flags, status or "queued"))
        if status:
            say(f"{fam} {name}: {status}")
            continue
        if "--repa_encoder" in needs and not ctx.get("encoder"):
            ctx["encoder"] = ctx["scratch"] / "repa_encoder.pt"
            t0 = time.perf_counter()
            acc = train_encoder(ctx["data"] / "digits", ctx["encoder"], cfg["encoder_epochs"], seed=1)
            family["repa_encoder"] = {"file": str(ctx["encoder"]), "train_accuracy": acc,
                                      "seconds": time.perf_counter() - t0,
                                      "architecture": "benchmarks/quality_encoder.py TokenEncoder (not the FD network)"}
        jobs.append((family, len(family["variants"]) - 1, spec))
    return family, jobs


def run_job(job, ctx):
    """Train and score one variant; its record replaces the queued one."""
    family, index, spec = job
    say(f"[{time.strftime('%H:%M:%S')}] {family['family']} {spec[1]}: training {family['steps'][-1]} steps")
    try:
        v = (train_ddpm if family["family"] == "ddpm" else train_dit)(spec, ctx, family["steps"])
    except Exception as exc:  # e.g. unreadable samples: reported in the table, the other variants go on
        v = variant_entry(spec[0], spec[1], spec[2], f"error: {type(exc).__name__}: {exc}")
    if v["status"] != "ok":
        say(f"  {spec[1]}: {v['status']}")
    family["variants"][index] = v


# ----------------------------------------------------------------------------- main
def main():
    args = parse_args()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    cfg = args.cfg
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="quality-", dir=args.workdir)).resolve()
    results_dir = Path(args.results_dir) if args.results_dir else (
        REPO / "benchmarks" / "results" if args.size == "paper" else scratch / "results")
    results_dir.mkdir(parents=True, exist_ok=True)
    logs = scratch / "logs"
    logs.mkdir()
    data, eval_dir = scratch / "data", scratch / "evaluation"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # Two jobs of two threads on two cores spin in each other's OpenMP barriers (a DDPM step took 4 s instead
        # of 0.3 s here); one thread per job uses the cores without that. The judge below runs between them.
        env["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    ctx = {"scratch": scratch, "data": data, "logs": logs, "vae": scratch / "vae", "env": env,
           "slots": threading.Semaphore(args.jobs), "lock": threading.Lock(), "sampling_steps": cfg["sampling_steps"]}
    ok, _, tail = run([sys.executable, "scripts/make_demo_data.py", "--out", data], REPO, logs / "make_demo_data.log",
                      ctx)
    if ok:
        ok, _, tail = run([sys.executable, "demo_classifier.py", "--data", data / "digits", "--out", eval_dir,
                           "--epochs", cfg["classifier_epochs"], "--seed", SEED], REPO / "evaluation",
                          logs / "demo_classifier.log", ctx)
    if not ok:
        print(f"error: setting up the demo data / digit CNN failed ({tail}); logs in {logs}", file=sys.stderr)
        sys.exit(1)
    device = torch.device("cuda" if args.device.startswith("cuda") else "cpu")
    judge = Judge(eval_dir, data / "heldout" / "digits", device)
    tf, tl, ti = judge.features(data / "digits", per_class=cfg["per_class"])
    floor = {"fd": frechet_distance_from_features(judge.real, tf), "class_accuracy": float((tl.argmax(1) == ti).mean()),
             "images": int(len(tf)), "what": "the same number of real training digits scored as if generated"}
    say(f"quality: floor (real training digits): FD {floor['fd']:.1f}, class accuracy {floor['class_accuracy']:.2f}")
    ctx.update(judge=judge, device=device.type, n_samples=cfg["per_class"] * len(judge.class_names))
    planned = [plan_family(f, args, ctx) for f in args.fams]
    # Every variant runs in its own thread; its processes wait for one of the --jobs slots (first come, first
    # served). The DiT trainings are the longest single processes: they queue first, so that the end of the run
    # is made of short processes that keep both slots busy.
    jobs = sorted((j for _, js in planned for j in js), key=lambda j: j[0]["family"] != "dit")
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futures = []
        for job in jobs:
            futures.append(pool.submit(run_job, job, ctx))
            time.sleep(0.2)  # submission order = queue order for the slots
        for f in futures:
            f.result()
    families = [add_steps_to_target(f) for f, _ in planned]
    lines = [f"Quality benchmark (issue 18): steps to the baseline's final FD on the demo digits; size {args.size}; "
             f"seed {SEED} for every variant; FD on the demo digit CNN's 64-d features vs the held-out digits; "
             f"{args.jobs} variant(s) trained at once, threads per process: {env.get('OMP_NUM_THREADS', 'default')}",
             f"floor: {floor['images']} real training digits score FD {floor['fd']:.1f}, "
             f"class accuracy {floor['class_accuracy']:.2f}", ""]
    for fam in families:
        lines += family_table(fam) + [""]
    res = {"sizes": args.size, "config": cfg, "seed": SEED, "floor": floor, "families": {f["family"]: f for f in families},
           "jobs": args.jobs, "child_threads": env.get("OMP_NUM_THREADS", "torch default"),
           "n_heldout": len(judge.real), "threads": torch.get_num_threads(), "load_avg_start": list(load_start),
           "load_avg_end": list(os.getloadavg()), "seconds": time.perf_counter() - t_start,
           "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "scratch": str(scratch)}
    lines.append(f"total {res['seconds']:.0f} s; samples and logs in {scratch}")
    res["text"] = "\n".join(lines)
    res["plot"] = str(plot(families, results_dir / "quality.png", floor=floor["fd"]))
    (results_dir / "quality.txt").write_text(res["text"] + "\n")
    write(results_dir / "quality.json", res)
    write(args.out, res)
    say(res["text"])


if __name__ == "__main__":
    main()
