"""Shared test helpers: import one model folder in isolation, run its scripts as a user would.

Every model folder has its own `models.py`, `dataset.py`, `train.py`...; importing two folders in one
process would collide in `sys.modules`, so `load_folder` purges the other folders' modules first.
Bind the returned modules at the top of a test module and never import folder files lazily in tests.
"""
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL_FOLDERS = ("ddpm", "ldm", "controlnet", "dit", "evaluation")


def load_folder(folder, *names):
    """Import `names` from REPO/folder with no module of another folder shadowing them."""
    path = str(REPO / folder)
    others = [str(REPO / f) for f in MODEL_FOLDERS if f != folder]
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None) or ""
        if any(file.startswith(o + os.sep) for o in others):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p not in others]
    if path in sys.path:
        sys.path.remove(path)
    sys.path.insert(0, path)
    mods = [importlib.import_module(n) for n in names]
    return mods[0] if len(mods) == 1 else mods


def script_env(**extra):
    """Environment for running a script as a user on this CPU machine would (no GPU, quiet threads)."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(folder, args, timeout=600, check=True, env=None):
    """Run `python args...` (or a launcher when args[0] is torchrun/accelerate) with cwd=REPO/folder."""
    cmd = list(args)
    if cmd[0].endswith(".py"):
        cmd = [sys.executable] + cmd
    elif cmd[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run"] + cmd[1:]
    elif cmd[0] == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch"] + cmd[2:] if cmd[1] == "launch" else cmd
    proc = subprocess.run(cmd, cwd=REPO / folder, env=env or script_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def free_port():
    """A free TCP port on localhost for a torchrun / accelerate rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
