"""Train a pixel-space DDPM (class-conditional by default, `--unconditional` otherwise).

    cd ddpm
    python train.py --dataset-path /path/to/class_folders --image-size 64 --epochs 300 --batch-size 14
    torchrun --nnodes=1 --nproc_per_node=4 train.py --dataset-path /path/to/data --image-size 64
    python train.py --dataset-path /path/to/data --resume            # continue models/<run_name>/

DICOM / NIfTI / 16-bit data: `--intensity-window -160,240` (or a preset, `auto` by default), `--slice-axis`,
`--slice-range` (medical.py); the window is fitted once on the data and stored in every checkpoint.

One process (GPU or CPU) or torchrun DDP (nccl on GPU, gloo on CPU). Writes, under --work-dir (default .):
    models/<run_name>/ckpt.pt, ema_ckpt.pt   plain model state dicts (torch.load + load_state_dict)
    models/<run_name>/train_state.pt         everything --resume needs (optimizer, EMA, step, RNG, config)
    models/<run_name>/config.json            architecture + class names, read by inference.py
    models/<run_name>/log.txt, results/<run_name>/*.png (sample grids), runs/<run_name>/ (TensorBoard)
    results/<run_name>/progress.gif           the sample grids animated (same seeds every time), rebuilt per grid
    models/<run_name>/posthoc_ema/phema_*.pt  with --posthoc-ema-every-steps N: post-hoc EMA snapshots (EDM2);
        python posthoc_ema.py --snapshots models/<run_name>/posthoc_ema --sigma_rel 0.08 \
            --checkpoint models/<run_name>/ema_ckpt.pt        # -> ema_ckpt_phema0.080_step<N>.pt beside it
Objective: --prediction-type epsilon | v_prediction, --snr-gamma G (min-SNR-gamma loss weights, 0 = off).
The spec's entry points (ddpm.py, ddpm_conditional.py, ddpm_conditional_ddp.py) call train() below.
Everything that is not DDPM-specific (flags, checkpoint I/O, seeds, precision, stop flags, EMA) is the
vendored runtime.py.
"""
import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import animation
import conditional as cond_lib
import medical
import posthoc_ema
import runtime as rt
from conditional import PAIRED_TASKS
from dataset import ImageFolderDataset, flip_mask
from models import SAMPLERS, Diffusion, UNet, UNet_conditional, check_sampler
from paired import PairedDataset
from runtime import UserError
from utils import MODEL_TYPE, save_grid

# The one place that holds the training defaults (flags default to None = "take this, or the stored
# value when resuming").
BASE_SETTINGS = dict(
    run_name=None, work_dir=".", data_root=None, image_size=64, channels="auto", base_channels=64, time_dim=256,
    noise_steps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02, num_epochs=300, max_train_steps=0,
    batch_size=14, learning_rate=3e-4, weight_decay=0.01, lr_schedule="constant", warmup_steps=0, grad_clip=1.0,
    ema_decay=0.995, ema_start=2000, cfg_dropout=0.1, random_flip=False, mixed_precision="no", seed=42,
    ckpt_every_steps=0, ckpt_every_epochs=1, sample_every_epochs=10, grid_images=16, max_minutes=0.0,
    sampler="ddpm", sampling_steps=None, cfg_scale=3.0, log_every_steps=50, num_workers=None, device="auto",
    compile=False, channels_last=False, num_classes=None,
    intensity_window="auto", slice_axis="axial", slice_range=None, group_regex=None, window_16bit=False,
    # image-conditioned tasks (conditional.py): what is generated from what, and how the UNet sees it
    task="generate", prediction_type=None, cond_mode="concat", num_mask_classes=2, cond_dropout=0.1,
    mask_ablation=0.0, sr_factor=4, sr_filter="bicubic", images_folder="images", masks_folder="masks",
    lowres_folder=None, image_prefix="", mask_prefix="", skip_unpaired=False, class_labels_csv=None,
    # objective and weight averaging (issue 18); runs stored before these existed had these values
    snr_gamma=0.0, posthoc_ema_every_steps=0, posthoc_ema_sigma_rels="0.05,0.1",
)
# Settings that define the network / noise process: a resumed run must keep them.
ARCH_KEYS = ("image_size", "channels", "base_channels", "time_dim", "noise_steps", "schedule", "beta_start",
             "beta_end", "num_classes", "conditional", "task", "prediction_type", "cond_mode", "num_mask_classes",
             "sr_factor", "sr_filter")
# Settings that define the optimisation trajectory: kept from the stored run on resume (a warning says so).
TRAJECTORY_KEYS = ("batch_size", "learning_rate", "weight_decay", "lr_schedule", "warmup_steps", "grad_clip",
                   "ema_decay", "ema_start", "cfg_dropout", "random_flip", "seed", "mixed_precision", "cond_dropout",
                   "mask_ablation", "snr_gamma", "posthoc_ema_every_steps", "posthoc_ema_sigma_rels")
# How files are read (medical.add_read_flags): a resumed run keeps the stored window (a warning says so).
READ_KEYS = ("intensity_window", "slice_axis", "slice_range", "group_regex", "window_16bit")
# Settings a resumed run may change (data location, length, cadences, outputs, speed).
RESUME_OVERRIDES = ("data_root", "num_epochs", "max_train_steps", "ckpt_every_steps", "ckpt_every_epochs",
                    "sample_every_epochs", "grid_images", "sampler", "sampling_steps", "cfg_scale",
                    "log_every_steps", "max_minutes", "num_workers", "device", "compile", "channels_last", "work_dir",
                    "images_folder", "masks_folder", "lowres_folder", "image_prefix", "mask_prefix", "skip_unpaired",
                    "class_labels_csv")
# Attribute names of the spec's launch() (args.dataset_path, args.epochs, args.lr) and of configs stored
# before the shared flag vocabulary -> today's names.
LEGACY_NAMES = {"dataset_path": "data_root", "data_path": "data_root", "epochs": "num_epochs", "lr": "learning_rate",
                "train_batch_size": "batch_size", "save_every_steps": "ckpt_every_steps",
                "save_every_epochs": "ckpt_every_epochs", "sample_every": "sample_every_epochs",
                "log_every": "log_every_steps"}
# How an error names a setting: the spec's spelling where the DDPM spec has one.
SPEC_FLAGS = {"data_root": "--dataset-path", "num_epochs": "--epochs", "learning_rate": "--lr"}


def flag(key):
    """The command-line spelling that names setting `key` in messages."""
    return SPEC_FLAGS.get(key, "--" + key.replace("_", "-"))


def add_train_args(p):
    """Training flags on a runtime.FlagParser (every flag in both --dash-case and --snake_case)."""
    add = p.add_argument
    add("--data_root", aliases=["dataset_path", "data_path"],
        help="class folders (conditional) or any image folder (unconditional)")
    add("--run_name", help="run folder name under models/ (default DDPM_conditional / DDPM_Unconditional)")
    add("--work_dir", help="root for models/, results/, runs/ (default: current folder)")
    add("--unconditional", action="store_true", default=None, help="train without class labels")
    add("--num_classes", type=int, help="must match the number of class folders (default: counted)")
    add("--image_size", type=int, help="square side in pixels, divisible by 8 (default 64)")
    add("--channels", choices=["auto", "1", "3"], help="image channels; auto = 1 if all images are grayscale")
    add("--base_channels", type=int, help="UNet base width (default 64 -> widths 64/128/256)")
    add("--time_dim", type=int, help="time/class embedding size (default 256)")
    add("--noise_steps", type=int, help="diffusion steps T (default 1000)")
    add("--schedule", choices=["linear", "cosine"], help="beta schedule (default linear)")
    add("--num_epochs", aliases=["epochs"], type=int, help="total epochs of the run (default 300)")
    add("--max_train_steps", type=int, help="stop after this many optimizer steps in all; 0 = epochs decide")
    add("--batch_size", aliases=["train_batch_size"], type=int, help="images per process per step (default 14)")
    add("--learning_rate", aliases=["lr"], type=float, help="AdamW learning rate (default 3e-4)")
    add("--weight_decay", type=float, help="AdamW weight decay (default 0.01)")
    add("--lr_schedule", choices=["constant", "cosine"], help="after warmup (default constant)")
    add("--warmup_steps", aliases=["lr_warmup_steps"], type=int, help="linear LR warmup steps (default 0)")
    add("--grad_clip", aliases=["max_grad_norm"], type=float, help="max gradient norm, 0 = off (default 1.0)")
    add("--ema_decay", type=float, help="EMA decay per step (default 0.995)")
    add("--ema_start", type=int, help="steps during which the EMA copies the weights (default 2000)")
    add("--snr_gamma", type=float, help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0 = plain MSE "
        "(default 0)")
    add("--cfg_dropout", type=float, help="probability a label is replaced by 'no class' (default 0.1)")
    add("--random_flip", action="store_true", default=None, help="random horizontal flips (default off)")
    add("--no_random_flip", dest="random_flip", action="store_false", default=None, help="no flips (the default)")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], help="autocast precision (default no)")
    add("--seed", type=int, help="global seed (default 42); rank r uses seed*world_size+r")
    add("--ckpt_every_steps", aliases=["save_every_steps", "ckpt_every", "save_every"], type=int,
        help="also checkpoint every N steps (mid-epoch; 0 = off)")
    add("--ckpt_every_epochs", aliases=["save_every_epochs"], type=int, help="checkpoint every N epochs (default 1)")
    add("--sample_every_epochs", aliases=["sample_every"], type=int,
        help="sample grid every N epochs, 0 = never (default 10)")
    add("--grid_images", type=int, help="images in each sample grid (default 16)")
    add("--sampler", choices=list(SAMPLERS), help="sampler for the grids: ddpm (default), ddim or dpmsolver")
    add("--sampling_steps", type=int, help="grid sampling steps (default: T for ddpm, 50 for ddim, 25 for dpmsolver)")
    add("--cfg_scale", type=float, help="guidance scale of the grids (default 3)")
    add("--max_minutes", type=float, help="stop (checkpoint, exit 0) after this much training time; 0 = off")
    add("--log_every_steps", aliases=["log_every"], type=int, help="log line every N steps (default 50)")
    add("--num_workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on GPU)")
    add("--device", help="auto (default), cpu, cuda")
    add("--compile", action="store_true", default=None, help="torch.compile the UNet")
    add("--channels_last", action="store_true", default=None, help="channels_last memory format")
    cond_lib.add_task_args(p)
    rt.add_resume_flag(p)
    add("--trust_checkpoint", action="store_true", help="allow loading a pickled (non-plain) checkpoint")
    medical.add_read_flags(p)  # --intensity_window, --slice_axis, --slice_range, --group_regex
    posthoc_ema.add_flags(p)  # --posthoc_ema_every_steps, --posthoc_ema_sigma_rels
    for action in p._actions:  # None = BASE_SETTINGS, or the stored run's (not set_defaults: launch() overrides)
        if action.dest in READ_KEYS or action.dest.startswith("posthoc_ema_"):
            action.default = None
    return p


def build_parser():
    """Parser of `python train.py`."""
    return add_train_args(rt.FlagParser(description="Train a pixel-space DDPM."))


def default_args(conditional=True):
    """Namespace with every training setting at its parser default (for launch() functions)."""
    args = build_parser().parse_args([])
    args.unconditional = not conditional
    return args


# ---------------------------------------------------------------- configuration
def given_settings(args):
    """The settings set on args (not None), legacy attribute names (launch()'s args.epochs) mapped to today's."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    for old, new in LEGACY_NAMES.items():
        if old in given:
            value = given.pop(old)
            given.setdefault(new, value)  # today's name wins: it is the command-line override of launch()
    return given


def sigma_rels_text(text):
    """--posthoc-ema-sigma-rels in one spelling ("0.05,0.10" -> "0.05,0.1"); UserError naming the flag."""
    return ",".join(f"{v:g}" for v in posthoc_ema.parse_sigma_rels(text, "--posthoc-ema-sigma-rels"))


def resolve_config(args, stored=None):
    """Merge flags, defaults and (on resume) the stored config into one plain dict; validate ranges."""
    given = given_settings(args)
    if "posthoc_ema_sigma_rels" in given:  # one spelling, so that a resume compares values, not strings
        given["posthoc_ema_sigma_rels"] = sigma_rels_text(given["posthoc_ema_sigma_rels"])
    task = given.get("task") or (stored or {}).get("task") or "generate"
    conditional = not bool(given.get("unconditional", False))
    if task != "generate":  # the other tasks take class labels from a CSV of stems
        if given.get("unconditional") and given.get("class_labels_csv"):
            raise UserError("--unconditional and --class-labels-csv contradict each other; drop one")
        conditional = bool(given.get("class_labels_csv") or (stored or {}).get("class_labels_csv"))
    cfg = dict(BASE_SETTINGS)
    cfg["conditional"] = conditional
    warnings = []
    if stored is not None:
        stored = {LEGACY_NAMES.get(k, k): v for k, v in stored.items()}
        stored = {**BASE_SETTINGS, **stored}  # runs stored before a setting existed had its default
        stored["prediction_type"] = stored["prediction_type"] or "epsilon"
        if given.get("unconditional") and stored["conditional"] and task == "generate":
            raise UserError("--unconditional disagrees with the run being resumed, which is class-conditional")
        for k in ARCH_KEYS:
            if k in given and k != "conditional" and str(given[k]) != str(stored[k]) and \
                    not (k == "channels" and given[k] == "auto"):
                raise UserError(f"{flag(k)} {given[k]} disagrees with the run being resumed, which has "
                                f"{k}={stored[k]}; drop the flag or start a new --run-name")
        for k in TRAJECTORY_KEYS:
            if k in given and given[k] != stored.get(k, BASE_SETTINGS[k]):
                warnings.append(f"warning: {flag(k)} {given[k]} ignored on resume; the run keeps "
                                f"{k}={stored.get(k, BASE_SETTINGS[k])} (needed to continue it exactly)")
        cfg.update(stored)
        cfg.update({k: given[k] for k in RESUME_OVERRIDES if k in given})
    else:
        cfg.update({k: v for k, v in given.items() if k in BASE_SETTINGS})
        cfg["conditional"] = conditional
    if not cfg.get("run_name"):
        cfg["run_name"] = default_run_name(cfg["task"], conditional)
    if not cfg.get("data_root"):
        raise UserError("--dataset-path is required (a folder of class folders, or of images with --unconditional)")
    if not cfg.get("prediction_type"):  # older runs: epsilon
        cfg["prediction_type"] = "epsilon" if cfg["task"] == "generate" or stored is not None else "v_prediction"
    cond_lib.check_task_settings(cfg)
    checks = [("image_size", cfg["image_size"] >= 8 and cfg["image_size"] % 8 == 0,
               "must be a positive multiple of 8 (the UNet halves it 3 times), e.g. 32, 64, 128"),
              ("num_epochs", cfg["num_epochs"] >= 1, "must be >= 1"),
              ("max_train_steps", cfg["max_train_steps"] >= 0, "must be >= 0"),
              ("batch_size", cfg["batch_size"] >= 1, "must be >= 1"),
              ("learning_rate", cfg["learning_rate"] > 0, "must be > 0"),
              ("base_channels", cfg["base_channels"] >= 4 and cfg["base_channels"] % 4 == 0,
               "must be a multiple of 4, >= 4"),
              ("time_dim", cfg["time_dim"] >= 4, "must be >= 4"),
              ("noise_steps", cfg["noise_steps"] >= 2, "must be >= 2"),
              ("cfg_dropout", 0.0 <= cfg["cfg_dropout"] < 1.0, "must be in [0, 1)"),
              ("ema_decay", 0.0 <= cfg["ema_decay"] < 1.0, "must be in [0, 1)"),
              ("ema_start", cfg["ema_start"] >= 0, "must be >= 0"),
              ("snr_gamma", cfg["snr_gamma"] >= 0, "must be >= 0 (0 = off; the min-SNR paper uses 5)"),
              ("posthoc_ema_every_steps", cfg["posthoc_ema_every_steps"] >= 0, "must be >= 0 (0 = off)"),
              ("warmup_steps", cfg["warmup_steps"] >= 0, "must be >= 0"),
              ("grad_clip", cfg["grad_clip"] >= 0, "must be >= 0"),
              ("ckpt_every_steps", cfg["ckpt_every_steps"] >= 0, "must be >= 0"),
              ("ckpt_every_epochs", cfg["ckpt_every_epochs"] >= 1, "must be >= 1"),
              ("sample_every_epochs", cfg["sample_every_epochs"] >= 0, "must be >= 0"),
              ("grid_images", cfg["grid_images"] >= 1, "must be >= 1"),
              ("log_every_steps", cfg["log_every_steps"] >= 1, "must be >= 1"),
              ("max_minutes", cfg["max_minutes"] >= 0, "must be >= 0"),
              ("num_classes", cfg["num_classes"] is None or cfg["num_classes"] >= 1, "must be >= 1"),
              ("num_workers", cfg["num_workers"] is None or cfg["num_workers"] >= 0, "must be >= 0")]
    for key, ok, msg in checks:
        if not ok:
            raise UserError(f"{flag(key)} {cfg[key]} {msg}")
    check_sampler(cfg["sampler"])
    cfg["posthoc_ema_sigma_rels"] = sigma_rels_text(cfg["posthoc_ema_sigma_rels"])
    if cfg["sampling_steps"] is not None and not 1 <= cfg["sampling_steps"] <= cfg["noise_steps"]:
        raise UserError(f"--sampling-steps {cfg['sampling_steps']} must be between 1 and --noise-steps "
                        f"{cfg['noise_steps']}")
    cfg["data_root"] = str(cfg["data_root"])
    return cfg, warnings


def default_run_name(task, conditional):
    """models/<run_name>/ when --run-name is not given: today's two names, or DDPM_<task>."""
    if task == "generate":
        return "DDPM_conditional" if conditional else "DDPM_Unconditional"
    return f"DDPM_{task}"


def read_options(settings):
    """medical.ReadOptions of the read settings (--intensity-window ...); UserError naming a bad flag."""
    try:
        return medical.options_from_args(argparse.Namespace(**{k: settings.get(k, BASE_SETTINGS[k])
                                                               for k in READ_KEYS}))
    except ValueError as e:
        raise UserError(str(e)) from None


def prepare_run(args):
    """Check every input before any heavy work or writing -> (cfg, warnings, dataset, stored state, paths)."""
    work_dir = Path(getattr(args, "work_dir", None) or BASE_SETTINGS["work_dir"])
    conditional = not bool(getattr(args, "unconditional", False))
    task = getattr(args, "task", None) or "generate"
    run_name = getattr(args, "run_name", None) or default_run_name(task, conditional)
    run_dir = work_dir / "models" / run_name
    paths = {"run": run_dir, "ckpt": run_dir / "ckpt.pt", "ema": run_dir / "ema_ckpt.pt",
             "state": run_dir / "train_state.pt", "config": run_dir / "config.json",
             "posthoc_ema": run_dir / "posthoc_ema",
             "results": work_dir / "results" / run_name, "tensorboard": work_dir / "runs" / run_name}
    resume = {True: "auto", False: None}.get(getattr(args, "resume", None), getattr(args, "resume", None))
    given_read = read_options(given_settings(args))  # a bad --intensity-window is named before anything is loaded
    stored = None
    if resume is not None:
        paths["resume_from"] = rt.resolve_resume(resume, paths["state"])
        stored = rt.load_checkpoint(paths["resume_from"], getattr(args, "trust_checkpoint", False),
                                    expect_type=MODEL_TYPE)
    elif paths["state"].exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                        f"--run-name")
    cfg, warnings = resolve_config(args, stored["config"] if stored else None)
    cfg["run_name"], cfg["work_dir"] = run_name, str(work_dir)
    # A new run fits the window on its data once; a resumed run reads with the stored one (older runs: none).
    stored_window = stored["config"].get("intensity") if stored is not None else None
    try:  # a read flag that disagrees with the resumed run is refused (medical.resume_options)
        opts = medical.resume_options(given_read, stored_window) if stored_window else read_options(cfg)
    except ValueError as e:
        raise UserError(f"--resume: {e}") from None
    if cfg["task"] == "generate":
        dataset = ImageFolderDataset(cfg["data_root"], cfg["image_size"], cfg["channels"], cfg["conditional"],
                                     cfg["num_classes"], opts, fit=not stored_window)
    else:
        dataset = PairedDataset(
            cfg["task"], cfg["data_root"], cfg["image_size"], cfg["channels"], cfg["num_mask_classes"],
            cfg["images_folder"], cfg["masks_folder"], cfg["lowres_folder"], cfg["image_prefix"], cfg["mask_prefix"],
            cfg["skip_unpaired"], cfg["sr_factor"], cfg["sr_filter"], cfg["class_labels_csv"],
            stored["class_names"] if stored is not None else None, opts, fit=not stored_window)
        warnings += getattr(dataset, "warnings", [])
    if stored is not None and dataset.class_names != stored["class_names"]:
        raise UserError(f"the classes of {cfg['data_root']} ({', '.join(dataset.class_names[:10])}) differ from "
                        f"the run being resumed ({', '.join(stored['class_names'][:10])})")
    cfg["channels"] = dataset.channels
    cfg["num_classes"] = len(dataset.class_names) if cfg["conditional"] else None
    cfg["intensity"] = dataset.opts.to_config()  # in every checkpoint: inference maps outputs back through it
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if len(dataset) // world < cfg["batch_size"]:
        raise UserError(f"{cfg['data_root']} has {len(dataset)} images: too few for --batch-size "
                        f"{cfg['batch_size']} on {world} process(es); lower --batch-size")
    for d in (run_dir, paths["results"], paths["tensorboard"]):
        rt.check_writable(d)
    return cfg, warnings, dataset, stored, paths


def lr_factor(step, cfg, total_steps):
    """LR multiplier: linear warmup, then constant or cosine decay to 0 at the last step."""
    if cfg["warmup_steps"] and step < cfg["warmup_steps"]:
        return (step + 1) / cfg["warmup_steps"]
    if cfg["lr_schedule"] == "cosine":
        span = max(1, total_steps - cfg["warmup_steps"])
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg["warmup_steps"]) / span)))
    return 1.0


class ResumableBatches(torch.utils.data.Sampler):
    """Batches of one epoch of a DistributedSampler, optionally skipping the ones already consumed.

    Iterated in the main process (also with workers), so set_epoch() between epochs is seen."""

    def __init__(self, sampler, batch_size):
        self.sampler, self.batch_size, self.epoch, self.skip = sampler, batch_size, 0, 0
        self.per_epoch = len(sampler) // batch_size

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        self.sampler.set_epoch(self.epoch)
        idx = list(self.sampler)
        for b in range(self.skip, self.per_epoch):
            yield idx[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self):
        return self.per_epoch - self.skip


def model_config(cfg, channels, num_classes):
    """Constructor arguments of the UNet for this run (conditional.unet_config; in config.json / train_state.pt)."""
    return cond_lib.unet_config(cfg, channels, num_classes)


def run_info(cfg, class_names, step, epoch):
    """The config.json written beside ckpt.pt: what inference needs to rebuild the model."""
    return {"model_type": MODEL_TYPE, "model": model_config(cfg, cfg["channels"], cfg["num_classes"]),
            "diffusion": {k: cfg[k] for k in ("noise_steps", "schedule", "beta_start", "beta_end", "prediction_type")},
            "class_names": class_names, "intensity": cfg.get("intensity"), "step": step, "epoch": epoch,
            "train": cfg}


def build(cfg, dataset, rank, world, device, precision):
    """UNet, its EMA, AdamW, the LR schedule, the grad scaler, the noise process and the batch sampler."""
    mcfg = model_config(cfg, cfg["channels"], cfg["num_classes"])
    model = (UNet_conditional(**mcfg) if cfg["conditional"] else UNet(**{k: v for k, v in mcfg.items()
                                                                        if k != "num_classes"})).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = rt.EMA(model, cfg["ema_decay"], cfg["ema_start"])  # the DDPM rule: copy until ema_start, then decay
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"],
                            **rt.optimizer_kwargs(device))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg["seed"], drop_last=False)
    batches = ResumableBatches(sampler, cfg["batch_size"])
    total = batches.per_epoch * cfg["num_epochs"]
    total = min(total, cfg["max_train_steps"]) if cfg["max_train_steps"] else total
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total))
    diffusion = Diffusion(cfg["noise_steps"], cfg["beta_start"], cfg["beta_end"], cfg["image_size"], device,
                          cfg["schedule"], cfg["channels"], cfg["prediction_type"])
    return model, ema, opt, sched, rt.grad_scaler(precision, device), diffusion, batches, total


def restore(stored, path, model, ema, phema, opt, scaler, sched, batches, rank, world, logger):
    """Load a training state into the built objects -> (step, epoch, batch position to continue from)."""
    if stored is None:
        return 0, 0, 0
    try:
        model.load_state_dict(stored["model"])
        ema.load_state_dict(stored["ema"])
        phema.load_state_dict(stored.get("posthoc_ema"))
    except (RuntimeError, KeyError) as e:
        raise UserError(f"{path} does not fit the configured model: {str(e).splitlines()[0][:200]}") from None
    opt.load_state_dict(stored["optimizer"])
    scaler.load_state_dict(stored["scaler"])
    sched.load_state_dict(stored["lr_scheduler"])
    step, epoch, pos = stored["step"], stored["epoch"], stored["batch_in_epoch"]
    if pos >= batches.per_epoch:
        epoch, pos = epoch + 1, 0
    if rank == 0:
        rt.set_rng_state(stored["rng"])
    if stored["config"].get("world_size", world) != world:
        logger.warning(f"warning: the run used {stored['config']['world_size']} processes, now {world}: "
                       f"it continues, but the data order is no longer that of an uninterrupted run")
    logger.info(f"resumed {path} at step {step} (epoch {epoch}, batch {pos} of {batches.per_epoch})")
    return step, epoch, pos


def make_loader(dataset, batches, cfg, device):
    """DataLoader over the resumable batch sampler (0 workers on CPU, 4 on GPU unless --num-workers)."""
    workers = cfg["num_workers"] if cfg["num_workers"] is not None else (4 if device.type == "cuda" else 0)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def wrap(model, world, local_rank, device, compile_model):
    """The module the loop calls: DDP across processes, then torch.compile (state dicts stay unprefixed)."""
    fwd = model
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda"
                                                        else None)
    return torch.compile(fwd) if compile_model else fwd


def noisy_batch(diffusion, batch, cfg, epoch, rank, step, device):
    """x_t, t, noise, (dropped-out) labels and the encoded condition (None for unconditioned tasks) of one step;
    randomness is a pure function of (seed, rank, step)."""
    task = cfg["task"]
    x, c, y, idx = batch if len(batch) == 4 else (batch[0], None, batch[1], batch[2])
    x = x.to(device, non_blocking=True)
    if cfg["random_flip"]:  # the same flip for target and condition: the pair stays aligned
        flip = flip_mask(idx, cfg["seed"], epoch).to(device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
        c = torch.where(flip, c.to(device).flip(3), c.to(device)) if c is not None and c.numel() else c
    x = cond_lib.encode_target(task, x, cfg["num_mask_classes"])
    if cfg["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    gen = rt.generator(cfg["seed"], rank, step, device=device)  # exact on resume: no state to carry
    t = torch.randint(0, cfg["noise_steps"], (x.shape[0],), generator=gen, device=device)
    noise = torch.randn(x.shape, generator=gen, device=device)
    labels = None
    if cfg["conditional"]:
        labels = y.to(device, non_blocking=True)
        drop = torch.rand(x.shape[0], generator=gen, device=device) < cfg["cfg_dropout"]
        labels = torch.where(drop, torch.full_like(labels, cfg["num_classes"]), labels)
    cond = None
    if task in PAIRED_TASKS:  # drawn after today's draws, so the generate task's numerics are unchanged
        c = c.to(device, non_blocking=True)
        if task == "mask2image":
            c = cond_lib.ablate_masks(c, cfg["mask_ablation"], gen)
        cond = cond_lib.encode_condition(task, c, cfg["num_mask_classes"])
        keep = torch.rand(x.shape[0], generator=gen, device=device) >= cfg["cond_dropout"]
        cond = cond * keep[:, None, None, None].to(cond.dtype)
        if cfg["channels_last"]:
            cond = cond.contiguous(memory_format=torch.channels_last)
    x_t, _ = diffusion.noise_images(x, t, noise)
    return x_t, t, diffusion.training_target(x, noise, t), labels, cond


def diffusion_loss(diffusion, pred, target, t, snr_gamma):
    """MSE on the training target; with --snr-gamma, each image's MSE weighted by Diffusion.loss_weights."""
    if not snr_gamma:
        return F.mse_loss(pred.float(), target)  # today's loss, bit for bit
    per_image = (pred.float() - target).pow(2).flatten(1).mean(1)
    return (diffusion.loss_weights(t, snr_gamma) * per_image).mean()


def optimizer_step(loss, model, opt, scaler, sched, grad_clip):
    """Backward (scaled for fp16), clip, step, zero the gradients, advance the LR schedule."""
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    sched.step()


def log_step(logger, writer, step, epoch, losses, sched, speed, device):
    """The periodic log line (loss averaged over steps and ranks) and its TensorBoard scalars."""
    loss = rt.mean_over_ranks(sum(losses) / len(losses), device)
    steps_s, images_s = speed.rates()
    mem = f", mem {rt.memory_mb(device) / 1024:.2f} GB" if device.type == "cuda" else ""
    lr = sched.get_last_lr()[0]
    logger.info(f"step {step} epoch {epoch} loss {loss:.4f} lr {lr:.2e} {steps_s:.2f} steps/s "
                f"{images_s:.1f} images/s{mem}")
    if writer is not None:
        for name, value in (("loss", loss), ("lr", lr), ("steps_per_sec", steps_s)):
            writer.add_scalar(name, value, step)
    losses.clear()


def save_checkpoint(paths, model, ema, phema, opt, scaler, sched, cfg, class_names, step, epoch, pos, logger):
    """Write ckpt.pt, ema_ckpt.pt, config.json and train_state.pt atomically (rank 0), then meet at a barrier."""
    if rt.is_dist() and torch.distributed.get_rank() != 0:
        rt.barrier()
        return
    model_sd, ema_sd = rt.cpu_state_dict(model), ema.state_dict()
    rt.atomic_save(model_sd, paths["ckpt"])
    rt.atomic_save(ema_sd, paths["ema"])
    rt.atomic_write_text(json.dumps(run_info(cfg, class_names, step, epoch), indent=2), paths["config"])
    state = {"model_type": MODEL_TYPE, "format_version": 2, "model": model_sd, "ema": ema_sd,
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "lr_scheduler": sched.state_dict(),
             "step": step, "epoch": epoch, "batch_in_epoch": pos, "config": cfg, "class_names": class_names,
             "model_config": model_config(cfg, cfg["channels"], cfg["num_classes"]),
             "rng": rt.rng_state()}
    if phema.active:  # the post-hoc EMA averages (snapshots only hold every N-th step's)
        state["posthoc_ema"] = phema.state_dict()
    rt.atomic_save(state, paths["state"])
    logger.info(f"saved checkpoint at step {step} (epoch {epoch}, batch {pos}) -> {paths['run']}")
    rt.barrier()


def sample_grid(diffusion, model, cfg, step, epoch, paths, writer, device, precision, logger, dataset=None):
    """Sample a grid with the EMA model (fixed seeds) and write it to results/ and TensorBoard (rank 0).

    Paired tasks: the first grid_images pairs of the data set, in rows of condition | sample | truth."""
    n = cfg["grid_images"] if cfg["task"] not in PAIRED_TASKS else min(cfg["grid_images"], len(dataset))
    labels = torch.arange(n, device=device) % cfg["num_classes"] if cfg["conditional"] else None
    cond, items = None, None
    if cfg["task"] in PAIRED_TASKS:
        items = [dataset[i] for i in range(n)]
        labels = torch.tensor([it[2] for it in items], device=device) if cfg["conditional"] else None
        cond = cond_lib.encode_condition(cfg["task"], torch.stack([it[1] for it in items]),
                                         cfg["num_mask_classes"]).to(device)
    imgs = diffusion.sample(model, n, labels=labels, cfg_scale=cfg["cfg_scale"], sampler=cfg["sampler"],
                            steps=cfg["sampling_steps"], seeds=list(range(n)), cond=cond,
                            autocast_dtype=rt.autocast_dtype(precision), progress=True,
                            as_float=cfg["task"] in cond_lib.MASK_TARGET_TASKS)
    imgs, nrow = cond_lib.grid_images(cfg, imgs.cpu(), items)
    path = paths["results"] / f"epoch{epoch + 1:04d}_ema.png"
    grid = save_grid(imgs, path, nrow)
    if writer is not None:
        writer.add_image("samples_ema", grid, step)
    t = diffusion.last_timing
    logger.info(f"sample grid -> {path} ({t['images']} images x {t['steps']} steps in {t['seconds']:.1f} s)")
    # the grids of epochs <= this one (a resumed run keeps its earlier ones; an older, longer run's are left out)
    animation.refresh_progress_gif(paths["results"], r"epoch(\d+)_ema\.png", "epoch",
                                   paths["results"] / "progress.gif", upto=epoch + 1, log=logger)


def log_header(logger, cfg, dataset, model, ema, world, device, per_epoch):
    """What runs: data, world size, batch, precision, and the parameter table."""
    if cfg["task"] != "generate" or cfg["prediction_type"] != "epsilon" or cfg["snr_gamma"]:
        logger.info(cond_lib.describe_task(cfg))
    if cfg["posthoc_ema_every_steps"]:
        logger.info(f"post-hoc EMA (EDM2): sigma_rel {cfg['posthoc_ema_sigma_rels']} tracked, a snapshot every "
                    f"{cfg['posthoc_ema_every_steps']} steps -> models/{cfg['run_name']}/posthoc_ema/ "
                    f"(rebuild any width with posthoc_ema.py)")
    logger.info(f"DDPM {'class-conditional' if cfg['conditional'] else 'unconditional'} run '{cfg['run_name']}': "
                f"{len(dataset)} images, {cfg['image_size']}x{cfg['image_size']}x{cfg['channels']}"
                + (f", {cfg['num_classes']} classes" if cfg["conditional"] else ""))
    for line in medical.describe_data(dataset.files, dataset.labels, dataset.class_names, dataset.opts):
        logger.info(f"data: {line}")
    logger.info(f"world size {world} ({'DDP ' + torch.distributed.get_backend() if rt.is_dist() else 'single process'}), "
                f"device {device}, batch {cfg['batch_size']}/process = {cfg['batch_size'] * world} global, "
                f"{per_epoch} steps/epoch, precision {cfg['mixed_precision']}")
    logger.info("parameters:\n" + rt.param_table({"UNet (trained)": model, "EMA copy (not trained)": ema.model}))


def tensorboard(paths, rank):
    """A SummaryWriter on rank 0, None elsewhere."""
    if rank != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(paths["tensorboard"]))


def train(args):
    """Validate inputs, then train (one process or torchrun DDP). Returns the run folder."""
    cfg, warnings, dataset, stored, paths = prepare_run(args)
    rank, world, local_rank, device = rt.setup_distributed(cfg["device"])
    cfg["world_size"] = world
    logger = rt.get_logger(paths["run"] if rank == 0 else None, rank, "ddpm")
    for w in warnings:
        logger.warning(w)
    precision = rt.resolve_precision(cfg["mixed_precision"], device, logger)
    rt.seed_everything(cfg["seed"] * world + rank)  # per-rank seed; the training noise uses rt.generator
    model, ema, opt, sched, scaler, diffusion, batches, total = build(cfg, dataset, rank, world, device, precision)
    # keys {"ema": ...}: posthoc_ema.py puts a rebuilt average where train_state.pt keeps the EMA (or replaces
    # ema_ckpt.pt, a flat state dict, whole); only rank 0 averages and writes (the weights are the same on all)
    phema = posthoc_ema.PostHocEMA({"ema": model}, posthoc_ema.parse_sigma_rels(cfg["posthoc_ema_sigma_rels"]),
                                   cfg["posthoc_ema_every_steps"], paths["posthoc_ema"], active=rank == 0)
    step, start_epoch, skip = restore(stored, paths.get("resume_from"), model, ema, phema, opt, scaler, sched,
                                      batches, rank, world, logger)
    del stored
    log_header(logger, cfg, dataset, model, ema, world, device, batches.per_epoch)
    if rank == 0:
        rt.remove_stale_temporaries(paths["run"])
        rt.atomic_write_text(json.dumps(run_info(cfg, dataset.class_names, step, start_epoch), indent=2),
                             paths["config"])
    fwd = wrap(model, world, local_rank, device, cfg["compile"])
    loader, writer = make_loader(dataset, batches, cfg, device), tensorboard(paths, rank)

    def checkpoint(epoch, pos):
        save_checkpoint(paths, model, ema, phema, opt, scaler, sched, cfg, dataset.class_names, step, epoch, pos,
                        logger)
        return step, f"{paths['state']} (step {step})"

    last_saved, last_good = step, f"{paths['state']} (step {step})" if step else "none written yet"
    speed, losses = rt.Throughput(), []
    epoch = start_epoch
    with rt.StopFlags(cfg["max_minutes"], device) as stop:
        for epoch in range(start_epoch, cfg["num_epochs"]):
            if step >= total:
                break
            batches.set_epoch(epoch, skip)
            pos, skip = skip, 0
            for batch in loader:
                x_t, t, target, labels, cond = noisy_batch(diffusion, batch, cfg, epoch, rank, step, device)
                with rt.autocast(precision, device):
                    if cond is not None:
                        pred = fwd(x_t, t, labels, cond)
                    else:
                        pred = fwd(x_t, t, labels) if labels is not None else fwd(x_t, t)
                loss = stop.check_loss(diffusion_loss(diffusion, pred, target, t, cfg["snr_gamma"]), step + 1,
                                       last_good)
                optimizer_step(loss, model, opt, scaler, sched, cfg["grad_clip"])
                step, pos = step + 1, pos + 1
                ema.update(model, step)
                phema.update(step)
                phema.maybe_snapshot(step)
                speed.add(x_t.shape[0] * world)
                losses.append(loss.item())
                if step % cfg["log_every_steps"] == 0:
                    log_step(logger, writer, step, epoch, losses, sched, speed, device)
                if cfg["ckpt_every_steps"] and step % cfg["ckpt_every_steps"] == 0:
                    last_saved, last_good = checkpoint(epoch, pos)
                why = stop.should_stop(step)
                if why:
                    if last_saved != step:
                        last_saved, last_good = checkpoint(epoch, pos)
                    reason = "SIGTERM received" if why == "SIGTERM" else f"--max-minutes {cfg['max_minutes']:g} reached"
                    logger.info(f"{reason}: checkpoint written at step {step} (epoch {epoch}); exiting. "
                                f"Continue with --resume.")
                    return finish(writer, paths["run"])
                if step >= total:
                    break
            done = step >= total or epoch + 1 == cfg["num_epochs"]
            if (done or (epoch + 1) % cfg["ckpt_every_epochs"] == 0) and last_saved != step:
                last_saved, last_good = checkpoint(epoch, pos)
            if rank == 0 and cfg["sample_every_epochs"] and (epoch + 1) % cfg["sample_every_epochs"] == 0:
                sample_grid(diffusion, ema.model, cfg, step, epoch, paths, writer, device, precision, logger, dataset)
            rt.barrier()
    logger.info(f"training finished: {step} steps, epoch {min(epoch + 1, cfg['num_epochs'])} of {cfg['num_epochs']}. "
                f"Checkpoints: {paths['ckpt']}, "
                f"{paths['ema']} (resume state {paths['state']})")
    return finish(writer, paths["run"])


def finish(writer, run_dir):
    """Close TensorBoard and leave the process group (os._exit under torchrun); returns the run folder."""
    if writer is not None:
        writer.close()
    rt.finish_distributed()
    return run_dir


def main(argv=None):
    """CLI entry: parse flags, train, turn input errors into one-line messages."""
    args = build_parser().parse_args(argv)
    rt.run_main(train, args)


if __name__ == "__main__":
    main()
