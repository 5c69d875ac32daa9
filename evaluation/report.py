"""The reports: the printed FINAL EVALUATION REPORT, the JSON and the Markdown trust report with its parts
(memorization audit, real-vs-real floor, bootstrap intervals, TSTR).

Not run directly; `precision_recall.py` calls it:

    python precision_recall.py --real heldout/ --gen samples/ --train_dir train/ \
        --metrics fid,precision,recall,memorization --bootstrap 200 --floor --tstr --json r.json   # + r.md

The parts take the evaluator's sides (folders already listed and validated, features already extracted)
and return plain dicts that go into the JSON; `write_report` turns the whole result into Markdown.
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import medical
import memorization
import tstr
import uncertainty
from images import UserError, load_masks, load_pixels, pair_masks
from metrics import feature_stats

RULE = "=" * 40
INTERVAL_METRICS = ("fid", "precision", "recall", "density", "coverage")
RANGES = {"fid": (0, None), "precision": (0, 1), "recall": (0, 1), "density": (0, None), "coverage": (0, 1)}
NAMES = {"fid": "FD", "precision": "Precision", "recall": "Recall", "kid_mean": "KID", "density": "Density",
         "coverage": "Coverage"}


# ---------------------------------------------------------------- memorization audit
def pixels(side, size, opts, args):
    """The side's images as (N, C, size, size) tensors in [0, 1] for the pixel audit / TSTR."""
    return load_pixels(side.sources, size, opts, args.num_workers, args.batch_size)


def audit(args, real, gen, train, opts, device, feature_net):
    """Pixel-space audit (always) and, when features of `feature_net` exist for all three sets, the
    feature-space one. Returns (JSON dict, gallery tensors (gen, train))."""
    size = args.audit_size
    g, t, h = (pixels(s, size, opts, args) for s in (gen, train, real))
    kw = dict(false_flag_rate=args.false_flag_rate, max_shift=args.max_shift, gen_names=gen.files,
              train_names=train.files, device=str(device))
    try:
        out = memorization.audit(g, t, h, **kw)
        if feature_net and all(feature_net in s.features for s in (gen, train, real)):
            feats = tuple(s.features[feature_net] for s in (gen, train, real))
            out["feature_space"] = slim(memorization.audit(None, None, None, features=feats, **kw))
            out["feature_space"]["features"] = feature_net
    except ValueError as exc:
        raise UserError(f"memorization audit: {exc}") from None
    out["image_size"] = size
    return out, (g, t)


def slim(result):
    """An audit result without the per-held-out lists (kept: per generated image best similarity and match)."""
    return {k: v for k, v in result.items() if k not in ("heldout_similarity", "heldout_nearest")}


# ---------------------------------------------------------------- floor and intervals
def floor(real, fd_net, nn_net, plan, opts, metric_values, args, device):
    """Metrics between two disjoint halves of the real set (whole patients / volumes on each side)."""
    if real.sources is not None:
        try:
            groups = [medical.group_of(src, opts) for src in real.sources]
        except ValueError as exc:
            raise UserError(str(exc)) from None
        how = "--group_regex" if opts.group_regex else "patient (DICOM PatientID / NIfTI volume / file)"
    else:
        groups, how = real.n, "image (an .npz has no patients)"
    try:
        a, b = uncertainty.split_halves(groups, seed=args.seed)
    except ValueError as exc:
        raise UserError(f"--floor: {exc}") from None
    fa, fb = {}, {}
    for key, net in (("fd", fd_net), ("nn", nn_net)):
        if net in real.features:
            fa[key], fb[key] = real.features[net][a], real.features[net][b]
    out, skipped = {}, []
    for m in plan:
        try:
            sa = feature_stats(fa["fd"]) if "fd" in fa and len(a) >= 2 else None
            sb = feature_stats(fb["fd"]) if "fd" in fb and len(b) >= 2 else None
            out.update(metric_values(fa, fb, sa, sb, [m], args, device))
        except (ValueError, TypeError, KeyError):
            skipped.append(m)
    n_groups = len(set(groups)) if not isinstance(groups, int) else groups
    return {**out, "n_a": len(a), "n_b": len(b), "groups": n_groups, "split_by": how, "skipped": skipped}


def intervals(real_f, gen_f, plan, args, device, warnings):
    """Bootstrap intervals of the planned FD / k-NN metrics (those whose features are at hand)."""
    wanted = [m for m in INTERVAL_METRICS if m in plan]
    if "fid" in wanted and not ("fd" in real_f and "fd" in gen_f):
        wanted.remove("fid")
        warnings.append("bootstrap: no FD interval (an .npz side holds only mu/sigma, not the features)")
    if not wanted:
        return {}
    try:
        out = uncertainty.metric_intervals(real_f.get("fd"), gen_f.get("fd"), real_f.get("nn"), gen_f.get("nn"),
                                           wanted, args.bootstrap, seed=args.seed, k_pr=args.pr_k,
                                           k_dc=args.dc_k, device=str(device))
    except ValueError as exc:
        warnings.append(f"bootstrap intervals not computed: {exc}")
        return {}
    for m, iv in out.items():  # the re-centred interval (uncertainty.py) may cross a bound the metric cannot
        lo, hi = RANGES[m]
        iv["low"], iv["high"] = (float(np.clip(iv[k], lo, hi)) for k in ("low", "high"))
    return out


# ---------------------------------------------------------------- TSTR
def tstr_task(real, gen, train):
    """'segmentation' (image/mask pair folders), 'classification' (class subfolders) or None."""
    sides = [s for s in (real, gen, train) if s is not None]
    if all(s.mask_root is not None for s in sides):
        return "segmentation"
    if all(s.class_names for s in sides):
        return "classification"
    return None


def check_classes(real, gen, train):
    """Class subfolders of --gen / --train_dir must be among --real's (the test set's) classes."""
    for side, flag in ((gen, "--gen"), (train, "--train_dir")):
        if side is None:
            continue
        unknown = [c for c in side.class_names if c not in real.class_names]
        if unknown:
            raise UserError(f"--tstr: class folder(s) {', '.join(unknown)} of {flag} are not among --real's "
                            f"classes ({', '.join(real.class_names)})")
    if len(real.class_names) < 2:
        raise UserError(f"--tstr: --real has one class ({real.class_names[0]}); a classifier needs at least 2")


def run_tstr(args, real, gen, train, opts, device):
    """Train on generated, test on held-out real; beside it the same network trained on --train_dir."""
    task, size = tstr_task(real, gen, train), args.tstr_size
    test_x = pixels(real, size, opts, args)
    sets = [("synthetic", gen)] + ([("real", train)] if train is not None else [])
    out = {"task": task, "image_size": size, "test": "--real (held-out real images)"}
    try:
        if task == "classification":
            idx = {c: i for i, c in enumerate(real.class_names)}
            y = lambda s: torch.as_tensor([idx[s.class_names[lab]] for lab in s.labels])  # noqa: E731
            test_y = y(real)
            for name, side in sets:
                x = pixels(side, size, opts, args)
                x, tx = same_channels(x, test_x)
                out[name] = tstr.classify(x, y(side), tx, test_y, seed=args.seed, device=str(device))
            out["classes"] = real.class_names
        else:
            test_m = load_masks(pair_masks(real.mask_root.parent, real.files), size)
            for name, side in sets:
                x = pixels(side, size, opts, args)
                x, tx = same_channels(x, test_x)
                out[name] = tstr.segment(x, load_masks(pair_masks(side.mask_root.parent, side.files), size), tx, test_m,
                                         seed=args.seed, device=str(device))
    except ValueError as exc:
        raise UserError(f"--tstr: {exc}") from None
    return out


def same_channels(a, b):
    """Grey and colour sets together: both to 3 channels."""
    if a.shape[1] == b.shape[1]:
        return a, b
    return a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)


def size_lines(res, plan, args, dims):
    """uncertainty.size_warnings for this run (FD's own small-set line is the evaluator's; only rank adds here)."""
    if res.get("n_real") is None or res.get("n_gen") is None:
        return []
    small = min(res["n_real"], res["n_gen"])
    wanted = [m for m in plan if m != "fid" or (dims and small <= dims)]
    if "tstr" in res:
        wanted.append("tstr" if res["tstr"]["task"] == "classification" else "segment")
    return uncertainty.size_warnings(res["n_real"], res["n_gen"], wanted, dims=dims, k_pr=args.pr_k,
                                     k_dc=args.dc_k, bootstrap=args.bootstrap or None, n_test=res["n_real"])


# ---------------------------------------------------------------- printed lines
def interval_text(iv):
    return f"  [{iv['low']:.4f}, {iv['high']:.4f}] 95% CI" if iv else ""


def trust_lines(res, labels, w):
    """Lines of the FINAL EVALUATION REPORT for the floor, the audit and TSTR."""
    lines = []
    fl = res.get("floor")
    if fl:
        vals = ", ".join(f"{NAMES.get(k, k)} {fl[k]:.4f}" for k in NAMES if k in fl)
        lines.append(f"{'Real-vs-real floor:':<{w}}{vals or 'nothing computable'} "
                     f"({fl['n_a']} vs {fl['n_b']} real images, split by {fl['split_by']})")
    mem = res.get("memorization")
    if mem:
        for m in (mem, mem.get("feature_space")):
            if not m:
                continue
            name = "Copy rate (" + m["method"] + "):"
            lines.append(f"{name:<{max(w, len(name) + 1)}}{m['copy_rate']:.4f} ({m['n_copies']} of {m['n_gen']} "
                         f"generated flagged; threshold {m['threshold']:.4f} for a {100 * m['false_flag_rate']:g}% "
                         f"false-flag rate, held-out {100 * m['heldout_flag_rate']:.1f}%)")
    t = res.get("tstr")
    if t:
        key = "accuracy" if t["task"] == "classification" else "dice"
        real_txt = f", trained on real {t['real'][key]:.4f}" if t.get("real") else ""
        lines.append(f"{'TSTR ' + key + ':':<{w}}trained on synthetic {t['synthetic'][key]:.4f}{real_txt} "
                     f"(tested on {t['synthetic']['n_test']} held-out real)")
    return lines


def fmt(v, width=10):
    return f"{v:{width}.4f}" if isinstance(v, float) else f"{'-':>{width}}"


def side_name(side):
    """A side's folder name (the pair folder's, not its images/)."""
    return side.path.parent.name if side.mask_root is not None else side.path.name


def print_report(res, labels, real, gen, notes, opts):
    """The FINAL EVALUATION REPORT block."""
    lines = [RULE, "FINAL EVALUATION REPORT",
             f"Real Data: {side_name(real)} ({res['n_real'] if res['n_real'] is not None else '?'} images)",
             f"Gen Data:  {side_name(gen)} ({res['n_gen']} images)", opts.describe(), RULE]
    rows = [("fid", f"{labels['fid']}:"), ("precision", f"Precision ({labels['nn']}):"),
            ("recall", f"Recall ({labels['nn']}):"), ("density", f"Density ({labels['nn']}):"),
            ("coverage", f"Coverage ({labels['nn']}):")]
    kid_name = f"KID ({labels['fd']}):"
    w = max([23] + [len(n) + 1 for _, n in rows] + [len(kid_name) + 1])
    iv = res.get("intervals", {})
    for key, name in rows:
        if key in res:
            lines.append(f"{name:<{w}}{res[key]:.4f}{interval_text(iv.get(key))}")
        if key == "fid" and "kid_mean" in res:
            lines.append(f"{kid_name:<{w}}{res['kid_mean']:.6f} +- {res['kid_std']:.6f}")
    if "class_accuracy" in res:
        ca = res["class_accuracy"]
        real_txt = f", real {ca['real']:.4f}" if ca.get("real") is not None else ""
        lines.append(f"{'Class accuracy:':<{w}}generated {ca['gen']:.4f}{real_txt}")
    lines += trust_lines(res, labels, w)
    if res.get("per_class"):
        keys = [k for k in ("fid", "precision", "recall", "kid_mean", "density", "coverage",
                            "class_accuracy_gen", "class_accuracy_real") if any(
                                k in v for v in res["per_class"].values())]
        heads = {"fid": "FD", "kid_mean": "KID", "class_accuracy_gen": "Acc gen",
                 "class_accuracy_real": "Acc real"}
        width = max(12, max(len(c) for c in res["per_class"]) + 1)
        lines += ["-" * 40, f"{'Class':<{width}}{'n_real':>7}{'n_gen':>7}"
                  + "".join(f"{heads.get(k, k.capitalize()):>10}" for k in keys)]
        for c, v in res["per_class"].items():
            lines.append(f"{c:<{width}}{v['n_real']:>7}{v['n_gen']:>7}" + "".join(fmt(v.get(k)) for k in keys))
    if res["warnings"] or notes:
        lines.append("-" * 40)
        lines += [f"Warning: {w}" for w in res["warnings"]] + [f"Note: {n}" for n in notes]
    lines.append(RULE)
    print("\n".join(lines), flush=True)


def write_json(path, res):
    """Results as JSON, atomically."""
    tmp = path + f".tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(res, f, indent=2)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"results written to {path}")


# ---------------------------------------------------------------- Markdown
def _f(v, digits=4):
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "–"


def _rel(path, base):
    try:
        return os.path.relpath(path, Path(base).parent)
    except ValueError:
        return str(path)


def write_report(res, path):
    """Markdown trust report: table with intervals, real-vs-real floor, audit summary + gallery, TSTR, warnings."""
    s = res.get("settings", {})
    iv, fl = res.get("intervals", {}), res.get("floor")
    lines = ["# Trust report", "",
             f"- Real (held-out reference): `{s.get('real')}` ({res.get('n_real')} images)",
             f"- Generated: `{s.get('gen')}` ({res.get('n_gen')} images)"]
    if s.get("train_dir"):
        lines.append(f"- Training images: `{s['train_dir']}`")
    lines += [f"- Features: FD on {s.get('fd_features')}, nearest-neighbour metrics on {s.get('nn_features')}",
              f"- Written {time.strftime('%Y-%m-%d %H:%M:%S')}", ""]
    keys = [k for k in NAMES if k in res]
    if keys:
        head = "| Metric | Generated vs real | 95% interval | Real-vs-real floor |"
        lines += ["## Metrics", "", head, "|---|---|---|---|"]
        for k in keys:
            ci = iv.get("fid" if k == "fid" else k)
            ci_txt = f"[{_f(ci['low'])}, {_f(ci['high'])}] (bootstrap n={ci['n']})" if ci else "–"
            value = _f(res[k], 6 if k == "kid_mean" else 4)
            if k == "kid_mean":
                value += f" ± {_f(res.get('kid_std'), 6)}"
            lines.append(f"| {NAMES[k]} | {value} | {ci_txt} | {_f(fl.get(k)) if fl else '–'} |")
        lines.append("")
        if fl:
            lines += [f"The floor compares two disjoint halves of the real set ({fl['n_a']} vs {fl['n_b']} images, "
                      f"{fl['groups']} groups, split by {fl['split_by']}): a model cannot be expected to beat it.", ""]
    mem = res.get("memorization")
    if mem:
        lines += ["## Memorization audit", ""]
        for m in (mem, mem.get("feature_space")):
            if not m:
                continue
            lines += [f"- **{m['method']}**: copy rate **{_f(m['copy_rate'])}** ({m['n_copies']} of {m['n_gen']} "
                      f"generated images flagged), threshold {_f(m['threshold'])} set on {m['n_heldout']} held-out "
                      f"real images for a false-flag rate of {100 * m['false_flag_rate']:g}% (achieved "
                      f"{100 * m['heldout_flag_rate']:.1f}%); {m['n_train']} training images searched"]
        if mem.get("copies"):
            lines += ["", "| Generated | Closest training image | Similarity |", "|---|---|---|"]
            lines += [f"| `{c['gen']}` | `{c['train']}` | {_f(c['similarity'])} |" for c in mem["copies"][:50]]
            if len(mem["copies"]) > 50:
                lines.append(f"| … {len(mem['copies']) - 50} more in the JSON | | |")
        if res.get("gallery"):
            lines += ["", f"![closest pairs: generated | training]({_rel(res['gallery'], path)})",
                      "", "Closest pairs, most similar first; red frames are flagged copies."]
        lines += ["", "This section shows training images and names training files (which may carry patient "
                      "identifiers): share the report, its JSON and the gallery only where the training data may "
                      "be seen.", ""]
    t = res.get("tstr")
    if t:
        key = "accuracy" if t["task"] == "classification" else "dice"
        lines += [f"## Downstream utility (TSTR, {t['task']})", "", f"| Trained on | {key.capitalize()} on held-out "
                  "real | Training images |", "|---|---|---|"]
        for name, label in (("synthetic", "generated images"), ("real", "real training images (--train_dir)")):
            if t.get(name):
                lines.append(f"| {label} | {_f(t[name][key])} | {t[name]['n_train']} |")
        lines += ["", f"Tested on {t['synthetic']['n_test']} held-out real images (`--real`), images at "
                  f"{t['image_size']} px, seed {s.get('seed')}.", ""]
    warn = res.get("warnings", [])
    if warn:
        lines += ["## Warnings", ""] + [f"- {w}" for w in warn] + [""]
    lines += ["## Settings", "", "```"] + [f"{k}: {v}" for k, v in s.items() if k != "intensity"] + ["```", ""]
    tmp = Path(str(path) + f".tmp{os.getpid()}")
    try:
        tmp.write_text("\n".join(lines))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


def save_gallery(g, t, result, path):
    """memorization.save_gallery with the pixel tensors of the audit."""
    try:
        return str(memorization.save_gallery(g, t, result, str(path)))
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot write the gallery {path}: {exc}") from None


def np_float(x):
    """JSON-safe floats of a nested dict/list (numpy scalars -> float)."""
    if isinstance(x, dict):
        return {k: np_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [np_float(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x
