"""Sampling faults: DDPM sample_ddp, LDM inference_per_class, DiT sample_ddp and ControlNet inference
--mask_folder killed mid-way and rerun (exactly the missing images, the same bytes as uninterrupted runs),
and two runs started at once into the same folder (no clobbering, every file decodes, counts right).
"""
import pytest

from fault_specs import SAMPLERS

pytestmark = pytest.mark.fault
NAMES = list(SAMPLERS)


@pytest.mark.parametrize("name", NAMES)
def test_killed_sampling_rerun_writes_exactly_the_missing_images(faults, name):
    killed = faults.get(f"{name}.kill")
    ref = faults.get(f"{name}.concurrent")  # uninterrupted runs of the same command
    count = SAMPLERS[name].count
    assert killed["alive"], f"sampling ended before it could be killed (delay {killed['delay']:.3f}s)"
    assert 0 < killed["present"] < count, f"{killed['present']} of {count} images after the kill"
    assert killed["rerun_code"] == 0, f"the rerun exited {killed['rerun_code']}\n{killed['log']}"
    assert not killed["rewritten"], f"the rerun rewrote images that were already there: {killed['rewritten'][:5]}"
    assert not killed["broken"], f"images that do not decode: {killed['broken'][:5]}"
    assert len(killed["files"]) == count
    assert killed["files"].keys() == ref["files"].keys()
    differ = [f for f in killed["files"] if killed["files"][f] != ref["files"][f]]
    assert not differ, f"{len(differ)} images differ from an uninterrupted run, e.g. {differ[:3]}"
    assert killed["other"] == ref["other"], "the other output files (settings, .npz) differ"


@pytest.mark.parametrize("name", NAMES)
def test_two_concurrent_runs_into_one_folder(faults, name):
    r = faults.get(f"{name}.concurrent")
    assert r["codes"] == [0, 0], f"exit codes {r['codes']}\n{r['tails'][0]}\n{r['tails'][1]}"
    assert not r["broken"], f"images that do not decode: {r['broken'][:5]}"
    assert len(r["files"]) == SAMPLERS[name].count
    assert not r["hidden"], f"temporary files left behind: {r['hidden'][:5]}"
