"""Tests of controlnet/serve.py (HTTP API vs the CLI), interpolation (CLI and API) and progress.gif.

A tiny LDM as tests/test_controlnet.py builds it, a tiny class-conditioned ControlNet trained here (2 epochs,
then resumed for a third: 3 sample grids), a copy of it without classes, and one server subprocess serving
both, started while the CLI runs in this process. The generic server behaviour (auth, limits, paths, busy
queue, memory, browser) is tests/test_serving.py's.

    OMP_NUM_THREADS=1 python -m pytest tests/test_serve_controlnet.py -q
"""
import base64
import hashlib
import io
import zipfile

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image

import serve_helpers
from repo_helpers import free_port, load_folder, run_main_expect
from serve_helpers import Server, assert_one_line_error, pixels
from serve_helpers import one_thread  # noqa: F401  (an autouse fixture: one thread, as the server)
from test_controlnet import NUM_CLASSES, make_tiny_ldm

inference, train, animation, serve = load_folder("controlnet", "inference", "train", "animation", "serve")

STEPS = 3
PAD = 2  # animation.strip's gap between frames


# ------------------------------------------------------------------------------------------------ fixtures
def run_train(args):
    AcceleratorState._reset_state(True)
    return train.main([str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Tiny LDM, 8 digit pairs, a class-conditioned ControlNet (2 epochs + resume to 3), its class-free copy."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("serve_cn")
    d = load_digits()
    for sub in ("images", "masks"):
        (root / "data" / sub).mkdir(parents=True)
    rows = ["stem,class_name"]
    for i in range(8):
        img = np.asarray(Image.fromarray(np.uint8(d.images[i] / 16 * 255)).resize((32, 32), Image.BICUBIC))
        Image.fromarray(img).save(root / "data" / "images" / f"{i:03d}.png")
        Image.fromarray(np.where(img > 96, 255, 0).astype(np.uint8)).save(root / "data" / "masks" / f"{i:03d}.png")
        rows.append(f"{i:03d},digit_{i % NUM_CLASSES}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    ldm = make_tiny_ldm(root)
    run = root / "run"
    common = ["--data_root", root / "data", "--ldm_checkpoint", ldm, "--output_dir", run, "--batch_size", 4,
              "--learning_rate", 1e-3, "--val_fraction", 0.25, "--class_labels_csv", root / "labels.csv",
              "--sample_steps", 2, "--num_val_samples", 2, "--log_every_steps", 1]
    run_train(common + ["--num_epochs", 2])  # 6 training pairs: 1 step per epoch, a grid per epoch
    frames_before = animation.gif_frame_count(run / "progress.gif")
    run_train(common + ["--num_epochs", 3, "--resume"])
    ck = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    # the same ControlNet without classes: the DummyEncoder holds the null-class embedding
    ck.update(encoder_type="dummy", use_class_labels=False,
              encoder={"embedding": ck["encoder"]["embedding.weight"][NUM_CLASSES].clone().view(1, 1, -1)})
    torch.save(ck, root / "plain.pt")
    mask_bytes = (root / "data" / "masks" / "003.png").read_bytes()
    sha = hashlib.sha256(mask_bytes).hexdigest()[:12]
    (root / "masks").mkdir()
    (root / "masks" / f"{sha}.png").write_bytes(mask_bytes)  # the CLI's mask stem = the API's upload sha
    return {"root": root, "ldm": ldm, "run": run, "cls": run / "checkpoint_last.pt", "plain": root / "plain.pt",
            "mask_bytes": mask_bytes, "sha": sha, "mask": root / "masks" / f"{sha}.png",
            "frames_before_resume": frames_before}


@pytest.fixture(scope="module")
def server(work):
    out = work["root"] / "served"  # boots while the tests below run the CLI in this process
    s = Server("controlnet", ["--checkpoint", work["cls"], work["plain"], "--ldm_checkpoint", work["ldm"],
                              "--output_dir", out, "--max_upload_pixels", 64 * 64, "--max_steps", 20])
    s.out = out
    yield s
    s.stop()


def cli(work, ck, *flags):
    """inference.py in this process with the tiny LDM and the shared mask."""
    return inference.main([str(a) for a in ["--checkpoint", work[ck], "--ldm_checkpoint", work["ldm"], "--mask",
                                            work["mask"], "--output_dir", work["root"] / "cli", *flags]])


def strip_frames(src, n):
    return serve_helpers.strip_frames(src, n, 32, PAD)


# --------------------------------------------------------------------------------------------------- tests
def test_progress_gif_has_one_frame_per_grid_and_survives_resume(work):
    grids = sorted((work["run"] / "samples").glob("epoch_*.png"))
    assert [g.name for g in grids] == ["epoch_0000.png", "epoch_0001.png", "epoch_0002.png"]
    assert work["frames_before_resume"] == 2
    assert animation.gif_frame_count(work["run"] / "progress.gif") == len(grids) == 3
    assert not list(work["run"].glob(".progress*"))  # no temporary file left behind


def test_interpolation_cli_end_points_equal_plain_samples(work, server, capsys):
    server.proc.poll()  # (started: it loads while this runs)
    sha, n = work["sha"], 4
    png, gif = cli(work, "cls", "--interpolate_seeds", 3, 7, "--interp_frames", n, "--class_label", "digit_1",
                   "--cfg_scale", 2, "--num_inference_steps", STEPS)
    stem = animation.interpolation_stem("seeds", (3, 7), ["digit_1"], "ddim", STEPS, 2.0, n, extra=f"{sha}-scale1")
    assert (png.name, gif.name) == (f"{stem}.png", f"{stem}.gif")
    assert png.parent.name == "interpolation_checkpoint_last-step3-ema"
    assert animation.gif_frame_count(gif) == 2 * n - 2  # forward and back
    frames = strip_frames(png, n)
    plain = cli(work, "cls", "--class_label", "digit_1", "--cfg_scale", 2, "--num_inference_steps", STEPS,
                "--seed", 3)
    plain7 = cli(work, "cls", "--class_label", "digit_1", "--cfg_scale", 2, "--num_inference_steps", STEPS,
                 "--seed", 7)
    assert np.array_equal(frames[0], pixels(plain / f"{sha}_digit_1_seed3.png"))
    assert np.array_equal(frames[-1], pixels(plain7 / f"{sha}_digit_1_seed7.png"))
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[-1])
    before = png.stat().st_mtime_ns
    capsys.readouterr()
    cli(work, "cls", "--interpolate_seeds", 3, 7, "--interp_frames", n, "--class_label", "digit_1", "--cfg_scale", 2,
        "--num_inference_steps", STEPS)
    assert "skipped" in capsys.readouterr().out and png.stat().st_mtime_ns == before

    png, _ = cli(work, "cls", "--interpolate_classes", "digit_0", "digit_2", "--seed", 4, "--interp_frames", n,
                 "--num_inference_steps", STEPS)
    assert png.stem == f"interp_classes_digit_0-digit_2_seed4_ddim{STEPS}_cfg1_f{n}_{sha}-scale1"
    frames = strip_frames(png, n)
    for k, cls in ((0, "digit_0"), (-1, "digit_2")):
        out = cli(work, "cls", "--class_label", cls, "--num_inference_steps", STEPS, "--seed", 4)
        assert np.array_equal(frames[k], pixels(out / f"{sha}_{cls}_seed4.png")), cls
    # a class-free ControlNet interpolates seeds only; an interpolation takes one mask
    msg = run_main_expect(inference.main, [str(a) for a in ["--checkpoint", work["plain"], "--ldm_checkpoint",
                                                            work["ldm"], "--mask", work["mask"],
                                                            "--interpolate_classes", "digit_0", "digit_1"]], capsys)
    assert "trained without class labels" in msg
    msg = run_main_expect(inference.main, [str(a) for a in ["--checkpoint", work["cls"], "--ldm_checkpoint", work["ldm"],
                                                            "--mask_folder", work["root"] / "masks",
                                                            "--interpolate_seeds", 1, 2]], capsys)
    assert "--mask_folder does not go with --interpolate_seeds" in msg


@pytest.mark.parametrize("model,settings,flags", [
    ("checkpoint_last", {"class": "digit_1", "guidance": 2.0, "sampler": "ddim"},
     ["--class_label", "digit_1", "--cfg_scale", 2, "--scheduler", "ddim"]),
    ("plain", {"sampler": "dpmsolver", "controlnet_scale": 0.5}, ["--scheduler", "dpmsolver", "--controlnet_scale", 0.5]),
], ids=["classes-ddim-cfg", "plain-dpmsolver-scale"])
def test_api_generate_equals_cli(work, server, model, settings, flags):
    body = dict(settings, model=model, seed=5, num_images=2, steps=STEPS, format="zip")
    r = server.post("generate", body, work["mask_bytes"])
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    names = sorted(n for n in z.namelist() if n.endswith(".png"))
    out = cli(work, "cls" if model == "checkpoint_last" else "plain", *flags, "--seed", 5, "--num_images", 2,
              "--num_inference_steps", STEPS)
    assert r.headers["X-Tag"] == out.name and r.headers["X-Seeds"] == "5,6"
    cls = f"_{settings['class']}" if "class" in settings else ""
    assert names == [f"{work['sha']}{cls}_seed{s}.png" for s in (5, 6)]  # the upload's sha, never a client name
    saved = server.out / out.name
    for n in names:
        assert np.array_equal(pixels(z.read(n)), pixels(out / n)), n
        assert np.array_equal(pixels(saved / n), pixels(out / n)), n
    stamps = {n: (saved / n).stat().st_mtime_ns for n in names}
    assert server.post("generate", body, work["mask_bytes"]).status_code == 200  # same request: saved once
    assert {n: (saved / n).stat().st_mtime_ns for n in names} == stamps


def test_api_interpolation_equals_cli(work, server):
    n = 4
    r = server.post("interpolate", {"model": "checkpoint_last", "mode": "classes", "class": "digit_0",
                                    "class_b": "digit_2", "seed": 4, "frames": n, "steps": STEPS, "format": "json"},
                    work["mask_bytes"])
    assert r.status_code == 200, r.text
    got = r.json()
    png, _ = cli(work, "cls", "--interpolate_classes", "digit_0", "digit_2", "--seed", 4, "--interp_frames", n,
                 "--num_inference_steps", STEPS)
    assert (got["tag"], got["stem"]) == (png.parent.name, png.stem)
    api_frames = [pixels(base64.b64decode(f["png"])) for f in got["frames"]]
    assert [f["t"] for f in got["frames"]] == animation.interp_weights(n)
    for a, b in zip(api_frames, strip_frames(png, n)):
        assert np.array_equal(a, b)
    assert (server.out / got["tag"] / f"{got['stem']}.png").is_file()
    assert (server.out / got["tag"] / f"{got['stem']}.gif").is_file()
    # seeds on the class-free model: the strip's end points are the plain images of the two seeds
    r = server.post("interpolate", {"model": "plain", "mode": "seeds", "seed": 3, "seed_b": 8, "frames": 3,
                                    "steps": STEPS, "format": "png"}, work["mask_bytes"])
    assert r.status_code == 200, r.text
    frames = strip_frames(io.BytesIO(r.content), 3)
    for k, seed in ((0, 3), (-1, 8)):
        g = server.post("generate", {"model": "plain", "seed": seed, "num_images": 1, "steps": STEPS,
                                     "sampler": "ddim", "format": "png"}, work["mask_bytes"])
        assert g.status_code == 200 and np.array_equal(frames[k], pixels(g.content))


def test_bad_masks_are_one_message_4xx_and_the_server_goes_on(work, server):
    def upload(arr_or_image, fmt="PNG"):
        im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        return buf.getvalue()

    body = {"model": "checkpoint_last", "seed": 1, "num_images": 1, "steps": 2, "format": "zip"}
    cases = [
        (b"this is not an image", 400, "not a readable"),
        (upload(Image.new("RGB", (32, 32), (255, 0, 0))), 400, "takes a grayscale label map"),
        (upload(np.full((32, 32), 2.0, np.float32), "TIFF"), 400, "outside [0, 1]"),
        (upload(np.full((32, 32), -5, np.int32), "TIFF"), 400, "negative"),
        (upload(np.zeros((100, 100), np.uint8)), 413, "--max_upload_pixels"),
        (None, 400, "needs an upload"),
    ]
    for data, status, words in cases:
        r = server.post("generate", body, data)
        msg = assert_one_line_error(r, status)
        assert list(r.json()) == ["error"] and words in msg, (words, msg)
        assert "/tmp" not in msg and "controlnet-serve" not in msg, msg  # no server-side path in the answer
    r = server.post("generate", body, work["mask_bytes"])
    assert r.status_code == 200, r.text


def test_serve_refuses_a_bad_checkpoint_with_one_line(work, capsys):
    msg = run_main_expect(serve.main, ["--checkpoint", str(work["ldm"]), "--ldm_checkpoint", str(work["ldm"]),
                                       "--port", str(free_port())], capsys)
    assert "not a ControlNet checkpoint" in msg and "it goes to --ldm_checkpoint" in msg, msg
    msg = run_main_expect(serve.main, ["--checkpoint", str(work["cls"]), str(work["plain"]), "--ldm_checkpoint",
                                       str(work["ldm"]), str(work["ldm"]), str(work["ldm"])], capsys)
    assert "one LDM for all, or one per --checkpoint" in msg
