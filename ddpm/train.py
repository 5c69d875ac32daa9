"""Train a pixel-space DDPM (class-conditional by default, `--unconditional` otherwise).

    cd ddpm
    python train.py --dataset-path /path/to/class_folders --image-size 64 --epochs 300 --batch-size 14
    torchrun --nnodes=1 --nproc_per_node=4 train.py --dataset-path /path/to/data --image-size 64
    python train.py --dataset-path /path/to/data --resume            # continue models/<run_name>/

One process (GPU or CPU) or torchrun DDP (nccl on GPU, gloo on CPU). Writes, under --work-dir (default .):
    models/<run_name>/ckpt.pt, ema_ckpt.pt   plain model state dicts (torch.load + load_state_dict)
    models/<run_name>/train_state.pt         everything --resume needs (optimizer, EMA, step, RNG, config)
    models/<run_name>/config.json            architecture + class names, read by inference.py
    models/<run_name>/log.txt, results/<run_name>/*.png (sample grids), runs/<run_name>/ (TensorBoard)
The spec's entry points (ddpm.py, ddpm_conditional.py, ddpm_conditional_ddp.py) call train() below.
"""
import argparse
import json
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dataset import ImageFolderDataset, flip_mask
from models import EMA, Diffusion, UNet, UNet_conditional
from utils import (MODEL_TYPE, TrainingError, UserError, atomic_torch_save, atomic_write_text, barrier,
                   check_writable, finish_distributed, get_logger, grid_columns, is_dist, load_checkpoint,
                   make_grid, mix_seed, parameter_table, rng_state, run_main, save_image_atomic,
                   set_rng_state, setup_distributed, setup_precision)

# The one place that holds the training defaults (flags default to None = "take this, or the stored
# value when resuming").
DEFAULTS = dict(
    run_name=None, work_dir=".", image_size=64, channels="auto", base_channels=64, time_dim=256,
    noise_steps=1000, schedule="linear", beta_start=1e-4, beta_end=0.02, epochs=300, batch_size=14, lr=3e-4,
    weight_decay=0.01, lr_schedule="constant", warmup_steps=0, grad_clip=1.0, ema_decay=0.995, ema_start=2000,
    cfg_dropout=0.1, random_flip=False, mixed_precision="no", seed=42, save_every_steps=0, save_every_epochs=1,
    sample_every=10, grid_images=16, max_minutes=0.0, sampler="ddpm", sampling_steps=None, cfg_scale=3.0, log_every=50,
    num_workers=None, device="auto", compile=False, channels_last=False, num_classes=None,
)
# Settings that define the network / noise process: a resumed run must keep them.
ARCH_KEYS = ("image_size", "channels", "base_channels", "time_dim", "noise_steps", "schedule", "beta_start",
             "beta_end", "num_classes", "conditional")
# Settings that define the optimisation trajectory: kept from the stored run on resume (a warning says so).
TRAJECTORY_KEYS = ("batch_size", "lr", "weight_decay", "lr_schedule", "warmup_steps", "grad_clip", "ema_decay",
                   "ema_start", "cfg_dropout", "random_flip", "seed", "mixed_precision")


def add_train_args(p):
    """Training flags (both --dash-case and --snake_case spellings)."""
    def add(name, **kw):
        flags = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        p.add_argument(*flags, **kw)

    add("dataset-path", help="class folders (conditional) or any image folder (unconditional)")
    add("run-name", help="run folder name under models/ (default DDPM_conditional / DDPM_Unconditional)")
    add("work-dir", help="root for models/, results/, runs/ (default: current folder)")
    add("unconditional", action="store_true", default=None, help="train without class labels")
    add("num-classes", type=int, help="must match the number of class folders (default: counted)")
    add("image-size", type=int, help="square side in pixels, divisible by 8 (default 64)")
    add("channels", choices=["auto", "1", "3"], help="image channels; auto = 1 if all images are grayscale")
    add("base-channels", type=int, help="UNet base width (default 64 -> widths 64/128/256)")
    add("time-dim", type=int, help="time/class embedding size (default 256)")
    add("noise-steps", type=int, help="diffusion steps T (default 1000)")
    add("schedule", choices=["linear", "cosine"], help="beta schedule (default linear)")
    add("epochs", type=int, help="total epochs of the run (default 300)")
    add("batch-size", type=int, help="images per process per step (default 14)")
    p.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", type=float,
                   help="AdamW learning rate (default 3e-4)")
    add("weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    add("lr-schedule", choices=["constant", "cosine"], help="after warmup (default constant)")
    add("warmup-steps", type=int, help="linear LR warmup steps (default 0)")
    add("grad-clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    add("ema-decay", type=float, help="EMA decay per step (default 0.995)")
    add("ema-start", type=int, help="steps before the EMA starts averaging (default 2000)")
    add("cfg-dropout", type=float, help="probability a label is replaced by 'no class' (default 0.1)")
    add("random-flip", action="store_true", default=None, help="random horizontal flips (default off)")
    add("mixed-precision", choices=["no", "fp16", "bf16"], help="autocast precision (default no)")
    add("seed", type=int, help="global seed (default 42); rank r uses seed*world_size+r")
    add("save-every-steps", type=int, help="also checkpoint every N steps (mid-epoch; 0 = off)")
    p.add_argument("--ckpt-every", "--ckpt_every", "--save-every", "--save_every", dest="save_every_steps",
                   type=int, help=argparse.SUPPRESS)
    add("save-every-epochs", type=int, help="checkpoint every N epochs (default 1)")
    add("sample-every", type=int, help="sample grid every N epochs, 0 = never (default 10)")
    add("grid-images", type=int, help="images in each sample grid (default 16)")
    add("sampler", choices=["ddpm", "ddim"], help="sampler for the grids (default ddpm)")
    add("sampling-steps", type=int, help="grid sampling steps (default: T for ddpm, 50 for ddim)")
    add("cfg-scale", type=float, help="guidance scale of the grids (default 3)")
    add("max-minutes", type=float, help="stop (checkpoint, exit 0) after this much training time; 0 = off")
    add("log-every", type=int, help="log line every N steps (default 50)")
    add("num-workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on GPU)")
    add("device", help="auto (default), cpu, cuda")
    add("compile", action="store_true", default=None, help="torch.compile the UNet")
    add("channels-last", action="store_true", default=None, help="channels_last memory format")
    add("resume", action="store_true", help="continue models/<run_name>/ from train_state.pt")
    add("trust-checkpoint", action="store_true", help="allow loading a pickled (non-plain) checkpoint")
    return p


def build_parser():
    """Parser of `python train.py`."""
    return add_train_args(argparse.ArgumentParser(description="Train a pixel-space DDPM."))


def default_args(conditional=True):
    """Namespace with every training setting at its parser default (for launch() functions)."""
    args = build_parser().parse_args([])
    args.unconditional = not conditional
    return args


# ---------------------------------------------------------------- configuration
def resolve_config(args, stored=None):
    """Merge flags, defaults and (on resume) the stored config into one plain dict; validate ranges."""
    given = {k: v for k, v in vars(args).items() if v is not None}
    conditional = not bool(given.get("unconditional", False))
    cfg = dict(DEFAULTS)
    cfg["conditional"] = conditional
    warnings = []
    if stored is not None:
        if given.get("unconditional") and stored["conditional"]:
            raise UserError("--unconditional disagrees with the run being resumed, which is class-conditional")
        for k in ARCH_KEYS:
            if k in given and k != "conditional" and str(given[k]) != str(stored[k]) and \
                    not (k == "channels" and given[k] == "auto"):
                raise UserError(f"--{k.replace('_', '-')} {given[k]} disagrees with the run being resumed, which "
                                f"has {k}={stored[k]}; drop the flag or start a new --run-name")
        for k in TRAJECTORY_KEYS:
            if k in given and given[k] != stored[k]:
                warnings.append(f"warning: --{k.replace('_', '-')} {given[k]} ignored on resume; "
                                f"the run keeps {k}={stored[k]} (needed to continue it exactly)")
        cfg.update(stored)
        for k in ("dataset_path", "epochs", "save_every_steps", "save_every_epochs", "sample_every", "grid_images",
                  "sampler", "sampling_steps", "cfg_scale", "log_every", "max_minutes", "num_workers", "device", "compile",
                  "channels_last", "work_dir"):
            if k in given:
                cfg[k] = given[k]
    else:
        cfg.update({k: v for k, v in given.items() if k in DEFAULTS or k == "dataset_path"})
        cfg["conditional"] = conditional
    if not cfg.get("run_name"):
        cfg["run_name"] = "DDPM_conditional" if conditional else "DDPM_Unconditional"
    if not cfg.get("dataset_path"):
        raise UserError("--dataset-path is required (a folder of class folders, or of images with --unconditional)")
    checks = [("image_size", cfg["image_size"] >= 8 and cfg["image_size"] % 8 == 0,
               "must be a positive multiple of 8 (the UNet halves it 3 times), e.g. 32, 64, 128"),
              ("epochs", cfg["epochs"] >= 1, "must be >= 1"),
              ("batch_size", cfg["batch_size"] >= 1, "must be >= 1"),
              ("lr", cfg["lr"] > 0, "must be > 0"),
              ("base_channels", cfg["base_channels"] >= 4 and cfg["base_channels"] % 4 == 0,
               "must be a multiple of 4, >= 4"),
              ("time_dim", cfg["time_dim"] >= 4, "must be >= 4"),
              ("noise_steps", cfg["noise_steps"] >= 2, "must be >= 2"),
              ("cfg_dropout", 0.0 <= cfg["cfg_dropout"] < 1.0, "must be in [0, 1)"),
              ("ema_decay", 0.0 <= cfg["ema_decay"] < 1.0, "must be in [0, 1)"),
              ("warmup_steps", cfg["warmup_steps"] >= 0, "must be >= 0"),
              ("grad_clip", cfg["grad_clip"] >= 0, "must be >= 0"),
              ("save_every_steps", cfg["save_every_steps"] >= 0, "must be >= 0"),
              ("save_every_epochs", cfg["save_every_epochs"] >= 1, "must be >= 1"),
              ("sample_every", cfg["sample_every"] >= 0, "must be >= 0"),
              ("grid_images", cfg["grid_images"] >= 1, "must be >= 1"),
              ("log_every", cfg["log_every"] >= 1, "must be >= 1"),
              ("max_minutes", cfg["max_minutes"] >= 0, "must be >= 0"),
              ("num_classes", cfg["num_classes"] is None or cfg["num_classes"] >= 1, "must be >= 1"),
              ("num_workers", cfg["num_workers"] is None or cfg["num_workers"] >= 0, "must be >= 0")]
    for key, ok, msg in checks:
        if not ok:
            raise UserError(f"--{key.replace('_', '-')} {cfg[key]} {msg}")
    if cfg["sampling_steps"] is not None and not 1 <= cfg["sampling_steps"] <= cfg["noise_steps"]:
        raise UserError(f"--sampling-steps {cfg['sampling_steps']} must be between 1 and --noise-steps "
                        f"{cfg['noise_steps']}")
    cfg["dataset_path"] = str(cfg["dataset_path"])
    return cfg, warnings


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


def cpu_state(sd):
    """State dict with every tensor detached and on the CPU (loadable without a GPU)."""
    return {k: v.detach().cpu().clone() for k, v in sd.items()}


def model_config(cfg, channels, num_classes):
    """Constructor arguments of the UNet for this run (stored in config.json / train_state.pt)."""
    return {"c_in": channels, "c_out": channels, "img_size": cfg["image_size"], "time_dim": cfg["time_dim"],
            "base_channels": cfg["base_channels"], "num_classes": num_classes}


def run_info(cfg, class_names, step, epoch):
    """The config.json written beside ckpt.pt: what inference needs to rebuild the model."""
    return {"model_type": MODEL_TYPE, "model": model_config(cfg, cfg["channels"], cfg["num_classes"]),
            "diffusion": {k: cfg[k] for k in ("noise_steps", "schedule", "beta_start", "beta_end")},
            "class_names": class_names, "step": step, "epoch": epoch, "train": cfg}


def save_run(paths, model, ema, opt, scaler, sched, cfg, class_names, step, epoch, batch_in_epoch, logger):
    """Write ckpt.pt, ema_ckpt.pt, config.json and train_state.pt (atomically, rank 0 only)."""
    model_sd, ema_sd = cpu_state(model.state_dict()), cpu_state(ema.state_dict())
    atomic_torch_save(model_sd, paths["ckpt"])
    atomic_torch_save(ema_sd, paths["ema"])
    atomic_write_text(json.dumps(run_info(cfg, class_names, step, epoch), indent=2), paths["config"])
    state = {"model_type": MODEL_TYPE, "format_version": 1, "model": model_sd, "ema": ema_sd,
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "lr_scheduler": sched.state_dict(),
             "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "config": cfg,
             "class_names": class_names, "rng": rng_state()}
    atomic_torch_save(state, paths["state"])
    logger.info(f"saved checkpoint at step {step} (epoch {epoch}, batch {batch_in_epoch}) -> {paths['state'].parent}")


def sample_grid(diffusion, model, cfg, step, epoch, paths, writer, device, dtype, logger):
    """Sample a grid with the EMA model (fixed seeds) and write it to results/ and TensorBoard."""
    n = cfg["grid_images"]
    labels = torch.arange(n, device=device) % cfg["num_classes"] if cfg["conditional"] else None
    imgs = diffusion.sample(model, n, labels=labels, cfg_scale=cfg["cfg_scale"], sampler=cfg["sampler"],
                            steps=cfg["sampling_steps"], seeds=list(range(n)), autocast_dtype=dtype,
                            progress=True)
    ncol = min(cfg["num_classes"], 16) if cfg["conditional"] else grid_columns(n)
    grid = make_grid(imgs.cpu(), ncol)
    path = paths["results"] / f"epoch{epoch + 1:04d}_ema.png"
    save_image_atomic(grid, path)
    if writer is not None:
        writer.add_image("samples_ema", grid, step)
    t = diffusion.last_timing
    logger.info(f"sample grid -> {path} ({t['images']} images x {t['steps']} steps in {t['seconds']:.1f} s)")


def _fault_step(name):
    """Testing hooks: DIFFUSION_FAULT_<name>=N fires at (1-based) optimizer step N; None when unset."""
    v = os.environ.get(f"DIFFUSION_FAULT_{name}")
    return int(v) if v else None


def train(args):
    """Validate inputs, then train (one process or torchrun DDP). Returns the run folder."""
    # ---- everything that can be wrong with the inputs is checked before any heavy work or writing
    work_dir = Path(getattr(args, "work_dir", None) or DEFAULTS["work_dir"])
    conditional = not bool(getattr(args, "unconditional", False))
    run_name = getattr(args, "run_name", None) or ("DDPM_conditional" if conditional else "DDPM_Unconditional")
    run_dir = work_dir / "models" / run_name
    state_path = run_dir / "train_state.pt"
    stored_state = None
    if getattr(args, "resume", False):
        if not state_path.is_file():
            raise UserError(f"--resume: {state_path} does not exist (nothing to resume); check --run-name / "
                            f"--work-dir or start without --resume")
        stored_state = load_checkpoint(state_path, getattr(args, "trust_checkpoint", False))
        if not isinstance(stored_state, dict) or stored_state.get("model_type") != MODEL_TYPE:
            kind = stored_state.get("model_type") if isinstance(stored_state, dict) else type(stored_state).__name__
            raise UserError(f"{state_path} is not a DDPM training state (model_type={kind!r})")
        if not getattr(args, "run_name", None):
            args.run_name = run_name
    elif state_path.exists():
        raise UserError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                        f"--run-name")
    cfg, warnings = resolve_config(args, stored_state["config"] if stored_state else None)
    cfg["run_name"], cfg["work_dir"] = run_name, str(work_dir)
    dataset = ImageFolderDataset(cfg["dataset_path"], cfg["image_size"], cfg["channels"], cfg["conditional"],
                                 cfg["num_classes"])
    if stored_state is not None and dataset.class_names != stored_state["class_names"]:
        raise UserError(f"the classes of {cfg['dataset_path']} ({', '.join(dataset.class_names[:10])}) differ from "
                        f"the run being resumed ({', '.join(stored_state['class_names'][:10])})")
    cfg["channels"] = dataset.channels
    cfg["num_classes"] = len(dataset.class_names) if cfg["conditional"] else None
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if len(dataset) // world_env < cfg["batch_size"]:
        raise UserError(f"{cfg['dataset_path']} has {len(dataset)} images: too few for --batch-size "
                        f"{cfg['batch_size']} on {world_env} process(es); lower --batch-size")
    for d in (run_dir, work_dir / "results" / run_name, work_dir / "runs" / run_name):
        check_writable(d)

    # ---- distributed, device, precision
    rank, world, local_rank, device = setup_distributed(cfg["device"])
    cfg["world_size"] = world
    logger = get_logger(run_dir / "log.txt" if rank == 0 else None, rank)
    for w in warnings:
        logger.warning(w)
    if stored_state is not None and stored_state["config"].get("world_size", world) != world:
        logger.warning(f"warning: the run used {stored_state['config']['world_size']} processes, now {world}: "
                       f"it continues, but the data order is no longer that of an uninterrupted run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    amp_dtype, use_scaler = setup_precision(cfg["mixed_precision"], device, logger)
    seed = cfg["seed"] * world + rank  # per-rank seed
    torch.manual_seed(seed)

    paths = {"ckpt": run_dir / "ckpt.pt", "ema": run_dir / "ema_ckpt.pt", "state": state_path,
             "config": run_dir / "config.json", "results": work_dir / "results" / run_name}

    # ---- model, EMA, optimiser
    mcfg = model_config(cfg, cfg["channels"], cfg["num_classes"])
    model = (UNet_conditional(**mcfg) if cfg["conditional"] else UNet(**{k: v for k, v in mcfg.items()
                                                                        if k != "num_classes"})).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model, cfg["ema_decay"], cfg["ema_start"])
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                            fused=fused or None, foreach=None if fused else True)
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg["seed"], drop_last=False)
    batches = ResumableBatches(sampler, cfg["batch_size"])
    total_steps = batches.per_epoch * cfg["epochs"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    diffusion = Diffusion(cfg["noise_steps"], cfg["beta_start"], cfg["beta_end"], cfg["image_size"], device,
                          cfg["schedule"], cfg["channels"])

    step, start_epoch, skip = 0, 0, 0
    if stored_state is not None:
        try:
            model.load_state_dict(stored_state["model"])
            ema.load_state_dict(stored_state["ema"])
        except RuntimeError as e:
            raise UserError(f"{state_path} does not fit the configured model: {str(e).splitlines()[0][:200]}")
        opt.load_state_dict(stored_state["optimizer"])
        scaler.load_state_dict(stored_state["scaler"])
        sched.load_state_dict(stored_state["lr_scheduler"])
        step, start_epoch, skip = stored_state["step"], stored_state["epoch"], stored_state["batch_in_epoch"]
        if skip >= batches.per_epoch:
            start_epoch, skip = start_epoch + 1, 0
        if rank == 0:
            set_rng_state(stored_state["rng"])
        logger.info(f"resumed {state_path} at step {step} (epoch {start_epoch}, batch {skip} of "
                    f"{batches.per_epoch})")
        del stored_state

    logger.info(f"DDPM {'class-conditional' if cfg['conditional'] else 'unconditional'} run '{run_name}': "
                f"{len(dataset)} images, {cfg['image_size']}x{cfg['image_size']}x{cfg['channels']}"
                + (f", {cfg['num_classes']} classes" if cfg["conditional"] else ""))
    logger.info(f"world size {world} ({'DDP ' + torch.distributed.get_backend() if is_dist() else 'single process'}), "
                f"device {device}, batch {cfg['batch_size']}/process = {cfg['batch_size'] * world} global, "
                f"{batches.per_epoch} steps/epoch, precision {cfg['mixed_precision']}")
    components = {"UNet (trained)": model, "EMA copy (not trained)": ema.model}
    logger.info("parameters:\n" + parameter_table(components))
    if rank == 0:
        atomic_write_text(json.dumps(run_info(cfg, dataset.class_names, step, start_epoch), indent=2),
                          paths["config"])

    fwd = model
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    if cfg["compile"]:
        fwd = torch.compile(fwd)
    workers = cfg["num_workers"] if cfg["num_workers"] is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(work_dir / "runs" / run_name))

    # SIGTERM (schedulers send it before killing): finish the step, checkpoint, exit 0.
    stop = {"flag": False}
    prev_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("flag", True))
    gen = torch.Generator(device=device)
    nan_at, term_at, kill_at = _fault_step("NAN_AT_STEP"), _fault_step("SIGTERM_AT_STEP"), _fault_step("KILL_AT_STEP")
    win_loss, win_steps, win_start = 0.0, 0, time.perf_counter()
    last_saved = step
    deadline = time.time() + cfg["max_minutes"] * 60 if cfg["max_minutes"] else None
    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            batches.set_epoch(epoch, skip)
            pos = skip
            skip = 0
            for x, y, idx in loader:
                if term_at is not None and step + 1 == term_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # testing hook: behave as if the scheduler sent it
                x = x.to(device, non_blocking=True)
                if cfg["random_flip"]:
                    flips = flip_mask(idx, cfg["seed"], epoch).to(device)[:, None, None, None]
                    x = torch.where(flips, x.flip(3), x)
                if cfg["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                # Noise, timesteps and label dropout depend only on (seed, rank, step): exact on resume.
                gen.manual_seed(mix_seed(cfg["seed"], rank, step))
                t = torch.randint(0, cfg["noise_steps"], (x.shape[0],), generator=gen, device=device)
                noise = torch.randn(x.shape, generator=gen, device=device)
                labels = None
                if cfg["conditional"]:
                    labels = y.to(device, non_blocking=True)
                    drop = torch.rand(x.shape[0], generator=gen, device=device) < cfg["cfg_dropout"]
                    labels = torch.where(drop, torch.full_like(labels, cfg["num_classes"]), labels)
                x_t, _ = diffusion.noise_images(x, t, noise)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    pred = fwd(x_t, t, labels) if labels is not None else fwd(x_t, t)
                loss = F.mse_loss(pred.float(), noise)
                if nan_at is not None and step + 1 == nan_at:
                    loss = loss * float("nan")  # testing hook DIFFUSION_FAULT_NAN_AT_STEP
                # One all-reduce per step: the loss averaged over ranks and the SIGTERM flag of any rank.
                out_of_time = deadline is not None and time.time() > deadline
                stats = torch.stack([loss.detach().float(), torch.tensor(float(stop["flag"] or out_of_time),
                                                                         device=device)])
                if is_dist():
                    torch.distributed.all_reduce(stats)
                mean_loss, stop_now = stats[0].item() / world, stats[1].item() > 0
                if not math.isfinite(mean_loss):
                    good = f"{state_path} (step {last_saved})" if state_path.exists() else "none written yet"
                    raise TrainingError(f"loss is {mean_loss} at step {step + 1} (epoch {epoch}); stopped before "
                                        f"the optimizer step. Last good checkpoint: {good}. Try a lower --lr or "
                                        f"--mixed_precision no")
                scaler.scale(loss).backward()
                if cfg["grad_clip"] > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step += 1
                pos += 1
                ema.update(model, step)
                win_loss, win_steps = win_loss + mean_loss, win_steps + 1
                if step % cfg["log_every"] == 0:
                    dt = time.perf_counter() - win_start
                    mem = (f", mem {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GB"
                           if device.type == "cuda" else "")
                    logger.info(f"step {step} epoch {epoch} loss {win_loss / win_steps:.4f} "
                                f"lr {sched.get_last_lr()[0]:.2e} {win_steps / dt:.2f} steps/s "
                                f"{win_steps * cfg['batch_size'] * world / dt:.1f} images/s{mem}")
                    if writer is not None:
                        writer.add_scalar("loss", win_loss / win_steps, step)
                        writer.add_scalar("lr", sched.get_last_lr()[0], step)
                        writer.add_scalar("steps_per_sec", win_steps / dt, step)
                    win_loss, win_steps, win_start = 0.0, 0, time.perf_counter()
                periodic = cfg["save_every_steps"] and step % cfg["save_every_steps"] == 0
                if stop_now or periodic:
                    if rank == 0:
                        save_run(paths, model, ema, opt, scaler, sched, cfg, dataset.class_names, step, epoch,
                                 pos, logger)
                    last_saved = step
                    barrier()
                if stop_now:
                    why = "SIGTERM received" if stop["flag"] else f"--max-minutes {cfg['max_minutes']:g} reached"
                    logger.info(f"{why}: checkpoint written at step {step} (epoch {epoch}); exiting. "
                                f"Continue with --resume.")
                    if writer is not None:
                        writer.close()
                    finish_distributed()
                    return run_dir
                if kill_at is not None and step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)  # testing hook: an abrupt crash (no cleanup)
            last_epoch = epoch + 1 == cfg["epochs"]
            if rank == 0 and (last_epoch or (epoch + 1) % cfg["save_every_epochs"] == 0) and last_saved != step:
                save_run(paths, model, ema, opt, scaler, sched, cfg, dataset.class_names, step, epoch,
                         batches.per_epoch, logger)
                last_saved = step
            if rank == 0 and cfg["sample_every"] and (epoch + 1) % cfg["sample_every"] == 0:
                sample_grid(diffusion, ema.model, cfg, step, epoch, paths, writer, device, amp_dtype, logger)
            barrier()
    finally:
        signal.signal(signal.SIGTERM, prev_handler)
    if writer is not None:
        writer.close()
    logger.info(f"training finished: {step} steps, {cfg['epochs']} epochs. Checkpoints: {paths['ckpt']}, "
                f"{paths['ema']} (resume state {paths['state']})")
    finish_distributed()
    return run_dir


def main(argv=None):
    """CLI entry: parse flags, train, turn input errors into one-line messages."""
    args = build_parser().parse_args(argv)
    run_main(train, args)


if __name__ == "__main__":
    main()
