"""The training/inference runtime every model folder shares: errors, flags, logging, the parameter table,
devices and distributed runs, precision, checkpoint I/O, RNG and seeds, stop flags, EMA, write-once files.

VENDORED: the canonical source is scripts/vendored/runtime.py; ddpm/, ldm/, controlnet/ and dit/ each hold
a byte-identical copy (`from runtime import ...`, so a folder runs from its own directory and can be copied
out alone). Edit the source, then run `python scripts/sync_vendored.py`; tests/test_vendored.py fails when a
copy drifts. Nothing here is specific to one model: a folder's own files hold its data layout, its network
and its loss.

Where torch / accelerate / diffusers already have the piece it is used (torch.distributed, torch.amp,
accelerate in the LDM and ControlNet trainers). Written here, and why:
- EMA: diffusers' EMAModel has its own warm-up formula and stores its decay schedule in a format of its
  own; the folders need the official DiT rule (fixed decay from step 0; computed with lerp, which equals
  the reference's mul_/add_ up to float32 rounding and is closer to exact arithmetic) and the DDPM rule
  (copy the weights until `start`, then a fixed decay), both restored bit-exactly on resume, and the DDPM
  folder does not depend on diffusers.
- Seeds: `accelerate.utils.set_seed` seeds the global generators; exact resume needs a seed that is a
  pure function of (seed, rank, step, ...) for per-step generators, which it does not give.
- RNG capture: plain tensors and lists, so a checkpoint loads with weights_only=True.
"""
import argparse
import contextlib
import logging
import math
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------- errors


class UserError(Exception):
    """A problem with the user's input (flag, file, folder): one `error:` line, exit code 2, no traceback."""


class TrainingError(Exception):
    """A run that cannot go on (NaN loss, cannot write): one `error:` line, exit code 1, no traceback."""


def run_main(fn, *args):
    """Call fn(*args); UserError -> exit 2, TrainingError -> exit 1, each as one `error:` line (rank 0).

    Under torch.distributed every rank usually meets the same bad input: the process leaves with
    os._exit so it does not wait in a collective for ranks that are already gone."""
    try:
        return fn(*args)
    except (UserError, TrainingError) as e:
        code = 2 if isinstance(e, UserError) else 1
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        if is_dist():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        sys.exit(code)


# ---------------------------------------------------------------------------------------------- flags


class FlagParser(argparse.ArgumentParser):
    """ArgumentParser whose long flags accept both `--a-b` and `--a_b`; errors are one line, exit 2.

    `aliases=[...]` on add_argument adds old names (each in both spellings too)."""

    def add_argument(self, *names, aliases=(), **kwargs):
        if names and names[0].startswith("--") and "dest" not in kwargs and kwargs.get("action") != "help":
            kwargs["dest"] = names[0][2:].replace("-", "_")
        out = []
        for n in list(names) + [a if a.startswith("-") else f"--{a}" for a in aliases]:
            alts = [n]
            if n.startswith("--"):
                alts += [n.replace("_", "-"), "--" + n[2:].replace("-", "_")]
            for a in alts:
                if a not in out:
                    out.append(a)
        return super().add_argument(*out, **kwargs)

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_resume_flag(parser):
    """--resume [PATH]: alone (or `auto`) the latest checkpoint of this run, else the checkpoint at PATH."""
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                        help="continue a run: alone (or 'auto') from the run's latest checkpoint, or from PATH")


# ---------------------------------------------------------------------------------------------- logging


def get_logger(log_dir=None, rank=0, name="train"):
    """Logger to stdout and log_dir/log.txt on rank 0; warnings only (stderr) on the other ranks."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    if rank == 0:
        handlers = [logging.StreamHandler(sys.stdout)]
        if log_dir is not None:
            handlers.append(logging.FileHandler(Path(log_dir) / "log.txt", mode="a"))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.StreamHandler(sys.stderr))
        logger.setLevel(logging.WARNING)
    return logger


def param_table(components):
    """Text table of total / trainable / frozen parameters per component ({name: module}) and overall."""
    rows = []
    for name, module in components.items():
        total = sum(p.numel() for p in module.parameters())
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append((name, total, trainable, total - trainable))
    rows.append(("total", *(sum(r[i] for r in rows) for i in (1, 2, 3))))
    width = max(9, max(len(r[0]) for r in rows))
    lines = [f"{'component':<{width}} {'total':>14} {'trainable':>14} {'frozen':>14}"]
    lines += [f"{n:<{width}} {t:>14,} {tr:>14,} {f:>14,}" for n, t, tr, f in rows]
    return "\n".join(lines)


class Throughput:
    """Steps/s and images/s since the last call to `rates()` (for the periodic training log line)."""

    def __init__(self):
        self.t0, self.steps, self.images = time.perf_counter(), 0, 0

    def add(self, images):
        self.steps += 1
        self.images += images

    def rates(self):
        dt = max(time.perf_counter() - self.t0, 1e-9)
        out = (self.steps / dt, self.images / dt)
        self.t0, self.steps, self.images = time.perf_counter(), 0, 0
        return out


def memory_mb(device):
    """Peak CUDA memory in MiB on a GPU, the process's resident set size on CPU."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except (ImportError, OSError):
        return float("nan")


def timing_summary(n_images, n_steps, seconds):
    """The line printed after inference: images, steps, total time, time per image and per step."""
    return (f"{n_images} images, {n_steps} denoising steps each, {seconds:.1f} s in all, "
            f"{seconds / max(n_images, 1):.3f} s/image, {seconds / max(n_images * n_steps, 1) * 1000:.2f} ms/step")


# ---------------------------------------------------------------------------------------------- devices


def pick_device(requested="auto"):
    """'auto' -> cuda if available else cpu; 'cuda' without a GPU falls back to cpu with a warning."""
    if requested in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(requested).startswith("cuda") and not torch.cuda.is_available():
        print("warning: CUDA is not available, running on CPU", file=sys.stderr)
        return torch.device("cpu")
    try:
        return torch.device(requested)
    except RuntimeError:
        raise UserError(f"--device {requested!r} is not a device (use auto, cpu, cuda or cuda:N)") from None


def setup_cuda_speedups(device):
    """TF32 matmuls/convolutions and cudnn autotuning on a GPU (a no-op on CPU)."""
    if getattr(device, "type", str(device)) == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def setup_distributed(device_request="auto"):
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) -> (rank, world_size, local_rank, device).

    A plain `python` run gives (0, 1, 0, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        device = pick_device(device_request)
        setup_cuda_speedups(device)
        return 0, 1, 0, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and str(device_request) != "cpu":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    setup_cuda_speedups(device)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def is_dist():
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized()


def barrier():
    """dist.barrier() when distributed, else nothing."""
    if is_dist():
        dist.barrier()


def any_rank(flag, device="cpu"):
    """True when `flag` is true on any rank (every rank must call it: it is a collective)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def mean_over_ranks(value, device="cpu"):
    """The mean of a float over all ranks (the value itself in a single process)."""
    if not is_dist():
        return float(value)
    t = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def finish_distributed(code=0):
    """Leave a multi-process run: barrier (clean finish only), destroy the group, then os._exit(code).

    os._exit because on this kind of machine 10-20% of 2-process gloo runs otherwise aborted at
    interpreter exit ('terminate called without an active exception', exit code 1) even after
    destroy_process_group(). A single process returns and exits normally. A process of a multi-process
    launch (WORLD_SIZE > 1) whose group is already gone (accelerate's end_training() destroys it) still
    leaves through os._exit."""
    if not is_dist():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return
    else:
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


# ---------------------------------------------------------------------------------------------- precision


def bf16_supported(device):
    """bf16 autocast is native here: an Ampere+ GPU, or a CPU with AVX-512 bf16 / AMX."""
    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private; absent in some releases
    try:
        return bool(check()) if check else False
    except Exception:  # noqa: BLE001 - a failed probe only means "not known to be fast"
        return False


def resolve_precision(requested, device, logger=None):
    """--mixed_precision auto|no|fp16|bf16 -> what runs on this device: 'no', 'fp16' or 'bf16'.

    fp16 (with a grad scaler) is a GPU recipe; on a CPU it becomes bf16 where bf16 is native, else fp32.
    bf16 on a GPU without bf16 becomes fp16. An explicit bf16 on a CPU without native bf16 is honoured
    (it runs, emulated and slow) with a warning."""
    say = logger.warning if logger else (lambda m: print(m, file=sys.stderr))
    cuda = getattr(device, "type", str(device)) == "cuda"
    if requested in (None, "no"):
        return "no"
    if requested == "auto":
        return "bf16" if bf16_supported(device) else ("fp16" if cuda else "no")
    if requested == "fp16" and not cuda:
        fallback = "bf16" if bf16_supported(device) else "no"
        say(f"warning: fp16 mixed precision needs CUDA; using {'bf16' if fallback == 'bf16' else 'fp32'} "
            f"on this CPU")
        return fallback
    if requested == "bf16" and not bf16_supported(device):
        if cuda:
            say("warning: bf16 is not supported on this GPU; using fp16 with a grad scaler")
            return "fp16"
        say("warning: this CPU has no native bf16: bf16 runs, but emulated and slow")
    return requested


def autocast_dtype(precision):
    """'bf16' -> torch.bfloat16, 'fp16' -> torch.float16, 'no' -> None."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def autocast(precision, device):
    """Autocast context for 'bf16' / 'fp16'; a no-op for 'no'."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=getattr(device, "type", str(device)), dtype=dtype)


def grad_scaler(precision, device):
    """A GradScaler that is enabled only for fp16 on CUDA (torch.cuda.amp's API exists in every torch>=2.1)."""
    enabled = precision == "fp16" and getattr(device, "type", str(device)) == "cuda"
    return torch.cuda.amp.GradScaler(enabled=enabled) if enabled else _NoScaler()


class _NoScaler:
    """What a disabled GradScaler does, with a state dict that round-trips through checkpoints."""

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer):
        pass

    def step(self, optimizer):
        optimizer.step()

    def update(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def optimizer_kwargs(device):
    """fused AdamW on CUDA (one kernel), foreach elsewhere (fewer Python loops on CPU)."""
    return {"fused": True} if getattr(device, "type", str(device)) == "cuda" else {"foreach": True}


# ---------------------------------------------------------------------------------------------- files


def _write_failure(e, path):
    """A one-line reason for a failed write; torch's zip writer reports a full disk as a RuntimeError."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    try:
        free = shutil.disk_usage(Path(path).parent).free // 1024
        return f"the write failed (disk full? {free} KiB free)"
    except OSError:
        return "the write failed"


def _is_write_failure(e):
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("inline_container", "PytorchStreamWriter", "unexpected pos", "file write failed")))


def _temp_in(folder, name, suffix=".tmp"):
    """A new hidden temporary file next to the target, with the user's usual permissions (not 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=suffix, dir=folder)
    os.close(fd)
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    return tmp


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, then os.replace: a crash never leaves half a file.

    A failed write (disk full, read-only) removes the temporary file and raises TrainingError saying the
    previous file is intact."""
    path, tmp = Path(path), None
    try:
        tmp = _temp_in(path.parent, path.name)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if not _is_write_failure(e):
            raise
        raise TrainingError(f"cannot write {path}: {_write_failure(e, path)}; the previous checkpoint is "
                            f"intact") from None


def atomic_write_text(text, path):
    """Write a small text file (JSON, settings) atomically."""
    path, tmp = Path(path), None
    try:
        tmp = _temp_in(path.parent, path.name)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None


def remove_stale_temporaries(folder, older_than_s=60.0):
    """Delete temporary files that a killed process left beside its checkpoints (`.<name>.*.tmp`)."""
    now = time.time()
    for p in Path(folder).glob(".*.tmp"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > older_than_s:
                p.unlink()


def check_writable(folder):
    """Create `folder` and prove a file can be written there, before any heavy work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}; choose a writable folder") from None


def save_png_once(image, path):
    """Write a PIL image as PNG at `path` unless a file is already there; False if it was.

    Temporary file + os.link: the link fails when the target exists, so concurrent runs into one folder
    never overwrite each other and a killed run never leaves a half-written image under the final name."""
    path, tmp = Path(path), None
    if path.exists():
        return False
    try:
        tmp = _temp_in(path.parent, path.stem, ".png")
        image.save(tmp, format="PNG")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def save_png_replace(image, path):
    """Write a PIL image as PNG, atomically replacing an older file of that name (grids, previews)."""
    path, tmp = Path(path), None
    try:
        tmp = _temp_in(path.parent, path.stem, ".png")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None


def to_pil(image):
    """A (C,H,W) uint8 tensor / array (C = 1 or 3) -> PIL image ('L' or 'RGB')."""
    from PIL import Image
    arr = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    arr = arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))


# ---------------------------------------------------------------------------------------------- checkpoints


def trust_message(path, flag="--trust_checkpoint"):
    return (f"{path} is not a plain checkpoint (it holds pickled Python objects, which can run code when "
            f"loaded). If you trust this file, pass {flag} to load it anyway.")


def load_checkpoint(path, trust=False, expect_type=None, trust_flag="--trust_checkpoint"):
    """torch.load(map_location='cpu', weights_only=True) with one-line errors; pickles only when trusted.

    The one pickle check: torch refuses a pickled object under weights_only with an UnpicklingError. The
    same error type (and text) also comes from a text file that happens to parse as pickle opcodes, so a
    refusal counts as "pickled objects" only inside a torch zip archive, or when torch names the global it
    blocked; anything else means the file is not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        import zipfile
        if not (zipfile.is_zipfile(path) or "GLOBAL" in str(e) or "Unsupported global" in str(e)):
            raise UserError(f"{path} is not a checkpoint (torch cannot read it)") from None
        if not trust:
            raise UserError(trust_message(path, trust_flag)) from None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - anything here means "not a checkpoint"
            raise UserError(f"{path} is not a checkpoint ({type(e2).__name__})") from None
    except Exception:  # noqa: BLE001 - zip errors, truncated files, text files...
        raise UserError(f"{path} is not a checkpoint (torch cannot read it)") from None
    if expect_type is not None:
        got = ckpt.get("model_type") if isinstance(ckpt, dict) else type(ckpt).__name__
        if got != expect_type:
            raise UserError(f"{path} is not a {expect_type} checkpoint (it holds model_type={got!r})")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def resolve_resume(resume, latest):
    """--resume value -> the checkpoint path to continue from (None without --resume).

    `latest` is the run's latest checkpoint (a Path, or None when the run has none yet); 'auto' (or the
    bare flag) takes it, anything else is a path."""
    if resume is None:
        return None
    path = latest if resume == "auto" else Path(resume)
    if path is None or not Path(path).is_file():
        raise UserError(f"--resume: {path or 'no checkpoint'} does not exist (nothing to resume; drop --resume "
                        f"to start a new run)")
    return Path(path)


def unwrap(model):
    """The plain module behind DDP / DataParallel / torch.compile wrappers (state dicts without prefixes)."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def cpu_state_dict(module):
    """state_dict of the unwrapped module with every tensor detached on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(module).state_dict().items()}


# ---------------------------------------------------------------------------------------------- RNG, seeds


def derive_seed(*parts):
    """The per-step seed rule: a 63-bit seed that is a pure function of the integers (seed, rank, step...).

    Randomness drawn from torch.Generator().manual_seed(derive_seed(seed, rank, step)) does not depend on
    what ran before, so a resumed run draws exactly what an uninterrupted one would have."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(
        1, np.uint64)[0] >> np.uint64(1))


def generator(*parts, device="cpu"):
    """A torch.Generator on `device` seeded with derive_seed(*parts)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def seed_everything(seed):
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    """RNG states of Python, NumPy, torch CPU and CUDA as plain lists / tensors (weights_only-loadable)."""
    py = random.getstate()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": [py[0], list(py[1]), py[2]],
        # int64 holds every uint32 key; torch.from_numpy has no uint32 before torch 2.3
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    """Restore what rng_state() returned (CUDA states only when the GPU count matches)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------- stopping


class StopFlags:
    """What ends a training loop early: SIGTERM (schedulers send it before a kill), a non-finite loss, a
    time limit. Use as a context manager: the previous SIGTERM handler is restored on exit.

    The loop calls `check_loss(loss, step, last_good)` before backward (a NaN never reaches the weights or
    a checkpoint) and `should_stop(step)` after each step; both agree across ranks. The test harness
    (tests/faults/fault_hooks.py) wraps these two methods to inject faults, so no product file reads a
    fault-injection setting."""

    def __init__(self, time_limit_minutes=0.0, device="cpu"):
        self.sigterm = False
        self.device = device
        self.deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes else None
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (a test runner's thread): no handler, no restore
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    def _on_sigterm(self, signum, frame):
        self.sigterm = True

    def check_loss(self, loss, step, last_good="none written yet"):
        """Raise TrainingError when the loss is NaN/inf on any rank (step is the 1-based step it belongs to)."""
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        if any_rank(not math.isfinite(value), self.device):
            raise TrainingError(f"loss is {'nan' if math.isnan(value) else value} at step {step}; stopped "
                                f"before the optimizer step. Last good checkpoint: {last_good}. Try a lower "
                                f"learning rate, or --mixed_precision no")
        return loss

    def should_stop(self, step):
        """'SIGTERM' or 'time limit' when the run must stop after `step` (any rank), else None."""
        timed_out = self.deadline is not None and time.monotonic() >= self.deadline
        if not any_rank(self.sigterm or timed_out, self.device):
            return None
        return "SIGTERM" if any_rank(self.sigterm, self.device) else "time limit"


# ---------------------------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's weights (floating tensors averaged, others copied).

    Rule: for `update(model, step)` with step < start the EMA copies the weights; from `start` on,
    ema = decay * ema + (1 - decay) * weights. start=0 is the official DiT rule (decay from the first
    step); the DDPM folder waits `start` steps. The weights live in `self.model`, a frozen copy."""

    def __init__(self, model, decay=0.9999, start=0):
        import copy
        self.decay, self.start = float(decay), int(start)
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        """Blend the model's weights in (step = optimizer steps done so far)."""
        src = list(unwrap(model).state_dict().values())
        dst = list(self.model.state_dict().values())
        pairs = [(d, s.detach()) for d, s in zip(dst, src) if d.is_floating_point() and step >= self.start]
        if pairs:  # one fused kernel for all tensors: ema += (1 - decay) * (w - ema)
            torch._foreach_lerp_([d for d, _ in pairs], [s.to(d.dtype) for d, s in pairs], 1.0 - self.decay)
        for d, s in zip(dst, src):
            if not d.is_floating_point() or step < self.start:
                d.copy_(s)

    def state_dict(self):
        return cpu_state_dict(self.model)

    def load_state_dict(self, state):
        self.model.load_state_dict(state)
