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
Same flags, runtime and loop shape as train.py (see utils.add_run_flags).
"""
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from accelerate.utils import set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler

import medical
from dataset import EpochBatches, ImageDataset, fit_window, read_options, scan_class_folders
from models import check_image_size, load_vae, plain_config, to_vae_input, vae_downsample_factor
from runtime import (FlagParser, StopFlags, Throughput, TrainingError, UserError, check_writable, generator, memory_mb,
                     optimizer_kwargs, param_table, remove_stale_temporaries, rng_state, run_main)
from utils import (add_run_flags, check_run_flags, finish, load_resume_checkpoint, make_loader, optimizer_steps,
                   restore_training_state, save_checkpoint, start_run)

# Scratch architectures; the downsampling factor is 2 ** (levels - 1).
VAE_PRESETS = {
    "tiny": dict(block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8),    # factor 4 (demo)
    "small": dict(block_out_channels=[64, 128, 256], layers_per_block=2, norm_num_groups=32),  # factor 4
    "sd": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),  # factor 8, SD's
}


def parse_args(argv=None):
    """Command line -> Namespace (the shared run flags of utils.add_run_flags plus the VAE's own)."""
    p = FlagParser(description="Train or fine-tune an AutoencoderKL for the LDM.")
    add_run_flags(p, output_dir="./vae", num_epochs=20, lr_warmup_steps=0)
    p.add_argument("--init", default=None, help="fine-tune this VAE (hub id or folder) instead of training from scratch")
    p.add_argument("--preset", default="small", choices=list(VAE_PRESETS), help="scratch architecture")
    p.add_argument("--block_out_channels", type=int, nargs="+", default=None)
    p.add_argument("--layers_per_block", type=int, default=None)
    p.add_argument("--norm_num_groups", type=int, default=None)
    p.add_argument("--latent_channels", type=int, default=4)
    p.add_argument("--recon_loss", default="l1", choices=["l1", "l2"])
    p.add_argument("--kl_weight", type=float, default=1e-6)
    p.add_argument("--scale_images", type=int, default=512, help="images used to estimate the latent scaling factor")
    args = p.parse_args(argv)
    check_run_flags(args)
    for ok, msg in [(args.kl_weight >= 0, "--kl_weight must be >= 0"),
                    (args.latent_channels >= 1, "--latent_channels must be >= 1"),
                    (args.scale_images >= 1, "--scale_images must be >= 1")]:
        if not ok:
            raise UserError(msg)
    return args


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


def build_vae(args, resume):
    """The AutoencoderKL to train (--init or a preset), checked against the image size and a resume checkpoint."""
    set_seed(args.seed)  # identical initial weights for a given seed (no resume involved: accelerate's)
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
    if resume is not None and resume["vae_config"] != plain_config(vae.config):
        raise UserError("--resume: the checkpoint holds a VAE of another architecture; pass the same "
                        "--preset / size flags / --init as the first run")
    return vae


def restore(ck, vae, optimizer, lr_scheduler, accelerator, steps_per_epoch):
    """Load a resume checkpoint into the run -> (step, epoch, position_in_epoch)."""
    if ck is None:
        return 0, 0, 0
    vae.load_state_dict(ck["vae"])
    return restore_training_state(ck, optimizer, lr_scheduler, accelerator, steps_per_epoch)


def log_step(log, writer, accelerator, step, total_steps, epoch, parts, n, lr, throughput):
    """The periodic log line (losses averaged over ranks and steps) and its TensorBoard scalars."""
    loss, recon, kl = (accelerator.reduce(parts, "mean") / max(n, 1)).tolist()
    steps_s, images_s = throughput.rates()
    log.info(f"step {step}/{total_steps} epoch {epoch} loss {loss:.5f} recon {recon:.5f} kl {kl:.2f} lr {lr:.2e} "
             f"{steps_s:.2f} steps/s {images_s:.1f} img/s mem {memory_mb(accelerator.device):.0f} MiB")
    if writer:
        for name, v in (("loss", loss), ("recon", recon), ("kl", kl)):
            writer.add_scalar(f"train/{name}", v, step)


def main(argv=None):
    """Check everything, build, resume, train (one optimizer step per iteration), export the VAE folder."""
    args = parse_args(argv)
    out = Path(args.output_dir).expanduser().resolve()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    resume = load_resume_checkpoint(args, out, "ldm_vae")
    stored = (resume.get("config") or {}).get("intensity") if resume is not None else None
    opts = read_options(args, stored)  # a resumed run keeps its window (never re-fitted)
    class_names, samples, channels = scan_class_folders(args.data_root, opts)
    if stored is None:
        opts = fit_window(opts, samples)
    if len(samples) < args.batch_size * world_env:
        raise UserError(f"{len(samples)} images are fewer than one global batch ({args.batch_size} x {world_env}); "
                        f"lower --batch_size")
    vae = build_vae(args, resume)
    check_writable(out)
    accelerator, log = start_run(args, out, "ldm_vae")
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if accelerator.is_main_process:
        remove_stale_temporaries(out)  # what a killed run left beside its checkpoint
    log.info(f"command: {' '.join(sys.argv)}")
    log.info(f"data: {len(samples)} images in {len(class_names)} classes, {channels} channel(s), {args.image_size}px; "
             f"VAE {'fine-tuned from ' + args.init if args.init else 'from scratch (' + args.preset + ')'}, "
             f"factor {vae_downsample_factor(vae)}, {vae.config.latent_channels} latent channels")
    for line in medical.describe_data([src for src, _ in samples], [lbl for _, lbl in samples], class_names, opts):
        log.info(f"data: {line}")
    log.info("parameters:\n" + param_table({"VAE encoder": vae.encoder, "VAE decoder": vae.decoder, "VAE (all)": vae}))
    set_seed(args.seed * world + rank)  # per-rank streams for anything not seeded per step
    ds = ImageDataset(samples, args.image_size, channels, args.seed, args.random_flip, opts)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0, **optimizer_kwargs(device))
    steps_per_epoch = EpochBatches.num_batches(len(ds), args.batch_size, world)
    total_steps = min(args.num_epochs * steps_per_epoch, args.max_train_steps or math.inf)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps)
    model, optimizer = accelerator.prepare(VAETrainStep(vae), optimizer)
    step, epoch, pos = restore(resume, vae, optimizer, lr_scheduler, accelerator, steps_per_epoch)
    last, saved, last_good = out / "checkpoint_last.pt", None, "none written yet"
    if resume is not None:
        src = last if args.resume == "auto" else args.resume
        log.info(f"resumed from {src}: step {step}, epoch {epoch}, {pos} steps into the epoch")
        saved, last_good, resume = step, f"{src} (step {step})", None

    def ckpt():
        return {"model_type": "ldm_vae", "format_version": 1, "vae_config": plain_config(vae.config),
                "vae": vae.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "step": step, "epoch": epoch, "position_in_epoch": pos, "rng_state": rng_state(),
                "class_names": class_names, "config": {**vars(args), "intensity": opts.to_config()}}

    writer = None
    if accelerator.is_main_process:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "tensorboard"))
    sampler = EpochBatches(list(range(len(ds))), args.batch_size, world, rank, args.seed, epoch)
    loader = make_loader(ds, sampler, args.num_workers)
    log.info(f"training: {total_steps} steps ({steps_per_epoch} per epoch), global batch {args.batch_size * world}")
    f, lc = vae_downsample_factor(vae), vae.config.latent_channels
    throughput, parts, n_logged, reason = Throughput(), torch.zeros(3, device=device), 0, None
    model.train()
    with StopFlags(device=device) as stop:
        for [(x, _, _)] in optimizer_steps(loader, sampler, epoch, pos, 1, steps_per_epoch, args.num_epochs,
                                           total_steps - step):
            x = to_vae_input(x.to(device), 3)
            eps = torch.randn((x.shape[0], lc, x.shape[2] // f, x.shape[3] // f),
                              generator=generator(args.seed, rank, step)).to(device)
            rec, mean, logvar = model(x, eps)
            loss, recon, kl = vae_loss(rec, x, mean, logvar, args.recon_loss, args.kl_weight)
            loss = stop.check_loss(loss, step + 1, last_good)  # NaN/inf on any rank: stop before backward
            accelerator.backward(loss)
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, pos, n_logged = step + 1, pos + 1, n_logged + 1
            parts += torch.stack([loss.detach(), recon.detach(), kl.detach()]).float()
            throughput.add(args.batch_size * world)
            if step % args.log_every_steps == 0 or step == total_steps:
                log_step(log, writer, accelerator, step, total_steps, epoch, parts, n_logged,
                         lr_scheduler.get_last_lr()[0], throughput)
                parts, n_logged = torch.zeros(3, device=device), 0
            if pos == steps_per_epoch:
                epoch, pos = epoch + 1, 0
                if writer:
                    log_recon(writer, vae, ds, device, step, accelerator)
                accelerator.wait_for_everyone()
            if pos == 0 or (args.ckpt_every_steps and step % args.ckpt_every_steps == 0):
                save_checkpoint(accelerator, ckpt, last)
                saved, last_good = step, f"{last} (step {step})"
            reason = stop.should_stop(step)  # SIGTERM (any rank)
            if reason:
                break
    if saved != step:  # stopped mid-epoch (--max_train_steps, SIGTERM): the final state goes to disk
        save_checkpoint(accelerator, ckpt, last)
    if reason:
        log.info(f"{reason} received: saved checkpoint_last.pt at step {step}; exiting (rerun with --resume)")
    elif accelerator.is_main_process:
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
