"""Train a class-conditional DiT on the latents of a frozen VAE; resumable, under torchrun or python.

    torchrun --nnodes=1 --nproc_per_node=4 train.py --model DiT-B/2 --data-path /path/to/data \
        --results-dir ./results --image-size 256 --num-classes 8 --global-batch-size 256 --epochs 1400
    python train.py ... --resume auto        # continue the latest run of that model, bit-exactly

Runs go to numbered folders (results/000-DiT-B-2/) with log.txt, tensorboard/ and
checkpoints/0050000.pt (plain dicts: model, ema, opt, args, step, ... -> loadable with weights_only).
Testing hook: DIFFUSION_FAULT_NAN_AT_STEP=N makes the loss NaN at step N (to test the NaN stop).
"""
import os
import re
import shutil
import signal
import sys
import time
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from dataset import (CachedLatentDataset, ImageFolderDataset, ResumableSampler, cache_path,
                     data_fingerprint, encode_posterior)
from diffusion import create_diffusion
from models import ALL_MODELS
from utils import (FlagParser, UserError, atomic_save, autocast, barrier, check_writable,
                   create_logger, finish_distributed, load_checkpoint, load_vae, param_table,
                   resolve_precision, run_main, setup_distributed, vae_fingerprint)

CKPT_RE = re.compile(r"^(\d{7})\.pt$")
# Flags whose change makes a resumed run a different experiment.
RESUME_MUST_MATCH = ("model", "image_size", "num_classes", "global_batch_size", "global_seed",
                     "class_dropout_prob", "learn_sigma")


def parse_args(argv=None):
    """Training flags (the spec's names and defaults, plus resume / precision / caching)."""
    p = FlagParser(description="Train DiT on class folders of images.")
    p.add_argument("--model", choices=list(ALL_MODELS), default="DiT-B/2")
    p.add_argument("--data-path", required=True, help="folder with one sub-folder per class")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=8, help="must equal the number of class folders")
    p.add_argument("--global-batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1400)
    p.add_argument("--max-train-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--vae", default="ema", help="ema | mse | <hub id> | <AutoencoderKL folder>")
    p.add_argument("--num-workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=50_000)
    p.add_argument("--grid-every", type=int, default=None,
                   help="TensorBoard sample grid every N steps (default: at each checkpoint; 0: never)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for CFG")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no horizontal flips")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="auto: bf16 where the hardware has it, fp16 on older GPUs, else fp32")
    p.add_argument("--cache-latents", action="store_true",
                   help="encode the data set once (posterior mean/std, flipped too) and reuse it")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", default=None, help="auto (latest run of this model) or a checkpoint path")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a checkpoint that contains pickled Python objects")
    args = p.parse_args(argv)
    args.learn_sigma = True
    checks = [
        (args.image_size <= 0 or args.image_size % 8, "--image-size must be a positive multiple of 8"),
        (args.num_classes < 1, "--num-classes must be at least 1"),
        (args.global_batch_size < 1, "--global-batch-size must be at least 1"),
        (args.epochs < 1, "--epochs must be at least 1"),
        (args.max_train_steps is not None and args.max_train_steps < 1, "--max-train-steps must be >= 1"),
        (args.log_every < 1, "--log-every must be at least 1"),
        (args.ckpt_every < 1, "--ckpt-every must be at least 1"),
        (args.num_workers < 0, "--num-workers must be >= 0"),
        (not 0 <= args.ema_decay <= 1, "--ema-decay must be in [0, 1]"),
        (not 0 <= args.class_dropout_prob < 1, "--class-dropout-prob must be in [0, 1)"),
        (args.lr <= 0, "--lr must be positive"),
    ]
    for bad, msg in checks:
        if bad:
            raise UserError(msg)
    return args


# ----------------------------------------------------------------------------- helpers
def step_seed(global_seed, rank, step):
    """Seed of all randomness of (rank, step): resume needs no RNG stream, only the step."""
    return int(np.random.SeedSequence([global_seed, rank, step]).generate_state(1)[0])


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    ema_params = dict(ema.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    e = [ema_params[n] for n in names]
    m = [p.detach() for _, p in model.named_parameters()]
    torch._foreach_mul_(e, decay)
    torch._foreach_add_(e, m, alpha=1 - decay)


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
    """(run_dir or None, checkpoint path or None) for --resume."""
    if args.resume is None:
        return None, None
    if args.resume == "auto":
        for run in reversed(run_folders(args.results_dir, args.model)):
            ckpt = latest_checkpoint(run)
            if ckpt is not None:
                return run, ckpt
        return None, None
    path = Path(args.resume)
    if path.is_dir():  # a run folder
        ckpt = latest_checkpoint(path)
        if ckpt is None:
            raise UserError(f"--resume {path}: no checkpoints/NNNNNNN.pt in that folder")
        return path, ckpt
    if not path.is_file():
        raise UserError(f"--resume {path}: no such checkpoint (pass auto, a run folder or a .pt file)")
    return path.resolve().parent.parent, path


def check_resume_checkpoint(ckpt, path, args):
    """Refuse a checkpoint of another model type or of a different experiment."""
    if ckpt.get("model_type") != "dit":
        what = ckpt.get("model_type") or "an unknown model (no model_type)"
        raise UserError(f"{path} is a checkpoint of {what}, not of a DiT training run")
    for key in ("model", "opt", "ema", "args", "step"):
        if key not in ckpt:
            raise UserError(f"{path} has no '{key}' entry: it cannot be resumed (start a new run)")
    old = ckpt["args"]
    for key in RESUME_MUST_MATCH:
        if key in old and old[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{path} was trained with {flag} {old[key]}, not {getattr(args, key)}: "
                            f"pass the same value to resume, or start a new run without --resume")


def make_latents(batch, vae, scale, shift, cached, device, precision):
    """Latents for a batch: posterior mean + std * N(0, 1), times the VAE's scaling factor.

    Drawing the noise ourselves (not latent_dist.sample()) makes cached and on-the-fly latents equal.
    """
    if cached:
        mean, std, y = batch
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
    fingerprint = data_fingerprint(dataset.samples, dataset.classes, args.image_size,
                                   info["image_channels"]) + vae_fingerprint(vae)
    if path.is_file():
        try:
            cache = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt
            cache = {}
        if cache.get("fingerprint") == fingerprint:
            logger.info(f"Reusing cached latents {path} ({len(dataset)} images)")
            return cache
        logger.info(f"Latent cache {path} is stale (data or VAE changed): re-encoding")
    logger.info(f"Encoding {len(dataset)} images (and their mirror images) into {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(dataset), world))
    means, stds = [], []
    bs = 32
    for i in range(0, len(mine), bs):
        x = torch.stack([dataset.load(j) for j in mine[i:i + bs]]).to(device)
        m0, s0 = encode_posterior(vae, x)
        m1, s1 = encode_posterior(vae, x.flip(-1))
        means.append(torch.stack([m0, m1], 1).cpu())
        stds.append(torch.stack([s0, s1], 1).cpu())
    part = path.with_name(path.name + f".part{rank}")
    atomic_save({"idx": torch.tensor(mine), "mean": torch.cat(means), "std": torch.cat(stds)}, part)
    barrier()
    if rank == 0:
        parts = [torch.load(path.with_name(path.name + f".part{r}"), weights_only=True) for r in range(world)]
        shape = parts[0]["mean"].shape[1:]
        mean = torch.empty(len(dataset), *shape)
        std = torch.empty(len(dataset), *shape)
        for prt in parts:
            mean[prt["idx"]] = prt["mean"]
            std[prt["idx"]] = prt["std"]
        atomic_save({"fingerprint": fingerprint, "mean": mean, "std": std,
                     "data_path": dataset.root, "vae": info["vae"]}, path)
        for r in range(world):
            path.with_name(path.name + f".part{r}").unlink()
    barrier()
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def save_checkpoint(state, path, logger):
    """Rank 0 writes atomically; every rank learns whether it worked (no rank hangs on a full disk)."""
    ok = torch.ones(1)
    if dist.get_rank() == 0 if dist.is_initialized() else True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(state, path)
            logger.info(f"Saved checkpoint to {path}")
        except (OSError, RuntimeError) as e:
            # torch.save's zip writer reports a full disk as RuntimeError ('inline_container'/'PytorchStreamWriter')
            if isinstance(e, RuntimeError) and "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else \
                f"the write failed (disk full? {shutil.disk_usage(path.parent).free // 1024} KiB free)"
            print(f"error: cannot write {path}: {reason}; the previous checkpoint is intact",
                  file=sys.stderr, flush=True)
            ok.zero_()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 0:
        os._exit(1)


@torch.no_grad()
def log_sample_grid(writer, ema, vae, info, classes, latent_size, step, device):
    """A TensorBoard grid from the EMA model: one image per class (<= 16), 25 DDIM steps, CFG 4."""
    from torchvision.utils import make_grid
    n = min(len(classes), 16)
    g = torch.Generator(device).manual_seed(0)
    z = torch.randn(n, info["latent_channels"], latent_size, latent_size, generator=g, device=device)
    y = torch.arange(n, device=device)
    diffusion = create_diffusion("ddim25")
    ema.eval()
    fn = lambda x, t, y, cfg_scale: ema.forward_with_cfg(x, t, y, cfg_scale, guide_all_channels=True)  # noqa: E731
    out = diffusion.ddim_sample_loop(fn, (2 * n, *z.shape[1:]), torch.cat([z, z]), clip_denoised=False,
                                     model_kwargs={"y": torch.cat([y, torch.full_like(y, ema.num_classes)]),
                                                   "cfg_scale": 4.0}, device=device)[:n]
    img = vae.decode(out / info["scaling_factor"] + info["shift_factor"]).sample.clamp(-1, 1) * 0.5 + 0.5
    writer.add_image("samples/ema_ddim25_cfg4", make_grid(img.float().cpu(), nrow=min(n, 8)), step)


# ----------------------------------------------------------------------------- main
def main(args):
    """Train (or resume) a DiT run."""
    rank, world, device = setup_distributed()
    logger = create_logger(None, rank)
    if args.global_batch_size % world:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                        f"{world} processes")
    local_batch = args.global_batch_size // world
    resume_dir, resume_path = find_resume(args)
    ckpt = None
    if args.resume == "auto" and resume_path is None:
        logger.info(f"--resume auto: no checkpoint of {args.model} under {args.results_dir}; starting a new run")
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, trust=args.trust_checkpoint)
        check_resume_checkpoint(ckpt, resume_path, args)

    # Everything that can be wrong with the input is checked before the run folder is created, the
    # data first: it is quick, while loading a hub VAE offline spends half a minute on retries.
    dataset = ImageFolderDataset(args.data_path, args.image_size, channels=None)
    if len(dataset.classes) != args.num_classes:
        raise UserError(f"--num-classes {args.num_classes} but {args.data_path} has "
                        f"{len(dataset.classes)} class folders ({', '.join(dataset.classes[:20])})")
    if len(dataset) < args.global_batch_size:
        raise UserError(f"{args.data_path} has {len(dataset)} images, fewer than --global-batch-size "
                        f"{args.global_batch_size}")
    if ckpt is not None and ckpt.get("class_names") not in (None, dataset.classes):
        raise UserError(f"{resume_path} was trained on classes {ckpt['class_names']}, but "
                        f"{args.data_path} has {dataset.classes}")
    vae, info = load_vae(args.vae, device)
    dataset.channels = info["image_channels"]
    latent_size, rem = divmod(args.image_size, info["factor"])
    patch = int(args.model.rsplit("/", 1)[1])
    if rem or latent_size % patch:
        raise UserError(f"--image-size {args.image_size} gives latents of {args.image_size / info['factor']:g}"
                        f" pixels (VAE factor {info['factor']}), not divisible by the patch size {patch} "
                        f"of {args.model}: use a multiple of {info['factor'] * patch}")

    # Run folder: rank 0 decides, every rank learns it.
    if rank == 0:
        Path(args.results_dir).mkdir(parents=True, exist_ok=True)
        check_writable(args.results_dir)
        run_dir = resume_dir if resume_dir is not None else new_run_dir(args.results_dir, args.model)
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        check_writable(run_dir / "checkpoints")
    else:
        run_dir = None
    if dist.is_initialized():
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    logger = create_logger(run_dir, rank)
    logger.info(f"World size {world}, device {device}, run folder {run_dir}")

    precision = resolve_precision(args.mixed_precision, device, logger)
    torch.manual_seed(args.global_seed)  # same initial weights on every rank and for every world size
    np.random.seed(args.global_seed * world + rank)
    model = ALL_MODELS[args.model](input_size=latent_size, in_channels=info["latent_channels"],
                                   num_classes=args.num_classes, class_dropout_prob=args.class_dropout_prob,
                                   learn_sigma=args.learn_sigma).to(device)
    ema = deepcopy(model).requires_grad_(False)
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=fused, foreach=None if fused else True)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    step, epoch, batch_in_epoch = 0, 0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt.get("epoch", 0), ckpt.get("batch_in_epoch", 0)
        if ckpt.get("world_size", world) != world:
            logger.warning(f"checkpoint was written by {ckpt['world_size']} processes, now {world}: the run "
                           f"continues, but not bit-identically to an uninterrupted one")
        logger.info(f"Resumed from {resume_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    else:
        update_ema(ema, model, decay=0)  # EMA starts as a copy of the initial weights
    ema.eval()
    del ckpt
    for line in param_table({"VAE": vae, "DiT": model}):
        logger.info(line)
    logger.info(f"{args.model}: latents {info['latent_channels']}x{latent_size}x{latent_size}, "
                f"{args.num_classes} classes, precision {precision}, {len(dataset)} images")

    if args.cache_latents:
        cache = build_latent_cache(dataset, vae, info, args, rank, world, device, logger)
        train_set = CachedLatentDataset(cache, [lab for _, lab in dataset.samples])
        workers = 0  # tensors already in memory
    else:
        train_set, workers = dataset, args.num_workers
    sampler = ResumableSampler(len(dataset), rank, world, local_batch, args.global_seed, flip=args.flip)
    gpu = device.type == "cuda"
    # An own generator keeps DataLoader from drawing from the global RNG (exact resume).
    loader = DataLoader(train_set, batch_size=local_batch, sampler=sampler, num_workers=workers,
                        pin_memory=gpu, drop_last=True, persistent_workers=workers > 0,
                        generator=torch.Generator())
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = steps_per_epoch * args.epochs
    if args.max_train_steps is not None:
        total_steps = min(total_steps, args.max_train_steps)
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0

    diffusion = create_diffusion(timestep_respacing="")
    ddp = DDP(model, device_ids=[device.index] if gpu else None) if dist.is_initialized() else model
    train_model = torch.compile(ddp) if args.compile else ddp
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    grid_every = args.ckpt_every if args.grid_every is None else args.grid_every

    stop_requested = False
    sigterm = [False]  # set by the handler; ranks agree on it through the per-step all_reduce
    signal.signal(signal.SIGTERM, lambda signum, frame: sigterm.__setitem__(0, True))
    nan_at = int(os.environ.get("DIFFUSION_FAULT_NAN_AT_STEP", "0"))  # testing hook, see docstring

    def state():
        return {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "args": {k: v for k, v in vars(args).items()}, "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "model_type": "dit", "class_names": dataset.classes,
                "config": {"model": args.model, "input_size": latent_size, "image_size": args.image_size,
                           "in_channels": info["latent_channels"], "num_classes": args.num_classes,
                           "class_dropout_prob": args.class_dropout_prob, "learn_sigma": args.learn_sigma,
                           "grayscale": dataset.grayscale},
                "vae": info, "world_size": world,
                # For inspection only: every step reseeds from (seed, rank, step), which is what makes
                # a resumed run bit-identical without replaying RNG streams.
                "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist(),
                        "cuda": torch.cuda.get_rng_state_all() if gpu else []}}

    args.data_path = os.path.abspath(args.data_path)
    model.train()
    logger.info(f"Training for {total_steps - step} more steps ({steps_per_epoch} per epoch, "
                f"global batch {args.global_batch_size}, {local_batch} per process)")
    running, log_steps, t0 = 0.0, 0, time.time()
    last_saved = step
    while step < total_steps and not stop_requested:
        sampler.set_epoch(epoch, batch_in_epoch)
        for batch in loader:
            seed = step_seed(args.global_seed, rank, step)
            torch.manual_seed(seed)  # seeds CUDA too: latent noise, timesteps, label dropout
            latent, y = make_latents(batch, vae, info["scaling_factor"], info["shift_factor"],
                                     args.cache_latents, device, precision)
            t = torch.randint(0, diffusion.num_timesteps, (latent.shape[0],), device=device)
            with autocast(precision, device):
                loss = diffusion.training_losses(train_model, latent, t, {"y": y})["loss"].mean()
            if nan_at and step + 1 == nan_at:
                loss = loss * float("nan")
            flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(sigterm[0])], device=device)
            if dist.is_initialized():
                dist.all_reduce(flags)
            if flags[0] > 0:
                last = latest_checkpoint(run_dir)
                print(f"error: loss is {loss.item()} at step {step + 1}; stopping before the optimizer "
                      f"step (last good checkpoint: {last or 'none'})", file=sys.stderr, flush=True)
                if dist.is_initialized():
                    os._exit(1)  # the other ranks stop too (same all-reduced flag)
                sys.exit(1)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            update_ema(ema, model, args.ema_decay)
            step += 1
            batch_in_epoch += 1
            running += loss.item()
            log_steps += 1
            if step % args.log_every == 0:
                avg = torch.tensor(running / log_steps, device=device)
                if dist.is_initialized():
                    dist.all_reduce(avg)
                    avg = avg / world
                dt = time.time() - t0
                mem = f", mem {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GB" if gpu else ""
                logger.info(f"(step={step:07d}) train loss: {avg.item():.4f}, lr {args.lr:g}, "
                            f"steps/s: {log_steps / dt:.2f}, images/s: {log_steps * args.global_batch_size / dt:.1f}{mem}")
                if writer:
                    writer.add_scalar("train/loss", avg.item(), step)
                    writer.add_scalar("train/steps_per_sec", log_steps / dt, step)
                    writer.add_scalar("train/lr", args.lr, step)
                running, log_steps, t0 = 0.0, 0, time.time()
            if batch_in_epoch == steps_per_epoch:
                epoch, batch_in_epoch = epoch + 1, 0
            stop_requested = bool(flags[1] > 0)
            if step % args.ckpt_every == 0 or stop_requested or step == total_steps:
                save_checkpoint(state(), run_dir / "checkpoints" / f"{step:07d}.pt", logger)
                last_saved = step
                barrier()
            if writer and grid_every and step % grid_every == 0:
                log_sample_grid(writer, ema, vae, info, dataset.classes, latent_size, step, device)
            if stop_requested or step >= total_steps or batch_in_epoch == 0:
                break
    if stop_requested:
        logger.info(f"SIGTERM received: saved step {step} to {run_dir / 'checkpoints'}; resume with --resume auto")
    else:
        logger.info(f"Done: {step} steps; checkpoints in {run_dir / 'checkpoints'}")
    if last_saved != step:
        save_checkpoint(state(), run_dir / "checkpoints" / f"{step:07d}.pt", logger)
    if writer:
        writer.close()
    finish_distributed()


if __name__ == "__main__":
    run_main(lambda a: main(parse_args(a)), sys.argv[1:])
