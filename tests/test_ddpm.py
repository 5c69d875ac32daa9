"""Tests of ddpm/: networks, noise process, samplers, training through every entry point, exact resume,
distributed training and sampling (torchrun, 2 gloo processes) and the one-line errors for bad input.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ddpm.py -q
Tiny configs on CPU (widths 8, images 8-32 px, few noise steps); data sets are written by the tests.
"""
import json
import os
import re
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import (BOOT, assert_same_updates, free_port, install_fault_hooks, load_folder, run_main_expect,
                          run_script, script_env, sgd_updates)

models, dataset, train, inference, ddpm_uncond, ddpm_cond, modules, utils, runtime = load_folder(
    "ddpm", "models", "dataset", "train", "inference", "ddpm", "ddpm_conditional", "modules", "utils", "runtime")
install_fault_hooks(runtime)  # DIFFUSION_FAULT_*_AT_STEP for the in-process runs below (tests/faults/fault_hooks.py)

TINY = ["--base-channels", "8", "--time-dim", "16", "--noise-steps", "20", "--log-every", "1"]
TINY_KW = dict(base_channels=8, time_dim=16, noise_steps=20, log_every=1, device="cpu")


def write_class_folders(root, classes=3, per_class=6, size=16, mode="L", seed=0):
    """Class folders of small random-ish images (a bright square per class on noise)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = Path(root) / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = (rng.random((size, size)) * 60).astype(np.uint8)
            a[2 + c:8 + c, 3:9] = 230
            img = Image.fromarray(a, "L")
            (img.convert(mode) if mode != "L" else img).save(d / f"{i:02d}.png")
    return Path(root)


@pytest.fixture(scope="module")
def gray_data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("gray"))


@pytest.fixture(scope="module")
def rgb_data(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("rgb"), classes=2, per_class=4, mode="RGB")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ------------------------------------------------------------------ networks
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 16), (1, 24), (3, 32)])
def test_unet_shapes(channels, size):
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([0, 19])
    u = models.UNet(c_in=channels, c_out=channels, img_size=size, base_channels=8, time_dim=16)
    c = models.UNet_conditional(c_in=channels, c_out=channels, img_size=size, base_channels=8, time_dim=16,
                                num_classes=3)
    for out in (u(x, t), c(x, t, torch.tensor([0, 2])), c(x, t, None)):
        assert out.shape == x.shape and torch.isfinite(out).all()
    # classes change the prediction (the class embedding is wired in), 'no class' is its own token
    assert not torch.allclose(c(x, t, torch.tensor([0, 0])), c(x, t, torch.tensor([1, 1])))


def test_unet_rejects_size_not_divisible_by_8():
    with pytest.raises(utils.UserError, match="not divisible by 8"):
        models.UNet(img_size=20)


def test_channels_last_matches_default_layout():
    m = models.UNet_conditional(c_in=3, c_out=3, img_size=16, base_channels=8, time_dim=16, num_classes=2)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 7]), torch.tensor([0, 1])
    ref = m(x, t, y)
    m = m.to(memory_format=torch.channels_last)
    out = m(x.contiguous(memory_format=torch.channels_last), t, y)
    assert torch.allclose(ref, out, atol=1e-3)  # same function, different kernel summation order


def test_spec_default_conditional_architecture_matches_default_training_config():
    # UNet_conditional(num_classes=10, img_size=64) must load what the default conditional training builds.
    spec = modules.UNet_conditional(num_classes=10, img_size=64)
    cfg = dict(train.BASE_SETTINGS, channels=3)
    built = models.rebuild_model(train.model_config(cfg, 3, 10))
    a, b = spec.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert spec.c_in == 3 and 15e6 < modules.count_parameters(spec) < 40e6  # same order as the spec's ~23M


# ------------------------------------------------------------------ noise process
def test_schedules_match_diffusers_reference():
    from diffusers import DDPMScheduler

    for ours, theirs in (("linear", "linear"), ("cosine", "squaredcos_cap_v2")):
        d = models.Diffusion(noise_steps=1000, img_size=8, device="cpu", schedule=ours)
        ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod.double()
        assert torch.allclose(d.alpha_hat64, ref, atol=1e-6)
        ah = d.alpha_hat64
        assert (ah[1:] < ah[:-1]).all() and ah[0] > 0.99 and ah[-1] < 1e-2
    lin = models.Diffusion(img_size=8, device="cpu")
    assert lin.noise_steps == 1000 and abs(lin.beta64[0] - 1e-4) < 1e-12 and abs(lin.beta64[-1] - 0.02) < 1e-12


def test_noise_images_has_closed_form_moments():
    d = models.Diffusion(noise_steps=100, img_size=8, device="cpu")
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 40)
    xt, _ = d.noise_images(x0, t, generator=torch.Generator().manual_seed(0))
    ah = d.alpha_hat[40].item()
    assert abs(xt.mean().item() - 0.5 * ah ** 0.5) < 0.02
    assert abs(xt.var().item() - (1 - ah)) < 0.03
    ts = d.sample_timesteps(5000, generator=torch.Generator().manual_seed(0), device="cpu")
    assert ts.min() >= 0 and ts.max() == 99


class OracleModel(torch.nn.Module):
    """Predicts the exact noise for a known clean image: every correct sampler must return that image."""

    def __init__(self, target, num_classes=None):
        super().__init__()
        self.register_buffer("target", target)
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.c_in, self.num_classes = target.shape[0], num_classes
        self.ah = None

    def forward(self, x, t, y=None):
        ah = self.ah[t].float()[:, None, None, None]
        return (x - ah.sqrt() * self.target) / (1 - ah).sqrt()


@pytest.mark.parametrize("sampler,steps,cfg", [("ddpm", None, 3.0), ("ddpm", 7, 1.0), ("ddim", 10, 3.0),
                                               ("ddim", 50, 0.0)])
def test_samplers_recover_the_image_from_an_oracle(sampler, steps, cfg):
    target = torch.rand(1, 8, 8) * 1.6 - 0.8
    d = models.Diffusion(noise_steps=50, img_size=8, device="cpu", schedule="cosine")
    m = OracleModel(target, num_classes=4)
    m.ah = d.alpha_hat64
    out = d.sample(m, 3, labels=torch.tensor([0, 1, 2]), cfg_scale=cfg, sampler=sampler, steps=steps,
                   seeds=[1, 2, 3], progress=False)
    expect = ((target.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert out.dtype == torch.uint8 and out.shape == (3, 1, 8, 8)
    assert (out.int() - expect.int()).abs().max() <= 1


@pytest.mark.parametrize("sampler,cfg,conditional", [("ddpm", 3.0, True), ("ddim", 3.0, True),
                                                     ("ddim", 1.0, True), ("ddpm", 3.0, False)])
def test_same_seed_same_image_at_any_batch_size(sampler, cfg, conditional):
    torch.manual_seed(0)
    kw = dict(c_in=1, c_out=1, img_size=8, base_channels=8, time_dim=16)
    m = models.UNet_conditional(num_classes=3, **kw) if conditional else models.UNet(**kw)
    d = models.Diffusion(noise_steps=20, img_size=8, device="cpu")
    seeds = [100, 101, 102, 103, 104]
    labels = torch.tensor([0, 1, 2, 0, 1]) if conditional else None
    full = d.sample(m, 5, labels=labels, cfg_scale=cfg, sampler=sampler, steps=10, seeds=seeds, progress=False)
    parts = [d.sample(m, len(s), labels=None if labels is None else labels[i:i + len(s)], cfg_scale=cfg,
                      sampler=sampler, steps=10, seeds=s, progress=False)
             for i, s in ((0, seeds[:2]), (2, seeds[2:]))]
    # Per-image seeds make an image independent of its batch; the kernels for a batch of 2, 3 or 5 may
    # still sum in another order (oneDNN picks its blocking by shape), so a pixel may round to the
    # neighbouring 8-bit level: at most 1 level, and almost every pixel exactly equal.
    diff = (full.int() - torch.cat(parts).int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.99
    assert (full[0].int() - full[1].int()).abs().float().mean() > 5  # different seeds -> different images
    if conditional and cfg != 1.0:  # guidance changes the result
        other = d.sample(m, 5, labels=labels, cfg_scale=1.0, sampler=sampler, steps=10, seeds=seeds,
                         progress=False)
        assert not torch.equal(full, other)


def test_spec_sample_call_returns_uint8():
    model = modules.UNet_conditional(num_classes=4, img_size=16, base_channels=8, time_dim=16, c_in=3, c_out=3)
    diffusion = ddpm_cond.Diffusion(img_size=16, device="cpu", noise_steps=10)
    labels = torch.Tensor([0, 1, 2, 3]).long()
    samples = diffusion.sample(model, n=4, labels=labels, cfg_scale=3, log_time=True)
    assert samples.dtype == torch.uint8 and samples.shape == (4, 3, 16, 16)
    assert diffusion.last_timing["images"] == 4 and diffusion.last_timing["steps"] == 10


# ------------------------------------------------------------------ data
def test_dataset_accepts_16bit_rgba_and_mixed_sizes(tmp_path):
    d = tmp_path / "c0"
    d.mkdir()
    a16 = np.full((12, 12), 65535, dtype=np.uint16)
    a16[:, :6] = 0
    Image.fromarray(a16).save(d / "sixteen.png")  # 16-bit grayscale
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10  # red, nearly transparent: alpha must be dropped, not blended
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    ds = dataset.ImageFolderDataset(tmp_path, image_size=8, channels="auto")
    assert ds.channels == 3 and len(ds) == 2
    rgba_t, sixteen_t = ds[0][0], ds[1][0]  # sorted: rgba.png, sixteen.png
    assert rgba_t.shape == (3, 8, 8) and torch.allclose(rgba_t[0], torch.ones(8, 8))
    assert sixteen_t.shape == (3, 8, 8)
    assert sixteen_t[0, :, 0].max() == -1.0 and sixteen_t[0, :, -1].min() == 1.0  # full range, not clipped
    gray = dataset.ImageFolderDataset(tmp_path / "c0", 8, "auto", conditional=False)
    assert gray.channels == 3  # one RGBA file -> colour


def test_flips_are_a_function_of_seed_epoch_index():
    idx = torch.arange(64)
    a, b = dataset.flip_mask(idx, 1, 0), dataset.flip_mask(idx, 1, 0)
    assert torch.equal(a, b) and 10 < int(a.sum()) < 54
    assert not torch.equal(a, dataset.flip_mask(idx, 1, 1))
    assert torch.equal(dataset.flip_mask(idx[5:9], 1, 0), a[5:9])


# ------------------------------------------------------------------ flags
def test_flag_vocabulary_aliases_and_launch_names():
    """Today's names, their other spelling and the old DDPM / spec names set the same setting."""
    parse = train.build_parser().parse_args
    for new, old, value in (("--data_root", "--dataset-path", "d"), ("--num_epochs", "--epochs", "3"),
                            ("--batch_size", "--train_batch_size", "5"), ("--learning_rate", "--lr", "0.5"),
                            ("--ckpt_every_steps", "--save-every-steps", "7"), ("--ckpt_every_steps", "--ckpt-every", "7"),
                            ("--ckpt_every_epochs", "--save-every-epochs", "2"),
                            ("--sample_every_epochs", "--sample-every", "4"), ("--log_every_steps", "--log-every", "9")):
        dest = new[2:]
        for spelling in (new, new.replace("_", "-"), old):
            assert str(getattr(parse([spelling, value]), dest)) == value, spelling
    assert parse(["--random-flip"]).random_flip is True and parse(["--no_random_flip"]).random_flip is False
    assert parse([]).random_flip is None and parse([]).resume is None
    assert parse(["--resume"]).resume == "auto" and parse(["--resume", "x/train_state.pt"]).resume == "x/train_state.pt"
    # launch() sets args.epochs / args.dataset_path / args.lr; a command-line flag (today's name) wins
    args = train.default_args()
    args.epochs, args.dataset_path, args.lr = 500, "/data", 1e-3
    given = train.given_settings(args)
    assert (given["num_epochs"], given["data_root"], given["learning_rate"]) == (500, "/data", 1e-3)
    args.num_epochs = 7
    assert train.given_settings(args)["num_epochs"] == 7 and "epochs" not in train.given_settings(args)


# ------------------------------------------------------------------ training entry points
def tiny_launch_kw(data, work, **extra):
    return dict(dataset_path=str(data), work_dir=str(work), image_size=16, epochs=1, batch_size=4,
                sample_every=1, grid_images=4, sampler="ddim", sampling_steps=4, **TINY_KW, **extra)


def test_launch_unconditional_and_conditional(gray_data, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(gray_data.rglob("*.png"))[:8]:
        (flat / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    run = ddpm_uncond.launch(**tiny_launch_kw(flat, tmp_path / "u"))
    assert run == tmp_path / "u" / "models" / "DDPM_Unconditional"
    run_c = ddpm_cond.launch(**tiny_launch_kw(gray_data, tmp_path / "c", num_classes=3))
    assert run_c == tmp_path / "c" / "models" / "DDPM_conditional"
    for r, work, classes in ((run, tmp_path / "u", None), (run_c, tmp_path / "c", 3)):
        sd = torch.load(r / "ckpt.pt")  # default torch.load: a plain state dict
        assert all(torch.is_tensor(v) for v in sd.values()) and not any(k.startswith(("module.", "_orig_mod."))
                                                                        for k in sd)
        assert torch.load(r / "ema_ckpt.pt").keys() == sd.keys()
        state = torch.load(r / "train_state.pt", weights_only=True)
        assert state["model_type"] == "ddpm" and state["step"] == (2 if classes is None else 4)
        assert state["config"]["num_classes"] == classes and state["config"]["channels"] == 1
        cfg = json.loads((r / "config.json").read_text())
        assert cfg["model"]["c_in"] == 1 and cfg["model"]["img_size"] == 16
        grid = list((work / "results" / r.name).glob("*.png"))
        assert len(grid) == 1 and Image.open(grid[0]).mode == "L"  # grayscale stays grayscale
        assert list((work / "runs" / r.name).glob("events.out.tfevents.*"))
        log = (r / "log.txt").read_text()
        assert "world size 1" in log and "trainable" in log and re.search(r"step \d+ epoch 0 loss \d", log)


def test_default_architecture_run_and_spec_snippet(tmp_path, monkeypatch, capsys):
    """Train the spec's default conditional model (3 channels, 64 px, width 64) for one step, then run the
    spec's snippet: UNet_conditional(num_classes=10, img_size=64).load_state_dict(torch.load(ckpt.pt))."""
    data = tmp_path / "data"
    for c in range(10):
        (data / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 20 * c, np.uint8)).save(data / f"c{c}" / "0.png")
    monkeypatch.chdir(tmp_path)
    train.main(["--dataset-path", str(data), "--epochs", "1", "--batch-size", "10", "--sample-every", "0",
                "--noise-steps", "10"])
    assert "parameters" in capsys.readouterr().out
    model = modules.UNet_conditional(num_classes=10, img_size=64)
    model.load_state_dict(torch.load("./models/DDPM_conditional/ckpt.pt"))
    diffusion = ddpm_cond.Diffusion(img_size=64, device="cpu", noise_steps=10)
    labels = torch.Tensor([0, 1, 2, 3]).long()
    samples = diffusion.sample(model, n=4, labels=labels, cfg_scale=3, log_time=True, steps=2)  # 2 steps: CPU time
    assert samples.shape == (4, 3, 64, 64) and samples.dtype == torch.uint8


def test_cli_train_and_sample_modes(gray_data, tmp_path):
    work = tmp_path / "w"
    proc = run_script("ddpm", ["ddpm_conditional_ddp.py", "--mode", "train_ddp", "--dataset-path", str(gray_data),
                               "--work_dir", str(work), "--image-size", "16", "--epochs", "1", "--batch-size", "6",
                               "--sample-every", "0", *TINY])
    assert "world size 1" in proc.stdout and "training finished: 3 steps" in proc.stdout
    ckpt = work / "models" / "DDPM_conditional" / "ema_ckpt.pt"
    out = tmp_path / "s"
    proc = run_script("ddpm", ["ddpm_conditional_ddp.py", "--mode", "sample", "--ckpt", str(ckpt),
                               "--num-samples", "4", "--class-labels", "0", "class_2", "--cfg-scale", "3",
                               "--output-dir", str(out)])
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["class_0_seed0.png", "class_0_seed2.png", "class_2_seed1.png", "class_2_seed3.png"]
    assert Image.open(out / names[0]).size == (16, 16) and Image.open(out / names[0]).mode == "L"
    assert "s/image" in proc.stdout and "ms/step" in proc.stdout and "20 steps" in proc.stdout
    assert (tmp_path / "s_grids" / "all_classes.png").is_file()


# ------------------------------------------------------------------ exact resume, SIGTERM, NaN
def resume_args(data, work):
    return ["--dataset-path", str(data), "--work-dir", str(work), "--image-size", "8", "--epochs", "3",
            "--batch-size", "4", "--save-every-steps", "2", "--random-flip", "--ema-start", "2", "--ema-decay",
            "0.9", "--lr-schedule", "cosine", "--warmup-steps", "2", "--sample-every", "0", *TINY]


def final_state(work):
    run = Path(work) / "models" / "DDPM_conditional"
    st = torch.load(run / "train_state.pt", weights_only=True)
    return torch.load(run / "ckpt.pt"), torch.load(run / "ema_ckpt.pt"), st


def assert_same_state(a, b):
    for x, y in zip(a[:2], b[:2]):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    oa, ob = a[2]["optimizer"]["state"], b[2]["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[k][n], ob[k][n]) for k in oa for n in ("exp_avg", "exp_avg_sq", "step"))
    assert a[2]["step"] == b[2]["step"] == 12


def test_resume_after_kill_and_sigterm_is_bit_identical(gray_data, tmp_path, capsys):
    train.main(resume_args(gray_data, tmp_path / "ref"))  # uninterrupted: 3 epochs x 4 steps
    ref = final_state(tmp_path / "ref")
    # SIGKILL right after step 5 (last checkpoint: step 4, mid-epoch 1), then resume.
    proc = run_script("ddpm", [str(BOOT), "train.py", *resume_args(gray_data, tmp_path / "kill")], check=False,
                      env=script_env(DIFFUSION_FAULT_KILL_AT_STEP=5))
    assert proc.returncode == -9
    assert torch.load(tmp_path / "kill/models/DDPM_conditional/train_state.pt", weights_only=True)["step"] == 4
    train.main(resume_args(gray_data, tmp_path / "kill") + ["--resume"])
    assert "resumed" in capsys.readouterr().out
    assert_same_state(final_state(tmp_path / "kill"), ref)
    # SIGTERM during step 7: that step finishes, a checkpoint is written, exit code 0.
    os.environ["DIFFUSION_FAULT_SIGTERM_AT_STEP"] = "7"
    try:
        train.main(resume_args(gray_data, tmp_path / "term"))
    finally:
        del os.environ["DIFFUSION_FAULT_SIGTERM_AT_STEP"]
    assert "SIGTERM received: checkpoint written at step 7" in capsys.readouterr().out
    train.main(resume_args(gray_data, tmp_path / "term") + ["--resume"])
    assert_same_state(final_state(tmp_path / "term"), ref)


def test_max_train_steps_and_resume_from_a_path(gray_data, tmp_path, capsys):
    """--max_train_steps ends the run mid-epoch with a checkpoint; --resume PATH continues from that file."""
    train.main(resume_args(gray_data, tmp_path / "a") + ["--max_train_steps", "3"])
    state = torch.load(tmp_path / "a/models/DDPM_conditional/train_state.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    assert "training finished: 3 steps" in capsys.readouterr().out
    src = tmp_path / "kept.pt"
    src.write_bytes((tmp_path / "a/models/DDPM_conditional/train_state.pt").read_bytes())
    train.main(resume_args(gray_data, tmp_path / "a") + ["--max_train_steps", "6", "--resume", str(src)])
    assert f"resumed {src} at step 3 (epoch 0, batch 3 of 4)" in capsys.readouterr().out
    assert torch.load(tmp_path / "a/models/DDPM_conditional/train_state.pt", weights_only=True)["step"] == 6
    msg = run_main_expect(train.main, resume_args(gray_data, tmp_path / "b") + ["--resume"], capsys)
    assert "--resume:" in msg and "train_state.pt does not exist" in msg


def test_compile_trains_like_eager(gray_data, tmp_path):
    """--compile (inductor) computes the eager gradients and saves plain, unprefixed state dicts.

    Compared with SGD in place of AdamW (see repo_helpers.assert_same_updates): AdamW's first steps move
    every weight by ~lr whatever the size of its gradient, so weights of differently compiled runs cannot
    be compared tightly on CPUs whose kernels sum in another order (AVX-512 vs AVX2).
    """
    updates = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"]), ("other_data", None)):
        argv = resume_args(gray_data, tmp_path / name)
        if extra is None:  # the same start and seeds, but no flips: other inputs
            argv, extra = [a for a in argv if a != "--random-flip"], []
        updates[name] = sgd_updates("ddpm", ["train.py", *argv, "--epochs", "1", "--lr", "0.05", *extra],
                                    tmp_path / f"{name}.pt")
    eager, comp = final_state(tmp_path / "eager"), final_state(tmp_path / "compiled")
    assert comp[2]["step"] == eager[2]["step"] == 4
    for a, b in zip(eager[:2], comp[:2]):
        assert a.keys() == b.keys()  # no "_orig_mod." prefixes
        assert not any(k.startswith(("module.", "_orig_mod.")) for k in b)
    print("worst relative update difference, compiled vs eager:",
          assert_same_updates(updates["eager"], updates["compiled"]))
    # The comparison can fail: the same start trained on other inputs (no flips) is caught.
    with pytest.raises(AssertionError, match="the update differs"):
        assert_same_updates(updates["eager"], updates["other_data"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(gray_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFUSION_FAULT_NAN_AT_STEP", "3")
    msg = run_main_expect(train.main, resume_args(gray_data, tmp_path), capsys, code=1)
    assert msg.startswith("error: loss is nan at step 3") and "step 2" in msg
    assert torch.load(tmp_path / "models/DDPM_conditional/train_state.pt", weights_only=True)["step"] == 2


# ------------------------------------------------------------------ distributed (2 gloo processes)
def test_torchrun_train_ddp_and_sample_ddp(gray_data, tmp_path, capsys):
    work = tmp_path / "w"
    proc = run_script("ddpm", ["torchrun", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}",
                               "ddpm_conditional_ddp.py", "--mode", "train_ddp", "--dataset-path", str(gray_data),
                               "--work-dir", str(work), "--image-size", "16", "--epochs", "2", "--batch-size", "3",
                               "--num-classes", "3", "--sample-every", "0", *TINY])
    assert "world size 2 (DDP gloo)" in proc.stdout and "3/process = 6 global, 3 steps/epoch" in proc.stdout
    assert "training finished: 6 steps" in proc.stdout
    ckpt = work / "models" / "DDPM_conditional" / "ckpt.pt"
    out = tmp_path / "samples"

    flags = ["--ckpt", str(ckpt), "--use-ema", "--num-classes", "3", "--batch-size", "2", "--sampler", "ddim",
             "--sampling-steps", "5", "--output-dir", str(out), "--class-subfolders"]

    def sample_ddp(n):
        return run_script("ddpm", ["torchrun", "--nproc_per_node=2", f"--master_port={free_port()}",
                                   "ddpm_conditional_ddp.py", "--mode", "sample_ddp", "--num-samples", str(n), *flags])

    proc = sample_ddp(7)
    assert "world size 2" in proc.stdout and "sampled 7 new images (0 already there)" in proc.stdout
    counts = {d.name: len(list(d.glob("*.png"))) for d in out.iterdir() if d.is_dir()}
    assert counts == {"class_0": 3, "class_1": 2, "class_2": 2}
    first = (out / "class_0" / "class_0_seed0.png").read_bytes()
    assert Image.open(out / "class_0" / "class_0_seed0.png").mode == "L"
    (out / "class_1" / "class_1_seed4.png").unlink()  # as if interrupted: a rerun fills in what is missing
    proc = sample_ddp(9)
    assert "sampled 3 new images (6 already there)" in proc.stdout
    assert sum(len(list(d.glob("*.png"))) for d in out.iterdir() if d.is_dir()) == 9
    assert (out / "class_0" / "class_0_seed0.png").read_bytes() == first
    # other settings into the same folder are refused (not mixed in, not overwritten)
    msg = run_main_expect(inference.main, [*flags, "--num-samples", "9", "--cfg-scale", "5"], capsys)
    assert "holds samples made with other settings (cfg_scale=3.0)" in msg


# ------------------------------------------------------------------ bad inputs
def _bad_data(tmp_path, gray_data, kind):
    """A data folder with one defect (or the good one), for the bad-input cases below."""
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "good":
        return gray_data
    d = write_class_folders(tmp_path / kind, classes=2, per_class=2)
    if kind == "not-an-image":
        (d / "class_1" / "notes.png").write_text("this is not an image")
    elif kind == "truncated":
        raw = (d / "class_0" / "01.png").read_bytes()
        (d / "class_0" / "01.png").write_bytes(raw[: len(raw) // 2])
    elif kind == "class-without-images":
        (d / "class_9").mkdir()
    return d


# (id, data folder kind, extra flags, what the one error line must contain: "{data}" is the folder)
BAD_TRAIN_CASES = [
    ("empty-folder", "empty", [], ["is empty"]),
    ("not-an-image", "not-an-image", [], ["{data}/class_1/notes.png"]),
    ("truncated-png", "truncated", [], ["{data}/class_0/01.png"]),
    ("class-without-images", "class-without-images", [], ["class_9 has no images"]),
    ("too-many-classes", "good", ["--num-classes", "5"], ["--num-classes 5", "3 class folders"]),
    ("image-size", "good", ["--image-size", "20"], ["--image-size 20", "multiple of 8"]),
    ("batch-too-large", "good", ["--batch-size", "40"], ["too few"]),
]


@pytest.mark.parametrize("kind,extra,wanted", [c[1:] for c in BAD_TRAIN_CASES], ids=[c[0] for c in BAD_TRAIN_CASES])
def test_bad_training_input(gray_data, tmp_path, capsys, kind, extra, wanted):
    base = ["--work-dir", str(tmp_path / "w"), "--image-size", "16", "--epochs", "1", "--batch-size", "2", *TINY]
    data = _bad_data(tmp_path, gray_data, kind)
    msg = run_main_expect(train.main, ["--dataset-path", str(data), *base, *extra], capsys)
    for w in wanted:
        assert w.format(data=data) in msg, msg
    assert not (tmp_path / "w").exists()  # nothing written for bad input


def test_finished_run_is_not_overwritten_and_resume_keeps_the_size(gray_data, tmp_path, capsys):
    base = ["--work-dir", str(tmp_path / "w"), "--image-size", "16", "--epochs", "1", "--batch-size", "2", *TINY]
    train.main(["--dataset-path", str(gray_data), *base])
    assert "already holds a run" in run_main_expect(train.main, ["--dataset-path", str(gray_data), *base], capsys)
    msg = run_main_expect(train.main, ["--dataset-path", str(gray_data), *base, "--resume", "--image-size", "32"],
                          capsys)
    assert "--image-size 32 disagrees" in msg


@pytest.fixture(scope="module")
def bad_ckpts(gray_data, tmp_path_factory):
    """Two finished runs of different sizes and the broken checkpoints the cases below hand to inference."""
    tmp = tmp_path_factory.mktemp("bad_ckpts")
    base = ["--dataset-path", str(gray_data), "--image-size", "8", "--epochs", "1", "--batch-size", "9",
            "--sample-every", "0", *TINY[:-2]]
    train.main(["--work-dir", str(tmp / "a"), *base])
    train.main(["--work-dir", str(tmp / "b"), *base[:-6], "--base-channels", "16", "--time-dim", "16",
                "--noise-steps", "20"])
    run_a, run_b = tmp / "a/models/DDPM_conditional", tmp / "b/models/DDPM_conditional"
    mixed = tmp / "mixed"  # weights of another size beside a config.json that says otherwise
    mixed.mkdir()
    (mixed / "config.json").write_bytes((run_a / "config.json").read_bytes())
    (mixed / "ckpt.pt").write_bytes((run_b / "ckpt.pt").read_bytes())
    other = torch.load(run_a / "train_state.pt", weights_only=True)  # a checkpoint of another model type
    other["model_type"] = "dit"
    torch.save(other, tmp / "dit_state.pt")
    (tmp / "junk.pt").write_text("hello")  # not a checkpoint
    torch.save({"args": Namespace(lr=1)}, tmp / "pickled.pt")  # pickled objects: refused unless trusted
    return {"ckpt": run_a / "ckpt.pt", "mixed": mixed / "ckpt.pt", "dit": tmp / "dit_state.pt",
            "junk": tmp / "junk.pt", "pickled": tmp / "pickled.pt"}


# (id, checkpoint key of the fixture, extra flags, what the one error line must contain)
BAD_CKPT_CASES = [
    ("other-size-weights", "mixed", [], ["another architecture or size"]),
    ("other-model-type", "dit", [], ["'dit' checkpoint, not a DDPM"]),
    ("not-a-checkpoint", "junk", [], ["is not a checkpoint"]),
    ("pickled", "pickled", [], ["not a plain checkpoint", "--trust_checkpoint"]),
    ("pickled-trusted", "pickled", ["--trust-checkpoint"], ["not a DDPM checkpoint"]),
    ("num-classes-disagree", "ckpt", ["--num-classes", "8"], ["--num-classes 8 disagrees", "3 classes"]),
    ("unknown-class", "ckpt", ["--class-labels", "dog"], ["unknown class 'dog'", "class_0, class_1, class_2"]),
]


@pytest.mark.parametrize("which,extra,wanted", [c[1:] for c in BAD_CKPT_CASES], ids=[c[0] for c in BAD_CKPT_CASES])
def test_bad_checkpoint(bad_ckpts, tmp_path, capsys, which, extra, wanted):
    sample = ["--num-samples", "1", "--sampler", "ddim", "--sampling-steps", "2", "--output-dir",
              str(tmp_path / "out")]
    capsys.readouterr()
    msg = run_main_expect(inference.main, ["--ckpt", str(bad_ckpts[which]), *extra, *sample], capsys)
    for w in wanted:
        assert w in msg, msg
    assert not (tmp_path / "out").exists()


def test_train_state_and_ema_checkpoint_give_the_same_image(bad_ckpts, tmp_path):
    """train_state.pt works as --ckpt too (EMA entry with --use-ema), and the same seed gives the same image."""
    run_a = bad_ckpts["ckpt"].parent
    sample = ["--num-samples", "1", "--sampler", "ddim", "--sampling-steps", "2", "--output-dir",
              str(tmp_path / "out")]
    inference.main(["--ckpt", str(run_a / "train_state.pt"), "--use-ema", *sample])
    img = (tmp_path / "out" / "class_0_seed0.png").read_bytes()
    inference.main(["--ckpt", str(run_a / "ema_ckpt.pt"), *sample[:-1], str(tmp_path / "out2")])
    assert (tmp_path / "out2" / "class_0_seed0.png").read_bytes() == img


def test_bad_input_from_the_command_line_is_one_line_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("ddpm", ["ddpm_conditional_ddp.py", "--mode", "train_ddp", "--dataset-path",
                               str(tmp_path / "empty"), "--work-dir", str(tmp_path / "w")], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --dataset-path") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
