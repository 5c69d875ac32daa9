"""Train a ControlNet (mask -> image) on top of a trained LDM, with accelerate.

    python train.py --data_root DATA --ldm_checkpoint ../ldm/ldm_checkpoints/checkpoint_best.pt \
        --output_dir ./controlnet_checkpoints --batch_size 8 --num_epochs 100 --learning_rate 1e-5
    accelerate launch --multi_gpu --num_processes 2 train.py ...same flags...     (batch_size is per process)

The LDM's UNet is frozen by default (--no_freeze_unet trains it too); the ControlNet starts as a copy of the
UNet's encoder. Writes OUTPUT_DIR/checkpoint_best.pt (lowest validation loss), checkpoint_last.pt (--resume),
log.txt, tensorboard/ and samples/ (mask | sample | ground truth grids).
"""
import argparse
import logging
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dataset import (EpochSampler, PairDataset, describe_unpaired, pair_files, read_class_labels, split_indices,
                     validate_pairs)
from models import (EMA, SCHEDULERS, ControlledUNet, DummyEncoder, UserError, build_controlnet, check_same_ldm,
                    count_parameters, decode, encode, format_parameter_table, initial_latents, load_ldm,
                    load_plain_checkpoint, make_sampler, noise_scheduler, plain, sample, training_target)

log = logging.getLogger("controlnet")


def parse_args(argv=None):
    """Command line -> argparse.Namespace (both -/_ spellings of every flag)."""
    p = argparse.ArgumentParser(description="Train a mask-guided ControlNet on top of a trained LDM.")

    def add(name, **kw):
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), **kw)

    add("data_root", required=True, help="folder holding the images and masks folders")
    add("images_folder", default="images")
    add("masks_folder", default="masks")
    add("image_prefix", default="", help="stem prefix of images, e.g. Img_ (pairs Img_001 with seg_001)")
    add("mask_prefix", default="", help="stem prefix of masks, e.g. seg_")
    add("skip_unpaired", action="store_true", help="train on the pairs found and ignore unpaired files")
    add("class_labels_csv", default=None,
        help="CSV of 'image_stem,class_name' rows: condition on the LDM's classes as well as the mask")
    add("mask_channels", type=int, default=1, choices=(1, 3))
    add("ldm_checkpoint", required=True, help="checkpoint_best.pt of ldm/train.py")
    add("vae", default=None, help="override the VAE folder recorded in the LDM checkpoint")
    add("output_dir", default="./controlnet_checkpoints")
    add("batch_size", type=int, default=8, help="per process")
    add("num_epochs", type=int, default=100)
    add("learning_rate", type=float, default=1e-5)
    add("weight_decay", type=float, default=1e-2)
    add("lr_warmup_steps", type=int, default=0)
    add("max_grad_norm", type=float, default=1.0)
    add("freeze_unet", action="store_true", default=True, help="keep the LDM's UNet frozen (default)")
    p.add_argument("--no_freeze_unet", "--no-freeze-unet", "--train_unet", "--train-unet", dest="freeze_unet",
                   action="store_false", help="train the UNet (and the class embedder) together with the ControlNet")
    add("train_encoder", action="store_true",
        help="train the condition encoder even with a frozen UNet (default: it follows the UNet)")
    add("ema_decay", type=float, default=0.9999)
    add("val_fraction", type=float, default=0.1, help="share of pairs held out for the validation loss")
    add("hflip", action="store_true", default=True, help="random horizontal flips (default on)")
    p.add_argument("--no_hflip", "--no-hflip", dest="hflip", action="store_false")
    add("vflip", action="store_true", help="random vertical flips too")
    add("mixed_precision", default="no", choices=("no", "fp16", "bf16"))
    add("compile", action="store_true", help="torch.compile the model")
    add("compile_backend", default="inductor")
    add("seed", type=int, default=42)
    add("num_workers", type=int, default=None, help="DataLoader workers (default: 4 on GPU, 0 on CPU)")
    add("max_steps", type=int, default=0, help="stop after this many optimizer steps in total (0: no limit)")
    add("time_limit_minutes", type=float, default=0,
        help="stop cleanly (validation + checkpoints) after this much training time (0: no limit)")
    add("log_every", type=int, default=50, help="steps between log lines")
    add("save_every_steps", type=int, default=0, help="also write checkpoint_last.pt every N steps (0: per epoch)")
    add("val_every", type=int, default=1, help="epochs between validation/checkpoints")
    add("num_val_samples", type=int, default=4, help="masks in the TensorBoard/PNG sample grid")
    add("sample_steps", type=int, default=25, help="DDIM steps for the sample grid (0: no grid)")
    add("sample_scheduler", default="ddim", choices=SCHEDULERS)
    add("resume", nargs="?", const="auto", default=None,
        help="continue from OUTPUT_DIR/checkpoint_last.pt (or the given checkpoint)")
    add("trust_checkpoint", action="store_true", help="allow checkpoints that hold pickled Python objects")
    args = p.parse_args(argv)
    for flag, ok in (("batch_size", args.batch_size >= 1), ("num_epochs", args.num_epochs >= 1),
                     ("learning_rate", args.learning_rate > 0), ("ema_decay", 0 <= args.ema_decay < 1),
                     ("val_fraction", 0 <= args.val_fraction < 1), ("log_every", args.log_every >= 1),
                     ("save_every_steps", args.save_every_steps >= 0), ("val_every", args.val_every >= 1),
                     ("sample_steps", args.sample_steps >= 0), ("lr_warmup_steps", args.lr_warmup_steps >= 0),
                     ("num_val_samples", args.num_val_samples >= 0),
                     ("max_steps", args.max_steps >= 0), ("time_limit_minutes", args.time_limit_minutes >= 0)):
        if not ok:
            raise UserError(f"--{flag} is out of range: {getattr(args, flag)}")
    return args


# ---------------------------------------------------------------------------------------------- helpers
def resolve_precision(requested):
    """Map --mixed_precision to what this machine runs: fp16 only on CUDA, bf16 only where supported."""
    if requested == "no":
        return "no"
    if torch.cuda.is_available():
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            log.warning("bf16 is not supported on this GPU; using fp16 with a grad scaler")
            return "fp16"
        return requested
    if requested == "fp16":
        if torch.cpu._is_avx512_bf16_supported():
            log.warning("fp16 needs CUDA; using bf16 autocast on this CPU")
            return "bf16"
        log.warning("fp16 needs CUDA and this CPU lacks bf16; training in fp32")
        return "no"
    if not torch.cpu._is_avx512_bf16_supported():
        log.warning("this CPU has no native bf16: bf16 runs emulated (slow); use --mixed_precision no for speed")
    return "bf16"


def setup_logging(output_dir, is_main):
    """Logger to stdout and output_dir/log.txt on the main process only."""
    for h in list(log.handlers):
        h.close()
        log.removeHandler(h)
    log.propagate = False
    log.setLevel(logging.INFO if is_main else logging.ERROR)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    log.addHandler(h)
    if is_main and output_dir is not None:
        fh = logging.FileHandler(Path(output_dir) / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)


def check_writable(folder):
    """UserError when folder (or its nearest existing parent) cannot be written."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    if not os.access(p, os.W_OK):
        raise UserError(f"--output_dir {folder} is not writable ({p} is read-only); choose another --output_dir")


def rng_state():
    """This process's RNG states as plain values/tensors."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": [list(random.getstate()[1]), random.getstate()[0]]}


def set_rng_state(s):
    """Restore what rng_state() returned."""
    torch.set_rng_state(s["torch"])
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((s["python"][1], tuple(s["python"][0]), None))


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def save_checkpoint(accelerator, state, path):
    """Rank 0 writes atomically (temp file + os.replace); every rank learns whether it worked."""
    ok = 1.0
    if accelerator.is_main_process:
        tmp = Path(f"{path}.tmp{os.getpid()}")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:
            tmp.unlink(missing_ok=True)
            # torch.save's zip writer reports a full disk as RuntimeError ('inline_container'/'PytorchStreamWriter')
            if isinstance(e, RuntimeError) and "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
                raise
            reason = e.strerror if isinstance(e, OSError) and e.strerror else \
                f"the write failed (disk full? {shutil.disk_usage(Path(path).parent).free // 1024} KiB free)"
            print(f"error: cannot write {path}: {reason}; the previous checkpoint is intact",
                  file=sys.stderr, flush=True)
            ok = 0.0
    flag = torch.tensor([ok], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, "sum") / accelerator.num_processes  # also the barrier
    if flag.item() < 1:
        raise SystemExit(1)


def gather_rng(accelerator):
    """Every rank's RNG state, in rank order (so a resumed run restores each rank's own stream)."""
    mine = rng_state()
    if accelerator.num_processes == 1:
        return [mine]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, mine)
    return out


def to_grid_channels(x, c):
    """Repeat a 1-channel tensor to c channels for a side-by-side grid."""
    return x.expand(-1, c, -1, -1) if x.shape[1] == 1 and c == 3 else x


# ------------------------------------------------------------------------------------------------- main
def main(argv=None):
    """Entry point: UserError -> `error: ...` on stderr and exit 2."""
    try:
        return train(parse_args(argv))
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def prepare_inputs(args):
    """Everything that can fail on bad input, before any heavy work or any write."""
    root = Path(args.data_root)
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a folder")
    pairs, un_i, un_m = pair_files(root / args.images_folder, root / args.masks_folder,
                                   args.image_prefix, args.mask_prefix)
    if un_i or un_m:
        msg = describe_unpaired(un_i, un_m)
        if not pairs:
            raise UserError(f"no image/mask pairs in {root} ({msg}); check --image_prefix/--mask_prefix")
        if not args.skip_unpaired:
            raise UserError(f"{msg}. Fix the names (or --image_prefix/--mask_prefix), or pass --skip_unpaired "
                            f"to train on the {len(pairs)} pairs found")
    validate_pairs(pairs, args.mask_channels)
    ldm = load_ldm(args.ldm_checkpoint, args.trust_checkpoint, args.vae)
    labels = None
    if args.class_labels_csv:
        by_stem = read_class_labels(args.class_labels_csv, ldm.class_names)
        missing = [im for im, _ in pairs if im.stem not in by_stem]
        if missing:
            raise UserError(f"--class_labels_csv {args.class_labels_csv} has no class for {len(missing)} image(s): "
                            + ", ".join(p.name for p in missing[:5]))
        labels = [by_stem[im.stem] for im, _ in pairs]
    resume = None
    if args.resume:
        path = Path(args.output_dir) / "checkpoint_last.pt" if args.resume == "auto" else Path(args.resume)
        if path.is_file() or args.resume != "auto":
            resume = load_plain_checkpoint(path, "--resume", args.trust_checkpoint)
            if not isinstance(resume, dict) or resume.get("model_type") != "controlnet":
                raise UserError(f"--resume {path} is not a ControlNet checkpoint (model_type="
                                f"{resume.get('model_type') if isinstance(resume, dict) else type(resume).__name__})")
            check_same_ldm(resume.get("ldm_fingerprint"), ldm.fingerprint, path, args.ldm_checkpoint,
                           resume.get("ldm_checkpoint"))
            for key, now in (("mask_channels", args.mask_channels), ("use_class_labels", labels is not None),
                             ("unet_trained", not args.freeze_unet)):
                if resume.get(key) != now:
                    raise UserError(f"--resume {path} was trained with {key}={resume.get(key)}, this run asks "
                                    f"for {now}; use the same flags or another --output_dir")
            resume["path"] = str(path)
    elif (Path(args.output_dir) / "checkpoint_last.pt").exists():
        raise UserError(f"--output_dir {args.output_dir} already holds a run (checkpoint_last.pt); pass --resume "
                        f"to continue it or choose another --output_dir")
    check_writable(args.output_dir)
    return pairs, labels, ldm, resume


def train(args):
    """One training run (see the module docstring)."""
    from accelerate import Accelerator  # imported here so `--help` and input errors stay fast

    setup_logging(None, int(os.environ.get("RANK", "0")) == 0)
    precision = resolve_precision(args.mixed_precision)
    pairs, labels, ldm, resume = prepare_inputs(args)  # every bad-input error before any write
    # Accelerator(cpu=True) without CUDA: a plain Accelerator() under `accelerate launch --multi_gpu` on a
    # CPU-only machine starts independent single processes (see CONVENTIONS.md); cpu=True gives MULTI_CPU/gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    train_idx, val_idx = split_indices(len(pairs), args.val_fraction, args.seed)
    if len(train_idx) < args.batch_size * world:
        raise UserError(f"{len(train_idx)} training pairs are fewer than one global batch "
                        f"(--batch_size {args.batch_size} x {world} processes); lower --batch_size")

    out = Path(args.output_dir)
    if accelerator.is_main_process:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    setup_logging(out, accelerator.is_main_process)
    log.info(f"world size {world} ({accelerator.distributed_type}), device {device}, mixed precision {precision}")
    log.info(f"{len(pairs)} pairs ({len(train_idx)} train / {len(val_idx)} val), image {ldm.image_size}px x "
             f"{ldm.image_channels} ch, mask {args.mask_channels} ch, latent {ldm.latent_channels}x"
             f"{ldm.latent_size}x{ldm.latent_size} (VAE factor {ldm.vae_factor})")
    seed_everything(args.seed * world + rank)

    # ---- model
    use_classes = labels is not None
    controlnet = build_controlnet(ldm.unet, args.mask_channels, ldm.vae_factor)
    if use_classes:
        encoder = ldm.class_embedder  # generation by class and mask together
    else:
        encoder = DummyEncoder(ldm.unet.config.cross_attention_dim, ldm.class_embedder.embedding.weight[-1])
    unet = ldm.unet
    unet.requires_grad_(not args.freeze_unet)
    encoder.requires_grad_(not args.freeze_unet or args.train_encoder)
    controlnet.requires_grad_(True)
    model = ControlledUNet(unet, controlnet, encoder)
    vae = ldm.vae.to(device)
    if resume:
        controlnet.load_state_dict(resume["controlnet"])
        encoder.load_state_dict(resume["encoder"])
        if resume.get("unet") is not None:
            unet.load_state_dict(resume["unet"])
    ema = EMA(controlnet, args.ema_decay)
    if resume and resume.get("ema_controlnet") is not None:
        ema.module.load_state_dict(resume["ema_controlnet"])
    ema.module.to(device)
    components = {"VAE": vae, "UNet": unet, "ControlNet": controlnet,
                  f"Encoder ({'class' if use_classes else 'dummy'})": encoder}
    for line in format_parameter_table(count_parameters(components)):
        log.info(line)

    model.to(device)  # before the optimizer: fused AdamW wants its parameters on the GPU already
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_kw = {"fused": True} if torch.cuda.is_available() else {"foreach": True}
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, **opt_kw)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.lr_warmup_steps) if args.lr_warmup_steps else 1.0)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)
    # The lr scheduler is not prepared: accelerate would step it once per process per step.
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    unet.train(not args.freeze_unet)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)  # for validation and samples

    # ---- data
    null = ldm.num_classes
    ds = PairDataset(pairs, ldm.image_channels, args.mask_channels, ldm.image_size, labels, null, args.seed,
                     args.hflip, args.vflip)
    sampler = EpochSampler(train_idx, args.batch_size, world, rank, args.seed)
    workers = args.num_workers if args.num_workers is not None else (4 if torch.cuda.is_available() else 0)
    gpu = torch.cuda.is_available()
    # A private generator: otherwise each new DataLoader iterator draws its base seed from the global torch
    # RNG, which would make the training noise depend on where a resumed run restarted.
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                         pin_memory=gpu, persistent_workers=gpu and workers > 0,
                                         generator=torch.Generator())
    steps_per_epoch = sampler.batches_per_epoch()
    sched = noise_scheduler(ldm.noise_scheduler_config)
    T = sched.config.num_train_timesteps

    # ---- state
    global_step, start_epoch, start_batch, best_val = 0, 0, 0, math.inf
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
        lr_sched.load_state_dict(resume["lr_scheduler"])
        if accelerator.scaler is not None and resume.get("grad_scaler"):
            accelerator.scaler.load_state_dict(resume["grad_scaler"])
        global_step, start_epoch, start_batch = resume["global_step"], resume["epoch"], resume["step_in_epoch"]
        best_val = resume.get("best_val_loss", math.inf)
        states = resume.get("rng_states") or []
        if len(states) == world:
            set_rng_state(states[rank])
        else:
            log.warning(f"checkpoint was written by {len(states)} process(es), this run has {world}: RNG streams "
                        f"are reseeded, so the continuation is not bit-identical")
            seed_everything((args.seed + global_step) * world + rank)
        log.info(f"resumed from {resume['path']} at step {global_step} (epoch {start_epoch}, batch {start_batch})")
        if start_epoch >= args.num_epochs:
            log.info("the checkpoint already finished --num_epochs; nothing to do")
    del resume

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))

    stop = {"sigterm": False}
    old_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    # Testing hook: DIFFUSION_FAULT_NAN_AT_STEP=N turns the loss into NaN at step N (fault-injection tests).
    nan_at = int(os.environ.get("DIFFUSION_FAULT_NAN_AT_STEP", "0") or 0)

    def checkpoint_state(epoch, step_in_epoch, val_loss):
        """The full resumable state as a plain dict."""
        rngs = gather_rng(accelerator)
        return {"model_type": "controlnet", "format_version": 1,
                "controlnet_config": plain(dict(controlnet.config)), "controlnet": controlnet.state_dict(),
                "ema_controlnet": ema.module.state_dict(), "encoder_type": "class" if use_classes else "dummy",
                "encoder": encoder.state_dict(), "unet": None if args.freeze_unet else unet.state_dict(),
                "unet_trained": not args.freeze_unet, "use_class_labels": use_classes,
                "mask_channels": args.mask_channels, "image_size": ldm.image_size,
                "image_channels": ldm.image_channels, "class_names": ldm.class_names,
                "num_classes": ldm.num_classes, "ldm_fingerprint": ldm.fingerprint,
                "ldm_checkpoint": str(Path(args.ldm_checkpoint).resolve()),
                "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "global_step": global_step, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "best_val_loss": best_val, "val_loss": val_loss, "config": plain(vars(args)),
                "world_size": world, "rng_states": rngs}

    def finish(code=0):
        """Leave cleanly; multi-process runs exit via os._exit (gloo aborts at exit in ~10-20% of runs here)."""
        signal.signal(signal.SIGTERM, old_handler)
        if writer:
            writer.close()
        if world > 1:
            sys.stdout.flush()
            sys.stderr.flush()
            for h in log.handlers:
                h.flush()
            torch.distributed.destroy_process_group()
            os._exit(code)
        if code:
            raise SystemExit(code)

    # ---- loop
    t_log, n_log, loss_sum = time.time(), 0, torch.zeros((), device=device)
    t_start, done = time.time(), bool(args.max_steps and global_step >= args.max_steps)
    for epoch in range(start_epoch, args.num_epochs):
        if done:
            break
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        step_in_epoch = start_batch if epoch == start_epoch else 0
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            labels_t = batch["label"].to(device)
            with torch.no_grad(), accelerator.autocast():
                latents = encode(vae, images, ldm.scaling_factor).float()
            noise = torch.randn_like(latents)
            t = torch.randint(0, T, (latents.shape[0],), device=device)
            noisy = sched.add_noise(latents, noise, t)
            target = training_target(sched, latents, noise, t)
            pred = model(noisy, t, labels_t, masks)
            loss = F.mse_loss(pred.float(), target.float())
            if nan_at and global_step + 1 == nan_at:
                loss = loss * float("nan")
            time_up = bool(args.time_limit_minutes and time.time() - t_start > 60 * args.time_limit_minutes)
            flags = torch.tensor([float(not torch.isfinite(loss)), float(stop["sigterm"]), float(time_up)],
                                 device=device)
            if world > 1:
                flags = accelerator.reduce(flags, "sum")
            if flags[0] > 0:
                if accelerator.is_main_process:
                    print(f"error: loss is {loss.item()} at step {global_step + 1} (epoch {epoch}); stopping "
                          f"before the optimizer step, the last checkpoint in {out} is kept. Try a lower "
                          f"--learning_rate or --mixed_precision no", file=sys.stderr, flush=True)
                finish(1)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
            optimizer.step()
            lr_sched.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(controlnet, global_step)
            global_step += 1
            step_in_epoch += 1
            loss_sum += loss.detach()
            n_log += 1

            if global_step % args.log_every == 0:
                avg = (accelerator.reduce(loss_sum, "mean") if world > 1 else loss_sum).item() / n_log
                dt = time.time() - t_log
                mem = (f", mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available()
                       else f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
                log.info(f"step {global_step} epoch {epoch} loss {avg:.5f} lr {lr_sched.get_last_lr()[0]:.2e} "
                         f"{n_log / dt:.2f} steps/s {n_log * args.batch_size * world / dt:.1f} images/s{mem}")
                if writer:
                    writer.add_scalar("train/loss", avg, global_step)
                    writer.add_scalar("train/lr", lr_sched.get_last_lr()[0], global_step)
                t_log, n_log, loss_sum = time.time(), 0, torch.zeros((), device=device)
            end_of_epoch = step_in_epoch == steps_per_epoch
            if flags[1] > 0:  # the all-reduced flag, so every rank stops at the same step
                save_checkpoint(accelerator, checkpoint_state(epoch, step_in_epoch, None), out / "checkpoint_last.pt")
                log.info(f"SIGTERM: wrote {out / 'checkpoint_last.pt'} at step {global_step}; exiting "
                         f"(continue with --resume)")
                finish(0)
                return
            done = bool(args.max_steps and global_step >= args.max_steps) or flags[2] > 0
            if done:
                log.info(f"stopping at step {global_step}: " + ("--time_limit_minutes reached" if flags[2] > 0
                                                                 else "--max_steps reached"))
                break
            epoch_saves = end_of_epoch and ((epoch + 1) % args.val_every == 0 or epoch + 1 == args.num_epochs)
            if args.save_every_steps and global_step % args.save_every_steps == 0 and not epoch_saves:
                save_checkpoint(accelerator, checkpoint_state(epoch, step_in_epoch, None), out / "checkpoint_last.pt")
                log.info(f"saved {out / 'checkpoint_last.pt'} (step {global_step})")

        # ---- end of epoch (or of the run): validation, samples, checkpoints
        # where a resumed run continues: mid-epoch if the run stopped early, else at the next epoch
        next_pos = (epoch, step_in_epoch) if done and step_in_epoch < steps_per_epoch else (epoch + 1, 0)
        if done or (epoch + 1) % args.val_every == 0 or epoch + 1 == args.num_epochs:
            val = validate(raw_model, vae, ldm, sched, ds, val_idx, args, accelerator) if val_idx else None
            if val is not None:
                log.info(f"epoch {epoch} step {global_step} validation loss {val:.5f}")
                if writer:
                    writer.add_scalar("val/loss", val, global_step)
            if accelerator.is_main_process and args.sample_steps and args.num_val_samples:
                grid_idx = (val_idx or train_idx)[: args.num_val_samples]
                write_sample_grid(raw_model, ema, vae, ldm, ds, grid_idx, args, device, writer, epoch, global_step)
            score = val if val is not None else float("nan")
            improved = val is not None and val < best_val
            if improved:
                best_val = val
            state = checkpoint_state(*next_pos, score)
            save_checkpoint(accelerator, state, out / "checkpoint_last.pt")
            if improved or (val is None and (done or epoch + 1 == args.num_epochs)):
                save_checkpoint(accelerator, state, out / "checkpoint_best.pt")
                log.info(f"saved checkpoint_best.pt (epoch {epoch}, "
                         f"{'val loss %.5f' % val if val is not None else 'no validation set: last epoch'})")
            del state
    log.info(f"done: {global_step} steps; checkpoints in {out} (best validation loss {best_val:.5f})")
    finish(0)


@torch.no_grad()
def validate(model, vae, ldm, sched, ds, val_idx, args, accelerator):
    """Mean noise-prediction loss on the held-out pairs with fixed noise (comparable across epochs)."""
    # `model` is the unwrapped module: DDP forwards on uneven shards could wait on each other.
    model.eval()
    gen = torch.Generator().manual_seed(args.seed + 1)  # private: the training RNG streams stay untouched
    total = torch.zeros(2, device=accelerator.device)
    mine = val_idx[accelerator.process_index::accelerator.num_processes]
    for i in range(0, len(mine), args.batch_size):
        items = [ds[j] for j in mine[i:i + args.batch_size]]
        images = torch.stack([it["image"] for it in items]).to(accelerator.device)
        masks = torch.stack([it["mask"] for it in items]).to(accelerator.device)
        labels = torch.stack([it["label"] for it in items]).to(accelerator.device)
        with accelerator.autocast():
            lat = encode(vae, images, ldm.scaling_factor, generator=gen).float()
        noise = torch.randn(lat.shape, generator=gen).to(lat.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=gen).to(lat.device)
        with accelerator.autocast():
            pred = model(sched.add_noise(lat, noise, t), t, labels, masks)
        target = training_target(sched, lat, noise, t)
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        total += torch.stack([per.sum(), torch.tensor(float(len(items)), device=per.device)])
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, "sum")
    model.train()
    model.unet.train(not args.freeze_unet)
    return (total[0] / total[1]).item()


@torch.no_grad()
def write_sample_grid(raw_model, ema, vae, ldm, ds, idx, args, device, writer, epoch, step):
    """Rows of mask | sample (EMA ControlNet) | ground truth to TensorBoard and samples/epoch_XXXX.png."""
    from torchvision.utils import make_grid, save_image

    items = [ds[j] for j in idx]
    masks = torch.stack([it["mask"] for it in items]).to(device)
    labels = torch.stack([it["label"] for it in items]).to(device)
    gt = torch.stack([it["image"] for it in items])
    sampler = make_sampler(args.sample_scheduler, ldm.noise_scheduler_config)
    shape = (ldm.latent_channels, ldm.latent_size, ldm.latent_size)
    lat, gens = initial_latents([args.seed + i for i in range(len(idx))], shape)
    ema_model = type(raw_model)(raw_model.unet, ema.module, raw_model.encoder).eval()
    raw_model.unet.eval()
    x = sample(ema_model, sampler, lat.to(device), labels, masks, args.sample_steps, generators=gens)
    imgs = decode(vae, x, ldm.scaling_factor, ldm.image_channels).cpu()
    raw_model.train()
    raw_model.unet.train(not args.freeze_unet)
    c = max(gt.shape[1], masks.shape[1])
    rows = []
    for m, s, g in zip(masks.cpu(), imgs, gt):
        rows += [to_grid_channels(m[None] * 2 - 1, c)[0], to_grid_channels(s[None], c)[0],
                 to_grid_channels(g[None], c)[0]]
    grid = make_grid(torch.stack(rows), nrow=3, padding=2, normalize=True, value_range=(-1, 1))
    if writer:
        writer.add_image("samples/mask|sample|ground_truth", grid, step)
    try:
        save_image(grid, Path(args.output_dir) / "samples" / f"epoch_{epoch:04d}.png")
    except OSError as e:
        print(f"error: cannot write {args.output_dir}/samples: {e.strerror or e}", file=sys.stderr)


if __name__ == "__main__":
    main()
