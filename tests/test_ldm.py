"""Tests of ldm/: shapes, CFG dropout, training + checkpoints + exact resume, 2-process accelerate,
inference by class name, per-class generation and resumption, train_vae.py as --vae, cached latents,
bf16 vs fp32, and every bad input's message. Tiny configs on CPU; a random AutoencoderKL saved in
diffusers format stands in for the pretrained VAE (no downloads).

    OMP_NUM_THREADS=1 python -m pytest tests/test_ldm.py -q
"""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import BOOT, REPO, assert_same_updates, free_port, load_folder, run_script, script_env, sgd_updates

train, train_vae, inference, inference_per_class, models, dataset, utils, runtime = load_folder(
    "ldm", "train", "train_vae", "inference", "inference_per_class", "models", "dataset", "utils", "runtime")

TINY_UNET = ["--unet_preset", "tiny", "--block_out_channels", "16", "32", "--norm_num_groups", "8",
             "--cross_attention_dim", "16", "--attention_head_dim", "2"]
CLASSES = ["cls_a", "cls_b", "cls_c"]
CKPT_KEYS = {"model_type", "format_version", "unet_config", "unet", "ema_unet", "class_embedder",
             "ema_class_embedder", "class_names", "num_classes", "vae", "vae_scaling_factor", "image_size",
             "image_channels", "noise_scheduler_config", "config", "optimizer", "lr_scheduler", "scaler", "step",
             "epoch", "position_in_epoch", "rng_state", "best_val_loss", "posthoc_ema"}
# The reference run trains with min-SNR weighting and post-hoc EMA snapshots (issue 18); its resume in
# test_resume_is_bit_identical leaves these flags out: a resumed run keeps them.
OBJECTIVE = ["--snr_gamma", "5", "--posthoc_ema_every_steps", "2"]


def write_classes(root, per_class=6, size=16, classes=CLASSES, seed=0):
    """Grayscale class folders: noise plus a bright bar whose row depends on the class."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[3 + 4 * k: 5 + 4 * k, :] = 230
            Image.fromarray(img, mode="L").save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random 2-level AutoencoderKL (factor 2, 4 latent channels) in diffusers format."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "tiny_vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_classes(tmp_path_factory.mktemp("data") / "classes")


def base_flags(data, vae, out):
    return ["--data_root", str(data), "--output_dir", str(out), "--vae", str(vae), "--image_size", "16",
            "--batch_size", "4", "--num_epochs", "2", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
            "--val_split", "0.34", "--sample_every_epochs", "1", "--grid_per_class", "1", "--log_every_steps", "1",
            "--seed", "0"] + TINY_UNET


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, tiny_vae):
    """An uninterrupted 2-epoch run (3 steps per epoch), min-SNR gamma 5, post-hoc EMA snapshots every 2 steps."""
    out = tmp_path_factory.mktemp("run") / "full"
    proc = run_script("ldm", ["train.py"] + base_flags(data, tiny_vae, out) + OBJECTIVE)
    return out, proc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def user_error(capsys, fn, argv):
    """Run fn via run_main; return the stderr line of the expected exit code 2."""
    with pytest.raises(SystemExit) as e:
        runtime.run_main(fn, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------- models
def test_shapes_and_vae_factor(tiny_vae):
    vae, source = models.load_vae(str(tiny_vae))
    assert models.vae_downsample_factor(vae) == 2 and vae.config.latent_channels == 4
    assert os.path.isabs(source)
    kw = models.unet_kwargs("tiny", block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                            attention_head_dim=2)
    unet = models.build_unet(8, 4, **kw)
    emb = models.ClassEmbedder(3, 16)
    assert emb.embedding.weight.shape == (4, 16)
    labels = torch.tensor([0, 2, 3])
    assert emb(labels).shape == (3, 1, 16)
    out = models.Denoiser(unet, emb)(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), labels)
    assert out.shape == (3, 4, 8, 8) and torch.isfinite(out).all()
    mean, std = models.vae_posterior(vae, torch.zeros(2, 1, 16, 16))  # grayscale fed as 3 equal channels
    assert mean.shape == std.shape == (2, 4, 8, 8)
    imgs = models.decode_to_images(vae, torch.randn(2, 4, 8, 8), 0.18215, 1)
    assert imgs.shape == (2, 1, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    with pytest.raises(runtime.UserError, match="divisible by 2"):
        models.build_unet(6, 4, **models.unet_kwargs("small"))  # 3 levels need latents divisible by 4


def test_cfg_dropout_rate():
    g = torch.Generator().manual_seed(0)
    _, drop, _, _ = train.draw_noise(g, (200_000, 1, 1, 1), 0.1, 1000)
    assert abs(drop.float().mean().item() - 0.1) < 0.005
    _, drop0, _, _ = train.draw_noise(g, (1000, 1, 1, 1), 0.0, 1000)
    assert not drop0.any()
    emb = models.ClassEmbedder(5, 4)
    dropped = emb.drop_labels(torch.zeros(100_000, dtype=torch.long), 0.3, torch.Generator().manual_seed(1))
    assert set(dropped.unique().tolist()) == {0, 5}
    assert abs((dropped == 5).float().mean().item() - 0.3) < 0.01


def test_samplers_finite_and_batch_size_independent(tiny_vae):
    vae, _ = models.load_vae(str(tiny_vae))
    torch.manual_seed(0)
    kw = models.unet_kwargs("tiny", block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                            attention_head_dim=2)
    den = models.Denoiser(models.build_unet(8, 4, **kw), models.ClassEmbedder(3, 16)).eval()
    common = dict(latent_channels=4, latent_size=8, scaling_factor=0.18215, image_channels=1,
                  noise_config=models.DEFAULT_NOISE_SCHEDULE, num_steps=3, cfg_scale=3.0)
    for name in ("ddpm", "ddim", "dpmsolver"):
        imgs = models.sample_images(den, vae, [0, 1, 2], [5, 6, 7], scheduler=name, **common)
        assert imgs.shape == (3, 1, 16, 16) and torch.isfinite(imgs).all(), name
    # image i depends only on its own seed, not on what else is in the batch (DDPM is stochastic per step)
    one = models.sample_images(den, vae, [1], [6], scheduler="ddpm", **common)
    three = models.sample_images(den, vae, [0, 1, 2], [5, 6, 7], scheduler="ddpm", **common)
    assert torch.allclose(one[0], three[1], atol=1e-5)


def test_bf16_and_fp32_losses_agree(tiny_vae):
    torch.manual_seed(0)
    kw = models.unet_kwargs("tiny", block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                            attention_head_dim=2)
    den = models.Denoiser(models.build_unet(8, 4, **kw), models.ClassEmbedder(3, 16))
    sched = train.DDPMScheduler(**models.DEFAULT_NOISE_SCHEDULE)
    mean, std = torch.randn(8, 4, 8, 8), torch.rand(8, 4, 8, 8) * 0.1
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    rand = train.draw_noise(torch.Generator().manual_seed(3), mean.shape, 0.1, 1000)
    fp32 = train.diffusion_loss(den, mean, std, labels, rand, sched, 0.18215, 3, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = train.diffusion_loss(den, mean, std, labels, rand, sched, 0.18215, 3, "cpu")
    assert torch.isfinite(fp32) and torch.isfinite(bf16)
    assert abs(fp32.item() - bf16.item()) < 0.03 * fp32.item()


# ---------------------------------------------------------------- data
def test_16bit_and_rgba_images_are_accepted(tmp_path):
    arr = np.array([[0, 32768], [65535, 16384]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = dataset.load_image(tmp_path / "g16.png", 2, 1)
    assert x.shape == (1, 2, 2)
    assert torch.allclose(x[0], torch.tensor(arr / 65535.0 * 2 - 1, dtype=torch.float32), atol=1e-4)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 0  # fully transparent red: alpha is dropped, the colour kept
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    y = dataset.load_image(tmp_path / "c.png", 8, 3)
    assert y.shape == (3, 8, 8) and torch.allclose(y[0], torch.ones(8, 8)) and torch.allclose(y[1], -torch.ones(8, 8))


def test_cache_latents_equal_on_the_fly_and_invalidation(tmp_path, tiny_vae):
    data = write_classes(tmp_path / "d", per_class=3)
    vae, source = models.load_vae(str(tiny_vae))
    names, samples, ch = dataset.scan_class_folders(data)
    encode = lambda x: models.vae_posterior(vae, x)
    cache = dataset.encode_dataset(samples, 16, ch, encode, 4, random_flip=True)
    labels = [lbl for _, lbl in samples]
    cached = dataset.LatentDataset(cache, labels, seed=3, random_flip=True)
    images = dataset.ImageDataset(samples, 16, ch, seed=3, random_flip=True)
    keys = [(i, 5) for i in range(len(samples))]
    flips = [dataset.flip_decision(3, 5, i) for i in range(len(samples))]
    assert any(flips) and not all(flips)  # both branches are exercised
    m_c = torch.stack([cached[k][0] for k in keys])
    s_c = torch.stack([cached[k][1] for k in keys])
    with torch.no_grad():
        m_f, s_f = encode(torch.stack([images[k][0] for k in keys]))
    assert torch.allclose(m_c, m_f, atol=1e-5) and torch.allclose(s_c, s_f, atol=1e-5)
    torch.manual_seed(0)
    kw = models.unet_kwargs("tiny", block_out_channels=[16, 32], norm_num_groups=8, cross_attention_dim=16,
                            attention_head_dim=2)
    den = models.Denoiser(models.build_unet(8, 4, **kw), models.ClassEmbedder(3, 16))
    sched = train.DDPMScheduler(**models.DEFAULT_NOISE_SCHEDULE)
    rand = train.draw_noise(torch.Generator().manual_seed(1), m_c.shape, 0.1, 1000)
    lab = torch.tensor(labels)
    with torch.no_grad():
        l_c = train.diffusion_loss(den, m_c, s_c, lab, rand, sched, 0.18215, 3, "cpu")
        l_f = train.diffusion_loss(den, m_f, s_f, lab, rand, sched, 0.18215, 3, "cpu")
    assert abs(l_c.item() - l_f.item()) < 1e-5
    # the cache key follows file names/sizes/mtimes and the VAE identity
    ident = models.vae_identity(vae, source)
    key = dataset.cache_key(samples, data, 16, True, ident)
    assert key == dataset.cache_key(samples, data, 16, True, ident)
    assert key != dataset.cache_key(samples, data, 16, False, ident)
    assert key != dataset.cache_key(samples, data, 16, True, "other-vae")
    Image.fromarray(np.full((16, 17), 9, np.uint8), mode="L").save(samples[0][0].path)  # samples hold Sources
    assert key != dataset.cache_key(samples, data, 16, True, ident)


def test_cache_latents_end_to_end(tmp_path, data, tiny_vae):
    """--cache_latents builds once, is reused, is rebuilt after a data file changes; losses match on-the-fly."""
    d = tmp_path / "d"
    write_classes(d)
    flags = lambda out: base_flags(d, tiny_vae, out) + ["--max_train_steps", "2", "--random_flip",
                                                         "--sample_every_epochs", "0"]
    out = tmp_path / "cached"
    first = run_script("ldm", ["train.py", "--cache_latents"] + flags(out)).stdout
    assert "building latent cache" in first and (out / "latent_cache.pt").is_file()
    plain = run_script("ldm", ["train.py"] + flags(tmp_path / "plain")).stdout
    losses = lambda s: [float(x) for x in re.findall(r"loss ([0-9.]+) lr", s)]
    # The cache encodes in other batches than training does: fp32 reordering, far below 1e-4 of the loss.
    assert len(losses(first)) == 2 and np.allclose(losses(first), losses(plain), rtol=1e-4, atol=0)
    second = run_script("ldm", ["train.py", "--cache_latents"] + flags(out)).stdout
    assert "reusing latent cache" in second
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(d / "cls_a" / "000.png")
    third = run_script("ldm", ["train.py", "--cache_latents"] + flags(out)).stdout
    assert "building latent cache" in third


# ---------------------------------------------------------------- training
def test_train_writes_best_and_last_checkpoints(trained):
    out, proc = trained
    assert "world size 1" in proc.stdout and "UNet" in proc.stdout and "class embedder" in proc.stdout
    assert re.search(r"total\s+[\d,]+\s+[\d,]+\s+[\d,]+", proc.stdout)  # parameter table
    last, best = load(out / "checkpoint_last.pt"), load(out / "checkpoint_best.pt")
    assert set(last) == CKPT_KEYS
    assert last["model_type"] == "ldm" and last["format_version"] == 1
    assert last["step"] == 6 and last["epoch"] == 2 and best["step"] in (3, 6)
    assert last["class_names"] == CLASSES and last["num_classes"] == 3
    assert last["image_size"] == 16 and last["image_channels"] == 1
    assert os.path.isabs(last["vae"]) and last["vae_scaling_factor"] == pytest.approx(0.18215)
    assert set(last["noise_scheduler_config"]) == {"num_train_timesteps", "beta_schedule", "beta_start",
                                                  "beta_end", "prediction_type"}
    assert last["class_embedder"]["embedding.weight"].shape == (4, 16)
    assert set(last["class_embedder"]) == {"embedding.weight"} == set(last["ema_class_embedder"])
    json.dumps(last["unet_config"])  # plain JSON-able values
    unet = models.UNet2DConditionModel.from_config(last["unet_config"])
    unet.load_state_dict(last["ema_unet"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["unet"])
    assert not torch.equal(last["unet"]["conv_in.weight"], last["ema_unet"]["conv_in.weight"])
    assert "validation loss" in proc.stdout and np.isfinite(last["best_val_loss"])
    assert list((out / "tensorboard").iterdir())
    assert last["config"]["snr_gamma"] == 5.0 and last["noise_scheduler_config"]["prediction_type"] == "epsilon"
    assert sorted(p.name for p in (out / "posthoc_ema").iterdir()) == [f"phema_{s:07d}.pt" for s in (2, 4, 6)]
    assert last["posthoc_ema"]["every_steps"] == 2 and "min-SNR gamma 5" in proc.stdout


def test_compile_trains_like_eager(tmp_path, data, tiny_vae):
    """--compile (inductor) computes the eager gradients and saves plain, unprefixed weights.

    Compared with SGD in place of AdamW, as in tests/test_ddpm.py (see repo_helpers.assert_same_updates).
    """
    rec = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"]), ("other_data", ["--random_flip"])):
        flags = base_flags(data, tiny_vae, tmp_path / name) + ["--learning_rate", "0.05", *extra]
        rec[name] = sgd_updates("ldm", ["train.py", *flags], tmp_path / f"{name}.pt")
    eager, comp = load(tmp_path / "eager" / "checkpoint_last.pt"), load(tmp_path / "compiled" / "checkpoint_last.pt")
    assert comp["step"] == eager["step"] == 6
    assert set(comp["unet"]) == set(eager["unet"]) and set(comp["ema_unet"]) == set(eager["ema_unet"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in comp["unet"])
    print("worst relative update difference, compiled vs eager:", assert_same_updates(rec["eager"], rec["compiled"]))
    with pytest.raises(AssertionError, match="the update differs"):
        assert_same_updates(rec["eager"], rec["other_data"])


def test_resume_is_bit_identical(tmp_path, data, tiny_vae, trained):
    full, _ = trained
    out = tmp_path / "resumed"
    flags = base_flags(data, tiny_vae, out)
    run_script("ldm", ["train.py"] + flags + OBJECTIVE + ["--max_train_steps", "4"])  # stops 1 step into epoch 2
    mid = load(out / "checkpoint_last.pt")
    assert mid["step"] == 4 and mid["epoch"] == 1 and mid["position_in_epoch"] == 1
    proc = run_script("ldm", ["train.py"] + flags + ["--resume"])  # without OBJECTIVE: the run keeps its own
    assert "resumed from" in proc.stdout and "step 4" in proc.stdout and "min-SNR gamma 5" in proc.stdout
    a, b = load(full / "checkpoint_last.pt"), load(out / "checkpoint_last.pt")
    assert b["step"] == 6
    for key in ("unet", "ema_unet", "class_embedder", "ema_class_embedder"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)
    for pid, st in a["optimizer"]["state"].items():
        for name, t in st.items():
            assert torch.equal(t, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["best_val_loss"] == b["best_val_loss"]
    # post-hoc EMA: the tracked averages and the snapshot written after the resume are those of the full run
    for avg_a, avg_b in zip(a["posthoc_ema"]["averages"], b["posthoc_ema"]["averages"], strict=True):
        for key in ("ema_unet", "ema_class_embedder"):
            assert all(torch.equal(t, avg_b[key][n]) for n, t in avg_a[key].items()), key
    snap_a, snap_b = (load(d / "posthoc_ema" / "phema_0000006.pt") for d in (full, out))
    assert snap_a["step"] == snap_b["step"] == 6
    for avg_a, avg_b in zip(snap_a["averages"], snap_b["averages"], strict=True):
        assert all(torch.equal(t, avg_b["ema_unet"][n]) for n, t in avg_a["ema_unet"].items())


def test_accelerate_two_processes(tmp_path, data, tiny_vae):
    out = tmp_path / "ddp"
    flags = base_flags(data, tiny_vae, out)
    flags[flags.index("--batch_size") + 1] = "2"
    proc = run_script("ldm", ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                              str(free_port()), "train.py"] + flags + ["--max_train_steps", "2"])
    log = (out / "log.txt").read_text()
    assert "world size 2" in log and "MULTI_CPU" in log
    assert "global batch 4" in log
    assert load(out / "checkpoint_last.pt")["step"] == 2


def test_train_vae_output_loads_as_vae(tmp_path, data):
    vae_dir = tmp_path / "my_vae"
    run_script("ldm", ["train_vae.py", "--data_root", str(data), "--output_dir", str(vae_dir), "--image_size", "16",
                       "--preset", "tiny", "--block_out_channels", "8", "16", "--norm_num_groups", "8",
                       "--batch_size", "6", "--num_epochs", "1", "--scale_images", "18", "--log_every_steps", "1"])
    cfg = json.loads((vae_dir / "config.json").read_text())
    assert cfg["block_out_channels"] == [8, 16] and cfg["scaling_factor"] != pytest.approx(0.18215)
    vae, _ = models.load_vae(str(vae_dir))
    # the stored factor really whitens the data's latents
    _, samples, ch = dataset.scan_class_folders(data)
    x = torch.stack([dataset.load_image(p, 16, ch) for p, _ in samples])
    with torch.no_grad():
        m, s = models.vae_posterior(vae, x)
    z = (m + s * torch.randn(m.shape, generator=torch.Generator().manual_seed(0))) * cfg["scaling_factor"]
    assert 0.8 < z.std().item() < 1.25
    out = tmp_path / "ldm_on_my_vae"
    run_script("ldm", ["train.py"] + base_flags(data, vae_dir, out) + ["--max_train_steps", "1",
                                                                       "--sample_every_epochs", "0"])
    ck = load(out / "checkpoint_last.pt")
    assert ck["vae"] == str(vae_dir.resolve()) and ck["vae_scaling_factor"] == pytest.approx(cfg["scaling_factor"])


# ---------------------------------------------------------------- inference
def test_inference_by_class_name_grid_and_no_overwrite(tmp_path, trained, capsys):
    ckpt = str(trained[0] / "checkpoint_best.pt")
    common = ["--checkpoint", ckpt, "--output_dir", str(tmp_path), "--num_inference_steps", "3", "--seed", "7"]
    assert inference.main(common + ["--class_label", "cls_b", "--num_samples", "3", "--batch_size", "2",
                                    "--scheduler", "dpmsolver", "--save_grid"]) == 0
    folder = tmp_path / "checkpoint_best_dpmsolver3_cfg3_seed7"
    files = sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")
    assert files == [f"cls_b_seed{1_000_000 + 7 + j}.png" for j in range(3)]
    im = Image.open(folder / files[0])
    assert im.size == (16, 16) and im.mode == "L"  # grayscale data stays grayscale
    assert Image.open(folder / "grid.png").size == (3 * 18 + 2, 18 + 2)
    out = capsys.readouterr().out
    assert "images generated: 3" in out and "time per image" in out
    before = (folder / files[0]).stat().st_mtime_ns
    inference.main(common + ["--class_label", "cls_b", "--num_samples", "3", "--scheduler", "dpmsolver"])
    assert (folder / files[0]).stat().st_mtime_ns == before and "images generated: 0" in capsys.readouterr().out
    # all classes, grid with one row per class
    inference.main(common + ["--num_samples", "2", "--save_grid", "--scheduler", "ddim"])
    grid = tmp_path / "checkpoint_best_ddim3_cfg3_seed7" / "grid.png"
    assert Image.open(grid).size == (2 * 18 + 2, 3 * 18 + 2)


def test_inference_per_class_counts_and_resume(tmp_path, trained, capsys):
    ckpt = str(trained[0] / "checkpoint_best.pt")
    argv = ["--checkpoint", ckpt, "--output_dir", str(tmp_path / "pc"), "--total_samples", "7", "--batch_size", "3",
            "--num_inference_steps", "2", "--cfg_scale", "2.0"]
    inference_per_class.main(argv)
    counts = {c: len(list((tmp_path / "pc" / c).glob("*.png"))) for c in CLASSES}
    assert counts == {"cls_a": 3, "cls_b": 2, "cls_c": 2}
    victim = sorted((tmp_path / "pc" / "cls_c").glob("*.png"))[1]
    victim.unlink()
    capsys.readouterr()
    inference_per_class.main(argv)
    out = capsys.readouterr().out
    assert "generating the other 1" in out and victim.exists()
    err = user_error(capsys, inference_per_class.main, argv[:-1] + ["5.0"])
    assert "other settings" in err


# ---------------------------------------------------------------- bad inputs
def _ldm_bad_data(tmp_path, kind):
    """A class-folder data set with one defect, for the bad-input cases below."""
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    d = write_classes(tmp_path / kind, per_class=3)
    if kind == "not-an-image":
        (d / "cls_b" / "001.png").write_text("not an image")
    elif kind == "truncated":
        raw = (d / "cls_a" / "002.png").read_bytes()
        (d / "cls_a" / "002.png").write_bytes(raw[: len(raw) // 2])
    elif kind == "class-without-images":
        (d / "cls_empty").mkdir()
    elif kind == "too-few-in-a-class":
        for f in sorted((d / "cls_c").iterdir())[1:]:
            f.unlink()
    return d


# (id, data kind, extra flags ("{tmp}" is the test's folder), what the one error line must contain)
BAD_TRAIN_CASES = [
    ("no-class-folders", "empty", [], ["has no class subfolders"]),
    ("not-an-image", "not-an-image", [], ["001.png", "not a readable image"]),
    ("truncated-png", "truncated", [], ["002.png"]),
    ("class-without-images", "class-without-images", [], ["cls_empty has no images"]),
    ("image-size", "ok", ["--image_size", "12"], ["--image_size", "multiple of 8"]),
    ("too-few-for-val-split", "too-few-in-a-class", [], ["class 'cls_c' has 1 image", "--val_split"]),
    ("missing-vae", "ok", ["--vae", "{tmp}/no_vae"], ["--vae /path/to/folder"]),
    ("cfg-dropout", "ok", ["--cfg_dropout", "1.5"], ["--cfg_dropout"]),
    ("nothing-to-resume", "ok", ["--resume"], ["nothing to resume"]),
]


@pytest.mark.parametrize("kind,extra,wanted", [c[1:] for c in BAD_TRAIN_CASES], ids=[c[0] for c in BAD_TRAIN_CASES])
def test_bad_training_input(tmp_path, tiny_vae, capsys, kind, extra, wanted):
    out = tmp_path / "out"
    flags = base_flags(_ldm_bad_data(tmp_path, kind), tiny_vae, out) + [e.format(tmp=tmp_path) for e in extra]
    err = user_error(capsys, train.main, flags)
    for w in wanted:
        assert w in err, err
    assert not out.exists()  # nothing written for bad input


def test_missing_hub_vae_offline_cli(tmp_path):
    data = write_classes(tmp_path / "d", per_class=3)
    proc = run_script("ldm", ["train.py", "--data_root", str(data), "--output_dir", str(tmp_path / "o"),
                              "--image_size", "16", "--batch_size", "2"], check=False,
                      env=script_env(HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot load VAE 'stabilityai/sd-vae-ft-mse'")
    assert "--vae /path/to/folder" in proc.stderr and not (tmp_path / "o").exists()


def test_bad_checkpoints_and_class_label(tmp_path, trained, capsys):
    ckpt = trained[0] / "checkpoint_best.pt"
    base = ["--output_dir", str(tmp_path / "g"), "--num_inference_steps", "2"]
    err = user_error(capsys, inference.main, ["--checkpoint", str(ckpt), "--class_label", "cls_z"] + base)
    assert "unknown class 'cls_z'" in err and "cls_a, cls_b, cls_c" in err
    other = tmp_path / "dit.pt"
    torch.save({"model_type": "dit", "model": {}}, other)
    assert "is a 'dit' checkpoint" in user_error(capsys, inference.main, ["--checkpoint", str(other)] + base)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model_type": "ldm", "args": re.compile("x")}, pickled)
    err = user_error(capsys, inference.main, ["--checkpoint", str(pickled)] + base)
    assert "not a plain checkpoint" in err and "--trust_checkpoint" in err
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "not a checkpoint" in user_error(capsys, inference_per_class.main, ["--checkpoint", str(text)] + base)
    err = user_error(capsys, train.main, ["--data_root", str(tmp_path), "--resume", str(other)])
    assert "is a 'dit' checkpoint" in err


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, data, tiny_vae):
    out = tmp_path / "nan"
    proc = run_script("ldm", [str(BOOT), "train.py"] + base_flags(data, tiny_vae, out) + ["--save_every_steps", "1"],
                      check=False, env=script_env(DIFFUSION_FAULT_NAN_AT_STEP="2"))
    assert proc.returncode == 1 and "error: loss is nan at step 2" in proc.stderr
    assert load(out / "checkpoint_last.pt")["step"] == 1


def test_sigterm_saves_checkpoint_and_exits_0(tmp_path, data, tiny_vae):
    """SIGTERM during step 2 (harness hook, tests/faults/fault_hooks.py): checkpoint of step 2, exit 0."""
    out = tmp_path / "term"
    proc = run_script("ldm", [str(BOOT), "train.py"] + base_flags(data, tiny_vae, out) + ["--sample_every_epochs", "0"],
                      check=False, env=script_env(DIFFUSION_FAULT_SIGTERM_AT_STEP="2"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"SIGTERM received: saved checkpoint_last.pt at step 2\b", proc.stdout)
    last = load(out / "checkpoint_last.pt")
    assert last["step"] == 2 and last["epoch"] == 0 and last["position_in_epoch"] == 2


def test_one_flag_vocabulary_and_no_fault_code():
    """New names, both spellings and the old names as aliases; no fault-injection code in the folder."""
    new = train.parse_args(["--data-root", "d", "--num-epochs", "3", "--batch-size", "2", "--learning-rate", "0.5",
                            "--ckpt-every-steps", "7", "--log-every-steps", "4", "--random-flip", "--resume"])
    old = train.parse_args(["--dataset_path", "d", "--epochs", "3", "--train_batch_size", "2", "--lr", "0.5",
                            "--save_every_steps", "7", "--log-every", "4", "--random_flip", "--resume", "auto"])
    assert vars(new) == vars(old)
    assert (new.data_root, new.num_epochs, new.batch_size, new.learning_rate, new.ckpt_every_steps,
            new.log_every_steps, new.random_flip, new.resume) == ("d", 3, 2, 0.5, 7, 4, True, "auto")
    for alias in ("--ckpt-every", "--save-every", "--save_every_steps"):
        assert train.parse_args(["--data_path", "d", alias, "5"]).ckpt_every_steps == 5
    for flag in ("--no_random_flip", "--no-flip", "--no_hflip"):
        assert train.parse_args(["--data_root", "d", "--random_flip", flag]).random_flip is False
    assert train.parse_args(["--data_root", "d"]).random_flip is False  # the folder's default
    assert train.parse_args(["--data_root", "d", "--resume", "x.pt"]).resume == "x.pt"
    vae = train_vae.parse_args(["--dataset-path", "d", "--epochs", "2", "--save-every-steps", "3", "--no-flip"])
    assert (vae.data_root, vae.num_epochs, vae.ckpt_every_steps, vae.random_flip) == ("d", 2, 3, False)
    hits = [f"{p.name}:{i}" for p in (REPO / "ldm").rglob("*") if p.is_file() and p.suffix in (".py", ".sh", ".md")
            and p.name != "runtime.py" for i, ln in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"(?<!DE)FAULT", ln)]  # DEFAULT_VAE is not a fault hook
    assert not hits, hits


def test_warmup_ema_rule():
    """The folder's EMA rule on top of runtime.EMA: decay min(decay, (1 + step) / (10 + step))."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = utils.WarmupEMA(model, decay=0.5)
    w0 = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 0)  # decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.model.weight, 0.1 * w0 + 0.9 * model.weight) and ema.decay == 0.5
    before = ema.model.weight.clone()
    ema.update(model, 1000)  # decay 0.5
    assert torch.allclose(ema.model.weight, 0.5 * before + 0.5 * model.weight)
