"""Tests of the DDPM's image-conditioned tasks (ddpm/conditional.py, the UNet's concat / SPADE conditioning,
guidance on the condition, mask ablation, train.py --task): the condition reaches the output, dropout with
guidance 0 is the unconditional model, short overfits that must beat bicubic super-resolution and segment,
torchrun with 2 processes, bit-identical resume, and the one-line errors of bad paired data.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ddpm_conditional.py -q
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import (BOOT, REPO, free_port, install_fault_hooks, load_folder, run_main_expect, run_script,
                          script_env)

models, conditional, train, paired, runtime = load_folder("ddpm", "models", "conditional", "train", "paired",
                                                        "runtime")
install_fault_hooks(runtime)

TINY = ["--base-channels", "8", "--time-dim", "16", "--log-every", "1", "--sample-every", "0"]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def blob_pairs(root, n=6, size=16, seed=0, labels=2):
    """root/images/<i>.png + root/masks/<i>.png: a random rectangle per label, the image bright where the mask
    is (brightness by label); its sharp edges are what a 4x downsampled copy loses."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for lab in range(1, labels):
            h, w = rng.integers(3, size // 2, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            mask[y:y + h, x:x + w] = lab
        img = np.clip(30 + mask * (170 // max(1, labels - 1)), 0, 255).astype(np.uint8)  # sharp edges: blurred by 4x
        Image.fromarray(img, "L").save(root / "images" / f"{i:03d}.png")
        Image.fromarray(mask * (255 if labels == 2 else 1), "L").save(root / "masks" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return blob_pairs(tmp_path_factory.mktemp("pairs"))


def perturbed(model, seed=0, scale=0.05):
    """A random-init model whose zero-initialised parts (SPADE's gamma / beta) are moved off zero too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


# ------------------------------------------------------------------ the network and the sampler
@pytest.mark.parametrize("mode", ["concat", "spade"])
@pytest.mark.parametrize("task,k", [("mask2image", 2), ("mask2image", 4), ("superres", 2), ("segmentation", 2),
                                    ("segmentation", 3), ("masks", 3)])
def test_shapes_per_task(task, k, mode):
    c_img = 1
    ct, cc = conditional.target_channels(task, k, c_img), conditional.cond_channels(task, k, c_img)
    m = models.UNet(c_in=ct, c_out=ct, img_size=16, base_channels=8, time_dim=16, cond_channels=cc, cond_mode=mode)
    labels = torch.randint(0, k, (2, 1, 16, 16))
    image = torch.rand(2, c_img, 16, 16) * 2 - 1
    target = conditional.encode_target(task, labels if task in conditional.MASK_TARGET_TASKS else image, k)
    assert target.shape == (2, ct, 16, 16) and target.abs().max() <= 1
    cond = None
    if cc:
        cond = conditional.encode_condition(task, labels if task == "mask2image" else image, k)
        assert cond.shape == (2, cc, 16, 16)
    assert m(target, torch.tensor([1, 5]), cond=cond).shape == (2, ct, 16, 16)
    if task in conditional.MASK_TARGET_TASKS:  # the mask code decodes back to the labels
        assert torch.equal(conditional.decode_mask(target, k), labels[:, 0])
    rebuilt = models.rebuild_model(m.config())
    assert rebuilt.state_dict().keys() == m.state_dict().keys()
    assert models.infer_config(m.state_dict(), 16)["cond_channels"] == (cc or 0) if cc else True


@pytest.mark.parametrize("mode", ["concat", "spade"])
def test_condition_reaches_the_output_and_guidance_zero_is_the_null_condition(mode):
    m = perturbed(models.UNet(c_in=1, c_out=1, img_size=16, base_channels=8, time_dim=16, cond_channels=2,
                              cond_mode=mode))
    d = models.Diffusion(50, img_size=16, device="cpu")
    a, b = torch.zeros(1, 1, 16, 16, dtype=torch.long), torch.zeros(1, 1, 16, 16, dtype=torch.long)
    a[..., 2:8, 2:8], b[..., 8:14, 6:12] = 1, 1
    cond = conditional.encode_condition("mask2image", torch.cat([a, b]), 2)
    kw = dict(sampler="ddim", steps=6, seeds=[3, 3], progress=False, as_float=True)
    two = d.sample(m, 2, cond=cond, **kw)
    assert (two[0] - two[1]).abs().mean() > 1e-3  # same noise, other mask: another image
    null = d.sample(m, 2, cond=torch.zeros_like(cond), **kw)
    # equal up to float summation order (the guided pass runs condition and null condition in one batch)
    assert torch.allclose(d.sample(m, 2, cond=cond, cond_scale=0.0, **kw), null, atol=2e-4)
    assert (two - null).abs().max() > 1e-2  # (which the condition itself is far from)
    assert not torch.equal(d.sample(m, 2, cond=cond, cond_scale=2.0, **kw), two)
    # an untrained SPADE starts as the plain UNet (gamma = beta = 0): the condition has no effect yet
    if mode == "spade":
        fresh = models.UNet(c_in=1, c_out=1, img_size=16, base_channels=8, time_dim=16, cond_channels=2,
                            cond_mode="spade").eval()
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([4, 4])
        assert torch.allclose(fresh(x, t, cond=cond[:1].expand(2, -1, -1, -1)), fresh(x, t, cond=cond.flip(0)))


def test_class_and_condition_guidance_combine():
    m = perturbed(models.UNet_conditional(c_in=1, c_out=1, num_classes=3, img_size=16, base_channels=8, time_dim=16,
                                          cond_channels=2))
    d = models.Diffusion(50, img_size=16, device="cpu")
    cond = conditional.encode_condition("mask2image", torch.ones(2, 1, 16, 16, dtype=torch.long), 2)
    kw = dict(sampler="ddim", steps=4, seeds=[1, 1], progress=False, as_float=True, cond=cond)
    y = torch.tensor([0, 2])
    no_guidance = d.sample(m, 2, labels=y, cfg_scale=1.0, **kw)
    assert (no_guidance[0] - no_guidance[1]).abs().mean() > 1e-3  # the class matters next to the mask
    assert not torch.equal(d.sample(m, 2, labels=y, cfg_scale=3.0, **kw), no_guidance)


def test_mask_ablation_only_removes_labels_that_exist():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(64, 1, 8, 8, dtype=torch.long)
    labels[:, :, :4, :4] = 1
    labels[:, :, 4:, 4:] = 3  # label 2 is absent everywhere
    out = conditional.ablate_masks(labels, 0.5, g)
    assert set(out.unique().tolist()) <= {0, 1, 3} and (out[labels == 0] == 0).all()
    kept = out == labels
    assert ((out == 0) | kept).all()  # a pixel keeps its label or becomes background, nothing else
    for lab in (1, 3):  # each label is removed as a whole, in about half of the masks
        removed = [(out[i][labels[i] == lab] == 0).all().item() for i in range(64)]
        partial = [(out[i][labels[i] == lab] == 0).any().item() and not r for i, r in enumerate(removed)]
        assert 16 < sum(removed) < 48 and not any(partial)
    assert torch.equal(conditional.ablate_masks(labels, 0.0, g), labels)
    assert (conditional.ablate_masks(labels, 1.0, g) == 0).all()


def test_degrade_is_bicubic_of_the_downsampled_image():
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    low = conditional.lowres(x, 4, "bicubic")
    assert low.shape == (1, 1, 4, 4)
    assert torch.equal(conditional.degrade(x, 4, "bicubic"), conditional.upsample(low, 16))
    assert torch.allclose(conditional.lowres(x, 4, "area"), x.reshape(1, 1, 4, 4, 4, 4).mean((3, 5)), atol=1e-6)


class VOracle(torch.nn.Module):
    """Predicts the exact v = sqrt(a) eps - sqrt(1 - a) x0 of a fixed image from x_t, whatever the condition."""

    def __init__(self, target, alpha_hat):
        super().__init__()
        self.target, self.ah, self.c_in, self.cond_channels = target, alpha_hat, target.shape[0], 2
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None, cond=None):
        ah = self.ah[t].float()[:, None, None, None]
        eps = (x - ah.sqrt() * self.target) / (1 - ah).sqrt()
        return ah.sqrt() * eps - (1 - ah).sqrt() * self.target


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 10)])
def test_v_prediction_samplers_recover_the_image_from_an_oracle(sampler, steps):
    target = torch.rand(1, 8, 8) * 1.6 - 0.8
    d = models.Diffusion(noise_steps=50, img_size=8, device="cpu", schedule="cosine", prediction_type="v_prediction")
    m = VOracle(target, d.alpha_hat64)
    cond = torch.zeros(2, 2, 8, 8)
    out = d.sample(m, 2, sampler=sampler, steps=steps, seeds=[1, 2], progress=False, cond=cond, cond_scale=2.0)
    expect = ((target + 1) * 127.5).round().to(torch.uint8)
    assert (out.int() - expect.int()).abs().max() <= 1
    # and the training target is that v: x0 = sqrt(a) x_t - sqrt(1 - a) v recovers the image
    x0, noise, t = target[None].repeat(3, 1, 1, 1), torch.randn(3, 1, 8, 8), torch.tensor([0, 25, 49])
    x_t, _ = d.noise_images(x0, t, noise)
    v = d.training_target(x0, noise, t)
    ah = d.alpha_hat[t][:, None, None, None]
    assert torch.allclose(ah.sqrt() * x_t - (1 - ah).sqrt() * v, x0, atol=1e-5)
    assert torch.equal(models.Diffusion(50, img_size=8, device="cpu").training_target(x0, noise, t), noise)


# ------------------------------------------------------------------ training
def train_args(data, work, task, *extra, steps=6, size=16):
    return ["--task", task, "--data-root", str(data), "--work-dir", str(work), "--image-size", str(size),
            "--batch-size", "2", "--noise-steps", "50", "--max-train-steps", str(steps), *TINY, *extra]


def state_of(work, run):
    return torch.load(Path(work) / "models" / run / "train_state.pt", weights_only=True)


class _Clean:
    """A stand-in noise process that returns the clean target, to look at what a training step feeds the UNet."""

    def noise_images(self, x, t, noise):
        return x, noise

    def training_target(self, x, noise, t):
        return x


def test_random_flips_keep_target_and_condition_aligned(tmp_path):
    data = blob_pairs(tmp_path / "d", n=8)
    ds = paired.PairedDataset("mask2image", data, 16)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    cfg = dict(train.BASE_SETTINGS, task="mask2image", conditional=False, random_flip=True, cond_dropout=0.0,
               noise_steps=10)
    for epoch in range(3):
        x, _, _, _, cond = train.noisy_batch(_Clean(), batch, cfg, epoch, 0, 0, torch.device("cpu"))
        fg = cond[:, 1:2] > 0.5  # the one-hot foreground channel
        assert ((x > 0) == fg).all()  # the image is bright exactly where its (flipped) mask is
        flipped = [not torch.equal(x[i], batch[0][i]) for i in range(8)]
        assert 0 < sum(flipped) < 8  # some images were flipped, not all
        assert all(torch.equal(x[i], batch[0][i].flip(2)) for i in range(8) if flipped[i])


def test_training_stores_the_task_and_the_model_rebuilds_from_it(pairs, tmp_path, capsys):
    train.main(train_args(pairs, tmp_path, "mask2image", "--cond-mode", "spade", "--num-mask-classes", "2"))
    out = capsys.readouterr().out
    assert "task mask2image, predicts v_prediction, condition by spade" in out and "run 'DDPM_mask2image'" in out
    st = state_of(tmp_path, "DDPM_mask2image")
    assert st["config"]["task"] == "mask2image" and st["model_config"]["cond_mode"] == "spade"
    m = models.rebuild_model(st["model_config"])
    m.load_state_dict(st["ema"])  # the stored config builds exactly the trained network
    assert m.cond_channels == 2 and m.c_in == 1


def test_resume_is_bit_identical_with_flips_ablation_and_dropout(tmp_path, capsys):
    data = blob_pairs(tmp_path / "d", n=8, labels=3)
    flags = ("--num-mask-classes", "3", "--mask-ablation", "0.5", "--cond-dropout", "0.3", "--random-flip",
             "--ckpt-every-steps", "2", "--ema-start", "1")
    train.main(train_args(data, tmp_path / "ref", "mask2image", *flags, steps=8))
    proc = run_script("ddpm", [str(BOOT), "train.py", *train_args(data, tmp_path / "kill", "mask2image", *flags,
                                                                  steps=8)],
                      check=False, env=script_env(DIFFUSION_FAULT_KILL_AT_STEP=5))
    assert proc.returncode == -9 and state_of(tmp_path / "kill", "DDPM_mask2image")["step"] == 4
    train.main(train_args(data, tmp_path / "kill", "mask2image", *flags, "--resume", steps=8))
    assert "resumed" in capsys.readouterr().out
    a, b = state_of(tmp_path / "ref", "DDPM_mask2image"), state_of(tmp_path / "kill", "DDPM_mask2image")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # a resumed run keeps the network: another --num-mask-classes is refused in one line
    msg = run_main_expect(train.main, train_args(data, tmp_path / "kill", "mask2image", "--num-mask-classes", "5",
                                                 "--resume", steps=9), capsys)
    assert "--num-mask-classes 5" in msg and "num_mask_classes=3" in msg


def test_torchrun_two_processes_trains_a_paired_task(pairs, tmp_path):
    proc = run_script("ddpm", ["torchrun", "--nnodes=1", "--nproc_per_node=2", f"--master_port={free_port()}",
                               "train.py", *train_args(pairs, tmp_path, "segmentation", steps=3)])
    assert "world size 2 (DDP gloo)" in proc.stdout and "task segmentation" in proc.stdout
    assert "training finished: 3 steps" in proc.stdout
    st = state_of(tmp_path, "DDPM_segmentation")
    assert st["step"] == 3 and st["config"]["world_size"] == 2


def overfit(data, work, task, steps, *extra):
    """Train a tiny model on a few pairs until it has memorised them; returns (model, diffusion, config)."""
    train.main(["--task", task, "--data-root", str(data), "--work-dir", str(work), "--image-size", "16",
                "--batch-size", "4", "--noise-steps", "100", "--schedule", "cosine", "--max-train-steps", str(steps),
                "--num-epochs", "100000",
                "--base-channels", "16", "--time-dim", "32", "--learning-rate", "2e-3", "--ema-start", "1000000",
                "--log-every", "100", "--sample-every", "0", "--cond-dropout", "0", "--ckpt-every-epochs", "100000", *extra])
    st = state_of(work, f"DDPM_{task}")
    m = models.rebuild_model(st["model_config"])
    m.load_state_dict(st["model"])
    assert st["config"]["prediction_type"] == "v_prediction"  # the default of the image-conditioned tasks
    d = models.Diffusion(100, img_size=16, device="cpu", schedule="cosine", prediction_type="v_prediction")
    return m.eval(), d, st["config"]


def load_pairs(data):
    imgs = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32) / 127.5 - 1)[None]
                        for p in sorted((data / "images").glob("*.png"))])
    masks = torch.stack([torch.from_numpy((np.asarray(Image.open(p)) > 0).astype(np.int64))[None]
                         for p in sorted((data / "masks").glob("*.png"))])
    return imgs, masks


def test_superres_beats_bicubic_after_a_short_overfit(tmp_path):
    data = blob_pairs(tmp_path / "d", n=4)
    m, d, cfg = overfit(data, tmp_path / "w", "superres", 300, "--sr-factor", "4")
    hr, _ = load_pairs(data)
    bicubic = conditional.degrade(hr, 4, "bicubic")
    cond = conditional.encode_condition("superres", bicubic, 2)
    sr = d.sample(m, 4, cond=cond, sampler="ddim", steps=25, seeds=[0, 1, 2, 3], progress=False, as_float=True)

    def psnr(a01, b11):
        return float(10 * torch.log10(1 / ((a01 - (b11 + 1) / 2) ** 2).mean()))

    ours, base = psnr(sr, hr), psnr((bicubic + 1) / 2, hr)
    print(f"PSNR super-resolution {ours:.2f} dB vs bicubic {base:.2f} dB")
    assert ours > base + 3.0


def test_segmentation_mean_mask_dice_after_a_short_overfit(tmp_path):
    data = blob_pairs(tmp_path / "d", n=4)
    m, d, cfg = overfit(data, tmp_path / "w", "segmentation", 300)
    imgs, masks = load_pairs(data)
    cond = conditional.encode_condition("segmentation", imgs, 2).repeat_interleave(4, 0)
    out = d.sample(m, 16, cond=cond, sampler="ddim", steps=25, seeds=list(range(16)), progress=False, as_float=True)
    votes = conditional.decode_mask(out * 2 - 1, 2).reshape(4, 4, 16, 16)
    mean_mask = votes.float().mean(1) > 0.5
    truth = masks[:, 0].bool()
    dice = (2 * (mean_mask & truth).sum((1, 2)) / (mean_mask.sum((1, 2)) + truth.sum((1, 2)))).float()
    print(f"segmentation mean-mask Dice per image: {dice.tolist()}")
    assert dice.mean() > 0.85


def test_synthetic_pairs_script_writes_a_paired_data_set(pairs, tmp_path):
    """scripts/synthetic_pairs.sh as documented (mask DDPM, mask -> image DDPM, then N pairs), tiny settings."""
    import subprocess

    tiny = "--image-size 16 --base-channels 8 --time-dim 16 --noise-steps 50 --max-train-steps 3 --batch-size 2"
    env = script_env(WORK_DIR=str(tmp_path / "work"), MASK_FLAGS=tiny, IMAGE_FLAGS=tiny)
    out = tmp_path / "synthetic"
    proc = subprocess.run(["bash", "scripts/synthetic_pairs.sh", str(pairs), str(out), "3"], cwd=REPO / "ddpm",
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stems = sorted(p.stem for p in (out / "images").glob("*.png"))
    assert stems == sorted(p.stem for p in (out / "masks").glob("*.png")) == [f"sample_seed{i}" for i in range(3)]
    for stem in stems:  # each mask is a binary label image the size of its image
        mask, img = np.asarray(Image.open(out / "masks" / f"{stem}.png")), Image.open(out / "images" / f"{stem}.png")
        assert set(np.unique(mask).tolist()) <= {0, 255} and img.size == (16, 16) == mask.shape[::-1]
    assert (out / "pairs.csv").read_text().splitlines()[1:] == [f"sample_seed{i},{100000 + i},{i}" for i in range(3)]
    assert (tmp_path / "work" / "models" / "pairs_masks" / "train_state.pt").is_file()


# ------------------------------------------------------------------ bad paired data: one line each
def _bad_pairs(tmp_path, kind):
    d = blob_pairs(tmp_path / kind, n=4, labels=4 if kind == "label-too-large" else 2)
    if kind == "unpaired":
        (d / "masks" / "003.png").unlink()
    elif kind == "label-too-large":
        Image.fromarray(np.full((16, 16), 7, np.uint8), "L").save(d / "masks" / "002.png")
    elif kind == "size-mismatch":
        Image.fromarray(np.zeros((12, 16), np.uint8), "L").save(d / "masks" / "001.png")
    elif kind == "no-masks-folder":
        for f in (d / "masks").iterdir():
            f.unlink()
        (d / "masks").rmdir()
    return d


BAD_PAIR_CASES = [
    ("unpaired", "unpaired", ["mask2image"], ["1 image(s) without a mask: 003.png"]),
    ("label-too-large", "label-too-large", ["mask2image", "--num-mask-classes", "4"],
     ["002.png", "label 7", "--num_mask_classes is 4"]),
    ("binary-mask-many-classes", "unpaired", ["segmentation", "--num-mask-classes", "3", "--skip-unpaired"],
     ["label 255", "0/255", "--num_mask_classes 2"]),
    ("size-mismatch", "size-mismatch", ["segmentation"], ["001.png"]),
    ("no-masks-folder", "no-masks-folder", ["mask2image"], ["masks"]),
    ("ablation-other-task", "unpaired", ["superres", "--mask-ablation", "0.3"], ["--mask-ablation", "mask2image"]),
    ("sr-factor", "unpaired", ["superres", "--sr-factor", "3"], ["--sr-factor 3", "16"]),
    ("mask-classes", "unpaired", ["mask2image", "--num-mask-classes", "1"], ["--num-mask-classes 1"]),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("kind,extra,wanted", [c[1:] for c in BAD_PAIR_CASES], ids=[c[0] for c in BAD_PAIR_CASES])
def test_bad_paired_data_is_one_line(tmp_path, capsys, kind, extra, wanted):
    data = _bad_pairs(tmp_path, kind)
    task, rest = extra[0], extra[1:]
    msg = run_main_expect(train.main, train_args(data, tmp_path / "w", task, *rest), capsys)
    for w in wanted:
        assert w in msg, msg
    assert not (tmp_path / "w").exists()  # nothing written for bad input
