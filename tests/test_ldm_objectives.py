"""Tests of the LDM's objectives (issue 18): min-SNR-gamma weights against the formula, --snr_gamma 0 = the
unweighted loss, a v-prediction checkpoint sampled with v by every sampler of inference.py,
inference_per_class.py and serve.py (an oracle denoiser: data = one fixed latent, exact v), the resume rules
of the new flags, and a post-hoc EMA reconstruction that inference reads. Exact resume with --snr_gamma and
post-hoc EMA on is in tests/test_ldm.py (test_resume_is_bit_identical); the ControlNet's part in
tests/test_controlnet.py.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ldm_objectives.py -q
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

from repo_helpers import load_folder
from test_ldm import base_flags, data, load, tiny_vae, user_error  # noqa: F401 (fixtures)

train, inference, inference_per_class, serve, models, posthoc_ema, runtime = load_folder(
    "ldm", "train", "inference", "inference_per_class", "serve", "models", "posthoc_ema", "runtime")

LATENT = (4, 8, 8)  # tiny_vae: factor 2, 4 channels, 16 px images


def reference_snr(cfg, t):
    """alpha_bar / (1 - alpha_bar) from the schedule's definition, in float64 (not through diffusers)."""
    n, b0, b1 = cfg["num_train_timesteps"], cfg["beta_start"], cfg["beta_end"]
    if cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(b0, b1, n, dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)[t]
    return ac / (1 - ac)


def reference_weights(kind, snr, gamma):
    """Hang et al. 2023: min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / snr if kind == "epsilon" else clipped / (snr + 1)


def schedule(kind, **kw):
    return train.DDPMScheduler(**{**models.DEFAULT_NOISE_SCHEDULE, "prediction_type": kind, **kw})


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_the_formula(kind):
    t = torch.tensor([0, 1, 10, 100, 250, 400, 600, 800, 999])
    for gamma in (1.0, 5.0):
        got = train.min_snr_weights(schedule(kind), t, gamma).double()
        want = reference_weights(kind, reference_snr(models.DEFAULT_NOISE_SCHEDULE, t), gamma)
        assert torch.allclose(got, want, rtol=1e-3, atol=0), (gamma, got, want)
        assert (got < 0.99).any() and got.min() > 0  # gamma lies inside the schedule's SNR range: weights act
    if kind == "epsilon":  # low SNR (large t) is never up-weighted: weight 1 where SNR <= gamma
        assert torch.equal(train.min_snr_weights(schedule(kind), t[-3:], 5.0), torch.ones(3))
    # the cosine schedule's last SNR is ~0: the weights stay finite
    w = train.min_snr_weights(schedule(kind, beta_schedule="squaredcos_cap_v2"), torch.arange(1000), 5.0)
    assert torch.isfinite(w).all() and w.min() >= 0 and w.max() <= 1


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_weighted_loss_and_gamma_zero_is_the_plain_loss(kind):
    torch.manual_seed(0)
    kw = models.unet_kwargs("tiny", block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                            attention_head_dim=2)
    den = models.Denoiser(models.build_unet(8, 4, **kw), models.ClassEmbedder(3, 16))
    sched = schedule(kind)
    mean, std = torch.randn(6, *LATENT), torch.rand(6, *LATENT) * 0.1
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    rand = train.draw_noise(torch.Generator().manual_seed(3), mean.shape, 0.1, 1000)
    args = (den, mean, std, labels, rand, sched, 0.18215, 3, "cpu")
    with torch.no_grad():
        plain = train.diffusion_loss(*args)
        zero = train.diffusion_loss(*args, snr_gamma=0.0)
        per = train.diffusion_loss(*args, per_sample=True)
        weighted = train.diffusion_loss(*args, snr_gamma=5.0)
        weighted_per = train.diffusion_loss(*args, per_sample=True, snr_gamma=5.0)
    assert torch.equal(plain, zero)  # off = today's numerics bit for bit (the same code path)
    w = reference_weights(kind, reference_snr(models.DEFAULT_NOISE_SCHEDULE, rand[2]), 5.0).float()
    assert torch.allclose(weighted_per, per * w, rtol=1e-4)
    assert torch.allclose(weighted, (per * w).mean(), rtol=1e-4)
    assert not torch.allclose(weighted, plain, rtol=1e-2)


class VOracle(torch.nn.Module):
    """A perfect v-prediction denoiser for data = the one latent z0: the exact v of (x_t, t)."""

    def __init__(self, z0, noise_config, num_classes=3):
        super().__init__()
        self.z0 = z0.double()
        self.ac = train.DDPMScheduler(**noise_config).alphas_cumprod.double()
        self.class_embedder = models.ClassEmbedder(num_classes, 16)

    def forward(self, x, t, labels):
        a = self.ac[t.long().cpu()].view(-1, 1, 1, 1)
        eps = (x.double() - a.sqrt() * self.z0) / (1 - a).sqrt()
        return (a.sqrt() * eps - (1 - a).sqrt() * self.z0).to(x.dtype)


def oracle_result(name, cfg, z0, seed, steps):
    """Where a sampler that reads the model output as v lands from the noise of `seed` (closed form).

    DDPM and DPM-Solver++ end at sigma 0: exactly z0. DDIM (set_alpha_to_one=False) ends at alpha_bar[0]:
    x0 = z0 is predicted exactly at every step, so the implied eps never changes from the first step's."""
    if name != "ddim":
        return z0
    ac = train.DDPMScheduler(**cfg).alphas_cumprod.double()
    sampler = models.make_sampler("ddim", cfg)
    sampler.set_timesteps(steps)
    a1 = ac[int(sampler.timesteps[0])]
    eps = (models.initial_noise([seed], LATENT).double() - a1.sqrt() * z0) / (1 - a1).sqrt()
    return (ac[0].sqrt() * z0 + (1 - ac[0]).sqrt() * eps).float()


def train_in_process(argv):
    """ldm/train.py main() in this process (a fresh accelerate state per run)."""
    AcceleratorState._reset_state(True)
    return train.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def v_run(tmp_path_factory, data, tiny_vae):
    """2 steps of a v-prediction, min-SNR (gamma 5) run with post-hoc EMA snapshots every step."""
    out = tmp_path_factory.mktemp("v") / "run"
    train_in_process(base_flags(data, tiny_vae, out) + [
        "--prediction_type", "v_prediction", "--snr_gamma", "5", "--posthoc_ema_every_steps", "1",
        "--max_train_steps", "2", "--sample_every_epochs", "0", "--val_split", "0"])
    return out


def test_v_prediction_is_stored_and_every_sampler_samples_with_v(v_run):
    ck = load(v_run / "checkpoint_last.pt")
    cfg = ck["noise_scheduler_config"]
    assert cfg["prediction_type"] == "v_prediction" and ck["config"]["prediction_type"] == "v_prediction"
    assert ck["config"]["snr_gamma"] == 5.0 and ck["step"] == 2
    torch.manual_seed(1)
    z0 = torch.randn(1, *LATENT)
    oracle = VOracle(z0, cfg)
    for name in models.SCHEDULERS:
        sampler = models.make_sampler(name, cfg)
        assert sampler.config.prediction_type == "v_prediction", name
        gens = [torch.Generator().manual_seed(7)]
        got = models.sample_latents(oracle, sampler, torch.tensor([1]), gens, LATENT, 4, 3.0, "cpu")
        want = oracle_result(name, cfg, z0, 7, 4)
        assert torch.allclose(got, want, atol=1e-5), (name, (got - want).abs().max())
        # the same oracle read as epsilon (the flag not honoured) lands elsewhere
        wrong = models.sample_latents(oracle, models.make_sampler(name, {**cfg, "prediction_type": "epsilon"}),
                                      torch.tensor([1]), [torch.Generator().manual_seed(7)], LATENT, 4, 3.0, "cpu")
        assert (wrong - want).abs().max() > 1e-3, name


def test_inference_scripts_sample_a_v_checkpoint_with_v(v_run, tmp_path, monkeypatch):
    """inference.py, inference_per_class.py and serve.py read the stored prediction_type (no flag to repeat)."""
    ck_path = v_run / "checkpoint_last.pt"
    ck = load(ck_path)
    eps_copy = tmp_path / "as_epsilon.pt"  # the same checkpoint claiming epsilon: the negative control
    torch.save({**ck, "noise_scheduler_config": {**ck["noise_scheduler_config"], "prediction_type": "epsilon"}},
               eps_copy)
    torch.manual_seed(2)
    z0 = torch.randn(1, *LATENT)
    oracle = VOracle(z0, ck["noise_scheduler_config"])
    monkeypatch.setattr(inference, "denoiser_from_checkpoint", lambda ckpt, use_ema=True: (oracle, use_ema))
    vae, _ = models.load_vae(ck["vae"])

    def expected(name, seed):
        z = oracle_result(name, ck["noise_scheduler_config"], z0, seed, 4)
        with torch.no_grad():
            return models.decode_to_images(vae, z, ck["vae_scaling_factor"], 1)[0, 0].numpy()

    def written(path):
        return np.asarray(Image.open(path), dtype=np.float64) / 255

    common = ["--num_inference_steps", "4", "--num_samples", "1", "--class_label", "cls_b", "--seed", "5"]
    inference.main(["--checkpoint", str(ck_path), "--output_dir", str(tmp_path / "g"), "--scheduler", "ddim"] + common)
    img = written(tmp_path / "g" / "checkpoint_last_ddim4_cfg3_seed5" / "cls_b_seed1000005.png")
    assert np.abs(img - expected("ddim", 1_000_005)).max() <= 1.5 / 255
    inference.main(["--checkpoint", str(eps_copy), "--output_dir", str(tmp_path / "g"), "--scheduler", "ddim"] + common)
    wrong = written(tmp_path / "g" / "as_epsilon_ddim4_cfg3_seed5" / "cls_b_seed1000005.png")
    assert np.abs(wrong - expected("ddim", 1_000_005)).max() > 10 / 255

    inference_per_class.main(["--checkpoint", str(ck_path), "--output_dir", str(tmp_path / "pc"), "--total_samples",
                              "1", "--classes", "cls_a", "--num_inference_steps", "4", "--scheduler", "ddpm"])
    img = written(tmp_path / "pc" / "cls_a" / "cls_a_seed42.png")
    assert np.abs(img - expected("ddpm", 42)).max() <= 1.5 / 255

    args = serve.parse_args(["--checkpoint", str(ck_path), "--output_dir", str(tmp_path / "s")])
    one = SimpleNamespace(**{**vars(args), "checkpoint": str(ck_path), "output_format": "png"})
    gen = inference.Generator(one)
    gen.setup()
    req = SimpleNamespace(class_index=2, seed=9, num_images=1, sampler="dpmsolver", steps=4, guidance=3.0)
    _, outputs = serve.LDMBackend(gen, one).generate(req)
    img = np.asarray(outputs[0].image, dtype=np.float64) / 255
    assert np.abs(img - expected("dpmsolver", 9 + 2_000_000)).max() <= 1.5 / 255


# (flags added to a resume of the v run, what the one error line must contain)
RESUME_CONFLICTS = [
    (["--prediction_type", "epsilon"], ["--prediction_type epsilon", "v_prediction", "--output_dir"]),
    (["--snr_gamma", "0"], ["--snr_gamma 0.0", "snr_gamma=5.0"]),
    (["--posthoc_ema_every_steps", "3"], ["--posthoc_ema_every_steps 3", "posthoc_ema_every_steps=1"]),
    (["--posthoc_ema_sigma_rels", "0.05,0.2"], ["--posthoc_ema_sigma_rels 0.05,0.2", "0.05,0.1"]),
]


@pytest.mark.parametrize("extra,wanted", RESUME_CONFLICTS, ids=[c[0][0] for c in RESUME_CONFLICTS])
def test_resume_keeps_the_objective_and_refuses_another(v_run, data, tiny_vae, capsys, extra, wanted):
    flags = base_flags(data, tiny_vae, v_run) + ["--val_split", "0", "--resume"]
    before = (v_run / "checkpoint_last.pt").stat().st_mtime_ns
    err = user_error(capsys, train.main, flags + extra)
    assert len(err.strip().splitlines()) == 1
    for w in wanted:
        assert w in err, err
    assert (v_run / "checkpoint_last.pt").stat().st_mtime_ns == before
    # the same values spelled again are no conflict: the settings are checked, nothing is trained yet
    args = train.parse_args(flags + ["--prediction_type", "v_prediction", "--snr_gamma", "5",
                                     "--posthoc_ema_sigma_rels", "0.050,0.10"])
    train.validate_args(args)
    train.keep_on_resume(args, load(v_run / "checkpoint_last.pt")["config"], train.LIFELONG_DEFAULTS)
    assert (args.prediction_type, args.snr_gamma, args.posthoc_ema_every_steps) == ("v_prediction", 5.0, 1)


@pytest.mark.parametrize("extra,wanted", [
    (["--snr_gamma", "-1"], "--snr_gamma must be >= 0"),
    (["--posthoc_ema_every_steps", "-2"], "--posthoc_ema_every_steps must be >= 0"),
    (["--posthoc_ema_sigma_rels", "0.05,abc"], "--posthoc_ema_sigma_rels"),
    (["--posthoc_ema_every_steps", "2", "--no_ema"], "drop --no_ema"),
], ids=["snr_gamma", "every_steps", "sigma_rels", "no_ema"])
def test_bad_objective_flags(tmp_path, data, tiny_vae, capsys, extra, wanted):
    out = tmp_path / "out"
    err = user_error(capsys, train.main, base_flags(data, tiny_vae, out) + extra)
    assert wanted in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_new_run_defaults_are_todays():
    a = train.parse_args(["--data_root", "d"])
    train.keep_on_resume(a, None, train.LIFELONG_DEFAULTS)
    assert (a.prediction_type, a.snr_gamma, a.posthoc_ema_every_steps) == ("epsilon", 0.0, 0)
    assert posthoc_ema.parse_sigma_rels(a.posthoc_ema_sigma_rels) == (0.05, 0.1)
    # an old checkpoint's config without the new keys resumes with today's behaviour
    b = train.parse_args(["--data_root", "d"])
    train.keep_on_resume(b, {"prediction_type": "epsilon", "learning_rate": 1e-4}, train.LIFELONG_DEFAULTS)
    assert (b.snr_gamma, b.posthoc_ema_every_steps) == (0.0, 0)


def test_posthoc_reconstruction_is_a_checkpoint_inference_reads(v_run, tmp_path, capsys):
    snaps = sorted(p.name for p in (v_run / "posthoc_ema").iterdir())
    assert snaps == ["phema_0000001.pt", "phema_0000002.pt"]
    snap = load(v_run / "posthoc_ema" / "phema_0000002.pt")
    assert snap["keys"] == ["ema_unet", "ema_class_embedder"]
    ck = load(v_run / "checkpoint_last.pt")
    assert ck["posthoc_ema"]["every_steps"] == 1
    for key in ("ema_unet", "ema_class_embedder"):  # the tracked averages have the EMA entries' layout
        assert set(snap["averages"][0][key]) == set(ck[key])
    out = tmp_path / "rebuilt.pt"
    posthoc_ema.main(["--snapshots", str(v_run / "posthoc_ema"), "--sigma_rel", "0.07",
                      "--checkpoint", str(v_run / "checkpoint_last.pt"), "--out", str(out)])
    rebuilt = load(out)
    assert not torch.equal(rebuilt["ema_unet"]["conv_in.weight"], ck["ema_unet"]["conv_in.weight"])
    assert all(torch.equal(rebuilt["unet"][k], v) for k, v in ck["unet"].items())
    inference.main(["--checkpoint", str(out), "--output_dir", str(tmp_path / "g"), "--num_samples", "1",
                    "--class_label", "cls_a", "--num_inference_steps", "2"])
    assert len(list((tmp_path / "g").rglob("*.png"))) == 1
