"""Medical test files the tests write themselves (pydicom and nibabel): CT-like DICOM series, NIfTI volumes.

Each writer takes values in physical units (HU) and stores them the way scanners do (integers with a
rescale slope / intercept), so tests can compare what the readers return with numbers computed here.
"""
import datetime
from pathlib import Path

import numpy as np


def ct_volume(n_slices=6, size=24, seed=0):
    """A CT-like volume in HU, (slices, H, W): air around a body of soft tissue with a bright bone disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    vol = []
    for k in range(n_slices):
        hu = np.full((size, size), -1000.0)
        hu[r < size * 0.42] = 40.0 + 10 * k
        hu[r < size * (0.1 + 0.02 * k)] = 700.0
        hu += rng.integers(-20, 21, size=hu.shape)
        vol.append(hu)
    return np.round(np.stack(vol))


def write_dicom(path, hu, patient_id="P001", study_uid=None, slope=1.0, intercept=-1024.0,
                photometric="MONOCHROME2", window=(40, 400), instance=1, frames=False):
    """One CT DICOM file of `hu` ((H, W), or (F, H, W) with frames=True) stored as uint16 (hu - intercept) / slope."""
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
    ds.PatientID, ds.PatientName = patient_id, f"Doe^{patient_id}"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.InstanceNumber = "CT", instance
    ds.StudyDate = datetime.date.today().strftime("%Y%m%d")
    stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    assert stored.min() >= 0 and stored.max() < 65536
    if photometric == "MONOCHROME1":
        pass  # the stored values are the same; a viewer shows them inverted
    if frames:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    del pydicom
    return path


def write_ct_series(folder, hu_volume, patient_id="P001", **kw):
    """One DICOM file per slice of `hu_volume` in `folder` (slice_000.dcm ...); returns the paths."""
    from pydicom.uid import generate_uid
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    return [write_dicom(folder / f"{patient_id}_slice_{k:03d}.dcm", hu, patient_id, study, instance=k + 1, **kw)
            for k, hu in enumerate(hu_volume)]


def write_nifti(path, volume, affine=None, slope=None, inter=None, dtype=np.int16):
    """A NIfTI file of `volume` (any ndim) with `affine` (identity: RAS, 1 mm)."""
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(volume).astype(dtype), np.eye(4) if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    nib.save(img, str(path))
    return Path(path)


def windowed(hu, low, high):
    """What the reader must return for `hu` under the window [low, high]."""
    return np.clip((np.asarray(hu, dtype=np.float64) - low) / (high - low), 0, 1).astype(np.float32)
