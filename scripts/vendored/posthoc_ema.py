"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2):
choose the EMA length after training instead of guessing `--ema_decay` before it.

During training (`--posthoc_ema_every_steps N`), two power-function EMAs of the trained weights are kept
(relative widths `--posthoc_ema_sigma_rels`, default 0.05 and 0.10) and written every N steps to
<run>/posthoc_ema/phema_<step>.pt. Afterwards any EMA width in between (and somewhat beyond) is rebuilt as
a weighted sum of those snapshots:

    python posthoc_ema.py --snapshots RUN/posthoc_ema --sigma_rel 0.08 --checkpoint CKPT   # -> CKPT's copy
    python posthoc_ema.py --snapshots RUN/posthoc_ema --list                                # what is there

The copy (default name <ckpt>_phema0.080_step<N>.pt beside CKPT, never overwritten) is CKPT with its EMA
entries replaced, so every inference script of the folder reads it like any checkpoint of the run.

VENDORED: the canonical source is scripts/vendored/posthoc_ema.py; ddpm/, ldm/, controlnet/ and dit/ hold
byte-identical copies (`python scripts/sync_vendored.py`; tests/test_vendored.py guards drift). Written from
the paper (section 3 and appendix C; the reference code's licence does not allow copying); neither torch nor
diffusers has it (diffusers' EMAModel has one fixed decay or a warm-up, no reconstruction).

The maths, in steps t = 1, 2, ... (optimizer steps done):
- A power-function EMA with exponent gamma averages the weights with density p(tau) ~ tau^gamma on [0, t]:
  per step, ema = beta * ema + (1 - beta) * w with beta_t = (1 - 1/t)^(gamma + 1). Unrolled, step tau gets
  the weight (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), which is exactly the integral of the continuous density
  (g+1) s^g / t^(g+1) over (tau-1, tau]: the closed-form inner products below are exact for this update.
- Its relative width (std of the density over its length) is sigma_rel = sqrt((g+1) / ((g+2)^2 (g+3))).
- A target density (t_r, g_r) is approximated by sum_i x_i p_i, the least-squares fit in L2 over the
  snapshots' densities (Gram matrix of closed-form inner products); the weights are then sum_i x_i ema_i.
"""
import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from runtime import FlagParser, UserError, atomic_save, load_checkpoint, run_main, unwrap

SNAPSHOT_RE = re.compile(r"^phema_(\d{7,})\.pt$")
FORMAT = "posthoc_ema"
MAX_SIGMA_REL = 0.28  # gamma -> 0 gives sigma_rel = 1/sqrt(12) ~ 0.2887 (a flat average of the whole run)


# ------------------------------------------------------------------------------------------------- maths
def sigma_rel_to_gamma(sigma_rel):
    """The exponent gamma of the power-function EMA whose relative width is sigma_rel (0 < sigma_rel < 0.28)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise UserError(f"sigma_rel {sigma_rel:g} must be in (0, {MAX_SIGMA_REL}) (EDM2 uses 0.05-0.15)")
    # sigma_rel^2 (g+2)^2 (g+3) = g+1  <=>  g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0; the largest real root.
    s2 = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-6 * max(1.0, abs(r.real))))


def gamma_to_sigma_rel(gamma):
    """Relative width of the power-function EMA with exponent gamma."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def beta(step, gamma):
    """Per-step decay of the power-function EMA after `step` optimizer steps (step >= 1; step 1 copies)."""
    return (1.0 - 1.0 / step) ** (gamma + 1)


def _log_inner(t_a, g_a, t_b, g_b):
    """log <p_a, p_b> of two power densities p(tau) = (g+1) tau^g / t^(g+1) on [0, t] (closed form)."""
    m = min(t_a, t_b)
    return (math.log(g_a + 1) + math.log(g_b + 1) + (g_a + g_b + 1) * math.log(m) - math.log(g_a + g_b + 1)
            - (g_a + 1) * math.log(t_a) - (g_b + 1) * math.log(t_b))


def solve_weights(snapshots, t_r, g_r):
    """Coefficients x of the snapshots [(t_i, g_i)] whose density mix best fits the target (t_r, g_r) in L2,
    and the fit's relative L2 error ||sum x_i p_i - p_r|| / ||p_r||."""
    scale = float(t_r)  # inner products scale uniformly with time: work in units of t_r (no overflow at 1e6 steps)
    ts = [t / scale for t, _ in snapshots]
    gs = [g for _, g in snapshots]
    n = len(snapshots)
    a = np.array([[math.exp(_log_inner(ts[i], gs[i], ts[j], gs[j])) for j in range(n)] for i in range(n)])
    b = np.array([math.exp(_log_inner(ts[i], gs[i], 1.0, g_r)) for i in range(n)])
    rr = math.exp(_log_inner(1.0, g_r, 1.0, g_r))
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    err2 = max(float(x @ a @ x - 2 * x @ b + rr), 0.0)
    return x, math.sqrt(err2 / rr)


def parse_sigma_rels(text, flag="--posthoc_ema_sigma_rels"):
    """'0.05,0.10' -> (0.05, 0.1); one error line naming the flag otherwise."""
    try:
        values = tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated numbers such as 0.05,0.10") from None
    if not values or len(set(values)) != len(values) or not all(0 < v < MAX_SIGMA_REL for v in values):
        raise UserError(f"{flag} {text!r}: give distinct widths in (0, {MAX_SIGMA_REL}), such as 0.05,0.10")
    return values


def add_flags(parser):
    """--posthoc_ema_every_steps and --posthoc_ema_sigma_rels on a runtime.FlagParser."""
    parser.add_argument("--posthoc_ema_every_steps", type=int, default=0,
                        help="post-hoc EMA (EDM2): write EMA snapshots every N steps to <run>/posthoc_ema/ "
                             "(0 = off, the default); rebuild any EMA length later with posthoc_ema.py")
    parser.add_argument("--posthoc_ema_sigma_rels", default="0.05,0.10",
                        help="relative widths of the tracked power-function EMAs (default 0.05,0.10)")
    return parser


# ------------------------------------------------------------------------------------------------ tracking
class PostHocEMA:
    """Power-function EMAs of named modules (the trained weights), snapshotted every `every_steps` steps.

    modules: {checkpoint key: module}; the key is where the reconstruction puts the weights (the entry of the
    folder's checkpoint that holds the EMA weights, e.g. "ema"). Floating tensors are averaged in float32;
    other buffers are copied. active=False (ranks other than 0) makes every method a no-op."""

    def __init__(self, modules, sigma_rels=(0.05, 0.10), every_steps=0, folder=None, active=True):
        self.modules = {k: unwrap(m) for k, m in modules.items()}
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.every_steps, self.folder = int(every_steps), Path(folder) if folder is not None else None
        self.active = bool(active) and self.every_steps > 0
        self.averages = []
        if self.active:
            self.averages = [{k: {n: t.detach().float().clone() if t.is_floating_point() else t.detach().clone()
                                  for n, t in m.state_dict().items()} for k, m in self.modules.items()}
                             for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, step):
        """Blend in the current weights after optimizer step `step` (>= 1; step 1 copies them)."""
        if not self.active:
            return
        for gamma, avg in zip(self.gammas, self.averages):
            b = beta(step, gamma)
            for key, module in self.modules.items():
                dst, src = [], []
                for name, t in module.state_dict().items():
                    d = avg[key][name]
                    if d.is_floating_point():
                        dst.append(d)
                        src.append(t.detach().to(d.dtype))
                    else:
                        d.copy_(t)
                if dst:  # one fused kernel: avg += (1 - beta) * (w - avg)
                    torch._foreach_lerp_(dst, src, 1.0 - b)

    def snapshot(self, step):
        """The snapshot file's content: plain tensors and numbers (loads with weights_only=True)."""
        return {"format": FORMAT, "version": 1, "step": int(step), "sigma_rels": list(self.sigma_rels),
                "gammas": list(self.gammas), "keys": list(self.modules),
                "averages": [{k: {n: t.cpu().clone() for n, t in sd.items()} for k, sd in avg.items()}
                             for avg in self.averages]}

    def maybe_snapshot(self, step, write=True):
        """Write folder/phema_<step>.pt atomically when step is a multiple of every_steps; returns its path."""
        if not self.active or step % self.every_steps or not write:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"phema_{int(step):07d}.pt"
        atomic_save(self.snapshot(step), path)
        return path

    def state_dict(self):
        """What a resume checkpoint stores (None when inactive)."""
        if not self.active:
            return None
        return {"sigma_rels": list(self.sigma_rels), "every_steps": self.every_steps,
                "averages": [{k: {n: t.cpu().clone() for n, t in sd.items()} for k, sd in avg.items()}
                             for avg in self.averages]}

    def load_state_dict(self, state):
        """Restore the averages of a resume checkpoint (the widths must be the run's)."""
        if not self.active:
            return
        if not state:
            raise UserError("the checkpoint being resumed has no post-hoc EMA state; resume without "
                            "--posthoc_ema_every_steps or start a new run")
        if [round(s, 9) for s in state["sigma_rels"]] != [round(s, 9) for s in self.sigma_rels]:
            raise UserError(f"--posthoc_ema_sigma_rels {','.join(map(str, self.sigma_rels))} disagrees with the "
                            f"run being resumed ({','.join(map(str, state['sigma_rels']))})")
        for avg, stored in zip(self.averages, state["averages"]):
            for key, sd in avg.items():
                for name, t in sd.items():
                    t.copy_(stored[key][name])


# ------------------------------------------------------------------------------------------ reconstruction
def list_snapshots(folder):
    """[(step, path)] of the snapshot files in folder, by step."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--snapshots {folder}: no such folder (train with --posthoc_ema_every_steps N to write "
                        f"snapshots to <run>/posthoc_ema/)")
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := SNAPSHOT_RE.match(p.name)))
    if not found:
        raise UserError(f"--snapshots {folder}: no phema_<step>.pt files in it")
    return found


def _load_snapshot(path):
    snap = load_checkpoint(path)
    if not isinstance(snap, dict) or snap.get("format") != FORMAT:
        raise UserError(f"{path} is not a post-hoc EMA snapshot")
    return snap


def reconstruct(folder, sigma_rel, step=None, log=print):
    """Weights {key: state_dict} of the power-function EMA of width sigma_rel at the last snapshot <= step
    (default: the last one), and a dict describing the fit."""
    found = list_snapshots(folder)
    if step is not None:
        found = [(s, p) for s, p in found if s <= step]
        if not found:
            raise UserError(f"--step {step}: no snapshot at or before it in {folder}")
    t_r, g_r = found[-1][0], sigma_rel_to_gamma(sigma_rel)
    last = _load_snapshot(found[-1][1])
    gammas, keys = last["gammas"], last["keys"]
    pairs = [(s, g) for s, _ in found for g in gammas]
    x, err = solve_weights(pairs, t_r, g_r)
    out, coef = None, iter(x.tolist())
    for s, p in found:  # one pass, one snapshot in memory at a time
        snap = last if s == t_r else _load_snapshot(p)
        if snap["keys"] != keys or [round(g, 9) for g in snap["gammas"]] != [round(g, 9) for g in gammas]:
            raise UserError(f"{p} tracks {snap['keys']} at sigma_rel {snap['sigma_rels']}, the last snapshot "
                            f"{keys} at {last['sigma_rels']}: snapshots of two runs are mixed in {folder}")
        for avg in snap["averages"]:
            c = next(coef)
            if out is None:
                out = {k: {n: torch.zeros_like(t, dtype=torch.float64) if t.is_floating_point() else t.clone()
                           for n, t in sd.items()} for k, sd in avg.items()}
            for k, sd in avg.items():
                for n, t in sd.items():
                    if t.is_floating_point():
                        out[k][n] += c * t.double()
                    elif s == t_r:
                        out[k][n] = t.clone()  # buffers such as counters: the latest
    info = {"sigma_rel": float(sigma_rel), "gamma": g_r, "step": int(t_r), "snapshots": len(found),
            "profiles": len(pairs), "fit_rel_error": err}
    if err > 0.1:
        log(f"warning: the snapshots fit an EMA of sigma_rel {sigma_rel:g} at step {t_r} only to a relative "
            f"error of {err:.2f}; widths far outside the tracked ones ({sorted(set(g for _, g in pairs))}) or "
            f"too few snapshots are poorly reconstructed")
    return out, info


def _is_flat_state_dict(obj):
    return isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values())


def rebuilt_checkpoint(ckpt, weights, info, path="checkpoint"):
    """ckpt with its EMA entries replaced by `weights` ({key: state_dict}); a flat state-dict file (DDPM's
    ema_ckpt.pt) is replaced whole when one key is tracked."""
    def cast(sd, like):
        missing = sorted(set(like) ^ set(sd))
        if missing:
            raise UserError(f"{path} does not fit the snapshots (tensor names differ, e.g. {missing[0]}): "
                            f"pass a checkpoint of the run that wrote them")
        return {n: t.to(like[n].dtype) for n, t in sd.items()}

    if _is_flat_state_dict(ckpt):
        if len(weights) != 1:
            raise UserError(f"{path} is a plain state dict, but the snapshots track {list(weights)}: pass the "
                            f"run's full checkpoint")
        return cast(next(iter(weights.values())), ckpt)
    if not isinstance(ckpt, dict) or any(not isinstance(ckpt.get(k), dict) for k in weights):
        raise UserError(f"{path} has no {', '.join(weights)} entries to replace: pass a checkpoint of the run "
                        f"that wrote the snapshots")
    out = dict(ckpt)
    for k, sd in weights.items():
        out[k] = cast(sd, ckpt[k])
    out["posthoc_ema_reconstruction"] = dict(info)
    return out


def main(argv=None):
    """CLI: list snapshots, or rebuild the EMA of one width into a copy of a checkpoint."""
    p = FlagParser(description="Rebuild the EMA weights of any width from post-hoc EMA snapshots (EDM2).")
    p.add_argument("--snapshots", required=True, help="the run's posthoc_ema/ folder")
    p.add_argument("--sigma_rel", type=float, help="relative EMA width to rebuild (EDM2's sigma_rel, e.g. 0.08)")
    p.add_argument("--step", type=int, help="rebuild the EMA as of the last snapshot at or before this step")
    p.add_argument("--checkpoint", help="a checkpoint of the run: the output is its copy with the EMA replaced")
    p.add_argument("--out", help="output file (default: <checkpoint>_phema<sigma_rel>_step<step>.pt beside it)")
    p.add_argument("--list", action="store_true", help="list the snapshots and exit")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow a pickled (non-plain) --checkpoint")
    args = p.parse_args(argv)
    found = list_snapshots(args.snapshots)
    if args.list:
        first = _load_snapshot(found[-1][1])
        print(f"{len(found)} snapshots in {args.snapshots}, steps {found[0][0]}..{found[-1][0]}, tracked widths "
              f"sigma_rel {', '.join(f'{s:g}' for s in first['sigma_rels'])}, entries {', '.join(first['keys'])}")
        return 0
    if args.sigma_rel is None or args.checkpoint is None:
        raise UserError("--sigma_rel and --checkpoint are required (or --list)")
    sigma_rel_to_gamma(args.sigma_rel)  # range check before any loading
    ckpt_path = Path(args.checkpoint)
    ckpt = load_checkpoint(ckpt_path, trust=args.trust_checkpoint)
    weights, info = reconstruct(args.snapshots, args.sigma_rel, args.step)
    out = Path(args.out) if args.out else ckpt_path.with_name(
        f"{ckpt_path.stem}_phema{args.sigma_rel:.3f}_step{info['step']}{ckpt_path.suffix or '.pt'}")
    if out.exists():
        raise UserError(f"{out} exists; pass another --out (an earlier reconstruction is never overwritten)")
    atomic_save(rebuilt_checkpoint(ckpt, weights, info, ckpt_path), out)
    print(f"post-hoc EMA sigma_rel {args.sigma_rel:g} (gamma {info['gamma']:.2f}) at step {info['step']} from "
          f"{info['snapshots']} snapshots x {info['profiles'] // info['snapshots']} widths, fit error "
          f"{info['fit_rel_error']:.4f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1:]) or 0)
