"""Train (from scratch) or fine-tune a diffusers AutoencoderKL on a class-folder data set, for `--vae`.

    cd ldm
    python train_vae.py --data_root /path/to/data --output_dir ./vae --image_size 256 --preset small \
        --batch_size 8 --num_epochs 20                                          # from scratch
    python train_vae.py --data_root /path/to/data --output_dir ./vae_ft --init stabilityai/sd-vae-ft-mse \
        --image_size 256 --learning_rate 1e-5 --num_epochs 5                    # fine-tune
    accelerate launch --multi_gpu train_vae.py --data_root /path/to/data --output_dir ./vae

Loss: L1 (or L2) reconstruction + kl_weight * KL(q(z|x) || N(0, I)), normalised like the SD recipe
(per-image sums divided by the pixel count). At the end the folder --output_dir holds a diffusers
AutoencoderKL (config.json + diffusion_pytorch_model.safetensors) whose `scaling_factor` is 1/std of
the latents measured on the data; pass it to train.py as `--vae <output_dir>`. The same folder keeps
checkpoint_last.pt (exact --resume), log.txt and tensorboard/. Missing next to the original SD VAE
recipe: no LPIPS perceptual loss and no patch-GAN discriminator, so reconstructions are blurrier.
"""
import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler

from dataset import EpochBatches, ImageDataset, scan_class_folders
from models import check_image_size, load_vae, plain_config, to_vae_input, vae_downsample_factor
from utils import (StopFlag, TrainingError, UserError, add_flag, atomic_torch_save, check_writable, derived_seed,
                   fault_nan_step, finish, get_logger, load_resume_checkpoint, optimizer_kwargs, param_table,
                   resolve_precision, rng_state, run_main, seed_everything, set_rng_state, setup_cuda_speedups)

# Scratch architectures; the downsampling factor is 2 ** (levels - 1).
VAE_PRESETS = {
    "tiny": dict(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8),    # factor 4 (demo)
    "small": dict(block_out_channels=[64, 128, 256], layers_per_block=2, norm_num_groups=32),  # factor 4
    "sd": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),  # factor 8, SD's
}


def parse_args(argv=None):
    """Command line -> Namespace."""
    p = argparse.ArgumentParser(description="Train or fine-tune an AutoencoderKL for the LDM.")
    add_flag(p, "data_root", required=True)
    add_flag(p, "output_dir", default="./vae", help="the diffusers VAE folder to write (plus training state)")
    add_flag(p, "init", default=None, help="fine-tune this VAE (hub id or folder) instead of training from scratch")
    add_flag(p, "preset", default="small", choices=list(VAE_PRESETS), help="scratch architecture")
    add_flag(p, "block_out_channels", type=int, nargs="+", default=None)
    add_flag(p, "layers_per_block", type=int, default=None)
    add_flag(p, "norm_num_groups", type=int, default=None)
    add_flag(p, "latent_channels", type=int, default=4)
    add_flag(p, "image_size", type=int, default=256)
    add_flag(p, "batch_size", type=int, default=8, help="per process")
    add_flag(p, "num_epochs", type=int, default=20)
    add_flag(p, "max_train_steps", type=int, default=None)
    add_flag(p, "learning_rate", type=float, default=1e-4, aliases=["lr"])
    add_flag(p, "lr_warmup_steps", type=int, default=0)
    add_flag(p, "max_grad_norm", type=float, default=1.0)
    add_flag(p, "recon_loss", default="l1", choices=["l1", "l2"])
    add_flag(p, "kl_weight", type=float, default=1e-6)
    add_flag(p, "scale_images", type=int, default=512, help="images used to estimate the latent scaling factor")
    add_flag(p, "mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    add_flag(p, "random_flip", action="store_true")
    add_flag(p, "num_workers", type=int, default=None)
    add_flag(p, "save_every_steps", type=int, default=0, aliases=["ckpt_every", "save_every"])
    add_flag(p, "log_every_steps", type=int, default=50)
    add_flag(p, "resume", nargs="?", const="auto", default=None)
    add_flag(p, "trust_checkpoint", action="store_true")
    add_flag(p, "seed", type=int, default=42)
    return p.parse_args(argv)


class VAETrainStep(nn.Module):
    """encode -> reparameterised sample (eps given) -> decode, as one forward so DDP syncs all of it."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x, eps):
        dist = self.vae.encode(x).latent_dist
        z = dist.mean + dist.std * eps
        return self.vae.decode(z).sample, dist.mean, dist.logvar


def vae_loss(rec, x, mean, logvar, recon, kl_weight):
    """(total, reconstruction, kl): per-pixel mean reconstruction + kl_weight * per-image KL sum / pixels."""
    err = (rec.float() - x.float())
    r = err.abs().mean() if recon == "l1" else (err ** 2).mean()
    mean, logvar = mean.float(), logvar.float()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
    pixels = x[0].numel()
    return r + kl_weight * kl / pixels, r, kl


@torch.no_grad()
def estimate_scaling_factor(vae, ds, n, seed, device, batch_size=32):
    """1 / std of posterior samples over up to n images (what `scaling_factor` means in diffusers)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:n].tolist()
    total, sq, count = 0.0, 0.0, 0
    for i in range(0, len(idx), batch_size):
        x = torch.stack([ds[(j, -1)][0] for j in idx[i:i + batch_size]]).to(device)
        dist = vae.encode(to_vae_input(x, vae.config.in_channels)).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g).to(device)
        total += z.double().sum().item()
        sq += (z.double() ** 2).sum().item()
        count += z.numel()
    var = sq / count - (total / count) ** 2
    return 1.0 / math.sqrt(max(var, 1e-12))


def export_vae(vae, out, scaling_factor):
    """save_pretrained into a temp folder, then os.replace each file in (weights first, config.json last)."""
    vae.register_to_config(scaling_factor=float(scaling_factor))
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        files = sorted(tmp.iterdir(), key=lambda f: f.name == "config.json")  # config last: loadable = complete
        for f in files:
            os.chmod(f, 0o644)  # save_pretrained may create 0600 files
            os.replace(f, out / f.name)
    except OSError as e:
        raise TrainingError(f"cannot write the VAE to {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    """Validate, train, export."""
    args = parse_args(argv)
    for ok, msg in [(args.batch_size >= 1, "--batch_size must be >= 1"), (args.num_epochs >= 1, "--num_epochs must be >= 1"),
                    (args.learning_rate > 0, "--learning_rate must be > 0"), (args.kl_weight >= 0, "--kl_weight must be >= 0"),
                    (args.latent_channels >= 1, "--latent_channels must be >= 1"),
                    (args.scale_images >= 1, "--scale_images must be >= 1"),
                    (args.save_every_steps >= 0, "--save_every_steps must be >= 0"),
                    (args.log_every_steps >= 1, "--log_every_steps must be >= 1")]:
        if not ok:
            raise UserError(msg)
    if args.image_size <= 0 or args.image_size % 8:
        raise UserError(f"--image_size must be a positive multiple of 8, got {args.image_size}")
    out = Path(args.output_dir).expanduser().resolve()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    resume_ckpt = load_resume_checkpoint(args, out, "ldm_vae")
    class_names, samples, channels = scan_class_folders(args.data_root)
    if len(samples) < args.batch_size * world_env:
        raise UserError(f"{len(samples)} images are fewer than one global batch ({args.batch_size} x {world_env}); "
                        f"lower --batch_size")
    seed_everything(args.seed)
    if args.init:
        vae, _ = load_vae(args.init)
        vae.requires_grad_(True).train()
    else:
        kw = dict(VAE_PRESETS[args.preset])
        kw.update({k: v for k, v in dict(block_out_channels=args.block_out_channels, layers_per_block=args.layers_per_block,
                                          norm_num_groups=args.norm_num_groups).items() if v is not None})
        if any(c % kw["norm_num_groups"] for c in kw["block_out_channels"]):
            raise UserError(f"--block_out_channels {kw['block_out_channels']} must be divisible by "
                            f"--norm_num_groups {kw['norm_num_groups']}")
        n = len(kw["block_out_channels"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                            up_block_types=["UpDecoderBlock2D"] * n, latent_channels=args.latent_channels,
                            sample_size=args.image_size, **kw)
    check_image_size(args.image_size, vae_downsample_factor(vae))
    if resume_ckpt is not None and resume_ckpt["vae_config"] != plain_config(vae.config):
        raise UserError("--resume: the checkpoint holds a VAE of another architecture; pass the same "
                        "--preset / size flags / --init as the first run")
    check_writable(out)

    from accelerate import Accelerator
    precision = resolve_precision(args.mixed_precision)
    setup_cuda_speedups()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    log = get_logger(out, accelerator.is_main_process, name="ldm_vae")
    log.info(f"command: {' '.join(sys.argv)}")
    log.info(f"world size {world} ({accelerator.distributed_type}), device {device}, precision {precision}")
    log.info(f"data: {len(samples)} images in {len(class_names)} classes, {channels} channel(s), {args.image_size}px; "
             f"VAE {'fine-tuned from ' + args.init if args.init else 'from scratch (' + args.preset + ')'}, "
             f"factor {vae_downsample_factor(vae)}, {vae.config.latent_channels} latent channels")
    log.info("parameters:\n" + param_table([("VAE encoder", vae.encoder), ("VAE decoder", vae.decoder),
                                            ("VAE (all)", vae)]))
    seed_everything(args.seed * world + rank)
    ds = ImageDataset(samples, args.image_size, channels, args.seed, args.random_flip)
    step_module = VAETrainStep(vae)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0, **optimizer_kwargs())
    steps_per_epoch = EpochBatches.num_batches(len(ds), args.batch_size, world)
    total_steps = args.num_epochs * steps_per_epoch
    if args.max_train_steps:
        total_steps = min(total_steps, args.max_train_steps)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)
    model, optimizer = accelerator.prepare(step_module, optimizer)
    step, epoch, pos = 0, 0, 0
    if resume_ckpt is not None:
        vae.load_state_dict(resume_ckpt["vae"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        lr_scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
        if accelerator.scaler is not None and resume_ckpt.get("scaler"):
            accelerator.scaler.load_state_dict(resume_ckpt["scaler"])
        step, epoch, pos = resume_ckpt["step"], resume_ckpt["epoch"], resume_ckpt["position_in_epoch"]
        if world == 1:
            set_rng_state(resume_ckpt["rng_state"])
        log.info(f"resumed: step {step}, epoch {epoch}, {pos} steps into the epoch")
        del resume_ckpt

    def ckpt():
        return {"model_type": "ldm_vae", "format_version": 1, "vae_config": plain_config(vae.config),
                "vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "step": step, "epoch": epoch, "position_in_epoch": pos, "rng_state": rng_state(),
                "class_names": class_names, "config": vars(args)}

    def save():
        accelerator.wait_for_everyone()
        ok, msg = 1.0, ""
        if accelerator.is_main_process:
            try:
                atomic_torch_save(ckpt(), out / "checkpoint_last.pt")
            except TrainingError as e:
                ok, msg = 0.0, str(e)
        if accelerator.reduce(torch.tensor([ok], device=device), "min").item() < 1:
            raise TrainingError(msg or "cannot write checkpoint_last.pt (failed on the main process)")

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    workers = args.num_workers if args.num_workers is not None else (4 if torch.cuda.is_available() else 0)
    sampler = EpochBatches(list(range(len(ds))), args.batch_size, world, rank, args.seed, epoch, start=pos)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    stop, nan_at = StopFlag(), fault_nan_step()
    log.info(f"training: {total_steps} steps ({steps_per_epoch} per epoch), global batch {args.batch_size * world}")
    t_log, acc, n_acc = time.time(), torch.zeros(3, device=device), 0
    model.train()
    while step < total_steps and epoch < args.num_epochs:
        sampler.epoch, sampler.start = epoch, pos
        for x, _, _ in loader:
            x = to_vae_input(x.to(device), 3)
            gen = torch.Generator().manual_seed(derived_seed(args.seed, rank, step))
            f = vae_downsample_factor(vae)
            eps = torch.randn((x.shape[0], vae.config.latent_channels, x.shape[2] // f, x.shape[3] // f),
                              generator=gen).to(device)
            rec, mean, logvar = model(x, eps)
            loss, r, kl = vae_loss(rec, x, mean, logvar, args.recon_loss, args.kl_weight)
            if nan_at is not None and step + 1 == nan_at:
                loss = loss * float("nan")  # testing hook, see utils.fault_nan_step
            parts = accelerator.reduce(torch.stack([loss.detach(), r.detach(), kl.detach()]).float(), "sum") / world
            if not torch.isfinite(parts[0]):
                raise TrainingError(f"loss is {parts[0].item()} at step {step + 1} (epoch {epoch}); stopped before the "
                                    f"optimizer step, checkpoint_last.pt is the last good state")
            accelerator.backward(loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, pos, n_acc = step + 1, pos + 1, n_acc + 1
            acc += parts
            if step % args.log_every_steps == 0 or step == total_steps:
                dt = time.time() - t_log
                a = (acc / n_acc).tolist()
                log.info(f"step {step}/{total_steps} epoch {epoch} loss {a[0]:.5f} recon {a[1]:.5f} kl {a[2]:.2f} "
                         f"lr {lr_scheduler.get_last_lr()[0]:.2e} {n_acc / dt:.2f} steps/s "
                         f"{n_acc * args.batch_size * world / dt:.1f} img/s")
                if writer:
                    writer.add_scalar("train/loss", a[0], step)
                    writer.add_scalar("train/recon", a[1], step)
                    writer.add_scalar("train/kl", a[2], step)
                t_log, acc, n_acc = time.time(), torch.zeros(3, device=device), 0
            stop_now = accelerator.reduce(torch.tensor([float(stop.requested)], device=device), "max").item() > 0
            if stop_now or (args.save_every_steps and step % args.save_every_steps == 0):
                save()
            if stop_now:
                log.info(f"SIGTERM received: saved checkpoint_last.pt at step {step}; exiting (rerun with --resume)")
                return finish(accelerator, writer)
            if step >= total_steps:
                break
        if pos < steps_per_epoch:
            break
        epoch, pos = epoch + 1, 0
        if writer:
            log_recon(writer, vae, ds, device, step, accelerator)
        accelerator.wait_for_everyone()
        save()
    if pos:
        save()
    if accelerator.is_main_process:
        vae.eval()
        with torch.no_grad(), accelerator.autocast():
            sf = estimate_scaling_factor(vae, ds, args.scale_images, args.seed, device)
        export_vae(vae, out, sf)
        log.info(f"done: {step} steps; VAE written to {out} (scaling_factor {sf:.5f}); use it with --vae {out}")
    return finish(accelerator, writer)


@torch.no_grad()
def log_recon(writer, vae, ds, device, step, accelerator):
    """Eight originals (top row) and their reconstructions (bottom row) to TensorBoard."""
    import torchvision
    x = torch.stack([ds[(i, -1)][0] for i in range(min(8, len(ds)))]).to(device)
    x3 = to_vae_input(x, 3)
    vae.eval()
    with accelerator.autocast():
        rec = vae.decode(vae.encode(x3).latent_dist.mean).sample.float()
    vae.train()
    grid = torchvision.utils.make_grid(torch.cat([x3, rec]).clamp(-1, 1).cpu() * 0.5 + 0.5, nrow=len(x))
    writer.add_image("reconstructions", grid, step)
    writer.flush()


if __name__ == "__main__":
    run_main(main)
