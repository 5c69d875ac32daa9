"""scripts/vendored/animation.py (every model folder's copy is the same bytes): slerp, names, write-once strips
and GIFs, and the training animation's rules. The folders' own use of it (end points equal the plain samples,
one GIF frame per training grid) is tested in tests/test_serve_<folder>.py.
"""
import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import load_folder

animation = load_folder("ddpm", "animation")


def test_slerp_end_points_are_exact_and_the_path_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    assert torch.equal(animation.slerp(z0, z1, 0), z0) and torch.equal(animation.slerp(z0, z1, 1), z1)
    mid, lin = animation.slerp(z0, z1, 0.5), (z0 + z1) / 2
    # two independent draws are nearly orthogonal: the straight line's middle has ~1/sqrt(2) of the norm,
    # the great circle keeps it (what a diffusion model saw in training)
    assert abs(mid.norm() / z0.norm() - 1) < 0.05 and lin.norm() / z0.norm() < 0.8
    angle = lambda a, b: torch.arccos(torch.dot(a.flatten(), b.flatten()) / (a.norm() * b.norm()))  # noqa: E731
    z1n = z1 * (z0.norm() / z1.norm())  # of equal norms, the middle is halfway along the arc
    assert torch.isclose(angle(z0, animation.slerp(z0, z1n, 0.5)), angle(animation.slerp(z0, z1n, 0.5), z1n),
                         atol=1e-4)
    assert torch.allclose(animation.slerp(z0, z0 * 2, 0.25), z0 * 1.25)  # parallel: the line
    with pytest.raises(ValueError, match="shapes differ"):
        animation.slerp(z0, z1[:2], 0.5)


def test_lerp_weights_and_names():
    a, b = torch.zeros(3), torch.ones(3)
    assert torch.equal(animation.lerp(a, b, 0), a) and torch.equal(animation.lerp(a, b, 1), b)
    assert animation.interp_weights(5) == [0, 0.25, 0.5, 0.75, 1]
    with pytest.raises(ValueError):
        animation.interp_weights(1)
    assert animation.interpolation_stem("seeds", (3, 9), ("benign",), "ddim", 50, 3.0, 8) == \
        "interp_seeds3-9_benign_ddim50_cfg3_f8"
    assert animation.interpolation_stem("classes", (5,), ("a b", "../c"), "ddim", 20, None, 4) == \
        "interp_classes_a-b-c_seed5_ddim20_f4"  # a name never carries a separator


def test_strip_gif_and_write_once(tmp_path):
    frames = [np.full((1, 6, 5), v, np.uint8) for v in (0, 100, 200)]
    png, gif, wrote = animation.write_interpolation(frames, tmp_path / "out", "stem")
    assert wrote and png.name == "stem.png" and gif.name == "stem.gif"
    strip = np.asarray(Image.open(png))
    assert strip.shape == (6, 3 * 5 + 2 * 2) and strip[0, 0] == 0 and strip[0, 7] == 100 and strip[0, -1] == 200
    assert animation.gif_frame_count(gif) == 4  # forward, then back: 0 1 2 1
    stamp = png.stat().st_mtime_ns, gif.stat().st_mtime_ns
    assert animation.write_interpolation(frames[::-1], tmp_path / "out", "stem")[2] is False
    assert (png.stat().st_mtime_ns, gif.stat().st_mtime_ns) == stamp  # never overwritten
    assert oct(png.stat().st_mode & 0o777) != oct(0o600)  # the user's usual permissions, not mkstemp's


def test_progress_gif_order_limit_and_failure(tmp_path):
    for n in (10, 2, 1000):  # numeric order, not text order
        Image.new("L", (4, 4), n % 256).save(tmp_path / f"step_{n:07d}.png")
    (tmp_path / "step_0005000.png").write_bytes(b"")  # past `upto`: an older, longer run's frame, left out
    gif = animation.refresh_progress_gif(tmp_path, r"step_(\d+)\.png", "step", tmp_path / "progress.gif", upto=1000)
    assert gif and animation.gif_frame_count(gif) == 3
    with Image.open(gif) as im:
        firsts = []
        for k in range(3):
            im.seek(k)
            firsts.append(np.asarray(im.convert("L"))[0, 0])
    assert firsts == [2, 10, 1000 % 256]
    kept = animation.progress_frames(list(range(500)), max_frames=10)
    assert len(kept) == 10 and kept[0] == 0 and kept[-1] == 499
    warnings = []
    log = type("Log", (), {"warning": staticmethod(warnings.append)})
    assert animation.refresh_progress_gif(tmp_path, r"step_(\d+)\.png", "step", tmp_path / "p2.gif", log=log) is None
    assert len(warnings) == 1 and "could not update" in warnings[0] and "p2.gif" in warnings[0]
    assert not (tmp_path / "p2.gif").exists() and not list(tmp_path.glob(".progress*"))
