"""What the image-conditioned tasks of the DDPM add: how masks and images become network inputs and targets.

    task          target (what is generated)      condition (what the UNet also sees)
    generate      image                           - (class label or nothing; today's DDPM)
    masks         label mask                      - (synthetic masks for synthetic image-mask pairs)
    mask2image    image                           label mask, one-hot (K channels)
    superres      high-res image                  low-res image upsampled back to the size (C + 1 channels)
    segmentation  label mask                      image (C + 1 channels)

Masks hold integer labels 0..K-1 (K = --num_mask_classes, 0 = background); with K = 2 any non-zero value is
foreground, so 0/255 masks work as stored. A mask as a diffusion target is a +-1 code: one channel (foreground)
for K = 2, else K one-hot channels; decode_mask inverts it (threshold 0 / argmax). An image condition carries an
extra "present" channel of ones, so the null condition of classifier-free guidance (all zeros: what condition
dropout trains) is never confused with a real image or with an all-background mask. Mask ablation (Konz et al.,
MICCAI 2024) removes labels present in a mask (they become background) so the model learns to fill in what an
incomplete mask leaves out. Used by train.py, paired.py and inference; nothing to run here.
"""
import numpy as np
import torch
import torch.nn.functional as F

import imaging
import models
from imaging import ImageError
from runtime import UserError

TASKS = ("generate", "masks", "mask2image", "superres", "segmentation")
PAIRED_TASKS = ("mask2image", "superres", "segmentation")
MASK_TARGET_TASKS = ("masks", "segmentation")
IMAGE_CONDITION_TASKS = ("superres", "segmentation")
SR_FILTERS = ("bicubic", "bilinear", "area")


def target_channels(task, num_mask_classes, image_channels):
    """Channels the UNet generates: the image's, or the mask code's (1 for binary masks, else K)."""
    if task in MASK_TARGET_TASKS:
        return 1 if num_mask_classes == 2 else num_mask_classes
    return image_channels


def cond_channels(task, num_mask_classes, image_channels):
    """Channels of the encoded condition (0 for unconditioned tasks)."""
    if task == "mask2image":
        return num_mask_classes
    if task in IMAGE_CONDITION_TASKS:
        return image_channels + 1
    return 0


def encode_target(task, target, num_mask_classes):
    """Training target in [-1, 1]: images as they are, label maps (N, 1, H, W) long as their +-1 code."""
    if task not in MASK_TARGET_TASKS:
        return target
    labels = target[:, 0].long()
    if num_mask_classes == 2:
        return (labels > 0).float()[:, None] * 2 - 1
    return F.one_hot(labels, num_mask_classes).permute(0, 3, 1, 2).float() * 2 - 1


def decode_mask(x, num_mask_classes):
    """A generated mask code (N, Ct, H, W) in [-1, 1] -> label map (N, H, W) long."""
    if num_mask_classes == 2:
        return (x[:, 0] > 0).long()
    return x.argmax(1)


def encode_condition(task, cond_raw, num_mask_classes):
    """The condition the UNet sees: a mask (N, 1, H, W) long as one-hot, an image [-1, 1] plus a ones channel."""
    if task == "mask2image":
        return F.one_hot(cond_raw[:, 0].long(), num_mask_classes).permute(0, 3, 1, 2).float()
    if task in IMAGE_CONDITION_TASKS:
        x = cond_raw.float()
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    raise ValueError(f"task {task!r} has no condition")


def ablate_masks(labels, p, generator=None):
    """Mask ablation: in each mask, every label > 0 that is present is set to background with probability p.

    labels (N, 1, H, W) long. The draws come from `generator` (one per image and possible label), so a
    training step is a pure function of its seed and resumes exactly. Labels absent from a mask stay absent."""
    if p <= 0:
        return labels
    n = labels.shape[0]
    k = int(labels.max()) + 1
    present = torch.zeros(n, k, dtype=torch.bool, device=labels.device)
    present.scatter_(1, labels.reshape(n, -1), True)
    drop = (torch.rand(n, k, generator=generator, device=labels.device) < p) & present
    drop[:, 0] = False
    removed = torch.gather(drop, 1, labels.reshape(n, -1)).reshape(labels.shape)
    return torch.where(removed, torch.zeros_like(labels), labels)


def lowres(x, factor, filt="bicubic"):
    """Downsample (…, C, H, W) in [-1, 1] by an integer factor with an antialiased filter (SR inputs)."""
    if filt not in SR_FILTERS:
        raise UserError(f"--sr_filter {filt!r} is unknown (use {', '.join(SR_FILTERS)})")
    batch = x if x.ndim == 4 else x[None]
    h, w = batch.shape[-2:]
    if h % factor or w % factor:
        raise UserError(f"--sr_factor {factor} does not divide the image size {h}x{w}")
    size = (h // factor, w // factor)
    kw = {} if filt == "area" else {"antialias": True, "align_corners": False}
    out = F.interpolate(batch.float(), size=size, mode=filt, **kw).clamp(-1, 1)
    return out if x.ndim == 4 else out[0]


def upsample(x_low, size):
    """Bicubic upsampling to size x size, clamped to [-1, 1]: the SR condition, and the baseline SR."""
    batch = x_low if x_low.ndim == 4 else x_low[None]
    if tuple(batch.shape[-2:]) == (size, size):
        out = batch.float()
    else:
        out = F.interpolate(batch.float(), size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    return out if x_low.ndim == 4 else out[0]


def degrade(x, factor, filt="bicubic"):
    """The SR condition made on the fly from a high-res image: down by `factor`, then bicubic back up."""
    return upsample(lowres(x, factor, filt), x.shape[-1])


def mask_png(label_map, num_mask_classes):
    """uint8 (H, W) to write a label map: 0/255 for binary masks, the labels themselves for K > 2."""
    a = label_map.cpu().numpy().astype(np.int64)
    return (np.where(a > 0, 255, 0) if num_mask_classes == 2 else a).astype(np.uint8)


def read_label_map(src, num_mask_classes, opts=None):
    """A mask file (or slice) -> its stored integer labels (1, H, W) long; binary masks: non-zero = 1.

    UserError naming the file for colour masks and labels >= num_mask_classes."""
    src = imaging.as_source(src)
    try:
        if imaging.is_medical(src):  # label volumes: integers 0..255, returned / 255
            arr = np.rint(imaging.read_pixels(src, expand_palette=False, opts=opts) * 255).astype(np.int64)
        else:
            arr = imaging.stored_values(*imaging.decode_raw(src.path, expand_palette=False)[::3]).astype(np.int64)
    except ImageError as e:
        raise UserError(f"mask {e}") from None
    if arr.shape[2] != 1:
        if not (arr == arr[:, :, :1]).all():
            raise UserError(f"mask {src} is a colour image; save label masks as 8- or 16-bit grayscale "
                            f"(or palette) images whose values are the labels 0..{num_mask_classes - 1}")
        arr = arr[:, :, :1]
    if arr.min() < 0:
        raise UserError(f"mask {src} has negative values; labels must be 0..{num_mask_classes - 1}")
    if num_mask_classes == 2:
        arr = (arr > 0).astype(np.int64)
    elif arr.max() >= num_mask_classes:
        if set(np.unique(arr).tolist()) <= {0, 255}:
            raise UserError(f"mask {src} has label 255 but --num_mask_classes is {num_mask_classes}: it looks like "
                            f"a binary 0/255 mask; pass --num_mask_classes 2 (any non-zero value = foreground)")
        raise UserError(f"mask {src} has label {int(arr.max())} but --num_mask_classes is {num_mask_classes}: "
                        f"labels must be 0..{num_mask_classes - 1} (0 = background); pass --num_mask_classes "
                        f"{int(arr.max()) + 1} or relabel the masks")
    return torch.from_numpy(arr[:, :, 0].copy())[None]


# ---------------------------------------------------------------- what train.py takes from here
def unet_config(cfg, channels, num_classes):
    """Constructor arguments of the UNet for this run (stored in config.json / train_state.pt).

    `channels` are the image channels; the UNet generates the task's target (conditional.target_channels)."""
    task, k = cfg.get("task", "generate"), cfg.get("num_mask_classes", 2)
    target = target_channels(task, k, channels)
    mcfg = {"c_in": target, "c_out": target, "img_size": cfg["image_size"], "time_dim": cfg["time_dim"],
            "base_channels": cfg["base_channels"], "num_classes": num_classes}
    if cond_channels(task, k, channels):
        mcfg.update(cond_channels=cond_channels(task, k, channels), cond_mode=cfg["cond_mode"])
    return mcfg


def add_task_args(p):
    """Flags of the image-conditioned tasks (conditional.py): mask -> image, super-resolution, segmentation."""
    add = p.add_argument
    add("--task", choices=list(TASKS), help="generate (default: class folders or --unconditional), masks, "
        "mask2image, superres, segmentation")
    add("--prediction_type", choices=list(models.PREDICTION_TYPES), help="what the UNet predicts: epsilon (default of "
        "--task generate) or v_prediction (default of the other tasks: stable x0 estimates at large t)")
    add("--cond_mode", choices=list(models.COND_MODES),
        help="how the UNet sees the condition: concat (default) or spade")
    add("--num_mask_classes", type=int, help="mask labels 0..K-1, 0 = background (default 2: any non-zero is "
        "foreground)")
    add("--cond_dropout", type=float, help="probability the condition is replaced by the null one, for guidance "
        "with --cond-scale at sampling (default 0.1)")
    add("--mask_ablation", type=float, help="mask2image: probability each label of a mask is removed (default 0)")
    add("--sr_factor", type=int, help="superres: downsampling factor of the low-res input (default 4)")
    add("--sr_filter", choices=list(SR_FILTERS), help="superres: antialiased filter making the low-res input "
        "(default bicubic)")
    add("--images_folder", help="paired tasks: images under --data-root (default images)")
    add("--masks_folder", help="paired tasks: masks under --data-root (default masks)")
    add("--lowres_folder", help="superres: read low-res inputs from this folder under --data-root instead of "
        "making them")
    add("--image_prefix", help="stem prefix of the images, e.g. Img_ (pairs Img_001 with seg_001)")
    add("--mask_prefix", help="stem prefix of the masks, e.g. seg_")
    add("--skip_unpaired", action="store_true", default=None, help="train on the pairs found, ignore unpaired files")
    add("--class_labels_csv", help="paired tasks and masks: 'stem,class_name' rows -> class-conditional too")


def check_task_settings(cfg):
    """Ranges and combinations of the task flags, each a one-line UserError naming the flag."""
    task, k = cfg["task"], cfg["num_mask_classes"]
    if not 2 <= k <= 256:
        raise UserError(f"--num-mask-classes {k} must be between 2 (binary) and 256 (labels 0..255)")
    if not 0.0 <= cfg["cond_dropout"] < 1.0:
        raise UserError(f"--cond-dropout {cfg['cond_dropout']} must be in [0, 1)")
    if not 0.0 <= cfg["mask_ablation"] <= 1.0:
        raise UserError(f"--mask-ablation {cfg['mask_ablation']} must be in [0, 1]")
    if cfg["mask_ablation"] and task != "mask2image":
        raise UserError(f"--mask-ablation applies to --task mask2image (this run is --task {task})")
    if task == "superres" and (cfg["sr_factor"] < 2 or cfg["image_size"] % cfg["sr_factor"]):
        raise UserError(f"--sr-factor {cfg['sr_factor']} must be >= 2 and divide --image-size {cfg['image_size']}")


def grid_images(cfg, imgs, items):
    """uint8 tiles of a sample grid and its columns: masks shown as gray levels, pairs as condition | sample | truth."""
    k, task = cfg["num_mask_classes"], cfg["task"]

    def show(x, is_mask):  # -> uint8 (N, C, H, W) with the image channels
        if not is_mask:
            return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        g = (x.float() * (255 // (k - 1))).round().clamp(0, 255).to(torch.uint8)
        return g.expand(-1, cfg["channels"], -1, -1)

    if task in MASK_TARGET_TASKS:
        imgs = show(decode_mask(imgs * 2 - 1, k)[:, None], True)
    if items is None:
        return imgs, min(cfg["num_classes"], 16) if cfg["conditional"] else None
    cond = show(torch.stack([it[1] for it in items]), task == "mask2image")
    truth = show(torch.stack([it[0] for it in items]), task in MASK_TARGET_TASKS)
    return torch.stack([cond, imgs.expand_as(cond), truth], 1).flatten(0, 1), 3


def describe_task(cfg):
    """The start-up line that says what a run learns: task, objective, condition mode and its settings."""
    task = cfg["task"]
    parts = [f"task {task}", f"predicts {cfg['prediction_type']}"]
    if cfg.get("snr_gamma"):
        parts.append(f"min-SNR-gamma {cfg['snr_gamma']:g} loss weights")
    if task in PAIRED_TASKS:
        parts += [f"condition by {cfg['cond_mode']}", f"condition dropout {cfg['cond_dropout']:g}"]
    if task == "superres":
        parts.append(f"x{cfg['sr_factor']} ({cfg['sr_filter']})")
    elif task != "generate":
        parts.append(f"{cfg['num_mask_classes']} mask labels")
    if cfg["mask_ablation"]:
        parts.append(f"mask ablation {cfg['mask_ablation']:g}")
    return ", ".join(parts)
