"""Medical data in ldm/ and controlnet/ (issue 14): DICOM class folders and NIfTI volumes in, the window in
every checkpoint, NIfTI outputs in HU, patient-level splits, ControlNet slice pairing, bad inputs.

Every script runs as a subprocess with its folder as cwd (as users run them): the two folders' modules
(dataset.py, medical.py...) would collide in one process. Tiny random VAE / UNet, CPU, a few steps.

    OMP_NUM_THREADS=1 python -m pytest tests/test_medical_ldm_controlnet.py -q
"""
import json
import sys

import numpy as np
import pytest
import torch

from medical_files import ct_volume, write_ct_series, write_nifti
from repo_helpers import run_script

TINY_UNET = ["--unet_preset", "tiny", "--block_out_channels", "16", "32", "--norm_num_groups", "8",
             "--cross_attention_dim", "16", "--attention_head_dim", "2"]
WINDOW = (-160.0, 240.0)  # also the DICOM files' own window: centre 40, width 400
SIZE = 16


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def one_line_error(proc):
    """The single `error:` line of a refused run (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def snippet(folder, code):
    """Run python code in `folder` (its dataset.py, medical.py...) and return the JSON it prints last."""
    proc = run_script(folder, [sys.executable, "-c", code])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def axial(vol):
    """(slices, H, W) -> (H, W, slices): a volume whose canonical axial axis is the last one."""
    return np.ascontiguousarray(np.transpose(vol, (1, 2, 0)))


@pytest.fixture(scope="module")
def med(tmp_path_factory):
    """A DICOM class folder (2 classes x 3 patients x 4 slices), a NIfTI class folder, ControlNet volumes, a VAE."""
    from diffusers import AutoencoderKL
    root = tmp_path_factory.mktemp("med")
    for c, name in enumerate(("healthy", "lesion")):
        for p in range(3):
            write_ct_series(root / "dicom" / name, ct_volume(4, SIZE, seed=10 * c + p), patient_id=f"P{c}{p}")
        for v in range(2):
            (root / "nifti" / name).mkdir(parents=True, exist_ok=True)
            write_nifti(root / "nifti" / name / f"vol_{v}.nii.gz", axial(ct_volume(4, SIZE, seed=50 + 10 * c + v)))
    # ControlNet: image volumes and their label volumes (bone = 1); slice 0 of ct_000 is empty (constant air)
    for sub in ("images", "masks"):
        (root / "pairs" / sub).mkdir(parents=True)
    for k in range(3):
        hu = ct_volume(4, SIZE, seed=90 + k)
        if k == 0:
            hu[0] = -1000.0
        write_nifti(root / "pairs" / "images" / f"ct_{k:03d}.nii.gz", axial(hu))
        write_nifti(root / "pairs" / "masks" / f"ct_{k:03d}.nii.gz", axial((hu > 300).astype(np.int16)), dtype=np.uint8)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=SIZE)
    vae.save_pretrained(root / "vae")
    return root


def ldm_flags(data, vae, out, *extra):
    return ["train.py", "--data_root", str(data), "--output_dir", str(out), "--vae", str(vae), "--image_size",
            str(SIZE), "--batch_size", "4", "--num_epochs", "1", "--max_train_steps", "2", "--learning_rate", "1e-3",
            "--lr_warmup_steps", "0", "--sample_every_epochs", "0", "--log_every_steps", "1", "--seed", "0",
            *TINY_UNET, *extra]


@pytest.fixture(scope="module")
def nifti_ldm(med):
    """An LDM trained 2 steps on the NIfTI class folder with --intensity_window -160,240."""
    out = med / "ldm_nifti"
    proc = run_script("ldm", ldm_flags(med / "nifti", med / "vae", out, "--val_split", "0.25",
                                       "--intensity_window", "-160,240", "--cache_latents"))
    return out, proc


# ------------------------------------------------------------------------------------------------ LDM
def test_ldm_trains_from_a_dicom_class_folder(med):
    out = med / "ldm_dicom"
    proc = run_script("ldm", ldm_flags(med / "dicom", med / "vae", out, "--val_split", "0.34"))
    ck = load(out / "checkpoint_last.pt")
    assert ck["step"] == 2 and ck["image_channels"] == 1 and ck["class_names"] == ["healthy", "lesion"]
    intensity = ck["config"]["intensity"]
    assert intensity["window"] == list(WINDOW) and intensity["origin"].startswith("the files' own window")
    log = (out / "log.txt").read_text()
    # the start-up summary: images, files, patients per class, the window; whole patients held out (1 of 3)
    assert "class 'healthy': 12 images from 12 files (0 volumes / multi-frame), 3 patients / groups" in log
    assert "intensity window [-160, 240]" in log and "16 train / 8 val" in log, proc.stdout[-3000:]


def test_ldm_nifti_window_in_checkpoint_and_nifti_output_in_hu(med, nifti_ldm):
    import nibabel as nib
    out, proc = nifti_ldm
    ck = load(out / "checkpoint_last.pt")
    assert ck["config"]["intensity"]["window"] == list(WINDOW) and ck["config"]["intensity"]["spec"] == "-160,240"
    log = (out / "log.txt").read_text()
    assert "class 'lesion': 8 images from 2 files (2 volumes / multi-frame), 2 patients / groups" in log
    assert "8 train / 8 val" in log  # one whole volume (4 slices) per class held out
    gen = med / "gen"
    run_script("ldm", ["inference.py", "--checkpoint", str(out / "checkpoint_last.pt"), "--output_dir", str(gen),
                       "--num_samples", "2", "--num_inference_steps", "2", "--output_format", "nifti"])
    folder = gen / "checkpoint_last_ddim2_cfg3_seed42"
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"{c}_seed{42 + 1_000_000 * k + j}.nii.gz" for k, c in enumerate(["healthy", "lesion"])
                     for j in range(2)]
    for f in files:
        img = nib.load(folder / f)
        hu = np.asarray(img.dataobj, dtype=np.float64)
        assert hu.shape == (SIZE, SIZE, 1) and hu.min() >= WINDOW[0] - 1e-3 and hu.max() <= WINDOW[1] + 1e-3
        assert hu.max() - hu.min() > 1  # real images, not a constant
        assert (float(img.header["cal_min"]), float(img.header["cal_max"])) == WINDOW
        descrip = img.header["descrip"].tobytes().decode()
        assert "seed" in descrip and "vol_" not in descrip and ".nii" not in descrip  # no training file name
    # never overwrite: a rerun writes nothing
    before = {f: (folder / f).stat().st_mtime_ns for f in files}
    rerun = run_script("ldm", ["inference.py", "--checkpoint", str(out / "checkpoint_last.pt"), "--output_dir",
                               str(gen), "--num_samples", "2", "--num_inference_steps", "2", "--output_format", "nifti"])
    assert "4 of 4 images already exist" in rerun.stdout
    assert {f: (folder / f).stat().st_mtime_ns for f in files} == before


def test_ldm_group_split_and_latent_cache_key(med):
    """No patient / volume on both sides of the split for any seed; slices and window are in the cache key."""
    got = snippet("ldm", f"""
import json, medical, dataset
res = {{}}
for kind in ("dicom", "nifti"):
    opts = medical.ReadOptions()
    names, samples, _ = dataset.scan_class_folders({str(med)!r} + "/" + kind, opts)
    opts = dataset.fit_window(opts, samples)
    groups = dataset.groups_of(samples, opts)
    labels = [lbl for _, lbl in samples]
    splits = [dataset.split_train_val(labels, names, 0.34, seed, groups) for seed in range(6)]
    res[kind] = dict(n=len(samples), groups=len(set(groups)),
                     overlap=[len({{groups[i] for i in tr}} & {{groups[i] for i in va}}) for tr, va in splits],
                     val_classes=[sorted({{labels[i] for i in va}}) for _, va in splits],
                     val_sets=sorted({{tuple(va) for _, va in splits}}))
    if kind == "nifti":
        key = lambda w: dataset.cache_key(samples, {str(med)!r} + "/nifti", 16, False, "vae",
                                          dict(opts.to_config(), window=w))
        fp = dataset.data_fingerprint(samples, {str(med)!r} + "/nifti")
        res["keys_differ"] = key([-160.0, 240.0]) != key([-100.0, 200.0])
        res["indices"] = sorted({{row[1] for row in fp}})
print(json.dumps(res))
""")
    dicom, nifti = got["dicom"], got["nifti"]
    assert (dicom["n"], dicom["groups"]) == (24, 6) and (nifti["n"], nifti["groups"]) == (16, 4)
    for r in (dicom, nifti):
        assert r["overlap"] == [0] * 6  # no patient / volume on both sides
        assert all(v == [0, 1] for v in r["val_classes"])  # every class still validated
        assert len(r["val_sets"]) > 1  # the seed matters (not one fixed set)
    assert got["keys_differ"] and got["indices"] == [0, 1, 2, 3]


def test_ldm_reads_a_series_kept_in_patient_folders(tmp_path):
    """data_root/<class>/<patient>/*.dcm, the usual layout of DICOM exports: every slice found, one group each."""
    for c, name in enumerate(("healthy", "lesion")):
        for p in range(2):
            write_ct_series(tmp_path / name / f"P{c}{p}", ct_volume(3, SIZE, seed=c + 2 * p), patient_id=f"Q{c}{p}")
    got = snippet("ldm", f"""
import json, medical, dataset
opts = medical.ReadOptions()
names, samples, _ = dataset.scan_class_folders({str(tmp_path)!r}, opts)
print(json.dumps(dict(names=names, n=len(samples), groups=len(set(dataset.groups_of(samples, opts))))))
""")
    assert got == {"names": ["healthy", "lesion"], "n": 12, "groups": 4}


# ------------------------------------------------------------------------------------------ ControlNet
def test_controlnet_pairs_nifti_slices_and_splits_by_volume(med):
    got = snippet("controlnet", f"""
import json, medical, dataset
root = {str(med)!r} + "/pairs"
pairs, ui, um, dropped = dataset.pair_slices(root + "/images", root + "/masks", opts=medical.ReadOptions())
import numpy as np
from imaging import read_pixels
agree = all(np.array_equal(read_pixels(m, expand_palette=False)[..., 0] > 0,
                           read_pixels(im, opts=medical.ReadOptions("-160,240"))[..., 0] >= 1.0) for im, m in pairs)
groups = dataset.groups_of(pairs, medical.ReadOptions())
splits = [dataset.split_indices(len(pairs), 0.25, seed, groups) for seed in range(6)]
print(json.dumps(dict(pairs=[[im.name, m.name] for im, m in pairs], unpaired=len(ui) + len(um),
                      dropped=[m.name for m in dropped], agree=bool(agree), groups=len(set(groups)),
                      overlap=[len({{groups[i] for i in tr}} & {{groups[i] for i in va}}) for tr, va in splits],
                      val=[len(va) for _, va in splits])))
""")
    # slice k of an image volume with slice k of its mask volume; the empty image slice's mask is dropped
    expect = [[f"ct_{k:03d}.nii.gz[{i}]"] * 2 for k in range(3) for i in range(4) if (k, i) != (0, 0)]
    assert got["pairs"] == expect and got["unpaired"] == 0 and got["dropped"] == ["ct_000.nii.gz[0]"]
    assert got["agree"]  # the mask's label is where the image is bone (>= 240 HU): pixels aligned
    assert got["groups"] == 3 and got["overlap"] == [0] * 6 and all(v in (3, 4) for v in got["val"])


def test_controlnet_trains_on_nifti_pairs_with_the_ldm_window_and_writes_nifti(med, nifti_ldm):
    import nibabel as nib
    ldm_ck = nifti_ldm[0] / "checkpoint_last.pt"
    out = med / "cn"
    base = ["train.py", "--data_root", str(med / "pairs"), "--ldm_checkpoint", str(ldm_ck), "--batch_size", "2",
            "--num_epochs", "1", "--max_train_steps", "2", "--sample_steps", "0", "--log_every_steps", "1",
            "--val_fraction", "0.25"]
    # a window other than the LDM's is one line, nothing written
    bad = run_script("controlnet", base + ["--output_dir", str(med / "cn_bad"), "--intensity_window", "0,100"],
                     check=False)
    assert "differs from the window the LDM was trained with ([-160, 240]" in one_line_error(bad)
    assert not (med / "cn_bad").exists()
    run_script("controlnet", base + ["--output_dir", str(out)])
    ck = load(out / "checkpoint_last.pt")
    assert ck["global_step"] == 2 and ck["config"]["intensity"]["window"] == list(WINDOW)
    log = (out / "log.txt").read_text()
    assert "11 pairs (" in log and "3 patients / groups" in log and "intensity window [-160, 240]" in log
    assert "1 mask slice(s) left out because their image slice is empty" in log
    gen = run_script("controlnet", ["inference.py", "--checkpoint", str(out / "checkpoint_last.pt"),
                                    "--ldm_checkpoint", str(ldm_ck), "--mask", str(med / "pairs" / "masks" / "ct_001.nii.gz"),
                                    "--output_dir", str(med / "cn_gen"), "--num_inference_steps", "2",
                                    "--output_format", "nifti"])
    folder = next((med / "cn_gen").iterdir())
    files = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert files == [f"ct_001_{i:04d}_seed{42 + i}.nii.gz" for i in range(4)], gen.stdout
    for f in files:
        hu = np.asarray(nib.load(folder / f).dataobj, dtype=np.float64)
        assert hu.shape == (SIZE, SIZE, 1) and WINDOW[0] - 1e-3 <= hu.min() and hu.max() <= WINDOW[1] + 1e-3


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_medical_inputs_are_one_line_and_write_nothing(med, nifti_ldm, tmp_path):
    four_d = tmp_path / "four_d"
    write_ct_series(four_d / "a", ct_volume(2, SIZE), patient_id="P1")
    (four_d / "b").mkdir()
    write_nifti(four_d / "b" / "cine.nii.gz", np.zeros((SIZE, SIZE, 3, 2)) + np.arange(2))
    cases = [(four_d, [], ["cine.nii.gz", "4-D volume"]),
             (med / "dicom", ["--intensity_window", "bogus"], ["--intensity_window", "unknown intensity window 'bogus'"]),
             (med / "dicom", ["--slice_range", "9:3"], ["--slice_range", "START must be below END"])]
    for data, extra, wanted in cases:
        out = tmp_path / "never"
        err = one_line_error(run_script("ldm", ldm_flags(data, med / "vae", out, *extra), check=False))
        assert all(w in err for w in wanted), err
        assert not out.exists()
    # --resume keeps the stored window: another one is refused before anything is written
    out, _ = nifti_ldm
    before = (out / "checkpoint_last.pt").stat().st_mtime_ns
    err = one_line_error(run_script("ldm", ldm_flags(med / "nifti", med / "vae", out, "--val_split", "0.25",
                                                     "--intensity_window", "lung", "--resume"), check=False))
    assert "--resume: --intensity_window lung differs from the run being resumed (-160,240 = [-160, 240])" in err
    assert (out / "checkpoint_last.pt").stat().st_mtime_ns == before
