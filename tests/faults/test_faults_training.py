"""Faults of every training entry point (DDPM train_ddp, LDM train.py, LDM train_vae.py, ControlNet train.py,
DiT train.py): preemption (SIGTERM, random SIGKILL, SIGKILL inside a checkpoint write) then exact resume,
a NaN loss, and a full disk.

    OMP_NUM_THREADS=1 python -m pytest tests/faults -q      (FAULT_SEED=N repeats the kill delays)
"""
import re
import signal
from pathlib import Path

import pytest

import fault_lib as fl
from fault_specs import TRAINERS

pytestmark = pytest.mark.fault
NAMES = list(TRAINERS)


def stage(faults, name, which):
    """The record of one stage of the chain (see conftest.chain_job); fails if it could not run."""
    st = faults.get(f"{name}.chain")["stages"][which]
    assert not st.get("skipped"), f"{name} {which}: {st.get('skipped')}"
    assert not st.get("error"), f"{name} {which} failed to run:\n{st.get('error')}"
    return st


@pytest.mark.parametrize("name", NAMES)
def test_sigterm_saves_checkpoint_and_exits_0(faults, name):
    st = stage(faults, name, "sigterm")
    assert st["alive"], f"the run ended before SIGTERM was sent (delay {st['delay']:.3f}s)\n{st['tail']}"
    assert st["code"] == 0, f"after SIGTERM the run exited {st['code']}, expected 0 (checkpoint, clean exit)\n{st['tail']}"
    assert "Traceback" not in st["stderr"], st["tail"]
    assert st["logged_step"] is not None, f"no log line saying SIGTERM was handled at step N\n{st['tail']}"
    assert st["ckpt_step"] == st["logged_step"], \
        f"SIGTERM logged step {st['logged_step']} but the last checkpoint holds step {st['ckpt_step']}"
    print(f"{name}: SIGTERM {st['delay']:.3f}s after the first checkpoint -> checkpoint at step {st['ckpt_step']}")


@pytest.mark.parametrize("name", NAMES)
def test_random_sigkill_after_a_checkpoint_then_resume(faults, name):
    st = stage(faults, name, "sigkill")
    assert st["alive"], f"the run ended before SIGKILL was sent (delay {st['delay']:.3f}s)\n{st['tail']}"
    assert st["code"] == -signal.SIGKILL, f"exit {st['code']}\n{st['tail']}"
    assert st["ckpt_step"] is not None and st["ckpt_step"] > 0, "no loadable checkpoint after the kill"
    print(f"{name}: SIGKILL {st['delay']:.3f}s after the resumed run's first checkpoint; step {st['ckpt_step']}")


@pytest.mark.parametrize("name", NAMES)
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(faults, name):
    st = stage(faults, name, "kill_in_save")
    assert st["code"] == -signal.SIGKILL and st["partial"], \
        f"the kill inside a checkpoint write did not happen (exit {st['code']})\n{st['tail']}"
    assert st["latest"] == st["path"], f"the latest checkpoint is now {st['latest']}, not the previous {st['path']}"
    assert st["sha_after"] == st["sha_before"], f"{st['path']} changed although its replacement was killed half-written"
    assert st["step_after"] == st["step"]  # still loadable, same step


@pytest.mark.parametrize("name", NAMES)
def test_interrupted_run_ends_bit_identical_to_uninterrupted(faults, name):
    """After SIGTERM, a random SIGKILL and a SIGKILL mid-save, the resumed run equals the reference exactly."""
    T = TRAINERS[name]
    st = stage(faults, name, "final")
    assert st["code"] == 0, f"the last resume exited {st['code']}\n{st['tail']}"
    final = st["final"]
    ref = faults.get(f"{name}.ref")
    a, b = fl.load(ref["ckpt"]), fl.load(final)
    for key in T.keys:
        assert key in a, f"the checkpoint has no '{key}'"
        fl.assert_identical(a[key], b[key], key)
    chain_out = faults.get(f"{name}.chain")["out"]
    for f in T.files:  # the model files written beside the resumable state
        if f.endswith(".pt"):  # torch.save bytes carry a random serialization id: compare the contents
            fl.assert_identical(fl.load(ref["out"] / f), fl.load(chain_out / f), f)
        else:
            assert fl.sha(ref["out"] / f) == fl.sha(chain_out / f), f"{f} differs"


@pytest.mark.parametrize("name", NAMES)
def test_nan_loss_stops_and_keeps_last_good_checkpoint(faults, name):
    """The finished reference resumed for one more epoch with DIFFUSION_FAULT_NAN_AT_STEP at its first step.

    Run inside the folder's driver process (fault_driver.py) to save an interpreter start-up."""
    run = faults.get(f"{TRAINERS[name].folder}.inputs")
    c, r = run["cases"][f"{name}-nan-loss"], run["results"].get(f"{name}-nan-loss")
    assert r is not None, f"the driver did not get to this case\n{run['driver']}"
    shown = f"exit {r['code']}\n--- stderr ---\n{r['stderr'][-3000:]}\n--- stdout ---\n{r['stdout'][-1500:]}"
    assert r["code"] not in (0, None), f"a NaN loss did not stop the run: {shown}"
    assert "Traceback" not in r["stderr"], shown
    lines = fl.error_lines(r["stderr"])
    n = c["step"] + 1
    assert len(lines) == 1 and "nan" in lines[0].lower() and re.search(rf"step {n}\b", lines[0]), \
        f"expected one `error: loss is nan at step {n} ...` line: {shown}"
    assert fl.sha(c["ckpt"]) == c["sha"], f"{c['ckpt']} was overwritten after the NaN"
    assert sorted(p.name for p in Path(c["ckpt"]).parent.iterdir()) == c["listing"], "a checkpoint was written after the NaN"


@pytest.mark.parametrize("name", NAMES)
def test_full_disk_clear_message_checkpoint_intact(faults, name):
    r = faults.get(f"{name}.disk")
    if "skip" in r:
        pytest.skip(r["skip"])
    assert r["code"] != 0, f"a full disk went unnoticed (exit 0)\n{r['tail']}"
    assert "Traceback" not in r["stderr"], f"traceback instead of a clear message on a full disk\n{r['tail']}"
    lines = [ln for ln in fl.error_lines(r["stderr"])
             if re.search(r"cannot write|no space left|not writable|read-only", ln, re.I)]
    assert lines, f"no `error: cannot write ...` line on a full disk\n{r['tail']}"
    assert "inline_container" not in lines[0], f"torch's internal text instead of a reason: {lines[0]}"
    assert r["sha_after"] == r["sha_before"], f"{r['path']} changed on a full disk"
    assert r["loadable"], f"{r['path']} no longer loads after the failed write"
