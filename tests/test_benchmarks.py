"""Smoke test of the benchmark harness (issue 8): it runs at the smallest size and writes valid JSON.

Speed itself is never asserted (the machine is shared); only that every figure is there and positive.
"""
import json
import subprocess
import sys
import time

from repo_helpers import REPO, script_env


def run(args, timeout=300):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "benchmarks/run.py", *args], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)
    proc.wall_s = time.perf_counter() - t0
    return proc


def test_small_run_writes_json_with_expected_keys(tmp_path):
    out = tmp_path / "bench.json"
    proc = run(["--sizes", "small", "--parts", "peak,ddpm", "--repeats", "1", "--device", "cpu",
                "--json", str(out), "--workdir", str(tmp_path / "work")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {"machine", "sizes", "repeats", "parts", "peak", "ddpm", "targets"} <= set(res)
    assert res["parts"] == ["peak", "ddpm"] and res["sizes"] == "small"
    assert res["machine"]["torch"] and res["machine"]["cores"] >= 1
    assert res["peak"]["peak_fp32_gflops"] > 0 and res["peak"]["peak_bf16_gflops"] > 0
    names = {r["variant"] for r in res["ddpm"]["train"]}
    assert {"fp32", "fp32 channels-last", "bf16"} <= names
    for r in res["ddpm"]["train"]:
        assert r["images_per_s"] > 0 and r["flops_per_image"] > 0 and 0 < r["mfu"]
        assert len(r["times_s"]) == 1
    samplers = {(r["sampler"], r["steps"]) for r in res["ddpm"]["sampling"]}
    assert {("ddpm", 1000), ("ddim", 50)} <= samplers
    for r in res["ddpm"]["sampling"]:
        # The figures are measured, not made up: the raw timings fit in the run's own wall time, and the
        # per-step figure is a median of them (within their range), scaled to the sampler's steps.
        ts, k = r["times_s"], r["timed_steps"]
        assert ts and all(t > 0 for t in ts) and sum(ts) < proc.wall_s
        assert min(ts) / k <= r["seconds_per_step"] <= max(ts) / k
        assert r["images_per_s"] > 0
    got = {t["target"] for t in res["targets"]}
    assert any("DDPM UNet fp32 training MFU" in t for t in got)
    assert all(set(t) >= {"value", "goal", "met"} for t in res["targets"])
    assert "target" in proc.stdout and "Matmul peak" in proc.stdout  # the printed table


def test_bad_flags_are_one_line_errors(tmp_path):
    proc = run(["--parts", "ddpm,nope", "--json", str(tmp_path / "x.json")])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --parts: unknown part nope; choose from peak, ddpm, ldm, controlnet, dit, eval, memorization, memory"]
    assert not (tmp_path / "x.json").exists()
    proc = run(["--repeats", "0"])
    assert proc.returncode == 2 and "error: --repeats 0: must be >= 1" in proc.stderr
