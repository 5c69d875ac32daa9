"""Tests of dit/: model layout vs the official checkpoints, the diffusion, training (2 processes,
exact resume, cached latents, NaN stop), sampling and bad input. Tiny configs, CPU, no downloads.

    OMP_NUM_THREADS=1 python -m pytest tests/test_dit.py -q
"""
import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import (REPO, assert_same_updates, free_port, install_fault_hooks, load_folder, run_script,
                          sgd_updates)

models, diffusion_pkg, gd, dataset, train, inference, utils, sample, sample_ddp, runtime = load_folder(
    "dit", "models", "diffusion", "diffusion.gaussian_diffusion", "dataset", "train", "inference",
    "utils", "sample", "sample_ddp", "runtime")
install_fault_hooks(runtime)  # DIFFUSION_FAULT_*_AT_STEP for in-process runs (tests/faults/fault_hooks.py)
create_diffusion = diffusion_pkg.create_diffusion
UserError = runtime.UserError
assert utils.UserError is UserError  # dataset.py raises it through utils
SHAPES_JSON = Path("/work/shared/spec/dit_xl2_state_dict_shapes.json")
if not SHAPES_JSON.exists():
    SHAPES_JSON = REPO / "shared" / "spec" / "dit_xl2_state_dict_shapes.json"


def tiny_dit(**kw):
    cfg = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
               num_classes=3)
    cfg.update(kw)
    return models.DiT(**cfg)


def randomise(model, seed=0):
    """Non-zero weights everywhere (the adaLN-Zero init makes outputs 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("name", list(models.ALL_MODELS))
def test_registry_shapes_on_meta(name):
    with torch.device("meta"):
        m = models.ALL_MODELS[name](input_size=32, num_classes=1000)
        out = m(torch.zeros(2, 4, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 32, 32)
    cfg = models.model_config(name)
    assert m.x_embedder.proj.weight.shape == (cfg["hidden_size"], 4, cfg["patch_size"], cfg["patch_size"])
    assert len(m.blocks) == cfg["depth"]
    paper = {"DiT-XL/2": 675, "DiT-L/2": 458, "DiT-B/2": 130, "DiT-S/2": 33}
    if name in paper:
        assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - paper[name]) < 1


def test_official_names_in_registry():
    assert set(models.DiT_models) == {f"DiT-{s}/{p}" for s in "XL L B S".split() for p in (2, 4, 8)}


def test_state_dict_layout_matches_official_xl2():
    expected = json.loads(SHAPES_JSON.read_text())
    with torch.device("meta"):
        sd = models.DiT_models["DiT-XL/2"](input_size=32, num_classes=1000).state_dict()
    assert len(sd) == len(expected) == 292
    assert list(sd) == list(expected)
    assert {k: list(v.shape) for k, v in sd.items()} == expected


def test_adaln_zero_initial_output_is_zero_and_pos_embed_fixed():
    torch.manual_seed(0)
    m = tiny_dit()
    out = m(torch.randn(3, 4, 4, 4), torch.tensor([0, 10, 999]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 8, 4, 4) and torch.count_nonzero(out) == 0
    for b in m.blocks:
        assert torch.count_nonzero(b.adaLN_modulation[-1].weight) == 0
    assert not m.pos_embed.requires_grad
    # Closed form of the 2-D table: first half encodes the column, second half the row; sin then cos.
    d, grid = 32, 2
    omega = 1.0 / 10000 ** (np.arange(d // 4) / (d / 4))
    for tok in range(grid * grid):
        row, col = divmod(tok, grid)
        ref = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
        np.testing.assert_allclose(m.pos_embed[0, tok].numpy(), ref, atol=1e-6)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 500.0])
    emb = models.TimestepEmbedder.timestep_embedding(t, 8)
    freqs = np.exp(-math.log(10000) * np.arange(4) / 4)
    ref = np.concatenate([np.cos(t.numpy()[:, None] * freqs), np.sin(t.numpy()[:, None] * freqs)], 1)
    np.testing.assert_allclose(emb.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_label_dropout_uses_null_class():
    emb = models.LabelEmbedder(5, 4, 0.1)
    assert emb.embedding_table.weight.shape[0] == 6
    out = emb(torch.tensor([1, 2]), train=False, force_drop_ids=torch.tensor([1, 0]))
    assert torch.equal(out[0], emb.embedding_table.weight[5]) and torch.equal(out[1], emb.embedding_table.weight[2])


@pytest.mark.parametrize("guide_all", [False, True])
def test_forward_with_cfg_guides_official_channels(guide_all):
    torch.manual_seed(0)
    m = randomise(tiny_dit()).eval()
    x = torch.randn(2, 4, 4, 4)
    x = torch.cat([x, x])
    t = torch.tensor([5, 7, 5, 7])
    y = torch.tensor([0, 2, 3, 3])
    out = m.forward_with_cfg(x, t, y, 4.0, guide_all_channels=guide_all)
    raw = m(x, t, y)
    k = 4 if guide_all else 3
    guided = raw[2:, :k] + 4.0 * (raw[:2, :k] - raw[2:, :k])
    torch.testing.assert_close(out[:2, :k], guided)
    torch.testing.assert_close(out[2:, :k], guided)
    torch.testing.assert_close(out[:, k:], raw[:, k:])  # the rest (and the variance) unguided
    # Channel 3 under the CFG formula differs from its raw output, so the checks above tell a guided
    # channel 3 from an unguided one: guide_all=False must leave it raw, guide_all=True must guide it.
    cfg3 = raw[2:, 3] + 4.0 * (raw[:2, 3] - raw[2:, 3])
    assert (cfg3 - raw[:2, 3]).abs().max() > 1e-2
    assert torch.allclose(out[:2, 3], cfg3) == guide_all
    assert torch.allclose(out[:2, 3], raw[:2, 3]) != guide_all


# ----------------------------------------------------------------------------- diffusion
def test_linear_schedule_values():
    d = create_diffusion("")
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod[-1], np.prod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-10)
    assert abs(d.alphas_cumprod[-1] - 4.0358e-5) < 1e-8
    b = d.betas
    ac = np.cumprod(1 - b)
    acp = np.append(1.0, ac[:-1])
    np.testing.assert_allclose(d.posterior_variance, b * (1 - acp) / (1 - ac), rtol=1e-12)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_respacing():
    s250 = diffusion_pkg.space_timesteps(1000, "250")
    assert len(s250) == 250 and min(s250) == 0 and max(s250) == 999
    assert diffusion_pkg.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert diffusion_pkg.space_timesteps(100, "10,5") == {0, 5, 11, 16, 22, 27, 33, 38, 44, 49, 50, 62, 74, 87, 99}  # round(24.5) == 24
    base, sp = create_diffusion(""), create_diffusion("25")
    assert sp.num_timesteps == 25 and sp.timestep_map == sorted(sp.use_timesteps)
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[sp.timestep_map], rtol=1e-12)
    seen = []

    def model(x, t, y=None):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    sp.p_mean_variance(model, torch.zeros(2, 4, 2, 2), torch.tensor([0, 24]), model_kwargs={"y": None})
    assert seen[0].tolist() == [sp.timestep_map[0], sp.timestep_map[24]] == [0, 999]


def test_respaced_p_mean_variance_learned_range():
    d = create_diffusion("10")
    x = torch.randn(2, 4, 2, 2)
    t = torch.tensor([3, 9])
    eps = torch.randn(2, 4, 2, 2)
    for v, key in ((-1.0, "posterior_log_variance_clipped"), (1.0, "betas")):
        out = d.p_mean_variance(lambda x_, t_, **k: torch.cat([eps, torch.full_like(eps, v)], 1), x, t,
                                clip_denoised=False)
        ref = getattr(d, key)[t.numpy()]
        ref = ref if key != "betas" else np.log(ref)
        np.testing.assert_allclose(out["log_variance"][:, 0, 0, 0].numpy(), ref, rtol=1e-5)
        ac = d.alphas_cumprod[t.numpy()][:, None, None, None]
        x0 = np.sqrt(1 / ac) * x.numpy() - np.sqrt(1 / ac - 1) * eps.numpy()
        np.testing.assert_allclose(out["pred_xstart"].numpy(), x0, rtol=1e-4, atol=1e-5)
        c1 = d.posterior_mean_coef1[t.numpy()][:, None, None, None]
        c2 = d.posterior_mean_coef2[t.numpy()][:, None, None, None]
        np.testing.assert_allclose(out["mean"].numpy(), c1 * x0 + c2 * x.numpy(), rtol=1e-4, atol=1e-5)


def test_training_losses_hybrid_and_tiny_overfit():
    torch.manual_seed(0)
    d = create_diffusion("")
    m = tiny_dit(class_dropout_prob=0.0)
    x0 = torch.randn(2, 4, 4, 4).clamp(-1, 1)
    terms = d.training_losses(m, x0, torch.tensor([0, 500]), {"y": torch.tensor([0, 1])})
    assert set(terms) == {"loss", "mse", "vb"}
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # mse with a zero-output model is the mean squared noise; it must fall when overfitting.
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    data, labels, losses = x0.repeat(16, 1, 1, 1), torch.tensor([0, 1]).repeat(16), []
    for _ in range(60):
        t = torch.randint(0, 1000, (32,))
        loss = d.training_losses(m, data, t, {"y": labels})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])


def test_bf16_loss_matches_fp32():
    d = create_diffusion("")
    m = randomise(tiny_dit(class_dropout_prob=0.0), 2)
    x0, t, y = torch.randn(4, 4, 4, 4), torch.tensor([1, 100, 500, 999]), torch.tensor([0, 1, 2, 0])
    noise = torch.randn_like(x0)
    ref = d.training_losses(m, x0, t, {"y": y}, noise=noise)["loss"]
    with runtime.autocast("bf16", torch.device("cpu")):
        low = d.training_losses(m, x0, t, {"y": y}, noise=noise)["loss"]
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, rtol=5e-2, atol=2e-2)


def test_samplers_finite_shapes_and_batch_independent_seeds():
    torch.manual_seed(0)
    m = randomise(tiny_dit(), 1).eval()
    m.final_layer.linear.weight.data *= 0.01
    d = create_diffusion("5")
    for sampler in ("ddpm", "ddim"):
        all3 = inference.sample_latents(m, d, [0, 1, 2], [10, 11, 12], 4.0, sampler, 0.0, "cpu")
        assert all3.shape == (3, 4, 4, 4) and torch.isfinite(all3).all()
        split = torch.cat([inference.sample_latents(m, d, [0], [10], 4.0, sampler, 0.0, "cpu"),
                           inference.sample_latents(m, d, [1, 2], [11, 12], 4.0, sampler, 0.0, "cpu")])
        torch.testing.assert_close(all3, split, atol=1e-5, rtol=1e-5)
        other = inference.sample_latents(m, d, [0], [99], 4.0, sampler, 0.0, "cpu")
        assert not torch.allclose(other, all3[:1])


# ----------------------------------------------------------------------------- training fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny 3-class grayscale data set (16 px, incl. a 16-bit and an RGBA PNG) and a tiny VAE (x4)."""
    from diffusers.models import AutoencoderKL
    root = tmp_path_factory.mktemp("dit")
    rng = np.random.default_rng(0)
    data = root / "data"
    for k in range(3):
        (data / f"class_{k}").mkdir(parents=True)
        for i in range(6):
            arr = (rng.random((16, 16)) * 80 + k * 80).astype(np.uint8)
            Image.fromarray(arr).save(data / f"class_{k}" / f"{i}.png")
    Image.fromarray((rng.random((20, 24)) * 65535).astype(np.uint16)).save(data / "class_0" / "wide16.png")
    Image.fromarray((rng.random((16, 16, 4)) * 255).astype(np.uint8), "RGBA").save(data / "class_1" / "rgba.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(root / "vae")
    write_encoder(root / "enc.ts")
    return root


def write_encoder(path, channels=1, dim=8, patch=4):
    """A tiny TorchScript REPA encoder: images in [0, 1] (N, C, S, S) -> patch tokens (N, (S / patch)^2, dim)."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(channels, dim, patch, stride=patch)
    enc = torch.nn.Sequential(conv, torch.nn.Flatten(2))  # (N, dim, T): transposed by the wrapper below

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = enc

        def forward(self, x):
            return self.net(x).transpose(1, 2)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of export, but loads
        torch.jit.save(torch.jit.script(Tokens()), str(path))
    return path


def train_argv(work, results, *extra):
    return ["--model", "DiT-Ti/2", "--data_root", str(work / "data"), "--results-dir", str(results),
            "--image-size", "16", "--num-classes", "3", "--global-batch-size", "4",
            "--num_epochs", "2", "--vae", str(work / "vae"), "--num-workers", "0",
            "--log_every_steps", "1", "--ckpt_every_steps", "2", "--sample_every_steps", "0", *extra]


def train_args(work, results, *extra):
    return train.parse_args(train_argv(work, results, *extra))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b):
    for key in ("model", "ema", "repa_projector"):
        assert (key in a) == (key in b)
        if key not in a:
            continue
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            assert torch.equal(a[key][n], b[key][n]), f"{key}.{n} differs"
    assert ("posthoc_ema" in a) == ("posthoc_ema" in b)
    for avg_a, avg_b in zip(*(x.get("posthoc_ema", {"averages": []})["averages"] for x in (a, b))):
        for n in avg_a["ema"]:
            assert torch.equal(avg_a["ema"][n], avg_b["ema"][n]), f"posthoc_ema {n} differs"
    for sa, sb in zip(a["opt"]["state"].values(), b["opt"]["state"].values()):
        for n in sa:
            assert torch.equal(sa[n], sb[n])
    assert a["step"] == b["step"]


def test_flag_vocabulary_and_old_aliases(work, tmp_path):
    """The repository's flag names, the spec's / old DiT names and both spellings give the same settings."""
    new = train.parse_args(["--data_root", "d", "--num_epochs", "3", "--learning_rate", "0.5", "--seed", "7",
                            "--log_every_steps", "2", "--ckpt_every_steps", "4", "--sample_every_steps", "6",
                            "--no_random_flip", "--resume"])
    for old in (["--data-path", "d", "--epochs", "3", "--lr", "0.5", "--global-seed", "7", "--log-every", "2",
                 "--ckpt-every", "4", "--grid-every", "6", "--no-flip", "--resume", "auto"],
                ["--dataset_path", "d", "--num-epochs", "3", "--learning-rate", "0.5", "--global_seed", "7",
                 "--log-every-steps", "2", "--ckpt_every", "4", "--sample-every-steps", "6", "--no_hflip",
                 "--resume=auto"]):
        assert vars(train.parse_args(old)) == vars(new)
    assert new.resume == "auto" and new.random_flip is False and new.data_root == "d"
    default = train.parse_args(["--data-path", "d"])
    assert default.random_flip is True and default.resume is None and default.num_epochs == 1400
    assert train.parse_args(["--data-path", "d", "--random_flip"]).random_flip is True
    assert sample_ddp.parse_args(["--global-seed", "5"]).seed == 5 == sample_ddp.parse_args(["--seed", "5"]).seed


def test_ema_is_the_official_dit_rule():
    """runtime.EMA(start=0): a copy at step 0, then ema = d * ema + (1 - d) * w from the first step on.

    Against the official update (mul_ then add_): equal up to fp32 rounding (lerp rounds differently)."""
    torch.manual_seed(0)
    m = tiny_dit()
    ema = runtime.EMA(m, 0.9, start=0)
    ref = {k: v.clone().double() for k, v in m.state_dict().items()}
    assert all(torch.equal(ema.model.state_dict()[k], v) for k, v in m.state_dict().items())
    official = {k: v.clone() for k, v in m.state_dict().items()}
    for step in range(1, 6):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
        ema.update(m, step)
        for k, w in m.state_dict().items():
            ref[k] = 0.9 * ref[k] + 0.1 * w.double()
            official[k].mul_(0.9).add_(w, alpha=0.1)
            torch.testing.assert_close(ema.model.state_dict()[k].double(), ref[k], rtol=0, atol=1e-5)
            torch.testing.assert_close(ema.model.state_dict()[k], official[k], rtol=0, atol=1e-5)
    assert not torch.allclose(ema.model.state_dict()["y_embedder.embedding_table.weight"],
                              m.state_dict()["y_embedder.embedding_table.weight"])  # decayed, not copied


def test_sigterm_and_time_limit_checkpoint_and_return(work, tmp_path, monkeypatch):
    """SIGTERM during step 3 (the harness's hook) or the --max_minutes limit: checkpoint that step, exit 0."""
    monkeypatch.setenv("DIFFUSION_FAULT_SIGTERM_AT_STEP", "3")
    train.main(train_args(work, tmp_path / "a", "--ckpt_every_steps", "100"))
    run = tmp_path / "a" / "000-DiT-Ti-2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000003.pt"]
    assert load(run / "checkpoints" / "0000003.pt")["step"] == 3
    assert "SIGTERM: saved step 3" in (run / "log.txt").read_text()
    monkeypatch.delenv("DIFFUSION_FAULT_SIGTERM_AT_STEP")
    train.main(train_args(work, tmp_path / "b", "--ckpt_every_steps", "100", "--max_minutes", "1e-6"))
    run = tmp_path / "b" / "000-DiT-Ti-2"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0000001.pt"]
    assert "time limit: saved step 1" in (run / "log.txt").read_text()


def test_dataset_conversions(work):
    ds = dataset.ImageFolderDataset(work / "data", 16, 1)
    assert ds.classes == ["class_0", "class_1", "class_2"] and len(ds) == 20
    for i in range(len(ds)):
        x, _ = ds[(i, False)]
        assert x.shape == (1, 16, 16) and x.min() >= -1 and x.max() <= 1
    i16 = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("wide16.png")][0]
    raw = np.asarray(Image.open(ds.samples[i16][0]), dtype=np.float64) / 65535.0
    x, _ = ds[(i16, False)]
    assert abs(x.mean().item() - (raw[:, 4:20].mean() * 2 - 1)) < 0.05  # scaled from 16 bit, not clipped
    xf, _ = ds[(i16, True)]
    assert torch.equal(xf, x.flip(-1))


# flow + REPA + post-hoc EMA: a resumed run given none of those flags keeps them (stored in the checkpoint).
NEW_OPTIONS = ["--objective", "flow", "--repa_encoder", "{work}/enc.ts", "--posthoc_ema_every_steps", "2"]


@pytest.mark.parametrize("options", [[], NEW_OPTIONS], ids=["diffusion", "flow-repa-posthoc-ema"])
def test_train_resume_is_bit_identical_and_writes_plain_checkpoints(work, tmp_path, options):
    full, part = tmp_path / "full", tmp_path / "part"
    options = [o.format(work=work) for o in options]
    train.main(train_args(work, full, *options))  # 20 images / batch 4 = 5 steps per epoch, 2 epochs
    run = full / "000-DiT-Ti-2"
    assert sorted(p.name for p in (run / "checkpoints").glob("*.pt")) == [
        "0000002.pt", "0000004.pt", "0000006.pt", "0000008.pt", "0000010.pt"]
    assert (run / "log.txt").exists() and any((run / "tensorboard").iterdir())
    ck = load(run / "checkpoints" / "0000010.pt")
    assert ck["model_type"] == "dit" and isinstance(ck["args"], dict) and ck["step"] == 10
    assert ck["class_names"] == ["class_0", "class_1", "class_2"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    # Stop mid-epoch (step 4 of 5 in epoch 0 -> 3 after a --max-train-steps 3 run), resume to the end.
    train.main(train_args(work, part, "--max-train-steps", "3", *options))
    train.main(train_args(work, part, "--resume", "auto"))
    prun = part / "000-DiT-Ti-2"
    assert not (part / "001-DiT-Ti-2").exists()
    assert "Resumed from" in (prun / "log.txt").read_text()
    resumed = load(prun / "checkpoints" / "0000010.pt")
    assert_same_state(ck, resumed)
    assert ck["config"].get("objective", "diffusion") == resumed["config"]["objective"] == (
        "flow" if options else "diffusion")
    snapshots = sorted(p.name for p in (run / "posthoc_ema").glob("*.pt")) if options else []
    assert snapshots == (["phema_0000002.pt", "phema_0000004.pt", "phema_0000006.pt", "phema_0000008.pt",
                          "phema_0000010.pt"] if options else [])
    for name in snapshots:  # the snapshots written after the resume are those of the uninterrupted run
        a, b = load(run / "posthoc_ema" / name), load(prun / "posthoc_ema" / name)
        for avg_a, avg_b in zip(a["averages"], b["averages"]):
            assert all(torch.equal(avg_a["ema"][n], avg_b["ema"][n]) for n in avg_a["ema"])
    if options:  # the projector lives under its own key; model / ema keep the official layout (velocity only)
        assert ck["model"].keys() == ck["ema"].keys() == load_diffusion_keys(work, tmp_path)
        assert not any(k.startswith(("projector", "dit.")) for k in ck["model"])
        assert ck["repa_projector"]["4.weight"].shape == (8, ck["config"]["repa"]["projector_dim"])
        assert ck["model"]["final_layer.linear.weight"].shape[0] == 2 * 2 * 4  # p * p * C, no variance channels


def load_diffusion_keys(work, tmp_path):
    """The state-dict keys of the same DiT trained with the default objective (built, not trained)."""
    args = train_args(work, tmp_path / "unused")
    train.resolve_stored_options(args, None, None)
    model = train.build_model(args, 4, {"latent_channels": 4}, torch.device("cpu"))[0]
    return model.state_dict().keys()


def test_compile_trains_like_eager(work, tmp_path):
    """--compile (inductor) computes the eager gradients and writes the same plain, unprefixed checkpoint.

    Compared with SGD in place of AdamW, as in tests/test_ddpm.py (see repo_helpers.assert_same_updates).
    """
    # No label dropout: torch.rand inside a compiled graph draws from inductor's own generator.
    # fp32 on every CPU: the default `auto` picks bf16 where the CPU has it, fp32 elsewhere.
    flags = ["--max-train-steps", "4", "--class-dropout-prob", "0", "--lr", "0.05", "--mixed_precision", "no"]
    rec = {}
    # The control: the same start and data with twice the step size must be caught.
    for name, extra in (("eager", []), ("compiled", ["--compile"]), ("other_lr", ["--lr", "0.1"])):
        rec[name] = sgd_updates("dit", ["train.py"] + train_argv(work, tmp_path / name, *flags, *extra),
                                tmp_path / f"{name}.pt")
    a = load(tmp_path / "eager" / "000-DiT-Ti-2" / "checkpoints" / "0000004.pt")
    b = load(tmp_path / "compiled" / "000-DiT-Ti-2" / "checkpoints" / "0000004.pt")
    assert b["step"] == a["step"] == 4
    assert a["model"].keys() == b["model"].keys() and a["ema"].keys() == b["ema"].keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in b["model"])
    print("worst relative update difference, compiled vs eager:", assert_same_updates(rec["eager"], rec["compiled"]))
    with pytest.raises(AssertionError, match="the update differs"):
        assert_same_updates(rec["eager"], rec["other_lr"])


def test_nan_loss_stops_before_optimizer_step(work, tmp_path, monkeypatch, capsys):
    train.main(train_args(work, tmp_path, "--max-train-steps", "2"))
    ckpt = tmp_path / "000-DiT-Ti-2" / "checkpoints" / "0000002.pt"
    before = ckpt.read_bytes()
    monkeypatch.setenv("DIFFUSION_FAULT_NAN_AT_STEP", "4")  # the harness's hook (installed above)
    with pytest.raises(SystemExit) as e:
        runtime.run_main(train.main, train_args(work, tmp_path, "--resume", "auto", "--ckpt-every", "1"))
    assert e.value.code == 1
    assert "error: loss is nan at step 4" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    names = sorted(p.name for p in ckpt.parent.glob("*.pt"))
    assert names == ["0000002.pt", "0000003.pt"]


def test_cached_latents_same_loss_and_invalidation(work, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    args = train_args(work, tmp_path / "res", "--cache-latents")
    args.data_root = str(data)
    vae, info = utils.load_vae(args.vae, torch.device("cpu"))
    ds = dataset.ImageFolderDataset(data, 16, 1)
    log = runtime.get_logger(None, 0, "dit")
    cache = train.build_latent_cache(ds, vae, info, args, 0, 1, torch.device("cpu"), log)
    cached_ds = dataset.CachedLatentDataset(cache, [lab for _, lab in ds.samples])
    d = create_diffusion("")
    torch.manual_seed(0)
    m = randomise(models.ALL_MODELS["DiT-Ti/2"](input_size=4, num_classes=3), 3)
    items = [(0, False), (5, True), (13, True), (19, False)]
    sf, sh = info["scaling_factor"], info["shift_factor"]
    losses = []
    for cached in (False, True):
        src = cached_ds if cached else ds
        batch = torch.utils.data.default_collate([src[it] for it in items])
        torch.manual_seed(123)
        z, y = train.make_latents(batch, vae, sf, sh, cached, torch.device("cpu"), "no")
        t = torch.randint(0, 1000, (4,))
        losses.append(d.training_losses(m, z, t, {"y": y})["loss"])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-5)
    assert "Encoding" in capsys.readouterr().out
    train.build_latent_cache(ds, vae, info, args, 0, 1, torch.device("cpu"), log)
    assert "Reusing cached latents" in capsys.readouterr().out
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data / "class_2" / "0.png")  # a file changes
    cache2 = train.build_latent_cache(ds, vae, info, args, 0, 1, torch.device("cpu"), log)
    assert "stale" in capsys.readouterr().out
    idx = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("class_2/0.png")][0]
    assert not torch.allclose(cache2["mean"][idx], cache["mean"][idx])
    # End to end: a run with --cache-latents trains.
    train.main(args)
    assert (tmp_path / "res" / "000-DiT-Ti-2" / "checkpoints" / "0000010.pt").exists()


def test_torchrun_two_processes_and_resume(work, tmp_path):
    # The spec's / the old flag names (aliases of --data_root, --num_epochs, --*_every_steps).
    common = ["--model", "DiT-Ti/2", "--data-path", str(work / "data"), "--image-size", "16",
              "--num-classes", "3", "--global-batch-size", "4", "--epochs", "1", "--vae", str(work / "vae"),
              "--num-workers", "0", "--log-every", "1", "--ckpt-every", "2", "--grid-every", "0"]
    a = run_script("dit", ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                           "train.py", "--results-dir", str(tmp_path / "a"), *common])
    assert "World size 2" in a.stdout and "8 per process" not in a.stdout and "2 per process" in a.stdout
    run = tmp_path / "a" / "000-DiT-Ti-2" / "checkpoints"
    assert sorted(p.name for p in run.glob("*.pt")) == ["0000002.pt", "0000004.pt", "0000005.pt"]
    b_run = tmp_path / "b" / "000-DiT-Ti-2" / "checkpoints"
    b_run.mkdir(parents=True)
    shutil.copy(run / "0000002.pt", b_run / "0000002.pt")
    run_script("dit", ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()),
                       "train.py", "--results-dir", str(tmp_path / "b"), "--resume", "auto", *common])
    assert_same_state(load(run / "0000005.pt"), load(b_run / "0000005.pt"))


# ----------------------------------------------------------------------------- sampling + bad input
@pytest.fixture(scope="module")
def tiny_ckpt(work, tmp_path_factory):
    res = tmp_path_factory.mktemp("ckpt")
    train.main(train_args(work, res, "--max-train-steps", "1"))
    return res / "000-DiT-Ti-2" / "checkpoints" / "0000001.pt"


def sample_args(ckpt, out, *extra):
    return sample.parse_args(["--ckpt", str(ckpt), "--output-dir", str(out), "--num-sampling-steps", "3",
                              "--num-samples", "5", "--batch-size", "2", *extra])


def test_sample_writes_per_class_pngs_and_grids(tiny_ckpt, tmp_path):
    sample.main(sample_args(tiny_ckpt, tmp_path, "--sampler", "ddim"))
    (folder,) = tmp_path.iterdir()
    assert "cfg-4" in folder.name and "ddim3" in folder.name and "seed-0" in folder.name
    pngs = sorted(folder.rglob("*_seed*.png"))
    assert [p.name for p in pngs] == ["class_0_seed0.png", "class_0_seed3.png", "class_1_seed1.png",
                                      "class_1_seed4.png", "class_2_seed2.png"]
    for p in pngs:
        im = Image.open(p)
        assert im.size == (16, 16) and im.mode == "L"  # grayscale stays grayscale
    assert sorted(p.name for p in folder.glob("grid_*.png")) == ["grid_class_0.png", "grid_class_1.png",
                                                                  "grid_class_2.png"]
    # Same seeds with another batch size into another folder: same images.
    other = tmp_path.parent / (tmp_path.name + "_b1")
    sample.main(sample_args(tiny_ckpt, other, "--sampler", "ddim", "--batch-size", "1", "--exact-output-dir"))
    for p in pngs:
        a = np.asarray(Image.open(p), dtype=int)
        b = np.asarray(Image.open(other / p.parent.name / p.name), dtype=int)
        assert np.abs(a - b).max() <= 1


def test_sample_ddp_single_process_npz(tiny_ckpt, tmp_path):
    args = sample_ddp.parse_args(["--ckpt", str(tiny_ckpt), "--sample-dir", str(tmp_path), "--num-fid-samples",
                                  "7", "--per-proc-batch-size", "3", "--num-sampling-steps", "2",
                                  "--class-subfolders"])
    sample_ddp.main(args)
    (npz,) = tmp_path.glob("*.npz")
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (7, 16, 16, 3) and arr.dtype == np.uint8
    assert len(list(tmp_path.rglob("*_seed*.png"))) == 7
    png = np.asarray(Image.open(next(tmp_path.rglob("class_0_seed0.png"))))
    assert np.array_equal(arr[0, :, :, 0], png)


def test_pickled_checkpoint_refused(tiny_ckpt, tmp_path):
    ck = load(tiny_ckpt)
    official = {"model": ck["model"], "ema": ck["ema"], "opt": ck["opt"],
                "args": argparse.Namespace(model="DiT-Ti/2", image_size=16, num_classes=3)}
    path = tmp_path / "official.pt"
    torch.save(official, path)
    with pytest.raises(UserError, match="not a plain checkpoint.*--trust_checkpoint"):
        runtime.load_checkpoint(path)
    assert runtime.load_checkpoint(path, trust=True)["args"]["num_classes"] == 3
    proc = run_script("dit", ["sample.py", "--ckpt", str(path), "--output-dir", str(tmp_path / "s")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {runtime.trust_message(path)}"
    assert not (tmp_path / "s").exists()
    # Trusted, it samples (EMA weights, sizes from the weights); so does a bare official-style state dict.
    raw = tmp_path / "raw.pt"
    torch.save(ck["ema"], raw)
    for p, extra in ((path, ["--trust-checkpoint"]), (raw, [])):
        sample.main(sample_args(p, tmp_path / "ok", "--vae", ck["vae"]["vae"], "--num-samples", "2", *extra))
    assert len(list((tmp_path / "ok").rglob("*_seed*.png"))) == 4


@pytest.mark.parametrize("extra, message", [
    (["--model", "DiT-S/2"], "holds a DiT-Ti/2 model, not --model DiT-S/2"),
    (["--num-classes", "5"], "trained with 3 classes, not --num-classes 5"),
    (["--image-size", "32"], "--image-size 32: .* generates 16x16 images"),
    (["--image-size", "20"], "--image-size must be a positive multiple of 8"),
    (["--class-labels", "3"], "--class-labels 3 is out of range: the model has 3 classes"),
    (["--class-labels", "dog"], "unknown class name; valid: class_0, class_1, class_2"),
])
def test_sample_bad_input(tiny_ckpt, tmp_path, extra, message):
    with pytest.raises(UserError, match=message):
        sample.main(sample_args(tiny_ckpt, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,message", [
    (["--num-classes", "4"], "--num-classes 4 but .* has 3 class folders"),
    (["--image-size", "12"], "--image-size must be a positive multiple of 8"),
    (["--model", "DiT-Ti/4", "--image-size", "8"], "not divisible by the patch size 4"),
    (["--global-batch-size", "64"], "fewer than --global-batch-size 64"),
    (["--resume", "{tmp}/missing.pt"], "no such checkpoint"),
], ids=["num-classes", "image-size", "patch-size", "batch-size", "missing-resume"])
def test_train_bad_flag(work, tmp_path, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(UserError, match=message):
        train.main(train_args(work, tmp_path / "res", *extra))
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("*.pt"))


def test_train_bad_input(work, tmp_path, tiny_ckpt):
    bad = tmp_path / "bad"
    shutil.copytree(work / "data", bad)
    (bad / "class_1" / "broken.png").write_text("not an image")
    args = train_args(work, tmp_path / "res")
    args.data_root = str(bad)
    with pytest.raises(UserError, match="broken.png is not a readable image"):
        train.main(args)
    (bad / "class_1" / "broken.png").unlink()
    (bad / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no images"):
        train.main(args)
    other = tmp_path / "other.pt"
    torch.save({"model_type": "ldm", "model": {}, "ema": {}, "opt": {}, "args": {}, "step": 1}, other)
    with pytest.raises(UserError, match="checkpoint of ldm, not of a DiT"):
        train.main(train_args(work, tmp_path / "res", "--resume", str(other)))
    with pytest.raises(UserError, match="trained with --global-batch-size 4, not 8"):
        train.main(train_args(work, tmp_path / "res", "--resume", str(tiny_ckpt), "--global-batch-size", "8"))
    assert not (tmp_path / "res").exists()
