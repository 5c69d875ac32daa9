"""FID, precision/recall, KID, density/coverage (and classifier accuracy) between real and generated images.

    cd evaluation
    python precision_recall.py                       # uses REAL_IMAGES_DIR, GEN_IMAGES_DIR, BATCH_SIZE below
    python precision_recall.py --real /data/real --gen ../ldm/samples --metrics fid,precision,recall,kid \
        --json result.json
    python precision_recall.py --real /data/real --gen x --save_stats real_stats.npz   # later: --real real_stats.npz
    python precision_recall.py --real R --gen G --feature_extractor net.pt --classifier cls.pt  # domain networks
    python precision_recall.py --real /data/ct_dicom --gen /data/generated_nifti --intensity_window -160,240

--real/--gen take an image folder (recursive; png jpg jpeg bmp tif tiff webp, DICOM .dcm, NIfTI .nii .nii.gz,
any case) or an .npz with `mu`/`sigma` (pytorch-fid format) and/or `inception_features` (N x 2048) /
`vgg_features` (N x 4096). DICOM frames and NIfTI slices count as images; the intensity window
(--intensity_window, default auto) is fitted once on the real side and reads both sides.
FID uses pytorch-fid's Inception network and preprocessing (same weights -> same features); precision and
recall (k=3, Kynkaanniemi et al. 2019) and density/coverage (k=5, Naeem et al. 2020) use torchvision VGG16
fc2 features; KID uses the Inception features. With class subfolders on both sides, figures are also given
per class. Offline: --inception_weights / --vgg_weights take the weight files (see README.md).
"""
# Edit these to run `python precision_recall.py` with no flags (flags override them).
REAL_IMAGES_DIR = "/path/to/real/images"
GEN_IMAGES_DIR = "/path/to/generated/images"
BATCH_SIZE = 32

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from features import (build_inception, build_vgg, cache_path, default_cache_dir, extract,  # noqa: E402
                      folder_key, load_torchscript, net_identity, read_cache, write_cache)
import medical  # noqa: E402
from images import SCALINGS, UserError, class_layout, list_images, list_sources, validate_images  # noqa: E402
from imaging import ALL_EXTENSIONS  # noqa: E402
from metrics import (density_coverage, feature_stats, frechet_distance, frechet_distance_from_features,  # noqa: E402
                     kid, precision_recall)

ALL_METRICS = ("fid", "precision", "recall", "kid", "density", "coverage")
DEFAULT_METRICS = "fid,precision,recall"
# How files become pixels: the one rule of imaging.py (recorded in the JSON and in the feature-cache key).
DECODING = ("imaging.py v2: integers / type max, floats in [0,1], ITU-601 luma, antialiased resize; "
            "DICOM / NIfTI slices through the intensity window")
MIN_RELIABLE = 2048
RULE = "=" * 40


def parse_args(argv=None):
    """Command line; every flag also accepts its dash spelling."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--real", default=None, help=f"real image folder or .npz (default REAL_IMAGES_DIR={REAL_IMAGES_DIR})")
    add("--gen", default=None, help=f"generated image folder or .npz (default GEN_IMAGES_DIR={GEN_IMAGES_DIR})")
    add("--batch_size", "--batch-size", type=int, default=BATCH_SIZE, help="images per network batch")
    add("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    add("--metrics", default=None, help=f"comma list of {','.join(ALL_METRICS)} (default {DEFAULT_METRICS})")
    add("--json", default=None, help="also write the results to this JSON file")
    add("--num_workers", "--num-workers", type=int, default=min(4, os.cpu_count() or 1),
        help="DataLoader processes decoding images (0 = in the main process)")
    add("--save_stats", "--save-stats", default=None,
        help="write the real set's mu, sigma, inception_features, vgg_features to this .npz")
    add("--feature_extractor", "--feature-extractor", default=None,
        help="TorchScript module (images in [0,1], B x 3 x H x W -> B x D) used instead of Inception and VGG")
    add("--classifier", default=None,
        help="TorchScript classifier (images in [0,1] -> logits); reports per-class accuracy")
    add("--inception_weights", "--inception-weights", default=None,
        help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (otherwise downloaded)")
    add("--vgg_weights", "--vgg-weights", default=None,
        help="torchvision vgg16-397923af.pth state dict (otherwise downloaded)")
    # retired: every image is now decoded by the one rule of imaging.py; the old values still parse
    add("--scaling", choices=SCALINGS, default=None, help=argparse.SUPPRESS)
    add("--pr_k", "--pr-k", type=int, default=3, help="nearest neighbour k for precision/recall")
    add("--dc_k", "--dc-k", type=int, default=5, help="nearest neighbour k for density/coverage")
    add("--kid_subsets", "--kid-subsets", type=int, default=100)
    add("--kid_subset_size", "--kid-subset-size", type=int, default=1000)
    add("--seed", type=int, default=0, help="seed of the KID subsets")
    add("--cache_dir", "--cache-dir", default=None,
        help="feature cache of real folders (default $EVAL_CACHE_DIR or ~/.cache/diffusion_eval)")
    add("--no_cache", "--no-cache", action="store_true", help="do not read or write the feature cache")
    add("--trust_checkpoint", "--trust-checkpoint", action="store_true",
        help="allow weight files that hold pickled Python objects (only for files you trust)")
    medical.add_read_flags(p)  # --intensity_window, --slice_axis, --slice_range, --group_regex
    return p.parse_args(argv)


class Side:
    """One input (real or generated): where it comes from, its features, labels and notes."""

    def __init__(self, role, path):
        self.role, self.path = role, Path(path)
        self.features, self.stats = {}, {}
        self.files, self.class_names, self.labels, self.n = None, None, None, None
        self.sources, self.intensity = None, None  # 2-D images (slices) of a folder; window an .npz records
        self.is_npz = self.path.suffix.lower() == ".npz"

    def has(self, net):
        """Features of this network are (or will be) available."""
        return not self.is_npz or net in self.features

    def fd_ok(self, net):
        """Enough for a Frechet distance with this network."""
        return self.has(net) or net in self.stats


def load_side(role, path, flag, opts):
    """Check an input and read what is cheap (image / slice list + header check, or the .npz arrays)."""
    side = Side(role, path)
    if not side.path.exists():
        hint = " (edit REAL_IMAGES_DIR/GEN_IMAGES_DIR at the top of precision_recall.py or pass the flag)"
        raise UserError(f"{flag} {path} does not exist{hint}")
    if side.is_npz:
        try:
            with np.load(side.path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except Exception as exc:
            raise UserError(f"{flag} {path} is not a readable .npz ({type(exc).__name__}: {exc})") from None
        keys = {"inception_features": "inception", "vgg_features": "vgg", "features": "custom"}
        for key, net in keys.items():
            if key in data:
                if data[key].ndim != 2:
                    raise UserError(f"{flag} {path}: {key} must be N x D, got shape {data[key].shape}")
                side.features[net] = data[key].astype(np.float32)
        if "mu" in data and "sigma" in data:
            mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
            if sigma.shape != (mu.size, mu.size):
                raise UserError(f"{flag} {path}: sigma {sigma.shape} does not match mu {mu.shape}")
            side.stats["custom" if "features" in data else "inception"] = (mu, sigma)
        if not side.features and not side.stats:
            raise UserError(f"{flag} {path} holds none of mu+sigma, inception_features, vgg_features, "
                            f"features (it has: {', '.join(data) or 'nothing'})")
        counts = {len(v) for v in side.features.values()}
        side.n = counts.pop() if len(counts) == 1 else (int(data["n_images"]) if "n_images" in data else None)
        if "labels" in data and "class_names" in data and side.n == len(data["labels"]):
            side.labels, side.class_names = data["labels"].astype(np.int64), [str(c) for c in data["class_names"]]
        if "intensity" in data:  # written by --save_stats: the window the real images were read with
            try:
                side.intensity = medical.ReadOptions.from_config(json.loads(str(data["intensity"])))
            except (ValueError, TypeError, AttributeError) as exc:
                raise UserError(f"{flag} {path}: unreadable intensity record ({exc})") from None
        return side
    if not side.path.is_dir():
        raise UserError(f"{flag} {path} is neither an image folder nor an .npz file")
    if not list_images(side.path):
        raise UserError(f"{flag} {path} holds no images (looked for {' '.join(e[1:] for e in ALL_EXTENSIONS)} "
                        f"and DICOM files without extension, recursively)")
    side.sources, side.files = list_sources(side.path, opts)  # one per 2-D image: file, frame or slice
    side.n = len(side.files)
    side.class_names, side.labels = class_layout(side.path, side.files)
    return side


def fit_window(opts, real, gen, notes):
    """The intensity window for both sides: fitted once on the real images, or the one a --real .npz records."""
    try:
        if real.sources is not None:
            return opts.fit(real.sources)
        if real.intensity is not None:
            stored = real.intensity
            if opts.mode[0] == "percentile":
                raise UserError(f"--intensity_window {opts.spec}: percentiles need the real images, but --real is "
                                f"an .npz (read with {stored.describe()}); drop the flag to use that window")
            if opts.mode[0] == "fixed" and stored.window is not None and \
                    not np.allclose(opts.window, stored.window, rtol=0, atol=1e-9):
                raise UserError(f"--intensity_window {opts.spec} differs from the window the --real .npz was "
                                f"computed with ({stored.describe()}); pass that window or recompute the statistics")
            return stored if opts.mode[0] == "auto" else opts.fit([])
        fitted = opts.fit(gen.sources or [])
        if fitted.window is not None:
            notes.append("the --real .npz records no intensity window: the window was fitted on the --gen images; "
                         "write real statistics with --save_stats to record it")
        return fitted
    except ValueError as exc:  # an ImageError of a file, or percentiles of no physical data (names the flag)
        raise UserError(str(exc)) from None


def plan_metrics(args, real, gen, fd_net, nn_net):
    """Metrics that can be computed from the inputs; impossible ones fail if asked for, else are skipped."""
    explicit = args.metrics is not None
    wanted = [m.strip().lower() for m in (args.metrics or DEFAULT_METRICS).split(",") if m.strip()]
    bad = [m for m in wanted if m not in ALL_METRICS]
    if bad or not wanted:
        raise UserError(f"--metrics: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(ALL_METRICS)}")
    plan, warnings = [], []
    for m in dict.fromkeys(wanted):
        if m == "fid":
            ok = real.fd_ok(fd_net) and gen.fd_ok(fd_net)
        else:
            net = fd_net if m == "kid" else nn_net
            ok = real.has(net) and gen.has(net)
        if ok:
            plan.append(m)
            continue
        msg = (f"{m} needs {'features' if m != 'fid' else 'statistics'} of the "
               f"{fd_net if m in ('fid', 'kid') else nn_net} network, which an input .npz lacks")
        if explicit:
            raise UserError(f"--metrics {m}: {msg}; pass image folders or an .npz written by --save_stats")
        warnings.append(f"{m} skipped: {msg}")
    if not plan:
        raise UserError("none of the requested metrics can be computed from these inputs")
    return plan, warnings


def check_writable(path, flag):
    """Fail before any heavy work when an output file cannot be written."""
    parent = Path(path).resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: folder {parent} does not exist or is not writable")


def pick_device(name):
    """The torch device to run on, validated."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return dev


def metric_values(real_f, gen_f, real_stats, gen_stats, plan, args, device):
    """Compute the planned metrics from feature arrays (fd_feats/nn_feats) or statistics."""
    out = {}
    if "fid" in plan:
        if "fd" in real_f and "fd" in gen_f and min(len(real_f["fd"]), len(gen_f["fd"])) < real_f["fd"].shape[1]:
            out["fid"] = frechet_distance_from_features(real_f["fd"], gen_f["fd"])  # same value, N x N work
        else:
            out["fid"] = frechet_distance(*real_stats, *gen_stats)
    if "kid" in plan:
        out["kid_mean"], out["kid_std"] = kid(real_f["fd"], gen_f["fd"], args.kid_subsets,
                                              args.kid_subset_size, args.seed)
    if "precision" in plan or "recall" in plan:
        p, r = precision_recall(real_f["nn"], gen_f["nn"], args.pr_k, device=device)
        out.update({k: v for k, v in (("precision", p), ("recall", r)) if k in plan})
    if "density" in plan or "coverage" in plan:
        d, c = density_coverage(real_f["nn"], gen_f["nn"], args.dc_k, device=device)
        out.update({k: v for k, v in (("density", d), ("coverage", c)) if k in plan})
    return out


def side_arrays(side, fd_net, nn_net, mask=None):
    """(features dict with 'fd'/'nn', FD statistics) of a side, optionally restricted to rows in mask."""
    f = {}
    if fd_net in side.features:
        f["fd"] = side.features[fd_net] if mask is None else side.features[fd_net][mask]
    if nn_net in side.features:
        f["nn"] = side.features[nn_net] if mask is None else side.features[nn_net][mask]
    if "fd" in f and len(f["fd"]) >= 2:
        stats = feature_stats(f["fd"])
    else:
        stats = side.stats.get(fd_net) if mask is None else None
    return f, stats


def classifier_accuracy(side, logits, class_index):
    """Per-class and overall share of images the classifier assigns to their folder's class."""
    pred = logits.argmax(1)
    target = np.array([class_index[side.class_names[l]] for l in side.labels])
    per = {c: float((pred[side.labels == i] == target[side.labels == i]).mean())
           for i, c in enumerate(side.class_names)}
    return float((pred == target).mean()), per


def fmt(v, width=10):
    return f"{v:{width}.4f}" if isinstance(v, float) else f"{'-':>{width}}"


def print_report(res, labels, real, gen, notes, opts):
    """The FINAL EVALUATION REPORT block."""
    lines = [RULE, "FINAL EVALUATION REPORT",
             f"Real Data: {real.path.name} ({res['n_real'] if res['n_real'] is not None else '?'} images)",
             f"Gen Data:  {gen.path.name} ({res['n_gen']} images)", opts.describe(), RULE]
    rows = [("fid", f"{labels['fid']}:"), ("precision", f"Precision ({labels['nn']}):"),
            ("recall", f"Recall ({labels['nn']}):"), ("density", f"Density ({labels['nn']}):"),
            ("coverage", f"Coverage ({labels['nn']}):")]
    kid_name = f"KID ({labels['fd']}):"
    w = max([23] + [len(n) + 1 for _, n in rows] + [len(kid_name) + 1])
    for key, name in rows:
        if key in res:
            lines.append(f"{name:<{w}}{res[key]:.4f}")
        if key == "fid" and "kid_mean" in res:
            lines.append(f"{kid_name:<{w}}{res['kid_mean']:.6f} +- {res['kid_std']:.6f}")
    if "class_accuracy" in res:
        ca = res["class_accuracy"]
        real_txt = f", real {ca['real']:.4f}" if ca.get("real") is not None else ""
        lines.append(f"{'Class accuracy:':<{w}}generated {ca['gen']:.4f}{real_txt}")
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


def write_atomic_npz(path, **arrays):
    """np.savez to a temp file in the same folder, then rename."""
    tmp = Path(str(path) + f".tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None


def check_args(args):
    """Flag ranges and file flags, before anything is read; returns the (unfitted) medical.ReadOptions."""
    for flag in ("batch_size", "pr_k", "dc_k", "kid_subsets"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.num_workers < 0:
        raise UserError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if args.kid_subset_size < 2:
        raise UserError(f"--kid_subset_size must be at least 2, got {args.kid_subset_size}")
    for flag in ("inception_weights", "vgg_weights", "feature_extractor", "classifier"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise UserError(f"--{flag} {value}: no such file")
    if args.save_stats:
        if not args.save_stats.endswith(".npz"):
            raise UserError(f"--save_stats {args.save_stats}: the file name must end with .npz")
        check_writable(args.save_stats, "--save_stats")
    if args.json:
        check_writable(args.json, "--json")
    try:
        return medical.options_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_npz_dims(side, flag):
    """Refuse an .npz written by another network than the standard Inception/VGG16 ones."""
    dims = {"inception": 2048, "vgg": 4096}
    found = [(n, f.shape[1]) for n, f in side.features.items()] + [(n, s[0].size) for n, s in side.stats.items()]
    for net, dim in found:
        if net in dims and dim != dims[net]:
            raise UserError(f"{flag} {side.path} holds {dim}-d {net} statistics/features, but the "
                            f"{net} network gives {dims[net]}-d ones (written with --feature_extractor?)")
        if net == "custom":
            raise UserError(f"{flag} {side.path} holds features of a --feature_extractor network; "
                            "pass the same --feature_extractor")


def fill_features(side, want, get_net, weight_files, args, device, notes, opts):
    """Features of a folder side for the networks in `want`: from the cache (real folders) or one pass."""
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    use_cache = side.role == "real" and not args.no_cache
    fkey = folder_key(side.path, side.files, DECODING, side.sources, opts) if use_cache else None
    todo, feats = [], {}
    for name in sorted(want):
        cached = read_cache(cache_path(cache_dir, fkey, net_identity(name, weight_files[name])), side.n) \
            if fkey else None
        if cached is None:
            todo.append(name)
        else:
            feats[name] = cached
    if feats:
        print(f"{side.role}: cached features of {', '.join(feats)} reused from {cache_dir}", flush=True)
    if todo:
        got = extract(side.sources, {n: get_net(n) for n in todo}, args.batch_size, args.num_workers, device,
                      desc=f"{side.role} features ({side.n} images)", opts=opts)
        for name, arr in got.items():
            err = write_cache(cache_path(cache_dir, fkey, net_identity(name, weight_files[name])), arr) \
                if fkey else None
            if err:
                notes.append(err)
        feats.update(got)
    side.features = feats


def per_class_figures(real, gen, fd_net, nn_net, plan, args, device, notes):
    """The planned metrics for each class both sides hold."""
    per_class, too_few = {}, {}
    if not (real.class_names and gen.class_names):
        return per_class
    only = sorted(set(real.class_names) ^ set(gen.class_names))
    if only:
        notes.append(f"classes in only one set are left out of the per-class figures: {', '.join(only)}")
    for c in [c for c in gen.class_names if c in real.class_names]:
        rm = real.labels == real.class_names.index(c)
        gm = gen.labels == gen.class_names.index(c)
        rf, rs = side_arrays(real, fd_net, nn_net, rm)
        gf, gs = side_arrays(gen, fd_net, nn_net, gm)
        entry = {"n_real": int(rm.sum()), "n_gen": int(gm.sum())}
        for m in plan:
            try:
                entry.update(metric_values(rf, gf, rs, gs, [m], args, device))
            except (ValueError, TypeError):  # too few images in this class for the metric
                too_few.setdefault(m, []).append(c)
        per_class[c] = entry
    for m, classes in too_few.items():
        more = f" and {len(classes) - 8} more" if len(classes) > 8 else ""
        notes.append(f"{m} not computed for {len(classes)} class(es) with too few images: "
                     f"{', '.join(classes[:8])}{more}")
    return per_class


def classifier_classes(clf, real, gen):
    """Class name -> classifier output index (module's `class_names`, else sorted folder names)."""
    names = getattr(clf.module, "class_names", None)
    names = list(names) if names else (real.class_names or gen.class_names)
    unknown = [c for c in gen.class_names if c not in names]
    if unknown:
        raise UserError(f"--classifier: class folder(s) {', '.join(unknown)} of --gen are not among the "
                        f"classifier's classes: {', '.join(names)}")
    return {c: i for i, c in enumerate(names)}


def add_class_accuracy(res, per_class, real, gen, index):
    """Overall and per-class accuracy of the classifier on generated (and real) images."""
    acc_gen, per_gen = classifier_accuracy(gen, gen.features["classifier"], index)
    acc_real, per_real = None, {}
    if "classifier" in real.features and all(c in index for c in real.class_names):
        acc_real, per_real = classifier_accuracy(real, real.features["classifier"], index)
    res["class_accuracy"] = {"gen": acc_gen, "real": acc_real}
    for c in gen.class_names:
        per_class.setdefault(c, {"n_real": 0, "n_gen": int((gen.labels == gen.class_names.index(c)).sum())})
        per_class[c]["class_accuracy_gen"] = per_gen[c]
        if c in per_real:
            per_class[c]["class_accuracy_real"] = per_real[c]


def save_stats(path, real, custom, opts):
    """The real set's statistics and features as an .npz (pytorch-fid's mu/sigma plus feature arrays)."""
    arrays = {"n_images": np.int64(real.n), "intensity": np.array(json.dumps(opts.to_config()))}
    key = "custom" if custom else "inception"
    arrays["mu"], arrays["sigma"] = feature_stats(real.features[key])
    if custom:
        arrays["features"] = real.features["custom"]
    else:
        arrays["inception_features"], arrays["vgg_features"] = real.features["inception"], real.features["vgg"]
    if real.class_names:
        arrays["labels"], arrays["class_names"] = real.labels, np.array(real.class_names)
    write_atomic_npz(path, **arrays)
    print(f"real-set statistics written to {path}")


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


def run(args):
    """Everything after argument parsing; raises UserError for bad input (before heavy work)."""
    t0 = time.time()
    args.real = args.real or REAL_IMAGES_DIR
    args.gen = args.gen or GEN_IMAGES_DIR
    opts = check_args(args)
    device = pick_device(args.device)
    custom = args.feature_extractor is not None
    fd_net, nn_net = ("custom", "custom") if custom else ("inception", "vgg")
    real = load_side("real", args.real, "--real", opts)
    gen = load_side("gen", args.gen, "--gen", opts)
    if not custom:
        check_npz_dims(real, "--real")
        check_npz_dims(gen, "--gen")
    plan, warnings = plan_metrics(args, real, gen, fd_net, nn_net)
    if args.save_stats and real.is_npz:
        raise UserError("--save_stats needs --real to be an image folder (it is an .npz already)")
    if args.classifier and gen.is_npz:
        raise UserError("--classifier needs --gen to be an image folder (the classifier looks at the images)")
    if args.classifier and gen.class_names is None:
        raise UserError("--classifier needs class subfolders in --gen (e.g. gen/digit_0/*.png, as the "
                        "per-class inference scripts write)")
    notes = []
    opts = fit_window(opts, real, gen, notes)  # once, on the real side: both sides are read through it
    notes += opts.notes
    for side in (real, gen):
        if side.files:
            notes += validate_images(side.path, side.sources, side.path.name, opts)

    builders = {"inception": lambda: build_inception(args.inception_weights, args.trust_checkpoint),
                "vgg": lambda: build_vgg(args.vgg_weights, args.trust_checkpoint),
                "custom": lambda: load_torchscript(args.feature_extractor, "--feature_extractor"),
                "classifier": lambda: load_torchscript(args.classifier, "--classifier")}
    weight_files = {"inception": args.inception_weights, "vgg": args.vgg_weights,
                    "custom": args.feature_extractor, "classifier": args.classifier}
    nets = {}

    def get_net(name):
        if name not in nets:
            nets[name] = builders[name]().to(device)
        return nets[name]

    # Networks each folder needs (one decode feeds them all); --save_stats adds both standard ones.
    base = ({fd_net} if any(m in plan for m in ("fid", "kid")) else set()) | \
           ({nn_net} if any(m in plan for m in ("precision", "recall", "density", "coverage")) else set())
    want = {"real": set(base), "gen": set(base)}
    if args.save_stats:
        want["real"] |= {"custom"} if custom else {"inception", "vgg"}
    class_index = None
    if args.classifier:
        class_index = classifier_classes(get_net("classifier"), real, gen)  # checked before extraction
        want["gen"].add("classifier")
        if real.files and real.class_names:
            want["real"].add("classifier")
    for side in (real, gen):
        if not side.is_npz:
            fill_features(side, want[side.role], get_net, weight_files, args, device, notes, opts)

    labels = {"fd": Path(args.feature_extractor).name if custom else "InceptionV3",
              "nn": Path(args.feature_extractor).name if custom else "VGG16"}
    labels["fid"] = f"FD ({labels['fd']})" if custom else "FID (InceptionV3)"
    real_f, real_stats = side_arrays(real, fd_net, nn_net)
    gen_f, gen_stats = side_arrays(gen, fd_net, nn_net)
    try:
        res = metric_values(real_f, gen_f, real_stats, gen_stats, plan, args, device)
    except ValueError as exc:
        raise UserError(f"cannot compute the metrics: {exc}") from None
    res.update(n_real=real.n, n_gen=gen.n, warnings=warnings)
    for side in (real, gen):
        if side.n is not None and side.n < MIN_RELIABLE:
            warnings.append(f"{side.role} set has {side.n} images, fewer than {MIN_RELIABLE:,}: FID is biased "
                            "upwards and unreliable at this size; compare only runs with equal set sizes")
    if real.n is not None and real.n != gen.n:
        warnings.append(f"the sets differ in size ({real.n} real vs {gen.n} generated); FID, KID and "
                        "precision/recall depend on set size")
    per_class = per_class_figures(real, gen, fd_net, nn_net, plan, args, device, notes)
    if class_index is not None:
        add_class_accuracy(res, per_class, real, gen, class_index)
    res["per_class"] = per_class
    res["settings"] = {
        "real": str(real.path.resolve()), "gen": str(gen.path.resolve()), "metrics": plan,
        "batch_size": args.batch_size, "device": str(device), "num_workers": args.num_workers,
        "fd_features": labels["fd"], "nn_features": labels["nn"],
        "feature_extractor": args.feature_extractor, "classifier": args.classifier,
        "inception_weights": args.inception_weights, "vgg_weights": args.vgg_weights,
        "decoding": DECODING, "intensity": opts.to_config(), "pr_k": args.pr_k, "dc_k": args.dc_k,
        "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size, "seed": args.seed,
        "seconds": round(time.time() - t0, 2)}
    print_report(res, labels, real, gen, notes, opts)
    if args.save_stats:
        save_stats(args.save_stats, real, custom, opts)
    if args.json:
        write_json(args.json, res)
    return res


def main(argv=None):
    """Entry point: bad input -> `error: ...` on stderr and exit code 2."""
    args = parse_args(argv)
    if args.scaling is not None:
        print("warning: --scaling is no longer used: every image is decoded by one rule (README, "
              "'How images are read')", file=sys.stderr)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
