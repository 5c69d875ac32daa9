"""Tests of dit/serve.py (the API gives the CLI's images), sample.py's interpolation and train.py's progress.gif.

A tiny random DiT-Ti/2 and a tiny VAE (as tests/test_dit.py builds them), CPU, fp32 (--compile + bf16
crashes on this CPU, and bf16 is not what these tests are about). One server process for the module;
the CLI runs in this process (sample.main), with one thread like the server (OMP_NUM_THREADS=1).

    python -m pytest -q tests/test_serve_dit.py -x
"""
import base64
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import serve_helpers
from repo_helpers import free_port, load_folder, run_script
from serve_helpers import Server, assert_one_line_error, pixels
from serve_helpers import one_thread  # noqa: F401  (an autouse fixture: one thread, as the server)

train, sample, animation, runtime = load_folder("dit", "train", "sample", "animation", "runtime")
UserError = runtime.UserError
SIZE, PAD = 16, 2  # image size of the tiny model; animation.strip's gap between frames
COMMON = ["--mixed-precision", "no"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A tiny 3-class grayscale data set (16 px) and a tiny VAE (factor 4, 4 latent channels)."""
    from diffusers.models import AutoencoderKL
    root = tmp_path_factory.mktemp("dit_serve")
    rng = np.random.default_rng(0)
    for k in range(3):
        (root / "data" / f"class_{k}").mkdir(parents=True)
        for i in range(4):
            arr = (rng.random((SIZE, SIZE)) * 80 + k * 80).astype(np.uint8)
            Image.fromarray(arr).save(root / "data" / f"class_{k}" / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SIZE)
    vae.save_pretrained(root / "vae")
    return root


def train_argv(work, results, *extra):
    return ["--model", "DiT-Ti/2", "--data_root", str(work / "data"), "--results-dir", str(results),
            "--image-size", str(SIZE), "--num-classes", "3", "--global-batch-size", "4", "--vae", str(work / "vae"),
            "--num-workers", "0", "--log_every_steps", "1", "--ckpt_every_steps", "3", "--sample_every_steps", "1",
            "--mixed_precision", "no", *extra]


@pytest.fixture(scope="module")
def run(work):
    """A 3-step training run with a sample grid after every step."""
    train.main(train.parse_args(train_argv(work, work / "results", "--max-train-steps", "3")))
    return work / "results" / "000-DiT-Ti-2"


@pytest.fixture(scope="module")
def ckpt(run, work):
    """The run's checkpoint with random EMA weights: after 3 steps of adaLN-Zero the samples barely depend on
    seed or class, which would let a broken interpolation pass."""
    ck = torch.load(run / "checkpoints" / "0000003.pt", map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    ck["ema"] = {k: v if k == "pos_embed" else torch.randn(v.shape, generator=g) * 0.1 for k, v in ck["ema"].items()}
    ck["ema"]["final_layer.linear.weight"] *= 0.1
    path = work / "rand.pt"
    torch.save(ck, path)
    return path


@pytest.fixture(scope="module")
def server(ckpt, work):
    """`python serve.py --checkpoint rand.pt` on a free port (cwd dit/); it boots while the CLI runs here."""
    out = work / "served"
    s = Server("dit", ["--checkpoint", ckpt, "--output_dir", out, "--batch_size", 8, *COMMON])
    s.out = out
    yield s
    s.stop()


def cli(ckpt, out, *flags):
    """sample.py in this process; -> the folder it wrote into."""
    before = set(Path(out).iterdir()) if Path(out).exists() else set()
    sample.main(sample.parse_args(["--ckpt", str(ckpt), "--output-dir", str(out), *COMMON, *flags]))
    new = set(Path(out).iterdir()) - before
    return new.pop() if new else None


def strip_frames(src, n):
    return serve_helpers.strip_frames(src, n, SIZE, PAD)


def plain(ckpt, out, cls, seed, steps=4, cfg=2):
    """The CLI's plain DDIM (eta 0) sample of one image: class `cls`, seed `seed`."""
    folder = cli(ckpt, out, "--sampler", "ddim", "--num-sampling-steps", str(steps), "--cfg-scale", str(cfg),
                 "--class-labels", cls, "--seed", str(seed), "--num-samples", "1") or next(
        p for p in Path(out).iterdir() if p.name.endswith(f"-cfg-{cfg}-ddim{steps}-seed-{seed}"))
    return pixels(folder / cls / f"{cls}_seed{seed}.png")


# ----------------------------------------------------------------------------- progress.gif
def test_progress_gif_has_one_frame_per_grid_and_keeps_them_on_resume(run, work, monkeypatch):
    frames = sorted(p.name for p in (run / "samples").iterdir())
    assert frames == ["step_0000001.png", "step_0000002.png", "step_0000003.png"]
    assert animation.gif_frame_count(run / "progress.gif") == 3
    grid = pixels(run / "samples" / "step_0000003.png")
    assert grid.ndim == 2 and grid.shape == (SIZE + 4, 3 * SIZE + 8)  # 3 classes in a row, gray stays gray
    with Image.open(run / "progress.gif") as gif:
        assert gif.size == (3 * SIZE + 8, SIZE + 4 + 12)  # the grid plus its "step N" caption band
    assert any((run / "tensorboard").iterdir())  # TensorBoard keeps the grids
    first = (run / "samples" / "step_0000001.png").read_bytes()
    train.main(train.parse_args(train_argv(work, work / "results", "--max-train-steps", "5", "--resume")))
    assert not (work / "results" / "001-DiT-Ti-2").exists()
    assert len(list((run / "samples").iterdir())) == 5
    assert animation.gif_frame_count(run / "progress.gif") == 5  # the frames from before the resume stay
    assert (run / "samples" / "step_0000001.png").read_bytes() == first
    # A GIF that cannot be written is a warning; the run goes on and checkpoints.
    def broken(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train.animation, "update_progress_gif", broken)
    other = work / "results_broken"
    train.main(train.parse_args(train_argv(work, other, "--max-train-steps", "2", "--ckpt_every_steps", "2")))
    rdir = other / "000-DiT-Ti-2"
    assert (rdir / "checkpoints" / "0000002.pt").exists() and not (rdir / "progress.gif").exists()
    assert "warning: could not update" in (rdir / "log.txt").read_text()


# ----------------------------------------------------------------------------- API = CLI
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_generate_gives_the_cli_images(server, ckpt, tmp_path, sampler):
    served = server.out
    body = {"class": "class_1", "seed": 3, "num_images": 2, "guidance": 2.0, "sampler": sampler, "steps": 4,
            "format": "zip"}
    folder = cli(ckpt, tmp_path, "--class-labels", "class_1", "--seed", "3", "--num-samples", "2", "--cfg-scale", "2",
                 "--sampler", sampler, "--num-sampling-steps", "4")  # (first: the server boots meanwhile)
    r = server.post("generate", body)
    assert r.status_code == 200, r.text[:300]
    tag, data = r.headers["X-Tag"], r.content
    assert tag == folder.name and f"-cfg-2-{sampler}4-seed-3" in tag
    z = zipfile.ZipFile(io.BytesIO(data))
    names = ["class_1_seed3.png", "class_1_seed4.png"]
    assert sorted(z.namelist()) == [f"class_1/{n}" for n in names] + ["settings.json"]  # the CLI's sub-folder
    assert sorted(p.name for p in (folder / "class_1").iterdir()) == names
    saved = served / tag / "class_1"
    assert sorted(p.name for p in saved.iterdir()) == names
    for n in names:
        ours, cli_png = pixels(z.read(f"class_1/{n}")), pixels(folder / "class_1" / n)
        assert ours.shape == (SIZE, SIZE) and np.array_equal(ours, cli_png), n
        assert np.array_equal(pixels(saved / n), cli_png)
    a, b = (pixels(z.read(f"class_1/{n}")).astype(int) for n in names)
    assert a.std() > 5 and np.abs(a - b).mean() > 5  # real images, and the seeds differ
    settings = json.loads(z.read("settings.json"))
    assert [im["seed"] for im in settings["images"]] == [3, 4] and settings["sampler"] == sampler
    # Asked again: the same images, and the saved files are written once (not rewritten).
    stamps = {n: ((saved / n).stat().st_ino, (saved / n).stat().st_mtime_ns) for n in names}
    again = server.post("generate", body)
    assert again.status_code == 200
    z2 = zipfile.ZipFile(io.BytesIO(again.content))
    assert all(z2.read(f"class_1/{n}") == z.read(f"class_1/{n}") for n in names)
    assert stamps == {n: ((saved / n).stat().st_ino, (saved / n).stat().st_mtime_ns) for n in names}


# ----------------------------------------------------------------------------- interpolation
def test_seed_interpolation_cli_end_points_are_the_plain_samples(server, ckpt, tmp_path, capsys):
    served = server.out
    flags = ["--interpolate_seeds", "3", "7", "--class-labels", "class_1", "--interp_frames", "4",
             "--num-sampling-steps", "4", "--cfg-scale", "2"]
    folder = cli(ckpt, tmp_path / "interp", *flags)
    stem = "interp_seeds3-7_class_1_ddim4_cfg2_f4"
    assert folder.name == "interpolation_DiT-Ti-2-rand-size-16-vae-vae"
    assert sorted(p.name for p in folder.iterdir()) == [f"{stem}.gif", f"{stem}.png"]
    assert animation.gif_frame_count(folder / f"{stem}.gif") == 6  # 4 frames forward, 2 on the way back
    assert pixels(folder / f"{stem}.png").shape == (SIZE, 4 * SIZE + 3 * PAD)
    f = strip_frames(folder / f"{stem}.png", 4)
    a, b = plain(ckpt, tmp_path / "plain", "class_1", 3), plain(ckpt, tmp_path / "plain", "class_1", 7)
    assert np.array_equal(f[0], a) and np.array_equal(f[3], b)
    assert all(not np.array_equal(f[i], a) and not np.array_equal(f[i], b) for i in (1, 2))
    # Rerun: kept, not overwritten.
    stamp = (folder / f"{stem}.png").stat().st_mtime_ns
    capsys.readouterr()
    cli(ckpt, tmp_path / "interp", *flags)
    assert "exist already: skipped" in capsys.readouterr().out
    assert (folder / f"{stem}.png").stat().st_mtime_ns == stamp
    # The API: the same files (same tag and stem, same bytes), end points = the plain samples.
    r = server.post("interpolate", {"mode": "seeds", "class": "class_1", "seed": 3, "seed_b": 7, "frames": 4,
                                    "steps": 4, "guidance": 2, "format": "json"})
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert (out["tag"], out["stem"]) == (folder.name, stem)
    assert base64.b64decode(out["strip"]) == (folder / f"{stem}.png").read_bytes()
    assert (served / folder.name / f"{stem}.png").read_bytes() == (folder / f"{stem}.png").read_bytes()
    assert (served / folder.name / f"{stem}.gif").read_bytes() == (folder / f"{stem}.gif").read_bytes()
    api = [pixels(base64.b64decode(fr["png"])) for fr in out["frames"]]
    assert [fr["t"] for fr in out["frames"]] == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert np.array_equal(api[0], a) and np.array_equal(api[-1], b)
    one = server.post("generate", {"class": "class_1", "seed": 3, "num_images": 1, "guidance": 2, "sampler": "ddim",
                                   "steps": 4, "format": "png"})
    assert one.status_code == 200 and np.array_equal(pixels(one.content), a)  # the API's plain sample = the CLI's


def test_class_interpolation_end_points_are_the_plain_samples(server, ckpt, tmp_path):
    folder = cli(ckpt, tmp_path / "interp", "--interpolate_classes", "class_0", "2", "--seed", "5",
                 "--interp_frames", "3", "--num-sampling-steps", "4", "--cfg-scale", "2")
    stem = "interp_classes_class_0-class_2_seed5_ddim4_cfg2_f3"  # an index names its class
    f = strip_frames(folder / f"{stem}.png", 3)
    a, b = plain(ckpt, tmp_path / "plain", "class_0", 5), plain(ckpt, tmp_path / "plain", "class_2", 5)
    assert np.array_equal(f[0], a) and np.array_equal(f[2], b) and not np.array_equal(a, b)
    assert not np.array_equal(f[1], a) and not np.array_equal(f[1], b)
    r = server.post("interpolate", {"mode": "classes", "class": "class_0", "class_b": "class_2", "seed": 5,
                                    "frames": 3, "steps": 4, "guidance": 2, "format": "json"})
    assert r.status_code == 200, r.text[:300]
    out = r.json()
    assert out["stem"] == stem and base64.b64decode(out["strip"]) == (folder / f"{stem}.png").read_bytes()
    api = [pixels(base64.b64decode(fr["png"])) for fr in out["frames"]]
    assert np.array_equal(api[0], a) and np.array_equal(api[-1], b)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.bad_input
def test_bad_requests_are_one_line_4xx_and_the_server_goes_on(server):
    cases = [
        ("generate", {"class": "dog"}, 400, "unknown class 'dog'"),
        ("generate", {"sampler": "euler"}, 400, "unknown sampler 'euler'"),
        ("generate", {"steps": 251}, 400, "'steps' must be between 1 and 250"),
        ("interpolate", {"mode": "classes", "class_b": "cat"}, 400, "unknown class 'cat'"),
        ("interpolate", {"mode": "seeds", "class_b": "class_2"}, 400, "'class_b' belongs to mode 'classes'"),
        ("interpolate", {"mode": "spiral"}, 400, "unknown interpolation mode 'spiral'"),
    ]
    for kind, body, code, message in cases:
        err = assert_one_line_error(server.post(kind, body), code)
        assert message in err, (body, err)
    # DiT takes no upload: a multipart request with a file is refused, not ignored.
    r = server.post("generate", {"seed": 1}, b"\x89PNG not really")
    assert r.status_code == 400 and "takes no upload" in r.json()["error"]
    r = server.post("generate", {"class": "class_2", "seed": 9, "num_images": 1, "steps": 2, "format": "png"})
    assert r.status_code == 200 and pixels(r.content).shape == (SIZE, SIZE)


@pytest.mark.bad_input
def test_bad_checkpoint_is_one_line_exit_2(work, tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    proc = run_script("dit", ["serve.py", "--checkpoint", str(bad), "--port", str(free_port())], check=False,
                      timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {bad} is not a checkpoint (torch cannot read it)"


@pytest.mark.bad_input
@pytest.mark.parametrize("flags, message", [
    (["--interpolate_seeds", "1", "2", "--interpolate_classes", "0", "1"], "choose one interpolation per run"),
    (["--interpolate_seeds", "1", "2", "--interp_frames", "1"], "--interp_frames must be at least 2"),
    (["--interpolate_seeds", "1", "2", "--sampler", "ddpm"], "deterministic DDIM: leave out --sampler ddpm"),
    (["--interpolate_seeds", "1", "2", "--class-labels", "0", "1"], "give one --class-labels value"),
    (["--interpolate_classes", "0", "1", "--output-format", "nifti"], "leave out --output-format"),
    (["--interpolate_classes", "class_0", "dog"], "--interpolate_classes dog: unknown class name"),
], ids=["both", "frames", "ddpm", "two-classes", "format", "unknown-class"])
def test_bad_interpolation_flags(ckpt, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        cli(ckpt, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()
