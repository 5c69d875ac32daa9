"""Generated images out: 8-bit / 16-bit PNG, NIfTI and DICOM, written once, in the training data's units.

VENDORED: the source is scripts/vendored/writers.py; ddpm/, ldm/, controlnet/, dit/ and evaluation/ each hold a
byte-identical copy beside medical.py (`python scripts/sync_vendored.py` refreshes them). Never edit a copy.
Nothing to run here; every inference script calls it for --output_format:

    window = output_window(args.output_format, channels, ckpt["config"].get("intensity"), args.ckpt)
    write_image_once(x, "out/seed0001.png", "nifti", window, "seed 1")   # -> out/seed0001.nii.gz, in HU

Formats: png (8-bit), png16 (gray by Pillow, colour by pypng: Pillow writes no 16-bit colour PNG), nifti
(physical units: window[0] + x * (window[1] - window[0]); cal_min / cal_max hold the window; laid out so that
medical.py reads the same image back) and dicom (Secondary Capture, DERIVED / SECONDARY, ConversionType SYN,
new UIDs, PatientID SYNTHETIC, 16-bit with rescale slope / intercept back to the window's units). No tag or
value comes from any training file. Every file goes to a temporary name first and is linked to its final name
only if nothing is there: runs never overwrite outputs, and a killed run leaves no half file.
"""
import os
import tempfile
from pathlib import Path

import numpy as np

from medical import ReadOptions, _import

OUTPUT_FORMATS = ("png", "png16", "nifti", "dicom")
OUTPUT_SUFFIX = {"png": ".png", "png16": ".png", "nifti": ".nii.gz", "dicom": ".dcm"}


def add_output_flag(parser):
    """--output_format png | png16 | nifti | dicom."""
    parser.add_argument("--output_format", "--output-format", dest="output_format", default="png",
                        choices=OUTPUT_FORMATS,
                        help="png (8-bit), png16, nifti (physical units through the checkpoint's window) or dicom "
                             "(secondary capture, new UIDs, nothing copied from training files)")

def output_window(fmt, channels, intensity, source):
    """The window outputs are mapped back through (None: 8-bit data or an older checkpoint: [0, 1] written).

    `intensity` is a checkpoint's "intensity" dict; ValueError (one line naming `source`) for NIfTI from a colour
    model or an unreadable stored window, so an inference script stops before sampling."""
    if fmt == "nifti" and channels != 1:
        raise ValueError(f"--output_format nifti writes one value per voxel, but {source} makes {channels}-channel "
                         f"(colour) images: use --output_format png, png16 or dicom")
    try:
        return ReadOptions.from_config(intensity).window
    except (ValueError, TypeError) as e:
        raise ValueError(f"{source}: its stored intensity window is unreadable ({e})") from None


def output_path(path, fmt):
    """`path` with the suffix of an output format (.png, .nii.gz, .dcm)."""
    path = Path(path)
    base = path.name[:-len(path.suffix)] if path.suffix else path.name
    if path.name.lower().endswith(".nii.gz"):  # idempotent: x.nii.gz -> x.png, not x.nii.png / x.nii.nii.gz
        base = path.name[:-len(".nii.gz")]
    return path.with_name(base + OUTPUT_SUFFIX[fmt])


_RUN_UIDS = {}


def _run_uid(kind):
    """One study / series UID per process, so the images of one inference run form one series."""
    if kind not in _RUN_UIDS:
        from pydicom.uid import generate_uid
        _RUN_UIDS[kind] = generate_uid()
    return _RUN_UIDS[kind]


def _write_png16(x, tmp):
    if x.shape[0] == 1:
        from PIL import Image
        Image.fromarray(np.round(x[0] * 65535).astype(np.uint16)).save(tmp, format="PNG")
        return
    png = _import("png")  # Pillow writes no 16-bit colour PNG; pypng does
    rows = np.round(np.transpose(x, (1, 2, 0)) * 65535).astype(np.uint16).reshape(x.shape[1], -1)
    with open(tmp, "wb") as f:
        png.Writer(x.shape[2], x.shape[1], greyscale=False, bitdepth=16).write(f, rows.tolist())


def _write_nifti(x, tmp, window, description):
    nib = _import("nibabel")
    if x.shape[0] != 1:
        raise ValueError("nifti output is for 1-channel models; use png or png16 for colour")
    img = x[0].astype(np.float64)
    phys = img if window is None else window[0] + img * (window[1] - window[0])
    data = phys[::-1, ::-1].T[:, :, None].astype(np.float32)  # inverse of _Volume.slice on a RAS volume
    out = nib.Nifti1Image(data, np.eye(4))
    lo, hi = window if window is not None else (0.0, 1.0)
    out.header["cal_min"], out.header["cal_max"] = lo, hi
    out.header["descrip"] = description[:79].encode("ascii", "replace")
    nib.save(out, tmp)


def _write_dicom(x, tmp, window, description):
    _import("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    import datetime
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp), {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _run_uid("study"), _run_uid("series")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "SYNTHETIC", "SYNTHETIC", "", ""
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", ""
    ds.Modality, ds.ConversionType, ds.ImageType = "OT", "SYN", ["DERIVED", "SECONDARY"]
    ds.SeriesNumber, ds.InstanceNumber, ds.BurnedInAnnotation = 1, 1, "NO"
    ds.SeriesDescription = "synthetic images (diffusion model)"
    ds.ImageComments = description[:10240]
    ds.Rows, ds.Columns = int(x.shape[1]), int(x.shape[2])
    if x.shape[0] == 1:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        lo, hi = window if window is not None else (0.0, 1.0)
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{lo:.10g}", f"{(hi - lo) / 65535:.10g}", "US"
        ds.WindowCenter, ds.WindowWidth = f"{(lo + hi) / 2:.10g}", f"{hi - lo:.10g}"
        ds.PixelData = np.round(x[0] * 65535).astype("<u2").tobytes()
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.round(np.transpose(x, (1, 2, 0)) * 255).astype(np.uint8).tobytes()
    ds.save_as(str(tmp), enforce_file_format=True)


def write_image_once(image, path, fmt="png", window=None, description=""):
    """Write a [0, 1] image (C, H, W) in `fmt` at `path` (suffix set by the format) unless a file is there.

    Returns the path written, or None when it existed (runs never overwrite outputs). Temporary file +
    os.link, as runtime.save_png_once: concurrent runs and killed runs never leave a half file."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}: choose one of {', '.join(OUTPUT_FORMATS)}")
    x = image.detach().float().cpu().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=np.float32)
    x = np.clip(x, 0.0, 1.0)
    final = output_path(path, fmt)
    if final.exists():
        return None
    suffix = OUTPUT_SUFFIX[fmt]
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix, dir=final.parent)
    os.close(fd)
    try:
        if fmt == "png":
            from PIL import Image
            arr = np.round(x * 255).astype(np.uint8)
            Image.fromarray(arr[0] if arr.shape[0] == 1 else np.transpose(arr, (1, 2, 0))).save(tmp, format="PNG")
        elif fmt == "png16":
            _write_png16(x, tmp)
        elif fmt == "nifti":
            _write_nifti(x, tmp, window, description)
        else:
            _write_dicom(x, tmp, window, description)
        try:
            os.link(tmp, final)
            return final
        except FileExistsError:
            return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
