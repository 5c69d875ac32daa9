"""Tests of ddpm/'s objectives and samplers (issue 18): min-SNR-gamma loss weights, epsilon / v parametrisations,
DPM-Solver++(2M) next to DDPM and DDIM, post-hoc EMA in train.py, exact resume with both.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ddpm_objectives.py -q
Samplers are checked against oracle models whose answer is known in closed form: one fixed image (every
sampler must return it) and Gaussian data (the probability-flow ODE has an exact solution to compare with).
"""
import types
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from repo_helpers import install_fault_hooks, load_folder, run_main_expect

models, train, inference, posthoc_ema, runtime, serve, serving = load_folder(
    "ddpm", "models", "train", "inference", "posthoc_ema", "runtime", "serve", "serving")
install_fault_hooks(runtime)  # DIFFUSION_FAULT_SIGTERM_AT_STEP for the in-process runs below

PREDICTIONS = ("epsilon", "v_prediction")
TINY = ["--base-channels", "8", "--time-dim", "16", "--noise-steps", "20", "--log-every", "1", "--image-size", "8",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def alpha_bar(schedule, T):
    """alpha_bar_t from the papers' definitions (Ho et al. linear betas, Nichol & Dhariwal cosine), in numpy."""
    if schedule == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    else:
        f = np.cos((np.arange(T + 1) / T + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.minimum(1 - f[1:] / f[:-1], 0.999)
    return np.cumprod(1 - betas)


# ------------------------------------------------------------------ min-SNR-gamma weights
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_min_snr_weights_equal_the_formula(schedule, prediction):
    T, gamma = 200, 5.0
    d = models.Diffusion(noise_steps=T, img_size=8, device="cpu", schedule=schedule, prediction_type=prediction)
    t = torch.arange(T)
    a = alpha_bar(schedule, T)
    snr = a / (1 - a)
    want = np.minimum(snr, gamma) / (snr if prediction == "epsilon" else snr + 1)
    got = d.loss_weights(t, gamma).double().numpy()
    assert np.allclose(got, want, rtol=1e-5, atol=0)
    assert (d.loss_weights(t, 0.0) == 1).all() and d.loss_weights(t, 0.0).shape == t.shape
    # The weight makes the target's squared error equal min(SNR, gamma) times the x0 estimate's squared error
    # (what Hang et al. weight): perturb the exact target and compare both sides image by image.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.randn(6, 1, 8, 8, generator=g)
    tt = torch.tensor([0, 3, 40, 100, 150, T - 1])
    x_t, _ = d.noise_images(x0, tt, noise)
    pred = d.training_target(x0, noise, tt) + 0.01 * torch.randn(6, 1, 8, 8, generator=g)
    lhs = d.loss_weights(tt, gamma).double() * (pred - d.training_target(x0, noise, tt)).double().pow(2).mean((1, 2, 3))
    x0_err = (d.x0_from_output(x_t, tt, pred) - x0.double()).pow(2).mean((1, 2, 3))
    assert torch.allclose(lhs, torch.from_numpy(np.minimum(snr[tt.numpy()], gamma)) * x0_err, rtol=1e-3)


def test_training_loss_is_plain_mse_when_off_and_weighted_when_on():
    d = models.Diffusion(noise_steps=50, img_size=8, device="cpu")
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 30, 49])
    assert torch.equal(train.diffusion_loss(d, pred, target, t, 0.0), F.mse_loss(pred, target))  # today's bits
    per_image = (pred - target).pow(2).mean((1, 2, 3))
    w = d.loss_weights(t, 2.0)
    assert (w < 1).any() and (w == 1).any()  # low-noise steps are down-weighted, high-noise ones are not
    assert torch.allclose(train.diffusion_loss(d, pred, target, t, 2.0), (w * per_image).mean())


# ------------------------------------------------------------------ parametrisations
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_v_and_epsilon_agree_on_x0_for_the_same_output(schedule):
    dv = models.Diffusion(noise_steps=100, img_size=8, device="cpu", schedule=schedule, prediction_type="v_prediction")
    de = models.Diffusion(noise_steps=100, img_size=8, device="cpu", schedule=schedule, prediction_type="epsilon")
    g = torch.Generator().manual_seed(2)
    x_t, out = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 50, 98, 99])
    # one network output read as v: its x0 directly, and via its conversion to a noise estimate
    eps = dv.epsilon_from_output(x_t, t, out)
    assert torch.allclose(dv.x0_from_output(x_t, t, out), de.x0_from_output(x_t, t, eps), atol=1e-9, rtol=1e-7)
    for t_int in (0, 57):  # the sampler's call: one timestep for the batch
        e1 = dv.epsilon_from_output(x_t, t_int, out)
        assert torch.allclose(dv.x0_from_output(x_t, t_int, out), de.x0_from_output(x_t, t_int, e1), atol=1e-9)
    # and each training target is read back as the x0 it was made from (training uses the float32 schedule,
    # whose rounding an epsilon model's x0 amplifies by 1 / sqrt(a): compared where a is not tiny)
    x0, noise = torch.rand(5, 3, 8, 8, generator=g) * 2 - 1, torch.randn(5, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 20, 40, 60])
    xt, _ = de.noise_images(x0, t, noise)
    for d in (dv, de):
        target = d.training_target(x0, noise, t)
        assert torch.allclose(d.x0_from_output(xt, t, target), x0.double(), atol=1e-4)
        assert torch.allclose(d.epsilon_from_output(xt, t, target), noise.double(), atol=1e-4)
    assert not torch.allclose(de.x0_from_output(xt, t, dv.training_target(x0, noise, t)), x0.double(), atol=0.1)


# ------------------------------------------------------------------ samplers against oracles
class PointOracle(torch.nn.Module):
    """The exact eps (or v) when all data is one image: per image its `cond` if given, else `target`."""

    def __init__(self, target, diffusion, num_classes=None, cond_channels=0):
        super().__init__()
        self.register_buffer("target", target)
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.c_in, self.num_classes, self.cond_channels, self.d = target.shape[0], num_classes, cond_channels, diffusion

    def forward(self, x, t, y=None, cond=None):
        a = self.d.alpha_hat64[t].reshape(-1, 1, 1, 1)
        x0 = self.target.double() if cond is None else cond.double()
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = eps if self.d.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        return out.float()


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler,steps", [("ddpm", 10), ("ddim", 10), ("dpmsolver", 10), ("dpmsolver", None),
                                           ("dpmsolver", 3)])
def test_each_sampler_inverts_a_one_image_oracle(prediction, sampler, steps):
    d = models.Diffusion(noise_steps=100, img_size=8, device="cpu", schedule="linear", prediction_type=prediction)
    target = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.6 - 0.8
    m = PointOracle(target, d, num_classes=3)
    # guidance on a class: both branches are the oracle, so the guided output is too
    out = d.sample(m, 3, labels=torch.tensor([0, 1, 2]), cfg_scale=3.0, sampler=sampler, steps=steps, seeds=[1, 2, 3],
                   progress=False, as_float=True)
    assert out.shape == (3, 1, 8, 8)
    assert (out - (target + 1) / 2).abs().max() < 1e-4
    assert d.last_timing["steps"] == (steps or models.default_sampling_steps(sampler, 100))
    # an image condition per image: each image comes back as its own condition
    mc = PointOracle(target, d, cond_channels=1)
    cond = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4)) - 0.5
    out = d.sample(mc, 2, sampler=sampler, steps=steps, seeds=[7, 8], progress=False, as_float=True, cond=cond)
    assert (out - (cond + 1) / 2).abs().max() < 1e-4


class GaussianOracle(torch.nn.Module):
    """Exact eps (or v) for data N(mu, s^2) per pixel: E[x0 | x_t] is linear in x_t."""

    def __init__(self, mu, s, diffusion):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.mu, self.s, self.d, self.c_in, self.num_classes = mu, s, diffusion, 1, None

    def forward(self, x, t, y=None):
        a, x = self.d.alpha_hat64[t].reshape(-1, 1, 1, 1), x.double()
        x0 = self.mu + a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * (x - a.sqrt() * self.mu)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return (eps if self.d.prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0).float()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmsolver_follows_the_exact_ode_closer_than_ddim(schedule, prediction):
    """Gaussian data with per-pixel widths 0.01..0.3 (structure at every noise level): along the probability-flow
    ODE (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) is constant, so the exact image of each x_T is known."""
    T = 1000
    d = models.Diffusion(noise_steps=T, img_size=8, device="cpu", schedule=schedule, prediction_type=prediction)
    s = torch.logspace(-2, -0.5, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    m = GaussianOracle(0.1, s, d)
    seeds = list(range(4))
    a_T = d.alpha_hat64[T - 1]
    exact = 0.1 + s * (d.initial_noise(seeds, 1).double() - a_T.sqrt() * 0.1) / (a_T * s ** 2 + 1 - a_T).sqrt()
    assert exact.abs().max() < 1  # no clipping involved

    def error(sampler, steps):  # mean absolute error in 8-bit levels
        out = d.sample(m, 4, sampler=sampler, steps=steps, seeds=seeds, progress=False, as_float=True)
        return (out.double() * 2 - 1 - exact).abs().mean().item() * 127.5

    ddim10, dpm10, ddim50, dpm25 = error("ddim", 10), error("dpmsolver", 10), error("ddim", 50), error("dpmsolver", 25)
    print(f"{schedule} {prediction}: mean error (8-bit levels) ddim10 {ddim10:.2f} dpmsolver10 {dpm10:.2f} "
          f"ddim50 {ddim50:.2f} dpmsolver25 {dpm25:.2f}")
    assert dpm10 <= 0.5 * ddim10  # second order: measured ~0.17x
    assert dpm25 <= 0.5 * ddim50  # the default 25 steps beat DDIM's default 50 (measured ~0.1-0.2x)
    assert dpm25 < dpm10 < 1.5


def test_dpmsolver_image_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    m = models.UNet_conditional(c_in=1, c_out=1, img_size=8, base_channels=8, time_dim=16, num_classes=3)
    d = models.Diffusion(noise_steps=20, img_size=8, device="cpu", prediction_type="v_prediction")
    seeds, labels = [100, 101, 102, 103], torch.tensor([0, 1, 2, 0])
    kw = dict(cfg_scale=3.0, sampler="dpmsolver", steps=8, progress=False)
    full = d.sample(m, 4, labels=labels, seeds=seeds, **kw)
    parts = torch.cat([d.sample(m, 1, labels=labels[i:i + 1], seeds=seeds[i:i + 1], **kw) for i in range(4)])
    diff = (full.int() - parts.int()).abs()  # kernels may sum a batch of another size in another order: 1 level
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99
    assert (full[0].int() - full[1].int()).abs().float().mean() > 5
    assert not torch.equal(full, d.sample(m, 4, labels=labels, seeds=seeds, **{**kw, "sampler": "ddim"}))


def test_sampler_names_and_eta_are_checked():
    d = models.Diffusion(noise_steps=20, img_size=8, device="cpu")
    m = PointOracle(torch.zeros(1, 8, 8), d)
    with pytest.raises(models.UserError, match="--sampler 'euler' is unknown"):
        d.sample(m, 1, sampler="euler", progress=False)
    with pytest.raises(models.UserError, match="--eta 0.5 applies to the ddpm and ddim samplers"):
        d.sample(m, 1, sampler="dpmsolver", eta=0.5, progress=False)
    assert [models.default_sampling_steps(s, 1000) for s in models.SAMPLERS] == [1000, 50, 25]
    assert models.default_sampling_steps("dpmsolver", 20) == 20


# ------------------------------------------------------------------ training: resume, post-hoc EMA, CLI
def write_data(root, classes=2, per_class=8, size=8):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = (rng.random((size, size)) * 60).astype(np.uint8)
            a[1 + c:5 + c, 2:6] = 230
            Image.fromarray(a, "L").save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("objectives_data"))


def run_args(data, work, *extra):
    return ["--dataset-path", str(data), "--work-dir", str(work), "--epochs", "2", "--batch-size", "4",
            "--ema-start", "1", "--ema-decay", "0.9", "--sample-every", "0", "--prediction-type", "v_prediction",
            "--snr-gamma", "5", "--posthoc-ema-every-steps", "2", "--posthoc-ema-sigma-rels", "0.05,0.20", *TINY,
            *extra]


def run_files(work):
    run = Path(work) / "models" / "DDPM_conditional"
    state = torch.load(run / "train_state.pt", weights_only=True)
    snaps = {p.name: torch.load(p, weights_only=True) for p in sorted((run / "posthoc_ema").glob("phema_*.pt"))}
    return run, state, snaps


def assert_equal_nested(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_equal_nested(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        assert a == b


def test_resume_is_exact_with_min_snr_and_posthoc_ema(data, tmp_path, capsys, monkeypatch):
    train.main(run_args(data, tmp_path / "ref"))  # uninterrupted: 2 epochs x 4 steps
    out = capsys.readouterr().out
    assert "predicts v_prediction, min-SNR-gamma 5 loss weights" in out
    assert "post-hoc EMA (EDM2): sigma_rel 0.05,0.2 tracked, a snapshot every 2 steps" in out
    run, ref, ref_snaps = run_files(tmp_path / "ref")
    cfg = ref["config"]
    assert (cfg["snr_gamma"], cfg["posthoc_ema_every_steps"], cfg["posthoc_ema_sigma_rels"]) == (5.0, 2, "0.05,0.2")
    assert list(ref_snaps) == [f"phema_{s:07d}.pt" for s in (2, 4, 6, 8)]
    assert ref["posthoc_ema"]["sigma_rels"] == [0.05, 0.2]

    monkeypatch.setenv("DIFFUSION_FAULT_SIGTERM_AT_STEP", "3")  # stop after step 3: between two snapshots
    train.main(run_args(data, tmp_path / "cut"))
    monkeypatch.delenv("DIFFUSION_FAULT_SIGTERM_AT_STEP")
    assert "SIGTERM received: checkpoint written at step 3" in capsys.readouterr().out
    # a conflicting --snr-gamma on resume: a warning, and the run keeps the stored 5 (the weights still match)
    train.main(run_args(data, tmp_path / "cut", "--resume", "--snr-gamma", "1"))
    assert "--snr-gamma 1.0 ignored on resume; the run keeps snr_gamma=5.0" in capsys.readouterr().out
    _, got, got_snaps = run_files(tmp_path / "cut")
    assert got["step"] == ref["step"] == 8
    for key in ("model", "ema", "posthoc_ema"):
        assert_equal_nested(got[key], ref[key])
    assert list(got_snaps) == list(ref_snaps)
    for name in ref_snaps:
        assert_equal_nested(got_snaps[name], ref_snaps[name])

    # the post-hoc EMA command rebuilds train_state.pt's "ema" entry and ema_ckpt.pt; inference reads both
    for src, use_ema in ((run / "train_state.pt", True), (run / "ema_ckpt.pt", False)):
        dst = run / f"rebuilt_{src.name}"  # beside config.json, which inference reads for a flat state dict
        assert posthoc_ema.main(["--snapshots", str(run / "posthoc_ema"), "--sigma_rel", "0.1",
                                 "--checkpoint", str(src), "--out", str(dst)]) == 0
        weights, _ = posthoc_ema.reconstruct(run / "posthoc_ema", 0.1)
        model, _, _ = inference.load_model(dst, use_ema=use_ema)
        sd = model.state_dict()
        assert all(torch.allclose(sd[k].double(), weights["ema"][k].double(), atol=1e-6) for k in sd)
        assert not all(torch.equal(sd[k], got["ema"][k]) for k in sd)  # not the ordinary EMA


def test_default_run_stores_todays_settings_and_grid_with_dpmsolver(data, tmp_path, capsys):
    work = tmp_path / "w"
    train.main(["--dataset-path", str(data), "--work-dir", str(work), "--epochs", "1", "--batch-size", "8",
                "--sample-every", "1", "--sampler", "dpmsolver", "--sampling-steps", "4", "--grid-images", "2",
                *TINY])
    out = capsys.readouterr().out
    assert "(2 images x 4 steps" in out and "min-SNR" not in out and "post-hoc" not in out
    run = work / "models" / "DDPM_conditional"
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert (state["config"]["snr_gamma"], state["config"]["posthoc_ema_every_steps"]) == (0.0, 0)
    assert "posthoc_ema" not in state and not (run / "posthoc_ema").exists()
    # inference: dpmsolver's default steps (25, capped at the model's 20) name the output folder
    res = inference.sample(inference.build_parser().parse_args(
        ["--ckpt", str(run / "ema_ckpt.pt"), "--sampler", "dpmsolver", "--num-samples", "2", "--output-dir",
         str(tmp_path / "s")]))
    assert len(list(Path(res).glob("*.png"))) == 2
    assert "with dpmsolver, 20 steps" in capsys.readouterr().out
    # the server offers it and serves the CLI's pixels for the same settings
    args = serve.build_parser().parse_args(["--checkpoint", str(run / "ema_ckpt.pt"), "--no_save"])
    backend = serve.DDPMBackend(str(run / "ema_ckpt.pt"), args, torch.device("cpu"), None)
    backend.cached_info = backend.info()
    assert "dpmsolver" in backend.cached_info["samplers"]
    # without "steps" a request gets its sampler's own default (DDIM 50, DPM-Solver++ 25 on a 1000-step model)
    big = types.SimpleNamespace(cached_info=dict(backend.cached_info, max_steps=1000, sampler_steps={
        k: models.default_sampling_steps(k, 1000) for k in ("ddim", "dpmsolver")}))
    steps = {k: serving.validate("generate", {"sampler": k}, None, {"m": big}, args).steps for k in ("ddim", "dpmsolver")}
    assert steps == {"ddim": 50, "dpmsolver": 25}
    assert backend.cached_info["sampler_steps"]["dpmsolver"] == 20  # capped at this model's T
    req = serving.validate("generate", {"sampler": "dpmsolver", "steps": 6, "seed": 3, "num_images": 1,
                                        "class": "class_1", "guidance": 2.0}, None, {"m": backend}, args)
    tag, outputs = backend.generate(req)
    cli = inference.sample(inference.build_parser().parse_args(
        ["--ckpt", str(run / "ema_ckpt.pt"), "--sampler", "dpmsolver", "--sampling-steps", "6", "--seed", "3",
         "--num-samples", "1", "--class-labels", "class_1", "--cfg-scale", "2", "--output-dir", str(tmp_path / "c")]))
    assert tag == "DDPM_conditional_ema_ckpt_dpmsolver6_cfg2_seed3"
    assert np.array_equal(np.asarray(outputs[0].image), np.asarray(Image.open(Path(cli) / outputs[0].name)))


@pytest.mark.parametrize("extra,wanted", [
    (["--snr-gamma", "-1"], "--snr-gamma -1.0 must be >= 0"),
    (["--posthoc-ema-sigma-rels", "0.05,abc"], "--posthoc-ema-sigma-rels '0.05,abc'"),
    (["--posthoc-ema-every-steps", "-2"], "--posthoc-ema-every-steps -2 must be >= 0"),
], ids=["snr-gamma", "sigma-rels", "every-steps"])
def test_bad_objective_flags_are_one_error_line(data, tmp_path, capsys, extra, wanted):
    msg = run_main_expect(train.main, ["--dataset-path", str(data), "--work-dir", str(tmp_path / "w"), *TINY, *extra],
                          capsys)
    assert wanted in msg, msg
    assert not (tmp_path / "w").exists()


def test_bad_eta_for_dpmsolver_is_named_before_loading(tmp_path, capsys):
    msg = run_main_expect(inference.main, ["--ckpt", str(tmp_path / "missing.pt"), "--sampler", "dpmsolver",
                                           "--eta", "0.5"], capsys)
    assert "--eta 0.5" in msg and "dpmsolver" in msg
