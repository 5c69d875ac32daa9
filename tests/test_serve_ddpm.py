"""Tests of ddpm/serve.py (HTTP API vs inference.py), interpolation (CLI and API), the sampler's interpolation
hooks and train.py's progress.gif.

Tiny checkpoints trained here by ddpm/train.py (16 px, width 8, 20 noise steps): a class-conditional run
(a grid every epoch, 2 epochs, then resumed for a third), an unconditional RGB run, a mask2image and a
superres run; one server subprocess serves all four, booting while the CLI runs in this process. The generic
server behaviour (auth, limits, paths, busy queue, memory, browser) is tests/test_serving.py's.

    OMP_NUM_THREADS=1 python -m pytest tests/test_serve_ddpm.py -q
"""
import base64
import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import serve_helpers
from repo_helpers import free_port, load_folder, run_main_expect, run_script
from serve_helpers import Server, assert_one_line_error, pixels
from serve_helpers import one_thread  # noqa: F401  (an autouse fixture: one thread, as the server)

train, inference, models, sampling, animation = load_folder("ddpm", "train", "inference", "models", "sampling",
                                                            "animation")

S, STEPS = 16, 4  # image side, sampling steps
TINY = ["--image-size", S, "--base-channels", 8, "--time-dim", 16, "--noise-steps", 20, "--device", "cpu",
        "--log-every", 1]


# ------------------------------------------------------------------------------------------------ fixtures
def square(rng, fg=220):
    m = np.zeros((S, S), np.uint8)
    r, c = rng.integers(2, 8, 2)
    m[r:r + 6, c:c + 6] = 255
    img = (rng.random((S, S)) * 60).astype(np.uint8)
    img[m > 0] = fg
    return img, m


def fit(args):
    train.main([str(a) for a in args])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The four tiny runs, and a mask saved as <sha>.png (the CLI's condition stem = the API's upload sha)."""
    root = tmp_path_factory.mktemp("serve_ddpm")
    rng = np.random.default_rng(0)
    for c in range(3):  # class folders (gray), an RGB folder, image / mask pairs
        (root / "cls" / f"class_{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(square(rng, 120 + 50 * c)[0]).save(root / "cls" / f"class_{c}" / f"{i}.png")
    (root / "rgb").mkdir()
    for sub in ("images", "masks"):
        (root / "pairs" / sub).mkdir(parents=True)
    for i in range(4):
        img, m = square(rng)
        Image.fromarray(np.stack([img, img[::-1], m], -1)).save(root / "rgb" / f"{i}.png")
        Image.fromarray(img).save(root / "pairs" / "images" / f"case{i}.png")
        Image.fromarray(m).save(root / "pairs" / "masks" / f"case{i}.png")
    w = root / "work"
    grids = ["--sample-every-epochs", 1, "--sampler", "ddim", "--sampling-steps", 2, "--grid-images", 6]
    fit(["--data-root", root / "cls", "--work-dir", w, *TINY, "--batch-size", 4, "--num-epochs", 2, *grids])
    frames_before = animation.gif_frame_count(w / "results" / "DDPM_conditional" / "progress.gif")
    fit(["--data-root", root / "cls", "--work-dir", w, *TINY, "--num-epochs", 3, "--resume", *grids])
    fit(["--data-root", root / "rgb", "--unconditional", "--work-dir", w, *TINY, "--batch-size", 2,
         "--max-train-steps", 2, "--sample-every-epochs", 0])
    for task in ("mask2image", "superres"):
        fit(["--task", task, "--data-root", root / "pairs", "--work-dir", w, *TINY, "--batch-size", 2,
             "--max-train-steps", 2, "--sample-every-epochs", 0])
    mask_bytes = (root / "pairs" / "masks" / "case1.png").read_bytes()
    sha = hashlib.sha256(mask_bytes).hexdigest()[:12]
    (root / "masks").mkdir()
    (root / "masks" / f"{sha}.png").write_bytes(mask_bytes)
    m = w / "models"
    return {"root": root, "results": w / "results" / "DDPM_conditional", "frames_before_resume": frames_before,
            "cls": m / "DDPM_conditional" / "ema_ckpt.pt", "uncond": m / "DDPM_Unconditional" / "ema_ckpt.pt",
            "m2i": m / "DDPM_mask2image" / "ema_ckpt.pt", "sr": m / "DDPM_superres" / "ema_ckpt.pt",
            "mask_bytes": mask_bytes, "sha": sha, "mask": root / "masks" / f"{sha}.png"}


KEYS = {"cls": "DDPM_conditional-ema_ckpt", "uncond": "DDPM_Unconditional-ema_ckpt",
        "m2i": "DDPM_mask2image-ema_ckpt", "sr": "DDPM_superres-ema_ckpt"}


@pytest.fixture(scope="module")
def server(work):
    out = work["root"] / "served"  # boots while the tests below run the CLI in this process
    s = Server("ddpm", ["--checkpoint", *(work[k] for k in KEYS), "--output_dir", out, "--max_steps", 20])
    s.out = out
    yield s
    s.stop()


def cli(work, ck, out, *flags):
    """inference.py in this process -> its output folder."""
    return inference.sample(inference.build_parser().parse_args(
        [str(a) for a in ["--ckpt", work[ck], "--output-dir", work["root"] / "cli" / out, *flags]]))


def strip_frames(src, n):
    return serve_helpers.strip_frames(src, n, S)


PLAIN = ["--sampler", "ddim", "--sampling-steps", STEPS, "--num-samples", 1]  # a plain one-image DDIM run


# --------------------------------------------------------------------------------------------------- tests
def test_progress_gif_has_one_frame_per_grid_and_survives_resume(work):
    grids = sorted(work["results"].glob("epoch*_ema.png"))
    assert [g.name for g in grids] == ["epoch0001_ema.png", "epoch0002_ema.png", "epoch0003_ema.png"]
    assert work["frames_before_resume"] == 2
    assert animation.gif_frame_count(work["results"] / "progress.gif") == len(grids) == 3
    assert not list(work["results"].glob(".progress*"))  # no temporary file left behind


@pytest.mark.parametrize("cfg", [3.0, 1.0])
def test_sampler_hooks_reproduce_the_plain_sampler(cfg):
    torch.manual_seed(0)
    m = models.UNet_conditional(c_in=1, c_out=1, img_size=8, base_channels=8, time_dim=16, num_classes=3)
    d = models.Diffusion(noise_steps=20, img_size=8, device="cpu")
    seeds, y = [5, 6], torch.tensor([0, 2])
    kw = dict(cfg_scale=cfg, sampler="ddim", steps=5, seeds=seeds, progress=False)
    plain = d.sample(m, 2, labels=y, **kw)
    hooked = d.sample(m, 2, labels=y, x_init=d.initial_noise(seeds, 1), class_emb=m.label_emb(y).detach(), **kw)
    assert torch.equal(plain, hooked)  # the hooks at an end point are the plain sampler, bit for bit
    mixed = d.sample(m, 2, labels=y, class_emb=(0.5 * m.label_emb(y) + 0.5 * m.label_emb(y.flip(0))).detach(), **kw)
    assert not torch.equal(plain, mixed)


def test_interpolation_cli_end_points_equal_plain_samples(work, server, capsys):
    server.proc.poll()  # (started: it loads while this runs)
    n = 5
    out = cli(work, "cls", "interp", "--interpolate_seeds", 3, 9, "--class-labels", "class_1", "--interp_frames", n,
              "--cfg-scale", 2, "--sampling-steps", STEPS)
    stem = f"interp_seeds3-9_class_1_ddim{STEPS}_cfg2_f{n}"
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}.gif", f"{stem}.png"]
    assert animation.gif_frame_count(out / f"{stem}.gif") == 2 * n - 2  # forward and back
    frames = strip_frames(out / f"{stem}.png", n)
    for k, seed in ((0, 3), (-1, 9)):
        plain = cli(work, "cls", f"seed{seed}", "--class-labels", "class_1", "--cfg-scale", 2, "--seed", seed, *PLAIN)
        assert np.array_equal(frames[k], pixels(plain / f"class_1_seed{seed}.png")), seed
    assert not np.array_equal(frames[2], frames[0]) and not np.array_equal(frames[2], frames[-1])
    before = (out / f"{stem}.png").stat().st_mtime_ns
    capsys.readouterr()
    cli(work, "cls", "interp", "--interpolate_seeds", 3, 9, "--class-labels", "class_1", "--interp_frames", n,
        "--cfg-scale", 2, "--sampling-steps", STEPS)
    assert "skipped" in capsys.readouterr().out and (out / f"{stem}.png").stat().st_mtime_ns == before

    out = cli(work, "cls", "interp", "--interpolate_classes", "class_0", 2, "--seed", 4, "--interp_frames", n,
              "--sampling-steps", STEPS)  # names or indices, as --class-labels
    stem = f"interp_classes_class_0-class_2_seed4_ddim{STEPS}_cfg3_f{n}"
    frames = strip_frames(out / f"{stem}.png", n)
    for k, c in ((0, "class_0"), (-1, "class_2")):
        plain = cli(work, "cls", f"seed4_{c}", "--class-labels", c, "--seed", 4, *PLAIN)
        assert np.array_equal(frames[k], pixels(plain / f"{c}_seed4.png")), c
    assert not np.array_equal(frames[2], frames[0]) and not np.array_equal(frames[2], frames[-1])

    # the default folder names the checkpoint; the one-line errors
    assert inference.interpolation_folder(inference.build_parser().parse_args(
        ["--ckpt", str(work["cls"]), "--interpolate_seeds", "1", "2"]), work["cls"])[1] == \
        "interpolation_DDPM_conditional_ema_ckpt"
    for flags, words in (
            (["--interpolate_classes", "a", "b"], "unconditional"),
            (["--interpolate_seeds", 1, 2, "--sampler", "ddpm"], "deterministic DDIM"),
            (["--interpolate_seeds", 1, 2, "--interp_frames", 1], "--interp_frames 1 must be >= 2"),
            (["--interpolate_seeds", 1, 2, "--interpolate_classes", "a", "b"], "not both")):
        msg = run_main_expect(inference.main, [str(a) for a in ["--ckpt", work["uncond"], *flags]], capsys)
        assert words in msg, msg
    msg = run_main_expect(inference.main, [str(a) for a in ["--ckpt", work["cls"], "--interpolate_seeds", 1, 2,
                                                            "--class-labels", "class_0", "class_1"]], capsys)
    assert "has one class" in msg


@pytest.mark.parametrize("ck,settings,flags", [
    ("cls", {"class": "class_1", "guidance": 2.0, "sampler": "ddim", "num_images": 3, "format": "zip"},
     ["--class-labels", "class_1", "--cfg-scale", 2, "--sampler", "ddim", "--num-samples", 3]),
    ("uncond", {"sampler": "ddpm", "num_images": 1, "format": "png"}, ["--sampler", "ddpm", "--num-samples", 1]),
], ids=["classes-ddim-cfg-zip", "unconditional-ddpm-png"])
def test_api_generate_equals_cli(work, server, ck, settings, flags):
    body = dict(settings, model=KEYS[ck], seed=5, steps=STEPS)
    r = server.post("generate", body)
    assert r.status_code == 200, r.text
    out = cli(work, ck, f"gen_{ck}", *flags, "--seed", 5, "--sampling-steps", STEPS)
    cli_names = sorted(p.name for p in out.glob("*.png"))
    if settings["format"] == "zip":
        z = zipfile.ZipFile(io.BytesIO(r.content))
        got = {n: z.read(n) for n in z.namelist() if n.endswith(".png")}
        assert json.loads(z.read("settings.json"))["tag"] == r.headers["X-Tag"]
    else:
        got = {r.headers["Content-Disposition"].split('"')[1]: r.content}
    assert sorted(got) == cli_names == sorted(f"{settings.get('class', 'sample')}_seed{s}.png"
                                              for s in range(5, 5 + settings["num_images"]))
    # the tag is the CLI's default folder name under samples/
    assert r.headers["X-Tag"] == inference.samples_tag(inference.checkpoint_tag(work[ck], work[ck], False),
                                                       settings["sampler"], STEPS, settings.get("guidance", 3.0), 5)
    saved = server.out / r.headers["X-Tag"]
    assert sorted(p.name for p in saved.iterdir()) == cli_names
    for name, data in got.items():
        assert np.array_equal(pixels(data), pixels(out / name)), name
        assert np.array_equal(pixels(saved / name), pixels(out / name)), name
    stamps = {p.name: p.stat().st_mtime_ns for p in saved.iterdir()}
    assert server.post("generate", body).status_code == 200  # the same request again: saved once
    assert {p.name: p.stat().st_mtime_ns for p in saved.iterdir()} == stamps


def test_api_interpolation_equals_cli(work, server):
    n = 4
    r = server.post("interpolate", {"model": KEYS["cls"], "mode": "classes", "class": "class_0", "class_b": "class_2",
                                    "seed": 4, "frames": n, "steps": STEPS, "format": "json"})
    assert r.status_code == 200, r.text
    got = r.json()
    out = cli(work, "cls", "interp_api", "--interpolate_classes", "class_0", "class_2", "--seed", 4,
              "--interp_frames", n, "--sampling-steps", STEPS)
    assert got["tag"] == "interpolation_DDPM_conditional_ema_ckpt"
    assert got["stem"] == f"interp_classes_class_0-class_2_seed4_ddim{STEPS}_cfg3_f{n}"
    assert [f["t"] for f in got["frames"]] == animation.interp_weights(n)
    for a, b in zip([pixels(base64.b64decode(f["png"])) for f in got["frames"]],
                    strip_frames(out / f"{got['stem']}.png", n)):
        assert np.array_equal(a, b)
    for ext in ("png", "gif"):
        assert (server.out / got["tag"] / f"{got['stem']}.{ext}").is_file()
    # seeds on the unconditional model: the strip's end points are the plain images of the two seeds
    r = server.post("interpolate", {"model": KEYS["uncond"], "mode": "seeds", "seed": 3, "seed_b": 8, "frames": 3,
                                    "steps": STEPS, "format": "png"})
    assert r.status_code == 200, r.text
    assert r.headers["X-Stem"] == f"interp_seeds3-8_ddim{STEPS}_f3"
    frames = strip_frames(io.BytesIO(r.content), 3)
    for k, seed in ((0, 3), (-1, 8)):
        g = server.post("generate", {"model": KEYS["uncond"], "seed": seed, "num_images": 1, "steps": STEPS,
                                     "sampler": "ddim", "format": "png"})
        assert g.status_code == 200 and np.array_equal(frames[k], pixels(g.content))
    assert server.post("interpolate", {"model": KEYS["uncond"], "mode": "classes"}).status_code == 400


def test_mask2image_api_and_interpolation_equal_cli(work, server):
    sha, mask = work["sha"], work["mask_bytes"]
    body = {"model": KEYS["m2i"], "seed": 2, "num_images": 2, "sampler": "ddim", "steps": STEPS, "cond_scale": 1.5,
            "format": "zip"}
    r = server.post("generate", body, mask)
    assert r.status_code == 200, r.text
    z = zipfile.ZipFile(io.BytesIO(r.content))
    names = sorted(n for n in z.namelist() if n.endswith(".png"))
    assert names == [f"{sha}_seed2.png", f"{sha}_seed3.png"]  # the upload's sha, never the client's file name
    out = cli(work, "m2i", "m2i", "--condition", work["mask"], "--seed", 2, "--samples-per-condition", 2,
              "--sampler", "ddim", "--sampling-steps", STEPS, "--cond-scale", 1.5)
    assert r.headers["X-Tag"] == f"DDPM_mask2image_ema_ckpt_mask2image_ddim{STEPS}_cond1.5_seed2"
    for n in names:
        assert np.array_equal(pixels(z.read(n)), pixels(out / n)), n
        assert np.array_equal(pixels(server.out / r.headers["X-Tag"] / n), pixels(out / n)), n

    n = 4
    r = server.post("interpolate", {"model": KEYS["m2i"], "seed": 0, "seed_b": 1, "frames": n, "steps": STEPS,
                                    "format": "json"}, mask)
    assert r.status_code == 200, r.text
    got = r.json()
    interp = cli(work, "m2i", "m2i_interp", "--interpolate_seeds", 0, 1, "--condition", work["mask"],
                 "--interp_frames", n, "--sampling-steps", STEPS)
    assert got["stem"] == f"interp_seeds0-1_ddim{STEPS}_f{n}_{sha}_cond1"
    strip = strip_frames(interp / f"{got['stem']}.png", n)
    for a, b in zip([pixels(base64.b64decode(f["png"])) for f in got["frames"]], strip):
        assert np.array_equal(a, b)
    for k, seed in ((0, 0), (-1, 1)):
        plain = cli(work, "m2i", f"m2i_seed{seed}", "--condition", work["mask"], "--seed", seed, "--sampler", "ddim",
                    "--sampling-steps", STEPS)
        assert np.array_equal(strip[k], pixels(plain / f"{sha}_seed{seed}.png")), seed


def png_bytes(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_bad_uploads_are_one_message_4xx_and_the_server_goes_on(work, server):
    m2i = {"model": KEYS["m2i"], "seed": 1, "num_images": 1, "steps": 2, "format": "zip"}
    sr = dict(m2i, model=KEYS["sr"])
    colour = np.zeros((S, S, 3), np.uint8)
    colour[4:10, 4:10] = (255, 0, 0)
    cases = [
        (m2i, b"this is not an image", "generate", "not a readable"),
        (m2i, png_bytes(colour), "generate", "the uploaded mask is a colour image"),
        ({"model": KEYS["m2i"], "frames": 3}, png_bytes(colour), "interpolate", "the uploaded mask is a colour image"),
        (m2i, None, "generate", "needs an upload"),
        (sr, png_bytes(np.zeros((5, 5), np.uint8)), "generate", "takes 4x4 low-res inputs"),  # superres' size rule
        ({"model": KEYS["cls"], "class": "class_9"}, None, "generate", "unknown class"),
        ({"model": KEYS["cls"]}, work["mask_bytes"], "generate", "takes no upload"),
    ]
    for body, data, kind, words in cases:
        r = server.post(kind, body, data)
        msg = assert_one_line_error(r, 400)
        assert list(r.json()) == ["error"] and words in msg, msg
        assert "/tmp" not in msg and "ddpm-serve" not in msg, msg  # no server-side path in the answer
    assert server.post("generate", m2i, work["mask_bytes"]).status_code == 200
    low = png_bytes(np.full((S // 4, S // 4), 128, np.uint8))
    assert server.post("generate", sr, low).status_code == 200
    assert requests.get(server.url("/api/info"), timeout=10).status_code == 200


def test_serve_refuses_a_bad_checkpoint_with_one_line(work):
    bad = work["root"] / "not_a_checkpoint.pt"
    torch.save({"weights": [1, 2, 3]}, bad)
    proc = run_script("ddpm", ["serve.py", "--checkpoint", str(bad), "--port", str(free_port())], check=False,
                      timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "not a DDPM checkpoint" in err, err
