"""The one image decoder of this repository: file -> float32 (C, H, W) in [0, 1], and the one resize.

VENDORED: the source is scripts/vendored/imaging.py; ddpm/, ldm/, controlnet/, dit/ and evaluation/ each
hold a byte-identical copy (`python scripts/sync_vendored.py` refreshes them, tests/test_vendored.py fails
on drift). Never edit a copy: edit the source and run the sync script. Nothing to run here.

    from imaging import decode_image, resize_image
    x = resize_image(decode_image("scan.png", channels=1), 256)   # (1, 256, 256) in [0, 1]

Files: IMAGE_EXTENSIONS (.png .jpg .jpeg .bmp .tif .tiff .webp) and the medical formats MEDICAL_EXTENSIONS
(.dcm .nii .nii.gz, and files with no extension that carry the DICOM "DICM" preamble), any letter case;
hidden files (and, when listing recursively, hidden folders) are skipped. A multi-frame 2-D file gives its
first frame. EXIF orientation is not applied: pixels are used as stored. DICOM and NIfTI files (slices,
frames, intensity windows in physical units, patient groups, writing) are read by medical.py (vendored
with this file): a `Source` names one 2-D image, a whole file or one slice / frame of it, and every reader
below takes a Source or a path plus, optionally, medical.ReadOptions (the window).

Intensity rule (no per-image statistics: the same stored value always gives the same number):
- unsigned integer data is divided by its stored type's maximum: 8-bit by 255, 16-bit by 65535
  (also 16-bit colour and gray+alpha PNGs and 16-bit RGB TIFFs, which Pillow alone cuts to 8 bits),
  32-bit by 4294967295; bilevel (1-bit) images give 0 and 1.
- signed integer data is divided by its type's maximum (32767, 2147483647); a negative value is an error.
- float data must already be in [0, 1]; values within FLOAT_TOLERANCE (1e-3) outside are clipped (rounding
  of an export), anything further out, NaN or inf is an ImageError naming the file: scale such an image
  to [0, 1] yourself (windows in physical units, e.g. CT Hounsfield units, come with the medical formats).
Channel rule:
- alpha is dropped, never composited (RGBA -> RGB, LA -> L: the stored colour values are kept);
- palette images are expanded to their RGB colours (label masks may keep the indices: read_pixels);
- CMYK, YCbCr, LAB, HSV are converted to RGB by Pillow;
- colour -> 1 channel: ITU-R 601 luma 0.299 R + 0.587 G + 0.114 B, in float32 on the decoded [0, 1]
  values (so 16-bit colour keeps its precision); 1 channel -> 3 channels: the gray plane repeated.
Resize rule (resize_image): the shorter side is scaled to `size` with antialiased bilinear interpolation
(torch.nn.functional.interpolate(..., mode="bilinear", antialias=True, align_corners=False)), the longer
side to round(side * size / shorter side), then the centre size x size is cropped (offset floor((n - size)
/ 2)); results are clamped to [0, 1] (only float rounding can leave it). An image already size x size is
returned unchanged. resize_mask uses the same geometry with nearest-exact sampling (no antialias), so a
mask stays aligned with its image and no label value appears that was not in the file.
With ReadOptions that name a window (--intensity_window) and --window_16bit, 16-bit and float files are
windowed in their stored units instead of the rule above; 8-bit files are display values, never windowed.
Errors: every problem with a file is an ImageError (a ValueError) whose text is one line naming the file
and saying what to do; each folder turns it into its own UserError.
"""
import os
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MEDICAL_EXTENSIONS = (".dcm", ".nii", ".nii.gz")
ALL_EXTENSIONS = IMAGE_EXTENSIONS + MEDICAL_EXTENSIONS
FLOAT_TOLERANCE = 1e-3
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L") but in float

# Pillow decodes 16-bit colour samples to their high byte; the same data unpacked with the other byte
# order's rawmode gives the low bytes (same bits per pixel, so PNG unfiltering is identical).
_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGB;16L": "RGB;16B", "RGBA;16B": "RGBA;16L", "RGBA;16L": "RGBA;16B"}
# 16-bit gray+alpha PNG: Pillow opens it as 8-bit RGBA; rawmode "RGBA" (also 32 bits) yields the raw bytes.
_LA16_RAWMODES = ("LA;16B",)
_TO_RGB_MODES = ("RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "PA")

ImageInfo = namedtuple("ImageInfo", "mode channels alpha dtype size")
ImageInfo.__doc__ = """What check_image saw: Pillow mode, channels after the rule (1 or 3), whether alpha was
dropped, the stored sample type (uint8, uint16, int32, float32, bool...) and (width, height)."""


class ImageError(ValueError):
    """A file that is not a usable image; str() is one line: '<path> <problem>; <advice>'."""

    def __init__(self, path, problem, advice="remove or replace it"):
        self.path, self.problem, self.advice = str(path), " ".join(str(problem).split()), advice
        super().__init__(f"{self.path} {self.problem}; {self.advice}")


class Source(namedtuple("Source", "path index")):
    """One 2-D image: a whole file (index None) or slice / frame `index` of a NIfTI volume or DICOM file.

    name, stem and str() identify it in messages and pairings; a slice's stem is '<file stem>_<index>'."""
    __slots__ = ()

    def __new__(cls, path, index=None):
        return super().__new__(cls, Path(path), None if index is None else int(index))

    @property
    def file_stem(self):
        n = self.path.name
        for ext in MEDICAL_EXTENSIONS[::-1]:  # .nii.gz before .nii
            if n.lower().endswith(ext):
                return n[:-len(ext)]
        return self.path.stem

    @property
    def stem(self):
        return self.file_stem if self.index is None else f"{self.file_stem}_{self.index:04d}"

    @property
    def name(self):
        return self.path.name if self.index is None else f"{self.path.name}[{self.index}]"

    def __str__(self):
        return str(self.path) if self.index is None else f"{self.path}[{self.index}]"


def as_source(src):
    """A Source for a path or Source."""
    return src if isinstance(src, Source) else Source(src)


def is_dicom_file(path):
    """True for a file with the DICOM preamble ('DICM' at byte 128), whatever its name."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_image_file(path):
    """A file this repository reads: a known extension (any case), or no extension and a DICOM preamble."""
    name = Path(path).name
    if name.startswith("."):
        return False
    if name.lower().endswith(ALL_EXTENSIONS):
        return True
    return "." not in name and is_dicom_file(path)


def is_medical(src):
    """True for DICOM / NIfTI files (physical units, slices, frames), False for the 2-D image formats."""
    name = as_source(src).path.name.lower()
    return name.endswith(MEDICAL_EXTENSIONS) or ("." not in name and is_dicom_file(as_source(src).path))


def list_images(folder, recursive=False):
    """Sorted image files of `folder` (extensions case-insensitive, hidden files and folders skipped)."""
    folder = Path(folder)
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: each real folder is listed once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in filenames if is_image_file(Path(dirpath) / n)]
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _rawmode(im):
    """How the file stores its samples (Pillow tile rawmode), read before decoding."""
    if not im.tile:
        return ""
    args = im.tile[0][3]
    return args[0] if isinstance(args, tuple) and args and isinstance(args[0], str) else (
        args if isinstance(args, str) else "")


def _with_rawmode(im, rawmode):
    """Re-point every tile of a not yet loaded image at another rawmode."""
    tiles = []
    for t in im.tile:
        args = (rawmode,) + tuple(t[3][1:]) if isinstance(t[3], tuple) else rawmode
        tiles.append(t._replace(args=args) if hasattr(t, "_replace") else (t[0], t[1], t[2], args))
    im.tile = tiles


def _int_max(dtype, rawmode):
    """Maximum of the stored integer type (Pillow holds 16/32-bit gray as int32 mode I in some versions)."""
    if dtype == np.int32 and rawmode:
        bits = "".join(c for c in rawmode.split(";")[1] if c.isdigit()) if ";" in rawmode else "32"
        signed = rawmode == "I" or rawmode.endswith("S")  # I;16S, I;32S, I;32BS... are signed
        return (2 ** (int(bits or 32) - (1 if signed else 0)) - 1), signed
    info = np.iinfo(dtype)
    return info.max, info.min < 0


def decode_raw(path, expand_palette=True):
    """(stored samples H x W x C, C = 1 or 3, in the file's own type; mode; alpha; rawmode; size) of a 2-D file."""
    try:
        with Image.open(path) as im:
            mode, size, rawmode = im.mode, im.size, _rawmode(im)
            alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode == "P" and "transparency" in im.info)
            if rawmode in _LOW_BYTE_RAWMODE or rawmode in _LA16_RAWMODES:
                arr = _decode_16bit_colour(path, im, rawmode)
                mode = "LA" if rawmode in _LA16_RAWMODES else mode
            else:
                im.load()
                if mode in ("P", "PA") and not expand_palette:
                    arr = np.asarray(im if mode == "P" else im.getchannel(0))  # label indices, 0..255
                elif mode in ("P", *_TO_RGB_MODES):
                    arr = np.asarray(im.convert("RGB"))
                elif mode in ("LA", "La"):
                    arr = np.asarray(im.convert("LA").getchannel("L"))
                else:
                    arr = np.asarray(im)
    except ImageError:
        raise
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, ValueError, EOFError...)
        raise ImageError(path, f"is not a readable image ({type(e).__name__}: {str(e)[:160]})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise ImageError(path, f"has an unsupported layout (mode {mode}, shape {arr.shape})",
                         "save it as gray, RGB or RGBA")
    return arr, mode, alpha, rawmode, size


def stored_values(arr, rawmode):
    """Integer samples as their true type (unsigned 32-bit samples sit in Pillow's int32 mode I)."""
    if arr.dtype == np.int32 and not _int_max(arr.dtype, rawmode)[1]:
        return arr.view(np.uint32)
    return arr


def _decode(path, expand_palette=True):
    """(float32 array H x W x C in [0, 1], C = 1 or 3, ImageInfo) of one 2-D file; ImageError if unusable."""
    arr, mode, alpha, rawmode, size = decode_raw(path, expand_palette)
    dtype = arr.dtype
    if dtype == np.bool_:
        out = arr.astype(np.float32)
    elif np.issubdtype(dtype, np.integer):
        top, signed = _int_max(dtype, rawmode)
        if not signed and arr.dtype == np.int32:
            arr = arr.view(np.uint32)  # unsigned 32-bit samples held in Pillow's int32 mode I
        if signed and arr.min() < 0:
            raise ImageError(path, f"holds negative integers (down to {int(arr.min())}; mode {mode})",
                             "store it unsigned, or as float scaled to [0, 1] (windows in physical units "
                             "come with the medical formats)")
        if arr.dtype.itemsize <= 2:  # exact in float32; k / 255 then equals torchvision's ToTensor bit for bit
            out = arr.astype(np.float32) / np.float32(top)
        else:
            out = (arr.astype(np.float64) / top).astype(np.float32)
    elif np.issubdtype(dtype, np.floating):
        out = arr.astype(np.float32)
        lo, hi = float(np.min(out)), float(np.max(out))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ImageError(path, "holds NaN or infinite values", "replace them and scale the image to [0, 1]")
        if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
            raise ImageError(path, f"is a float image with values in [{lo:.6g}, {hi:.6g}], outside [0, 1]",
                             "scale it to [0, 1] (windows in physical units, e.g. CT Hounsfield units, come "
                             "with the medical formats)")
        out = np.clip(out, 0.0, 1.0)
    else:
        raise ImageError(path, f"has the unsupported sample type {dtype} (mode {mode})",
                         "save it as 8/16-bit integer or float32 in [0, 1]")
    return np.ascontiguousarray(out), ImageInfo(mode, out.shape[2], alpha, str(np.dtype(dtype)), size)


def _decode_16bit_colour(path, im, rawmode):
    """uint16 samples of a 16-bit colour / gray+alpha file, alpha dropped (Pillow alone keeps 8 bits)."""
    if rawmode in _LA16_RAWMODES:
        _with_rawmode(im, "RGBA")  # bytes L_hi, L_lo, A_hi, A_lo
        im.load()
        raw = np.asarray(im).astype(np.uint16)
        return (raw[..., 0] << 8) | raw[..., 1]
    im.load()
    hi = np.asarray(im)[..., :3].astype(np.uint16)
    with Image.open(path) as low:
        _with_rawmode(low, _LOW_BYTE_RAWMODE[rawmode])
        low.load()
        lo = np.asarray(low)[..., :3].astype(np.uint16)
    return (hi << 8) | lo


def _read(src, expand_palette, opts):
    """(pixels, ImageInfo) of a Source or path: 2-D files here, medical files and windows in medical.py."""
    src = as_source(src)
    if is_medical(src) or (opts is not None and opts.windows_2d()):
        return medical.read(src, expand_palette, opts)
    if src.index not in (None, 0):
        raise ImageError(src.path, f"is a 2-D image: it has no slice or frame {src.index}")
    return _decode(src.path, expand_palette)


def read_pixels(src, expand_palette=True, opts=None):
    """Every pixel of a Source or path as float32 (H, W, C) in [0, 1], C its own 1 or 3 channels.

    expand_palette=False keeps a palette image's indices (/255, one channel): label masks. `opts`
    (medical.ReadOptions) carries the intensity window for files in physical units."""
    return _read(src, expand_palette, opts)[0]


def check_image(src, expand_palette=True, opts=None):
    """Decode a Source or path fully, as training will; return its ImageInfo, or raise ImageError naming it."""
    return _read(src, expand_palette, opts)[1]


def to_channels(x, channels):
    """(C, H, W) with C in {1, 3} -> `channels` (1 or 3): ITU-R 601 luma in float, or gray repeated."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, not {channels}")
    if x.shape[0] == channels:
        return x
    if channels == 1:
        r, g, b = LUMA_WEIGHTS
        return (x[0:1] * r + x[1:2] * g + x[2:3] * b).clamp(0.0, 1.0)
    return x.expand(3, -1, -1).contiguous()


def decode_image(src, channels, opts=None):
    """Source or path -> float32 torch tensor (channels, H, W) in [0, 1] by the intensity and channel rules."""
    return to_channels(torch.from_numpy(read_pixels(src, opts=opts)).permute(2, 0, 1), channels).contiguous()


def _geometry(h, w, size):
    """(scaled height, scaled width, crop top, crop left) of the shorter-side resize + centre crop."""
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def _resize(x, size, mode, **kw):
    """Shared geometry of resize_image / resize_mask on (C, H, W) or (N, C, H, W)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    nh, nw, top, left = _geometry(h, w, size)
    batch = x if x.ndim == 4 else x[None]
    if (nh, nw) != (h, w):
        batch = F.interpolate(batch.float(), size=(nh, nw), mode=mode, **kw)
    batch = batch[..., top:top + size, left:left + size]
    return (batch if x.ndim == 4 else batch[0]).contiguous()


def resize_image(x, size):
    """Shorter side to `size` (antialiased bilinear), centre crop to size x size, values kept in [0, 1]."""
    return _resize(x, size, "bilinear", antialias=True, align_corners=False).clamp(0.0, 1.0)


def resize_mask(x, size):
    """resize_image's geometry with nearest-exact sampling: label values preserved, no antialias."""
    return _resize(x, size, "nearest-exact")


# medical.py (vendored beside this file) reads DICOM / NIfTI and windows; it imports the names above, so it is
# imported last, and once, from this folder (pydicom and nibabel themselves load only when a file needs them).
import medical  # noqa: E402
