"""Post-hoc EMA (scripts/vendored/posthoc_ema.py, EDM2): the tracked power-function EMAs, their snapshots, the
reconstruction of any width and the rebuild command (tested through the ddpm/ copy; every copy is identical)."""
import math

import pytest
import torch

from repo_helpers import load_folder, run_main_expect

phema, rt = load_folder("ddpm", "posthoc_ema", "runtime")


def trajectory(steps, seed=0, size=64):
    """A noisy drifting 'training run': weights per step (a random walk with a trend), as (steps, size)."""
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum(torch.randn(steps, size, generator=g, dtype=torch.float64) * 0.1 + 0.01, 0).float()


def run(traj, sigma_rels, every, folder, start=1, tracker=None, model=None):
    """Feed the trajectory into a PostHocEMA of a Linear(size -> 1) (weights = the trajectory rows)."""
    model = model or torch.nn.Linear(traj.shape[1], 1, bias=False)
    tracker = tracker or phema.PostHocEMA({"ema": model}, sigma_rels, every, folder)
    for step in range(start, traj.shape[0] + 1):
        with torch.no_grad():
            model.weight.copy_(traj[step - 1][None])
        tracker.update(step)
        tracker.maybe_snapshot(step)
    return tracker, model


def test_sigma_rel_gamma_round_trip_and_range():
    for s in (0.01, 0.05, 0.1, 0.2, 0.27):
        g = phema.sigma_rel_to_gamma(s)
        assert g > 0 and math.isclose(phema.gamma_to_sigma_rel(g), s, rel_tol=1e-9)
    # the width is the std of the density (g+1) x^g on [0, 1] (length 1): check by numerical integration
    g = phema.sigma_rel_to_gamma(0.1)
    x = torch.linspace(0, 1, 200001, dtype=torch.float64)
    p = (g + 1) * x ** g
    mean = torch.trapezoid(x * p, x)
    assert math.isclose(torch.trapezoid((x - mean) ** 2 * p, x).sqrt().item(), 0.1, rel_tol=1e-4)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(rt.UserError, match="sigma_rel"):
            phema.sigma_rel_to_gamma(bad)
    assert phema.parse_sigma_rels("0.05, 0.1") == (0.05, 0.1)
    for bad in ("a,b", "0.05,0.05", "0.5", ""):
        with pytest.raises(rt.UserError, match="--posthoc_ema_sigma_rels"):
            phema.parse_sigma_rels(bad)


def test_tracked_ema_is_the_power_function_average(tmp_path):
    """After t steps the tracked EMA equals sum_tau w(tau) theta_tau with the paper's power-function weights
    w(tau) = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1) (what makes the closed-form reconstruction exact)."""
    traj = trajectory(300)
    model = torch.nn.Linear(64, 1, bias=False)
    tracker = phema.PostHocEMA({"ema": model}, (0.05, 0.15), 1000, tmp_path)
    run(traj, None, None, None, tracker=tracker, model=model)
    t = torch.arange(1, 301, dtype=torch.float64)
    for gamma, avg in zip(tracker.gammas, tracker.averages):
        w = (t ** (gamma + 1) - (t - 1) ** (gamma + 1)) / 300 ** (gamma + 1)
        assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-12)
        expected = (w[:, None] * traj.double()).sum(0)
        torch.testing.assert_close(avg["ema"]["weight"][0].double(), expected, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.iterdir())  # 1000 > 300 steps: no snapshot yet


def test_reconstruction_matches_a_directly_tracked_ema(tmp_path):
    """Snapshots of widths 0.05 and 0.10 every 50 steps rebuild the EMA of width 0.07 (and 0.12) at the last
    snapshot; a tracker of exactly that width run alongside is the reference."""
    traj = trajectory(1000, seed=1)
    run(traj, (0.05, 0.10), 50, tmp_path / "snaps")
    direct, _ = run(traj, (0.07, 0.12), 1000, tmp_path / "direct")
    tracked, _ = run(traj, (0.05, 0.10), 1000, tmp_path / "tracked")
    spread = (tracked.averages[0]["ema"]["weight"] - tracked.averages[1]["ema"]["weight"]).abs().mean()
    for i, sigma in enumerate((0.07, 0.12)):
        weights, info = phema.reconstruct(tmp_path / "snaps", sigma, log=lambda m: None)
        assert info["step"] == 1000 and info["snapshots"] == 20 and info["fit_rel_error"] < 0.02
        err = (weights["ema"]["weight"] - direct.averages[i]["ema"]["weight"].double()).abs().mean()
        assert err < 0.02 * spread, (sigma, err.item(), spread.item())
    # a tracked width at the last snapshot is rebuilt exactly (the fit picks that one profile)
    weights, info = phema.reconstruct(tmp_path / "snaps", 0.10)
    assert info["fit_rel_error"] < 1e-6
    torch.testing.assert_close(weights["ema"]["weight"].float(), tracked.averages[1]["ema"]["weight"],
                               rtol=1e-5, atol=1e-5)
    # --step: the EMA as of an earlier snapshot
    weights, info = phema.reconstruct(tmp_path / "snaps", 0.07, step=520)
    assert info["step"] == 500 and info["snapshots"] == 10


def test_resume_continues_exactly(tmp_path):
    """A tracker restored from its state_dict continues to the same averages and snapshot files."""
    traj = trajectory(200, seed=2)
    whole, _ = run(traj, (0.05, 0.10), 40, tmp_path / "whole")
    first, model = run(traj[:120], (0.05, 0.10), 40, tmp_path / "split")
    state = first.state_dict()
    torch.save(state, tmp_path / "state.pt")
    model2 = torch.nn.Linear(64, 1, bias=False)
    second = phema.PostHocEMA({"ema": model2}, (0.05, 0.10), 40, tmp_path / "split")
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    run(traj, None, None, None, start=121, tracker=second, model=model2)
    for a, b in zip(whole.averages, second.averages):
        assert torch.equal(a["ema"]["weight"], b["ema"]["weight"])
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "split").iterdir()) == [f"phema_{s:07d}.pt" for s in
                                                                              (40, 80, 120, 160, 200)]
    with pytest.raises(rt.UserError, match="disagrees"):
        phema.PostHocEMA({"ema": model2}, (0.05, 0.2), 40, tmp_path).load_state_dict(state)
    inactive = phema.PostHocEMA({"ema": model2}, (0.05, 0.10), 40, tmp_path / "x", active=False)
    inactive.update(1)
    assert inactive.state_dict() is None and inactive.maybe_snapshot(40) is None and not (tmp_path / "x").exists()


def test_rebuild_command(tmp_path, capsys):
    """The command writes a copy of the checkpoint with the EMA entry replaced (flat and nested files), never
    overwrites, and names the flag or file on bad input."""
    traj = trajectory(100, seed=3)
    tracker, model = run(traj, (0.05, 0.10), 25, tmp_path / "snaps")
    sd = {"weight": torch.zeros(1, 64)}
    torch.save({"model": sd, "ema": sd, "step": 100}, tmp_path / "state.pt")
    torch.save(sd, tmp_path / "ema_ckpt.pt")
    argv = ["--snapshots", str(tmp_path / "snaps"), "--sigma_rel", "0.1", "--checkpoint"]
    assert phema.main(argv + [str(tmp_path / "state.pt")]) == 0
    out = tmp_path / "state_phema0.100_step100.pt"
    ck = torch.load(out, weights_only=True)
    torch.testing.assert_close(ck["ema"]["weight"], tracker.averages[1]["ema"]["weight"], rtol=1e-5, atol=1e-5)
    assert torch.equal(ck["model"]["weight"], sd["weight"]) and ck["step"] == 100
    assert ck["posthoc_ema_reconstruction"]["sigma_rel"] == 0.1
    assert phema.main(["--snapshots", str(tmp_path / "snaps"), "--sigma-rel", "0.08", "--checkpoint",
                       str(tmp_path / "ema_ckpt.pt"), "--out", str(tmp_path / "flat.pt")]) == 0
    flat = torch.load(tmp_path / "flat.pt", weights_only=True)
    assert set(flat) == {"weight"} and flat["weight"].dtype == torch.float32
    capsys.readouterr()
    msg = run_main_expect(lambda a: rt.run_main(phema.main, a), argv + [str(tmp_path / "state.pt")], capsys)
    assert str(out) in msg and "exists" in msg
    msg = run_main_expect(lambda a: rt.run_main(phema.main, a),
                          ["--snapshots", str(tmp_path / "none"), "--list"], capsys)
    assert "--snapshots" in msg
    msg = run_main_expect(lambda a: rt.run_main(phema.main, a), argv[:3] + ["0.5", "--checkpoint",
                                                                           str(tmp_path / "state.pt")], capsys)
    assert "sigma_rel" in msg
    torch.save({"model": sd, "step": 1}, tmp_path / "other.pt")
    msg = run_main_expect(lambda a: rt.run_main(phema.main, a), argv + [str(tmp_path / "other.pt")], capsys)
    assert "no ema entries" in msg
    assert phema.main(["--snapshots", str(tmp_path / "snaps"), "--list"]) == 0
    assert "4 snapshots" in capsys.readouterr().out
