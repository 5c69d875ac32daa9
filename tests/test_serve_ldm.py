"""Tests of ldm/serve.py (HTTP API vs the CLI), interpolation (CLI and API) and progress.gif.

A tiny random AutoencoderKL and a tiny UNet as tests/test_ldm.py builds them, trained here in this process
(stopped at step 4, then resumed to step 6: sample grids at steps 3 and 6), and one serve.py subprocess
that boots while the CLI runs in this process. The generic server behaviour (auth, limits, paths, busy
queue, memory, browser) is tests/test_serving.py's.

    OMP_NUM_THREADS=1 python -m pytest tests/test_serve_ldm.py -q
"""
import base64
import io
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import serve_helpers
from repo_helpers import REPO, free_port, load_folder, run_main_expect, script_env
from serve_helpers import Server, pixels
from serve_helpers import one_thread  # noqa: F401  (an autouse fixture: one thread, as the server)

train, inference, animation, runtime = load_folder("ldm", "train", "inference", "animation", "runtime")

CLASSES = ["cls_a", "cls_b", "cls_c"]
TINY_UNET = ["--unet_preset", "tiny", "--block_out_channels", "16", "32", "--norm_num_groups", "8",
             "--cross_attention_dim", "16", "--attention_head_dim", "2"]
STEPS, SIZE, PAD = 3, 16, 2  # PAD: animation.strip's gap between frames
STRIDE = 1_000_000  # inference.SEED_STRIDE: image j of class c has seed + STRIDE * c + j


# ------------------------------------------------------------------------------------------------ fixtures
def write_classes(root, per_class=6, size=SIZE):
    """Grayscale class folders: noise plus a bright bar whose row depends on the class (as test_ldm.py)."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 60, (size, size)).astype(np.uint8)
            img[3 + 4 * k: 5 + 4 * k, :] = 230
            Image.fromarray(img, mode="L").save(root / name / f"{i:03d}.png")
    return root


def run_train(args):
    AcceleratorState._reset_state(True)
    return train.main([str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny VAE + data; a run stopped at step 4 (grid at 3), the checkpoint to serve, then resumed to 6."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("serve_ldm")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=SIZE).save_pretrained(root / "vae")
    data = write_classes(root / "data")
    run = root / "run"
    flags = ["--data_root", data, "--output_dir", run, "--vae", root / "vae", "--image_size", SIZE, "--batch_size", 4,
             "--num_epochs", 2, "--learning_rate", 1e-3, "--lr_warmup_steps", 0, "--val_split", 0.34,
             "--sample_every_epochs", 1, "--grid_per_class", 1, "--log_every_steps", 1, "--seed", 0] + TINY_UNET
    run_train(flags + ["--max_train_steps", 4])  # 3 steps per epoch: stops 1 step into epoch 2
    frames_before = animation.gif_frame_count(run / "progress.gif")
    (root / "model").mkdir()
    ckpt = root / "model" / "checkpoint_best.pt"
    shutil.copy(run / "checkpoint_last.pt", ckpt)  # the served model stays fixed while the run resumes
    w = {"root": root, "run": run, "ckpt": ckpt, "flags": flags, "frames_before_resume": frames_before}
    return w


@pytest.fixture(scope="module")
def bad_checkpoint_run(work):
    """serve.py with a good and a bad checkpoint, started beside the server (it only has to fail)."""
    bad = work["root"] / "notes.pt"
    bad.write_text("hello")
    proc = subprocess.Popen([sys.executable, "serve.py", "--checkpoint", str(work["ckpt"]), str(bad), "--port",
                             str(free_port())], cwd=REPO / "ldm", env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def server(work, bad_checkpoint_run):
    out = work["root"] / "served"  # boots while the first tests below train and run the CLI in this process
    s = Server("ldm", ["--checkpoint", work["ckpt"], "--output_dir", out, "--max_steps", 2000])
    s.out = out
    yield s
    s.stop()


SEEDS_N = 5
SEEDS_STEM = f"interp_seeds1000007-1000009_cls_b_ddim{STEPS}_cfg3_f{SEEDS_N}"


@pytest.fixture(scope="module")
def seeds_interp(work):
    """The CLI's seed interpolation of cls_b between per-image seeds 1000007 and 1000009 -> its folder."""
    cli(work, "--interpolate_seeds", 1000007, 1000009, "--class_label", "cls_b", "--interp_frames", SEEDS_N,
        "--num_inference_steps", STEPS)
    return work["root"] / "cli" / "interpolation_checkpoint_best"


def cli(work, *flags):
    """inference.py in this process, into <root>/cli."""
    assert inference.main([str(a) for a in ["--checkpoint", work["ckpt"], "--output_dir", work["root"] / "cli",
                                            *flags]]) == 0
    return work["root"] / "cli"


def strip_frames(src, n):
    frames = serve_helpers.strip_frames(src, n, SIZE, PAD)
    assert frames[0].shape == (SIZE, SIZE)  # grayscale data: an 'L' strip, SIZE high
    return frames


def plain(server, cls, per_image_seed, guidance=3.0):
    """The served plain DDIM sample (one image) whose per-image seed is `per_image_seed`."""
    seed = per_image_seed - STRIDE * CLASSES.index(cls)
    r = server.post("generate", {"class": cls, "seed": seed, "num_images": 1, "guidance": guidance,
                                 "sampler": "ddim", "steps": STEPS, "format": "png"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Seeds"] == str(per_image_seed)
    return pixels(r.content)


# --------------------------------------------------------------------------------------------------- tests
def test_progress_gif_has_one_frame_per_grid_and_survives_resume(work, server):
    server.proc.poll()  # (started: it loads while the run resumes)
    assert work["frames_before_resume"] == 1
    run_train(work["flags"] + ["--resume"])
    run = work["run"]
    grids = sorted((run / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000003.png", "step_0000006.png"]
    with Image.open(grids[0]) as im:  # one row per class, one image each; grayscale stays grayscale
        assert im.mode == "L" and im.size == (SIZE + 2 * PAD, 3 * (SIZE + PAD) + PAD)
    assert animation.gif_frame_count(run / "progress.gif") == len(grids) == 2
    assert not list(run.glob(".progress*")) and list((run / "tensorboard").iterdir())  # TensorBoard keeps them


def test_interpolation_cli_writes_strip_and_gif_once(work, server, seeds_interp, capsys):
    n, stem, folder = SEEDS_N, SEEDS_STEM, seeds_interp
    assert stem == animation.interpolation_stem("seeds", (1000007, 1000009), ["cls_b"], "ddim", STEPS, 3.0, n)
    assert sorted(p.name for p in folder.iterdir()) == [f"{stem}.gif", f"{stem}.png"]
    assert animation.gif_frame_count(folder / f"{stem}.gif") == 2 * n - 2  # forward and back
    frames = strip_frames(folder / f"{stem}.png", n)
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[-1])
    before = (folder / f"{stem}.png").stat().st_mtime_ns
    capsys.readouterr()
    cli(work, "--interpolate_seeds", 1000007, 1000009, "--class_label", "cls_b", "--interp_frames", n,
        "--num_inference_steps", STEPS)
    assert "skipped" in capsys.readouterr().out and (folder / f"{stem}.png").stat().st_mtime_ns == before
    cli(work, "--interpolate_classes", "cls_a", "cls_c", "--seed", 2000005, "--interp_frames", 4,
        "--num_inference_steps", STEPS, "--cfg_scale", 2.5, "--no_ema")
    raw = work["root"] / "cli" / "interpolation_checkpoint_best_raw"
    assert (raw / f"interp_classes_cls_a-cls_c_seed2000005_ddim{STEPS}_cfg2.5_f4.png").is_file()
    assert (raw / f"interp_classes_cls_a-cls_c_seed2000005_ddim{STEPS}_cfg2.5_f4.gif").is_file()


def test_bad_interpolation_flags(work, capsys):
    base = ["--checkpoint", str(work["ckpt"]), "--output_dir", str(work["root"] / "bad"), "--num_inference_steps", "2"]
    for flags, wanted in [(["--interpolate_seeds", "1", "2", "--interp_frames", "1"], "--interp_frames"),
                          (["--interpolate_seeds", "1", "2", "--scheduler", "dpmsolver"], "deterministic DDIM"),
                          (["--interpolate_seeds", "1", "2", "--interpolate_classes", "cls_a", "cls_b"], "not both"),
                          (["--interpolate_classes", "cls_a", "cls_z"], "unknown class 'cls_z'"),
                          (["--interpolate_seeds", "1", "2", "--class_label", "cls_z"], "unknown class 'cls_z'")]:
        assert wanted in run_main_expect(lambda a: runtime.run_main(inference.main, a), base + flags, capsys), flags
    assert not (work["root"] / "bad").exists()


def test_api_generate_equals_cli_and_saves_once(work, server):
    settings = {"class": "cls_b", "seed": 7, "num_images": 2, "guidance": 3.0, "sampler": "ddim", "steps": STEPS,
                "format": "zip"}
    r = server.post("generate", settings)
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    names = sorted(n for n in z.namelist() if n != "settings.json")
    assert names == ["cls_b_seed1000007.png", "cls_b_seed1000008.png"]
    assert json.loads(z.read("settings.json"))["tag"] == f"checkpoint_best_ddim{STEPS}_cfg3_seed7"
    out = cli(work, "--class_label", "cls_b", "--seed", 7, "--num_samples", 2, "--cfg_scale", 3.0, "--scheduler", "ddim",
              "--num_inference_steps", STEPS) / f"checkpoint_best_ddim{STEPS}_cfg3_seed7"
    assert sorted(p.name for p in out.iterdir()) == names
    saved = server.out / f"checkpoint_best_ddim{STEPS}_cfg3_seed7"
    assert sorted(p.name for p in saved.iterdir()) == names
    for name in names:
        assert np.array_equal(pixels(z.read(name)), pixels(out / name)), name
        assert np.array_equal(pixels(saved / name), pixels(out / name)), name
    stamps = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    again = server.post("generate", dict(settings, format="json")).json()
    assert [im["name"] for im in again["images"]] == names and [im["seed"] for im in again["images"]] == [1000007, 1000008]
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == stamps  # written once
    # another sampler and guidance: the CLI's other folder, still identical
    r = server.post("generate", {"class": "cls_a", "seed": 3, "num_images": 1, "guidance": 1.5, "sampler": "dpmsolver",
                                 "steps": STEPS, "format": "png"})
    assert r.status_code == 200 and r.headers["X-Tag"] == f"checkpoint_best_dpmsolver{STEPS}_cfg1.5_seed3"
    out = cli(work, "--class_label", "cls_a", "--seed", 3, "--num_samples", 1, "--cfg_scale", 1.5, "--scheduler",
              "dpmsolver", "--num_inference_steps", STEPS) / f"checkpoint_best_dpmsolver{STEPS}_cfg1.5_seed3"
    assert np.array_equal(pixels(r.content), pixels(out / "cls_a_seed3.png"))


def test_interpolation_end_points_equal_plain_samples(work, server, seeds_interp):
    n, stem = SEEDS_N, SEEDS_STEM
    cli_frames = strip_frames(seeds_interp / f"{stem}.png", n)
    assert np.array_equal(cli_frames[0], plain(server, "cls_b", 1000007))
    assert np.array_equal(cli_frames[-1], plain(server, "cls_b", 1000009))
    r = server.post("interpolate", {"mode": "seeds", "class": "cls_b", "seed": 1000007, "seed_b": 1000009,
                                    "frames": n, "steps": STEPS, "guidance": 3.0, "format": "json"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stem"] == stem and body["tag"] == "interpolation_checkpoint_best"
    assert [f["t"] for f in body["frames"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    api_frames = [pixels(base64.b64decode(f["png"])) for f in body["frames"]]
    for a, b in zip(api_frames, cli_frames):  # the API's frames are the CLI's
        assert np.array_equal(a, b)
    saved = server.out / "interpolation_checkpoint_best"
    assert sorted(p.name for p in saved.iterdir()) == [f"{stem}.gif", f"{stem}.png"]
    # classes: noise of one seed, class token from cls_a to cls_c
    r = server.post("interpolate", {"mode": "classes", "class": "cls_a", "class_b": "cls_c", "seed": 2000005,
                                    "frames": 4, "steps": STEPS, "guidance": 2.0, "format": "zip"})
    assert r.status_code == 200, r.text
    cstem = f"interp_classes_cls_a-cls_c_seed2000005_ddim{STEPS}_cfg2_f4"
    z = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(z.namelist()) == sorted([f"{cstem}.png", f"{cstem}.gif", "settings.json"])
    frames = strip_frames(io.BytesIO(z.read(f"{cstem}.png")), 4)
    assert np.array_equal(frames[0], plain(server, "cls_a", 2000005, 2.0))
    assert np.array_equal(frames[-1], plain(server, "cls_c", 2000005, 2.0))
    assert not np.array_equal(frames[0], frames[-1])


def test_ldm_bad_requests_are_one_line_4xx_and_the_server_goes_on(work, server):
    info = server.get("/api/info").json()["models"]["checkpoint_best"]
    assert info["classes"] == CLASSES and info["max_steps"] == 1000 and info["upload"] is None
    assert info["interpolation"] == ["seeds", "classes"] and info["channels"] == 1 and info["image_size"] == SIZE
    cases = [
        ("generate", {"class": "cls_z"}, None, "unknown class 'cls_z'"),
        ("generate", {"class": "cls_a", "steps": 1001}, None, "the model's 1000"),  # the checkpoint's schedule caps it
        ("generate", {"sampler": "euler"}, None, "unknown sampler 'euler'"),
        ("generate", {"class": "cls_a", "steps": STEPS}, b"\x89PNG not really", "takes no upload"),
        ("interpolate", {"mode": "classes", "class_b": "cls_q", "steps": STEPS}, None, "unknown class 'cls_q'"),
        ("generate", {"checkpoint": "../run/checkpoint_last.pt"}, None, "file path"),
    ]
    for kind, settings, upload, wanted in cases:
        r = server.post(kind, settings, upload)
        assert 400 <= r.status_code < 500, (settings, r.status_code, r.text)
        msg = r.json()["error"]
        assert wanted in msg and "\n" not in msg, (settings, msg)
    r = server.post("generate", {"class": "cls_c", "seed": 1, "num_images": 1, "steps": 2, "format": "png"})
    assert r.status_code == 200 and r.headers["X-Seeds"] == str(2 * STRIDE + 1)


def test_bad_checkpoint_is_one_line_exit_2(bad_checkpoint_run):
    out, err = bad_checkpoint_run.communicate(timeout=180)
    assert bad_checkpoint_run.returncode == 2 and "Traceback" not in err, err
    assert err.startswith("error: ") and "notes.pt" in err and "not a checkpoint" in err and "serving" not in out
