"""What only the LDM scripts share: their flag vocabulary, LDM checkpoint loading, the accelerate run
(start, rank-0 checkpoint writes, batches per optimizer step, teardown) and the EMA warm-up.

Not run directly; `train.py`, `train_vae.py`, `inference.py` and `inference_per_class.py` import it.
Everything every model folder needs (errors, flags, logging, checkpoint I/O, seeds, stop flags, EMA...)
lives in the vendored `runtime.py`.
"""
import os

import torch

import medical
from runtime import (EMA, TrainingError, UserError, add_resume_flag, atomic_save,  # noqa: F401
                     finish_distributed, get_logger, load_checkpoint as _load_checkpoint, resolve_precision,
                     resolve_resume, set_rng_state, setup_cuda_speedups)

# UserError is re-exported: dataset.py imports it from here.


def add_run_flags(p, output_dir, num_epochs, lr_warmup_steps):
    """The flags train.py and train_vae.py share (one vocabulary for every folder; old names are aliases)."""
    p.add_argument("--data_root", required=True, aliases=["dataset_path", "data_path"],
                   help="folder with one subfolder of images per class")
    p.add_argument("--output_dir", default=output_dir, help="checkpoints, log.txt, tensorboard/")
    p.add_argument("--image_size", type=int, default=256, help="pixels; multiple of 8 and of the VAE factor")
    p.add_argument("--batch_size", type=int, default=8, aliases=["train_batch_size"], help="per process")
    p.add_argument("--num_epochs", type=int, default=num_epochs, aliases=["epochs"])
    p.add_argument("--max_train_steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--learning_rate", type=float, default=1e-4, aliases=["lr"])
    p.add_argument("--lr_warmup_steps", type=int, default=lr_warmup_steps, help="steps")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--random_flip", action="store_true", default=False, help="random horizontal flips")
    p.add_argument("--no_random_flip", dest="random_flip", action="store_false", default=False,
                   aliases=["no_flip", "no_hflip"], help="no flips (the default)")
    p.add_argument("--num_workers", type=int, default=None, help="DataLoader workers (default 4 on GPU, 0 on CPU)")
    p.add_argument("--ckpt_every_steps", type=int, default=0, aliases=["save_every_steps", "ckpt_every", "save_every"],
                   help="also write checkpoint_last.pt every N steps (0: only at epoch ends)")
    p.add_argument("--log_every_steps", type=int, default=50, aliases=["log_every"])
    add_resume_flag(p)
    p.add_argument("--trust_checkpoint", action="store_true", help="allow loading pickled checkpoints")
    p.add_argument("--seed", type=int, default=42)
    medical.add_read_flags(p)  # --intensity_window, --slice_axis, --slice_range, --group_regex


def check_run_flags(a):
    """Range checks of the shared flags, naming the flag."""
    for ok, msg in [(a.batch_size >= 1, "--batch_size must be >= 1"), (a.num_epochs >= 1, "--num_epochs must be >= 1"),
                    (a.learning_rate > 0, "--learning_rate must be > 0"),
                    (a.ckpt_every_steps >= 0, "--ckpt_every_steps must be >= 0"),
                    (a.max_train_steps is None or a.max_train_steps >= 1, "--max_train_steps must be >= 1"),
                    (a.log_every_steps >= 1, "--log_every_steps must be >= 1"),
                    (a.lr_warmup_steps >= 0, "--lr_warmup_steps must be >= 0"),
                    (a.num_workers is None or a.num_workers >= 0, "--num_workers must be >= 0")]:
        if not ok:
            raise UserError(msg)
    if a.image_size <= 0 or a.image_size % 8:
        raise UserError(f"--image_size must be a positive multiple of 8, got {a.image_size}")


def load_checkpoint(path, trust=False, expect_type=None):
    """runtime.load_checkpoint (weights_only, the one pickle check), then this folder's model_type check."""
    ckpt = _load_checkpoint(path, trust=trust)
    if not isinstance(ckpt, dict) or "model_type" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repository (no 'model_type' key)")
    if expect_type is not None and ckpt["model_type"] != expect_type:
        raise UserError(f"{path} is a '{ckpt['model_type']}' checkpoint, but this script needs a "
                        f"'{expect_type}' checkpoint")
    return ckpt


def load_resume_checkpoint(args, out, expect_type):
    """The checkpoint --resume names (bare / auto: <output_dir>/checkpoint_last.pt), or None without --resume."""
    path = resolve_resume(args.resume, out / "checkpoint_last.pt")
    return None if path is None else load_checkpoint(path, trust=args.trust_checkpoint, expect_type=expect_type)


def start_run(args, out, name):
    """Logger + Accelerator: the precision this device supports, a real gloo group on CPU -> (accelerator, log)."""
    from accelerate import Accelerator
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    log = get_logger(out, int(os.environ.get("RANK", "0")), name=name)  # accelerate launch sets RANK
    precision = resolve_precision(args.mixed_precision, device, log)
    setup_cuda_speedups(device)
    # cpu=True without CUDA: a plain Accelerator() under `accelerate launch --multi_gpu` on a CPU machine
    # starts processes that each believe they are alone (see CONVENTIONS.md); with it, a real MULTI_CPU run.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    log.info(f"world size {accelerator.num_processes} ({accelerator.distributed_type}), device "
             f"{accelerator.device}, precision {precision}"
             + (f" (asked for {args.mixed_precision})" if precision != args.mixed_precision else ""))
    return accelerator, log


def save_checkpoint(accelerator, make_ckpt, path):
    """Rank 0 writes atomically; every rank learns whether it worked (so none hangs or carries on alone)."""
    write_on_main(accelerator, lambda: atomic_save(make_ckpt(), path), path)


def write_on_main(accelerator, write, path):
    """Run `write()` on rank 0 only; a TrainingError there is raised on every rank (none waits forever)."""
    accelerator.wait_for_everyone()
    ok, msg = 1.0, ""
    if accelerator.is_main_process:
        try:
            write()
        except TrainingError as e:
            ok, msg = 0.0, str(e)
    if accelerator.reduce(torch.tensor([ok], device=accelerator.device), "min").item() < 1:
        raise TrainingError(msg or f"cannot write {path} (failed on the main process)")


def keep_on_resume(args, stored, defaults):
    """Settings a run keeps for life: a flag left out (None) takes the resumed run's value (`stored`, a dict;
    runs from before the setting existed had its default) or, in a new run, its default; a flag given
    with another value than the resumed run's is an error naming it."""
    for key, default in defaults.items():
        given = getattr(args, key)
        if stored is None:
            setattr(args, key, default if given is None else given)
            continue
        kept = stored.get(key, default)
        kept = default if kept is None else kept
        if given is not None and given != kept:
            raise UserError(f"--{key} {given} disagrees with the run being resumed ({key}={kept}); drop the flag "
                            f"or use another --output_dir")
        setattr(args, key, kept)


def make_loader(ds, sampler, num_workers):
    """DataLoader over `sampler`'s batches; workers and pinned memory on a GPU."""
    cuda = torch.cuda.is_available()
    workers = num_workers if num_workers is not None else (4 if cuda else 0)
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=cuda,
                                       persistent_workers=workers > 0)


def optimizer_steps(loader, sampler, epoch, pos, accum, steps_per_epoch, num_epochs, max_steps):
    """Yield the `accum` batches of each optimizer step from (epoch, pos) on, for at most `max_steps` steps.

    The sampler restarts each epoch with (seed, epoch) and skips the `pos * accum` batches a resumed run
    already took; the incomplete accumulation group at an epoch's end is left out."""
    for ep in range(epoch, num_epochs):
        sampler.epoch, sampler.start = ep, pos * accum
        batches = iter(loader)
        for _ in range(pos, steps_per_epoch):
            if max_steps <= 0:
                return
            max_steps -= 1
            yield [next(batches) for _ in range(accum)]
        pos = 0


class WarmupEMA(EMA):
    """runtime.EMA with the warm-up this folder has always used: decay min(decay, (1 + step) / (10 + step)).

    Short runs (and fine-tunes) still get a useful EMA; from ~10 / (1 - decay) steps on it is a fixed decay."""

    def update(self, model, step):
        full, self.decay = self.decay, min(self.decay, (1 + step) / (10 + step))
        try:
            super().update(model, step)
        finally:
            self.decay = full


def finish(accelerator, writer=None):
    """Close the writer, end accelerate's run, then leave through runtime.finish_distributed.

    end_training() finishes the trackers and destroys the process group; finish_distributed then still
    leaves a multi-process launch with os._exit (the gloo exit trap, see runtime.py)."""
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    finish_distributed(0)
    return 0


def restore_training_state(ck, optimizer, lr_scheduler, accelerator, steps_per_epoch):
    """Optimizer, LR schedule, grad scaler and RNG from a resume checkpoint -> (step, epoch, position)."""
    optimizer.load_state_dict(ck["optimizer"])
    lr_scheduler.load_state_dict(ck["lr_scheduler"])
    if accelerator.scaler is not None and ck.get("scaler"):
        accelerator.scaler.load_state_dict(ck["scaler"])
    if accelerator.num_processes == 1:
        set_rng_state(ck["rng_state"])
    step, epoch, pos = ck["step"], ck["epoch"], ck["position_in_epoch"]
    if pos >= steps_per_epoch:  # older versions could save between an epoch's last step and its end
        epoch, pos = epoch + 1, 0
    return step, epoch, pos
