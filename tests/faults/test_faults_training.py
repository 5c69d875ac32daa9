"""Faults of every training entry point (DDPM train_ddp, LDM train.py, LDM train_vae.py, ControlNet train.py,
DiT train.py): preemption (SIGTERM, random SIGKILL, SIGKILL inside a checkpoint write) then exact resume,
a NaN loss, and a full disk.

    OMP_NUM_THREADS=1 python -m pytest tests/faults -q      (FAULT_SEED=N repeats the kill delays)
"""
import re
from pathlib import Path

import pytest

import fault_lib as fl
from fault_specs import TRAINERS

pytestmark = pytest.mark.fault
NAMES = list(TRAINERS)


def stage(faults, name, which):
    st = faults.get(f"{name}.chain")["stages"][which]
    assert st["ok"], f"{name} {which}: {st['msg']}"
    print(f"{name} {which}: {st.get('info', '')}")  # where the kill landed (shown with -rP)
    return st


@pytest.mark.parametrize("name", NAMES)
def test_sigterm_saves_checkpoint_and_exits_0(faults, name):
    stage(faults, name, "sigterm")


@pytest.mark.parametrize("name", NAMES)
def test_random_sigkill_after_a_checkpoint_then_resume(faults, name):
    stage(faults, name, "sigkill")


@pytest.mark.parametrize("name", NAMES)
def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(faults, name):
    stage(faults, name, "kill_in_save")


@pytest.mark.parametrize("name", NAMES)
def test_interrupted_run_ends_bit_identical_to_uninterrupted(faults, name):
    """After SIGTERM, a random SIGKILL and a SIGKILL mid-save, the resumed run equals the reference exactly."""
    T = TRAINERS[name]
    final = stage(faults, name, "final")["final"]
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
    faults.get(f"{name}.disk")
