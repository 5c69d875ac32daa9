"""Train a class-conditional latent diffusion model (frozen VAE + diffusers UNet + class embedder, CFG).

    cd ldm
    python train.py --data_root /path/to/data --output_dir ./ldm_checkpoints --image_size 256 \
        --batch_size 8 --num_epochs 200 --learning_rate 1e-4 --cfg_dropout 0.1 --mixed_precision fp16
    accelerate launch --multi_gpu train.py --data_root /path/to/data --batch_size 8 --num_epochs 200

Writes to --output_dir: checkpoint_last.pt (for --resume), checkpoint_best.pt (lowest validation
loss), log.txt, tensorboard/ (scalars and sample grids), the same grids as samples/step_XXXXXXX.png with
progress.gif (the grids animated; same seeds every time) and, with --cache_latents, latent_cache.pt.
--batch_size is per process. Exact resume: data order follows (seed, epoch), flips (seed, epoch, index),
and every step's noise comes from a generator seeded by (seed, rank, step), so a resumed run continues
bit-identically on CPU. The loop is `main`; the plumbing (errors, seeds, stop flags, checkpoint I/O,
EMA, logging) comes from the vendored runtime.py and the accelerate helpers in utils.py.

Objective: --prediction_type epsilon|v_prediction (what the UNet predicts; stored in the checkpoint's
noise_scheduler_config, which every sampler is built from) and --snr_gamma G (min-SNR-gamma weighting,
Hang et al. 2023; 0 = off). --posthoc_ema_every_steps N writes post-hoc EMA snapshots (EDM2) to
<output_dir>/posthoc_ema/ (rebuild any EMA length later with posthoc_ema.py). A resumed run keeps all four.
"""
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr

import animation
import medical
import posthoc_ema
from dataset import (EpochBatches, ImageDataset, LatentDataset, cache_key, encode_dataset, fit_window, groups_of,
                     load_latent_cache, read_options, scan_class_folders, split_train_val)
from models import (DEFAULT_NOISE_SCHEDULE, DEFAULT_VAE, UNET_PRESETS, ClassEmbedder, Denoiser, build_unet,
                    check_image_size, load_vae, plain_config, sample_images, unet_kwargs, vae_downsample_factor,
                    vae_identity, vae_posterior)
from runtime import (FlagParser, StopFlags, Throughput, UserError, atomic_save, check_writable, generator,
                     memory_mb, optimizer_kwargs, param_table, remove_stale_temporaries, rng_state, run_main)
from utils import (WarmupEMA, add_run_flags, check_run_flags, finish, keep_on_resume, load_resume_checkpoint,
                   make_loader, optimizer_steps, restore_training_state, save_checkpoint, start_run, write_on_main)

# Settings a run keeps for life: None on the command line = "not given" (the default, or the resumed run's value).
LIFELONG_DEFAULTS = dict(prediction_type="epsilon", snr_gamma=0.0, posthoc_ema_every_steps=0,
                         posthoc_ema_sigma_rels="0.05,0.1")  # posthoc_ema.add_flags' default, one spelling


def parse_args(argv=None):
    """Command line -> argparse.Namespace (every flag in both spellings; old names kept as aliases)."""
    p = FlagParser(description="Train a class-conditional LDM.")
    add_run_flags(p, output_dir="./ldm_checkpoints", num_epochs=200, lr_warmup_steps=500)
    p.add_argument("--vae", default=DEFAULT_VAE, help="hub id or local diffusers AutoencoderKL folder (frozen)")
    p.add_argument("--lr_scheduler", default="constant_with_warmup",
                   choices=["constant", "constant_with_warmup", "cosine", "linear"])
    p.add_argument("--weight_decay", type=float, default=1e-2)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--cfg_dropout", type=float, default=0.1, help="probability a label is replaced by the null class")
    p.add_argument("--unet_preset", default="base", choices=list(UNET_PRESETS), help="UNet size (base = 256px default)")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=None, help="override the preset's widths")
    p.add_argument("--layers_per_block", type=int, default=None)
    p.add_argument("--cross_attention_dim", type=int, default=None)
    p.add_argument("--attention_head_dim", type=int, default=None, help="number of attention heads (diffusers' name)")
    p.add_argument("--norm_num_groups", type=int, default=None)
    p.add_argument("--num_train_timesteps", type=int, default=DEFAULT_NOISE_SCHEDULE["num_train_timesteps"])
    p.add_argument("--beta_schedule", default=DEFAULT_NOISE_SCHEDULE["beta_schedule"],
                   choices=["linear", "scaled_linear", "squaredcos_cap_v2"])
    p.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (default epsilon; a resumed run keeps its own)")
    p.add_argument("--snr_gamma", type=float, default=None,
                   help="min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5; 0 = off (default)")
    p.add_argument("--ema_decay", type=float, default=0.9999, help="with a warm-up: min(decay, (1+step)/(10+step))")
    p.add_argument("--no_ema", action="store_true", help="train without an EMA copy")
    p.add_argument("--val_split", type=float, default=0.1, help="fraction of each class held out for validation")
    p.add_argument("--val_every_epochs", type=int, default=1)
    p.add_argument("--sample_every_epochs", type=int, default=10, help="sample grid to tensorboard (0: never)")
    p.add_argument("--grid_per_class", type=int, default=4)
    p.add_argument("--cache_latents", action="store_true", help="encode the data once and reuse the latents")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    posthoc_ema.add_flags(p)
    p.set_defaults(posthoc_ema_every_steps=None, posthoc_ema_sigma_rels=None)  # None: not given (see keep_on_resume)
    return p.parse_args(argv)


def validate_args(a):
    """Range checks that name the flag."""
    check_run_flags(a)
    for ok, msg in [(0 <= a.cfg_dropout < 1, "--cfg_dropout must be in [0, 1)"),
                    (0 <= a.val_split < 1, "--val_split must be in [0, 1)"),
                    (a.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1"),
                    (0 <= a.ema_decay < 1, "--ema_decay must be in [0, 1)"),
                    (a.val_every_epochs >= 1, "--val_every_epochs must be >= 1"),
                    (a.sample_every_epochs >= 0, "--sample_every_epochs must be >= 0"),
                    (a.snr_gamma is None or a.snr_gamma >= 0, "--snr_gamma must be >= 0 (0 = off)"),
                    (a.posthoc_ema_every_steps is None or a.posthoc_ema_every_steps >= 0,
                     "--posthoc_ema_every_steps must be >= 0 (0 = off)")]:
        if not ok:
            raise UserError(msg)
    if a.posthoc_ema_sigma_rels is not None:  # one spelling, so that a resumed run compares equal
        a.posthoc_ema_sigma_rels = ",".join(f"{v:g}" for v in posthoc_ema.parse_sigma_rels(a.posthoc_ema_sigma_rels))


def draw_noise(gen, shape, cfg_dropout, num_train_timesteps):
    """(posterior eps, label-drop mask, timesteps, noise) for one batch, drawn from `gen` in a fixed order."""
    b = shape[0]
    eps_z = torch.randn(shape, generator=gen)
    drop = torch.rand(b, generator=gen) < cfg_dropout
    t = torch.randint(0, num_train_timesteps, (b,), generator=gen)
    noise = torch.randn(shape, generator=gen)
    return eps_z, drop, t, noise


def min_snr_weights(noise_scheduler, t, snr_gamma):
    """Per-sample min-SNR-gamma weights (Hang et al. 2023) for the scheduler's prediction type."""
    snr = compute_snr(noise_scheduler, t)  # alpha_bar / (1 - alpha_bar) of the training schedule
    # The paper weights the x0-MSE by min(SNR, gamma); the eps-MSE is SNR x the x0-MSE and the v-MSE is
    # (SNR + 1) x the x0-MSE, hence the divisions. gamma / SNR clamped at 1 equals min(SNR, gamma) / SNR and
    # stays finite where a cosine schedule's last SNR underflows to 0.
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return torch.clamp(snr_gamma / snr, max=1.0)
    if kind == "v_prediction":
        return torch.clamp(snr, max=snr_gamma) / (snr + 1)
    raise UserError(f"--snr_gamma: no min-SNR weighting for prediction_type {kind!r}")


def diffusion_loss(model, mean, std, labels, rand, noise_scheduler, scaling_factor, num_classes, device,
                   per_sample=False, snr_gamma=0.0):
    """Denoising MSE (eps or v target) of one batch given the posterior (mean, std) and pre-drawn `rand`.

    snr_gamma > 0: min-SNR-gamma weighted per sample; 0: the plain mean (today's numerics exactly)."""
    eps_z, drop, t, noise = (r.to(device) for r in rand)
    mean, std = mean.to(device).float(), std.to(device).float()
    latents = (mean + std * eps_z) * scaling_factor  # a fresh posterior sample every step
    labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
        noise_scheduler.get_velocity(latents, noise, t)
    pred = model(noisy, t, labels)
    err = (pred.float() - target.float()) ** 2
    if snr_gamma > 0:
        per = err.flatten(1).mean(1) * min_snr_weights(noise_scheduler, t, snr_gamma)
        return per if per_sample else per.mean()
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
    """Sum and count of per-image losses over this rank's share of the validation set, noise fixed per image.

    Never min-SNR weighted: the validation loss stays comparable across runs with other --snr_gamma."""
    total, count = torch.zeros(1, device=device), torch.zeros(1, device=device)
    mine = val_items[rank::world]
    T = noise_scheduler.config.num_train_timesteps
    for i in range(0, len(mine), batch_size):
        chunk = mine[i:i + batch_size]
        mean, std, labels = get_params(chunk)
        draws = [draw_noise(generator(seed, 7919, idx), (1, *mean.shape[1:]), 0.0, T) for idx, _ in chunk]
        rand = [torch.cat(parts) for parts in zip(*draws)]
        losses = diffusion_loss(model, mean, std, labels, rand, noise_scheduler, scaling_factor, 0, device,
                                per_sample=True)
        total += losses.sum()
        count += len(chunk)
    return total, count


def build_checkpoint(args, denoiser, ema, optimizer, lr_scheduler, accelerator, meta, step, epoch, pos, best,
                     phema=None):
    """The plain-dict checkpoint (its keys and meaning are what controlnet/ reads: do not change them)."""
    return {
        "model_type": "ldm", "format_version": 1,
        "unet_config": plain_config(denoiser.unet.config),
        "unet": denoiser.unet.state_dict(),
        "ema_unet": ema.model.unet.state_dict() if ema is not None else None,
        "class_embedder": denoiser.class_embedder.state_dict(),
        "ema_class_embedder": ema.model.class_embedder.state_dict() if ema is not None else None,
        "class_names": list(meta["class_names"]), "num_classes": len(meta["class_names"]),
        "vae": meta["vae"], "vae_scaling_factor": float(meta["scaling_factor"]),
        "image_size": int(args.image_size), "image_channels": int(meta["image_channels"]),
        "noise_scheduler_config": dict(meta["noise_config"]),
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "intensity": dict(meta["intensity"])},  # the window inference maps outputs back through
        "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        "step": step, "epoch": epoch, "position_in_epoch": pos,
        "rng_state": rng_state(), "best_val_loss": best,
        "posthoc_ema": phema.state_dict() if phema is not None else None,
    }


def check_inputs(args, out):
    """Everything a user can get wrong, checked before any heavy work or write -> what was built on the way."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    resume = load_resume_checkpoint(args, out, "ldm")
    lifelong = None if resume is None else {  # the sampler config's prediction_type is what inference uses
        **(resume.get("config") or {}), "prediction_type": resume["noise_scheduler_config"].get("prediction_type")}
    keep_on_resume(args, lifelong, LIFELONG_DEFAULTS)
    if args.no_ema and args.posthoc_ema_every_steps:
        raise UserError("--posthoc_ema_every_steps rebuilds the checkpoint's EMA entries, which --no_ema leaves "
                        "empty; drop --no_ema")
    stored = (resume.get("config") or {}).get("intensity") if resume is not None else None
    opts = read_options(args, stored)  # a resumed run keeps its window (never re-fitted)
    class_names, samples, image_channels = scan_class_folders(args.data_root, opts)
    if resume is not None and list(resume["class_names"]) != class_names:
        raise UserError(f"--resume: the checkpoint was trained on classes {resume['class_names']}, "
                        f"but --data_root has {class_names}")
    if stored is None:
        opts = fit_window(opts, samples)  # once, on the whole data set: every image and checkpoint share it
    labels = [lbl for _, lbl in samples]
    train_idx, val_idx = split_train_val(labels, class_names, args.val_split, args.seed, groups_of(samples, opts))
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
    set_seed(args.seed)  # identical initial weights for a given seed (no resume involved: accelerate's)
    unet = build_unet(latent_size, latent_channels, **ukw)
    if resume is not None and resume["unet_config"] != plain_config(unet.config):
        diff = sorted(k for k in set(resume["unet_config"]) | set(plain_config(unet.config))
                      if resume["unet_config"].get(k) != plain_config(unet.config).get(k))
        raise UserError(f"--resume: the checkpoint holds a UNet of another size/shape (differs in {diff}); "
                        f"pass the same --unet_preset / size flags and --image_size / --vae as the first run")
    return SimpleNamespace(resume=resume, class_names=class_names, samples=samples, labels=labels, opts=opts,
                           image_channels=image_channels, train_idx=train_idx, val_idx=val_idx, vae=vae,
                           vae_source=vae_source, factor=factor, latent_size=latent_size,
                           latent_channels=latent_channels, ukw=ukw, unet=unet)


def build_model(args, b):
    """-> (noise scheduler, meta stored in every checkpoint, Denoiser = UNet + class embedder)."""
    noise_config = dict(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                        beta_start=DEFAULT_NOISE_SCHEDULE["beta_start"], beta_end=DEFAULT_NOISE_SCHEDULE["beta_end"],
                        prediction_type=args.prediction_type)
    meta = dict(class_names=b.class_names, vae=b.vae_source, scaling_factor=float(b.vae.config.scaling_factor),
                image_channels=b.image_channels, noise_config=noise_config, intensity=b.opts.to_config())
    torch.manual_seed(args.seed + 1)
    embedder = ClassEmbedder(len(b.class_names), b.ukw["cross_attention_dim"])
    return DDPMScheduler(**noise_config), meta, Denoiser(b.unet, embedder)


def make_data(args, b, accelerator, out, log):
    """Cached posteriors or images encoded on the fly -> (dataset, batch -> (mean, std, labels), val keys -> same)."""
    encode = make_encoder(b.vae, accelerator)
    if args.cache_latents:
        cache_path = out / "latent_cache.pt"
        key = cache_key(b.samples, args.data_root, args.image_size, args.random_flip, vae_identity(b.vae, b.vae_source),
                        b.opts.to_config())  # slices and window in the key: a changed window re-encodes
        if accelerator.is_main_process:
            if load_latent_cache(cache_path, key) is not None:
                log.info(f"reusing latent cache {cache_path}")
            else:
                log.info(f"building latent cache {cache_path} ({len(b.samples)} images"
                         f"{' + flipped copies' if args.random_flip else ''})")
                t0 = time.time()
                cache = encode_dataset(b.samples, args.image_size, b.image_channels, encode, args.batch_size,
                                       args.random_flip, opts=b.opts)
                cache["key"] = key
                atomic_save(cache, cache_path)
                log.info(f"latent cache written in {time.time() - t0:.1f}s")
        accelerator.wait_for_everyone()
        ds = LatentDataset(load_latent_cache(cache_path, key), b.labels, args.seed, args.random_flip)
    else:
        ds = ImageDataset(b.samples, args.image_size, b.image_channels, args.seed, args.random_flip, b.opts)

    def batch_params(batch):
        if args.cache_latents:
            mean, std, lbl, _ = batch
        else:
            x, lbl, _ = batch
            mean, std = encode(x)
        return mean, std, lbl.to(accelerator.device)

    def val_params(keys):  # validation items (index, -1): no augmentation
        return batch_params(torch.utils.data.default_collate([ds[k] for k in keys]))
    return ds, batch_params, val_params


def restore(ck, denoiser, ema, optimizer, lr_scheduler, accelerator, steps_per_epoch, phema):
    """Load a resume checkpoint into the run -> (step, epoch, position_in_epoch, best_val_loss)."""
    if ck is None:
        return 0, 0, 0, math.inf
    denoiser.unet.load_state_dict(ck["unet"])
    denoiser.class_embedder.load_state_dict(ck["class_embedder"])
    if ema is not None and ck.get("ema_unet") is not None:
        ema.model.unet.load_state_dict(ck["ema_unet"])
        ema.model.class_embedder.load_state_dict(ck["ema_class_embedder"])
    phema.load_state_dict(ck.get("posthoc_ema"))
    return (*restore_training_state(ck, optimizer, lr_scheduler, accelerator, steps_per_epoch),
            ck["best_val_loss"])


def log_step(r, step, total_steps, epoch, loss_sum, n, lr, throughput):
    """The periodic log line (loss averaged over ranks and steps) and its TensorBoard scalars."""
    loss = (r.accelerator.reduce(loss_sum, "mean") / max(n, 1)).item()
    steps_s, images_s = throughput.rates()
    r.log.info(f"step {step}/{total_steps} epoch {epoch} loss {loss:.6f} lr {lr:.3e} {steps_s:.2f} steps/s "
               f"{images_s:.1f} img/s mem {memory_mb(r.accelerator.device):.0f} MiB")
    if r.writer:
        r.writer.add_scalar("train/loss", loss, step)
        r.writer.add_scalar("train/lr", lr, step)


def end_of_epoch(r, eval_model, epoch, step, total_steps, best, ckpt):
    """Validation loss (checkpoint_best.pt when it improves) and the sample grid -> the best validation loss."""
    a, acc = r.args, r.accelerator
    final = epoch == a.num_epochs or step >= total_steps
    if r.b.val_idx and (epoch % a.val_every_epochs == 0 or final):
        eval_model.eval()
        tot, cnt = validation_loss(eval_model, [(i, -1) for i in r.b.val_idx], r.val_params, r.noise_scheduler,
                                   r.meta["scaling_factor"], a.seed, acc.device, acc.process_index, acc.num_processes)
        val = (acc.reduce(tot, "sum") / acc.reduce(cnt, "sum")).item()
        improved = val < best
        r.log.info(f"epoch {epoch} validation loss {val:.6f}"
                   f"{' (best so far)' if improved else f' (best {best:.6f})'}")
        if r.writer:
            r.writer.add_scalar("val/loss", val, step)
        if improved:
            best = val
            save_checkpoint(acc, ckpt, r.out / "checkpoint_best.pt")
    elif not r.b.val_idx:
        save_checkpoint(acc, ckpt, r.out / "checkpoint_best.pt")  # no validation: best = latest
    if a.sample_every_epochs and (epoch % a.sample_every_epochs == 0 or final):
        if acc.is_main_process:
            log_grid(r.writer, eval_model, r.b.vae, r.meta, r.b.latent_channels, r.b.latent_size, a, step,
                     acc.device, acc, run_dir=r.out, log=r.log)
        acc.wait_for_everyone()
    r.model.train()
    return best


def main(argv=None):
    """Check everything, build, resume, then train: one optimizer step per iteration of the loop."""
    args = parse_args(argv)
    validate_args(args)
    out = Path(args.output_dir).expanduser().resolve()
    b = check_inputs(args, out)
    check_writable(out)
    accelerator, log = start_run(args, out, "ldm")
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if accelerator.is_main_process:
        remove_stale_temporaries(out)  # what a killed run left beside its checkpoints
    log.info(f"command: {' '.join(sys.argv)}")
    noise_scheduler, meta, denoiser = build_model(args, b)
    set_seed(args.seed * world + rank)  # per-rank streams for anything not seeded per step
    b.vae.to(device)
    log.info(f"data: {len(b.samples)} images, {len(b.class_names)} classes {b.class_names[:10]}"
             f"{'...' if len(b.class_names) > 10 else ''}, {len(b.train_idx)} train / {len(b.val_idx)} val, "
             f"{b.image_channels} channel(s); latents {b.latent_channels}x{b.latent_size}x{b.latent_size} "
             f"(VAE factor {b.factor}, scaling {meta['scaling_factor']:.5f})")
    for line in medical.describe_data([s for s, _ in b.samples], b.labels, b.class_names, b.opts):
        log.info(f"data: {line}")
    log.info("parameters:\n" + param_table({"VAE": b.vae, "UNet": b.unet, "class embedder": denoiser.class_embedder}))
    train_ds, batch_params, val_params = make_data(args, b, accelerator, out, log)
    if torch.cuda.is_available():
        b.unet.to(memory_format=torch.channels_last)  # faster convolutions with cuDNN
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                  **optimizer_kwargs(device))
    accum = args.gradient_accumulation_steps
    steps_per_epoch = EpochBatches.num_batches(len(b.train_idx), args.batch_size, world) // accum
    if steps_per_epoch == 0:
        raise UserError("not one optimizer step fits in an epoch; lower --batch_size or --gradient_accumulation_steps")
    total_steps = min(args.num_epochs * steps_per_epoch, args.max_train_steps or math.inf)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=total_steps)
    ema = None if args.no_ema else WarmupEMA(denoiser, args.ema_decay)
    if ema is not None:
        ema.model.to(device)
    # keys: the checkpoint entries a reconstruction replaces; modules: the trained weights (not the EMA copy)
    phema = posthoc_ema.PostHocEMA({"ema_unet": denoiser.unet, "ema_class_embedder": denoiser.class_embedder},
                                   posthoc_ema.parse_sigma_rels(args.posthoc_ema_sigma_rels),
                                   args.posthoc_ema_every_steps, out / "posthoc_ema",
                                   active=accelerator.is_main_process)  # only rank 0 keeps and writes them
    model, optimizer = accelerator.prepare(torch.compile(denoiser) if args.compile else denoiser, optimizer)
    step, epoch, pos, best = restore(b.resume, denoiser, ema, optimizer, lr_scheduler, accelerator, steps_per_epoch,
                                     phema)
    last, saved, last_good = out / "checkpoint_last.pt", None, "none written yet"
    if b.resume is not None:
        src = last if args.resume == "auto" else args.resume
        log.info(f"resumed from {src}: step {step}, epoch {epoch}, {pos} steps into the epoch, best val loss {best:.6f}")
        saved, last_good, b.resume = step, f"{src} (step {step})", None

    def ckpt():
        return build_checkpoint(args, denoiser, ema, optimizer, lr_scheduler, accelerator, meta, step, epoch, pos, best,
                                phema)

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    r = SimpleNamespace(args=args, accelerator=accelerator, log=log, writer=writer, out=out, b=b, meta=meta,
                        noise_scheduler=noise_scheduler, val_params=val_params, model=model)
    sampler = EpochBatches(b.train_idx, args.batch_size, world, rank, args.seed, epoch)
    loader = make_loader(train_ds, sampler, args.num_workers)
    log.info(f"training: {total_steps} steps ({steps_per_epoch} per epoch), global batch "
             f"{args.batch_size * world * accum}, lr {args.learning_rate}, EMA {'off' if ema is None else args.ema_decay}"
             f", predicts {args.prediction_type}, min-SNR gamma {args.snr_gamma:g}"
             f"{' (off)' if not args.snr_gamma else ''}"
             + (f", post-hoc EMA sigma_rel {args.posthoc_ema_sigma_rels} every {args.posthoc_ema_every_steps} steps"
                if args.posthoc_ema_every_steps else ""))
    throughput, loss_sum, n_logged, reason = Throughput(), torch.zeros(1, device=device), 0, None
    model.train()
    with StopFlags(device=device) as stop:
        for micro in optimizer_steps(loader, sampler, epoch, pos, accum, steps_per_epoch, args.num_epochs,
                                     total_steps - step):
            for k, batch in enumerate(micro):
                mean, std, labels = batch_params(batch)
                rand = draw_noise(generator(args.seed, rank, step, k), mean.shape, args.cfg_dropout,
                                  args.num_train_timesteps)
                with contextlib.nullcontext() if k == accum - 1 else accelerator.no_sync(model):
                    loss = diffusion_loss(model, mean, std, labels, rand, noise_scheduler, meta["scaling_factor"],
                                          len(b.class_names), device, snr_gamma=args.snr_gamma)
                    loss = stop.check_loss(loss, step + 1, last_good)  # NaN/inf on any rank: stop before backward
                    accelerator.backward(loss / accum)
                loss_sum += loss.detach() / accum
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(denoiser, step)
            step, pos, n_logged = step + 1, pos + 1, n_logged + 1
            phema.update(step)
            if args.posthoc_ema_every_steps and step % args.posthoc_ema_every_steps == 0:
                write_on_main(accelerator, lambda: phema.maybe_snapshot(step), out / "posthoc_ema")
            throughput.add(args.batch_size * world * accum)
            if step % args.log_every_steps == 0 or step == total_steps:
                log_step(r, step, total_steps, epoch, loss_sum, n_logged, lr_scheduler.get_last_lr()[0], throughput)
                loss_sum, n_logged = torch.zeros(1, device=device), 0
            if pos == steps_per_epoch:
                epoch, pos = epoch + 1, 0
                best = end_of_epoch(r, ema.model if ema is not None else denoiser, epoch, step, total_steps, best, ckpt)
            if pos == 0 or (args.ckpt_every_steps and step % args.ckpt_every_steps == 0):
                save_checkpoint(accelerator, ckpt, last)
                saved, last_good = step, f"{last} (step {step})"
            reason = stop.should_stop(step)  # SIGTERM (any rank)
            if reason:
                break
    if saved != step:  # stopped mid-epoch (--max_train_steps, SIGTERM): the final state goes to disk
        save_checkpoint(accelerator, ckpt, last)
    if reason:
        log.info(f"{reason} received: saved checkpoint_last.pt at step {step}; exiting (rerun with --resume to continue)")
    else:
        log.info(f"done: {step} steps, best validation loss {best:.6f}; checkpoints in {out}")
    return finish(accelerator, writer)


def log_grid(writer, eval_model, vae, meta, latent_channels, latent_size, args, step, device, accelerator,
             run_dir=None, log=None):
    """One row per class (first 16 classes) of EMA samples to TensorBoard, samples/ and progress.gif."""
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
    if run_dir is not None:
        animation.save_progress_frame(grid, run_dir, step, gray=meta["image_channels"] == 1, log=log)


if __name__ == "__main__":
    run_main(main)
