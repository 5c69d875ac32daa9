"""Tests of DiT's flow-matching objective (dit/flow.py), its samplers, REPA (dit/repa.py) and post-hoc EMA in
dit/train.py: limits of the interpolant, samplers against closed-form velocities, the official key layout,
checkpoint contents, bad encoders. Tiny configs, CPU, no downloads. (Exact resume with these options is
tests/test_dit.py::test_train_resume_is_bit_identical_and_writes_plain_checkpoints.)

    OMP_NUM_THREADS=1 python -m pytest tests/test_dit_flow.py -q
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import REPO, load_folder, run_script, script_env

models, flow, repa, train, inference, sample, serve, serving, runtime, posthoc_ema = load_folder(
    "dit", "models", "flow", "repa", "train", "inference", "sample", "serve", "serving", "runtime", "posthoc_ema")
UserError = runtime.UserError
SHAPES_JSON = Path("/work/shared/spec/dit_xl2_state_dict_shapes.json")
if not SHAPES_JSON.exists():
    SHAPES_JSON = REPO / "shared" / "spec" / "dit_xl2_state_dict_shapes.json"


def tiny_flow_dit(seed=0, **kw):
    """A tiny DiT predicting the velocity (learn_sigma=False) with non-zero weights everywhere."""
    cfg = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=3,
               learn_sigma=False)
    cfg.update(kw)
    m = models.DiT(**cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.eval()


class Oracle(torch.nn.Module):
    """A stand-in DiT whose output is a closed-form velocity v(x, t) (model time t * 1000), whatever the label."""

    def __init__(self, velocity, shape=(4, 4, 4)):
        super().__init__()
        self.velocity, self.times = velocity, []
        self.in_channels, self.input_size, self.num_classes = shape[0], shape[1], 3

    def forward(self, x, t, y):
        t = t.double() / flow.T_SCALE
        assert (t > 0).all(), "the velocity was asked for at t = 0"
        self.times.append(float(t[0]))
        return self.velocity(x, t.view(-1, 1, 1, 1).float())

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False):
        return self.forward(x, t, y)  # label-free: the guided velocity is the velocity


def gaussian_velocity(mu, s):
    """E[eps - x0 | x_t] for data x0 ~ N(mu, s^2) per element: -mu + (t - (1-t) s^2) / sigma_t^2 (x - (1-t) mu)."""
    def v(x, t):
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        return -mu + (t - (1 - t) * s ** 2) / var * (x - (1 - t) * mu)
    return v


# ----------------------------------------------------------------------------- the objective
def test_interpolant_limits_and_oracle_loss():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    torch.testing.assert_close(flow.interpolate(x0, eps, torch.zeros(3)), x0, rtol=0, atol=1e-7)
    torch.testing.assert_close(flow.interpolate(x0, eps, torch.ones(3)), eps, rtol=0, atol=1e-7)
    t = torch.tensor([0.0, 0.3, 1.0])
    seen = {}

    def oracle(x, tt, y):  # knows x0 and eps: outputs the true velocity; records what the network is fed
        seen.update(x=x, t=tt)
        return eps - x0
    out = flow.training_losses(oracle, x0, t, {"y": None}, noise=eps)["loss"]
    assert out.shape == (3,) and out.abs().max() < 1e-7
    torch.testing.assert_close(seen["t"], t * 1000)  # the DiT embedder's range
    torch.testing.assert_close(seen["x"][1], 0.7 * x0[1] + 0.3 * eps[1])
    # A model that predicts x0 - eps instead is off by 2 (eps - x0): loss 4 E[(eps - x0)^2] per sample.
    wrong = flow.training_losses(lambda x, tt, y: x0 - eps, x0, t, {"y": None}, noise=eps)["loss"]
    torch.testing.assert_close(wrong, 4 * ((eps - x0) ** 2).mean(dim=(1, 2, 3)))


def test_velocity_identities_against_the_gaussian_closed_form():
    """x0 = x - t v and score = -(x + (1-t) v) / t, checked where everything is known: data N(mu, s^2)."""
    mu, s = torch.tensor(0.7), torch.tensor(0.4)
    v = gaussian_velocity(mu, s)
    x = torch.linspace(-2, 2, 9).view(1, 1, 3, 3)
    for t in (0.1, 0.5, 0.9):
        tt = torch.tensor(t)
        var = (1 - tt) ** 2 * s ** 2 + tt ** 2
        score = -(x - (1 - tt) * mu) / var  # grad log N((1-t) mu, sigma_t^2)
        torch.testing.assert_close(flow.score_from_velocity(x, t, v(x, tt)), score, rtol=1e-5, atol=1e-6)
        x0 = mu + (1 - tt) * s ** 2 / var * (x - (1 - tt) * mu)  # E[x0 | x_t], Gaussian conditioning
        torch.testing.assert_close(flow.x0_from_velocity(x, t, v(x, tt)), x0, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_samplers_invert_a_one_point_oracle(sampler, cfg):
    """Data = one fixed latent: every seed must come back to it (the velocity is never asked for at t = 0)."""
    target = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(5))
    oracle = Oracle(lambda x, t: (x - target) / t)
    d = inference.make_sampler(argparse_ns(sampler=sampler, num_sampling_steps=8))
    out = inference.sample_latents(oracle, d, [0, 1, 2, 0], [3, 4, 5, 6], cfg, sampler, 0.0, "cpu")
    assert out.shape == (4, 4, 4, 4)
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-4)
    assert max(oracle.times) == 1.0 and len(oracle.times) == {"euler": 8, "heun": 15, "sde": 8}[sampler]


def argparse_ns(**kw):
    import argparse
    return argparse.Namespace(**kw)


def test_heun_is_second_order_and_euler_first_on_gaussian_data():
    """For data N(mu, s^2) the ODE maps noise z to mu + s z exactly; Heun's error falls ~4x per halving of the
    step, Euler's ~2x, and Heun beats Euler at the same number of steps."""
    g = torch.Generator().manual_seed(0)
    mu, s = torch.randn(4, 4, 4, generator=g) * 0.5, torch.rand(4, 4, 4, generator=g) * 0.5 + 0.2
    z = torch.randn(16, 4, 4, 4, generator=g)
    v = gaussian_velocity(mu, s)
    err = {(sm, n): (flow.sample(v, z, n, sm) - (mu + s * z)).abs().max().item()
           for sm in ("euler", "heun") for n in (10, 20)}
    assert err["heun", 10] < err["euler", 10] / 3 and err["heun", 20] < 0.03
    assert 1.6 < err["euler", 10] / err["euler", 20] < 2.4
    assert 3.2 < err["heun", 10] / err["heun", 20] < 4.8


def test_sde_sampler_has_the_data_marginal():
    """Euler-Maruyama of the reverse SDE (score from the velocity) ends at the data distribution N(0.5, 0.3^2):
    a wrong score or noise scale moves the mean or the spread."""
    v = gaussian_velocity(torch.tensor(0.5), torch.tensor(0.3))
    gens = [torch.Generator().manual_seed(i) for i in range(64)]
    z = torch.stack([torch.randn(4, 8, 8, generator=g) for g in gens])
    out = flow.sample(v, z, 100, "sde", gens)
    assert abs(out.mean().item() - 0.5) < 0.02 and abs(out.std().item() - 0.3) < 0.015
    ode = flow.sample(v, z, 100, "heun")
    assert (out - ode).abs().mean() > 0.05  # the noise is really injected (not the ODE in disguise)


def test_flow_samplers_batch_independent_per_image_seeds():
    m = tiny_flow_dit()
    for sampler in flow.SAMPLERS:
        d = inference.FlowSteps(4)
        all3 = inference.sample_latents(m, d, [0, 1, 2], [10, 11, 12], 4.0, sampler, 0.0, "cpu")
        split = torch.cat([inference.sample_latents(m, d, [0], [10], 4.0, sampler, 0.0, "cpu"),
                           inference.sample_latents(m, d, [1, 2], [11, 12], 4.0, sampler, 0.0, "cpu")])
        assert torch.isfinite(all3).all()
        torch.testing.assert_close(all3, split, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(inference.sample_latents(m, d, [0], [99], 4.0, sampler, 0.0, "cpu"), all3[:1])


def test_cfg_on_the_velocity():
    m = tiny_flow_dit(1)
    g = torch.Generator().manual_seed(2)
    x, y, null = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([0, 2]), torch.tensor([3, 3])
    t = 0.37
    tt = torch.full((2,), t * 1000)
    cond, uncond = m(x, tt, y), m(x, tt, null)
    assert (cond - uncond).abs().max() > 1e-3  # the label matters, so the checks below can fail
    # scale 1 through the guided [cond; uncond] batch = the conditional velocity
    guided1 = m.forward_with_cfg(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]), 1.0,
                                 guide_all_channels=True)[:2]
    torch.testing.assert_close(guided1, cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flow.guided_velocity(m, y, 1.0, null)(x, t), cond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flow.guided_velocity(m, y, 3.0, null)(x, t), uncond + 3.0 * (cond - uncond),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- network and state dict
def test_flow_dit_keeps_the_official_key_layout():
    expected = json.loads(SHAPES_JSON.read_text())
    with torch.device("meta"):
        flow_sd = models.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000, learn_sigma=False).state_dict()
        diff_sd = models.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000).state_dict()
    assert list(flow_sd) == list(diff_sd) == list(expected)
    changed = {k for k in flow_sd if list(flow_sd[k].shape) != expected[k]}
    assert changed == {"final_layer.linear.weight", "final_layer.linear.bias"}  # velocity only: 2*2*4, not 2*2*8
    assert flow_sd["final_layer.linear.weight"].shape[0] == expected["final_layer.linear.weight"][0] // 2


def test_tokens_after_a_block_do_not_change_the_output():
    m = tiny_flow_dit(3)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10.0, 900.0]), torch.tensor([1, 2])
    out, tokens = m(x, t, y, return_tokens_at=2)
    torch.testing.assert_close(out, m(x, t, y), rtol=0, atol=0)
    h = m.x_embedder(x) + m.pos_embed
    c = m.t_embedder(t) + m.y_embedder(y, False)
    for block in m.blocks[:2]:
        h = block(h, c)
    torch.testing.assert_close(tokens, h)
    assert tokens.shape == (2, 4, 32)


# ----------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny 3-class grayscale data set (16 px), a tiny VAE (x4) and a TorchScript encoder (4 px patches)."""
    from diffusers.models import AutoencoderKL
    root = tmp_path_factory.mktemp("dit_flow")
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / "data" / f"class_{k}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((16, 16)) * 80 + k * 80).astype(np.uint8)).save(
                root / "data" / f"class_{k}" / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(root / "vae")
    write_encoder(root / "enc.ts")
    return root


def write_encoder(path, tokens=True):
    """A TorchScript encoder: images in [0, 1] (N, 1, 16, 16) -> 16 tokens of dim 8 (or one vector of dim 8)."""
    import warnings

    class Encoder(torch.nn.Module):
        def __init__(self, tokens: bool):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 4, stride=4)
            self.tokens = tokens

        def forward(self, x):
            f = self.conv(x).flatten(2).transpose(1, 2)
            return f if self.tokens else f.mean(1)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of export; it loads
        torch.jit.save(torch.jit.script(Encoder(tokens)), str(path))
    return path


def train_argv(work, results, *extra):
    return ["--model", "DiT-Ti/2", "--data_root", str(work / "data"), "--results-dir", str(results),
            "--image-size", "16", "--num-classes", "3", "--global-batch-size", "4", "--num_epochs", "4",
            "--vae", str(work / "vae"), "--num-workers", "0", "--log_every_steps", "1", "--ckpt_every_steps", "100",
            "--sample_every_steps", "0", "--mixed_precision", "no", *extra]


@pytest.fixture(scope="module")
def flow_run(work):
    """12 steps of flow matching + REPA (cached latents and targets) + post-hoc EMA snapshots every 4 steps."""
    res = work / "results"
    train.main(train.parse_args(train_argv(work, res, "--objective", "flow", "--repa_encoder", str(work / "enc.ts"),
                                           "--repa_projector_dim", "64", "--cache_latents", "--lr", "1e-3",
                                           "--posthoc_ema_every_steps", "4")))
    return res / "000-DiT-Ti-2"


def test_flow_repa_checkpoint_contents(flow_run, work):
    ck = torch.load(flow_run / "checkpoints" / "0000012.pt", map_location="cpu", weights_only=True)
    cfg = ck["config"]
    assert cfg["objective"] == ck["args"]["objective"] == "flow" and cfg["learn_sigma"] is False
    assert cfg["repa"]["depth"] == 1 and cfg["repa"]["weight"] == 0.5 and cfg["repa"]["encoder_dim"] == 8
    assert cfg["repa"]["encoder"] == str((work / "enc.ts").resolve())
    # The projector: under its own key (in the one AdamW as a second group), never inside model / ema.
    assert set(ck["repa_projector"]) == {f"{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert ck["repa_projector"]["0.weight"].shape == (64, 192) and ck["repa_projector"]["4.weight"].shape == (8, 64)
    assert len(ck["opt"]["param_groups"]) == 2 and len(ck["opt"]["param_groups"][1]["params"]) == 6
    with torch.device("meta"):
        ref = models.ALL_MODELS["DiT-Ti/2"](input_size=4, num_classes=3, learn_sigma=False).state_dict()
    for key in ("model", "ema"):
        assert list(ck[key]) == list(ref) and all(ck[key][k].shape == ref[k].shape for k in ref)
    assert sorted(p.name for p in (flow_run / "posthoc_ema").iterdir()) == [
        "phema_0000004.pt", "phema_0000008.pt", "phema_0000012.pt"]


def test_repa_alignment_term_falls_and_cached_targets_match_the_encoder(flow_run, work):
    log = (flow_run / "log.txt").read_text()
    cos = [float(v) for v in re.findall(r"repa -cos: (-?[\d.]+)", log)]
    assert len(cos) == 12
    assert np.mean(cos[-3:]) < np.mean(cos[:3]) - 0.2  # the projected tokens turn towards the encoder's
    assert "Computing the REPA targets of 12 images" in log
    cache = next((work / "results" / "latent_cache").glob("repa-*.pt"))
    feats = torch.load(cache, map_location="cpu", weights_only=True)["feat"]
    assert feats.shape == (12, 2, 4, 8) and feats.dtype == torch.float16
    encoder = repa.load_encoder(str(work / "enc.ts"), "cpu")
    ds = train.ImageFolderDataset(work / "data", 16, 1)
    x = torch.stack([ds.load(i) for i in range(3)])
    # The encoder's 4x4 tokens pooled to the DiT's 2x2 grid, unit length: the cache holds them (fp16).
    ref = torch.nn.functional.avg_pool2d(encoder((x + 1) / 2).transpose(1, 2).reshape(3, 8, 4, 4), 2)
    ref = torch.nn.functional.normalize(ref.flatten(2).transpose(1, 2), dim=-1)
    torch.testing.assert_close(feats[:3, 0].float(), ref, rtol=0, atol=2e-3)
    ref_flip = repa.targets(encoder, x.flip(-1), 2)
    torch.testing.assert_close(feats[:3, 1].float(), ref_flip, rtol=0, atol=2e-3)


def test_flow_checkpoint_sampling_defaults_and_sampler_mismatch(flow_run, tmp_path):
    ckpt = flow_run / "checkpoints" / "0000012.pt"
    base = ["--ckpt", str(ckpt), "--output-dir", str(tmp_path / "s"), "--num-samples", "2", "--mixed-precision", "no"]
    sample.main(sample.parse_args(base + ["--num-sampling-steps", "3"]))
    (folder,) = (tmp_path / "s").iterdir()
    assert folder.name.endswith("-cfg-4-heun3-seed-0")  # the flow checkpoint's default sampler
    assert len(list(folder.rglob("*_seed*.png"))) == 2
    args = sample.parse_args(base)
    assert args.sampler is None and args.num_sampling_steps is None  # filled in from the checkpoint
    inference.resolve_sampler(args, "flow")
    assert (args.sampler, args.num_sampling_steps) == ("heun", 50)
    with pytest.raises(UserError, match=r"--sampler ddim: .* flow objective; its samplers are heun \| euler \| sde"):
        sample.main(sample.parse_args(base + ["--sampler", "ddim"]))
    # A checkpoint written before --objective existed is a diffusion one: flow samplers are refused.
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    del old["config"]["objective"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"--sampler heun: .* diffusion objective; its samplers are ddpm \| ddim"):
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "old.pt"), "--sampler", "heun"]))
    with pytest.raises(UserError, match="an interpolation is sampled deterministically .*heun or euler.*--sampler sde"):
        sample.parse_args(base + ["--interpolate_seeds", "0", "1", "--sampler", "sde"])


def test_posthoc_ema_rebuild_of_a_flow_run_samples(flow_run, tmp_path, capsys):
    ckpt = flow_run / "checkpoints" / "0000012.pt"
    out = tmp_path / "phema.pt"
    posthoc_ema.main(["--snapshots", str(flow_run / "posthoc_ema"), "--sigma_rel", "0.08", "--checkpoint", str(ckpt),
                      "--out", str(out)])
    rebuilt, orig = (torch.load(p, map_location="cpu", weights_only=True) for p in (out, ckpt))
    assert rebuilt["config"]["objective"] == "flow" and rebuilt.keys() >= {"repa_projector", "model", "ema"}
    assert not torch.allclose(rebuilt["ema"]["final_layer.linear.weight"], orig["ema"]["final_layer.linear.weight"])
    sample.main(sample.parse_args(["--ckpt", str(out), "--output-dir", str(tmp_path / "s"), "--num-samples", "1",
                                   "--sampler", "euler", "--num-sampling-steps", "2", "--mixed-precision", "no"]))
    assert len(list((tmp_path / "s").rglob("*_seed0.png"))) == 1


def test_repa_one_vector_encoder_and_loss():
    g = torch.Generator().manual_seed(0)
    proj, tgt = torch.randn(2, 4, 8, generator=g), torch.randn(2, 8, generator=g)
    ref = -torch.nn.functional.cosine_similarity(proj.mean(1), tgt, dim=-1).mean()
    torch.testing.assert_close(repa.loss(proj, tgt), ref)
    tokens = torch.randn(2, 4, 8, generator=g)
    torch.testing.assert_close(repa.loss(tokens, tokens), torch.tensor(-1.0))
    torch.testing.assert_close(repa.loss(tokens, -tokens), torch.tensor(1.0))
    # A class token in front of a 2x2 grid is dropped; a non-square token count is refused up front.
    cls_grid = torch.randn(1, 5, 8, generator=g)
    torch.testing.assert_close(repa.to_grid(cls_grid, 2), torch.nn.functional.normalize(cls_grid[:, 1:], dim=-1))


def test_repa_bad_encoders_are_one_line(work, tmp_path):
    args = train.parse_args(train_argv(work, tmp_path / "res", "--repa_encoder", str(tmp_path / "missing.ts")))
    with pytest.raises(UserError, match=r"--repa_encoder .*missing.ts: no such file, and not a torch.hub id") as e:
        train.main(args)
    assert "\n" not in str(e.value)
    (tmp_path / "junk.ts").write_text("not a TorchScript file")
    with pytest.raises(UserError, match="junk.ts: not a TorchScript file") as e:
        repa.load_encoder(str(tmp_path / "junk.ts"), "cpu")
    assert "\n" not in str(e.value)
    vec = write_encoder(tmp_path / "vec.ts", tokens=False)
    assert repa.probe(repa.load_encoder(str(vec), "cpu"), 1, 16, "cpu", "vec") == (8, None)
    with pytest.raises(UserError, match="--repa-depth needs --repa-encoder"):
        train.main(train.parse_args(train_argv(work, tmp_path / "res", "--repa_depth", "2")))
    assert not (tmp_path / "res").exists()
    # A torch.hub id with no network (and an empty hub cache): exit 2, one `error:` line, no traceback.
    proc = run_script("dit", ["train.py", *train_argv(work, tmp_path / "hub", "--repa_encoder",
                                                      "facebookresearch/dinov2:dinov2_vits14")],
                      check=False, env=script_env(TORCH_HOME=tmp_path / "torch_home", HTTPS_PROXY="http://127.0.0.1:9",
                                                  HTTP_PROXY="http://127.0.0.1:9", NO_PROXY=""))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --repa_encoder facebookresearch/dinov2:dinov2_vits14: cannot load it from "
                           "torch.hub") and last.endswith("pass a TorchScript file of the encoder instead")
    assert not (tmp_path / "hub").exists()


def test_resume_refuses_a_conflicting_objective(flow_run, work, tmp_path):
    ckpt = flow_run / "checkpoints" / "0000012.pt"
    with pytest.raises(UserError, match=r"was trained with --objective flow, not diffusion: leave --objective out"):
        train.main(train.parse_args(train_argv(work, tmp_path, "--resume", str(ckpt), "--objective", "diffusion")))
    with pytest.raises(UserError, match=r"trained with --posthoc-ema-every-steps 4, not 2"):
        train.main(train.parse_args(train_argv(work, tmp_path, "--resume", str(ckpt), "--posthoc_ema_every_steps",
                                               "2")))


def test_serve_backend_offers_the_flow_samplers_and_gives_the_cli_images(flow_run, tmp_path):
    ckpt = flow_run / "checkpoints" / "0000012.pt"
    opts = argparse_ns(vae=None, trust_checkpoint=False, cfg_channels="auto", guide_all_channels=False,
                              batch_size=2)
    backend = serve.DiTBackend(str(ckpt), opts, torch.device("cpu"), "no")
    info = backend.info()
    assert info["samplers"] == ["euler", "heun", "sde"] and info["default_sampler"] == "heun"
    backend.cached_info = info  # an interpolation request records the sampler it is drawn with (the flow ODE)
    limits = argparse_ns(max_steps=1000, max_images=8, max_frames=16)
    req = serving.validate("interpolate", {"mode": "seeds", "frames": 2}, None, {"m": backend}, limits)
    assert req.sampler == "heun"
    req = serving.Req(guidance=2.0, sampler="sde", steps=3, class_index=1, seed=4, num_images=2)
    tag, outputs = backend.generate(req)
    assert tag.endswith("-cfg-2-sde3-seed-4")
    sample.main(sample.parse_args(["--ckpt", str(ckpt), "--output-dir", str(tmp_path), "--class-labels", "1",
                                   "--seed", "4", "--num-samples", "2", "--cfg-scale", "2", "--sampler", "sde",
                                   "--num-sampling-steps", "3", "--batch-size", "2", "--mixed-precision", "no"]))
    for out in outputs:
        cli = np.asarray(Image.open(tmp_path / tag / out.name), dtype=int)
        assert np.abs(cli - np.asarray(out.image, dtype=int)).max() <= 1
    anim_tag, anim = backend.interpolate(serving.Req(guidance=1.0, steps=2, class_index=0, seed=0, seed_b=1,
                                                     mode="seeds", frames=3))
    assert "heun2" in anim.stem and len(anim.frames) == 3
