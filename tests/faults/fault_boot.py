"""Run a model folder's script as `python script.py ...` would, with an optional test-only fault hook.

    cd ddpm && FAULT_KILL_IN_SAVE=train_state python /path/to/fault_boot.py train.py --resume ...

FAULT_KILL_IN_SAVE=<substring>: the first torch.save whose target path contains <substring> writes only
the first half of the serialized bytes to that target, fsyncs, prints `FAULT-HOOK: ...` on stderr and
SIGKILLs the process: a crash in the middle of a checkpoint write, whatever the folder's save function
looks like. A save that writes straight to the final name (not temp file + os.replace) is caught by
the tests, because then the final checkpoint is left half written.
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


def main():
    """sys.argv[1] is the script (relative to the cwd, the model folder); the rest are its flags."""
    match = os.environ.get("FAULT_KILL_IN_SAVE")
    if match:
        install_kill_in_save(match)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as for `python script.py`
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
