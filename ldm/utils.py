"""Shared plumbing for the LDM scripts: user errors, logging, safe checkpoint I/O, precision, seeds.

Not run directly; `train.py`, `train_vae.py`, `inference.py` and `inference_per_class.py` import it.
"""
import logging
import os
import shutil
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

NOT_PLAIN_MSG = ("{path} is not a plain checkpoint (it holds pickled Python objects, which can run code "
                 "when loaded). If you trust this file, pass --trust_checkpoint to load it anyway.")


class UserError(Exception):
    """A problem with the user's input: printed as one `error:` line, exit code 2, no traceback."""


class TrainingError(Exception):
    """A run that must stop (NaN loss, cannot write): printed as one `error:` line, exit code 1."""


def run_main(fn, argv=None):
    """Call fn(argv); turn UserError / TrainingError into `error: ...` on stderr and an exit code."""
    try:
        return fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def add_flag(parser, name, **kw):
    """Add `--name` accepting both `--a_b` and `--a-b` spellings."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    for alias in kw.pop("aliases", ()):
        names += [f"--{alias}", f"--{alias.replace('_', '-')}"] if "_" in alias else [f"--{alias}"]
    return parser.add_argument(*names, dest=name, **kw)


def get_logger(output_dir=None, is_main=True, name="ldm"):
    """Logger to stdout and `output_dir/log.txt` on the main process; silent elsewhere."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    logger.propagate = False
    if not is_main:
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.ERROR)
        return logger
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    h = logging.StreamHandler(sys.stdout)
    h.setFormatter(fmt)
    logger.addHandler(h)
    if output_dir is not None:
        fh = logging.FileHandler(Path(output_dir) / "log.txt")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    logger.setLevel(logging.INFO)
    return logger


def load_checkpoint(path, trust=False, expect_type=None):
    """torch.load a plain checkpoint dict (weights_only unless trusted) and check its model_type."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # weights_only refuses pickled objects; anything else means not a checkpoint
        msg = str(e)
        if not trust and ("Weights only load failed" in msg or "Unsupported global" in msg
                          or "weights_only" in msg):
            raise UserError(NOT_PLAIN_MSG.format(path=path)) from None
        raise UserError(f"{path} is not a checkpoint torch can read ({type(e).__name__}: "
                        f"{msg.splitlines()[0][:200] if msg else ''})") from None
    if not isinstance(ckpt, dict) or "model_type" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this repository (no 'model_type' key)")
    if expect_type is not None and ckpt["model_type"] != expect_type:
        raise UserError(f"{path} is a '{ckpt['model_type']}' checkpoint, but this script needs a "
                        f"'{expect_type}' checkpoint")
    return ckpt


def load_resume_checkpoint(args, out, expect_type):
    """The checkpoint --resume names (auto: <output_dir>/checkpoint_last.pt), or None without --resume."""
    if args.resume is None:
        return None
    rpath = out / "checkpoint_last.pt" if args.resume == "auto" else Path(args.resume)
    if not rpath.is_file():
        raise UserError(f"--resume: {rpath} does not exist (nothing to resume; drop --resume to start fresh)")
    return load_checkpoint(rpath, trust=args.trust_checkpoint, expect_type=expect_type)


def atomic_torch_save(obj, path):
    """torch.save to a temp file in the same folder, then os.replace; a failed write -> TrainingError."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the user's usual permissions
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not is_write_failure(e):
            raise
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise TrainingError(f"cannot write {path}: {write_failure_reason(e, path)}; the previous checkpoint "
                            f"is intact") from None


def is_write_failure(e):
    """torch.save's zip writer reports a full disk as a RuntimeError ('inline_container' / 'PytorchStreamWriter')."""
    return "inline_container" in str(e) or "PytorchStreamWriter" in str(e)


def write_failure_reason(e, path):
    """strerror of an OSError; for torch's RuntimeError, the free space (its own text names no cause)."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    try:
        free = shutil.disk_usage(Path(path).parent).free
    except OSError:
        return "the write failed"
    return f"the write failed (disk full? {free // 1024} KiB free)"


def _umask():
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(folder):
    """Create `folder` and prove we can write into it before any training starts."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to output folder {folder}: {e.strerror or e}") from None


def resolve_precision(requested, logger=None):
    """Map --mixed_precision to what this device can do: fp16 only on CUDA, bf16 only where supported."""
    def warn(msg):
        (logger.warning if logger else warnings.warn)(msg)

    if requested == "no":
        return "no"
    cuda = torch.cuda.is_available()
    if cuda:
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            warn("bf16 is not supported on this GPU; using fp16 with a grad scaler instead")
            return "fp16"
        return requested
    # CPU: no fp16 autocast worth having (and no GradScaler); bf16 runs everywhere but is only fast
    # with AVX-512 bf16, so an explicit bf16 is honoured and fp16 falls back to bf16 only if fast.
    if requested == "fp16":
        fast_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        if fast_bf16:
            warn("fp16 is GPU-only; using bf16 on this CPU (it supports AVX-512 bf16)")
            return "bf16"
        warn("fp16 is GPU-only and this CPU has no fast bf16; training in fp32")
        return "no"
    return requested


def setup_cuda_speedups():
    """TF32 matmuls/convolutions on Ampere+ GPUs (harmless elsewhere)."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def seed_everything(seed):
    """Seed python, numpy and torch (CPU + CUDA)."""
    import random
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts):
    """A 63-bit seed that is a pure function of the integer parts (seed, rank, step, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def rng_state():
    """RNG states of python, numpy and torch as plain values / tensors (weights_only-loadable)."""
    import random
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    import random
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state.get("cuda"):
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # different GPU count than when saved: the per-step generators still match
            pass


class StopFlag:
    """Set by SIGTERM (what schedulers send before killing a job); the loop checks it each step."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread (e.g. called from a test thread)
            pass

    def _handler(self, signum, frame):
        self.requested = True


def finish(accelerator, writer):
    """End a training script: close logs; in multi-process runs tear down and os._exit(0) (gloo
    sometimes aborts at exit otherwise)."""
    if writer:
        writer.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def fault_nan_step():
    """Testing hook: DIFFUSION_FAULT_NAN_AT_STEP=N makes the training loss NaN at step N (1-based)."""
    v = os.environ.get("DIFFUSION_FAULT_NAN_AT_STEP")
    return int(v) if v else None


def count_params(module):
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable


def param_table(components):
    """Text table of total / trainable / frozen parameters per component and overall."""
    rows, tot, tr = [], 0, 0
    for name, mod in components:
        t, r = count_params(mod)
        rows.append((name, t, r, t - r))
        tot += t
        tr += r
    rows.append(("total", tot, tr, tot - tr))
    lines = [f"{'component':<16}{'total':>14}{'trainable':>14}{'frozen':>14}"]
    lines += [f"{n:<16}{t:>14,}{r:>14,}{f:>14,}" for n, t, r, f in rows]
    return "\n".join(lines)


def optimizer_kwargs():
    """fused AdamW on CUDA (one kernel), foreach elsewhere (fewer Python loops on CPU)."""
    return {"fused": True} if torch.cuda.is_available() else {"foreach": True}


def save_png_exclusive(img, path):
    """Write a PIL image to `path` only if it does not exist (tmp + os.link); False if it existed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
