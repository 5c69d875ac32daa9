"""Tests of ddpm/paired.py (issue 16): image/mask and high-/low-res pairing, items per task, up-front checks.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ddpm_paired.py -q
Tiny PNG / NIfTI files written by the tests (16-32 px); no network, no training.
"""
import re

import numpy as np
import pytest
import torch
from PIL import Image

from medical_files import ct_volume, write_nifti
from repo_helpers import load_folder

paired, conditional, pairing, runtime, dataset = load_folder("ddpm", "paired", "conditional", "pairing", "runtime",
                                                             "dataset")
UserError = runtime.UserError


def save(arr, path, mode=None):
    """Write a uint8 / uint16 array as an image file (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr), mode).save(path)
    return path


def blocks(h, w, values, seed=0, block=4):
    """An (h, w) uint8 label map of constant `block` x `block` tiles drawn from `values`."""
    rng = np.random.default_rng(seed)
    tiles = rng.choice(np.array(values, np.uint8), size=(-(-h // block), -(-w // block)))
    return np.kron(tiles, np.ones((block, block), np.uint8))[:h, :w]


def write_pairs(root, n=3, size=(24, 20), values=(0, 255), image_names=None, mask_names=None, rgb=False):
    """data_root/images + data_root/masks: each image is its mask's labels as grey levels (so they must align)."""
    for i in range(n):
        labels = blocks(size[1], size[0], values, seed=i)
        img = (labels.astype(np.int32) * 255 // max(values)).astype(np.uint8)
        name_i = image_names[i] if image_names else f"{i:03d}.png"
        name_m = mask_names[i] if mask_names else f"{i:03d}.png"
        save(np.stack([img] * 3, -1) if rgb else img, root / "images" / name_i)
        save(labels, root / "masks" / name_m)
    return root


def error(fn, *patterns):
    """The one-line UserError of fn(); each regex pattern must occur in it."""
    with pytest.raises(UserError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    return msg


# ------------------------------------------------------------------------------------------------ pairing
def test_pairs_by_stem_and_by_prefix_with_items_per_task(tmp_path):
    a = write_pairs(tmp_path / "a", image_names=["001.png", "002.jpg", "003.png"],
                    mask_names=["001.png", "002.png", "003.bmp"])
    ds = paired.PairedDataset("mask2image", a, 16)
    assert [(i.name, m.name) for i, m in ds.pairs] == [("001.png", "001.png"), ("002.jpg", "002.png"),
                                                       ("003.png", "003.bmp")]
    assert [s.name for s in ds.files] == ["001.png", "002.jpg", "003.png"] and len(ds.cond_files) == 3
    assert ds.channels == 1 and ds.labels == [0, 0, 0] and ds.class_names == [] and ds.labels_found == [0, 1]
    target, cond, label, idx = ds[1]
    assert target.shape == (1, 16, 16) and target.dtype == torch.float32 and -1 <= target.min() < target.max() <= 1
    assert cond.shape == (1, 16, 16) and cond.dtype == torch.long and (label, idx) == (0, 1)
    seg = paired.PairedDataset("segmentation", a, 16)
    t2, c2, _, _ = seg[1]
    assert t2.dtype == torch.long and torch.equal(t2, cond) and torch.equal(c2, target)  # roles swapped

    b = write_pairs(tmp_path / "b", n=3, image_names=[f"Img_{i}.png" for i in range(3)],
                    mask_names=[f"seg_{i}.png" for i in range(3)], rgb=True)
    ds = paired.PairedDataset("mask2image", b, 16, image_prefix="Img_", mask_prefix="seg_")
    assert [(i.name, m.name) for i, m in ds.pairs] == [(f"Img_{i}.png", f"seg_{i}.png") for i in range(3)]
    assert ds.channels == 3 and ds[0][0].shape == (3, 16, 16)  # auto: colour images -> 3 channels
    assert paired.PairedDataset("mask2image", b, 16, channels="1", image_prefix="Img_",
                                mask_prefix="seg_")[0][0].shape == (1, 16, 16)
    error(lambda: paired.PairedDataset("mask2image", b, 16), r"3 image\(s\) without a mask: Img_0\.png",
          r"3 mask\(s\) without an image", r"no image/mask pairs", "--image_prefix")


def test_masks_keep_their_labels_and_stay_aligned_with_images(tmp_path):
    root = write_pairs(tmp_path, n=2, size=(30, 20), values=(0, 1, 3), rgb=False)
    ds = paired.PairedDataset("mask2image", root, 16, num_mask_classes=4)
    assert ds.labels_found == [0, 1, 3]
    for i in range(2):
        image, mask, _, _ = ds[i]
        assert set(mask.unique().tolist()) == {0, 1, 3}  # nearest resize: no new value, none lost here
        # the image is the mask's labels as grey levels (0, 85, 255): same geometry -> they agree
        grey = (image[0].numpy() + 1) / 2 * 3
        flat = np.abs(grey - np.rint(grey)) < 0.1  # away from the blurred tile edges (a 1-px shift: ~80 %)
        assert (np.rint(grey) == mask[0].numpy())[flat].mean() > 0.95
    # 0/255 binary masks -> {0, 1} labels with K = 2
    b = write_pairs(tmp_path / "bin", n=1, values=(0, 255))
    _, mask, _, _ = paired.PairedDataset("mask2image", b, 16)[0]
    assert set(mask.unique().tolist()) == {0, 1}


def test_bad_masks_are_one_line_errors_naming_the_file(tmp_path):
    root = write_pairs(tmp_path / "k", n=2, values=(0, 1, 7))
    error(lambda: paired.PairedDataset("segmentation", root, 16, num_mask_classes=4),
          r"mask .*00[01]\.png has label 7 but --num_mask_classes is 4")
    colour = write_pairs(tmp_path / "c", n=1)
    rgb = np.zeros((20, 24, 3), np.uint8)
    rgb[2:6, 2:6] = (255, 0, 0)
    save(rgb, colour / "masks" / "000.png")
    error(lambda: paired.PairedDataset("mask2image", colour, 16), r"mask .*000\.png is a colour image")
    size = write_pairs(tmp_path / "s", n=2)
    save(np.zeros((20, 30), np.uint8), size / "masks" / "001.png")
    error(lambda: paired.PairedDataset("mask2image", size, 16),
          r"mask .*masks/001\.png is 30x20 but its image .*images/001\.png is 24x20")
    (size / "images" / "001.png").write_bytes(b"not a png")
    error(lambda: paired.PairedDataset("mask2image", size, 16), r"image .*001\.png is not a readable image")


def test_unpaired_files_missing_and_empty_folders(tmp_path):
    root = write_pairs(tmp_path / "u", n=3)
    save(np.zeros((20, 24), np.uint8), root / "images" / "extra.png")
    save(np.zeros((20, 24), np.uint8), root / "masks" / "lonely.png")
    error(lambda: paired.PairedDataset("mask2image", root, 16), r"1 image\(s\) without a mask: extra\.png",
          r"1 mask\(s\) without an image: lonely\.png", r"--skip_unpaired trains on the 3 pairs found")
    ds = paired.PairedDataset("mask2image", root, 16, skip_unpaired=True)
    assert len(ds) == 3 and len(ds.warnings) == 1 and "extra.png" in ds.warnings[0]

    error(lambda: paired.PairedDataset("mask2image", tmp_path / "nope", 16), r"--data_root .*nope does not exist")
    (tmp_path / "e" / "masks").mkdir(parents=True)
    error(lambda: paired.PairedDataset("mask2image", tmp_path / "e", 16), r"--data_root .*e has no images/ folder",
          r"expected .*e/images and .*e/masks, or set --images_folder/--masks_folder")
    (tmp_path / "e" / "images").mkdir()
    error(lambda: paired.PairedDataset("mask2image", tmp_path / "e", 16), r"--images_folder .*e/images has no images")
    save(np.zeros((8, 8), np.uint8), tmp_path / "e" / "images" / "0.png")
    error(lambda: paired.PairedDataset("mask2image", tmp_path / "e", 16), r"--masks_folder .*e/masks has no images")
    # the masks task refuses a paired layout (its images would be read as masks)
    error(lambda: paired.PairedDataset("masks", root, 16), r"pass --data_root .*u/masks")


def test_masks_task_reads_a_folder_of_masks_recursively(tmp_path):
    save(blocks(20, 24, (0, 2)), tmp_path / "m" / "a.png")
    save(blocks(20, 24, (0, 1), seed=3), tmp_path / "m" / "sub" / "b.png")
    ds = paired.PairedDataset("masks", tmp_path / "m", 16, num_mask_classes=3)
    assert [s.name for s in ds.files] == ["a.png", "b.png"] and ds.labels_found == [0, 1, 2]
    target, cond, label, idx = ds[1]
    assert target.shape == (1, 16, 16) and target.dtype == torch.long and set(target.unique().tolist()) == {0, 1}
    assert cond.numel() == 0 and (label, idx) == (0, 1)


# ------------------------------------------------------------------------------------------ super-resolution
def test_superres_condition_is_the_degraded_target(tmp_path):
    root = write_pairs(tmp_path, n=2, size=(32, 32), values=(0, 128, 255))
    for filt in ("bicubic", "area"):
        ds = paired.PairedDataset("superres", root, 32, sr_factor=4, sr_filter=filt)
        target, cond, _, _ = ds[0]
        assert target.shape == cond.shape == (1, 32, 32) and cond.dtype == torch.float32
        assert torch.equal(cond, conditional.degrade(target, 4, filt)) and not torch.allclose(cond, target, atol=0.05)
    error(lambda: paired.PairedDataset("superres", root, 30, sr_factor=4), r"--sr_factor 4 does not divide")
    error(lambda: paired.PairedDataset("superres", root, 32, sr_filter="lanczos"), r"--sr_filter 'lanczos'")


def test_superres_lowres_folder_pairs_by_stem_and_checks_the_factor(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        save((rng.random((32, 32)) * 255).astype(np.uint8), tmp_path / "images" / f"{i}.png")
        save((rng.random((8, 8)) * 255).astype(np.uint8), tmp_path / "low" / f"{i}.png")
    ds = paired.PairedDataset("superres", tmp_path, 32, sr_factor=4, lowres_folder="low")
    assert [(h.name, lr.path.parent.name + "/" + lr.name) for h, lr in ds.pairs] == [("0.png", "low/0.png"),
                                                                                ("1.png", "low/1.png")]
    target, cond, _, _ = ds[1]
    low = dataset.load_image(tmp_path / "low" / "1.png", 1, 8)
    assert torch.equal(cond, conditional.upsample(low, 32)) and cond.shape == (1, 32, 32)
    assert not torch.equal(cond, conditional.degrade(target, 4))  # the file, not a degraded target
    save(np.zeros((10, 8), np.uint8), tmp_path / "low" / "1.png")
    error(lambda: paired.PairedDataset("superres", tmp_path, 32, sr_factor=4, lowres_folder="low"),
          r"low-res image .*low/1\.png is 8x10 but its high-res image .*images/1\.png is 32x32", "--sr_factor 4")
    save(np.zeros((8, 8), np.uint8), tmp_path / "low" / "9.png")
    error(lambda: paired.PairedDataset("superres", tmp_path, 32, lowres_folder="low"),
          r"1 low-res image\(s\) without an image: 9\.png")


# ------------------------------------------------------------------------------------------------ classes
def test_class_labels_from_csv_by_pair_key_and_file_stem(tmp_path):
    root = write_pairs(tmp_path, n=3, image_names=[f"Img_{i}.png" for i in range(3)],
                       mask_names=[f"seg_{i}.png" for i in range(3)])
    csv = tmp_path / "labels.csv"
    csv.write_text("stem,class\n0,tumour\nImg_1.png,healthy\n2,tumour\n")  # pair keys and a full file name
    kw = dict(image_prefix="Img_", mask_prefix="seg_", class_labels_csv=csv)
    ds = paired.PairedDataset("mask2image", root, 16, **kw)
    assert ds.class_names == ["healthy", "tumour"] and ds.labels == [1, 0, 1] and ds[1][2] == 0
    resumed = paired.PairedDataset("mask2image", root, 16, class_names=["tumour", "healthy", "cyst"], **kw)
    assert resumed.class_names == ["tumour", "healthy", "cyst"] and resumed.labels == [0, 1, 0]
    error(lambda: paired.PairedDataset("mask2image", root, 16, class_names=["cyst"], **kw),
          r"unknown class 'tumour'; the resumed run's classes are: cyst")
    csv.write_text("0,tumour\n")
    error(lambda: paired.PairedDataset("mask2image", root, 16, **kw),
          r"--class_labels_csv .*labels\.csv has no class for 2 of 3 file\(s\): Img_1\.png, Img_2\.png")


def test_shared_pairing_module_keeps_controlnet_behaviour(tmp_path):
    csv = tmp_path / "c.csv"
    csv.write_text("label,name\n0,zebra\n")  # a header row, then an unknown class
    error(lambda: pairing.read_class_labels(csv, ["a", "b"], whose="the LDM's"),
          r"c\.csv line 2: unknown class 'zebra'; the LDM's classes are: a, b")
    assert pairing.csv_class_names(csv) == ["zebra"]
    a = np.array([[True, False], [True, True]])
    assert pairing.dice(a, a) == 1.0 and pairing.dice(a, ~a) == 0.0 and abs(pairing.dice(a, np.ones_like(a)) - 6 / 7) < 1e-9
    assert pairing.otsu_threshold(np.array([[10, 10, 200, 200]], np.uint8)) in range(10, 200)


# ------------------------------------------------------------------------------------------------ medical
def test_nifti_volume_pairs_give_one_aligned_item_per_slice(tmp_path):
    hu = ct_volume(4, 16, seed=1)  # (slices, H, W); bone (700 HU) in the middle of every slice
    axial = lambda v: np.ascontiguousarray(np.transpose(v, (1, 2, 0)))  # noqa: E731 (canonical axial axis last)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_nifti(tmp_path / "images" / "ct_000.nii.gz", axial(hu))
    write_nifti(tmp_path / "masks" / "ct_000.nii.gz", axial((hu > 300).astype(np.int16)), dtype=np.uint8)
    ds = paired.PairedDataset("segmentation", tmp_path, 16, opts=paired.medical.ReadOptions("-160,240"))
    assert len(ds) == 4 and [s.name for s in ds.files] == [f"ct_000.nii.gz[{k}]" for k in range(4)]
    assert ds.opts.window == (-160.0, 240.0) and ds.labels_found == [0, 1]
    for k in range(4):
        mask, image, _, _ = ds[k]
        bone = (image[0] >= 1.0).numpy()  # >= 240 HU saturates the window: exactly the voxels of the mask
        assert mask.shape == (1, 16, 16) and mask.sum() > 0 and np.array_equal(bone, mask[0].numpy() == 1)
