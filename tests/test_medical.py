"""The medical formats of the shared reader (scripts/vendored/medical.py): DICOM, NIfTI, windows, groups, outputs.

Every file is written here (tests/medical_files.py) from values in HU, so each check compares what the
reader returns with numbers computed from those values.
"""
import numpy as np
import pytest
import torch

from repo_helpers import load_folder

imaging, medical, writers = load_folder("evaluation", "imaging", "medical", "writers")  # copies of scripts/vendored
from medical_files import ct_volume, windowed, write_ct_series, write_dicom, write_nifti  # noqa: E402


def decode(src, opts, channels=1):
    return imaging.decode_image(src, channels, opts)[0].numpy()


def fitted(files, window="auto", **kw):
    opts = medical.ReadOptions(window, **kw)
    sources = medical.expand(files, opts)
    return sources, opts.fit(sources)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_ct_series_rescaled_windowed_and_inverted(tmp_path, photometric):
    """slope 0.5 / intercept -1024 give HU; the named window maps them; MONOCHROME1 is inverted after it."""
    hu = ct_volume(3, 16)
    files = write_ct_series(tmp_path, hu, "P1", slope=0.5, intercept=-1024, photometric=photometric)
    sources, opts = fitted(imaging.list_images(tmp_path), "-160,240")
    assert [s.index for s in sources] == [None] * 3
    for k, src in enumerate(sources):
        want = windowed(hu[k], -160, 240)
        want = 1 - want if photometric == "MONOCHROME1" else want
        np.testing.assert_allclose(decode(src, opts), want, atol=1e-6)
    # a preset names the same kind of window: mediastinum is centre 50, width 350
    _, preset = fitted(files, "mediastinum")
    assert preset.window == (-125.0, 225.0)


def test_auto_window_is_the_files_own_and_is_stored(tmp_path):
    hu = ct_volume(2, 16)
    write_ct_series(tmp_path, hu, "P1", window=(40, 400))  # centre 40, width 400 -> [-160, 240]
    sources, opts = fitted(imaging.list_images(tmp_path))
    assert opts.window == (-160.0, 240.0) and "own window" in opts.origin
    again = medical.ReadOptions.from_config(opts.to_config())
    assert again.window == opts.window
    np.testing.assert_array_equal(decode(sources[0], again), decode(sources[0], opts))
    np.testing.assert_allclose(decode(sources[0], opts), windowed(hu[0], -160, 240), atol=1e-6)


def test_percentile_window_is_fitted_once_over_the_data_set(tmp_path):
    hu = ct_volume(3, 16)
    write_ct_series(tmp_path, hu, "P1", window=None)
    sources, opts = fitted(imaging.list_images(tmp_path), "p1,p99")
    lo, hi = np.percentile(hu.ravel(), [1, 99])
    np.testing.assert_allclose(opts.window, (lo, hi))
    np.testing.assert_allclose(decode(sources[2], opts), windowed(hu[2], lo, hi), atol=1e-6)


def test_multiframe_dicom_gives_one_image_per_frame_and_skips_constant_frames(tmp_path):
    hu = ct_volume(4, 12)
    hu[2] = 0.0  # a constant frame
    write_dicom(tmp_path / "mf.dcm", hu, frames=True)
    sources, opts = fitted([tmp_path / "mf.dcm"], "-1000,1000")
    assert [s.index for s in sources] == [0, 1, 3]
    np.testing.assert_allclose(decode(sources[2], opts), windowed(hu[3], -1000, 1000), atol=1e-6)


def test_dicom_without_extension_is_listed_by_its_preamble(tmp_path):
    write_dicom(tmp_path / "IM0001", ct_volume(1, 8)[0])
    (tmp_path / "README").write_text("not an image")
    assert [p.name for p in imaging.list_images(tmp_path)] == ["IM0001"]


def _ras_volume():
    """(x, y, z) volume whose voxel (x, y, z) holds 100*x + 10*y + z (+ a body so no slice is constant)."""
    x, y, z = np.meshgrid(np.arange(5), np.arange(4), np.arange(3), indexing="ij")
    return (100 * x + 10 * y + z).astype(np.int16)


def test_nifti_slices_are_in_canonical_orientation_whatever_the_storage(tmp_path):
    """Axial slice k: rows anterior (high y) at the top, columns from the patient's right (high x) on the left.

    The same anatomy stored with x flipped and axes permuted (its affine saying so) gives identical slices."""
    vol = _ras_volume()
    write_nifti(tmp_path / "ras.nii.gz", vol)
    stored = np.transpose(vol[::-1], (2, 0, 1))  # storage axes (z, x flipped, y)
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1, -1, 1, 1
    affine[0, 3] = 4  # x flipped: world x = 4 - i
    write_nifti(tmp_path / "las.nii", stored, affine=affine)
    for name in ("ras.nii.gz", "las.nii"):
        opts = medical.ReadOptions("0,1000")
        sources = medical.expand([tmp_path / name], opts)
        assert [s.index for s in sources] == [0, 1, 2]
        v = medical._values(sources[1], opts)
        assert v.shape == (4, 5)
        assert v[0, 0] == 100 * 4 + 10 * 3 + 1  # top-left: most anterior row, patient's right column
        assert v[-1, -1] == 0 + 0 + 1
    sagittal = medical.ReadOptions("0,1000", slice_axis="sagittal")
    sag = medical.expand([tmp_path / "ras.nii.gz"], sagittal)
    assert len(sag) == 5 and medical._values(sag[0], sagittal).shape == (3, 4)


def test_nifti_slice_range_skips_constant_slices_and_applies_scaling(tmp_path):
    vol = np.zeros((6, 6, 5), dtype=np.int16)
    vol[1:5, 1:5, 1:4] = np.arange(1, 4)[None, None, :] * 100
    write_nifti(tmp_path / "v.nii.gz", vol, slope=2.0, inter=-50.0)
    opts = medical.ReadOptions("-100,700")
    assert [s.index for s in medical.expand([tmp_path / "v.nii.gz"], opts)] == [1, 2, 3]  # 0 and 4 are constant
    ranged = medical.ReadOptions("-100,700", slice_range="2:")
    sources = medical.expand([tmp_path / "v.nii.gz"], ranged)
    assert [s.index for s in sources] == [2, 3]
    x = decode(sources[0], ranged.fit(sources))
    assert np.isclose(x.max(), windowed(2 * 200 - 50, -100, 700)) and np.isclose(x.min(), windowed(-50, -100, 700))
    assert medical.expand([tmp_path / "v.nii.gz"], opts, skip_empty=False)[0].index == 0  # masks keep every slice
    assert sources[0].stem == "v_0002" and sources[0].name == "v.nii.gz[2]"


def test_16bit_png_windowed_only_with_window_16bit_and_8bit_never(tmp_path):
    from PIL import Image
    arr16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    Image.fromarray(arr16).save(tmp_path / "a16.png")
    arr8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    Image.fromarray(arr8).save(tmp_path / "b8.png")
    auto = medical.ReadOptions().fit(imaging.list_images(tmp_path))
    assert auto.window is None
    np.testing.assert_array_equal(decode(tmp_path / "a16.png", auto), arr16 / np.float32(65535))
    named = medical.ReadOptions("10000,50000").fit(imaging.list_images(tmp_path))  # a window for DICOM / NIfTI
    np.testing.assert_array_equal(decode(tmp_path / "a16.png", named), arr16 / np.float32(65535))
    opted = medical.ReadOptions("10000,50000", window_16bit=True).fit(imaging.list_images(tmp_path))
    np.testing.assert_allclose(decode(tmp_path / "a16.png", opted), windowed(arr16, 10000, 50000), atol=1e-6)
    np.testing.assert_array_equal(decode(tmp_path / "b8.png", opted), arr8 / np.float32(255))
    assert medical.ReadOptions.from_config(opted.to_config()).windows_2d()


def test_outputs_round_trip_through_the_window_and_never_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((1, 10, 12)).astype(np.float32))
    window = (-160.0, 240.0)
    opts = medical.ReadOptions("-160,240")
    nii = writers.write_image_once(x, tmp_path / "seed0001.png", "nifti", window, "seed 1")
    assert nii.name == "seed0001.nii.gz"
    import nibabel as nib
    hu = np.asarray(nib.load(nii).dataobj)
    assert hu.shape == (12, 10, 1) and hu.min() >= -160 and hu.max() <= 240
    np.testing.assert_allclose(np.sort(hu.ravel()), np.sort(-160 + x.numpy().ravel() * 400), atol=1e-4)
    np.testing.assert_allclose(decode(nii, opts), x[0].numpy(), atol=1e-6)  # same image back, same orientation
    dcm = writers.write_image_once(x, tmp_path / "seed0001.png", "dicom", window, "seed 1")
    np.testing.assert_allclose(decode(dcm, opts), x[0].numpy(), atol=0.5 / 65535 + 1e-6)
    p16 = writers.write_image_once(x, tmp_path / "seed0001.png", "png16")
    np.testing.assert_allclose(decode(p16, None), x[0].numpy(), atol=0.5 / 65535 + 1e-7)
    rgb = writers.write_image_once(x.expand(3, -1, -1), tmp_path / "rgb.png", "png16")
    assert imaging.check_image(rgb).dtype == "uint16" and imaging.check_image(rgb).channels == 3
    before = nii.read_bytes()
    assert writers.write_image_once(torch.zeros_like(x), tmp_path / "seed0001.png", "nifti", window) is None
    assert nii.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_dicom_output_copies_nothing_from_training_files(tmp_path):
    import pydicom
    train = write_dicom(tmp_path / "train.dcm", ct_volume(1, 8)[0], patient_id="PAT-SECRET-77")
    src = pydicom.dcmread(train)
    opts = medical.ReadOptions().fit([train])
    x = imaging.decode_image(train, 1, opts)
    (tmp_path / "gen").mkdir()
    out = writers.write_image_once(x, tmp_path / "gen" / "seed0003.png", "dicom", opts.window, "seed 3")
    ds = pydicom.dcmread(out)
    raw = out.read_bytes()
    assert b"PAT-SECRET-77" not in raw and b"Doe" not in raw
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert ds.SOPInstanceUID != src.SOPInstanceUID and ds.StudyInstanceUID != src.StudyInstanceUID
    assert ds.PatientID == "SYNTHETIC"


def test_group_split_never_puts_a_patient_on_both_sides():
    rng = np.random.default_rng(1)
    for seed in range(20):
        n = int(rng.integers(30, 80))
        groups = [f"p{g}" for g in rng.integers(0, 12, size=n)]
        labels = [int(v) for v in rng.integers(0, 3, size=n)]
        try:
            train, val = medical.group_split(groups, labels, 0.2, seed)
        except ValueError as e:
            assert "no whole patient" in str(e)
            continue
        assert sorted(train + val) == list(range(n))
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        assert {labels[i] for i in val} == {labels[i] for i in train} == set(labels)
    # one file per group: per class round(fraction * n) held out, as a stratified split does
    train, val = medical.group_split([str(i) for i in range(40)], [i % 2 for i in range(40)], 0.25, 0)
    assert len(val) == 10 and sum(i % 2 for i in val) == 5


def test_groups_come_from_patient_id_volume_or_regex(tmp_path):
    a = write_ct_series(tmp_path / "a", ct_volume(2, 8), "PA")
    b = write_ct_series(tmp_path / "b", ct_volume(2, 8), "PB")
    assert len({medical.group_of(s) for s in a}) == 1 and medical.group_of(a[0]) != medical.group_of(b[0])
    write_nifti(tmp_path / "v.nii.gz", _ras_volume())
    slices = medical.expand([tmp_path / "v.nii.gz"], medical.ReadOptions())
    assert len({medical.group_of(s) for s in slices}) == 1
    opts = medical.ReadOptions(group_regex=r"^(case\d+)_")
    assert medical.group_of(tmp_path / "case12_t1.png", opts) == medical.group_of(tmp_path / "case12_t2.png", opts)
    with pytest.raises(imaging.ImageError, match="does not match --group_regex"):
        medical.group_of(tmp_path / "other.png", opts)


def test_bad_inputs_are_one_line_naming_the_file_or_flag(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    with pytest.raises(imaging.ImageError) as e:
        imaging.check_image(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    write_nifti(tmp_path / "t.nii.gz", np.ones((4, 4, 3, 2)))
    with pytest.raises(imaging.ImageError, match="4-D volume"):
        medical.expand([tmp_path / "t.nii.gz"], medical.ReadOptions())
    write_nifti(tmp_path / "empty.nii.gz", np.full((4, 4, 3), 7))
    with pytest.raises(imaging.ImageError, match="empty volume"):
        medical.expand([tmp_path / "empty.nii.gz"], medical.ReadOptions())
    with pytest.raises(ValueError, match="unknown intensity window 'lungs'.*lung") as e:
        medical.ReadOptions("lungs")
    assert "\n" not in str(e.value)
    for text in ("240,-160", "p5", "1,2,3"):
        with pytest.raises(ValueError, match="unknown intensity window"):
            medical.ReadOptions(text)
    with pytest.raises(ValueError, match="slice range"):
        medical.ReadOptions(slice_range="9:3")


def test_compressed_dicom_without_its_decoder_names_the_package(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless
    path = write_dicom(tmp_path / "j2k.dcm", ct_volume(1, 8)[0])
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 64])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    try:
        import pylibjpeg  # noqa: F401
        pytest.skip("a JPEG 2000 decoder is installed here")
    except ImportError:
        pass
    with pytest.raises(imaging.ImageError, match=r"is compressed \(JPEG 2000.*pip install pylibjpeg pylibjpeg-openjpeg"):
        imaging.check_image(path)


def test_resume_keeps_the_stored_options_and_refuses_a_conflicting_flag():
    stored = medical.ReadOptions("auto").to_config()
    stored["window"], stored["origin"] = [-160.0, 240.0], "the files' own window"
    for same in (medical.ReadOptions(), medical.ReadOptions("-160,240"), medical.ReadOptions(slice_axis="axial")):
        assert medical.resume_options(same, stored).window == (-160.0, 240.0)
    for other, flag in ((medical.ReadOptions("lung"), "--intensity_window lung"),
                        (medical.ReadOptions(slice_axis="coronal"), "--slice_axis 1"),
                        (medical.ReadOptions(slice_range="2:5"), "--slice_range (2, 5)"),
                        (medical.ReadOptions(window_16bit=True), "--window_16bit True")):
        with pytest.raises(ValueError, match="differs from the run being resumed") as e:
            medical.resume_options(other, stored)
        assert str(e.value).startswith(flag)
    fresh = medical.ReadOptions("bone")
    assert medical.resume_options(fresh, None) is fresh  # a run from before windows: the given options
