"""Tests of controlnet/: pairing, masks, augmentation, ControlNet init, scale-0 equivalence, training, resume,
2-process accelerate, inference and bad inputs. Tiny random LDMs built here in the LDM checkpoint format, and
one written by ldm/train.py itself for the LDM -> ControlNet contract.

    OMP_NUM_THREADS=1 python -m pytest tests/test_controlnet.py -q
"""
import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image

from repo_helpers import REPO, free_port, install_fault_hooks, load_folder, run_script, script_env

dataset, models, train, inference, runtime = load_folder("controlnet", "dataset", "models", "train", "inference",
                                                         "runtime")
install_fault_hooks(runtime)  # DIFFUSION_FAULT_NAN_AT_STEP for the in-process runs below

NUM_CLASSES = 3
# The reference run trains with min-SNR weighting and post-hoc EMA snapshots (issue 18); its resume in
# test_train_writes_best_last_and_resumes_bit_identical leaves these flags out: a resumed run keeps them.
OBJECTIVE = ["--snr_gamma", 5, "--posthoc_ema_every_steps", 4]


# ------------------------------------------------------------------------------------------------ fixtures
def make_tiny_ldm(folder, vae_factor=4, image_size=32, image_channels=1, seed=0):
    """A tiny random LDM checkpoint in the format ldm/train.py writes (the contract of issue 5)."""
    torch.manual_seed(seed)
    n = {2: 2, 4: 3, 8: 4}[vae_factor]
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=(8,) + (16,) * (n - 1),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=image_size)
    vae_dir = folder / f"vae_f{vae_factor}_s{seed}"
    vae.save_pretrained(vae_dir)
    unet = UNet2DConditionModel(sample_size=image_size // vae_factor, in_channels=4, out_channels=4,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    emb = torch.randn(NUM_CLASSES + 1, 16)
    ema_unet = {k: v + 0.01 * torch.randn_like(v) for k, v in unet.state_dict().items()}
    ck = {"model_type": "ldm", "format_version": 1, "unet_config": dict(unet.config), "unet": unet.state_dict(),
          "ema_unet": ema_unet, "class_embedder": {"embedding.weight": emb},
          "ema_class_embedder": {"embedding.weight": emb + 0.01},
          "class_names": [f"digit_{i}" for i in range(NUM_CLASSES)], "num_classes": NUM_CLASSES,
          "vae": str(vae_dir.resolve()), "vae_scaling_factor": 0.5, "image_size": image_size,
          "image_channels": image_channels,
          "noise_scheduler_config": {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 1e-4,
                                     "beta_end": 0.02, "prediction_type": "epsilon"},
          "global_step": 10, "epoch": 1, "optimizer": {}}
    path = folder / f"ldm_f{vae_factor}_s{seed}.pt"
    torch.save(ck, path)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny LDMs (VAE factor 4, another seed, factor 8) and 24 digit image/mask pairs."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("cn")
    d = load_digits()
    (root / "data" / "images").mkdir(parents=True)
    (root / "data" / "masks").mkdir()
    rows = ["stem,class_name"]
    for i in range(24):
        img = np.asarray(Image.fromarray(np.uint8(d.images[i] / 16 * 255)).resize((32, 32), Image.BICUBIC))
        Image.fromarray(img).save(root / "data" / "images" / f"{i:03d}.png")
        Image.fromarray(np.where(img > 96, 255, 0).astype(np.uint8)).save(root / "data" / "masks" / f"{i:03d}.png")
        rows.append(f"{i:03d},digit_{i % NUM_CLASSES}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"root": root, "data": root / "data", "ldm": make_tiny_ldm(root), "ldm_other": make_tiny_ldm(root, seed=1),
            "ldm8": make_tiny_ldm(root, vae_factor=8)}


def run_train(args):
    """train.main in this process (a fresh accelerate state per run)."""
    AcceleratorState._reset_state(True)
    return train.main([str(a) for a in args])


def base_args(work, out, *extra):
    return ["--data_root", work["data"], "--ldm_checkpoint", work["ldm"], "--output_dir", out, "--batch_size", 4,
            "--learning_rate", 1e-3, "--log_every_steps", 1, "--sample_steps", 2, "--num_val_samples", 2, *extra]


@pytest.fixture(scope="module")
def trained(work):
    """One 3-epoch training run (uninterrupted reference for resume; checkpoint for inference)."""
    out = work["root"] / "run_ref"
    run_train(base_args(work, out, "--num_epochs", 3, *OBJECTIVE))
    return out


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def expect_error(capsys, fn, args, *patterns, code=2):
    """Run fn(args); assert exit code and that stderr is one `error:` line matching every pattern."""
    with pytest.raises(SystemExit) as e:
        fn([str(a) for a in args])
    assert e.value.code == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for p in patterns:
        assert re.search(p, err), (p, err)
    return err


# --------------------------------------------------------------------------------------------------- data
def test_pairing_by_stem_and_prefix_and_unpaired(tmp_path):
    a = tmp_path / "a"
    for sub, names in (("images", ["001.png", "002.jpg", "003.png", "extra.png"]),
                       ("masks", ["001.png", "002.png", "003.bmp", "lonely.png"])):
        (a / sub).mkdir(parents=True)
        for n in names:
            Image.new("L", (8, 8)).save(a / sub / n)
    pairs, ui, um = dataset.pair_files(a / "images", a / "masks")
    assert [(p.name, q.name) for p, q in pairs] == [("001.png", "001.png"), ("002.jpg", "002.png"),
                                                     ("003.png", "003.bmp")]
    assert [p.name for p in ui] == ["extra.png"] and [p.name for p in um] == ["lonely.png"]
    msg = dataset.describe_unpaired(ui, um)
    assert "1 image(s) without a mask: extra.png" in msg and "1 mask(s) without an image: lonely.png" in msg

    b = tmp_path / "b"
    (b / "images").mkdir(parents=True)
    (b / "masks").mkdir()
    for i in range(8):
        Image.new("L", (8, 8)).save(b / "images" / f"Img_{i:03d}.png")
        if i != 5:
            Image.new("L", (8, 8)).save(b / "masks" / f"seg_{i:03d}.png")
    pairs, ui, um = dataset.pair_files(b / "images", b / "masks", "Img_", "seg_")
    assert len(pairs) == 7 and all(p.stem[4:] == q.stem[4:] for p, q in pairs)
    assert [p.name for p in ui] == ["Img_005.png"] and um == []
    # many unpaired: the count plus the first few names
    _, ui, um = dataset.pair_files(b / "images", b / "masks")
    msg = dataset.describe_unpaired(ui, um)
    assert msg.startswith("8 image(s) without a mask: Img_000.png") and ", ..." in msg and "7 mask(s)" in msg


def test_nearest_resize_keeps_only_mask_values(tmp_path):
    rng = np.random.default_rng(0)
    for side in (13, 45):
        arr = rng.choice(np.array([0, 77, 200], dtype=np.uint8), size=(side, side))
        Image.fromarray(arr).save(tmp_path / f"m{side}.png")
        m = dataset.load_mask(tmp_path / f"m{side}.png", 1, 32)
        assert m.shape == (1, 32, 32)
        assert set(np.unique(np.round(m.numpy() * 255).astype(int))) <= {0, 77, 200}
    arr16 = (rng.integers(0, 3, size=(20, 20)) * 30000).astype(np.uint16)
    Image.fromarray(arr16).save(tmp_path / "m16.png")  # 16-bit mask: scaled by 65535, values kept
    m = dataset.load_mask(tmp_path / "m16.png", 1, 32)
    assert set(np.unique(np.round(m.numpy() * 65535).astype(int))) <= {0, 30000, 60000}
    # images: 16-bit scaled (not clipped) to [-1, 1], RGBA loses its alpha, RGB -> the LDM's 1 channel
    Image.fromarray(np.array([[0, 65535], [32768, 65535]], np.uint16)).save(tmp_path / "i16.png")
    x = dataset.load_image(tmp_path / "i16.png", 1, 2)
    assert x.shape == (1, 2, 2) and x.max() == 1 and x.min() == -1 and abs(float(x[0, 1, 0])) < 1e-3
    Image.new("RGBA", (5, 7), (255, 255, 255, 0)).save(tmp_path / "rgba.png")
    x = dataset.load_image(tmp_path / "rgba.png", 1, 8)
    assert x.shape == (1, 8, 8) and torch.allclose(x, torch.ones_like(x), atol=1e-3)


def test_identical_augmentation_of_image_and_mask(tmp_path):
    pattern = np.zeros((32, 32), np.uint8)
    pattern[2:10, 3:30] = 255  # asymmetric in both directions
    pattern[10:30, 3:8] = 255
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
        for i in range(6):
            Image.fromarray(pattern).save(tmp_path / sub / f"{i}.png")
    pairs, _, _ = dataset.pair_files(tmp_path / "images", tmp_path / "masks")
    ds = dataset.PairDataset(pairs, 1, 1, 32, seed=3, hflip=True, vflip=True)
    plain = ds[0]["mask"]
    seen = set()
    for epoch in range(4):
        for i in range(6):
            item = ds[(i, epoch)]
            img01 = (item["image"] + 1) / 2
            assert torch.equal(img01, item["mask"])  # same flips for the image and its mask
            assert torch.equal(ds[(i, epoch)]["mask"], item["mask"])  # a function of (seed, epoch, index)
            seen.add(tuple(bool(x) for x in dataset.flips_for(3, epoch, i, True, True)))
            expect = plain
            h, v = dataset.flips_for(3, epoch, i, True, True)
            expect = expect.flip([2]) if h else expect
            expect = expect.flip([1]) if v else expect
            assert torch.equal(item["mask"], expect)
    assert len(seen) == 4  # every flip combination occurred


# -------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("key", ["ldm", "ldm8"])
def test_controlnet_starts_as_unet_encoder_at_vae_factor_4_and_8(work, key):
    ldm = models.load_ldm(work[key])
    assert ldm.vae_factor == (4 if key == "ldm" else 8)
    cn = models.build_controlnet(ldm.unet, 1, ldm.vae_factor)
    u, c = ldm.unet.state_dict(), cn.state_dict()
    shared = [k for k in c if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")]
    assert len(shared) > 20 and any(k.startswith("mid_block") for k in shared)
    assert all(torch.equal(c[k], u[k]) for k in shared)
    # a mask at image resolution lands on the latent grid; zero convs make the initial residuals zero
    lat = torch.randn(2, 4, ldm.latent_size, ldm.latent_size)
    mask = torch.rand(2, 1, ldm.image_size, ldm.image_size)
    ehs = torch.randn(2, 1, 16)
    down, mid = cn(lat, torch.tensor([5, 50]), ehs, mask, return_dict=False)
    assert down[0].shape[-1] == ldm.latent_size and all(float(r.detach().abs().max()) == 0 for r in list(down) + [mid])
    cn.controlnet_cond_embedding.conv_out.weight.data.normal_()
    out = cn.controlnet_cond_embedding(mask)
    assert out.shape == (2, 16, ldm.latent_size, ldm.latent_size)


def test_bf16_loss_agrees_with_fp32(work):
    ldm = models.load_ldm(work["ldm"])
    cn = models.build_controlnet(ldm.unet, 1, ldm.vae_factor)
    for p in list(cn.controlnet_down_blocks.parameters()) + list(cn.controlnet_mid_block.parameters()):
        p.data.normal_(0, 0.1)
    model = models.ControlledUNet(ldm.unet, cn, models.DummyEncoder(16, ldm.class_embedder.embedding.weight[-1]))
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask, t = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float(), torch.tensor([10, 90])
    losses = []
    for dtype in (None, torch.bfloat16):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            pred = model(lat, t, torch.tensor([3, 3]), mask)
        losses.append(torch.nn.functional.mse_loss(pred.float(), noise).item())
    assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) < 0.02 * losses[0]


def reference_min_snr(cfg, kind, t, gamma):
    """Hang et al. 2023 from the schedule's definition in float64: min(SNR, g) / SNR (eps), / (SNR + 1) (v),
    min(SNR, g) (x0); SNR = alpha_bar / (1 - alpha_bar) of the linear betas."""
    betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], cfg["num_train_timesteps"], dtype=torch.float64)
    ac = torch.cumprod(1 - betas, 0)[t]
    snr = ac / (1 - ac)
    clipped = snr.clamp(max=gamma)
    return {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]


def test_min_snr_weights_and_weighted_training_loss(work):
    cfg = models.load_ldm(work["ldm"]).noise_scheduler_config
    t = torch.tensor([0, 3, 20, 50, 99])
    for kind in ("epsilon", "v_prediction", "sample"):
        sched = models.noise_scheduler({**cfg, "prediction_type": kind})
        got = models.min_snr_weights(sched, t, 5.0).double()
        assert torch.allclose(got, reference_min_snr(cfg, kind, t, 5.0), rtol=2e-3), kind  # float32 1 - alpha_bar
        assert got.min() > 0 and not torch.allclose(got, torch.ones_like(got))
    # training_loss: --snr_gamma 0 is the plain MSE, gamma > 0 scales each sample's MSE by its weight (batch of 1)
    ldm = models.load_ldm(work["ldm"])
    cn = models.build_controlnet(ldm.unet, 1, ldm.vae_factor)
    model = models.ControlledUNet(ldm.unet, cn, models.DummyEncoder(16, ldm.class_embedder.embedding.weight[-1]))
    run = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext), device=torch.device("cpu"),
                          vae=ldm.vae, ldm=ldm, model=model, sched=models.noise_scheduler(cfg))
    batch = {"image": torch.rand(1, 1, 32, 32) * 2 - 1, "mask": (torch.rand(1, 1, 32, 32) > 0.5).float(),
             "label": torch.tensor([NUM_CLASSES])}
    with torch.no_grad():
        losses = {}
        for gamma in (0.0, 5.0):
            run.args = SimpleNamespace(snr_gamma=gamma)
            torch.manual_seed(11)  # the same posterior sample and noise for both
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch, "randint", lambda *a, **k: torch.tensor([20]))  # the timestep drawn
                losses[gamma] = train.training_loss(run, batch)
    w = reference_min_snr(cfg, "epsilon", torch.tensor([20]), 5.0).float()
    assert w.item() < 0.5  # t = 20: SNR well above 5, so the weight really acts
    assert torch.allclose(losses[5.0], losses[0.0] * w, rtol=1e-5)


def test_controlnet_on_a_v_prediction_ldm(work, tmp_path, capsys):
    ck = load(work["ldm"])
    ck["noise_scheduler_config"] = {**ck["noise_scheduler_config"], "prediction_type": "v_prediction"}
    ldm_v = tmp_path / "ldm_v.pt"
    torch.save(ck, ldm_v)
    args = ["--data_root", work["data"], "--ldm_checkpoint", ldm_v, "--batch_size", 4, "--max_train_steps", 1,
            "--sample_steps", 0, "--val_fraction", 0, "--snr_gamma", 2]
    expect_error(capsys, run_train, args + ["--output_dir", tmp_path / "no", "--prediction_type", "epsilon"],
                 r"--prediction_type epsilon: the LDM .*ldm_v\.pt predicts v_prediction")
    assert not (tmp_path / "no").exists()
    run_train(args + ["--output_dir", tmp_path / "cn"])  # no flag: the LDM's prediction type
    got = load(tmp_path / "cn" / "checkpoint_last.pt")
    assert got["config"]["prediction_type"] == "v_prediction" and got["config"]["snr_gamma"] == 2.0
    assert got["posthoc_ema"] is None and got["config"]["posthoc_ema_every_steps"] == 0


# ---------------------------------------------------------------------------------------------- training
def test_train_writes_best_last_and_resumes_bit_identical(work, trained, capsys):
    ref = load(trained / "checkpoint_last.pt")
    best = load(trained / "checkpoint_best.pt")
    assert ref["model_type"] == "controlnet" and ref["global_step"] == 15 and ref["epoch"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ref["controlnet"])
    assert ref["ldm_fingerprint"] == models.load_ldm(work["ldm"]).fingerprint
    assert np.isfinite(best["val_loss"]) and best["val_loss"] == min(best["val_loss"], ref["val_loss"])
    assert len(re.findall(r"epoch \d step \d+ validation loss", (trained / "log.txt").read_text())) == 3
    assert len(list((trained / "samples").glob("epoch_*.png"))) == 3
    assert any((trained / "tensorboard").iterdir())
    log = (trained / "log.txt").read_text()
    assert re.search(r"ControlNet\s+[\d,]+\s+[\d,]+\s+0\n", log) and re.search(r"UNet\s+([\d,]+)\s+0\s+\1", log)

    # a crash after a mid-epoch checkpoint: NaN at step 8 (the fault hook) leaves the step-6 checkpoint
    out = work["root"] / "run_resume"
    os.environ["DIFFUSION_FAULT_NAN_AT_STEP"] = "8"
    try:
        expect_error(capsys, run_train, base_args(work, out, "--num_epochs", 3, "--ckpt_every_steps", 3, *OBJECTIVE),
                     r"loss is nan at step 8", code=1)
    finally:
        del os.environ["DIFFUSION_FAULT_NAN_AT_STEP"]
    mid = load(out / "checkpoint_last.pt")
    assert (mid["global_step"], mid["epoch"], mid["step_in_epoch"]) == (6, 1, 1)
    expect_error(capsys, run_train, base_args(work, out, "--num_epochs", 3), r"already holds a run", r"--resume")
    run_train(base_args(work, out, "--num_epochs", 3, "--resume"))
    assert "resumed from" in (out / "log.txt").read_text()
    got = load(out / "checkpoint_last.pt")
    for key in ("controlnet", "ema_controlnet", "encoder"):
        assert ref[key].keys() == got[key].keys()
        assert all(torch.equal(ref[key][k], got[key][k]) for k in ref[key]), key
    for i, st in ref["optimizer"]["state"].items():
        assert all(torch.equal(st[n], got["optimizer"]["state"][i][n]) for n in st)
    assert got["global_step"] == 15 and got["val_loss"] == ref["val_loss"]
    # the objective was kept (not repeated on the command line); post-hoc EMA state and snapshots are exact
    assert got["config"]["snr_gamma"] == ref["config"]["snr_gamma"] == 5.0
    assert got["config"]["prediction_type"] == "epsilon" and got["posthoc_ema"]["every_steps"] == 4
    assert "min-SNR gamma 5, post-hoc EMA sigma_rel 0.05,0.1 every 4 steps" in (out / "log.txt").read_text()
    for avg_r, avg_g in zip(ref["posthoc_ema"]["averages"], got["posthoc_ema"]["averages"], strict=True):
        assert all(torch.equal(t, avg_g["ema_controlnet"][n]) for n, t in avg_r["ema_controlnet"].items())
    assert sorted(p.name for p in (trained / "posthoc_ema").iterdir()) == [f"phema_{s:07d}.pt" for s in (4, 8, 12)]
    for name in ("phema_0000008.pt", "phema_0000012.pt"):  # both written after the resume (from step 6)
        a, b = load(trained / "posthoc_ema" / name), load(out / "posthoc_ema" / name)
        assert set(a["averages"][0]["ema_controlnet"]) == set(ref["ema_controlnet"])
        for avg_a, avg_b in zip(a["averages"], b["averages"], strict=True):
            assert all(torch.equal(t, avg_b["ema_controlnet"][n]) for n, t in avg_a["ema_controlnet"].items())


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo notes about lru_cache in diffusers
def test_class_labels_unfrozen_unet_bf16_compile_train(work, capsys):
    out = work["root"] / "run_classes"
    run_train(base_args(work, out, "--num_epochs", 1, "--class_labels_csv", work["root"] / "labels.csv",
                        "--no_freeze_unet", "--sample_steps", 0, "--mixed_precision", "bf16", "--max_train_steps", 2,
                        "--compile", "--compile_backend", "eager"))
    ck = load(out / "checkpoint_last.pt")
    assert ck["global_step"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in ck["controlnet"])
    assert ck["encoder_type"] == "class" and ck["use_class_labels"] and ck["unet_trained"]
    start = models.load_ldm(work["ldm"])
    assert not torch.equal(ck["unet"]["conv_in.weight"], start.unet.state_dict()["conv_in.weight"])
    assert ck["encoder"]["embedding.weight"].shape == (NUM_CLASSES + 1, 16)
    assert re.search(r"Encoder \(class\)\s+64\s+64\s+0", (out / "log.txt").read_text())
    # generation by class and mask together (classifier-free guidance through the same ControlNet)
    gen = inference.main(["--checkpoint", str(out / "checkpoint_last.pt"), "--ldm_checkpoint", str(work["ldm"]),
                          "--mask", str(work["data"] / "masks" / "004.png"), "--class_label", "digit_1",
                          "--cfg_scale", "2", "--num_inference_steps", "2", "--output_dir", str(out / "gen")])
    assert gen.name.endswith("-digit_1-cfg2") and (gen / "004_digit_1_seed42.png").is_file()
    with pytest.raises(SystemExit):
        inference.main(["--checkpoint", str(out / "checkpoint_last.pt"), "--ldm_checkpoint", str(work["ldm"]),
                        "--mask", str(work["data"] / "masks" / "004.png"), "--class_label", "cat"])
    assert "valid: digit_0, digit_1, digit_2" in capsys.readouterr().err


def test_accelerate_launch_two_cpu_processes(work):
    out = work["root"] / "run_ddp"
    proc = run_script("controlnet", ["accelerate", "launch", "--multi_gpu", "--num_processes", "2",
                                     "--main_process_port", str(free_port()), "train.py",
                                     *map(str, base_args(work, out, "--num_epochs", 1, "--batch_size", 2,
                                                         "--sample_steps", 0))], timeout=300)
    log = (out / "log.txt").read_text()
    assert "world size 2 (DistributedType.MULTI_CPU)" in log, proc.stdout[-2000:]
    # 22 training pairs, global batch 2 x 2 = 4 -> 5 steps in one epoch
    ck = load(out / "checkpoint_last.pt")
    assert ck["global_step"] == 5 and ck["world_size"] == 2 and len(ck["rng_states"]) == 2
    assert not torch.equal(ck["rng_states"][0]["torch"], ck["rng_states"][1]["torch"])


def test_sigterm_writes_checkpoint_and_exits_zero(work):
    out = work["root"] / "run_sigterm"
    cmd = [sys.executable, "train.py", *map(str, base_args(work, out, "--num_epochs", 50, "--sample_steps", 0))]
    proc = subprocess.Popen(cmd, cwd=REPO / "controlnet", env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"step 3 epoch", line):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(lines)
    ck = load(out / "checkpoint_last.pt")
    assert ck["global_step"] >= 3 and ck["global_step"] < 250
    assert f"SIGTERM: wrote {out / 'checkpoint_last.pt'} at step {ck['global_step']}" in "".join(lines)
    assert (ck["epoch"], ck["step_in_epoch"]) == divmod(ck["global_step"], 5)


# --------------------------------------------------------------------------------------------- inference
def plain_ldm_sample(ldm_path, seed, steps):
    """The plain LDM's unconditional (null class) DDIM sample, computed from diffusers parts directly."""
    ck = load(ldm_path)
    unet = UNet2DConditionModel.from_config(ck["unet_config"])
    unet.load_state_dict(ck["ema_unet"])
    vae = AutoencoderKL.from_pretrained(ck["vae"])
    null = ck["ema_class_embedder"]["embedding.weight"][ck["num_classes"]].view(1, 1, -1)
    cfg = ck["noise_scheduler_config"]
    sched = DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_schedule=cfg["beta_schedule"],
                          beta_start=cfg["beta_start"], beta_end=cfg["beta_end"],
                          prediction_type=cfg["prediction_type"], clip_sample=False)
    sched.set_timesteps(steps)
    size = ck["image_size"] // 4
    x = torch.randn((4, size, size), generator=torch.Generator().manual_seed(seed))[None] * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = unet(sched.scale_model_input(x, t), torch.full((1,), int(t)), encoder_hidden_states=null).sample
            x = sched.step(eps, t, x).prev_sample
        img = vae.decode(x / ck["vae_scaling_factor"]).sample.clamp(-1, 1).mean(1)[0]
    return ((img + 1) * 127.5).round().to(torch.uint8).numpy()


def test_scale_zero_equals_plain_ldm(work, trained, tmp_path):
    ck = load(trained / "checkpoint_best.pt")
    g = torch.Generator().manual_seed(1)
    for k, v in ck["ema_controlnet"].items():  # make the ControlNet's residuals clearly non-zero
        if k.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
            v.copy_(torch.randn(v.shape, generator=g) * 0.3)
    torch.save(ck, tmp_path / "strong.pt")
    mask = work["data"] / "masks" / "005.png"
    common = ["--checkpoint", tmp_path / "strong.pt", "--ldm_checkpoint", work["ldm"], "--mask", mask,
              "--num_inference_steps", 4, "--seed", 7, "--output_dir", tmp_path / "gen"]
    out0 = inference.main([str(a) for a in common + ["--controlnet_scale", 0]])
    out1 = inference.main([str(a) for a in common + ["--controlnet_scale", 1]])
    ref = plain_ldm_sample(work["ldm"], 7, 4)
    img0 = np.asarray(Image.open(out0 / "005_seed7.png"))
    img1 = np.asarray(Image.open(out1 / "005_seed7.png"))
    assert img0.dtype == np.uint8 and img0.shape == (32, 32)
    assert np.array_equal(img0, ref)
    assert np.abs(img1.astype(int) - ref).max() > 0


def test_inference_from_one_mask_and_from_a_folder(work, trained, tmp_path, capsys):
    ck = trained / "checkpoint_best.pt"
    one = inference.main(["--checkpoint", str(ck), "--ldm_checkpoint", str(work["ldm"]), "--mask",
                          str(work["data"] / "masks" / "003.png"), "--output_dir", str(tmp_path / "g"),
                          "--num_images", "2", "--num_inference_steps", "3", "--scheduler", "ddpm",
                          "--save_comparison"])
    assert sorted(p.name for p in one.glob("*.png")) == ["003_seed42.png", "003_seed43.png"]
    assert Image.open(one / "003_seed42.png").mode == "L" and Image.open(one / "003_seed42.png").size == (32, 32)
    comp = Image.open(one / "comparisons" / "003_seed42.png")
    assert comp.size[0] > comp.size[1] >= 128
    assert "ddpm3" in one.name and "scale1" in one.name
    printed = capsys.readouterr().out
    assert "Generated 2 image(s)" in printed and "s/image" in printed and "s/step" in printed

    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        Image.open(work["data"] / "masks" / f"{i:03d}.png").resize((20, 20), Image.NEAREST).save(masks / f"m{i}.png")
    args = ["--checkpoint", str(ck), "--ldm_checkpoint", str(work["ldm"]), "--mask_folder", str(masks),
            "--output_dir", str(tmp_path / "g"), "--num_images", "2", "--num_inference_steps", "3",
            "--scheduler", "dpmsolver", "--batch_size", "4", "--report_dice"]
    out = inference.main(args)
    files = sorted(p.name for p in out.glob("*.png"))
    assert files == [f"m{i}_seed{42 + 2 * i + j}.png" for i in range(3) for j in range(2)]
    rows = (out / "dice.csv").read_text().strip().splitlines()
    assert rows[0].startswith("image,mask,seed,class,threshold,dice") and len(rows) == 7
    assert all(0 <= float(r.split(",")[-1]) <= 1 for r in rows[1:])
    assert "mean Dice" in capsys.readouterr().out
    # a rerun never overwrites: everything is skipped
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    inference.main(args)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == before
    assert "6 already there" in capsys.readouterr().out
    # dice itself against hand-computed cases
    a = np.zeros((4, 4), bool)
    a[:2] = True
    assert inference.dice(a, a) == 1.0 and inference.dice(a, ~a) == 0.0 and abs(inference.dice(a, np.ones_like(a)) - 2 / 3) < 1e-9
    assert inference.otsu_threshold(np.array([[10, 10, 200, 200]], np.uint8)) in range(10, 200)


# --------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_one_line_errors(work, trained, tmp_path, capsys):
    bad = tmp_path / "bad"
    out = tmp_path / "never_written"
    ck = trained / "checkpoint_best.pt"
    # unpaired files: refused unless --skip_unpaired
    d = tmp_path / "unpaired"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for i in range(6):
        Image.new("L", (32, 32)).save(d / "images" / f"{i}.png")
        if i:
            Image.new("L", (32, 32)).save(d / "masks" / f"{i}.png")
    Image.new("L", (32, 32)).save(d / "masks" / "zz.png")
    tr = ["--ldm_checkpoint", work["ldm"], "--output_dir", out]
    expect_error(capsys, train.main, ["--data_root", d, *tr], r"1 image\(s\) without a mask: 0\.png",
                 r"1 mask\(s\) without an image: zz\.png", "--skip_unpaired")
    # wrong mask channels (RGB mask, --mask_channels 1) names the file
    Image.new("RGB", (32, 32)).save(d / "masks" / "0.png")
    (d / "masks" / "zz.png").unlink()
    expect_error(capsys, train.main, ["--data_root", d, *tr], r"mask .*0\.png has 3 channel", "--mask_channels 3")
    # a text file named .png
    Image.new("L", (32, 32)).save(d / "masks" / "0.png")
    (d / "images" / "3.png").write_text("not an image")
    expect_error(capsys, train.main, ["--data_root", d, *tr], r"image .*3\.png is not a readable image")
    (d / "images" / "3.png").unlink()
    Image.new("L", (32, 32)).save(d / "images" / "3.png")
    # LDM checkpoint: missing, not an LDM, pickled
    expect_error(capsys, train.main, ["--data_root", d, "--ldm_checkpoint", bad / "nope.pt", "--output_dir", out],
                 r"--ldm_checkpoint .*nope\.pt does not exist")
    expect_error(capsys, train.main, ["--data_root", d, "--ldm_checkpoint", ck, "--output_dir", out],
                 r"is not an LDM checkpoint \(it is: controlnet\)")
    torch.save({"model_type": "ldm", "obj": re.compile("x")}, tmp_path / "pickled.pt")
    expect_error(capsys, train.main, ["--data_root", d, "--ldm_checkpoint", tmp_path / "pickled.pt",
                                      "--output_dir", out], r"not a plain checkpoint", "--trust_checkpoint")
    expect_error(capsys, train.main, ["--data_root", d, *tr, "--batch_size", 0], r"--batch_size is out of range")
    (tmp_path / "notes.pt").write_text("just text")
    expect_error(capsys, train.main, ["--data_root", d, "--ldm_checkpoint", tmp_path / "notes.pt", "--output_dir", out],
                 r"--ldm_checkpoint .*notes\.pt is not a checkpoint")
    (tmp_path / "bad.csv").write_text("0,digit_9\n")
    expect_error(capsys, train.main, ["--data_root", d, *tr, "--class_labels_csv", tmp_path / "bad.csv"],
                 r"unknown class 'digit_9'; the LDM's classes are: digit_0, digit_1, digit_2")
    expect_error(capsys, train.main, ["--data_root", d, *tr, "--class_labels_csv", work["root"] / "labels.csv"],
                 r"has no class for 6 image")
    # the objective: the LDM's prediction type only (one line), gamma >= 0, a resumed run's gamma kept
    err = expect_error(capsys, train.main, ["--data_root", d, *tr, "--prediction_type", "v_prediction"],
                       r"--prediction_type v_prediction: the LDM .*ldm_f4_s0\.pt predicts epsilon", "drop the flag")
    assert len(err.strip().splitlines()) == 1
    expect_error(capsys, train.main, ["--data_root", d, *tr, "--snr_gamma", -1], r"--snr_gamma is out of range: -1")
    expect_error(capsys, train.main, ["--data_root", d, *tr, "--posthoc_ema_sigma_rels", "0.5"],
                 r"--posthoc_ema_sigma_rels '0\.5'")
    expect_error(capsys, run_train, base_args(work, trained, "--num_epochs", 3, "--resume", "--snr_gamma", 0),
                 r"was trained with snr_gamma=5\.0, this run asks for 0\.0", "--output_dir")
    assert not out.exists()

    inf = ["--checkpoint", ck, "--ldm_checkpoint", work["ldm"], "--output_dir", out]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    expect_error(capsys, inference.main, [*inf, "--mask_folder", tmp_path / "empty"], r"--mask_folder .*empty has no images")
    Image.new("RGB", (32, 32)).save(tmp_path / "rgb.png")
    expect_error(capsys, inference.main, [*inf, "--mask", tmp_path / "rgb.png"], r"mask .*rgb\.png has 3 channel")
    expect_error(capsys, inference.main, ["--checkpoint", ck, "--ldm_checkpoint", work["ldm_other"], "--mask",
                                          work["data"] / "masks" / "000.png", "--output_dir", out],
                 r"was trained from another LDM", r"UNet weights differ", r"ldm_f4_s0\.pt")
    expect_error(capsys, inference.main, ["--checkpoint", work["ldm"], "--ldm_checkpoint", work["ldm"], "--mask",
                                          work["data"] / "masks" / "000.png"], r"not a ControlNet checkpoint")
    expect_error(capsys, inference.main, [*inf, "--mask", work["data"] / "masks" / "000.png", "--class_label",
                                          "digit_1"], r"trained without class labels")
    expect_error(capsys, inference.main, [*inf, "--mask", work["data"] / "masks" / "000.png",
                                          "--controlnet_scale", -1], r"--controlnet_scale is out of range")
    assert not out.exists()


# -------------------------------------------------------------------------------------------------- flags
def test_flag_vocabulary_and_old_aliases():
    req = ["--data-root", "d", "--ldm-checkpoint", "l"]
    new = train.parse_args(req + ["--num_epochs", "3", "--batch_size", "2", "--learning_rate", "0.5",
                                  "--ckpt_every_steps", "7", "--ckpt_every_epochs", "2", "--log_every_steps", "4",
                                  "--max_train_steps", "9", "--max_minutes", "1.5", "--no_random_flip",
                                  "--resume"])
    old = train.parse_args(["--dataset_path", "d", "--ldm_checkpoint", "l", "--epochs", "3", "--train_batch_size",
                            "2", "--lr", "0.5", "--save-every-steps", "7", "--val_every", "2", "--log-every", "4",
                            "--max_steps", "9", "--time_limit_minutes", "1.5", "--no-flip", "--resume", "auto"])
    assert vars(new) == vars(old)
    assert (new.data_root, new.num_epochs, new.batch_size, new.ckpt_every_steps, new.random_flip,
            new.resume) == ("d", 3, 2, 7, False, "auto")
    d = train.parse_args(req)
    assert d.random_flip and d.freeze_unet and d.mixed_precision == "no" and d.resume is None
    assert not train.parse_args(req + ["--no_hflip"]).random_flip
    assert not train.parse_args(req + ["--train-unet"]).freeze_unet
    assert train.parse_args(req + ["--data_path", "e"]).data_root == "e"
    assert train.parse_args(req + ["--resume", "x.pt"]).resume == "x.pt"


# ------------------------------------------------------------------- the LDM -> ControlNet checkpoint contract
@pytest.fixture(scope="module")
def real_ldm(work):
    """An LDM checkpoint written by ldm/train.py itself (2 steps on the digit images as 3 class folders)."""
    root = work["root"]
    for i in range(24):
        dst = root / "ldm_classes" / f"digit_{i % NUM_CLASSES}" / f"{i:03d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((work["data"] / "images" / f"{i:03d}.png").read_bytes())
    out = root / "ldm_run"
    run_script("ldm", ["train.py", "--data_root", str(root / "ldm_classes"), "--output_dir", str(out),
                       "--vae", str(root / "vae_f4_s0"), "--image_size", "32", "--batch_size", "4",
                       "--num_epochs", "1", "--max_train_steps", "2", "--val_split", "0",
                       "--sample_every_epochs", "0", "--log_every_steps", "1", "--seed", "0",
                       "--unet_preset", "tiny", "--block_out_channels", "16", "32", "--norm_num_groups", "8",
                       "--cross_attention_dim", "16", "--attention_head_dim", "2"], timeout=600)
    path = out / "checkpoint_last.pt"
    assert path.is_file(), sorted(p.name for p in out.iterdir())
    return path


def test_controlnet_trains_and_samples_on_an_ldm_written_by_ldm_train(work, real_ldm, tmp_path):
    ck = load(real_ldm)
    assert models.validate_ldm_checkpoint(ck, real_ldm) is ck
    ldm = models.load_ldm(real_ldm)
    assert ldm.class_names == [f"digit_{i}" for i in range(NUM_CLASSES)] and ldm.num_classes == NUM_CLASSES
    assert (ldm.image_size, ldm.image_channels, ldm.vae_factor, ldm.latent_size) == (32, 1, 4, 8)
    assert ldm.scaling_factor == ck["vae_scaling_factor"]
    assert all(torch.equal(v, ck["ema_unet"][k]) for k, v in ldm.unet.state_dict().items())  # EMA preferred
    out = tmp_path / "cn"
    run_train(["--data_root", work["data"], "--ldm_checkpoint", real_ldm, "--output_dir", out, "--batch_size", 4,
               "--num_epochs", 1, "--max_train_steps", 2, "--sample_steps", 0, "--val_fraction", 0,
               "--class_labels_csv", work["root"] / "labels.csv"])
    cn = load(out / "checkpoint_last.pt")
    assert cn["global_step"] == 2 and cn["ldm_fingerprint"] == ldm.fingerprint and cn["class_names"] == ldm.class_names
    gen = inference.main(["--checkpoint", str(out / "checkpoint_last.pt"), "--ldm_checkpoint", str(real_ldm),
                          "--mask", str(work["data"] / "masks" / "002.png"), "--class_label", "digit_2",
                          "--num_inference_steps", "2", "--output_dir", str(tmp_path / "gen")])
    img = Image.open(gen / "002_digit_2_seed42.png")
    assert img.mode == "L" and img.size == (32, 32)


REQUIRED = [k for k, (required, _, _) in models.LDM_CONTRACT.items() if required]
WRONG = {
    "model_type": "dit", "format_version": 2, "unet_config": "UNet2DConditionModel", "unet": {"conv_in.weight": 1.0},
    "ema_unet": "weights", "class_embedder": {"weight": torch.zeros(4, 16)}, "ema_class_embedder": 5,
    "num_classes": "3", "class_names": "digit_0", "vae": 3, "vae_scaling_factor": -1.0, "image_size": 32.0,
    "image_channels": 2, "noise_scheduler_config": {"num_train_timesteps": 1000},
}
CONTRACT_CASES = ([(k, "missing") for k in REQUIRED] + [(k, "wrong") for k in WRONG]
                  + [("class_names", "count"), ("class_embedder", "rows")])


@pytest.mark.parametrize("key,how", CONTRACT_CASES, ids=[f"{k}-{h}" for k, h in CONTRACT_CASES])
def test_each_missing_or_wrong_ldm_key_gives_one_line_error(work, real_ldm, tmp_path, capsys, key, how):
    ck = load(real_ldm)
    if how == "missing":
        del ck[key]
    elif how == "wrong":
        ck[key] = WRONG[key]
    elif how == "count":
        ck["class_names"] = ck["class_names"][:-1]
    else:
        ck["class_embedder"] = {"embedding.weight": torch.zeros(NUM_CLASSES, 16)}
    path = tmp_path / "broken_ldm.pt"
    torch.save(ck, path)
    out = tmp_path / "out"
    err = expect_error(capsys, run_train, ["--data_root", work["data"], "--ldm_checkpoint", path, "--output_dir", out,
                                           "--batch_size", 4], "--ldm_checkpoint", re.escape(str(path)), f"'{key}'")
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    with pytest.raises(models.UserError) as e:
        models.validate_ldm_checkpoint(ck, path)
    assert str(e.value) == err.strip()[len("error: "):]


def test_optional_ldm_keys_may_be_absent_or_none(real_ldm):
    ck = load(real_ldm)
    ck["ema_unet"] = None
    del ck["ema_class_embedder"]
    models.validate_ldm_checkpoint(ck, real_ldm)
