"""Medical images in: DICOM and NIfTI slices, intensity windows in physical units, patient groups.

VENDORED: the source is scripts/vendored/medical.py; ddpm/, ldm/, controlnet/, dit/ and evaluation/ each hold
a byte-identical copy beside imaging.py (`python scripts/sync_vendored.py` refreshes them). Never edit a
copy. Nothing to run here; imaging.py calls it for DICOM / NIfTI files, the folders for flags and outputs:

    opts = options_from_args(args)                     # --intensity_window, --slice_axis, --slice_range ...
    sources = expand(files, opts)                      # one Source per 2-D slice / frame / file
    opts = opts.fit(sources)                           # the window, fixed from the data once ('auto', 'p1,p99')
    x = imaging.decode_image(sources[0], 1, opts)      # (1, H, W) in [0, 1]

Reading (pydicom and nibabel do the parsing):
- DICOM (.dcm, or no extension and the DICM preamble): the modality LUT is applied (rescale slope /
  intercept: CT in Hounsfield units), then the window; MONOCHROME1 is inverted after windowing so bright
  means dense in every tensor; a multi-frame file gives one image per frame; colour (RGB / YBR) DICOM is
  display data: 8-bit / type max, never windowed. A compressed transfer syntax whose decoder is not
  installed is one line naming the package to install.
- NIfTI (.nii, .nii.gz; scl_slope / scl_inter applied by nibabel): each 3-D volume gives 2-D slices along
  --slice_axis (axial, coronal, sagittal of the closest canonical RAS orientation, whatever the storage
  order), optionally only --slice_range START:END (Python-style, in canonical order); constant slices are
  skipped. A slice is shown radiologically: rows run from anterior / superior at the top, columns from
  the patient's right on the image's left. A volume with one voxel along an axis (what this module
  writes) is one 2-D image. 4-D volumes are refused.
- Masks (expand_palette=False) are label maps: integer labels 0..255, returned / 255 like 8-bit masks.
Intensity window (--intensity_window; x = clip((v - LOW) / (HIGH - LOW), 0, 1) on the physical value v):
- `auto` (default): the files' own window (DICOM WindowCenter / WindowWidth, NIfTI cal_min / cal_max),
  the most common one when files disagree; without one, the 0.5th and 99.5th percentiles of the data.
- `LOW,HIGH` in the data's units (HU for CT), or a CT preset of WINDOW_PRESETS (`lung`, `bone`...).
- `pLOW,pHIGH` (e.g. p1,p99): the percentiles of the whole data set, computed once.
Whatever the mode, the window is fixed for the whole data set before training (`fit`), stored in every
checkpoint (`to_config`) and used to map outputs back to physical units. It applies to DICOM and NIfTI;
16-bit and float PNG / TIFF files are windowed in their stored units only when a window is named (not
`auto`) and --window_16bit says so (png16 outputs are display values, not stored units); 8-bit files
are display values and are never windowed.
Groups (patient-level splits): DICOM PatientID, else StudyInstanceUID; a NIfTI volume; any other file on
its own; `--group_regex` (first group of a match on the file name, or the whole match) overrides. Patient
identifiers stay in memory: summaries print counts, nothing is written.
Outputs (png16 / NIfTI / DICOM) are written by writers.py, vendored beside this file.
"""
import functools
import os
import re
from collections import Counter, OrderedDict

import numpy as np

from imaging import (ImageError, ImageInfo, Source, _decode, as_source, decode_raw, is_dicom_file,
                     stored_values)

# (centre, width) in Hounsfield units, as commonly tabulated for CT (e.g. Radiopaedia's "windowing (CT)").
WINDOW_PRESETS = {
    "brain": (40, 80), "subdural": (75, 215), "stroke": (40, 40), "temporal_bone": (600, 2800),
    "head_soft_tissue": (40, 380), "lung": (-600, 1500), "mediastinum": (50, 350), "abdomen": (50, 400),
    "liver": (30, 150), "bone": (400, 1800), "spine_soft_tissue": (50, 250),
}
AUTO_PERCENTILES = (0.5, 99.5)
AXES = {"sagittal": 0, "coronal": 1, "axial": 2, "0": 0, "1": 1, "2": 2}
# Which pip packages decode a compressed DICOM transfer syntax (pydicom's own decoders need them).
DECODER_PACKAGES = [("JPEG 2000", "pylibjpeg pylibjpeg-openjpeg"), ("JPEG-LS", "pyjpegls"),
                    ("JPEG", "pylibjpeg pylibjpeg-libjpeg"), ("", "pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")]
SAMPLE_PIXELS = 200_000  # per image, for percentiles: a strided subsample keeps fit() fast on large sets


def window_of(centre, width):
    """(low, high) of a centre / width window."""
    return (float(centre) - float(width) / 2.0, float(centre) + float(width) / 2.0)


def parse_window(text):
    """`auto` | preset | `LOW,HIGH` | `pLOW,pHIGH` -> ('auto',) / ('fixed', lo, hi, origin) / ('percentile', a, b)."""
    t = str(text).strip().lower().replace(" ", "")
    if t in ("", "auto"):
        return ("auto",)
    if t in WINDOW_PRESETS:
        lo, hi = window_of(*WINDOW_PRESETS[t])
        return ("fixed", lo, hi, f"preset {t}")
    parts = t.split(",")
    try:
        if len(parts) == 2 and all(p.startswith("p") for p in parts):
            a, b = float(parts[0][1:]), float(parts[1][1:])
            if not 0 <= a < b <= 100:
                raise ValueError
            return ("percentile", a, b)
        if len(parts) == 2:
            lo, hi = float(parts[0]), float(parts[1])
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError
            return ("fixed", lo, hi, "given")
    except ValueError:
        pass
    raise ValueError(f"unknown intensity window '{text}': use auto, LOW,HIGH (e.g. -160,240, LOW < HIGH), "
                     f"percentiles pLOW,pHIGH (e.g. p1,p99) or a preset ({', '.join(sorted(WINDOW_PRESETS))})")


def parse_axis(text):
    """axial / coronal / sagittal or 0 / 1 / 2 -> the canonical (RAS) axis index."""
    t = str(text).strip().lower()
    if t not in AXES:
        raise ValueError(f"unknown slice axis '{text}': use axial, coronal, sagittal (or 2, 1, 0)")
    return AXES[t]


def parse_range(text):
    """'START:END' (either may be empty) -> (start, end) with None for an open end; None for no range."""
    if text in (None, "", "all"):
        return None
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"slice range '{text}' is not START:END (integers, either may be empty, e.g. 20:80)") from None
    if a is not None and b is not None and not 0 <= a < b:
        raise ValueError(f"slice range '{text}' is empty: START must be below END")
    return (a, b)


class ReadOptions:
    """How files in physical units become [0, 1] images: the window, the slicing, the grouping."""

    def __init__(self, window="auto", slice_axis="axial", slice_range=None, group_regex=None, window_16bit=False):
        self.spec = str(window)
        self.window_16bit = bool(window_16bit)
        self.mode = parse_window(window)
        self.slice_axis = parse_axis(slice_axis)
        self.slice_range = parse_range(slice_range) if not isinstance(slice_range, (tuple, list)) else tuple(slice_range)
        self.group_regex = group_regex or None
        if self.group_regex:
            try:
                re.compile(self.group_regex)
            except re.error as e:
                raise ValueError(f"group regex '{group_regex}' is not a regular expression ({e})") from None
        self.window = self.mode[1:3] if self.mode[0] == "fixed" else None
        self.origin = self.mode[3] if self.mode[0] == "fixed" else ""
        self.notes = []

    def windows_2d(self):
        """True when 16-bit / float 2-D files are windowed too: a named window and --window_16bit."""
        return self.window_16bit and self.mode[0] != "auto"

    def fit(self, sources):
        """A copy whose window is fixed from the data (auto / percentiles); explicit windows are kept."""
        out = ReadOptions.from_config(self.to_config())
        if self.mode[0] == "fixed":
            return out
        physical = [s for s in map(as_source, sources) if _physical(s, self)]
        if not physical:
            out.window, out.origin = None, "none (no DICOM / NIfTI data)" if self.mode[0] == "auto" else ""
            if self.mode[0] == "percentile":
                raise ValueError(f"--intensity_window {self.spec}: no 16-bit, float, DICOM or NIfTI images to take "
                                 f"percentiles of; 8-bit images are display values (use auto)")
            return out
        if self.mode[0] == "auto":
            own = Counter(w for w in (_own_window(s) for s in physical) if w is not None)
            if own:
                (lo, hi), n = own.most_common(1)[0]
                out.window, out.origin = (lo, hi), f"the files' own window ({n} of {len(physical)} images)"
                if len(own) > 1 or n < len(physical):
                    out.notes.append(f"the images carry {len(own)} different windows (or none); all are read with "
                                     f"[{lo:g}, {hi:g}]; pass --intensity_window to choose another")
                return out
            a, b = AUTO_PERCENTILES
        else:
            a, b = self.mode[1:]
        vals = np.concatenate([_sample(_values(s)) for s in physical])
        lo, hi = (float(v) for v in np.percentile(vals, [a, b]))
        if not hi > lo:
            hi = lo + 1.0
        out.window, out.origin = (lo, hi), f"percentiles {a:g}-{b:g} of {len(physical)} images"
        return out

    def to_config(self):
        """Plain dict for checkpoints (no patient data: the window, its origin and the slicing settings)."""
        return {"window": list(self.window) if self.window is not None else None, "spec": self.spec,
                "origin": self.origin, "slice_axis": self.slice_axis,
                "slice_range": list(self.slice_range) if self.slice_range else None, "group_regex": self.group_regex,
                "window_16bit": self.window_16bit}

    @classmethod
    def from_config(cls, cfg):
        """ReadOptions from to_config()'s dict (None or {} -> defaults: a checkpoint from before windows)."""
        cfg = cfg or {}
        out = cls(cfg.get("spec", "auto"), str(cfg.get("slice_axis", 2)), cfg.get("slice_range"),
                  cfg.get("group_regex"), cfg.get("window_16bit", False))
        if cfg.get("window") is not None:
            out.window, out.origin = tuple(float(v) for v in cfg["window"]), cfg.get("origin", "")
        return out

    def describe(self):
        """One line: the window in use and where it came from."""
        if self.window is None:
            return "intensity: no window (8-bit display values; 16-bit / float by their type's range)"
        lo, hi = self.window
        scope = "DICOM / NIfTI and 16-bit / float files" if self.windows_2d() else "DICOM / NIfTI files"
        return f"intensity window [{lo:g}, {hi:g}] ({self.origin}) on {scope}; 8-bit images pass unchanged"


def add_read_flags(parser):
    """--intensity_window, --slice_axis, --slice_range, --group_regex (both spellings) on any ArgumentParser."""
    def flag(name, **kw):
        parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, **kw)
    flag("intensity_window", default="auto", metavar="WINDOW",
         help="window for DICOM / NIfTI data in its own units: auto (the files' "
              "own window, else the 0.5-99.5th percentiles), LOW,HIGH (e.g. -160,240 HU), pLOW,pHIGH "
              f"(percentiles of the data set) or a CT preset ({', '.join(sorted(WINDOW_PRESETS))})")
    parser.add_argument("--window_16bit", "--window-16bit", dest="window_16bit", action="store_true",
                        help="also window 16-bit / float PNG and TIFF files, in their stored units, with a named "
                             "--intensity_window (default: they keep the type-maximum rule)")
    flag("slice_axis", default="axial", metavar="AXIS", help="NIfTI volumes: slice along axial, coronal or sagittal")
    flag("slice_range", default=None, metavar="START:END", help="NIfTI volumes: only these slices (e.g. 20:80)")
    flag("group_regex", default=None, metavar="REGEX",
         help="patient / study of a file for splits: first group of this regex on the file name (default: DICOM "
              "PatientID / StudyInstanceUID, one group per NIfTI volume, else per file)")
    # argparse reads "-160,240" as an unknown option (it knows only plain negative numbers): let a LOW,HIGH
    # value that starts with a minus sign be a value, so `--intensity_window -160,240` works as documented.
    neg = getattr(parser, "_negative_number_matcher", None)
    if neg is not None:
        parser._negative_number_matcher = re.compile(f"{neg.pattern}|^-\\d*\\.?\\d+(e[-+]?\\d+)?,")


def options_from_args(args):
    """ReadOptions from the flags of add_read_flags; ValueError (one line naming the flag) when one is wrong."""
    try:
        return ReadOptions(args.intensity_window, args.slice_axis, args.slice_range, args.group_regex,
                           getattr(args, "window_16bit", False))
    except ValueError as e:
        flag = next((f for f in ("window", "axis", "range", "regex") if f in str(e).split("'")[0]), "window")
        name = {"window": "intensity_window", "axis": "slice_axis", "range": "slice_range", "regex": "group_regex"}[flag]
        raise ValueError(f"--{name}: {e}") from None


def resume_options(given, stored):
    """The ReadOptions of a resumed run: the stored ones, never re-fitted (`stored`: the checkpoint's "intensity"
    dict; None -> `given`, for runs from before windows). A read flag given now with a value other than its
    default and the stored run's is a ValueError naming it: a run never silently changes how it reads data."""
    if not stored:
        return given
    old, default = ReadOptions.from_config(stored), ReadOptions()
    same_window = given.mode == old.mode or (given.window is not None and old.window is not None
                                             and np.allclose(given.window, old.window))
    for name, now, before, dflt, same in (
            ("intensity_window", given.spec, old.spec, "auto", same_window),
            ("slice_axis", given.slice_axis, old.slice_axis, default.slice_axis, None),
            ("slice_range", given.slice_range, old.slice_range, None, None),
            ("group_regex", given.group_regex, old.group_regex, None, None),
            ("window_16bit", given.window_16bit, old.window_16bit, False, None)):
        if (given.mode[0] != "auto" if name == "intensity_window" else now != dflt) and not (
                same if same is not None else now == before):
            if name == "intensity_window" and old.window is not None:
                before = f"{before} = [{old.window[0]:g}, {old.window[1]:g}]"
            raise ValueError(f"--{name} {now} differs from the run being resumed ({before}); drop the flag (the "
                             f"run keeps its own) or start a new run")
    return old


# ---------------------------------------------------------------------------------------------- reading


def _kind(src):
    n = src.path.name.lower()
    if n.endswith((".nii", ".nii.gz")):
        return "nifti"
    if n.endswith(".dcm") or ("." not in n and is_dicom_file(src.path)):
        return "dicom"
    return "2d"


def _physical(src, opts):
    """Whether a source is read through the window: DICOM gray / NIfTI, and 16-bit / float 2-D when named."""
    kind = _kind(src)
    if kind == "nifti":
        return True
    if kind == "dicom":
        return _dicom_header(src.path)["gray"]
    if opts is not None and opts.windows_2d():
        return decode_raw(src.path)[0].dtype not in (np.uint8, np.bool_)
    return False


def _key(path):
    st = os.stat(path)
    return str(path), st.st_mtime_ns, st.st_size


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        pkg = {"pydicom": "pydicom", "nibabel": "nibabel", "png": "pypng"}[name]
        raise ImageError(name, "support is not installed", f"pip install {pkg}") from None


def _dicom_read(path, header_only):
    pydicom = _import("pydicom")
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=header_only, force=True)  # old files lack the preamble
    except Exception as e:
        raise ImageError(path, f"is not a readable DICOM file ({type(e).__name__}: {str(e)[:160]})") from None


@functools.lru_cache(maxsize=4096)
def _dicom_header_cached(key):
    ds = _dicom_read(key[0], True)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    window = None
    try:
        c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
        if c is not None and w is not None:
            c, w = (float(v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v) for v in (c, w))
            window = window_of(c, w) if w > 0 else None
    except (TypeError, ValueError):
        window = None
    group = next((f"{tag}:{v}" for tag in ("PatientID", "StudyInstanceUID")
                  if (v := str(ds.get(tag, "") or "").strip())), None)
    return {"photometric": photometric, "gray": photometric.startswith("MONOCHROME"), "window": window,
            "frames": int(ds.get("NumberOfFrames", 1) or 1), "group": group,
            "syntax": str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")}


def _dicom_header(path):
    return _dicom_header_cached(_key(path))


def _decoder_hint(syntax_name):
    return next(pkgs for name, pkgs in DECODER_PACKAGES if name in syntax_name)


@functools.lru_cache(maxsize=64)
def _dicom_pixels_cached(key):
    """(frames, H, W[, 3]) values: modality LUT applied to gray data (float64), colour as stored."""
    _import("pydicom")
    from pydicom.pixels import apply_modality_lut
    path = key[0]
    ds = _dicom_read(path, False)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(path, "is a DICOM file without pixel data (a report or structured data?)")
    try:
        arr = ds.pixel_array
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise ImageError(path, f"is compressed ({name}) and no installed package decodes it",
                             f"pip install {_decoder_hint(name)} (or python-gdcm)") from None
        raise ImageError(path, f"has unreadable DICOM pixel data ({type(e).__name__}: {str(e)[:160]})") from None
    hdr = _dicom_header_cached(key)
    frames = hdr["frames"]
    if hdr["gray"]:
        arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        arr = arr.reshape((frames,) + arr.shape[-2:]) if arr.ndim >= 2 else arr
    else:
        arr = np.asarray(arr)
        arr = arr.reshape((frames,) + arr.shape[-3:])
    return arr


# Decompressed .nii.gz volumes kept per process (each DataLoader worker has its own), least recently used
# dropped first; a training set that fits is decompressed once instead of once per slice read.
VOLUME_CACHE_MB = int(os.environ.get("MEDICAL_VOLUME_CACHE_MB", "1024"))
_ARRAYS = OrderedDict()


class _Volume:
    """A NIfTI file opened lazily: slices are read through nibabel's array proxy (memory-mapped for .nii), so
    a data set of many volumes never holds them all; `shape` is in canonical (RAS) axis order."""

    def __init__(self, path):
        nib = _import("nibabel")
        try:
            self.img = nib.load(str(path))
            shape = tuple(self.img.shape)
            self.ornt = nib.orientations.io_orientation(self.img.affine)  # per stored axis: (RAS axis, +1 / -1)
        except Exception as e:
            raise ImageError(path, f"is not a readable NIfTI file ({type(e).__name__}: {str(e)[:160]})") from None
        if len(shape) > 3 and any(n > 1 for n in shape[3:]):
            raise ImageError(path, f"is a {len(shape)}-D volume (shape {shape}); only 2-D and 3-D volumes are read",
                             "split it into 3-D volumes (e.g. one per time point or channel)")
        self.path, self.stored = path, (shape + (1, 1))[:3]
        self.compressed = str(path).lower().endswith(".gz")
        self.shape = tuple(self.stored[self._stored_axis(a)] for a in range(3))
        lo, hi = float(self.img.header.get("cal_min", 0)), float(self.img.header.get("cal_max", 0))
        self.cal = (lo, hi) if hi > lo else None

    def array(self):
        """The whole volume in storage order (float32), kept in a per-process cache of VOLUME_CACHE_MB."""
        key = _key(self.path)
        if key in _ARRAYS:
            _ARRAYS.move_to_end(key)
            return _ARRAYS[key]
        try:
            data = np.asarray(self.img.dataobj, dtype=np.float32).reshape(self.stored)
        except Exception as e:
            raise ImageError(self.path, f"has unreadable NIfTI data ({type(e).__name__}: {str(e)[:160]})") from None
        _ARRAYS[key] = data
        while len(_ARRAYS) > 1 and sum(a.nbytes for a in _ARRAYS.values()) > VOLUME_CACHE_MB * 2 ** 20:
            _ARRAYS.popitem(last=False)
        return data

    def _stored_axis(self, axis):
        return int(np.flatnonzero(self.ornt[:, 0] == axis)[0])

    def _canonical(self, sl, rest):
        """A 2-D array over stored axes `rest` -> the same plane in canonical order, each axis pointing R/A/S."""
        for j, s in enumerate(rest):
            if self.ornt[s, 1] < 0:
                sl = np.flip(sl, axis=j)
        return sl.T if self.ornt[rest[0], 0] > self.ornt[rest[1], 0] else sl

    def _check(self, arr):
        if not np.all(np.isfinite(arr)):
            raise ImageError(self.path, "holds NaN or infinite values", "replace them")
        return arr

    def axis(self, opts):
        """The axis slices are taken along: a singleton axis (a 2-D image) wins, else --slice_axis."""
        flat = [i for i, n in enumerate(self.shape) if n == 1]
        return flat[-1] if flat else (opts.slice_axis if opts is not None else 2)

    def slice(self, axis, k):
        """Slice k along canonical `axis`, as displayed: rows from +axis at the top, patient's right on the left."""
        s = self._stored_axis(axis)
        index = [slice(None)] * 3
        index[s] = self.stored[s] - 1 - k if self.ornt[s, 1] < 0 else k
        if self.compressed:  # gzip has no random access: slice the whole volume, decompressed once and cached
            sl = self.array()[tuple(index)].astype(np.float64)
        else:
            try:  # .nii is memory-mapped by nibabel: only this slice is read
                sl = np.asarray(self.img.dataobj[tuple(index) + (0,) * (len(self.img.shape) - 3)], dtype=np.float64)
            except Exception as e:
                raise ImageError(self.path, f"has unreadable NIfTI data ({type(e).__name__}: {str(e)[:160]})") from None
        sl = self._canonical(sl.reshape([self.stored[i] for i in range(3) if i != s]), [i for i in range(3) if i != s])
        return self._check(sl).T[::-1, ::-1]

    def nonconstant(self, axis):
        """Which canonical slices along `axis` are not constant (one read of the whole volume)."""
        data = self.array()
        s = self._stored_axis(axis)
        other = tuple(i for i in range(3) if i != s)
        keep = self._check(data).max(axis=other) > data.min(axis=other)
        return keep[::-1] if self.ornt[s, 1] < 0 else keep


@functools.lru_cache(maxsize=256)
def _nifti_cached(key):
    return _Volume(key[0])


def _nifti(path):
    return _nifti_cached(_key(path))


def _values(src, opts=None):
    """Physical values of one source: (H, W) float64 for gray data, (H, W, 3) stored samples for colour."""
    kind = _kind(src)
    if kind == "nifti":
        vol = _nifti(src.path)
        axis = vol.axis(opts)
        n = vol.shape[axis]
        if src.index is None and n != 1:
            raise ImageError(src.path, f"is a volume of {n} slices; read it through imaging.Source slices (expand)")
        if (src.index or 0) >= n:
            raise ImageError(src.path, f"has no slice {src.index} along axis {axis} ({n} slices)")
        return vol.slice(axis, src.index or 0)
    if kind == "dicom":
        arr = _dicom_pixels_cached(_key(src.path))
        if src.index is None and arr.shape[0] != 1:
            raise ImageError(src.path, f"has {arr.shape[0]} frames; read it through imaging.Source frames (expand)")
        k = src.index or 0
        if k >= arr.shape[0]:
            raise ImageError(src.path, f"has no frame {k} ({arr.shape[0]} frames)")
        return arr[k]
    raw, mode, alpha, rawmode, size = decode_raw(src.path)
    v = stored_values(raw, rawmode).astype(np.float64)
    if v.shape[2] == 1:
        v = v[:, :, 0]
    if np.issubdtype(raw.dtype, np.floating) and not np.all(np.isfinite(v)):
        raise ImageError(src.path, "holds NaN or infinite values", "replace them")
    return v


def _own_window(src):
    """The window a file carries (DICOM WindowCenter / Width, NIfTI cal_min / cal_max), or None."""
    kind = _kind(src)
    if kind == "dicom":
        return _dicom_header(src.path)["window"]
    if kind == "nifti":
        return _nifti(src.path).cal
    return None


def _sample(v):
    flat = np.asarray(v, dtype=np.float64).ravel()
    return flat[:: max(1, flat.size // SAMPLE_PIXELS)]


def apply_window(v, window):
    """clip((v - low) / (high - low), 0, 1) as float32."""
    lo, hi = window
    return np.clip((np.asarray(v, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def read(src, expand_palette=True, opts=None):
    """(float32 (H, W, C) in [0, 1], ImageInfo) of a medical source, or a 2-D source under a named window."""
    src = as_source(src)
    kind = _kind(src)
    if kind == "2d":
        if not expand_palette or opts is None or not opts.windows_2d():
            return _decode(src.path, expand_palette)
        raw, mode, alpha, rawmode, size = decode_raw(src.path)
        if raw.dtype in (np.uint8, np.bool_):  # 8-bit: display values, never windowed
            return _decode(src.path, expand_palette)
        v = stored_values(raw, rawmode).astype(np.float64)
        if not np.all(np.isfinite(v)):
            raise ImageError(src.path, "holds NaN or infinite values", "replace them")
        x = apply_window(v, opts.window or _fallback_window(src, opts))
        return x, ImageInfo(mode, x.shape[2], alpha, str(raw.dtype), size)
    v = _values(src, opts)
    if kind == "dicom" and not _dicom_header(src.path)["gray"]:  # colour DICOM: display values
        info = np.iinfo(v.dtype) if np.issubdtype(v.dtype, np.integer) else None
        x = (v.astype(np.float32) / np.float32(info.max)) if info else np.clip(v, 0, 1).astype(np.float32)
        return x, ImageInfo("DICOM RGB", 3, False, str(v.dtype), (v.shape[1], v.shape[0]))
    label = "DICOM " + _dicom_header(src.path)["photometric"] if kind == "dicom" else "NIfTI"
    if not expand_palette:  # a label map
        if np.any(v < 0) or np.any(v > 255) or np.any(v != np.round(v)):
            raise ImageError(src, "is not a label mask (labels must be integers 0..255)")
        x = (v / 255.0).astype(np.float32)
    else:
        x = apply_window(v, opts.window if opts is not None and opts.window is not None else _fallback_window(src, opts))
        if kind == "dicom" and _dicom_header(src.path)["photometric"] == "MONOCHROME1":
            x = 1.0 - x
    return np.ascontiguousarray(x[:, :, None]), ImageInfo(label, 1, False, "float64", (v.shape[1], v.shape[0]))


def _fallback_window(src, opts):
    """An unfitted read (one file alone): its own window, else its own percentiles."""
    own = _own_window(src)
    if own is not None:
        return own
    a, b = opts.mode[1:] if opts is not None and opts.mode[0] == "percentile" else AUTO_PERCENTILES
    lo, hi = (float(x) for x in np.percentile(_sample(_values(src, opts)), [a, b]))
    return (lo, hi if hi > lo else lo + 1.0)


def expand(files, opts=None, skip_empty=True):
    """Sources of files: one per 2-D file, per DICOM frame, per NIfTI slice (in range, constant ones skipped)."""
    out = []
    for f in files:
        src = as_source(f)
        kind = _kind(src)
        if kind == "nifti":
            vol = _nifti(src.path)
            axis = vol.axis(opts)
            n = vol.shape[axis]
            if n == 1:
                idx = [None]
            else:
                a, b = (opts.slice_range if opts is not None and opts.slice_range else (None, None))
                idx = list(range(n))[slice(a, b)]
                if not idx:
                    raise ImageError(src.path, f"has {n} slices along axis {axis}: none in --slice_range {a}:{b}")
            if skip_empty:
                keep = vol.nonconstant(axis)
                idx = [k for k in idx if keep[k or 0]]
                if not idx:
                    raise ImageError(src.path, "is an empty volume (every slice in range is constant)",
                                     "remove it or widen --slice_range")
            out += [Source(src.path, k) for k in idx]
        elif kind == "dicom" and _dicom_header(src.path)["frames"] > 1:
            arr = _dicom_pixels_cached(_key(src.path))
            idx = [k for k in range(arr.shape[0]) if not skip_empty or np.ptp(arr[k]) > 0]
            if not idx:
                raise ImageError(src.path, "is an empty multi-frame file (every frame is constant)")
            out += [Source(src.path, k) for k in idx]
        else:
            out.append(Source(src.path, src.index))
    return out


# ---------------------------------------------------------------------------------------------- groups


def group_of(src, opts=None):
    """The patient / study / volume a source belongs to (a string; patient IDs never leave memory)."""
    src = as_source(src)
    if opts is not None and opts.group_regex:
        m = re.search(opts.group_regex, src.path.name)
        if not m:
            raise ImageError(src.path, f"does not match --group_regex '{opts.group_regex}'",
                             "fix the pattern or rename the file")
        return "regex:" + (m.group(1) if m.groups() else m.group(0))
    if _kind(src) == "dicom":
        return _dicom_header(src.path)["group"] or f"file:{src.path}"
    return f"file:{src.path}"


def group_split(groups, labels, fraction, seed):
    """(train, val) index lists holding out about `fraction` of each class, whole groups only.

    Groups are visited in a seeded order; a group goes to validation while one of its classes is short
    of round(fraction * n_class) (at least 1) and every class keeps a training image. ValueError when a
    class cannot get a validation image that way (all of it is one patient)."""
    labels = list(labels)
    if fraction <= 0 or not labels:
        return list(range(len(labels))), []
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    count = Counter(labels)
    target = {c: max(1, int(round(fraction * n))) for c, n in count.items()}
    names = sorted(members)
    order = np.random.default_rng(seed).permutation(len(names))
    val_count, val = Counter(), []
    for j in order:
        idx = members[names[j]]
        have = Counter(labels[i] for i in idx)
        if any(val_count[c] < target[c] for c in have) and all(val_count[c] + n < count[c] for c, n in have.items()):
            val += idx
            val_count.update(have)
    short = [c for c in count if val_count[c] == 0]
    if short:
        raise ValueError(f"class {short[0]!r}: no whole patient / group can be held out for validation without "
                         f"leaving the class without training images ({len({groups[i] for i in range(len(labels)) if labels[i] == short[0]})} group(s))")
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def describe_data(sources, labels, class_names, opts):
    """Start-up summary lines: images, files / volumes, patients per class, and the window."""
    sources = [as_source(s) for s in sources]
    names = class_names or ["(all)"]
    labels = list(labels) if class_names else [0] * len(sources)
    lines = []
    for c, name in enumerate(names):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        files = {sources[i].path for i in idx}
        vols = {sources[i].path for i in idx if sources[i].index is not None}
        groups = {group_of(sources[i], opts) for i in idx}
        lines.append(f"class {name!r}: {len(idx)} images from {len(files)} files ({len(vols)} volumes / multi-frame), "
                     f"{len(groups)} patients / groups")
    lines.append(opts.describe() if opts is not None else ReadOptions().describe())
    lines += list(getattr(opts, "notes", []))
    return lines
