"""Run a model folder's script as `python script.py ...` would, with an optional test-only fault hook.

    cd ddpm && FAULT_KILL_IN_SAVE=train_state python /path/to/fault_boot.py train.py --resume ...

FAULT_KILL_IN_SAVE=<substring>: the first torch.save whose target path contains <substring> writes only
the first half of the serialized bytes to that target, fsyncs, prints `FAULT-HOOK: ...` on stderr and
SIGKILLs the process: a crash in the middle of a checkpoint write, whatever the folder's save function
looks like. A save that writes straight to the final name (not temp file + os.replace) is caught by
the tests, because then the final checkpoint is left half written.

DIFFUSION_FAULT_{NAN,SIGTERM,KILL}_AT_STEP=N: see fault_hooks.py (wraps the folder's runtime.StopFlags).

SGD_PARAMS_OUT=<file>: every torch.optim.AdamW the script builds is plain SGD with the same learning rate
(and weight decay), and at exit the optimizer's parameters before the first and after the last step are
saved to <file> as {"init": [...], "final": [...]}. With SGD a weight update is lr x gradient, so two code
paths that compute the same gradients in a different floating-point order (eager vs torch.compile, AVX2
vs AVX-512 kernels) give updates that agree to a few fp32 rounding errors of the gradient; AdamW's first
steps divide each gradient by its own magnitude (update ~ lr x sign(g)), so an element whose gradient is
rounding noise moves by up to 2 x lr either way and no tight tolerance on weights can hold.
"""
import io
import os
import runpy
import signal
import sys


def install_kill_in_save(match):
    """Wrap torch.save so that the first matching save is cut in half by SIGKILL."""
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else str(getattr(f, "name", ""))
        if match in name:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            half = data[: len(data) // 2]
            if isinstance(f, (str, os.PathLike)):
                with open(f, "wb") as fh:
                    fh.write(half)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                f.write(half)
                f.flush()
            sys.stderr.write(f"FAULT-HOOK: SIGKILL while writing {name} ({len(half)} of {len(data)} bytes)\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def install_sgd_recorder(out_path):
    """Replace torch.optim.AdamW by SGD; save the parameters before training and at exit to out_path."""
    import atexit

    import torch

    made = []

    def sgd_instead_of_adamw(params, lr=1e-3, weight_decay=0.0, foreach=None, fused=None, **_adam_only):
        params = list(params)
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        opt = torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, foreach=foreach, fused=fused)
        made.append((tensors, [t.detach().clone() for t in tensors]))
        return opt

    def save():
        tensors, init = made[-1]
        torch.save({"init": init, "final": [t.detach().clone() for t in tensors]}, out_path)

    torch.optim.AdamW = sgd_instead_of_adamw
    atexit.register(lambda: made and save())


def main():
    """sys.argv[1] is the script (relative to the cwd, the model folder); the rest are its flags."""
    match = os.environ.get("FAULT_KILL_IN_SAVE")
    if match:
        install_kill_in_save(match)
    if os.environ.get("SGD_PARAMS_OUT"):
        install_sgd_recorder(os.environ["SGD_PARAMS_OUT"])
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as for `python script.py`
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    import fault_hooks
    fault_hooks.install_for_cwd()  # DIFFUSION_FAULT_*_AT_STEP, see fault_hooks.py
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
