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
import tempfile
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
    # torch.compile's on-disk kernel cache is not keyed by the vector ISA: kernels built under
    # ATEN_CPU_CAPABILITY=avx2 and later loaded by an AVX-512 run (or the reverse) gave NaN losses and
    # heap corruption here. One cache per ISA keeps a test run with the other ISA from poisoning CI's.
    if "TORCHINDUCTOR_CACHE_DIR" not in env:
        isa = os.environ.get("ATEN_CPU_CAPABILITY") or "default"
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_tests_{isa}")
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


BOOT = Path(__file__).resolve().parent / "faults" / "fault_boot.py"


def sgd_updates(folder, script_args, out_file, timeout=900):
    """Run `python script_args...` in `folder` with AdamW swapped for SGD; return its parameters.

    See tests/faults/fault_boot.py (SGD_PARAMS_OUT): {"init": [...], "final": [...]} in the optimizer's
    parameter order, so two runs of the same model can be compared tensor by tensor.
    """
    run_script(folder, [str(BOOT), *script_args], timeout=timeout, env=script_env(SGD_PARAMS_OUT=out_file))
    import torch
    return torch.load(out_file, weights_only=True)


def assert_same_updates(eager, compiled, rel_tol=1e-2):
    """Compiled SGD updates equal eager ones up to fp32 rounding of the gradients, tensor by tensor.

    Both runs start from identical weights and take the same data, timesteps and noise, so they differ
    only in how the same fp32 arithmetic is ordered and vectorised (inductor's fused kernels and its own
    exp/sqrt approximations against ATen's, AVX-512 against AVX2). Each op then differs by a few ulps,
    and over a few steps of a small network the updates by ~1e-4..1e-3 of their size (measured: at most
    1.4e-3 on an AVX-512 machine), far below `rel_tol`; any real divergence (a graph that drops a term,
    a module trained twice or not at all, other inputs) is an O(1) relative difference. The size a
    tensor is compared against is at least the network's RMS update per element: a bias whose gradient
    is zero by symmetry (a conv bias before GroupNorm) moves by rounding noise alone.
    """
    import torch
    assert len(eager["init"]) == len(compiled["init"]) > 0
    for a, b in zip(eager["init"], compiled["init"]):
        assert torch.equal(a, b), "the two runs did not start from the same weights"
    updates = [we - w0 for w0, we in zip(eager["init"], eager["final"])]
    flat = torch.cat([u.flatten() for u in updates])
    rms = flat.norm().item() / flat.numel() ** 0.5
    assert rms > 0, "training did not move the weights: the comparison is empty"
    worst = 0.0
    for i, (w0, e, wc) in enumerate(zip(eager["init"], updates, compiled["final"])):
        size = max(e.norm().item(), rms * e.numel() ** 0.5)
        diff = (wc - w0 - e).norm().item()
        worst = max(worst, diff / size)
        assert diff <= rel_tol * size, (f"parameter {i} {tuple(e.shape)}: the update differs by {diff:.3g} = "
                                        f"{diff / size:.3g} of its size {size:.3g}")
    return worst


def install_fault_hooks(runtime_module):
    """DIFFUSION_FAULT_{NAN,SIGTERM,KILL}_AT_STEP for in-process runs (see tests/faults/fault_hooks.py).

    For a subprocess, run the script through BOOT instead: run_script(folder, [str(BOOT), "train.py", ...])."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
    import fault_hooks
    fault_hooks.install(runtime_module)


def run_main_expect(fn, argv, capsys, code=2):
    """Call a CLI main in-process; return its one-line stderr message after asserting the exit code."""
    import pytest
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
