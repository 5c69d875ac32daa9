"""FID, precision/recall, KID, density/coverage (and classifier accuracy) between real and generated images.

    cd evaluation
    python precision_recall.py                       # uses REAL_IMAGES_DIR, GEN_IMAGES_DIR, BATCH_SIZE below
    python precision_recall.py --real /data/real --gen ../ldm/samples --metrics fid,precision,recall,kid \
        --json result.json
    python precision_recall.py --real /data/real --gen x --save_stats real_stats.npz   # later: --real real_stats.npz
    python precision_recall.py --real R --gen G --feature_extractor net.pt --classifier cls.pt  # domain networks
    python precision_recall.py --real /data/ct_dicom --gen /data/generated_nifti --intensity_window -160,240
    python precision_recall.py --real heldout/ --gen samples/ --train_dir train/ --bootstrap 200 --floor --tstr \
        --metrics fid,precision,recall,memorization --json r.json     # trust report: r.md + r_gallery.png

--real/--gen take an image folder (recursive; png jpg jpeg bmp tif tiff webp, DICOM .dcm, NIfTI .nii .nii.gz,
any case) or an .npz with `mu`/`sigma` (pytorch-fid format, any dimension: two such files need no network)
and/or `inception_features` / `vgg_features` / `features`. DICOM frames and NIfTI slices count as images; the intensity window
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

import report  # noqa: E402
from report import print_report, write_json  # noqa: E402
from features import (build_inception, build_vgg, cache_path, default_cache_dir, extract,  # noqa: E402
                      folder_key, load_torchscript, net_identity, read_cache, write_cache)
import medical  # noqa: E402
from images import (SCALINGS, UserError, class_layout, list_images, list_sources, pair_layout,  # noqa: E402
                    validate_images)
from imaging import ALL_EXTENSIONS  # noqa: E402
from inception import FID_DIMS  # noqa: E402
from metrics import (density_coverage, feature_stats, frechet_distance, frechet_distance_from_features,  # noqa: E402
                     kid, precision_recall)

ALL_METRICS = ("fid", "precision", "recall", "kid", "density", "coverage")
AUDIT = "memorization"  # not a feature metric: the copy audit against --train_dir (report.py)
DEFAULT_METRICS = "fid,precision,recall"
# How files become pixels: the one rule of imaging.py (recorded in the JSON and in the feature-cache key).
DECODING = ("imaging.py v2: integers / type max, floats in [0,1], ITU-601 luma, antialiased resize; "
            "DICOM / NIfTI slices through the intensity window")
MIN_RELIABLE = 2048


def parse_args(argv=None):
    """Command line; every flag also accepts its dash spelling."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = p.add_argument
    add("--real", default=None, help=f"real image folder or .npz (default REAL_IMAGES_DIR={REAL_IMAGES_DIR})")
    add("--gen", default=None, help=f"generated image folder or .npz (default GEN_IMAGES_DIR={GEN_IMAGES_DIR})")
    add("--batch_size", "--batch-size", type=int, default=BATCH_SIZE, help="images per network batch")
    add("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda if available)")
    add("--metrics", default=None, help=f"comma list of {','.join(ALL_METRICS)},{AUDIT} (default {DEFAULT_METRICS}"
                                        f", plus {AUDIT} with --train_dir)")
    add("--json", default=None, help="also write the results to this JSON file")
    add("--train_dir", "--train-dir", default=None,
        help="the images the model was trained on: memorization audit, TSTR's real-trained baseline")
    add("--false_flag_rate", "--false-flag-rate", type=float, default=0.01,
        help="share of held-out real images (--real) the copy threshold may flag")
    add("--max_shift", "--max-shift", type=int, default=2, help="pixel audit: shifts searched, in pixels")
    add("--audit_size", "--audit-size", type=int, default=64, help="pixel audit: images resized to this side (px)")
    add("--bootstrap", type=int, default=0, help="bootstrap replicates for 95%% intervals of FD, precision, "
                                                 "recall, density, coverage (0 = off)")
    add("--floor", action="store_true", help="real-vs-real reference row: two halves of --real split by patient")
    add("--tstr", action="store_true", help="train on synthetic, test on real: a small classifier (class "
                                            "subfolders) or segmenter (images/ + masks/ folders)")
    add("--tstr_size", "--tstr-size", type=int, default=32, help="TSTR: images resized to this side (px)")
    add("--report", default=None, help="Markdown trust report (default: <json stem>.md when --json is given)")
    add("--num_workers", "--num-workers", type=int, default=min(4, os.cpu_count() or 1),
        help="DataLoader processes decoding images (0 = in the main process)")
    add("--save_stats", "--save-stats", default=None,
        help="write the real set's statistics and features (those the requested metrics computed) to this .npz")
    add("--dims", type=int, choices=FID_DIMS, default=None,
        help="Inception features as pytorch-fid's --dims: 64, 192, 768 or 2048 (pool3, default)")
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
        self.mask_root = None  # masks/ of an images/ + masks/ pair folder (then the images are in images/)
        self.is_npz = self.path.suffix.lower() == ".npz"

    def has(self, net):
        """Features of this network are (or will be) available."""
        return not self.is_npz or net in self.features

    def fd_ok(self, net):
        """Enough for a Frechet distance with this network (pytorch-fid mu/sigma files fit any network)."""
        return self.has(net) or net in self.stats or "any" in self.stats

    def fd_stats(self, net):
        """(mu, sigma) stored for this network, or pytorch-fid-format ones of an unnamed network, or None."""
        return self.stats.get(net) or self.stats.get("any")

    def dim(self, net, fd):
        """Feature dimension an .npz holds for `net` (statistics too when `fd`), None if it holds none."""
        if net in self.features:
            return self.features[net].shape[1]
        stats = self.fd_stats(net) if fd else None
        return None if stats is None else stats[0].size


def load_side(role, path, flag, opts):
    """Check an input and read what is cheap (image / slice list + header check, or the .npz arrays)."""
    side = Side(role, path)
    if not side.path.exists():
        hint = " (edit REAL_IMAGES_DIR/GEN_IMAGES_DIR at the top of precision_recall.py or pass the flag)" \
            if role in ("real", "gen") else ""
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
            # mu/sigma beside `features` or `inception_features` name their network; alone (pytorch-fid's
            # format) they may come from any network: only their dimension has to match the other side's
            net = "custom" if "features" in data else "inception" if "inception_features" in data else "any"
            side.stats[net] = (mu, sigma)
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
    if side.is_npz and role == "train":
        raise UserError(f"{flag} {path}: the training images must be an image folder")
    if not side.path.is_dir():
        raise UserError(f"{flag} {path} is neither an image folder nor an .npz file")
    if pair_layout(side.path):  # images/ + masks/: the metrics look at the images, TSTR also at the masks
        side.mask_root, side.path = side.path / "masks", side.path / "images"
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
    wanted = [m for m in wanted_metrics(args) if m != AUDIT]
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
    if not plan and AUDIT not in wanted_metrics(args):
        raise UserError("none of the requested metrics can be computed from these inputs")
    return plan, warnings


def wanted_metrics(args):
    """--metrics as a list (validated); by default the standard three, plus the audit with --train_dir."""
    default = DEFAULT_METRICS + (f",{AUDIT}" if args.train_dir else "")
    wanted = list(dict.fromkeys(m.strip().lower() for m in (args.metrics or default).split(",") if m.strip()))
    bad = [m for m in wanted if m not in ALL_METRICS + (AUDIT,)]
    if bad or not wanted:
        raise UserError(f"--metrics: unknown {', '.join(bad) or 'empty list'}; choose from "
                        f"{', '.join(ALL_METRICS + (AUDIT,))}")
    return wanted


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
        stats = side.fd_stats(fd_net) if mask is None else None
    return f, stats


def classifier_accuracy(side, logits, class_index):
    """Per-class and overall share of images the classifier assigns to their folder's class."""
    pred = logits.argmax(1)
    target = np.array([class_index[side.class_names[l]] for l in side.labels])
    per = {c: float((pred[side.labels == i] == target[side.labels == i]).mean())
           for i, c in enumerate(side.class_names)}
    return float((pred == target).mean()), per


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
    if args.dims is not None and args.feature_extractor:
        raise UserError("--dims picks Inception features; --feature_extractor gives its own, drop one of them")
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
    if args.report:
        if not args.report.lower().endswith((".md", ".markdown")):
            raise UserError(f"--report {args.report}: the file name must end with .md")
        check_writable(args.report, "--report")
    if args.bootstrap < 0:
        raise UserError(f"--bootstrap must be 0 (off) or more, got {args.bootstrap}")
    if not 0 < args.false_flag_rate < 1:
        raise UserError(f"--false_flag_rate must be between 0 and 1 (e.g. 0.01), got {args.false_flag_rate}")
    if args.max_shift < 0:
        raise UserError(f"--max_shift must be 0 or more, got {args.max_shift}")
    if args.audit_size < 8 or 4 * args.max_shift >= args.audit_size:
        raise UserError(f"--audit_size {args.audit_size}: must be at least 8 and more than 4 x --max_shift "
                        f"({args.max_shift})")
    if args.tstr_size < 8:
        raise UserError(f"--tstr_size must be at least 8, got {args.tstr_size}")
    audit = AUDIT in wanted_metrics(args)
    if audit and not args.train_dir:
        raise UserError(f"--metrics {AUDIT} needs --train_dir DIR: the images the model was trained on")
    try:
        return medical.options_from_args(args)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def pick_networks(custom, real, gen):
    """(FD network, nearest-neighbour network): the user's extractor, else what two .npz files share, else
    Inception and VGG16."""
    if custom:
        return "custom", "custom"
    if real.is_npz and gen.is_npz:  # no network runs: use the arrays the two files have in common
        both = lambda net, fd: all(net in s.features or (fd and net in s.stats) for s in (real, gen))  # noqa: E731
        return ("custom" if both("custom", True) else "inception"), ("custom" if both("custom", False) else "vgg")
    return "inception", "vgg"


def check_dims(real, gen, fd_net, nn_net, args):
    """Both sides must give features of one dimension per network; one line naming the file(s) if not."""
    given = {"inception": args.dims or 2048, "vgg": 4096, "custom": None}  # what a folder side gets
    names = {"inception": f"Inception network (--dims {args.dims or 2048})", "vgg": "VGG16 network"}
    for side, other in ((real, gen), (gen, real)):
        only_custom = side.is_npz and set(side.features) | set(side.stats) == {"custom"}
        if only_custom and not other.is_npz and fd_net != "custom":
            raise UserError(f"--{side.role} {side.path} holds features of a --feature_extractor network; "
                            "pass the same --feature_extractor")
    for net, fd in dict.fromkeys([(fd_net, True), (nn_net, False)]):
        dims = [s.dim(net, fd) if s.is_npz else given[net] for s in (real, gen)]
        if None in dims or dims[0] == dims[1]:
            continue
        kind = "statistics/features" if fd else "features"
        if real.is_npz and gen.is_npz:
            raise UserError(f"--real {real.path} holds {dims[0]}-d {kind} but --gen {gen.path} holds {dims[1]}-d "
                            "ones: both files must come from the same network (and --dims)")
        side, d_npz, d_net = (real, dims[0], dims[1]) if real.is_npz else (gen, dims[1], dims[0])
        hint = (f"; pass --dims {d_npz}" if net == "inception" and d_npz in FID_DIMS else
                " (written with --feature_extractor? pass the same one)")
        raise UserError(f"--{side.role} {side.path} holds {d_npz}-d {kind}, but the {names[net]} gives "
                        f"{d_net}-d ones{hint}")


def check_extracted_dims(real, gen, nets):
    """After a --feature_extractor pass: its features must have the dimension an .npz side holds."""
    for net, fd in nets:
        dims = [s.features[net].shape[1] if net in s.features else s.dim(net, fd) for s in (real, gen)]
        if None not in dims and dims[0] != dims[1]:
            npz = real if real.is_npz else gen
            raise UserError(f"--{npz.role} {npz.path} holds {dims[0] if npz is real else dims[1]}-d features, but "
                            f"--feature_extractor gives {dims[1] if npz is real else dims[0]}-d ones; pass the "
                            "extractor that wrote the file")


def metric_labels(args, real, gen, fd_net, nn_net):
    """Names of the feature spaces for the report: the extractor's file, Inception (with --dims), VGG16, or
    the dimension two .npz files share."""
    if args.feature_extractor:
        name = Path(args.feature_extractor).name
        return {"fd": name, "nn": name, "fid": f"FD ({name})"}
    d = real_dim(real, gen, fd_net)
    if real.is_npz and gen.is_npz and (fd_net != "inception" or d != 2048):
        fd = f".npz, {d}-d" if d else ".npz"
        nd = next((s.dim(nn_net, False) for s in (real, gen) if s.dim(nn_net, False)), None)
        return {"fd": fd, "nn": f".npz, {nd}-d" if nd else ".npz", "fid": f"FD ({fd})"}
    fd = "InceptionV3" if d in (None, 2048) else f"InceptionV3 {d}-d"
    return {"fd": fd, "nn": "VGG16", "fid": f"FID ({fd})"}


def real_dim(real, gen, fd_net):
    """Dimension of the FD features (either side's, they match), None if neither side has any."""
    for side in (real, gen):
        if fd_net in side.features:
            return int(side.features[fd_net].shape[1])
    for side in (real, gen):
        if side.fd_stats(fd_net) is not None:
            return int(side.fd_stats(fd_net)[0].size)
    return None


def fill_features(side, want, get_net, weight_files, args, device, notes, opts):
    """Features of a folder side for the networks in `want`: from the cache (real / train folders) or one pass."""
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    use_cache = side.role in ("real", "train") and not args.no_cache
    fkey = folder_key(side.path, side.files, DECODING, side.sources, opts) if use_cache else None
    dims = {"inception": args.dims or 2048}
    todo, feats = [], {}
    for name in sorted(want):
        cached = read_cache(cache_path(cache_dir, fkey, net_identity(name, weight_files[name], dims.get(name))),
                            side.n) if fkey else None
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
            err = write_cache(cache_path(cache_dir, fkey, net_identity(name, weight_files[name], dims.get(name))),
                              arr) if fkey else None
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


def save_stats(path, real, custom, opts, dims):
    """The real set's statistics and features as an .npz (pytorch-fid's mu/sigma plus feature arrays): those
    the requested metrics computed (FID alone: Inception only, no VGG16 needed)."""
    arrays = {"n_images": np.int64(real.n), "intensity": np.array(json.dumps(opts.to_config()))}
    key = "custom" if custom else "inception"
    if key in real.features and real.n >= 2:
        arrays["mu"], arrays["sigma"] = feature_stats(real.features[key])
    if custom:
        arrays["features"] = real.features["custom"]
    else:
        for net in ("inception", "vgg"):
            if net in real.features:
                arrays[f"{net}_features"] = real.features[net]
        if "inception" in real.features:
            arrays["dims"] = np.int64(dims)
    if real.class_names:
        arrays["labels"], arrays["class_names"] = real.labels, np.array(real.class_names)
    write_atomic_npz(path, **arrays)
    print(f"real-set statistics written to {path}")


def output_paths(args):
    """(report .md, gallery .png) paths: --report, else next to --json as <stem>.md and <stem>_gallery.png."""
    rep = args.report or (str(Path(args.json).with_suffix(".md")) if args.json else None)
    base = args.json or rep
    gallery = str(Path(base).with_name(Path(base).stem + "_gallery.png")) if base else None
    return rep, gallery


def check_trust(args, real, gen, train, plan, audit):
    """The trust-report flags against the inputs, before any heavy work."""
    if audit:
        for side, flag in ((real, "--real"), (gen, "--gen")):
            if side.is_npz:
                raise UserError(f"--metrics {AUDIT} needs {flag} to be an image folder (the audit compares "
                                "images; the held-out real images calibrate the threshold)")
    if args.floor:
        if not plan:
            raise UserError(f"--floor needs a feature metric in --metrics ({', '.join(ALL_METRICS)})")
        if real.is_npz and not real.features:
            raise UserError(f"--floor needs the real images' features: --real {real.path} holds only mu/sigma")
    if args.bootstrap and not any(m in plan for m in report.INTERVAL_METRICS):
        raise UserError(f"--bootstrap gives intervals of {', '.join(report.INTERVAL_METRICS)}; --metrics names "
                        "none of them")
    if args.tstr:
        for side, flag in ((real, "--real"), (gen, "--gen")):
            if side.is_npz:
                raise UserError(f"--tstr needs {flag} to be an image folder")
        task = report.tstr_task(real, gen, None)
        if task is None:
            raise UserError("--tstr needs class subfolders in --gen and --real (e.g. gen/digit_0/*.png) or image/"
                            "mask pair folders (DIR/images + DIR/masks) on both sides")
        if train is not None and report.tstr_task(real, gen, train) != task:
            raise UserError(f"--tstr: --train_dir {train.path} must be laid out like --gen and --real ("
                            f"{'class subfolders' if task == 'classification' else 'images/ + masks/'})")
        if task == "classification":
            report.check_classes(real, gen, train)
        else:
            for side in (real, gen, train):
                if side is not None:
                    report.pair_masks(side.mask_root.parent, side.files)  # every image has its mask


def run(args):
    """Everything after argument parsing; raises UserError for bad input (before heavy work)."""
    t0 = time.time()
    args.real = args.real or REAL_IMAGES_DIR
    args.gen = args.gen or GEN_IMAGES_DIR
    opts = check_args(args)
    device = pick_device(args.device)
    custom = args.feature_extractor is not None
    audit = AUDIT in wanted_metrics(args)
    real = load_side("real", args.real, "--real", opts)
    gen = load_side("gen", args.gen, "--gen", opts)
    train = load_side("train", args.train_dir, "--train_dir", opts) if args.train_dir else None
    fd_net, nn_net = pick_networks(custom, real, gen)
    check_dims(real, gen, fd_net, nn_net, args)
    plan, warnings = plan_metrics(args, real, gen, fd_net, nn_net)
    if args.save_stats and real.is_npz:
        raise UserError("--save_stats needs --real to be an image folder (it is an .npz already)")
    if args.save_stats and not plan:
        raise UserError("--save_stats saves the features the metrics compute; --metrics names none of "
                        f"{', '.join(ALL_METRICS)}")
    if args.classifier and gen.is_npz:
        raise UserError("--classifier needs --gen to be an image folder (the classifier looks at the images)")
    if args.classifier and gen.class_names is None:
        raise UserError("--classifier needs class subfolders in --gen (e.g. gen/digit_0/*.png, as the "
                        "per-class inference scripts write)")
    check_trust(args, real, gen, train, plan, audit)
    report_path, gallery_path = output_paths(args)
    notes = []
    opts = fit_window(opts, real, gen, notes)  # once, on the real side: both sides are read through it
    notes += opts.notes
    for side in (real, gen, train):
        if side is not None and side.files:
            notes += validate_images(side.path, side.sources, side.path.name, opts)

    dims = args.dims or 2048
    builders = {"inception": lambda: build_inception(args.inception_weights, args.trust_checkpoint, dims),
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

    # Networks each folder needs (one decode feeds them all); --save_stats saves what these compute.
    base = ({fd_net} if any(m in plan for m in ("fid", "kid")) else set()) | \
           ({nn_net} if any(m in plan for m in ("precision", "recall", "density", "coverage")) else set())
    want = {"real": set(base), "gen": set(base), "train": set()}
    # The feature-space audit runs in a space the run computes anyway (the extractor's, else FD's, else k-NN's).
    audit_net = None
    if audit:
        audit_net = "custom" if custom else fd_net if fd_net in base else nn_net if nn_net in base else None
        for role in want:
            want[role] |= {audit_net} if audit_net else set()
    class_index = None
    if args.classifier:
        class_index = classifier_classes(get_net("classifier"), real, gen)  # checked before extraction
        want["gen"].add("classifier")
        if real.files and real.class_names:
            want["real"].add("classifier")
    for side in (real, gen, train):
        if side is not None and not side.is_npz:
            fill_features(side, want[side.role], get_net, weight_files, args, device, notes, opts)
    if custom:
        check_extracted_dims(real, gen, [("custom", True)])

    labels = metric_labels(args, real, gen, fd_net, nn_net)
    real_f, real_stats = side_arrays(real, fd_net, nn_net)
    gen_f, gen_stats = side_arrays(gen, fd_net, nn_net)
    try:
        res = metric_values(real_f, gen_f, real_stats, gen_stats, plan, args, device)
    except ValueError as exc:
        raise UserError(f"cannot compute the metrics: {exc}") from None
    res.update(n_real=real.n, n_gen=gen.n, warnings=warnings)
    for side in (real, gen):
        if side.n is not None and side.n < MIN_RELIABLE and plan:
            warnings.append(f"{side.role} set has {side.n} images, fewer than {MIN_RELIABLE:,}: FID is biased "
                            "upwards and unreliable at this size; compare only runs with equal set sizes")
    if real.n is not None and real.n != gen.n and plan:
        warnings.append(f"the sets differ in size ({real.n} real vs {gen.n} generated); FID, KID and "
                        "precision/recall depend on set size")
    if args.bootstrap:
        res["intervals"] = report.intervals(real_f, gen_f, plan, args, device, warnings)
    if args.floor:
        res["floor"] = report.floor(real, fd_net, nn_net, plan, opts, metric_values, args, device)
        if res["floor"]["skipped"]:
            notes.append(f"floor: {', '.join(res['floor']['skipped'])} not computable on the halves (too few images)")
    gallery = None
    if audit:
        res["memorization"], gallery = report.audit(args, real, gen, train, opts, device, audit_net)
        warnings += [f"memorization: {w}" for w in res["memorization"].get("warnings", [])]
        if not gallery_path:
            notes.append("no gallery of the closest pairs written: pass --json or --report")
    if args.tstr:
        res["tstr"] = report.run_tstr(args, real, gen, train, opts, device)
        if train is None:
            notes.append("TSTR: pass --train_dir for the same network trained on real images beside it")
    warnings += report.size_lines(res, plan, args, real_dim(real, gen, fd_net))
    per_class = per_class_figures(real, gen, fd_net, nn_net, plan, args, device, notes)
    if class_index is not None:
        add_class_accuracy(res, per_class, real, gen, class_index)
    res["per_class"] = per_class
    res["settings"] = {
        "real": str(real.path.resolve()), "gen": str(gen.path.resolve()), "metrics": plan + [AUDIT] * audit,
        "train_dir": str(train.path.resolve()) if train else None,
        "batch_size": args.batch_size, "device": str(device), "num_workers": args.num_workers,
        "fd_features": labels["fd"], "nn_features": labels["nn"], "dims": real_dim(real, gen, fd_net),
        "feature_extractor": args.feature_extractor, "classifier": args.classifier,
        "inception_weights": args.inception_weights, "vgg_weights": args.vgg_weights,
        "decoding": DECODING, "intensity": opts.to_config(), "pr_k": args.pr_k, "dc_k": args.dc_k,
        "kid_subsets": args.kid_subsets, "kid_subset_size": args.kid_subset_size, "seed": args.seed,
        "bootstrap": args.bootstrap, "floor": args.floor, "tstr": args.tstr,
        "false_flag_rate": args.false_flag_rate if audit else None, "max_shift": args.max_shift if audit else None,
        "audit_size": args.audit_size if audit else None, "seconds": round(time.time() - t0, 2)}
    print_report(res, labels, real, gen, notes, opts)
    if args.save_stats:
        save_stats(args.save_stats, real, custom, opts, dims)
    if gallery is not None and gallery_path:
        res["gallery"] = report.save_gallery(*gallery, res["memorization"], gallery_path)
        print(f"closest pairs (generated | training) written to {res['gallery']}")
    res = report.np_float(res)
    if args.json:
        write_json(args.json, res)
    if report_path:
        res["report"] = report.write_report(res, report_path)
        print(f"trust report written to {res['report']}")
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
