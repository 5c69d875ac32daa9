"""Shared machinery of the fault suite: tiny assets, the training entry points' specs, processes that are
killed on purpose, a small job runner that keeps both CPU cores busy, checkpoint comparison, tmpfs.

Nothing here asserts by itself except the job functions in the test modules; see tests/faults/conftest.py.
"""
import contextlib
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from repo_helpers import REPO, script_env

HERE = Path(__file__).resolve().parent
BOOT = HERE / "fault_boot.py"
DRIVER = HERE / "fault_driver.py"
POLL = 0.02
TIMEOUT = 600
TIMES = []  # (tag, wall s, CPU s) of every finished process, for tuning the suite's budget


# ------------------------------------------------------------------ seeded randomness for kill points
def fault_seed():
    """FAULT_SEED from the environment, else a fresh one (printed in the summary so a run can be repeated)."""
    if "FAULT_SEED" not in os.environ:
        os.environ["FAULT_SEED"] = str(random.SystemRandom().randrange(2 ** 31))
    return int(os.environ["FAULT_SEED"])


def rng_for(name):
    """A random.Random seeded by FAULT_SEED and the job name (independent of job order)."""
    h = int(hashlib.sha256(f"{fault_seed()}:{name}".encode()).hexdigest()[:12], 16)
    return random.Random(h)


# ------------------------------------------------------------------ assets
def write_gray(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), "L").save(path)


def make_assets(root):
    """Class folders, image/mask pairs, bad variants of both, tiny VAEs, a pickle bomb factory."""
    root = Path(root)
    rng = np.random.default_rng(0)
    data = root / "data"
    for k in range(3):
        for i in range(8):
            a = rng.random((16, 16)) * 60
            a[2 + 3 * k:6 + 3 * k, 3:12] = 230
            write_gray(data / f"class_{k}" / f"{i:02d}.png", a)
    pairs = root / "pairs"
    for i in range(16):
        a = rng.random((16, 16)) * 60
        a[4:12, 2 + i % 5:8 + i % 5] = 220
        write_gray(pairs / "images" / f"{i:03d}.png", a)
        write_gray(pairs / "masks" / f"{i:03d}.png", np.where(a > 100, 255, 0))
    good_png = (data / "class_0" / "00.png").read_bytes()

    def variant(name, src, edit):
        dst = root / "variants" / name
        shutil.copytree(src, dst)
        edit(dst)
        return dst

    def png16(p):
        Image.fromarray((rng.random((16, 16)) * 65535).astype(np.uint16)).save(p)

    def rgba(p):
        Image.fromarray((rng.random((16, 16, 4)) * 255).astype(np.uint8), "RGBA").save(p)

    v = {"empty": root / "variants" / "empty"}
    v["empty"].mkdir(parents=True)
    v["trunc"] = variant("trunc", data, lambda d: (d / "class_1" / "truncated.png").write_bytes(good_png[:len(good_png) // 2]))
    v["textpng"] = variant("textpng", data, lambda d: (d / "class_2" / "notes.png").write_text("not an image\n"))
    v["png16"] = variant("png16", data, lambda d: png16(d / "class_0" / "deep16.png"))
    v["rgba"] = variant("rgba", data, lambda d: rgba(d / "class_1" / "alpha.png"))
    v["mixed"] = variant("mixed", data, lambda d: write_gray(d / "class_2" / "big.png", rng.random((24, 20)) * 255))
    v["emptyclass"] = variant("emptyclass", data, lambda d: (d / "class_9").mkdir())
    pv = {"empty": root / "pvariants" / "empty"}
    (pv["empty"] / "images").mkdir(parents=True)
    (pv["empty"] / "masks").mkdir()

    def pvariant(name, edit):
        dst = root / "pvariants" / name
        shutil.copytree(pairs, dst)
        edit(dst)
        return dst

    mask_png = (pairs / "masks" / "000.png").read_bytes()

    def with_mask(d, stem):
        (d / "masks" / f"{stem}.png").write_bytes(mask_png)

    pv["trunc"] = pvariant("trunc", lambda d: ((d / "images" / "truncated.png").write_bytes(good_png[:len(good_png) // 2]),
                                               with_mask(d, "truncated")))
    pv["textpng"] = pvariant("textpng", lambda d: ((d / "images" / "notes.png").write_text("not an image\n"),
                                                   with_mask(d, "notes")))
    pv["png16"] = pvariant("png16", lambda d: (png16(d / "images" / "deep16.png"), with_mask(d, "deep16")))
    pv["rgba"] = pvariant("rgba", lambda d: (rgba(d / "images" / "alpha.png"), with_mask(d, "alpha")))
    pv["mixed"] = pvariant("mixed", lambda d: (write_gray(d / "images" / "big.png", rng.random((24, 20)) * 255),
                                               write_gray(d / "masks" / "big.png", np.zeros((24, 20)))))
    pv["unmatched"] = pvariant("unmatched", lambda d: with_mask(d, "lonely"))
    (root / "masks6").mkdir()
    for p in sorted((pairs / "masks").iterdir())[:6]:
        shutil.copy(p, root / "masks6" / p.name)
    mv = {"empty": root / "mvariants" / "empty"}
    mv["empty"].mkdir(parents=True)
    for name in ("trunc", "textpng"):
        mv[name] = root / "mvariants" / name
        shutil.copytree(pairs / "masks", mv[name])
    (mv["trunc"] / "truncated.png").write_bytes(mask_png[:len(mask_png) // 2])
    (mv["textpng"] / "notes.png").write_text("not an image\n")

    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(root / "vae2")
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 16, 16], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(root / "vae4")
    (root / "not_a_checkpoint.pt").write_text("this is a text file, not a checkpoint\n")

    class TinyFeatures(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean((2, 3))

    torch.manual_seed(0)
    torch.jit.script(TinyFeatures()).save(str(root / "tiny_features.pt"))
    return {"root": root, "data": data, "pairs": pairs, "masks": pairs / "masks", "masks6": root / "masks6", "variants": v, "pvariants": pv,
            "mvariants": mv, "vae2": root / "vae2", "vae4": root / "vae4", "text": root / "not_a_checkpoint.pt",
            "tinyfeat": root / "tiny_features.pt"}


class PickleBomb:
    """Unpickling this creates `marker` (stands for any code a pickle can run: `open` is called on load)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_bomb(path, marker, model_type="ldm"):
    """A checkpoint-looking dict that runs code (creates `marker`) when loaded without weights_only."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_type": model_type, "format_version": 1, "step": 1, "payload": PickleBomb(marker)}, path)
    return Path(path)


# ------------------------------------------------------------------ processes
class Proc:
    """A script started with Popen (cwd = its model folder), stdout/stderr to files."""

    def __init__(self, folder, args, logdir, tag, env=None, boot=False):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logdir / f"{tag}.out", logdir / f"{tag}.err"
        self.cmd = [sys.executable] + ([str(BOOT)] if boot else []) + [str(a) for a in args]
        with open(self.out_path, "w") as o, open(self.err_path, "w") as e:
            self.p = subprocess.Popen(self.cmd, cwd=REPO / folder, env=script_env(**(env or {})), stdout=o, stderr=e)
        self.tag, self.t0 = tag, time.time()

    def alive(self):
        """Poll without blocking; reaps the child with wait4 to record its CPU time."""
        if self.p.returncode is not None:
            return False
        pid, status, ru = os.wait4(self.p.pid, os.WNOHANG)
        if not pid:
            return True
        self.p.returncode = os.waitstatus_to_exitcode(status)
        TIMES.append((self.tag, round(time.time() - self.t0, 1), round(ru.ru_utime + ru.ru_stime, 1)))
        return False

    def wait(self, timeout=TIMEOUT):
        t0 = time.time()
        while self.alive():
            if time.time() - t0 > timeout:
                self.p.kill()
                self.p.wait()
                raise AssertionError(f"timed out after {timeout}s: {' '.join(self.cmd)}\n{self.tail()}")
            time.sleep(0.05)
        return self.p.returncode

    @property
    def stdout(self):
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self):
        return self.err_path.read_text(errors="replace")

    def tail(self):
        return f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-4000:]}"

    def kill(self, sig=signal.SIGKILL):
        self.p.send_signal(sig)


def run(folder, args, logdir, tag, env=None, boot=False, expect=0):
    """Run to the end; assert the exit code (None: any)."""
    p = Proc(folder, args, logdir, tag, env, boot)
    code = p.wait()
    if expect is not None:
        assert code == expect, f"{' '.join(p.cmd)} exited {code}, expected {expect}\n{p.tail()}"
    return p


def wait_until(cond, proc, what, timeout=TIMEOUT):
    """Poll cond() until true; fail early if proc ends first."""
    t0 = time.time()
    while True:
        v = cond()
        if v:
            return v
        if proc is not None and not proc.alive():
            v = cond()
            if v:
                return v
            raise AssertionError(f"process ended (code {proc.p.returncode}) before {what}\n{proc.tail()}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(POLL)


# ------------------------------------------------------------------ jobs
class Jobs:
    """Named jobs in threads; at most `slots` run at a time; a job starts when its dependencies finished.

    Both cores stay busy (the scripts run with OMP_NUM_THREADS=1), and a failed job only fails the
    tests that read its result."""

    def __init__(self, slots):
        self.sem = threading.Semaphore(slots)
        self.threads, self.results, self.errors, self.done = {}, {}, {}, {}

    def add(self, name, fn, deps=()):
        if name in self.threads:
            return
        self.done[name] = threading.Event()

        def body():
            try:
                for d in deps:
                    self.get(d)
                with self.sem:
                    t0 = time.time()
                    self.results[name] = fn()
                    self.results.setdefault("_times", {})[name] = time.time() - t0
            except BaseException as e:  # noqa: BLE001 - reported by get()
                self.errors[name] = (e, traceback.format_exc())
            finally:
                self.done[name].set()

        t = threading.Thread(target=body, name=name, daemon=True)
        self.threads[name] = t
        t.start()

    def get(self, name):
        self.done[name].wait()
        if name in self.errors:
            e, tb = self.errors[name]
            if type(e).__name__ in ("Skipped", "Failed"):  # pytest.skip / pytest.fail inside a job
                raise e
            if isinstance(e, AssertionError):
                raise AssertionError(f"job {name} failed:\n{e}") from None
            raise RuntimeError(f"job {name} failed:\n{tb}")
        return self.results[name]


# ------------------------------------------------------------------ checkpoints
def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_identical(a, b, where=""):
    """Bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{where}: differs (max abs diff {(a.double() - b.double()).abs().max().item():.3e})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: length differs"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} vs {b!r}"


def visible_files(root):
    """Relative paths of every non-hidden file under root (hidden = any path part starting with '.')."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts))


def hidden_files(root):
    root = Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and any(s.startswith(".") for s in p.relative_to(root).parts)) if root.exists() else []


def tree_state(root):
    """{relative path: (size, mtime_ns)} of everything under root (None if root does not exist)."""
    root = Path(root)
    if not root.exists():
        return None
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


# ------------------------------------------------------------------ full disk
@contextlib.contextmanager
def tiny_disk(path, size_bytes):
    """A tmpfs of size_bytes mounted at path (root only); yields 'tmpfs', or None when mounting is refused."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    size = (size_bytes // 4096 + 1) * 4096
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    try:
        yield "tmpfs" if ok else None
    finally:
        if ok:
            if subprocess.run(["umount", str(path)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder, leave_bytes):
    """Fill the file system of `folder` up, then free about `leave_bytes` again."""
    filler = Path(folder) / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12):  # unbuffered: a full disk shows at once, nothing pending
            block = b"\0" * chunk
            while True:
                try:
                    if os.write(fd, block) < chunk:
                        break
                except OSError:
                    break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave_bytes))
    finally:
        os.close(fd)
    return filler


def error_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def sigterm_step(stdout):
    """The step number of a SIGTERM log line, or None."""
    for ln in stdout.splitlines():
        if "SIGTERM" in ln:
            m = re.search(r"step (\d+)", ln)
            if m:
                return int(m.group(1))
    return None
