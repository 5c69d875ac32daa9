"""Fault injection from the test harness: wraps the shared runtime's StopFlags, so no product file reads
a fault setting. Each hook reads its environment variable when it fires, so one install serves many runs.

    DIFFUSION_FAULT_NAN_AT_STEP=N      the loss of (1-based) step N becomes NaN where the loop checks it
    DIFFUSION_FAULT_SIGTERM_AT_STEP=N  SIGTERM to this process during step N (the scheduler's warning)
    DIFFUSION_FAULT_KILL_AT_STEP=N     SIGKILL right after step N (an abrupt crash, no cleanup)

Installed by fault_boot.py and fault_driver.py for subprocess runs, and by test modules that drive a
trainer in-process: `install(runtime)` with the folder's runtime module.
"""
import os
import signal


def _at(name, step):
    v = os.environ.get(f"DIFFUSION_FAULT_{name}_AT_STEP")
    return bool(v) and int(v) == int(step)


def install(runtime):
    """Wrap runtime.StopFlags.check_loss / should_stop with the hooks above (idempotent)."""
    flags = runtime.StopFlags
    if getattr(flags, "_fault_hooks", False):
        return
    check_loss, should_stop = flags.check_loss, flags.should_stop

    def hooked_check_loss(self, loss, step, *args, **kwargs):
        if _at("NAN", step):
            loss = loss * float("nan")
        if _at("SIGTERM", step) and not getattr(self, "_fault_sigterm_sent", False):
            self._fault_sigterm_sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return check_loss(self, loss, step, *args, **kwargs)

    def hooked_should_stop(self, step):
        if _at("KILL", step):
            os.kill(os.getpid(), signal.SIGKILL)
        return should_stop(self, step)

    flags.check_loss, flags.should_stop, flags._fault_hooks = hooked_check_loss, hooked_should_stop, True


def install_for_cwd():
    """Install into the runtime module of the model folder in the current directory, if it has one."""
    if os.path.isfile("runtime.py"):
        import importlib
        install(importlib.import_module("runtime"))
