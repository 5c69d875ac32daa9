"""Train a class-conditional DiT on the latents of a frozen VAE; resumable, under torchrun or python.

    torchrun --nnodes=1 --nproc_per_node=4 train.py --model DiT-B/2 --data-path /path/to/data \
        --results-dir ./results --image-size 256 --num-classes 8 --global-batch-size 256 --epochs 1400
    python train.py ... --resume             # continue the latest run of that model, bit-exactly

Objectives (--objective, stored in the checkpoint; sampling reads it): `diffusion` (default) is the official
Gaussian diffusion (eps + learned variance, create_diffusion); `flow` is flow matching with the linear
interpolant (SiT; flow.py), the same network and state-dict layout predicting the velocity:

    python train.py --model DiT-B/2 --data-path /path/to/data --num-classes 8 --objective flow
    python train.py ... --objective flow --repa_encoder encoder.ts          # + REPA (repa.py), a TorchScript file
    python train.py ... --posthoc_ema_every_steps 5000                      # + post-hoc EMA snapshots (EDM2)

DICOM / NIfTI / 16-bit class folders: `--intensity-window -160,240` (a preset, percentiles, `auto` by
default), `--slice-axis`, `--slice-range` (medical.py); the window is fitted once on the data and stored in
every checkpoint (config["intensity"]), so sampling can write NIfTI / DICOM in the data's units.

Runs go to numbered folders (results/000-DiT-B-2/) with log.txt, tensorboard/,
checkpoints/0050000.pt (plain dicts: model, ema, opt, args, step, ... -> loadable with weights_only) and the
sample grids as samples/step_0050000.png plus progress.gif (all grids so far, same seeds: training as a film).
The plumbing (flags, logging, torchrun setup, precision, checkpoint files, seeds, stop flags, EMA) is the
shared runtime.py; this file holds DiT's loop and what only DiT needs (run folders, the latent cache).
"""
import itertools
import os
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import animation
import flow
import medical
import posthoc_ema
import repa
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dataset import (CachedLatentDataset, ImageFolderDataset, ResumableSampler, build_cache, cache_path,
                     data_fingerprint, encode_posterior)
from diffusion import create_diffusion
from models import ALL_MODELS, model_config
from runtime import (EMA, FlagParser, StopFlags, Throughput, TrainingError, UserError, add_resume_flag,
                     any_rank, atomic_save, autocast, barrier, check_writable, cpu_state_dict, derive_seed,
                     finish_distributed, get_logger, grad_scaler, is_dist, load_checkpoint, mean_over_ranks,
                     memory_mb, optimizer_kwargs, param_table, remove_stale_temporaries, resolve_precision,
                     resolve_resume, rng_state, run_main, seed_everything, setup_distributed)
from utils import load_vae, vae_fingerprint

CKPT_RE = re.compile(r"^(\d{7})\.pt$")
# Flags whose change makes a resumed run a different experiment.
RESUME_MUST_MATCH = ("model", "image_size", "num_classes", "global_batch_size", "seed",
                     "class_dropout_prob")
# Options added later: default None = "not given"; a new run takes the value here, a resumed run its stored one
# (a checkpoint without the key was trained with the value here), and a given value that differs is an error.
STORED_OPTIONS = {"objective": "diffusion", "repa_encoder": None, "repa_depth": None, "repa_weight": None,
                  "repa_projector_dim": None, "posthoc_ema_every_steps": 0, "posthoc_ema_sigma_rels": "0.05,0.10"}
OLD_ARG_NAMES = {"seed": "global_seed"}  # how checkpoints written before the flag renames store them


def parse_args(argv=None):
    """Training flags: the spec's names and defaults in the repository's vocabulary, old names as aliases."""
    p = FlagParser(description="Train DiT on class folders of images.")
    p.add_argument("--model", choices=list(ALL_MODELS), default="DiT-B/2")
    p.add_argument("--data_root", aliases=["dataset_path", "data_path"], required=True,
                   help="folder with one sub-folder per class")
    p.add_argument("--results_dir", default="results", help="numbered run folders go here")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--num_classes", type=int, default=8, help="must equal the number of class folders")
    p.add_argument("--global_batch_size", type=int, default=256, help="over all processes")
    p.add_argument("--num_epochs", aliases=["epochs"], type=int, default=1400)
    p.add_argument("--max_train_steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--max_minutes", type=float, default=0.0,
                   help="time limit: checkpoint and stop after this many minutes (0: none)")
    p.add_argument("--seed", aliases=["global_seed"], type=int, default=0)
    p.add_argument("--vae", default="ema", help="ema | mse | <hub id> | <AutoencoderKL folder>")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--log_every_steps", aliases=["log_every"], type=int, default=100)
    p.add_argument("--ckpt_every_steps", aliases=["ckpt_every"], type=int, default=50_000)
    p.add_argument("--sample_every_steps", aliases=["grid_every"], type=int, default=None,
                   help="TensorBoard sample grid every N steps (default: at each checkpoint; 0: never)")
    p.add_argument("--learning_rate", aliases=["lr"], type=float, default=1e-4)
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--class_dropout_prob", type=float, default=0.1, help="label dropout for CFG")
    p.add_argument("--random_flip", dest="random_flip", action="store_true", default=True,
                   help="random horizontal flips (the default)")
    p.add_argument("--no_random_flip", aliases=["no_flip", "no_hflip"], dest="random_flip",
                   action="store_false", help="no horizontal flips")
    p.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32")
    p.add_argument("--cache_latents", action="store_true",
                   help="encode the data set once (posterior mean/std, flipped too) and reuse it")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--objective", choices=["diffusion", "flow"], default=None,
                   help="diffusion: the official Gaussian diffusion (the default); flow: flow matching, linear "
                        "interpolant, velocity prediction (SiT). A resumed run keeps its own")
    p.add_argument("--repa_encoder", default=None, metavar="SPEC",
                   help="REPA: a TorchScript encoder file (images in [0, 1] -> features) or a torch.hub id such as "
                        "facebookresearch/dinov2:dinov2_vitb14 (default: off)")
    p.add_argument("--repa_depth", type=int, default=None,
                   help="REPA: align the tokens after this block (1-based; default: depth // 3, at least 1)")
    p.add_argument("--repa_weight", type=float, default=None, help="REPA: weight of the alignment loss (default 0.5)")
    p.add_argument("--repa_projector_dim", type=int, default=None,
                   help="REPA: hidden width of the projector MLP (default: 2048, the paper's, or 4x the DiT width "
                        "when smaller)")
    posthoc_ema.add_flags(p)  # --posthoc_ema_every_steps, --posthoc_ema_sigma_rels
    p.set_defaults(posthoc_ema_every_steps=None, posthoc_ema_sigma_rels=None)  # None: not given (STORED_OPTIONS)
    add_resume_flag(p)
    p.add_argument("--trust_checkpoint", action="store_true",
                   help="allow loading a checkpoint that contains pickled Python objects")
    medical.add_read_flags(p)  # --intensity_window, --slice_axis, --slice_range, --group_regex
    args = p.parse_args(argv)
    try:
        medical.options_from_args(args)  # a bad --intensity-window is named before anything is loaded
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.posthoc_ema_sigma_rels is not None:
        posthoc_ema.parse_sigma_rels(args.posthoc_ema_sigma_rels)
    checks = [
        (args.image_size <= 0 or args.image_size % 8, "--image-size must be a positive multiple of 8"),
        (args.num_classes < 1, "--num-classes must be at least 1"),
        (args.global_batch_size < 1, "--global-batch-size must be at least 1"),
        (args.num_epochs < 1, "--num-epochs must be at least 1"),
        (args.max_train_steps is not None and args.max_train_steps < 1, "--max-train-steps must be >= 1"),
        (args.max_minutes < 0, "--max-minutes must be >= 0"),
        (args.log_every_steps < 1, "--log-every-steps must be at least 1"),
        (args.ckpt_every_steps < 1, "--ckpt-every-steps must be at least 1"),
        (args.sample_every_steps is not None and args.sample_every_steps < 0, "--sample-every-steps must be >= 0"),
        (args.num_workers < 0, "--num-workers must be >= 0"),
        (not 0 <= args.ema_decay <= 1, "--ema-decay must be in [0, 1]"),
        (not 0 <= args.class_dropout_prob < 1, "--class-dropout-prob must be in [0, 1)"),
        (args.learning_rate <= 0, "--learning-rate must be positive"),
        (args.repa_depth is not None and args.repa_depth < 1, "--repa-depth must be at least 1"),
        (args.repa_weight is not None and args.repa_weight < 0, "--repa-weight must be >= 0"),
        (args.repa_projector_dim is not None and args.repa_projector_dim < 1, "--repa-projector-dim must be >= 1"),
        (args.posthoc_ema_every_steps is not None and args.posthoc_ema_every_steps < 0,
         "--posthoc-ema-every-steps must be >= 0 (0 = off)"),
    ]
    for bad, msg in checks:
        if bad:
            raise UserError(msg)
    return args


# ----------------------------------------------------------------------------- run folders, resume
def run_folders(results_dir, model_name):
    """Numbered run folders of this model, oldest first."""
    tag = model_name.replace("/", "-")
    folders = [d for d in Path(results_dir).glob(f"[0-9][0-9][0-9]-{tag}") if d.is_dir()]
    return sorted(folders, key=lambda d: int(d.name[:3]))


def latest_checkpoint(run_dir):
    """Highest-step checkpoint of a run folder, or None."""
    ckpts = sorted(p for p in (Path(run_dir) / "checkpoints").glob("*.pt") if CKPT_RE.match(p.name))
    return ckpts[-1] if ckpts else None


def new_run_dir(results_dir, model_name):
    """results_dir/NNN-<model>, NNN one above every numbered folder there."""
    used = [int(d.name[:3]) for d in Path(results_dir).glob("[0-9][0-9][0-9]-*") if d.is_dir()]
    return Path(results_dir) / f"{(max(used) + 1) if used else 0:03d}-{model_name.replace('/', '-')}"


def find_resume(args):
    """(run folder, checkpoint) to continue, or (None, None). --resume alone or `auto`: the latest checkpoint
    of this model's latest run (a new run when there is none yet); a run folder: its latest checkpoint."""
    if args.resume is None:
        return None, None
    latest, path = None, Path(args.resume)
    if args.resume == "auto":
        latest = next(filter(None, map(latest_checkpoint, reversed(run_folders(args.results_dir, args.model)))),
                      None)
        if latest is None:
            return None, None
    elif path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise UserError(f"--resume {path}: no checkpoints/NNNNNNN.pt in that folder")
    elif not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint (pass auto, a run folder or a .pt file)")
    path = resolve_resume("auto" if latest else args.resume, latest)
    return path.resolve().parent.parent, path


def check_resume_checkpoint(ckpt, path, args):
    """Refuse a checkpoint of another model type or of a different experiment."""
    if not isinstance(ckpt, dict) or ckpt.get("model_type") != "dit":
        what = ckpt.get("model_type") if isinstance(ckpt, dict) else None
        raise UserError(f"{path} is a checkpoint of {what or 'an unknown model (no model_type)'}, not of a DiT "
                        f"training run")
    for key in ("model", "opt", "ema", "args", "step"):
        if key not in ckpt:
            raise UserError(f"{path} has no '{key}' entry: it cannot be resumed (start a new run)")
    old = ckpt["args"]
    for key in RESUME_MUST_MATCH:
        name = key if key in old else OLD_ARG_NAMES.get(key, key)
        if name in old and old[name] != getattr(args, key):
            raise UserError(f"{path} was trained with --{key.replace('_', '-')} {old[name]}, not "
                            f"{getattr(args, key)}: pass the same value to resume, or start a new run without "
                            f"--resume")


def resolve_stored_options(args, ckpt, path):
    """Fill in the options of STORED_OPTIONS (and learn_sigma): a resumed run keeps its stored values, a flag that
    contradicts them is one error line; a new run takes the defaults. REPA's own defaults are set later."""
    old = ckpt.get("args", {}) if ckpt is not None else None

    def canon(key, value):  # "0.05,0.1" and "0.05,0.10" are the same widths
        if key != "posthoc_ema_sigma_rels" or value is None:
            return value
        return ",".join(f"{x:g}" for x in posthoc_ema.parse_sigma_rels(value))

    for key, default in STORED_OPTIONS.items():
        given = canon(key, getattr(args, key))
        default = canon(key, default)
        if old is None:
            value = default if given is None else given
        else:
            value = canon(key, old.get(key, default))
            if key == "repa_encoder" and given is not None and value is not None and given != value \
                    and repa.fingerprint(given) == old.get("repa_encoder_fingerprint"):
                value = given  # the same encoder file, moved
            if given is not None and given != value:
                flag = f"--{key.replace('_', '-')}"
                stored = "not set" if value is None else value
                raise UserError(f"{path} was trained with {flag} {stored}, not {given}: leave {flag} out to "
                                f"continue the run as it was, or start a new run without --resume")
        setattr(args, key, value)
    for key in ("repa_encoder_fingerprint", "repa_encoder_dim", "repa_encoder_tokens"):  # checked by repa.setup
        setattr(args, key, old.get(key) if old is not None else None)
    if args.repa_encoder is None:
        for key in ("repa_depth", "repa_weight", "repa_projector_dim"):
            if getattr(args, key) is not None:
                raise UserError(f"--{key.replace('_', '-')} needs --repa-encoder (REPA is off)")
    args.learn_sigma = args.objective == "diffusion"  # flow predicts the velocity only: out_channels = in_channels
    posthoc_ema.parse_sigma_rels(args.posthoc_ema_sigma_rels)


def read_options(args, ckpt):
    """(medical.ReadOptions, fit?): a resumed run keeps its stored window (a conflicting flag is refused), a new
    one fits it on the data."""
    try:
        given = medical.options_from_args(args)
        stored = (ckpt or {}).get("config", {}).get("intensity")
        return medical.resume_options(given, stored), not stored  # no stored window (new run, older run): fit
    except ValueError as e:
        raise UserError(f"--resume: {e}" if ckpt else str(e)) from None


def load_data(args, ckpt, resume_path, device):
    """(dataset, VAE, VAE info, latent size), checked against the flags and the checkpoint.

    The data first: it is quick, while loading a hub VAE offline spends half a minute on retries."""
    opts, fit = read_options(args, ckpt)
    dataset = ImageFolderDataset(args.data_root, args.image_size, channels=None, opts=opts, fit=fit)
    if len(dataset.classes) != args.num_classes:
        raise UserError(f"--num-classes {args.num_classes} but {args.data_root} has "
                        f"{len(dataset.classes)} class folders ({', '.join(dataset.classes[:20])})")
    if len(dataset) < args.global_batch_size:
        raise UserError(f"{args.data_root} has {len(dataset)} images, fewer than --global-batch-size "
                        f"{args.global_batch_size}")
    if ckpt is not None and ckpt.get("class_names") not in (None, dataset.classes):
        raise UserError(f"{resume_path} was trained on classes {ckpt['class_names']}, but "
                        f"{args.data_root} has {dataset.classes}")
    vae, info = load_vae(args.vae, device)
    dataset.channels = info["image_channels"]
    latent_size, rem = divmod(args.image_size, info["factor"])
    patch = int(args.model.rsplit("/", 1)[1])
    if rem or latent_size % patch:
        raise UserError(f"--image-size {args.image_size} gives latents of {args.image_size / info['factor']:g}"
                        f" pixels (VAE factor {info['factor']}), not divisible by the patch size {patch} "
                        f"of {args.model}: use a multiple of {info['factor'] * patch}")
    return dataset, vae, info, latent_size


def make_run_dir(args, rank, resume_dir):
    """The resumed run folder, else a new numbered one: rank 0 decides and creates it, every rank learns it."""
    run_dir = None
    if rank == 0:
        check_writable(args.results_dir)
        run_dir = resume_dir if resume_dir is not None else new_run_dir(args.results_dir, args.model)
        check_writable(run_dir / "checkpoints")
        remove_stale_temporaries(run_dir / "checkpoints")  # left by a run killed inside a save
    if is_dist():
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return run_dir


# ----------------------------------------------------------------------------- model, data, state
def build_model(args, latent_size, info, device):
    """The DiT (the same initial weights on every rank and for every world size), its EMA, AdamW and the REPA
    projector (None without REPA; a second parameter group of the same AdamW)."""
    torch.manual_seed(args.seed)
    model = ALL_MODELS[args.model](input_size=latent_size, in_channels=info["latent_channels"],
                                   num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob,
                                   learn_sigma=args.learn_sigma).to(device)
    ema = EMA(model, args.ema_decay, start=0)  # the official DiT rule: a copy at step 0, decay from step 1
    groups, projector = [{"params": list(model.parameters())}], None
    if args.repa_encoder is not None:
        torch.manual_seed(derive_seed(args.seed, 1))  # its own seed: the DiT's initial weights stay those above
        projector = repa.make_projector(model_config(args.model)["hidden_size"], args.repa_encoder_dim,
                                        args.repa_projector_dim).to(device)
        groups.append({"params": list(projector.parameters())})
    opt = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay, **optimizer_kwargs(device))
    return model, ema, opt, projector


def restore(ckpt, path, model, ema, opt, scaler, world, logger, projector=None, phema=None):
    """Load a training checkpoint into the live objects -> (step, epoch, batch_in_epoch); zeros without one."""
    if ckpt is None:
        return 0, 0, 0
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    if projector is not None:
        projector.load_state_dict(ckpt["repa_projector"])
    if phema is not None:
        phema.load_state_dict(ckpt.get("posthoc_ema"))
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    step, epoch, batch_in_epoch = ckpt["step"], ckpt.get("epoch", 0), ckpt.get("batch_in_epoch", 0)
    if ckpt.get("world_size", world) != world:
        logger.warning(f"checkpoint was written by {ckpt['world_size']} processes, now {world}: the run "
                       f"continues, but not bit-identically to an uninterrupted one")
    logger.info(f"Resumed from {path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    return step, epoch, batch_in_epoch


def make_loader(dataset, vae, info, args, rank, world, device, logger, encoder=None, grid=None, precision="no"):
    """(DataLoader, ResumableSampler) over the images, or over their cached latents (and REPA targets) with
    --cache-latents."""
    if args.cache_latents:
        cache = build_latent_cache(dataset, vae, info, args, rank, world, device, logger)
        feats = (repa.build_cache_of(dataset, encoder, args, grid, rank, world, device, precision, logger)
                 if encoder is not None else None)
        train_set, workers = CachedLatentDataset(cache, [lab for _, lab in dataset.samples], feats), 0  # in memory
    else:
        train_set, workers = dataset, args.num_workers
    local_batch = args.global_batch_size // world
    sampler = ResumableSampler(len(dataset), rank, world, local_batch, args.seed, flip=args.random_flip)
    # An own generator keeps DataLoader from drawing from the global RNG (exact resume).
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                        generator=torch.Generator())
    return loader, sampler


def batches(loader, sampler, epoch, done):
    """Endless (batch, (epoch, batches done in it) after this batch) from a run's position on; the sampler
    skips the batches of the current epoch that were done before a resume."""
    while True:
        if done >= sampler.batches_per_epoch:
            epoch, done = epoch + 1, 0
        sampler.set_epoch(epoch, done)
        for batch in loader:
            done += 1
            yield batch, ((epoch + 1, 0) if done == sampler.batches_per_epoch else (epoch, done))
        epoch, done = epoch + 1, 0


def make_latents(batch, vae, scale, shift, cached, device, precision):
    """Latents for a batch: posterior mean + std * N(0, 1), times the VAE's scaling factor.

    Drawing the noise ourselves (not latent_dist.sample()) makes cached and on-the-fly latents equal.
    """
    if cached:
        mean, std, y = batch[:3]  # [3]: the REPA targets, when cached
        mean, std = mean.to(device, non_blocking=True), std.to(device, non_blocking=True)
    else:
        x, y = batch
        with autocast(precision, device):
            mean, std = encode_posterior(vae, x.to(device, non_blocking=True))
    # torch.randn (not randn_like): the posterior mean is a strided view, and randn_like follows strides.
    noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
    latent = (mean + std * noise - shift) * scale
    return latent, y.to(device, non_blocking=True)


def build_latent_cache(dataset, vae, info, args, rank, world, device, logger):
    """Encode every image (and its mirror) once; reuse while data and VAE are unchanged."""
    path = cache_path(args.results_dir, dataset.root, args.image_size, info["vae"])
    fingerprint = data_fingerprint(list(zip(dataset.sources, (lab for _, lab in dataset.samples))), dataset.classes,
                                   args.image_size, info["image_channels"], dataset.opts) + vae_fingerprint(vae)

    def encode(x):
        x = x.to(device)
        (m0, s0), (m1, s1) = encode_posterior(vae, x), encode_posterior(vae, x.flip(-1))
        return {"mean": torch.stack([m0, m1], 1).cpu(), "std": torch.stack([s0, s1], 1).cpu()}

    words = ("Reusing cached latents {path} ({n} images)", "Latent cache {path} is stale (data or VAE changed): "
             "re-encoding", "Encoding {n} images (and their mirror images) into {path}")
    return build_cache(path, fingerprint, dataset, encode, rank, world, logger, words,
                       {"data_path": dataset.root, "vae": info["vae"]})


def run_meta(args, dataset, info, latent_size, world):
    """What every checkpoint of a run carries beside the training state (inference rebuilds the model from it)."""
    return {"args": dict(vars(args), data_root=os.path.abspath(args.data_root)), "model_type": "dit",
            "class_names": dataset.classes, "vae": info, "world_size": world,
            "config": {"model": args.model, "input_size": latent_size, "image_size": args.image_size,
                       "in_channels": info["latent_channels"], "num_classes": args.num_classes,
                       "class_dropout_prob": args.class_dropout_prob, "learn_sigma": args.learn_sigma,
                       "grayscale": dataset.grayscale, "intensity": dataset.opts.to_config(),
                       "objective": args.objective,
                       "repa": None if args.repa_encoder is None else {
                           k: getattr(args, f"repa_{k}") for k in ("encoder", "encoder_fingerprint", "encoder_dim",
                                                                   "encoder_tokens", "depth", "weight",
                                                                   "projector_dim")}}}


def save_checkpoint(path, meta, model, ema, opt, scaler, step, position, device, logger, extra=None):
    """Rank 0 writes the plain-dict checkpoint atomically; every rank learns whether it worked (a full disk
    stops all ranks with one `error:` line and leaves the previous checkpoint intact). Returns the path.
    extra(): more entries (the REPA projector, the post-hoc EMA state), asked for on rank 0 only."""
    error = None
    if not is_dist() or dist.get_rank() == 0:
        # "rng" is for inspection only: every step reseeds from (seed, rank, step), which is what makes a
        # resumed run bit-identical without replaying RNG streams.
        state = {"model": cpu_state_dict(model), "ema": ema.state_dict(), "opt": opt.state_dict(),
                 "scaler": scaler.state_dict(), "step": step, "epoch": position[0], "batch_in_epoch": position[1],
                 "rng": rng_state(), **meta, **(extra() if extra else {})}
        try:
            atomic_save(state, path)
            logger.info(f"Saved checkpoint to {path}")
        except TrainingError as e:
            error = str(e)
    if any_rank(error is not None, device):
        raise TrainingError(error or f"rank 0 could not write {path}")
    return path


def log_progress(logger, writer, step, losses, meter, lr, device, aligns=None):
    """The periodic log line (loss averaged over the steps since the last line and over ranks; with REPA also
    its alignment term, -cos), also to TensorBoard; empties `losses` and `aligns`."""
    loss = mean_over_ranks(sum(losses) / len(losses), device)
    align = mean_over_ranks(sum(aligns) / len(aligns), device) if aligns else None
    steps_s, images_s = meter.rates()
    repa_part = f", repa -cos: {align:.4f}" if align is not None else ""
    logger.info(f"(step={step:07d}) train loss: {loss:.4f}{repa_part}, lr {lr:g}, steps/s: {steps_s:.2f}, "
                f"images/s: {images_s:.1f}, memory {memory_mb(device):.0f} MiB")
    if aligns:
        aligns.clear()
        if writer:
            writer.add_scalar("train/repa_neg_cos", align, step)
    if writer:
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/steps_per_sec", steps_s, step)
        writer.add_scalar("train/lr", lr, step)
    losses.clear()


def make_writer(run_dir, rank):
    """TensorBoard writer of rank 0 as a context manager (None on the other ranks)."""
    if rank != 0:
        return nullcontext()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(run_dir / "tensorboard"))


@torch.no_grad()
def log_sample_grid(writer, ema, vae, info, classes, latent_size, step, device, objective="diffusion"):
    """A TensorBoard grid from the EMA model: one image per class (<= 16), 25 DDIM steps (flow: 25 Heun steps),
    CFG 4 -> the grid (C, H, W) in [0, 1]."""
    from torchvision.utils import make_grid
    n = min(len(classes), 16)
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(n, info["latent_channels"], latent_size, latent_size, generator=g, device=device)
    y = torch.arange(n, device=device)
    ema.eval()
    if objective == "flow":
        velocity = flow.guided_velocity(ema, y, 4.0, torch.full_like(y, ema.num_classes))
        out, tag = flow.sample(velocity, z, 25, "heun"), "samples/ema_heun25_cfg4"
    else:
        diffusion = create_diffusion("ddim25")
        fn = lambda x, t, y, cfg_scale: ema.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels=True)  # noqa: E731
        out = diffusion.ddim_sample_loop(fn, (2 * n, *z.shape[1:]), torch.cat([z, z]), clip_denoised=False,
                                         model_kwargs={"y": torch.cat([y, torch.full_like(y, ema.num_classes)]),
                                                       "cfg_scale": 4.0}, device=device)[:n]
        tag = "samples/ema_ddim25_cfg4"
    img = vae.decode(out / info["scaling_factor"] + info["shift_factor"]).sample.clamp(-1, 1) * 0.5 + 0.5
    grid = make_grid(img.float().cpu(), nrow=min(n, 8))
    writer.add_image(tag, grid, step)
    return grid


# ----------------------------------------------------------------------------- main
def make_train_model(model, projector, args, device):
    """What the loop calls: the DiT (with the REPA projector, one module for DDP), DDP-wrapped under torchrun,
    compiled with --compile -> (net(x, t, y) -> DiT output, the captured projected tokens {"proj": ...})."""
    inner = model if projector is None else repa.WithProjector(model, projector, args.repa_depth)
    wrapped = DDP(inner, device_ids=[device.index] if device.type == "cuda" else None) if is_dist() else inner
    wrapped = torch.compile(wrapped) if args.compile else wrapped
    if projector is None:
        return wrapped, None
    captured = {}

    def net(x, t, y):
        out, captured["proj"] = wrapped(x, t, y)
        return out
    return net, captured


def main(args):
    """Build, resume, then one loop: batch -> loss -> check -> backward -> step -> EMA -> log/ckpt/stop."""
    rank, world, _, device = setup_distributed()
    logger = get_logger(None, rank, "dit")
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                        f"{world} processes")
    resume_dir, resume_path = find_resume(args)
    if args.resume == "auto" and resume_path is None:
        logger.info(f"--resume: no checkpoint of {args.model} under {args.results_dir}; starting a new run")
    ckpt = load_checkpoint(resume_path, trust=args.trust_checkpoint) if resume_path else None
    if ckpt is not None:
        check_resume_checkpoint(ckpt, resume_path, args)
    resolve_stored_options(args, ckpt, resume_path)
    # Everything that can be wrong with the input is checked before the run folder is created.
    dataset, vae, info, latent_size = load_data(args, ckpt, resume_path, device)
    encoder = repa.setup(args, info, latent_size, device, logger, resumed=ckpt is not None)
    run_dir = make_run_dir(args, rank, resume_dir)
    ckpt_dir = run_dir / "checkpoints"
    logger = get_logger(run_dir, rank, "dit")
    logger.info(f"World size {world}, device {device}, run folder {run_dir}")
    labels = [lab for _, lab in dataset.samples]
    for line in medical.describe_data(dataset.sources, labels, dataset.classes, dataset.opts):
        logger.info(f"Data: {line}")

    precision = resolve_precision(args.mixed_precision, device, logger)
    seed_everything(args.seed * world + rank)  # Python, NumPy: per rank; torch: reseeded below and every step
    model, ema, opt, projector = build_model(args, latent_size, info, device)
    scaler = grad_scaler(precision, device)
    phema = posthoc_ema.PostHocEMA({"ema": model}, posthoc_ema.parse_sigma_rels(args.posthoc_ema_sigma_rels),
                                   args.posthoc_ema_every_steps, run_dir / "posthoc_ema", active=rank == 0)
    step, epoch, batch_in_epoch = restore(ckpt, resume_path, model, ema, opt, scaler, world, logger, projector, phema)
    del ckpt
    parts = {"VAE": vae, "DiT": model, "REPA projector": projector, "REPA encoder": encoder}
    for line in param_table({k: v for k, v in parts.items() if v is not None}).splitlines():
        logger.info(line)
    logger.info(f"{args.model}: latents {info['latent_channels']}x{latent_size}x{latent_size}, "
                f"{args.num_classes} classes, objective {args.objective}, precision {precision}, "
                f"{len(dataset)} images")
    grid = latent_size // model.patch_size  # the token grid REPA targets are resized to
    loader, sampler = make_loader(dataset, vae, info, args, rank, world, device, logger, encoder, grid, precision)
    total_steps = sampler.batches_per_epoch * args.num_epochs
    total_steps = min(total_steps, args.max_train_steps or total_steps)
    diffusion = create_diffusion(timestep_respacing="")
    net, captured = make_train_model(model, projector, args, device)
    meta = run_meta(args, dataset, info, latent_size, world)
    extra = lambda: {**({"repa_projector": cpu_state_dict(projector)} if projector is not None else {}),  # noqa: E731
                     **({"posthoc_ema": phema.state_dict()} if phema.active else {})}
    grid_every = args.ckpt_every_steps if args.sample_every_steps is None else args.sample_every_steps
    last_good, saved, losses, meter, reason = str(resume_path or "none written yet"), step, [], Throughput(), None
    aligns = []
    logger.info(f"Training for {max(total_steps - step, 0)} more steps ({sampler.batches_per_epoch} per epoch, "
                f"global batch {args.global_batch_size}, {args.global_batch_size // world} per process)")

    model.train()
    with StopFlags(args.max_minutes, device) as stop, make_writer(run_dir, rank) as writer:
        todo = itertools.islice(batches(loader, sampler, epoch, batch_in_epoch), max(total_steps - step, 0))
        for batch, position in todo:
            torch.manual_seed(derive_seed(args.seed, rank, step))  # seeds CUDA too: noise, timesteps, dropout
            latent, y = make_latents(batch, vae, info["scaling_factor"], info["shift_factor"],
                                     args.cache_latents, device, precision)
            if args.objective == "flow":
                t = torch.rand(latent.shape[0], device=device)  # t ~ U(0, 1) per sample (SiT's uniform sampler)
            else:
                t = torch.randint(0, diffusion.num_timesteps, (latent.shape[0],), device=device)
            target = (repa.batch_targets(batch, encoder, args.cache_latents, grid, device, precision)
                      if encoder is not None else None)
            with autocast(precision, device):
                losses_fn = flow.training_losses if args.objective == "flow" else diffusion.training_losses
                loss = losses_fn(net, latent, t, {"y": y})["loss"].mean()
                if captured is not None:
                    align = repa.loss(captured.pop("proj"), target)
                    loss = loss + args.repa_weight * align
            loss = stop.check_loss(loss, step + 1, last_good)  # NaN/inf on any rank: stop, weights untouched
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            ema.update(model, step)
            phema.update(step)
            phema.maybe_snapshot(step, write=rank == 0)
            losses.append(loss.item())
            if captured is not None:
                aligns.append(align.item())
            meter.add(args.global_batch_size)
            if step % args.log_every_steps == 0:
                log_progress(logger, writer, step, losses, meter, args.learning_rate, device, aligns)
            if step % args.ckpt_every_steps == 0 or step == total_steps:
                last_good = save_checkpoint(ckpt_dir / f"{step:07d}.pt", meta, model, ema, opt, scaler, step,
                                            position, device, logger, extra)
                saved = step
            if writer and grid_every and step % grid_every == 0:
                image_grid = log_sample_grid(writer, ema.model, vae, info, dataset.classes, latent_size, step, device,
                                             args.objective)
                animation.save_progress_frame(image_grid, run_dir, step, gray=info["image_channels"] == 1, log=logger)
            reason = stop.should_stop(step)  # SIGTERM or --max-minutes: checkpoint this step, exit 0
            if reason:
                if saved != step:
                    save_checkpoint(ckpt_dir / f"{step:07d}.pt", meta, model, ema, opt, scaler, step, position,
                                    device, logger, extra)
                break
    if reason:
        logger.info(f"{reason}: saved step {step} to {ckpt_dir}; continue with --resume")
    else:
        logger.info(f"Done: {step} steps; checkpoints in {ckpt_dir}")
    finish_distributed()


if __name__ == "__main__":
    run_main(lambda a: main(parse_args(a)), sys.argv[1:])
