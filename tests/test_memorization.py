"""Tests of evaluation/memorization.py: planted near-copies found with their source, calibration on held-out
images, the coarse-to-fine search against a brute-force reference, feature mode, the gallery, bad inputs.

    OMP_NUM_THREADS=1 python -m pytest tests/test_memorization.py -q

Data: random smooth RGB textures (bicubic upsampling of an 8x8 noise grid) at 32 px, written by the test.
"""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from repo_helpers import load_folder

mem = load_folder("evaluation", "memorization")

SIDE = 32


def textures(n, seed, side=SIDE, grid=8):
    """n random smooth textures, float (n, 3, side, side) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(n, 3, grid, grid, generator=g)
    return F.interpolate(lo, size=(side, side), mode="bicubic", align_corners=False).clamp(0, 1)


def jpeg(x, quality=50):
    """x (3, H, W) through an 8-bit JPEG file of that quality (PIL)."""
    a = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1).float() / 255


def shifted(x, dy, dx):
    """x moved by (dy, dx) pixels (content at the border wraps: the search only looks at the centre)."""
    return torch.roll(x, (dy, dx), (1, 2))


def noisy(x, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


# (kind, train index, how the copy is made, flipped, shift (dy, dx): gen (mirrored when flipped)[y, x] ~
# train[y + dy, x + dx])
PLANTS = [
    ("exact", 3, lambda t: t, False, (0, 0)),
    ("flipped", 17, lambda t: t.flip(-1), True, (0, 0)),
    ("shift 1 px", 29, lambda t: shifted(t, 1, 0), False, (-1, 0)),
    ("shift 2 px", 41, lambda t: shifted(t, -2, 1), False, (2, -1)),
    ("brightness/contrast", 55, lambda t: t * 0.6 + 0.25, False, (0, 0)),
    ("darker, higher contrast", 60, lambda t: (t * 1.2 - 0.1).clamp(0, 1), False, (0, 0)),
    ("jpeg q50", 68, lambda t: jpeg(t, 50), False, (0, 0)),
    ("gaussian noise 0.03", 77, lambda t: noisy(t, 0.03, 1), False, (0, 0)),
    ("flip + shift + jpeg", 90, lambda t: jpeg(shifted(t.flip(-1), 1, -2), 60), True, (-1, -2)),
    ("contrast + noise + shift", 101, lambda t: noisy(shifted(t * 0.8 + 0.1, 0, 2), 0.02, 2), False, (0, -2)),
]
N_NOVEL = 50


@pytest.fixture(scope="module")
def data():
    train = textures(150, seed=1)
    heldout = textures(100, seed=2)
    novel = textures(N_NOVEL, seed=3)
    copies = torch.stack([make(train[j]) for _, j, make, _, _ in PLANTS])
    gen = torch.cat([novel, copies])
    res = mem.audit(gen, train, heldout, false_flag_rate=0.01, progress=False)
    return dict(train=train, heldout=heldout, gen=gen, res=res)


def test_every_planted_copy_is_flagged_with_its_source(data):
    res = data["res"]
    assert res["method"] == "pixel-ncc" and res["n_gen"] == N_NOVEL + len(PLANTS)
    found = {c["gen"]: c for c in res["copies"]}
    for k, (kind, j, _, flipped, shift) in enumerate(PLANTS):
        i = N_NOVEL + k
        assert i in found, f"{kind} copy not flagged (similarity {res['similarity'][i]:.3f}, " \
                           f"threshold {res['threshold']:.3f})"
        assert found[i]["train"] == j and res["nearest"][i] == j, kind
        assert found[i]["flipped"] == flipped and tuple(found[i]["shift"]) == shift, kind
        assert found[i]["similarity"] > 0.9, kind
    assert res["similarity"][N_NOVEL] == pytest.approx(1.0, abs=1e-5)  # exact copy
    sims = [c["similarity"] for c in res["copies"]]
    assert sims == sorted(sims, reverse=True)


def test_novel_images_flagged_at_about_the_calibrated_rate(data):
    res = data["res"]
    novel_flagged = sum(c["gen"] < N_NOVEL for c in res["copies"])
    assert novel_flagged <= math.floor(0.05 * N_NOVEL)
    assert res["heldout_flag_rate"] <= res["false_flag_rate"] == 0.01
    held = np.array(res["heldout_similarity"])
    assert res["heldout_flag_rate"] == pytest.approx((held > res["threshold"]).mean())
    assert res["copy_rate"] == pytest.approx(len(res["copies"]) / res["n_gen"])
    assert max(res["similarity"][:N_NOVEL]) < 0.9 < min(res["similarity"][N_NOVEL:])


def test_threshold_comes_from_heldout(data):
    res = data["res"]
    held = np.sort(res["heldout_similarity"])
    assert res["threshold"] == pytest.approx(held[98])  # 99th of 100 values: 1 of 100 above it
    assert mem.calibrate(held, 0.2) == pytest.approx(held[79])
    other = mem.audit(data["gen"], data["train"], textures(100, seed=12), progress=False)
    assert other["threshold"] != pytest.approx(res["threshold"], abs=1e-4)
    assert other["similarity"] == res["similarity"]  # only the threshold depends on the held-out set
    # held-out images that are in fact training images raise the threshold and are reported
    leaky = data["heldout"].clone()
    leaky[:10] = data["train"][:10]
    bad = mem.audit(data["gen"], data["train"], leaky, progress=False)
    assert bad["threshold"] > 0.99 and any("near-identical" in w for w in bad["warnings"])
    assert bad["copy_rate"] < res["copy_rate"]


def brute_force(gen, train, s):
    """Reference: explicit NCC of every (gen, train) pair over both flips and all shifts, per crop."""
    grey = False
    gp, tp = mem.prepare(gen, grey).numpy(), mem.prepare(train, grey).numpy()
    h, w = gp.shape[2] - 2 * s, gp.shape[3] - 2 * s
    best, idx = np.full(len(gp), -np.inf), np.zeros(len(gp), int)

    def unit(a):
        a = a - a.mean()
        return a / max(np.linalg.norm(a), 1e-12)
    for i, g in enumerate(gp):
        crop = g[:, s:s + h, s:s + w]
        tmpls = [unit(crop), unit(crop[:, :, ::-1])]
        for j, t in enumerate(tp):
            for dy in range(2 * s + 1):
                for dx in range(2 * s + 1):
                    win = unit(t[:, dy:dy + h, dx:dx + w])
                    for tm in tmpls:
                        v = float((tm * win).sum())
                        if v > best[i] + 1e-9:
                            best[i], idx[i] = v, j
    return best, idx


def test_coarse_to_fine_matches_brute_force_on_copies():
    train = textures(24, seed=21, side=24)
    novel = textures(6, seed=22, side=24)
    copies = torch.stack([train[2].flip(-1), shifted(train[5], 1, 1), jpeg(train[9]), train[14] * 0.5 + 0.3,
                          noisy(shifted(train[20].flip(-1), -1, 2), 0.03, 3)])
    gen = torch.cat([novel, copies])
    heldout = textures(10, seed=23, side=24)
    ref_best, ref_idx = brute_force(gen, train, 2)
    full = mem.audit(gen, train, heldout, candidates=len(train), progress=False)
    assert np.allclose(full["similarity"], ref_best, atol=1e-4)  # the FFT search is exact
    assert full["nearest"] == list(ref_idx)
    fast = mem.audit(gen, train, heldout, candidates=3, progress=False)
    fast_sim = np.array(fast["similarity"])
    assert (fast_sim <= ref_best + 1e-4).all()  # a max over fewer candidates can only be lower
    for i, j in zip(range(len(novel), len(gen)), (2, 5, 9, 14, 20)):
        assert ref_idx[i] == j and fast["nearest"][i] == j
        assert fast_sim[i] == pytest.approx(ref_best[i], abs=1e-4)
    again = mem.audit(gen, train, heldout, candidates=3, progress=False)
    assert again["similarity"] == fast["similarity"] and again["nearest"] == fast["nearest"]  # deterministic


def test_grey_copied_to_three_channels_is_searched_as_one():
    train = textures(40, seed=31)[:, :1]
    gen = torch.cat([textures(5, seed=32)[:, :1], train[[4, 8]].flip(-1)])
    held = textures(20, seed=33)[:, :1]
    one = mem.audit(gen, train, held, progress=False)
    three = mem.audit(gen.expand(-1, 3, -1, -1), train.expand(-1, 3, -1, -1), held.expand(-1, 3, -1, -1),
                      progress=False)
    assert np.allclose(one["similarity"], three["similarity"], atol=1e-5)
    assert {c["gen"]: c["train"] for c in three["copies"]}.items() >= {5: 4, 6: 8}.items()


def test_feature_mode_flags_a_planted_duplicate():
    rng = np.random.default_rng(0)
    train_f = rng.standard_normal((120, 32)).astype(np.float32)
    held_f = rng.standard_normal((100, 32)).astype(np.float32)
    gen_f = rng.standard_normal((30, 32)).astype(np.float32)
    gen_f[7] = 3 * train_f[44] + 0.05 * rng.standard_normal(32)  # cosine ignores the scale
    names = [f"gen_{i}.png" for i in range(30)]
    tnames = [f"train/{j}.png" for j in range(120)]
    res = mem.audit(None, None, None, features=(gen_f, train_f, held_f), gen_names=names, train_names=tnames,
                    progress=False)
    assert res["method"] == "feature-cosine"
    assert res["copies"][0]["gen"] == "gen_7.png" and res["copies"][0]["train"] == "train/44.png"
    assert res["copies"][0]["similarity"] > 0.99 and res["nearest"][7] == 44
    assert res["copy_rate"] <= 3 / 30 and res["heldout_flag_rate"] <= 0.01
    cos = (held_f / np.linalg.norm(held_f, axis=1, keepdims=True)) @ \
        (train_f / np.linalg.norm(train_f, axis=1, keepdims=True)).T
    assert np.allclose(res["heldout_similarity"], cos.max(1), atol=1e-5)


def test_gallery_png(data, tmp_path):
    path = tmp_path / "out" / "gallery.png"
    out = mem.save_gallery(data["gen"], data["train"], data["res"], path, max_pairs=6)
    assert out == str(path) and path.is_file()
    *_, width, height = mem.gallery_layout(SIDE, SIDE, 6)
    img = np.array(Image.open(path).convert("RGB"))
    assert img.shape == (height, width, 3)
    assert (width, height) == (4 * (2 * 64 + 3 * 2), 2 * (64 + 2 * 2 + 12))  # 32 px enlarged x2, 4 per row
    assert tuple(img[0, 0]) == (220, 0, 0)  # the most similar pair is a planted copy: red frame
    assert sorted(p.name for p in path.parent.iterdir()) == ["gallery.png"]  # no temporary file left
    *_, w16, h16 = mem.gallery_layout(SIDE, SIDE, 16)
    mem.save_gallery(data["gen"], data["train"], data["res"], path)
    assert Image.open(path).size == (w16, h16)


def _one_line_value_error(fn, match):
    with pytest.raises(ValueError, match=match) as exc:
        fn()
    assert "\n" not in str(exc.value)


@pytest.mark.bad_input
@pytest.mark.parametrize("case, match", [
    ("empty gen", "gen: the set is empty"),
    ("empty train", "train: the set is empty"),
    ("empty heldout", "heldout: the set is empty"),
    ("sizes differ", "same height and width"),
    ("3-d tensor", r"shape \(N, C, H, W\)"),
    ("rate 0", "false_flag_rate"),
    ("rate 1", "false_flag_rate"),
    ("rate 1.5", "false_flag_rate"),
    ("rate -0.1", "false_flag_rate"),
    ("rate text", "false_flag_rate"),
    ("nan", "NaN"),
    ("names", "gen_names: 3 names for 8 images"),
    ("max_shift", "max_shift"),
    ("features dims", "feature dimensions differ"),
    ("features rows", "gen: 8 images but 5 feature rows"),
    ("features empty", "train features"),
    ("device", "device 'gpu-please'"),
])
def test_bad_inputs_raise_one_line(case, match):
    x = textures(8, seed=41)
    f = np.ones((8, 4), np.float32)
    calls = {
        "empty gen": lambda: mem.audit(x[:0], x, x, progress=False),
        "empty train": lambda: mem.audit(x, x[:0], x, progress=False),
        "empty heldout": lambda: mem.audit(x, x, x[:0], progress=False),
        "sizes differ": lambda: mem.audit(x, x[:, :, :16, :16], x, progress=False),
        "3-d tensor": lambda: mem.audit(x[0], x, x, progress=False),
        "rate 0": lambda: mem.audit(x, x, x, false_flag_rate=0, progress=False),
        "rate 1": lambda: mem.audit(x, x, x, false_flag_rate=1, progress=False),
        "rate 1.5": lambda: mem.audit(x, x, x, false_flag_rate=1.5, progress=False),
        "rate -0.1": lambda: mem.audit(x, x, x, false_flag_rate=-0.1, progress=False),
        "rate text": lambda: mem.audit(x, x, x, false_flag_rate="a lot", progress=False),
        "nan": lambda: mem.audit(x.clone().fill_(float("nan")), x, x, progress=False),
        "names": lambda: mem.audit(x, x, x, gen_names=["a", "b", "c"], progress=False),
        "max_shift": lambda: mem.audit(x, x, x, max_shift=8, progress=False),
        "features dims": lambda: mem.audit(None, None, None, features=(f, f[:, :3], f), progress=False),
        "features rows": lambda: mem.audit(x, None, None, features=(f[:5], f, f), progress=False),
        "features empty": lambda: mem.audit(None, None, None, features=(f, f[:0], f), progress=False),
        "device": lambda: mem.audit(x, x, x, device="gpu-please", progress=False),
    }
    _one_line_value_error(calls[case], match)


@pytest.mark.bad_input
def test_gallery_bad_inputs(data, tmp_path):
    path = tmp_path / "g.png"
    _one_line_value_error(lambda: mem.save_gallery(data["gen"][:5], data["train"], data["res"], path), "result")
    _one_line_value_error(lambda: mem.save_gallery(data["gen"], data["train"], {"x": 1}, path), "audit result")
    _one_line_value_error(lambda: mem.save_gallery(data["gen"], data["train"], data["res"], path, max_pairs=0),
                          "max_pairs")
    assert not path.exists()
