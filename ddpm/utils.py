"""Small helpers shared by the DDPM scripts: errors, logging, distributed setup, safe checkpoint I/O,
never-overwrite image writing and image grids.

Not run directly; imported by train.py, inference.py and the spec's entry points (flat imports, so the
folder runs from its own directory: `cd ddpm && python train.py ...`).
"""
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

MODEL_TYPE = "ddpm"


class UserError(Exception):
    """A problem with the user's input (flag, file, folder): printed as one line, exit code 2."""


class TrainingError(Exception):
    """A run that cannot continue (NaN loss, cannot write): printed as one line, exit code 1."""


def run_main(fn, *args):
    """Call fn(*args); turn UserError / TrainingError into `error: ...` on stderr and an exit code."""
    try:
        return fn(*args)
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except TrainingError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank sees e.g. the same NaN; say it once
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


# ---------------------------------------------------------------- logging
def get_logger(log_file=None, rank=0, name="ddpm"):
    """Logger to stdout (+ log_file) on rank 0; quiet (warnings only, stderr) on the other ranks."""
    logger = logging.getLogger(name)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    if rank == 0:
        logger.setLevel(logging.INFO)
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(fmt)
        logger.addHandler(h)
        if log_file is not None:
            fh = logging.FileHandler(log_file, mode="a")
            fh.setFormatter(fmt)
            logger.addHandler(fh)
    else:
        logger.setLevel(logging.WARNING)
        logger.addHandler(logging.StreamHandler(sys.stderr))
    return logger


def parameter_table(components):
    """Text table of total / trainable / frozen parameters per component {name: module}."""
    rows = []
    for name, module in components.items():
        total = sum(p.numel() for p in module.parameters())
        train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        rows.append((name, total, train, total - train))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}} {'total':>12} {'trainable':>12} {'frozen':>12}"]
    for r in rows:
        lines.append(f"{r[0]:<{width}} {r[1]:>12,} {r[2]:>12,} {r[3]:>12,}")
    return "\n".join(lines)


# ---------------------------------------------------------------- device / distributed
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
        raise UserError(f"--device {requested!r} is not a device (use auto, cpu, cuda or cuda:N)")


def setup_distributed(device_request="auto"):
    """Start torch.distributed when launched by torchrun (nccl on CUDA, gloo on CPU).

    Returns (rank, world_size, local_rank, device). Plain `python` gives (0, 1, 0, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0, pick_device(device_request)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and str(device_request) != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, local_rank, device


def is_dist():
    """True inside an initialised multi-process group."""
    return dist.is_available() and dist.is_initialized()


def barrier():
    """dist.barrier() when distributed, else nothing."""
    if is_dist():
        dist.barrier()


def finish_distributed():
    """Tear down the process group after a clean finish.

    os._exit(0) afterwards because on this kind of machine 10-20% of 2-process gloo runs aborted at
    interpreter exit ('terminate called without an active exception') even after destroy_process_group."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)


def setup_precision(name, device, logger=None):
    """Resolve --mixed_precision to (autocast dtype or None, use_grad_scaler)."""
    if name == "no":
        return None, False
    if device.type == "cuda":
        if name == "bf16" and not torch.cuda.is_bf16_supported():
            if logger:
                logger.warning("warning: bf16 not supported on this GPU, using fp16")
            name = "fp16"
        return (torch.bfloat16, False) if name == "bf16" else (torch.float16, True)
    # CPU: no fp16 autocast worth having; bf16 only runs fast with AVX-512 bf16 (emulated otherwise).
    if name == "fp16":
        if torch.cpu._is_avx512_bf16_supported():
            msg, out = "fp16 needs CUDA; using bf16 on this CPU", (torch.bfloat16, False)
        else:
            msg, out = "fp16 needs CUDA and this CPU has no bf16 support; training in fp32", (None, False)
        (logger.warning if logger else print)("warning: " + msg)
        return out
    return torch.bfloat16, False


# ---------------------------------------------------------------- checkpoints
def atomic_torch_save(obj, path):
    """torch.save to a temp file in the same folder, then os.replace (a crash never leaves half a file)."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save's zip writer reports a full disk as RuntimeError
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        reason = getattr(e, "strerror", None) or (  # torch's own text names no cause: say what is likely
            f"the write failed (disk full? {shutil.disk_usage(path.parent).free // 1024} KiB free)"
            if isinstance(e, RuntimeError) else str(e).splitlines()[0][:160])
        raise TrainingError(f"cannot write {path}: {reason}; the previous checkpoint is intact")


def atomic_write_text(text, path):
    """Write a small text file atomically."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise TrainingError(f"cannot write {path}: {e.strerror or e}")


def load_checkpoint(path, trust=False):
    """torch.load with weights_only=True; clear one-line errors for missing, pickled or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if trust:
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e:
                raise UserError(f"{path} is not a checkpoint ({type(e).__name__}: {e})")
        raise UserError(f"{path} is not a plain checkpoint (it holds pickled Python objects, which can run "
                        f"code when loaded). If you trust this file, pass --trust_checkpoint to load it anyway.")
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a checkpoint (torch.load failed: {msg[:200]})")


def check_writable(folder):
    """Create `folder` and prove a file can be written there, before any heavy work."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".write_test.", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"cannot write to {folder}: {e.strerror or e}; choose a writable folder")


def read_json(path):
    """Parse a JSON file (never eval)."""
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------- RNG
def rng_state():
    """RNG states of python, numpy, torch CPU and CUDA as plain values / tensors."""
    import random

    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    import random

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def mix_seed(*parts):
    """Deterministic 63-bit seed from integers (so randomness is a pure function of e.g. seed/rank/step)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


# ---------------------------------------------------------------- images
def to_uint8_numpy(img):
    """(C,H,W) uint8 tensor -> HxW (1 channel) or HxWx3 numpy array for PIL."""
    arr = img.detach().cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))


def save_png_no_overwrite(img, path):
    """Write one image as PNG without ever replacing an existing file; False if it already existed.

    Temp file + os.link: the link fails if the target exists, so concurrent runs never clobber."""
    path, tmp = Path(path), None
    if path.exists():
        return False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
        os.close(fd)
        Image.fromarray(to_uint8_numpy(img)).save(tmp, format="PNG")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
    except OSError as e:
        raise TrainingError(f"cannot write {path}: {e.strerror or e}")
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def make_grid(images, nrow):
    """(N,C,H,W) uint8 -> one (C,H',W') uint8 grid with 2-pixel padding (torchvision.utils.make_grid)."""
    import torchvision

    grid = torchvision.utils.make_grid(images.float(), nrow=max(1, nrow), padding=2, pad_value=0)
    if images.shape[1] == 1:
        grid = grid[:1]  # make_grid repeats 1-channel images to 3; keep grayscale grayscale
    return grid.round().clamp(0, 255).to(torch.uint8)


def save_image_atomic(img, path):
    """Write a (C,H,W) uint8 image as PNG, replacing an older file of the same name atomically (grids)."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
        os.close(fd)
        Image.fromarray(to_uint8_numpy(img)).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise TrainingError(f"cannot write {path}: {e.strerror or e}")


def grid_columns(n):
    """A near-square number of columns for n images."""
    return max(1, int(math.ceil(math.sqrt(n))))
