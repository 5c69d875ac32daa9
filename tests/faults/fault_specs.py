"""What the fault suite runs: the five training entry points, the four sampling scripts, and the bad-input
matrix of every script, written against each folder's flags and checkpoint formats.
"""
import re
from pathlib import Path

TINY_DDPM = ["--base-channels", "8", "--time-dim", "16", "--noise-steps", "20", "--log-every", "1"]
TINY_UNET = ["--unet_preset", "tiny", "--block_out_channels", "16", "32", "--norm_num_groups", "8",
             "--cross_attention_dim", "16", "--attention_head_dim", "2"]
DIT_RUN = "000-DiT-Ti-2"


class Trainer:
    """One training entry point: how to start it, resume it, find its resumable checkpoint, compare states."""

    def __init__(self, name, folder, make_args, resume, ckpt, keys, save_match, epochs, epochs_flag,
                 step_key="step", copy=None, files=()):
        self.name, self.folder, self.make_args, self.resume = name, folder, make_args, resume
        self.ckpt, self.keys, self.save_match, self.epochs = ckpt, keys, save_match, epochs
        self.epochs_flag, self.step_key, self.copy, self.files = epochs_flag, step_key, copy, files

    def args(self, a, out, epochs=None):
        return self.make_args(a, Path(out), str(epochs or self.epochs))

    def signature(self, out):
        """Changes whenever a new resumable checkpoint lands (inode/mtime for fixed names, the name for DiT)."""
        p = self.ckpt(Path(out))
        if p is None or not p.exists():
            return None
        st = p.stat()
        return (str(p), st.st_ino, st.st_mtime_ns, st.st_size)


def dit_latest(out):
    d = out / DIT_RUN / "checkpoints"
    files = sorted(p for p in d.glob("*.pt") if re.fullmatch(r"\d{7}\.pt", p.name)) if d.exists() else []
    return files[-1] if files else None


TRAINERS = {
    "ddpm": Trainer(
        "ddpm", "ddpm",
        # the shared vocabulary here; DDPM_TRAIN below keeps the spec's spellings (--dataset-path, --epochs)
        lambda a, out, e: ["ddpm_conditional_ddp.py", "--mode", "train_ddp", "--data_root", a["data"],
                           "--work_dir", out, "--image_size", "8", "--num_epochs", e, "--batch_size", "4",
                           "--ckpt_every_steps", "3", "--random_flip", "--ema_start", "1", "--ema_decay", "0.9",
                           "--lr_schedule", "cosine", "--warmup_steps", "2", "--sample_every_epochs", "0",
                           *TINY_DDPM],
        ["--resume"], lambda out: out / "models" / "DDPM_conditional" / "train_state.pt",
        ("model", "ema", "optimizer", "scaler", "lr_scheduler", "step", "epoch", "batch_in_epoch"),
        "train_state", 5, "--num_epochs",
        files=("models/DDPM_conditional/ckpt.pt", "models/DDPM_conditional/ema_ckpt.pt")),
    "ldm": Trainer(
        "ldm", "ldm",
        lambda a, out, e: ["train.py", "--data_root", a["data"], "--output_dir", out, "--vae", a["vae2"],
                           "--image_size", "16", "--batch_size", "4", "--num_epochs", e, "--learning_rate", "1e-3",
                           "--lr_warmup_steps", "2", "--val_split", "0", "--sample_every_epochs", "0",
                           "--log_every_steps", "1", "--ckpt_every_steps", "3", "--ema_decay", "0.9", "--seed", "0",
                           "--random_flip", *TINY_UNET],
        ["--resume"], lambda out: out / "checkpoint_last.pt",
        ("unet", "ema_unet", "class_embedder", "ema_class_embedder", "optimizer", "lr_scheduler", "step", "epoch",
         "position_in_epoch"),
        "checkpoint_last", 5, "--num_epochs"),
    "vae": Trainer(
        "vae", "ldm",
        lambda a, out, e: ["train_vae.py", "--data_root", a["data"], "--output_dir", out, "--image_size", "16",
                           "--preset", "tiny", "--block_out_channels", "8", "16", "--norm_num_groups", "8",
                           "--batch_size", "4", "--num_epochs", e, "--learning_rate", "1e-3", "--ckpt_every_steps",
                           "3", "--log_every_steps", "1", "--scale_images", "8", "--random_flip"],
        ["--resume"], lambda out: out / "checkpoint_last.pt",
        ("vae", "optimizer", "lr_scheduler", "step", "epoch", "position_in_epoch"),
        "checkpoint_last", 5, "--num_epochs", files=("diffusion_pytorch_model.safetensors",)),
    "controlnet": Trainer(
        "controlnet", "controlnet",
        lambda a, out, e: ["train.py", "--data_root", a["pairs"], "--ldm_checkpoint", a["ldm_for_cn"],
                           "--output_dir", out, "--batch_size", "4", "--num_epochs", e, "--learning_rate", "1e-3",
                           "--log_every_steps", "1", "--sample_steps", "0", "--val_fraction", "0",
                           "--ckpt_every_steps", "3", "--ema_decay", "0.9"],
        ["--resume"], lambda out: out / "checkpoint_last.pt",
        ("controlnet", "ema_controlnet", "encoder", "unet", "optimizer", "lr_scheduler", "global_step", "epoch",
         "step_in_epoch"),
        "checkpoint_last", 7, "--num_epochs", step_key="global_step"),
    "dit": Trainer(
        "dit", "dit",
        # the shared vocabulary here (a bare --resume means auto); DIT_TRAIN below keeps the spec's spellings
        lambda a, out, e: ["train.py", "--model", "DiT-Ti/2", "--data_root", a["data"], "--results_dir", out,
                           "--image_size", "16", "--num_classes", "3", "--global_batch_size", "4", "--num_epochs", e,
                           "--vae", a["vae4"], "--num_workers", "0", "--log_every_steps", "1",
                           "--ckpt_every_steps", "3", "--sample_every_steps", "0"],
        ["--resume"], dit_latest,
        ("model", "ema", "opt", "scaler", "step", "epoch", "batch_in_epoch"),
        "/checkpoints/.", 5, "--num_epochs"),
}


class Sampler:
    """One sampling script: its command for an output folder, and how many PNGs it must write."""

    def __init__(self, name, folder, make_args, count, ref):
        self.name, self.folder, self.make_args, self.count, self.ref = name, folder, make_args, count, ref


SAMPLERS = {
    "ddpm_sample_ddp": Sampler(
        "ddpm_sample_ddp", "ddpm",
        lambda a, out: ["ddpm_conditional_ddp.py", "--mode", "sample_ddp", "--ckpt", a["ddpm_ckpt"], "--use-ema",
                        "--num-samples", "16", "--batch-size", "1", "--output-dir", out, "--class-subfolders"],
        16, "ddpm"),
    "ldm_inference_per_class": Sampler(
        "ldm_inference_per_class", "ldm",
        lambda a, out: ["inference_per_class.py", "--checkpoint", a["ldm_ckpt"], "--output_dir", out,
                        "--total_samples", "12", "--batch_size", "1", "--num_inference_steps", "8"],
        12, "ldm"),
    "dit_sample_ddp": Sampler(
        "dit_sample_ddp", "dit",
        lambda a, out: ["sample_ddp.py", "--ckpt", a["dit_ckpt"], "--sample-dir", out, "--num-fid-samples", "12",
                        "--per-proc-batch-size", "1", "--num-sampling-steps", "8", "--class-subfolders"],
        12, "dit"),
    "controlnet_inference": Sampler(
        "controlnet_inference", "controlnet",
        lambda a, out: ["inference.py", "--checkpoint", a["cn_ckpt"], "--ldm_checkpoint", a["ldm_for_cn"],
                        "--mask_folder", a["masks6"], "--output_dir", out, "--num_images", "2",
                        "--num_inference_steps", "8", "--batch_size", "1"],
        12, "controlnet"),
}


# ------------------------------------------------------------------ bad-input matrix
# Each case: (id, script, args template, expectation, what the error line must name (any of), setup).
# Expectation: "error" (exit != 0, one `error:` line naming the file/flag, no traceback, output untouched),
# "ok" (accepted and converted: exit 0), "pickle" (refused, names --trust_checkpoint, the pickle never runs).
DDPM_TRAIN = ["ddpm_conditional_ddp.py", "--mode", "train_ddp", "--work-dir", "{out}", "--image-size", "8",
              "--epochs", "1", "--batch-size", "4", "--sample-every", "0", *TINY_DDPM]
DDPM_SAMPLE = ["ddpm_conditional_ddp.py", "--mode", "sample_ddp", "--num-samples", "2", "--output-dir", "{out}",
               "--sampling-steps", "2"]
LDM_TRAIN = ["train.py", "--output_dir", "{out}", "--vae", "{vae2}", "--image_size", "16", "--batch_size", "4",
             "--num_epochs", "1", "--max_train_steps", "1", "--val_split", "0", "--sample_every_epochs", "0",
             "--log_every_steps", "1", *TINY_UNET]
VAE_TRAIN = ["train_vae.py", "--output_dir", "{out}", "--image_size", "16", "--preset", "tiny",
             "--block_out_channels", "8", "16", "--norm_num_groups", "8", "--batch_size", "4", "--num_epochs", "1",
             "--max_train_steps", "1", "--scale_images", "2"]
LDM_INF = ["inference.py", "--output_dir", "{out}", "--num_samples", "1", "--num_inference_steps", "2"]
LDM_PER_CLASS = ["inference_per_class.py", "--output_dir", "{out}", "--total_samples", "3",
                 "--num_inference_steps", "2"]
CN_TRAIN = ["train.py", "--output_dir", "{out}", "--batch_size", "4", "--num_epochs", "1", "--max_train_steps", "1",
            "--sample_steps", "0", "--val_fraction", "0"]
CN_INF = ["inference.py", "--output_dir", "{out}", "--num_inference_steps", "2"]
DIT_TRAIN = ["train.py", "--model", "DiT-Ti/2", "--results-dir", "{out}", "--image-size", "16", "--num-classes",
             "3", "--global-batch-size", "4", "--epochs", "1", "--max-train-steps", "1", "--vae", "{vae4}",
             "--num-workers", "0", "--ckpt-every", "1", "--grid-every", "0"]
DIT_SAMPLE = ["sample.py", "--output-dir", "{out}", "--num-samples", "2", "--num-sampling-steps", "2"]
DIT_SAMPLE_DDP = ["sample_ddp.py", "--sample-dir", "{out}", "--num-fid-samples", "2", "--num-sampling-steps", "2"]
EVAL = ["precision_recall.py", "--real", "{data}", "--num_workers", "0", "--no_cache", "--json", "{out}/r.json"]
EVAL_FEAT = ["--feature_extractor", "{tinyfeat}", "--metrics", "fid,precision,recall"]


def data_cases(prefix, base, flag, names_empty_class=True):
    """The data-folder rows of the matrix for a class-folder trainer."""
    rows = [
        (f"{prefix}-empty-folder", base + [flag, "{empty}"], "error", ["{empty}"], None),
        (f"{prefix}-truncated-png", base + [flag, "{trunc}"], "error", ["truncated.png"], None),
        (f"{prefix}-text-named-png", base + [flag, "{textpng}"], "error", ["notes.png"], None),
        (f"{prefix}-16bit-gray-png", base + [flag, "{png16}"], "ok", [], None),
        (f"{prefix}-rgba-png", base + [flag, "{rgba}"], "ok", [], None),
        (f"{prefix}-mixed-sizes", base + [flag, "{mixed}"], "ok", [], None),
    ]
    if names_empty_class:
        rows.append((f"{prefix}-class-folder-without-images", base + [flag, "{emptyclass}"], "error",
                     ["class_9"], None))
    return rows


def ckpt_cases(prefix, base, flag, other, other_names, pickle_setup=None, text_setup=None, other_setup=None):
    """Not-a-checkpoint, another model's checkpoint and a pickle bomb passed to a checkpoint flag."""
    return [
        (f"{prefix}-not-a-checkpoint", base + ([flag, "{text}"] if not text_setup else []), "error",
         ["not_a_checkpoint.pt", "train_state.pt", "ckpt.pt"], text_setup),
        (f"{prefix}-other-model-checkpoint", base + ([flag, other] if not other_setup else []), "error",
         other_names, other_setup),
        (f"{prefix}-pickle-runs-code", base + ([flag, "{evil}"] if not pickle_setup else []), "pickle", [],
         pickle_setup),
    ]


def folder_cases(folder):
    """The matrix rows of one model folder (run by one driver process with cwd = that folder)."""
    c = []
    if folder == "ddpm":
        tr = DDPM_TRAIN + ["--dataset-path", "{data}", "--resume"]
        c += data_cases("ddpm-train", DDPM_TRAIN, "--dataset-path")
        c += ckpt_cases("ddpm-train-resume", tr, None, None, ["train_state.pt"],
                        pickle_setup="ddpm_state:evil", text_setup="ddpm_state:text", other_setup="ddpm_state:ldm")
        c.append(("ddpm-train-resume-other-size", tr + ["--image-size", "16"], "error", ["--image-size"],
                  "ddpm_state:ddpm"))
        c += ckpt_cases("ddpm-sample", DDPM_SAMPLE + ["--ckpt", "{cdir_ckpt}"], None, None,
                        ["ldm", "ckpt.pt"], pickle_setup="ddpm_cdir:evil", text_setup="ddpm_cdir:text",
                        other_setup="ddpm_cdir:ldm")
        c.append(("ddpm-sample-other-size-checkpoint", DDPM_SAMPLE + ["--ckpt", "{cdir_ckpt}"], "error", ["ckpt.pt"],
                  "ddpm_cdir:othersize"))
        c.append(("ddpm-train.py-resume-pickle-runs-code", ["train.py", *DDPM_TRAIN[3:], "--dataset-path", "{data}",
                                                                 "--resume"], "pickle", [], "ddpm_state:evil"))
        c.append(("ddpm-ddpm_conditional.py-resume-pickle-runs-code",
                  ["ddpm_conditional.py", "--dataset-path", "{data}", "--work-dir", "{out}", "--num-classes", "3",
                   "--resume"], "pickle", [], "ddpm_state:evil"))
        c.append(("ddpm-inference.py-pickle-runs-code", ["inference.py", "--ckpt", "{cdir_ckpt}", "--num-samples", "2",
                                                         "--output-dir", "{out}"], "pickle", [], "ddpm_cdir:evil"))
        c.append(("ddpm-sample-unknown-class", DDPM_SAMPLE + ["--ckpt", "{ddpm_ckpt}", "--class-labels", "zebra"],
                  "error", ["zebra"], None))
    elif folder == "ldm":
        c += data_cases("ldm-train", LDM_TRAIN, "--data_root")
        tr = LDM_TRAIN + ["--data_root", "{data}"]
        c += ckpt_cases("ldm-train-resume", tr, "--resume", "{ddpm_state}", ["train_state.pt", "ddpm"])
        c.append(("ldm-train-resume-other-size", tr + ["--resume", "{ldm_ckpt}", "--block_out_channels", "32", "64"],
                  "error", ["--resume"], None))
        c.append(("ldm-train-vae-folder-pickle-runs-code", tr + ["--vae", "{evil_vae}"], "vaepickle", ["--vae", "evil_vae"],
                  "evil_vae"))
        c += data_cases("ldm-train_vae", VAE_TRAIN, "--data_root")
        tv = VAE_TRAIN + ["--data_root", "{data}"]
        c += ckpt_cases("ldm-train_vae-resume", tv, "--resume", "{ldm_ckpt}", ["checkpoint_last.pt", "'ldm'"])
        c.append(("ldm-train_vae-resume-other-size", tv + ["--resume", "{vae_state}", "--block_out_channels", "16", "32",
                                                           "--norm_num_groups", "16"], "error", ["--resume"], None))
        inf = LDM_INF
        c += ckpt_cases("ldm-inference", inf, "--checkpoint", "{ddpm_state}", ["train_state.pt", "ddpm"])
        c.append(("ldm-inference-unknown-class", inf + ["--checkpoint", "{ldm_ckpt}", "--class_label", "zebra"],
                  "error", ["zebra"], None))
        c += ckpt_cases("ldm-inference_per_class", LDM_PER_CLASS, "--checkpoint", "{dit_ckpt}", ["dit", "0000"])
        c.append(("ldm-inference_per_class-unknown-class", LDM_PER_CLASS + ["--checkpoint", "{ldm_ckpt}", "--classes",
                                                                            "zebra"], "error", ["zebra"], None))
    elif folder == "controlnet":
        base = CN_TRAIN + ["--ldm_checkpoint", "{ldm_for_cn}", "--data_root"]
        c += [
            ("controlnet-train-empty-folder", base + ["{p_empty}"], "error", ["{p_empty}"], None),
            ("controlnet-train-truncated-png", base + ["{p_trunc}"], "error", ["truncated.png"], None),
            ("controlnet-train-text-named-png", base + ["{p_textpng}"], "error", ["notes.png"], None),
            ("controlnet-train-16bit-gray-png", base + ["{p_png16}"], "ok", [], None),
            ("controlnet-train-rgba-png", base + ["{p_rgba}"], "ok", [], None),
            ("controlnet-train-mixed-sizes", base + ["{p_mixed}"], "ok", [], None),
            ("controlnet-train-unmatched-masks", base + ["{p_unmatched}"], "error", ["lonely.png"], None),
        ]
        tr = CN_TRAIN + ["--data_root", "{pairs}"]
        c += ckpt_cases("controlnet-train-ldm_checkpoint", tr, "--ldm_checkpoint", "{ddpm_state}",
                        ["train_state.pt", "--ldm_checkpoint"])
        c += ckpt_cases("controlnet-train-resume", tr + ["--ldm_checkpoint", "{ldm_for_cn}"], "--resume", "{ldm_for_cn}",
                        ["--resume"])
        c.append(("controlnet-train-resume-other-ldm-size", tr + ["--ldm_checkpoint", "{ldm_big}", "--resume"], "error",
                  ["--ldm_checkpoint", "--resume", "checkpoint_last.pt"], "cn_resume"))
        inf = CN_INF + ["--ldm_checkpoint", "{ldm_for_cn}", "--mask_folder", "{masks}"]
        c += ckpt_cases("controlnet-inference-checkpoint", inf, "--checkpoint", "{ldm_for_cn}", ["--checkpoint"])
        c.append(("controlnet-inference-ldm_checkpoint-pickle-runs-code",
                  CN_INF + ["--checkpoint", "{cn_ckpt}", "--mask_folder", "{masks}", "--ldm_checkpoint", "{evil}"],
                  "pickle", [], None))
        c.append(("controlnet-inference-ldm_checkpoint-other-size",
                  CN_INF + ["--checkpoint", "{cn_ckpt}", "--mask_folder", "{masks}", "--ldm_checkpoint", "{ldm_big}"],
                  "error", ["--ldm_checkpoint", "ldm_big.pt"], None))
        inf2 = CN_INF + ["--checkpoint", "{cn_ckpt}", "--ldm_checkpoint", "{ldm_for_cn}"]
        c.append(("controlnet-inference-vae-folder-pickle-runs-code", inf2 + ["--mask_folder", "{masks}", "--vae",
                                                                              "{evil_vae}"], "vaepickle",
                  ["--vae", "evil_vae"], "evil_vae"))
        c += [
            ("controlnet-inference-unknown-class", inf2 + ["--mask_folder", "{masks}", "--class_label", "zebra"],
             "error", ["--class_label", "zebra"], None),
            ("controlnet-inference-empty-mask-folder", inf2 + ["--mask_folder", "{m_empty}"], "error", ["{m_empty}"], None),
            ("controlnet-inference-truncated-mask", inf2 + ["--mask_folder", "{m_trunc}"], "error", ["truncated.png"], None),
            ("controlnet-inference-text-named-mask", inf2 + ["--mask_folder", "{m_textpng}"], "error", ["notes.png"], None),
        ]
    elif folder == "dit":
        c += data_cases("dit-train", DIT_TRAIN, "--data-path")
        tr = DIT_TRAIN + ["--data-path", "{data}"]
        c += ckpt_cases("dit-train-resume", tr, "--resume", "{ldm_ckpt}", ["ldm", "checkpoint_last"])
        c.append(("dit-train-resume-other-size", tr + ["--resume", "{dit_ckpt_copy}", "--model", "DiT-Ti/4"], "error",
                  ["--model"], None))
        c.append(("dit-train-vae-folder-pickle-runs-code", [("{evil_vae}" if x == "{vae4}" else x) for x in tr], "vaepickle",
                  ["--vae", "evil_vae"], "evil_vae"))
        for script, base in (("sample", DIT_SAMPLE), ("sample_ddp", DIT_SAMPLE_DDP)):
            c += ckpt_cases(f"dit-{script}", base, "--ckpt", "{ldm_ckpt}", ["ldm"])
            c.append((f"dit-{script}-other-size", base + ["--ckpt", "{dit_ckpt}", "--model", "DiT-S/2"], "error",
                      ["--model"], None))
            c.append((f"dit-{script}-unknown-class", base + ["--ckpt", "{dit_ckpt}", "--class-labels", "zebra"],
                      "error", ["zebra"], None))
    elif folder == "evaluation":
        ev = EVAL + EVAL_FEAT + ["--gen"]
        c += [
            ("evaluation-empty-folder", ev + ["{empty}"], "error", ["{empty}"], None),
            ("evaluation-truncated-png", ev + ["{trunc}"], "error", ["truncated.png"], None),
            ("evaluation-text-named-png", ev + ["{textpng}"], "error", ["notes.png"], None),
            ("evaluation-16bit-gray-png", ev + ["{png16}"], "ok", [], None),
            ("evaluation-rgba-png", ev + ["{rgba}"], "ok", [], None),
            ("evaluation-mixed-sizes", ev + ["{mixed}"], "ok", [], None),
            ("evaluation-inception-weights-not-a-checkpoint", EVAL + ["--gen", "{data}", "--metrics", "fid",
                                                                        "--inception_weights", "{text}"],
             "error", ["not_a_checkpoint.pt"], None),
            ("evaluation-inception-weights-pickle-runs-code", EVAL + ["--gen", "{data}", "--metrics", "fid",
                                                                      "--inception_weights", "{evil}"],
             "pickle", [], None),
            ("evaluation-vgg-weights-pickle-runs-code", EVAL + ["--gen", "{data}", "--metrics", "precision",
                                                                "--vgg_weights", "{evil}"], "pickle", [], None),
        ]
    return [dict(id=i, folder=folder, script=a[0], args=a[1:], expect=e, names=n, setup=s) for i, a, e, n, s in c]


FOLDERS = ("ddpm", "ldm", "controlnet", "dit", "evaluation")
ALL_CASES = [case for f in FOLDERS for case in folder_cases(f)]
