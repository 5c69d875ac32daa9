"""Medical data through ddpm/ and dit/ (issue 14): a DICOM class folder and a NIfTI folder train with an
intensity window, every checkpoint stores it, inference writes NIfTI in HU and DICOM without a training tag,
reruns write nothing new, and bad input is one line with nothing written.

    OMP_NUM_THREADS=1 python -m pytest tests/test_medical_ddpm_dit.py -q
DDPM runs in this process; DiT is driven as scripts from dit/ (as users do), so the two folders' modules
never meet in sys.modules. Tiny configs on CPU; every file is written here (tests/medical_files.py).
"""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import REPO, load_folder, run_main_expect, run_script, script_env
from medical_files import ct_volume, windowed, write_ct_series, write_nifti

dataset, train, inference, ddpm_uncond, medical = load_folder("ddpm", "dataset", "train", "inference", "ddpm",
                                                              "medical")

TINY = ["--image-size", "16", "--base-channels", "8", "--time-dim", "16", "--noise-steps", "20",
        "--sample-every", "0", "--log-every", "1"]
SAMPLE = ["--sampler", "ddim", "--sampling-steps", "2", "--num-samples", "3"]
PATIENTS = {"liver": ["LIVPAT01", "LIVPAT02"], "lung": ["LUNGPAT01", "LUNGPAT02"]}


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory):
    """Two class folders of CT-like DICOM series (slope 0.5, intercept -1024), two patients each, 3 slices."""
    root = tmp_path_factory.mktemp("ct_dicom")
    hu = {}
    for c, (cls, pids) in enumerate(PATIENTS.items()):
        for p, pid in enumerate(pids):
            hu[pid] = ct_volume(3, 16, seed=10 * c + p)
            write_ct_series(root / cls, hu[pid], pid, slope=0.5, intercept=-1024)
    return root, hu


@pytest.fixture(scope="module")
def nifti_data(tmp_path_factory):
    """A folder of two NIfTI volumes (RAS, 16 x 16 x 4 voxels, int16 HU): 8 axial slices."""
    root = tmp_path_factory.mktemp("ct_nifti")
    for k in range(2):
        write_nifti(root / f"case{k}.nii.gz", np.transpose(ct_volume(4, 16, seed=k), (2, 1, 0)))
    return root


def nifti_values(folder):
    """{file name: voxel values} of the .nii.gz files in folder (recursively)."""
    import nibabel as nib
    return {p.name: np.asarray(nib.load(str(p)).dataobj, dtype=np.float64) for p in sorted(folder.rglob("*.nii.gz"))}


def assert_in_window(values, low, high):
    """Every voxel of every file lies in [low, high], and the files are not all one value."""
    assert values
    every = np.concatenate([v.ravel() for v in values.values()])
    assert every.min() >= low - 1e-3 and every.max() <= high + 1e-3, (every.min(), every.max())
    assert every.max() - every.min() > 1


# ------------------------------------------------------------------ DDPM
def test_ddpm_dicom_class_folder_window_in_checkpoint_nifti_and_dicom_out(ct_data, tmp_path, capsys):
    root, hu = ct_data
    # the data set reads each slice in HU through the window (16 px: no resize), one Source per file
    ds = dataset.ImageFolderDataset(root, 16, opts=medical.ReadOptions("-160,240"))
    assert ds.class_names == ["liver", "lung"] and len(ds) == 12 and ds.channels == 1
    first = ds.files.index(next(s for s in ds.files if s.path.name == "LIVPAT02_slice_001.dcm"))
    np.testing.assert_allclose(((ds[first][0] + 1) / 2)[0].numpy(), windowed(hu["LIVPAT02"][1], -160, 240), atol=1e-6)

    work = tmp_path / "w"
    train.main(["--dataset-path", str(root), "--work-dir", str(work), "--epochs", "1", "--batch-size", "4",
                "--intensity-window", "-160,240", *TINY])  # "-160,240" after a space: a value, not an option
    run = work / "models" / "DDPM_conditional"
    state = torch.load(run / "train_state.pt", weights_only=True)
    cfg = json.loads((run / "config.json").read_text())
    for stored in (state["config"]["intensity"], cfg["intensity"], cfg["train"]["intensity"]):
        assert stored["window"] == [-160.0, 240.0] and stored["spec"] == "-160,240"
    log = (run / "log.txt").read_text()
    assert "class 'liver': 6 images from 6 files" in log and "2 patients / groups" in log
    assert "intensity window [-160, 240] (given)" in log

    out = tmp_path / "s"
    ckpt = ["--ckpt", str(run / "ema_ckpt.pt"), "--output-dir", str(out), *SAMPLE]
    inference.main([*ckpt, "--output-format", "nifti"])
    values = nifti_values(out)
    assert sorted(values) == ["liver_seed0.nii.gz", "liver_seed2.nii.gz", "lung_seed1.nii.gz"]
    assert all(v.shape == (16, 16, 1) for v in values.values())
    assert_in_window(values, -160, 240)
    import nibabel as nib
    header = nib.load(str(out / "lung_seed1.nii.gz")).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (-160.0, 240.0)
    assert b"class lung; seed 1" in bytes(header["descrip"])
    # never overwrite: a rerun writes nothing and leaves the files as they were
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    capsys.readouterr()
    inference.main([*ckpt, "--output-format", "nifti"])
    assert "sampled 0 new images (3 already there)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "settings.json"} == before

    # DICOM out: secondary capture, in the window's HU, and no byte of any training patient's identity
    import pydicom
    inference.main([*ckpt, "--output-format", "dicom"])
    dcm = sorted(out.glob("*.dcm"))
    assert [p.name for p in dcm] == ["liver_seed0.dcm", "liver_seed2.dcm", "lung_seed1.dcm"]
    for p in dcm:
        raw = p.read_bytes()
        for pid in sum(PATIENTS.values(), []):
            assert pid.encode() not in raw and f"Doe^{pid}".encode() not in raw
        d = pydicom.dcmread(str(p))
        assert d.PatientID == "SYNTHETIC" and list(d.ImageType) == ["DERIVED", "SECONDARY"]
        hu_out = d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
        assert hu_out.min() >= -160 - 1e-3 and hu_out.max() <= 240 + 1e-3
    assert len(list(out.glob("*.png"))) == 0  # the png path is untouched by other formats


def test_ddpm_nifti_folder_launch_preset_and_resume_keeps_the_window(nifti_data, tmp_path, capsys):
    work = tmp_path / "w"
    run = ddpm_uncond.launch(dataset_path=str(nifti_data), work_dir=str(work), image_size=16, epochs=1,
                             batch_size=4, base_channels=8, time_dim=16, noise_steps=20, sample_every=0,
                             log_every=1, device="cpu", intensity_window="abdomen")  # centre 50, width 400
    log = (run / "log.txt").read_text()
    assert "8 images from 2 files (2 volumes / multi-frame), 2 patients / groups" in log
    assert "intensity window [-150, 250] (preset abdomen)" in log
    # resume: another --intensity-window is refused (one line, nothing written); without it the stored one is used
    before = (run / "train_state.pt").read_bytes()
    err = run_main_expect(train.main, ["--dataset-path", str(nifti_data), "--work-dir", str(work), "--unconditional",
                                       "--resume", "--epochs", "2", "--intensity-window", "0,100"], capsys)
    assert "--resume: --intensity_window 0,100 differs from the run being resumed (abdomen = [-150, 250])" in err
    assert (run / "train_state.pt").read_bytes() == before
    train.main(["--dataset-path", str(nifti_data), "--work-dir", str(work), "--unconditional", "--resume",
                "--epochs", "2"])
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["intensity"]["window"] == [-150.0, 250.0]
    assert "intensity window [-150, 250] (preset abdomen)" in (run / "log.txt").read_text().split("resumed")[-1]
    out = tmp_path / "s"
    inference.main(["--ckpt", str(run / "train_state.pt"), "--use-ema", "--output-dir", str(out), *SAMPLE,
                    "--output-format", "nifti"])
    values = nifti_values(out)
    assert sorted(values) == ["sample_seed0.nii.gz", "sample_seed1.nii.gz", "sample_seed2.nii.gz"]
    assert_in_window(values, -150, 250)


def write_rgb_folder(root):
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), (40 * c, 90, 20 * i), np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def with_4d_nifti(tmp_path, ct_data):
    """The DICOM class folders plus a 4-D NIfTI (time series) in one of them."""
    data = tmp_path / "data"
    shutil.copytree(ct_data[0], data)
    write_nifti(data / "lung" / "perfusion.nii.gz", np.zeros((8, 8, 3, 2)) + np.arange(2))
    return data


# (id, data: "ct" | "4d" | "rgb", extra flags, what the one error line must contain)
BAD_TRAIN = [
    ("bogus-window", "ct", ["--intensity-window", "bogus"], ["--intensity_window", "unknown intensity window 'bogus'"]),
    ("reversed-window", "ct", ["--intensity-window", "240,-160"], ["unknown intensity window '240,-160'"]),
    ("4d-nifti", "4d", [], ["perfusion.nii.gz is a 4-D volume", "split it"]),
    ("empty-slice-range", "ct", ["--slice-range", "5:2"], ["--slice_range", "empty"]),
    ("percentiles-of-8bit", "rgb", ["--intensity-window", "p1,p99"], ["8-bit images are display values"]),
]


@pytest.mark.bad_input
@pytest.mark.parametrize("kind,extra,wanted", [c[1:] for c in BAD_TRAIN], ids=[c[0] for c in BAD_TRAIN])
def test_ddpm_bad_medical_input_is_one_line_and_writes_nothing(ct_data, tmp_path, capsys, kind, extra, wanted):
    data = {"ct": lambda: ct_data[0], "4d": lambda: with_4d_nifti(tmp_path, ct_data),
            "rgb": lambda: write_rgb_folder(tmp_path / "rgb")}[kind]()
    msg = run_main_expect(train.main, ["--dataset-path", str(data), "--work-dir", str(tmp_path / "w"), "--epochs",
                                       "1", "--batch-size", "2", *TINY, *extra], capsys)
    for w in wanted:
        assert w in msg, msg
    assert not (tmp_path / "w").exists()


@pytest.mark.bad_input
def test_ddpm_colour_model_refuses_nifti_before_sampling(tmp_path, capsys):
    data = write_rgb_folder(tmp_path / "rgb")
    train.main(["--dataset-path", str(data), "--work-dir", str(tmp_path / "w"), "--epochs", "1", "--batch-size",
                "4", *TINY[:-2]])
    ckpt = tmp_path / "w" / "models" / "DDPM_conditional" / "ckpt.pt"
    capsys.readouterr()
    msg = run_main_expect(inference.main, ["--ckpt", str(ckpt), "--output-dir", str(tmp_path / "s"), *SAMPLE,
                                           "--output-format", "nifti"], capsys)
    assert "--output_format nifti" in msg and "3-channel (colour)" in msg and "png, png16 or dicom" in msg
    assert not (tmp_path / "s").exists()
    # png16 writes png's file names: 16-bit colour files, and never mixed into a folder of 8-bit ones
    inference.main(["--ckpt", str(ckpt), "--output-dir", str(tmp_path / "s16"), *SAMPLE, "--output-format", "png16"])
    written = sorted((tmp_path / "s16").rglob("*.png"))
    assert len(written) == 3 and all(Image.open(f).mode == "RGB" and np.asarray(png_rows(f)).max() > 255
                                     for f in written[:1])
    capsys.readouterr()
    msg = run_main_expect(inference.main, ["--ckpt", str(ckpt), "--output-dir", str(tmp_path / "s16"), *SAMPLE],
                          capsys)
    assert "holds samples made with other settings (png_bits=16)" in msg


def png_rows(path):
    """The stored samples of a PNG (pypng keeps 16-bit colour, Pillow cuts it to 8 bits)."""
    import png
    w, h, rows, info = png.Reader(filename=str(path)).asDirect()
    return np.vstack([np.asarray(r) for r in rows])


# ------------------------------------------------------------------ DiT (scripts in dit/)
@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A random 1-channel AutoencoderKL (factor 4, 4 latent channels) saved as a folder for --vae."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def dit_train(data, results, vae, *extra):
    return ["train.py", "--model", "DiT-Ti/2", "--data-path", str(data), "--results-dir", str(results),
            "--image-size", "16", "--num-classes", "2", "--global-batch-size", "4", "--epochs", "1",
            "--max-train-steps", "2", "--vae", str(vae), "--num-workers", "0", "--log-every-steps", "1",
            "--sample-every-steps", "0", *extra]


def test_dit_dicom_class_folder_window_in_checkpoint_and_nifti_out(ct_data, tiny_vae, tmp_path):
    res = tmp_path / "res"
    proc = run_script("dit", dit_train(ct_data[0], res, tiny_vae, "--intensity-window", "-160,240"))
    assert "class 'lung': 6 images from 6 files" in proc.stdout and "2 patients / groups" in proc.stdout
    assert "intensity window [-160, 240] (given)" in proc.stdout
    ckpt = res / "000-DiT-Ti-2" / "checkpoints" / "0000002.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["config"]["intensity"]["window"] == [-160.0, 240.0] and state["config"]["grayscale"] is True
    sample = ["sample.py", "--ckpt", str(ckpt), "--output-dir", str(tmp_path / "s"), "--num-sampling-steps", "2",
              "--num-samples", "3", "--output-format", "nifti"]
    run_script("dit", sample)
    values = nifti_values(tmp_path / "s")
    assert sorted(values) == ["liver_seed0.nii.gz", "liver_seed2.nii.gz", "lung_seed1.nii.gz"]
    assert_in_window(values, -160, 240)
    files = sorted((tmp_path / "s").rglob("*"))
    assert not [p for p in files if p.suffix == ".png"]  # no grids / PNGs for nifti output
    before = {p: p.stat().st_mtime_ns for p in files if p.is_file()}
    proc = run_script("dit", sample)
    assert "3 of 3 images already exist" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in sorted((tmp_path / "s").rglob("*")) if p.is_file()} == before


@pytest.mark.bad_input
def test_dit_bad_medical_input_is_one_line_and_writes_nothing(ct_data, tiny_vae, tmp_path):
    res = tmp_path / "res"
    cases = [(ct_data[0], ["--intensity-window", "bogus"], "unknown intensity window 'bogus'"),
             (with_4d_nifti(tmp_path, ct_data), [], "perfusion.nii.gz is a 4-D volume")]
    for data, extra, wanted in cases:
        proc = run_script("dit", dit_train(data, res, tiny_vae, *extra), check=False)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.splitlines()[-1].startswith("error: ") and wanted in err.splitlines()[-1], err
        assert not res.exists()
    # a colour model asked for nifti: refused before anything is sampled or written
    check = ("import argparse, inference, runtime\n"
             "try:\n"
             "    inference.output_settings(argparse.Namespace(output_format='nifti'),\n"
             "                              {'grayscale': False, 'source': 'rgb.pt'}, {'image_channels': 3})\n"
             "except runtime.UserError as e:\n"
             "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO / "dit", env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert "--output_format nifti" in proc.stdout and "3-channel (colour)" in proc.stdout, proc.stdout + proc.stderr
