"""The one image decoder (scripts/vendored/imaging.py, vendored into every folder): the same file gives the
same tensor in ddpm/, ldm/, controlnet/, dit/ and the evaluator, equal to values computed here from the raw
pixels; the intensity, channel and resize rules checked numerically; bad files give one-line errors.

    OMP_NUM_THREADS=1 python -m pytest tests/test_decoder.py -q
"""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import REPO, load_folder

ddpm_ds, ddpm_utils = load_folder("ddpm", "dataset", "utils")
ldm_ds, ldm_utils = load_folder("ldm", "dataset", "utils")
dit_ds, dit_utils = load_folder("dit", "dataset", "utils")
cn_ds, cn_models = load_folder("controlnet", "dataset", "models")
eval_images, imaging = load_folder("evaluation", "images", "imaging")

SIZE = 8
LUMA = np.array([0.299, 0.587, 0.114])


# ------------------------------------------------------------------ writers for what Pillow cannot write
def write_png16(path, arr):
    """A 16-bit PNG (gray+alpha, RGB or RGBA from the last axis) written by hand: Pillow cannot."""
    ctype = {2: 4, 3: 2, 4: 6}[arr.shape[2]]
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_tiff_rgb16(path, arr):
    """An uncompressed little-endian 16-bit RGB TIFF written by hand (Pillow cannot write one)."""
    h, w, _ = arr.shape
    data = arr.astype("<u2").tobytes()
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, 134), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 140), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1)]
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", t, k, n) + (struct.pack("<HH", v, 0) if k == 3 and n == 1 else struct.pack("<I", v))
        for t, k, n, v in entries) + struct.pack("<I", 0)
    assert 8 + len(ifd) == 134
    path.write_bytes(b"II" + struct.pack("<HI", 42, 8) + ifd + struct.pack("<HHH", 16, 16, 16) + data)


# ------------------------------------------------------------------ references computed from raw pixels
def ref_channels(native, channels):
    """H x W x C float64 in [0, 1] -> channels: ITU-R 601 luma or repetition."""
    if native.shape[2] == channels:
        return native
    return (native @ LUMA)[..., None] if channels == 1 else np.repeat(native, 3, axis=2)


def ref_resize(img, size):
    """Shorter side to size by PIL's (independent) antialiased bilinear on float planes, centre crop."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    top, left = (nh - size) // 2, (nw - size) // 2
    planes = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), "F").resize((nw, nh), Image.BILINEAR))
              for c in range(img.shape[2])]
    return np.stack(planes, -1)[top:top + size, left:left + size]


def mixed_folder(root):
    """Every supported kind of file, non-square sizes; returns {file name: raw values in [0, 1] (H, W, C)}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    expect = {}
    g8 = rng.integers(0, 256, (10, 14), dtype=np.uint8)
    Image.fromarray(g8).save(root / "a_gray8.png")
    expect["a_gray8.png"] = g8[..., None] / 255.0
    g16 = rng.integers(0, 65536, (12, 9), dtype=np.uint16)
    Image.fromarray(g16).save(root / "b_gray16.png")
    assert Image.open(root / "b_gray16.png").mode.startswith("I")
    expect["b_gray16.png"] = g16[..., None] / 65535.0
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "c_rgb.jpg", quality=95)
    expect["c_rgb.jpg"] = np.asarray(Image.open(root / "c_rgb.jpg").convert("RGB")) / 255.0  # JPEG is lossy
    rgba = rng.integers(0, 256, (11, 8, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "d_rgba.png")
    expect["d_rgba.png"] = rgba[..., :3] / 255.0  # alpha dropped, colour kept as stored
    idx = rng.integers(0, 4, (8, 12), dtype=np.uint8)
    palette = np.array([[0, 0, 0], [255, 0, 0], [10, 200, 30], [90, 90, 250]], np.uint8)
    pim = Image.fromarray(idx, "P")
    pim.putpalette(palette.ravel().tolist())
    pim.save(root / "e_palette.png")
    expect["e_palette.png"] = palette[idx] / 255.0
    bmp = rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)
    Image.fromarray(bmp).save(root / "f_bmp.BMP")
    expect["f_bmp.BMP"] = bmp / 255.0
    webp = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(webp).save(root / "g_lossless.webp", lossless=True)
    expect["g_lossless.webp"] = webp / 255.0
    t16 = rng.integers(0, 65536, (10, 12), dtype=np.uint16)
    Image.fromarray(t16).save(root / "h_gray16.tif")
    expect["h_gray16.tif"] = t16[..., None] / 65535.0
    tf = rng.random((13, 9)).astype(np.float32)
    tf[0, 0], tf[0, 1] = 0.0, 1.0
    Image.fromarray(tf, "F").save(root / "i_float.tiff")
    expect["i_float.tiff"] = tf[..., None].astype(np.float64)
    rgb16 = rng.integers(0, 65536, (6, 10, 3), dtype=np.uint16)
    write_png16(root / "j_rgb16.png", rgb16)
    expect["j_rgb16.png"] = rgb16 / 65535.0  # Pillow alone would keep only the high bytes
    la16 = rng.integers(0, 65536, (9, 7, 2), dtype=np.uint16)
    write_png16(root / "k_la16.png", la16)
    expect["k_la16.png"] = la16[..., :1] / 65535.0
    trgb16 = rng.integers(0, 65536, (8, 9, 3), dtype=np.uint16)
    write_tiff_rgb16(root / "l_rgb16.tif", trgb16)
    expect["l_rgb16.tif"] = trgb16 / 65535.0
    small = rng.integers(0, 256, (5, 7, 2), dtype=np.uint8)  # smaller than SIZE: upsampled
    Image.fromarray(small, "LA").save(root / "m_la_small.png")
    expect["m_la_small.png"] = small[..., :1] / 255.0
    bits = rng.random((9, 12)) > 0.5
    Image.fromarray(bits).save(root / "n_bilevel.png")
    assert Image.open(root / "n_bilevel.png").mode == "1"
    expect["n_bilevel.png"] = bits[..., None].astype(np.float64)
    return expect


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    data = tmp_path_factory.mktemp("mixed")
    return data, mixed_folder(data / "c0")


# ------------------------------------------------------------------ the rules, numerically
def test_intensity_rule_every_format(mixed):
    data, expect = mixed
    for name, raw in expect.items():
        x = imaging.read_pixels(data / "c0" / name)
        assert x.dtype == np.float32 and x.shape == raw.shape, name
        np.testing.assert_allclose(x, raw, atol=1e-6, rtol=0, err_msg=name)
    # no per-image statistics: a dark 16-bit image stays dark, a float image is taken as stored
    assert imaging.read_pixels(data / "c0" / "b_gray16.png").max() <= 1.0


def test_float_tiff_outside_unit_range_is_a_one_line_error_naming_the_file(tmp_path):
    bad = tmp_path / "ct.tif"
    Image.fromarray(np.array([[-1000.0, 0.0], [40.0, 3000.0]], np.float32), "F").save(bad)
    with pytest.raises(imaging.ImageError) as err:
        imaging.decode_image(bad, 1)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and "scale it to [0, 1]" in msg and "-1000" in msg
    assert isinstance(err.value, ValueError)
    near = tmp_path / "near.tif"  # rounding of an export just outside [0, 1] is clipped, not an error
    Image.fromarray(np.array([[-4e-4, 0.5], [1.0004, 1.0]], np.float32), "F").save(near)
    assert imaging.read_pixels(near)[..., 0].tolist() == [[0.0, 0.5], [1.0, 1.0]]
    nan = tmp_path / "nan.tif"
    Image.fromarray(np.array([[np.nan, 0.5]], np.float32), "F").save(nan)
    with pytest.raises(imaging.ImageError, match="nan.tif holds NaN"):
        imaging.read_pixels(nan)
    # every folder reports it up front as its own one-line UserError naming the file
    (tmp_path / "data" / "c0").mkdir(parents=True)
    bad.rename(tmp_path / "data" / "c0" / "ct.tif")
    calls = [(ddpm_utils.UserError, lambda: ddpm_ds.ImageFolderDataset(tmp_path / "data", SIZE)),
             (ldm_utils.UserError, lambda: ldm_ds.scan_class_folders(tmp_path / "data")),
             (dit_utils.UserError, lambda: dit_ds.ImageFolderDataset(tmp_path / "data", SIZE, 1)),
             (cn_models.UserError, lambda: cn_ds.verify_file(tmp_path / "data" / "c0" / "ct.tif", "image")),
             (eval_images.UserError, lambda: eval_images.validate_images(tmp_path / "data", ["c0/ct.tif"], "t"))]
    for error, call in calls:
        with pytest.raises(error) as e:
            call()
        assert "\n" not in str(e.value) and "ct.tif is a float image" in str(e.value) and "[0, 1]" in str(e.value)


def test_signed_integers_use_their_type_range_and_refuse_negatives(tmp_path):
    arr = np.array([[0, 2 ** 30], [2 ** 31 - 1, 5]], np.int32)
    Image.fromarray(arr).save(tmp_path / "i32.tif")
    np.testing.assert_allclose(imaging.read_pixels(tmp_path / "i32.tif")[..., 0], arr / (2 ** 31 - 1), rtol=1e-6)
    Image.fromarray(np.array([[-1000, 40]], np.int32)).save(tmp_path / "hu.tif")
    with pytest.raises(imaging.ImageError, match=r"hu.tif holds negative integers \(down to -1000"):
        imaging.read_pixels(tmp_path / "hu.tif")


def test_channel_rule():
    rgb = torch.tensor([[[0.2]], [[0.6]], [[1.0]]])
    gray = imaging.to_channels(rgb, 1)
    assert gray.shape == (1, 1, 1) and abs(gray.item() - (0.299 * 0.2 + 0.587 * 0.6 + 0.114)) < 1e-7
    assert torch.equal(imaging.to_channels(gray, 3), gray.expand(3, 1, 1))
    assert imaging.to_channels(torch.ones(3, 2, 2), 1).max() <= 1.0  # weights sum to 1: no overshoot
    with pytest.raises(ValueError):
        imaging.to_channels(rgb, 2)


def test_16bit_rgb_to_gray_keeps_16bit_precision(tmp_path):
    rgb16 = np.array([[[1, 2, 3], [65535, 0, 257]]], np.uint16)
    write_png16(tmp_path / "x.png", rgb16)
    x = imaging.decode_image(tmp_path / "x.png", 1)
    np.testing.assert_allclose(x.numpy()[0], (rgb16 / 65535.0) @ LUMA, atol=1e-7, rtol=0)


def test_resize_rule_against_pil_and_mask_geometry():
    rng = np.random.default_rng(1)
    for h, w, size in ((10, 14, 8), (12, 9, 8), (5, 7, 8), (40, 17, 16), (8, 8, 8), (3, 30, 6)):
        img = rng.random((h, w, 2))
        out = imaging.resize_image(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1), size)
        assert out.shape == (2, size, size)
        np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), ref_resize(img, size), atol=2e-6, rtol=0)
    checker = (np.indices((31, 47)).sum(0) % 2).astype(np.float32)[None]  # worst case for overshoot
    out = imaging.resize_image(torch.from_numpy(checker), 10)
    assert out.min() >= 0 and out.max() <= 1
    # masks: same crop as images, nearest-exact (no new values), unchanged at the target size
    labels = rng.choice(np.array([0, 7, 200], np.float32), size=(1, 13, 21)) / 255
    m = imaging.resize_mask(torch.from_numpy(labels), 8)
    assert m.shape == (1, 8, 8) and set(np.unique(m.numpy())) <= set(np.unique(labels))
    nh, nw = 8, round(21 * 8 / 13)  # 8 x 13, crop columns 2..9
    cols = np.floor((np.arange(nw) + 0.5) * 21 / nw).astype(int)[2:10]
    rows = np.floor((np.arange(nh) + 0.5) * 13 / nh).astype(int)
    assert torch.equal(m[0], torch.from_numpy(labels[0][np.ix_(rows, cols)]))
    assert torch.equal(imaging.resize_mask(torch.from_numpy(labels[:, :8, :8]), 8), torch.from_numpy(labels[:, :8, :8]))


# ------------------------------------------------------------------ every folder gives the same tensors
def _folder_tensors(data, masks, channels):
    """{file name: (channels, SIZE, SIZE) in [0, 1]} from each folder's own data set classes."""
    out = {}
    ds = ddpm_ds.ImageFolderDataset(data, SIZE, channels=channels)
    out["ddpm"] = {p.name: (ds[i][0] + 1) / 2 for i, p in enumerate(ds.files)}
    names, samples, _ = ldm_ds.scan_class_folders(data)
    ds = ldm_ds.ImageDataset(samples, SIZE, channels)
    out["ldm"] = {p.name: (ds[i][0] + 1) / 2 for i, (p, _) in enumerate(samples)}
    ds = dit_ds.ImageFolderDataset(data, SIZE, channels)
    out["dit"] = {str(p).rsplit("/", 1)[-1]: (ds[(i, False)][0] + 1) / 2 for i, (p, _) in enumerate(ds.samples)}
    pairs, ui, um = cn_ds.pair_files(data / "c0", masks)
    assert not ui and not um
    ds = cn_ds.PairDataset(pairs, channels, 1, SIZE)
    out["controlnet"] = {im.name: (ds[i]["image"] + 1) / 2 for i, (im, _) in enumerate(pairs)}
    return out


def _evaluator_tensors(data):
    """{file name: 3 x H x W in [0, 1]} as the evaluator's loader hands them to its networks (full size)."""
    rel = eval_images.list_images(data / "c0")
    files = eval_images.ImageFiles([data / "c0" / r for r in rel])
    out = {}
    for i, r in enumerate(rel):
        index, x, err = files[i]
        assert index == i and err is None and x.dtype == torch.float32
        out[r] = x.float().div(255)  # what features.extract does with it
    return out


def test_every_folder_and_the_evaluator_give_the_same_tensors(mixed, tmp_path):
    data, expect = mixed
    masks = tmp_path / "masks"  # ControlNet's pairs: one mask per image, same stem
    masks.mkdir()
    for name in expect:
        Image.open(data / "c0" / name).convert("L").save(masks / (name.rsplit(".", 1)[0] + ".png"))
    for channels in (1, 3):
        got = _folder_tensors(data, masks, channels)
        for folder, tensors in got.items():
            assert sorted(tensors) == sorted(expect), folder
        for name, raw in expect.items():
            ref = ref_resize(ref_channels(raw, channels), SIZE).transpose(2, 0, 1)
            for folder in ("ddpm", "ldm", "dit", "controlnet"):
                x = got[folder][name]
                assert x.shape == (channels, SIZE, SIZE) and x.dtype == torch.float32, (folder, name)
                np.testing.assert_allclose(x.numpy(), ref, atol=2e-5, rtol=0, err_msg=f"{folder} {name}")
            for folder in ("ldm", "dit", "controlnet"):  # bit-identical: one implementation
                assert torch.equal(got[folder][name], got["ddpm"][name]), (folder, name)
    # the evaluator: the same decoder at full size (its networks resize and normalise for themselves)
    ev = _evaluator_tensors(data)
    assert sorted(ev) == sorted(expect)
    for name, raw in expect.items():
        np.testing.assert_allclose(ev[name].numpy(), ref_channels(raw, 3).transpose(2, 0, 1), atol=1e-6, rtol=0,
                                   err_msg=name)
        decoded = imaging.decode_image(data / "c0" / name, 3)
        assert torch.allclose(ev[name], decoded, rtol=1e-6, atol=0), name  # x * 255 / 255: one ulp at most
        if expect[name].dtype == np.float64 and np.allclose(expect[name] * 255, np.round(expect[name] * 255)):
            assert torch.equal(ev[name], decoded), name  # 8-bit values come back bit-exact
        # the folders' 3-channel tensors are exactly that decoded image put through the resize rule
        assert torch.equal(got["ddpm"][name] * 2 - 1, (imaging.resize_image(decoded, SIZE) * 2 - 1).clamp(-1, 1))
    gray8 = np.array(Image.open(data / "c0" / "a_gray8.png"))
    assert torch.equal(ev["a_gray8.png"][0], torch.from_numpy(gray8).float().div(255))  # = torchvision ToTensor


def test_channel_count_from_the_data(mixed, tmp_path):
    data, _ = mixed
    assert ddpm_ds.ImageFolderDataset(data, SIZE).channels == 3
    assert ldm_ds.scan_class_folders(data)[2] == 3
    assert dit_ds.ImageFolderDataset(data, SIZE, 3).grayscale is False
    gray = tmp_path / "gray"
    (gray / "c0").mkdir(parents=True)
    for name in ("a_gray8.png", "b_gray16.png", "h_gray16.tif", "i_float.tiff", "k_la16.png", "m_la_small.png",
                 "n_bilevel.png"):
        (gray / "c0" / name).write_bytes((data / "c0" / name).read_bytes())
    assert ddpm_ds.ImageFolderDataset(gray, SIZE).channels == 1
    assert ldm_ds.scan_class_folders(gray)[2] == 1
    assert dit_ds.ImageFolderDataset(gray, SIZE, 1).grayscale is True
    notes = eval_images.validate_images(gray, eval_images.list_images(gray), "g")
    assert any("alpha" in n for n in notes) and any("16-bit" in n for n in notes)


def test_masks_keep_their_values_and_stay_aligned(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    img = np.zeros((12, 20), np.uint8)
    img[:, 11:] = 255
    Image.fromarray(img).save(tmp_path / "images" / "a.png")
    pmask = Image.fromarray(np.where(img > 0, 3, 1).astype(np.uint8), "P")
    pmask.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    pmask.save(tmp_path / "masks" / "a.png")
    m16 = np.where(img > 0, 60000, 30000).astype(np.uint16)
    Image.fromarray(m16).save(tmp_path / "masks" / "b.png")
    ds = cn_ds.PairDataset(cn_ds.pair_files(tmp_path / "images", tmp_path / "masks")[0], 1, 1, SIZE)
    item = ds[0]
    mask = item["mask"][0]
    assert set(np.unique(np.round(mask.numpy() * 255)).astype(int)) == {1, 3}  # palette indices kept
    assert torch.equal(mask > 2 / 255, item["image"][0] > 0)  # same crop: the edge is where the image's is
    m = cn_ds.load_mask(tmp_path / "masks" / "b.png", 1, SIZE)
    assert set(np.unique(np.round(m.numpy() * 65535)).astype(int)) == {30000, 60000}
    with pytest.raises(cn_models.UserError, match="b.png has 1 channel.*--mask_channels is 3"):
        cn_ds.load_mask(tmp_path / "masks" / "b.png", 3, SIZE)


# ------------------------------------------------------------------ files and broken files
def test_list_images(tmp_path):
    for rel in ("b.PNG", "a.jpeg", ".hidden.png", "notes.txt", "sub/c.TIF", ".git/d.png", "sub/.e.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert [p.name for p in imaging.list_images(tmp_path)] == ["a.jpeg", "b.PNG"]
    assert [p.relative_to(tmp_path).as_posix() for p in imaging.list_images(tmp_path, recursive=True)] == [
        "a.jpeg", "b.PNG", "sub/c.TIF"]
    assert eval_images.list_images(tmp_path) == ["a.jpeg", "b.PNG", "sub/c.TIF"]


@pytest.mark.parametrize("kind", ["truncated", "text", "empty"])
def test_broken_files_are_named_in_one_line(tmp_path, kind):
    d = tmp_path / "data" / "c0"
    d.mkdir(parents=True)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)).save(good)
    data = good.read_bytes()
    bad = d / "broken.png"
    bad.write_bytes({"truncated": data[:len(data) // 2], "text": b"not an image\n", "empty": b""}[kind])
    with pytest.raises(imaging.ImageError) as e:
        imaging.check_image(bad)
    assert str(e.value).startswith(f"{bad} is not a readable image (") and "\n" not in str(e.value)
    assert str(e.value).endswith("; remove or replace it")
    for error, call in [(ddpm_utils.UserError, lambda: ddpm_ds.ImageFolderDataset(tmp_path / "data", SIZE)),
                        (ldm_utils.UserError, lambda: ldm_ds.scan_class_folders(tmp_path / "data")),
                        (dit_utils.UserError, lambda: dit_ds.ImageFolderDataset(tmp_path / "data", SIZE, 1)),
                        (cn_models.UserError, lambda: cn_ds.verify_file(bad, "mask"))]:
        with pytest.raises(error, match="broken.png is not a readable image"):
            call()
    _, x, err = eval_images.ImageFiles([bad])[0]
    assert x is None and err.startswith(f"{bad} is not a readable image")


def test_copies_are_the_source():
    src = (REPO / "scripts" / "vendored" / "imaging.py").read_bytes()
    for folder in ("ddpm", "ldm", "controlnet", "dit", "evaluation"):
        assert (REPO / folder / "imaging.py").read_bytes() == src, folder
    assert imaging.__file__ == str(REPO / "evaluation" / "imaging.py")
