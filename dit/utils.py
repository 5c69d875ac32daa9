"""Helpers shared by train.py, inference.py and download.py: user errors, flags with both spellings,
logging, device / precision choice, torch.distributed setup, safe checkpoint loading, the frozen VAE.

Not a script; see train.py, sample.py and sample_ddp.py.
"""
import argparse
import contextlib
import json
import logging
import os
import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist

# --vae shortcuts: the Stable Diffusion VAEs fine-tuned by Stability AI, as in the DiT paper.
VAE_SHORTCUTS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


class UserError(Exception):
    """Bad input: reported as one `error: ...` line and exit code 2, without a traceback."""


def run_main(main, args):
    """Run main(args); turn a UserError into `error: <msg>` on stderr and exit code 2."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_available() and dist.is_initialized():
            # Every rank meets the same bad input; exit without waiting for the others.
            os._exit(2)
        sys.exit(2)


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser whose long flags accept both `--a-b` and `--a_b`; errors exit 2 in one line."""

    def add_argument(self, *names, **kwargs):
        extra = []
        for n in names:
            if n.startswith("--") and ("-" in n[2:] or "_" in n[2:]):
                for alt in (n.replace("_", "-"), "--" + n[2:].replace("-", "_")):
                    if alt not in names and alt not in extra:
                        extra.append(alt)
        return super().add_argument(*names, *extra, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def create_logger(log_dir=None, rank=0, name="dit"):
    """Logger to stdout and log_dir/log.txt on rank 0; silent on other ranks."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout)]
        if log_dir is not None:
            handlers.append(logging.FileHandler(os.path.join(log_dir, "log.txt")))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL)
    return logger


# ----------------------------------------------------------------------------- device / precision
def setup_distributed():
    """Init torch.distributed under torchrun (nccl on CUDA, gloo on CPU): (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        # TF32 matmuls/convolutions: ~free speed on Ampere+ at negligible accuracy cost for diffusion.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    return rank, world, device


def barrier():
    """dist.barrier() when distributed."""
    if dist.is_initialized():
        dist.barrier()


def finish_distributed():
    """Clean exit of a multi-process run.

    destroy_process_group, then os._exit(0): on this kind of machine ~10-20% of 2-process gloo runs
    otherwise abort at interpreter exit ('terminate called without an active exception').
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


def bf16_supported(device):
    """bf16 autocast is fast on this device (Ampere+ GPU, or a CPU with AVX-512 bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def resolve_precision(requested, device, logger=None):
    """Map --mixed-precision auto|no|fp16|bf16 to what runs here ('no', 'fp16' or 'bf16')."""
    say = logger.warning if logger else (lambda m: print("warning: " + m, file=sys.stderr))
    if requested == "auto":
        if bf16_supported(device):
            return "bf16"
        return "fp16" if device.type == "cuda" else "no"
    if requested == "fp16" and device.type != "cuda":
        # fp16 autocast + GradScaler is a GPU recipe; CPUs get bf16 where it is native.
        fallback = "bf16" if bf16_supported(device) else "no"
        say(f"--mixed-precision fp16 needs CUDA; using {fallback} on CPU")
        return fallback
    if requested == "bf16" and not bf16_supported(device):
        say("bf16 is not native on this device: it runs, but emulated and slow")
    return requested


def autocast(precision, device):
    """Autocast context for 'bf16' / 'fp16', a no-op for 'no'."""
    if precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------- checkpoints
def trust_message(path):
    return (f"{path} is not a plain checkpoint (it holds pickled Python objects, which can run code "
            f"when loaded). If you trust this file, pass --trust_checkpoint to load it anyway.")


def load_checkpoint(path, trust=False):
    """torch.load with weights_only=True; a pickled file only with trust=True (then args -> dict)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust:
            raise UserError(trust_message(path)) from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - any failure means "not a checkpoint"
            raise UserError(f"{path} is not a checkpoint ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path} is not a checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def atomic_save(obj, path):
    """torch.save to a temp file in the same folder, then os.replace (a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def check_writable(folder):
    """Raise UserError unless a file can be created in folder."""
    probe = Path(folder) / f".write_test_{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}") from None


# ----------------------------------------------------------------------------- VAE
def resolve_vae_name(spec):
    """--vae value -> hub id or absolute folder path."""
    if spec in VAE_SHORTCUTS:
        return VAE_SHORTCUTS[spec]
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    if os.path.exists(spec) or spec.startswith((".", "/", "~")):
        raise UserError(f"--vae {spec}: not a folder with a diffusers AutoencoderKL (config.json + weights)")
    return spec


def load_vae(spec, device):
    """The frozen AutoencoderKL named by --vae, in eval mode, plus a dict describing it."""
    from diffusers.models import AutoencoderKL
    name = resolve_vae_name(spec)
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise UserError(f"--vae {spec}: {name} has no config.json (expected a folder written by "
                        f"AutoencoderKL.save_pretrained)")
    try:
        vae = AutoencoderKL.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - offline hub, missing files, wrong folder
        raise UserError(f"--vae {spec}: cannot load an AutoencoderKL from {name} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without internet access, "
                        f"pass --vae <folder> with a local copy (AutoencoderKL.save_pretrained)") from None
    vae.requires_grad_(False).eval().to(device)
    cfg = vae.config
    info = {
        "vae": spec if spec in VAE_SHORTCUTS else name,
        "factor": 2 ** (len(cfg.block_out_channels) - 1),
        "latent_channels": int(cfg.latent_channels),
        "image_channels": int(cfg.in_channels),
        "scaling_factor": float(getattr(cfg, "scaling_factor", None) or 0.18215),
        # Some VAEs also centre their latents: z = (sample - shift_factor) * scaling_factor.
        "shift_factor": float(getattr(cfg, "shift_factor", None) or 0.0),
    }
    return vae, info


def vae_fingerprint(vae):
    """Hash of a VAE's config and weights (invalidates latent caches when the VAE changes)."""
    import hashlib
    h = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for k, v in vae.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def count_params(module):
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    return total, sum(p.numel() for p in module.parameters() if p.requires_grad)


def param_table(components):
    """Lines of a parameter table for {name: module}: total, trainable, frozen, in millions."""
    lines = [f"{'component':<12}{'total':>12}{'trainable':>12}{'frozen':>12}"]
    gt = gtr = 0
    for name, m in components.items():
        t, tr = count_params(m)
        gt, gtr = gt + t, gtr + tr
        lines.append(f"{name:<12}{t / 1e6:>11.2f}M{tr / 1e6:>11.2f}M{(t - tr) / 1e6:>11.2f}M")
    lines.append(f"{'all':<12}{gt / 1e6:>11.2f}M{gtr / 1e6:>11.2f}M{(gt - gtr) / 1e6:>11.2f}M")
    return lines
