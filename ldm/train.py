"""Train a class-conditional latent diffusion model (frozen VAE + diffusers UNet + class embedder, CFG).

    cd ldm
    python train.py --data_root /path/to/data --output_dir ./ldm_checkpoints --image_size 256 \
        --batch_size 8 --num_epochs 200 --learning_rate 1e-4 --cfg_dropout 0.1 --mixed_precision fp16
    accelerate launch --multi_gpu train.py --data_root /path/to/data --batch_size 8 --num_epochs 200

Writes to --output_dir: checkpoint_last.pt (for --resume), checkpoint_best.pt (lowest validation
loss), log.txt, tensorboard/ (scalars and sample grids) and, with --cache_latents, latent_cache.pt.
--batch_size is per process. Exact resume: data order follows (seed, epoch), flips (seed, epoch, index),
and every step's noise comes from a generator seeded by (seed, rank, step), so a resumed run continues
bit-identically on CPU.
"""
import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from dataset import (EpochBatches, ImageDataset, LatentDataset, cache_key, encode_dataset, load_latent_cache,
                     scan_class_folders, split_train_val)
from models import (DEFAULT_NOISE_SCHEDULE, DEFAULT_VAE, UNET_PRESETS, ClassEmbedder, Denoiser, build_unet,
                    check_image_size, ema_update, load_vae, make_ema, plain_config, sample_images, unet_kwargs,
                    vae_downsample_factor, vae_identity, vae_posterior)
from utils import (StopFlag, TrainingError, UserError, add_flag, atomic_torch_save, check_writable,
                   derived_seed, fault_nan_step, finish, get_logger, load_resume_checkpoint, optimizer_kwargs,
                   param_table, resolve_precision, rng_state, run_main, seed_everything, set_rng_state,
                   setup_cuda_speedups)


def parse_args(argv=None):
    """Command line -> argparse.Namespace (all flags accept - and _ spellings)."""
    p = argparse.ArgumentParser(description="Train a class-conditional LDM.")
    add_flag(p, "data_root", required=True, help="folder with one subfolder of images per class")
    add_flag(p, "output_dir", default="./ldm_checkpoints", help="checkpoints, logs, tensorboard")
    add_flag(p, "vae", default=DEFAULT_VAE, help="hub id or local diffusers AutoencoderKL folder (frozen)")
    add_flag(p, "image_size", type=int, default=256, help="pixels; multiple of 8 and of the VAE factor")
    add_flag(p, "batch_size", type=int, default=8, help="per process")
    add_flag(p, "num_epochs", type=int, default=200)
    add_flag(p, "max_train_steps", type=int, default=None, help="stop after this many optimizer steps")
    add_flag(p, "learning_rate", type=float, default=1e-4, aliases=["lr"])
    add_flag(p, "lr_scheduler", default="constant_with_warmup",
             choices=["constant", "constant_with_warmup", "cosine", "linear"])
    add_flag(p, "lr_warmup_steps", type=int, default=500)
    add_flag(p, "weight_decay", type=float, default=1e-2)
    add_flag(p, "max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    add_flag(p, "gradient_accumulation_steps", type=int, default=1)
    add_flag(p, "cfg_dropout", type=float, default=0.1, help="probability a label is replaced by the null class")
    add_flag(p, "mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    add_flag(p, "unet_preset", default="base", choices=list(UNET_PRESETS), help="UNet size (base = 256px default)")
    add_flag(p, "block_out_channels", type=int, nargs="+", default=None, help="override the preset's widths")
    add_flag(p, "layers_per_block", type=int, default=None)
    add_flag(p, "cross_attention_dim", type=int, default=None)
    add_flag(p, "attention_head_dim", type=int, default=None, help="number of attention heads (diffusers' name)")
    add_flag(p, "norm_num_groups", type=int, default=None)
    add_flag(p, "num_train_timesteps", type=int, default=DEFAULT_NOISE_SCHEDULE["num_train_timesteps"])
    add_flag(p, "beta_schedule", default=DEFAULT_NOISE_SCHEDULE["beta_schedule"],
             choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    add_flag(p, "prediction_type", default="epsilon", choices=["epsilon", "v_prediction"])
    add_flag(p, "ema_decay", type=float, default=0.9999)
    add_flag(p, "no_ema", action="store_true", help="train without an EMA copy")
    add_flag(p, "val_split", type=float, default=0.1, help="fraction of each class held out for validation")
    add_flag(p, "val_every_epochs", type=int, default=1)
    add_flag(p, "save_every_steps", type=int, default=0, aliases=["ckpt_every", "save_every"],
             help="also write checkpoint_last.pt every N steps (0: only at epoch ends)")
    add_flag(p, "sample_every_epochs", type=int, default=10, help="sample grid to tensorboard (0: never)")
    add_flag(p, "grid_per_class", type=int, default=4)
    add_flag(p, "log_every_steps", type=int, default=50)
    add_flag(p, "resume", nargs="?", const="auto", default=None,
             help="resume from --output_dir/checkpoint_last.pt (or the given checkpoint)")
    add_flag(p, "trust_checkpoint", action="store_true", help="allow loading pickled checkpoints")
    add_flag(p, "cache_latents", action="store_true", help="encode the data once and reuse the latents")
    add_flag(p, "random_flip", action="store_true", help="random horizontal flips")
    add_flag(p, "num_workers", type=int, default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    add_flag(p, "compile", action="store_true", help="torch.compile the denoiser")
    add_flag(p, "seed", type=int, default=42)
    return p.parse_args(argv)


def validate_args(a):
    """Range checks that name the flag."""
    checks = [(a.batch_size >= 1, "--batch_size must be >= 1"), (a.num_epochs >= 1, "--num_epochs must be >= 1"),
              (a.learning_rate > 0, "--learning_rate must be > 0"),
              (0 <= a.cfg_dropout < 1, "--cfg_dropout must be in [0, 1)"),
              (0 <= a.val_split < 1, "--val_split must be in [0, 1)"),
              (a.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
              (0 <= a.ema_decay < 1, "--ema_decay must be in [0, 1)"),
              (a.save_every_steps >= 0, "--save_every_steps must be >= 0"),
              (a.max_train_steps is None or a.max_train_steps >= 1, "--max_train_steps must be >= 1"),
              (a.log_every_steps >= 1, "--log_every_steps must be >= 1"),
              (a.lr_warmup_steps >= 0, "--lr_warmup_steps must be >= 0"),
              (a.num_workers is None or a.num_workers >= 0, "--num_workers must be >= 0")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    if a.image_size <= 0 or a.image_size % 8:
        raise UserError(f"--image_size must be a positive multiple of 8, got {a.image_size}")


def draw_noise(gen, shape, cfg_dropout, num_train_timesteps):
    """(posterior eps, label-drop mask, timesteps, noise) for one batch, drawn from `gen` in a fixed order."""
    b = shape[0]
    eps_z = torch.randn(shape, generator=gen)
    drop = torch.rand(b, generator=gen) < cfg_dropout
    t = torch.randint(0, num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(shape, generator=gen)
    return eps_z, drop, t, noise


def diffusion_loss(model, mean, std, labels, rand, noise_scheduler, scaling_factor, num_classes, device,
                   per_sample=False):
    """Noise-prediction MSE for one batch given the posterior (mean, std) and pre-drawn randomness `rand`."""
    eps_z, drop, t, noise = (r.to(device) for r in rand)
    mean, std = mean.to(device).float(), std.to(device).float()
    latents = (mean + std * eps_z) * scaling_factor  # a fresh posterior sample every step
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    pred = model(noisy, t, labels)
    err = (pred.float() - target.float()) ** 2
    return err.flatten(1).mean(1) if per_sample else err.mean()


def make_encoder(vae, accelerator):
    """images in [-1,1] (any device) -> posterior (mean, std) on the accelerator device."""
    def encode(x):
        with torch.no_grad(), accelerator.autocast():
            m, s = vae_posterior(vae, x.to(accelerator.device))
        return m.float(), s.float()
    return encode


@torch.no_grad()
def validation_loss(model, val_items, get_params, noise_scheduler, scaling_factor, seed, device, rank, world,
                    batch_size=32):
    """Sum and count of per-image losses over this rank's share of the validation set, noise fixed per image."""
    total, count = torch.zeros(1, device=device), torch.zeros(1, device=device)
    mine = val_items[rank::world]
    T = noise_scheduler.config.num_train_timesteps
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        mean, std, labels = get_params(chunk)
        draws = [draw_noise(torch.Generator().manual_seed(derived_seed(seed, 7919, idx)), (1, *mean.shape[1:]),
                            0.0, T) for idx, _ in chunk]
        rand = [torch.cat(parts) for parts in zip(*draws)]
        losses = diffusion_loss(model, mean, std, labels, rand, noise_scheduler, scaling_factor, 0, device,
                                per_sample=True)
        total += losses.sum()
        count += len(chunk)
    return total, count


def build_checkpoint(args, denoiser, ema, optimizer, lr_scheduler, accelerator, meta, step, epoch, pos, best):
    """The plain-dict checkpoint (format shared with controlnet/: do not change keys lightly)."""
    return {
        "model_type": "ldm", "format_version": 1,
        "unet_config": plain_config(denoiser.unet.config),
        "unet": denoiser.unet.state_dict(),
        "ema_unet": ema.unet.state_dict() if ema is not None else None,
        "class_embedder": denoiser.class_embedder.state_dict(),
        "ema_class_embedder": ema.class_embedder.state_dict() if ema is not None else None,
        "class_names": list(meta["class_names"]), "num_classes": len(meta["class_names"]),
        "vae": meta["vae"], "vae_scaling_factor": float(meta["scaling_factor"]),
        "image_size": int(args.image_size), "image_channels": int(meta["image_channels"]),
        "noise_scheduler_config": dict(meta["noise_config"]),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "step": step, "epoch": epoch, "position_in_epoch": pos,
        "rng_state": rng_state(), "best_val_loss": best,
    }


def save_all_ranks(accelerator, make_ckpt, path):
    """Rank 0 writes atomically; every rank learns whether it worked (so none hangs or carries on alone)."""
    accelerator.wait_for_everyone()
    ok, msg = 1.0, ""
    if accelerator.is_main_process:
        try:
            atomic_torch_save(make_ckpt(), path)
        except TrainingError as e:
            ok, msg = 0.0, str(e)
    flag = accelerator.reduce(torch.tensor([ok], device=accelerator.device), "min")
    if flag.item() < 1:
        raise TrainingError(msg or f"cannot write {path} (failed on the main process)")


def main(argv=None):
    """Validate everything, then train with accelerate."""
    args = parse_args(argv)
    validate_args(args)
    out = Path(args.output_dir).expanduser().resolve()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))

    # --- everything a user can get wrong is checked before any heavy work or any write ---
    resume_ckpt = load_resume_checkpoint(args, out, "ldm")
    class_names, samples, image_channels = scan_class_folders(args.data_root)
    if resume_ckpt is not None and list(resume_ckpt["class_names"]) != class_names:
        raise UserError(f"--resume: the checkpoint was trained on classes {resume_ckpt['class_names']}, "
                        f"but --data_root has {class_names}")
    labels = [lbl for _, lbl in samples]
    train_idx, val_idx = split_train_val(labels, class_names, args.val_split, args.seed)
    global_batch = args.batch_size * world_env * args.gradient_accumulation_steps
    if len(train_idx) < global_batch:
        raise UserError(f"the training split has {len(train_idx)} images, fewer than one global batch "
                        f"({args.batch_size} x {world_env} processes x {args.gradient_accumulation_steps} "
                        f"accumulation steps); lower --batch_size")
    vae, vae_source = load_vae(args.vae)
    factor = vae_downsample_factor(vae)
    check_image_size(args.image_size, factor)
    latent_size, latent_channels = args.image_size // factor, vae.config.latent_channels
    ukw = unet_kwargs(args.unet_preset, block_out_channels=args.block_out_channels,
                      layers_per_block=args.layers_per_block, cross_attention_dim=args.cross_attention_dim,
                      attention_head_dim=args.attention_head_dim, norm_num_groups=args.norm_num_groups)
    seed_everything(args.seed)  # identical initial weights for a given seed
    unet = build_unet(latent_size, latent_channels, **ukw)
    if resume_ckpt is not None and resume_ckpt["unet_config"] != plain_config(unet.config):
        diff = sorted(k for k in set(resume_ckpt["unet_config"]) | set(plain_config(unet.config))
                      if resume_ckpt["unet_config"].get(k) != plain_config(unet.config).get(k))
        raise UserError(f"--resume: the checkpoint holds a UNet of another size/shape (differs in {diff}); "
                        f"pass the same --unet_preset / size flags and --image_size / --vae as the first run")
    check_writable(out)

    # --- runtime ---
    from accelerate import Accelerator
    precision = resolve_precision(args.mixed_precision)
    setup_cuda_speedups()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    log = get_logger(out, accelerator.is_main_process)
    log.info(f"command: {' '.join(sys.argv)}")
    log.info(f"world size {world} ({accelerator.distributed_type}), device {device}, precision {precision}"
             + (f" (asked for {args.mixed_precision})" if precision != args.mixed_precision else ""))

    scaling_factor = float(vae.config.scaling_factor)
    noise_config = dict(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                        beta_start=DEFAULT_NOISE_SCHEDULE["beta_start"], beta_end=DEFAULT_NOISE_SCHEDULE["beta_end"],
                        prediction_type=args.prediction_type)
    noise_scheduler = DDPMScheduler(**noise_config)
    meta = dict(class_names=class_names, vae=vae_source, scaling_factor=scaling_factor,
                image_channels=image_channels, noise_config=noise_config)
    torch.manual_seed(args.seed + 1)
    embedder = ClassEmbedder(len(class_names), ukw["cross_attention_dim"])
    denoiser = Denoiser(unet, embedder)
    seed_everything(args.seed * world + rank)  # per-rank streams for anything not seeded per step
    vae.to(device)
    log.info(f"data: {len(samples)} images, {len(class_names)} classes {class_names[:10]}"
             f"{'...' if len(class_names) > 10 else ''}, {len(train_idx)} train / {len(val_idx)} val, "
             f"{image_channels} channel(s); latents {latent_channels}x{latent_size}x{latent_size} "
             f"(VAE factor {factor}, scaling {scaling_factor:.5f})")
    log.info("parameters:\n" + param_table([("VAE", vae), ("UNet", unet), ("class embedder", embedder)]))

    # --- data: cached posteriors or images encoded on the fly ---
    encode = make_encoder(vae, accelerator)
    if args.cache_latents:
        cache_path = out / "latent_cache.pt"
        key = cache_key(samples, args.data_root, args.image_size, args.random_flip,
                        vae_identity(vae, vae_source))
        if accelerator.is_main_process:
            if load_latent_cache(cache_path, key) is not None:
                log.info(f"reusing latent cache {cache_path}")
            else:
                log.info(f"building latent cache {cache_path} ({len(samples)} images"
                         f"{' + flipped copies' if args.random_flip else ''})")
                t0 = time.time()
                cache = encode_dataset(samples, args.image_size, image_channels, encode, args.batch_size,
                                       args.random_flip)
                cache["key"] = key
                atomic_torch_save(cache, cache_path)
                log.info(f"latent cache written in {time.time() - t0:.1f}s")
        accelerator.wait_for_everyone()
        cache = load_latent_cache(cache_path, key)
        train_ds = LatentDataset(cache, labels, args.seed, args.random_flip)
    else:
        train_ds = ImageDataset(samples, args.image_size, image_channels, args.seed, args.random_flip)

    def batch_params(batch):
        """DataLoader batch -> (posterior mean, std, labels on device)."""
        if args.cache_latents:
            mean, std, lbl, _ = batch
        else:
            x, lbl, _ = batch
            mean, std = encode(x)
        return mean, std, lbl.to(device)

    def val_params(keys):
        """Validation items (index, -1) -> (mean, std, labels) without augmentation."""
        return batch_params(torch.utils.data.default_collate([train_ds[k] for k in keys]))

    # --- optimisation ---
    if torch.cuda.is_available():
        unet.to(memory_format=torch.channels_last)  # faster convolutions with cuDNN
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **optimizer_kwargs())
    accum = args.gradient_accumulation_steps
    steps_per_epoch = EpochBatches.num_batches(len(train_idx), args.batch_size, world) // accum
    if steps_per_epoch == 0:
        raise UserError("not one optimizer step fits in an epoch; lower --batch_size or --gradient_accumulation_steps")
    total_steps = args.num_epochs * steps_per_epoch
    if args.max_train_steps:
        total_steps = min(total_steps, args.max_train_steps)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=total_steps)
    ema = None if args.no_ema else make_ema(denoiser).to(device)
    model = torch.compile(denoiser) if args.compile else denoiser
    model, optimizer = accelerator.prepare(model, optimizer)

    step, epoch, pos, best = 0, 0, 0, math.inf
    if resume_ckpt is not None:
        denoiser.unet.load_state_dict(resume_ckpt["unet"])
        denoiser.class_embedder.load_state_dict(resume_ckpt["class_embedder"])
        if ema is not None and resume_ckpt.get("ema_unet") is not None:
            ema.unet.load_state_dict(resume_ckpt["ema_unet"])
            ema.class_embedder.load_state_dict(resume_ckpt["ema_class_embedder"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        lr_scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
        if accelerator.scaler is not None and resume_ckpt.get("scaler"):
            accelerator.scaler.load_state_dict(resume_ckpt["scaler"])
        step, epoch, pos = resume_ckpt["step"], resume_ckpt["epoch"], resume_ckpt["position_in_epoch"]
        best = resume_ckpt["best_val_loss"]
        if world == 1:
            set_rng_state(resume_ckpt["rng_state"])
        log.info(f"resumed from {args.resume if args.resume != 'auto' else out / 'checkpoint_last.pt'}: "
                 f"step {step}, epoch {epoch}, {pos} steps into the epoch, best val loss {best:.6f}")
        del resume_ckpt

    def ckpt():
        return build_checkpoint(args, denoiser, ema, optimizer, lr_scheduler, accelerator, meta, step, epoch,
                                pos, best)

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    workers = args.num_workers if args.num_workers is not None else (4 if torch.cuda.is_available() else 0)
    sampler = EpochBatches(train_idx, args.batch_size, world, rank, args.seed, epoch, start=pos * accum)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    stop, nan_at = StopFlag(), fault_nan_step()
    log.info(f"training: {total_steps} steps ({steps_per_epoch} per epoch), global batch "
             f"{args.batch_size * world * accum}, lr {args.learning_rate}, EMA {'off' if ema is None else args.ema_decay}")
    t_log, loss_sum, loss_n, steps_since = time.time(), torch.zeros(1, device=device), 0, 0
    model.train()
    while step < total_steps and epoch < args.num_epochs:
        sampler.epoch, sampler.start = epoch, pos * accum
        micro = []
        for batch in loader:
            micro.append(batch)
            if len(micro) < accum:
                continue
            for k, mb in enumerate(micro):
                gen = torch.Generator().manual_seed(derived_seed(args.seed, rank, step, k))
                mean, std, lbl = batch_params(mb)
                sync = contextlib.nullcontext() if k == accum - 1 else accelerator.no_sync(model)
                with sync:
                    rand = draw_noise(gen, mean.shape, args.cfg_dropout, args.num_train_timesteps)
                    loss = diffusion_loss(model, mean, std, lbl, rand, noise_scheduler, scaling_factor,
                                          len(class_names), device)
                    if nan_at is not None and step + 1 == nan_at:
                        loss = loss * float("nan")  # testing hook, see utils.fault_nan_step
                    total = accelerator.reduce(loss.detach().reshape(1), "sum")
                    if not torch.isfinite(total).all():
                        raise TrainingError(f"loss is {total.item()} at step {step + 1} (epoch {epoch}); stopped "
                                            f"before the optimizer step, checkpoint_last.pt is the last good state")
                    accelerator.backward(loss / accum)
                loss_sum += total / world / accum
            micro = []
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema_update(ema, denoiser, min(args.ema_decay, (1 + step) / (10 + step)))
            step, pos, loss_n, steps_since = step + 1, pos + 1, loss_n + 1, steps_since + 1
            if step % args.log_every_steps == 0 or step == total_steps:
                dt = time.time() - t_log
                avg = (loss_sum / max(loss_n, 1)).item()
                mem = (f", mem {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
                       if torch.cuda.is_available() else "")
                log.info(f"step {step}/{total_steps} epoch {epoch} loss {avg:.6f} lr {lr_scheduler.get_last_lr()[0]:.3e} "
                         f"{steps_since / dt:.2f} steps/s {steps_since * args.batch_size * world * accum / dt:.1f} img/s{mem}")
                if writer:
                    writer.add_scalar("train/loss", avg, step)
                    writer.add_scalar("train/lr", lr_scheduler.get_last_lr()[0], step)
                t_log, loss_sum, loss_n, steps_since = time.time(), torch.zeros(1, device=device), 0, 0
            stop_now = accelerator.reduce(torch.tensor([float(stop.requested)], device=device), "max").item() > 0
            if stop_now or (args.save_every_steps and step % args.save_every_steps == 0):
                save_all_ranks(accelerator, ckpt, out / "checkpoint_last.pt")
            if stop_now:
                log.info(f"SIGTERM received: saved checkpoint_last.pt at step {step}; exiting "
                         f"(rerun with --resume to continue)")
                return finish(accelerator, writer)
            if step >= total_steps:
                break
        if pos < steps_per_epoch:  # stopped by --max_train_steps mid-epoch
            break
        epoch, pos = epoch + 1, 0
        eval_model = ema if ema is not None else denoiser
        if val_idx and (epoch % args.val_every_epochs == 0 or epoch == args.num_epochs or step >= total_steps):
            eval_model.eval()
            tot, cnt = validation_loss(eval_model, [(i, -1) for i in val_idx], val_params, noise_scheduler,
                                       scaling_factor, args.seed, device, rank, world)
            val = (accelerator.reduce(tot, "sum") / accelerator.reduce(cnt, "sum")).item()
            model.train()
            improved = val < best
            log.info(f"epoch {epoch} validation loss {val:.6f}{' (best so far)' if improved else f' (best {best:.6f})'}")
            if writer:
                writer.add_scalar("val/loss", val, step)
            if improved:
                best = val
                save_all_ranks(accelerator, ckpt, out / "checkpoint_best.pt")
        elif not val_idx:
            save_all_ranks(accelerator, ckpt, out / "checkpoint_best.pt")  # no validation: best = latest
        if args.sample_every_epochs and (epoch % args.sample_every_epochs == 0 or step >= total_steps):
            if accelerator.is_main_process:
                log_grid(writer, eval_model, vae, meta, latent_channels, latent_size, args, step, device, accelerator)
            accelerator.wait_for_everyone()
        save_all_ranks(accelerator, ckpt, out / "checkpoint_last.pt")
    if pos:  # ended mid-epoch (max_train_steps): make sure the final state is on disk
        save_all_ranks(accelerator, ckpt, out / "checkpoint_last.pt")
    log.info(f"done: {step} steps, best validation loss {best:.6f}; checkpoints in {out}")
    return finish(accelerator, writer)


def log_grid(writer, eval_model, vae, meta, latent_channels, latent_size, args, step, device, accelerator):
    """One row per class (first 16 classes) of EMA samples to TensorBoard."""
    import torchvision
    n_cls = min(16, len(meta["class_names"]))
    labels = [c for c in range(n_cls) for _ in range(args.grid_per_class)]
    seeds = [args.seed + j for _ in range(n_cls) for j in range(args.grid_per_class)]
    eval_model.eval()
    imgs = sample_images(eval_model, vae, labels, seeds, latent_channels=latent_channels, latent_size=latent_size,
                         scaling_factor=meta["scaling_factor"], image_channels=meta["image_channels"],
                         noise_config=meta["noise_config"], scheduler="dpmsolver", num_steps=20, cfg_scale=3.0,
                         device=device, autocast=accelerator.autocast)
    grid = torchvision.utils.make_grid(imgs.cpu(), nrow=args.grid_per_class, padding=2)
    writer.add_image("samples/per_class_rows", grid, step)
    writer.flush()


if __name__ == "__main__":
    run_main(main)
