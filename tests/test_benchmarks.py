"""Smoke test of the benchmark harness (issue 8): it runs at the smallest size and writes valid JSON.

Speed itself is never asserted (the machine is shared); only that every figure is there and positive.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

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
        "error: --parts: unknown part nope; choose from peak, ddpm, ldm, controlnet, dit, eval, memorization, memory, "
        "quality"]
    assert not (tmp_path / "x.json").exists()
    proc = run(["--repeats", "0"])
    assert proc.returncode == 2 and "error: --repeats 0: must be >= 1" in proc.stderr


# ----------------------------------------------------------------------------- part `quality` (issue 18)
def _bench_module(name):
    """Import benchmarks/<name>.py under a private name (pure helpers; no model folder on sys.path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_steps_to_target_interpolates_a_hand_made_curve():
    qr = _bench_module("quality_report")
    steps = [100, 200, 300, 400]
    # crossing between 200 (FD 300) and 300 (FD 200): 250 is halfway -> step 250
    assert qr.steps_to_target(steps, [500, 300, 200, 100], 250) == (250.0, False)
    # the first crossing counts, even if the curve goes back up afterwards
    s, bound = qr.steps_to_target(steps, [500, 240, 400, 100], 250)
    assert abs(s - (100 + 250 / 260 * 100)) < 1e-9 and not bound
    # a missing checkpoint is skipped: interpolate from 100 (FD 500) to 300 (FD 200)
    s, _ = qr.steps_to_target(steps, [500, None, 200, 100], 250)
    assert abs(s - (100 + 250 / 300 * 200)) < 1e-9
    assert qr.steps_to_target(steps, [500, 300, 200, 100], 50) == (None, False)  # never reached
    assert qr.steps_to_target(steps, [90, 80, 70, 60], 100) == (100.0, True)  # before the first checkpoint: a bound
    assert qr.steps_to_target(steps, [500, 300, 200, 100], 100) == (400.0, False)

    def var(name, fds, status="ok"):
        return {"name": name, "status": status, "checkpoints": [{"step": s, "fd": f, "class_accuracy": 0.5}
                                                               for s, f in zip(steps, fds)]}

    fam = {"title": "t", "steps": steps, "variants": [
        var("base", [400, 300, 250, 200]), var("fast", [300, 150, 120, 100]), var("slow", [450, 420, 380, 330]),
        {"name": "missing", "status": "n/a (flag missing: --snr_gamma)", "checkpoints": []}]}
    qr.add_steps_to_target(fam)
    base, fast, slow, missing = fam["variants"]
    assert fam["target_fd"] == 200 and base["steps_to_target"] == 400 and base["ratio_to_baseline"] == 1.0
    assert abs(fast["steps_to_target"] - (100 + 100 / 150 * 100)) < 1e-9
    assert abs(fast["ratio_to_baseline"] - fast["steps_to_target"] / 400) < 1e-12
    assert slow["steps_to_target"] is None and slow["ratio_to_baseline"] is None
    assert missing["steps_to_target"] is None
    assert fam["best_ratio"]["variant"] == "fast" and fam["best_ratio"]["ratio"] == fast["ratio_to_baseline"]
    text = "\n".join(qr.family_table(fam))
    assert "not reached" in text and "n/a (flag missing: --snr_gamma)" in text and "167" in text


def test_quality_variant_with_a_missing_flag_is_not_applicable():
    qr = _bench_module("quality_report")
    train_help = "  --prediction_type {epsilon,v_prediction}, --prediction-type ...\n  --objective {diffusion,flow}"
    assert qr.missing_flag(["--prediction_type"], None, train_help, "") is None
    assert qr.missing_flag(["--snr_gamma"], None, train_help, "") == "n/a (flag missing: --snr_gamma)"
    assert qr.missing_flag(["--objective"], "heun", train_help, "--sampler {ddpm,ddim}") == \
        "n/a (flag missing: --sampler heun)"
    assert qr.missing_flag(["--objective"], "heun", train_help, "--sampler {ddpm,ddim,euler,heun,sde}") is None


def test_quality_part_small_writes_curves_and_steps_to_target(tmp_path):
    """The part end to end at its smallest size (DDPM baseline + v-prediction, two checkpoints: the second
    one resumes the run): JSON structure, figures in range, steps-to-target from the tested function."""
    qr = _bench_module("quality_report")
    published = REPO / "benchmarks" / "results" / "quality.json"
    before = published.stat().st_mtime_ns if published.exists() else None
    out = tmp_path / "q.json"
    proc = subprocess.run([sys.executable, "benchmarks/part_quality.py", "--size", "small", "--families", "ddpm",
                           "--variants", "v", "--per_class", "1", "--out", str(out), "--workdir", str(tmp_path)],
                          cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["sizes"] == "small" and set(res["families"]) == {"ddpm"}
    assert res["n_heldout"] > 500 and 0 <= res["floor"]["class_accuracy"] <= 1 and res["floor"]["fd"] > 0
    fam = res["families"]["ddpm"]
    assert fam["steps"] == [2, 4] and fam["images"] == 10
    assert [v["name"] for v in fam["variants"]] == ["epsilon", "v_prediction"]
    for v in fam["variants"]:
        assert v["status"] == "ok" and v["train_seconds"] > 0
        assert [c["step"] for c in v["checkpoints"]] == [2, 4]
        for c in v["checkpoints"]:
            assert c["images"] == 10 and c["fd"] > 0 and 0 <= c["class_accuracy"] <= 1
        n, bound = qr.steps_to_target([c["step"] for c in v["checkpoints"]], [c["fd"] for c in v["checkpoints"]],
                                      fam["target_fd"])
        assert v["steps_to_target"] == n and v["steps_to_target_upper_bound"] == bound
        assert v["ratio_to_baseline"] == (None if n is None else n / 4)
    base = fam["variants"][0]
    assert fam["target_fd"] == base["checkpoints"][-1]["fd"] and base["steps_to_target"] <= 4
    # the two objectives trained different networks from the same seed
    assert fam["variants"][1]["checkpoints"][-1]["fd"] != base["checkpoints"][-1]["fd"]
    results = Path(res["scratch"]) / "results"  # small size never writes the published benchmarks/results
    assert json.loads((results / "quality.json").read_text())["families"]["ddpm"]["target_fd"] == fam["target_fd"]
    from PIL import Image
    with Image.open(results / "quality.png") as im:
        assert im.size[0] >= 400 and im.size[1] >= 300
    assert "steps to FD" in (results / "quality.txt").read_text() and "v_prediction" in res["text"]
    assert (published.stat().st_mtime_ns if published.exists() else None) == before
    run_mod = _bench_module("run")  # run.py turns the part's figures into the target row
    targets = run_mod.summarize({"quality": res})
    row = [t for t in targets if t["target"].startswith("quality: DDPM")]
    assert len(row) == 1 and row[0]["goal"] == 0.5 and row[0]["at_most"]
    assert row[0]["value"] == (fam["best_ratio"] or {}).get("ratio")


# ----------------------------------------------------------------------------- bf16 sampling rows (issue 18)
def test_bf16_sampling_and_ldm_mfu_targets_from_hand_made_rows():
    """run.py's issue-18 speed targets from made-up part results: bf16 vs fp32 sampling (denoiser steps + VAE
    decode, as the CLIs run it) against the images/s formula, the LDM fp32 MFU with its 2-head note, the table."""
    run_mod = _bench_module("run")

    def row(name, prec, per_step, dec, batch=8, steps=50):
        return {"name": name, "sampler": "ddim", "steps": steps, "batch": batch, "precision": prec,
                "seconds_per_step": per_step, "decode_s_per_image": dec,
                "images_per_s": batch / (steps * per_step + batch * dec),
                "latent_images_per_s": batch / (steps * per_step)}

    train = [{"name": "LDM UNet cached", "variant": "cached", "precision": "fp32", "batch": 8, "images_per_s": 2.0,
              "flops_per_image": 25e9},
             {"name": "LDM UNet cached, 2 heads", "variant": "cached, 2 heads", "precision": "fp32", "batch": 8,
              "images_per_s": 3.0, "flops_per_image": 25e9}]
    res = {"peak": {"peak_fp32_gflops": 100.0, "peak_bf16_gflops": 400.0, "n": 2048, "layouts": {}},
           "ldm": {"train": train, "sampling": [row("LDM UNet ddim-50", "fp32", 2.0, 4.0),
                                                 row("LDM UNet ddim-50", "bf16", 1.0, 1.0)]},
           "dit": {"train": [], "sampling": [row("DiT-S/2 ddim-50", "fp32", 1.0, 3.0),
                                             row("DiT-S/2 ddim-25", "bf16", 0.5, 1.0, steps=25)]}}
    targets = {t["target"]: t for t in run_mod.summarize(res)}
    ldm = targets["LDM sampling bf16 vs fp32, DDIM-50 + VAE decode (x)"]
    assert abs(ldm["value"] - (50 * 2.0 + 8 * 4.0) / (50 * 1.0 + 8 * 1.0)) < 1e-12 and ldm["goal"] == 1.7
    assert ldm["met"] and "steps alone 2.00x" in ldm["note"] and "decode alone 4.00x" in ldm["note"]
    dit = targets["DiT-S/2 sampling bf16 vs fp32, DDIM-50 + VAE decode (x)"]
    assert dit["value"] is None and dit["met"] is None  # no bf16 DDIM-50 row: not applicable, never a made-up ratio
    mfu = targets["LDM UNet fp32 training MFU"]
    assert abs(mfu["value"] - 25e9 * 2.0 / 1e9 / 100.0) < 1e-12 and not mfu["met"]
    assert "75%" in mfu["note"] and "1.50x" in mfu["note"]
    res.update(machine={"cpu": "x", "cores": 2, "torch_threads": 2, "cpu_capability": "AVX512", "avx512_bf16": True,
                        "torch": "2", "device": "cpu", "load_avg_start": (1.0,), "load_avg_end": (1.0,)},
               sizes="paper", repeats=3, parts=["peak", "ldm", "dit"])
    text = run_mod.table(res, list(targets.values()))
    assert "VAE decode 4.00 s/image in fp32, 1.00 s/image in bf16" in text
    assert any(line.startswith("LDM UNet ddim-50") and " bf16 " in line for line in text.splitlines())
