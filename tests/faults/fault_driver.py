"""Run many bad-input cases of one model folder in ONE process, each as `python script.py args` would.

    cd ldm && python /path/to/fault_driver.py cases.json results.json

Starting a fresh interpreter per case would cost seconds of imports each (torch, diffusers, accelerate);
here every case runs the script with runpy (`__name__ == "__main__"`), with its own argv, environment and
captured stdout/stderr. SystemExit gives the exit code; any other exception is printed as the interpreter
would (a traceback, exit code 1), so "no traceback" is checked exactly as a user would see it.
results.json gets, per case: code, stdout, stderr, and whether the case's marker file appeared.
"""
import contextlib
import io
import json
import logging
import os
import runpy
import signal
import sys
import traceback


def reset_state():
    """Undo what one run leaves behind in the process (accelerate singletons, signal handlers, loggers)."""
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState, PartialState
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        GradientState._reset_state()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in list(logging.root.manager.loggerDict):
        lg = logging.getLogger(name)
        for h in list(getattr(lg, "handlers", [])):
            with contextlib.suppress(Exception):
                h.close()
            lg.removeHandler(h)


def run_case(case):
    """One case -> {code, stdout, stderr, marker}."""
    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    os.environ.update(case.get("env") or {})
    argv = sys.argv
    sys.argv = [case["script"], *case["args"]]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(case["script"], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(saved_env)
        reset_state()
    marker = case.get("marker")
    return {"code": code, "stdout": out.getvalue()[-6000:], "stderr": err.getvalue()[-6000:],
            "marker": bool(marker and os.path.exists(marker))}


def main():
    cases = json.load(open(sys.argv[1]))
    sys.path.insert(0, os.getcwd())
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    import fault_hooks
    fault_hooks.install_for_cwd()  # DIFFUSION_FAULT_*_AT_STEP (a case's env), see fault_hooks.py
    results = {}
    for case in cases:
        results[case["id"]] = run_case(case)
        with open(sys.argv[2], "w") as f:  # written after every case: a crash still leaves the others
            json.dump(results, f)


if __name__ == "__main__":
    main()
