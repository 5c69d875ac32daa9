"""Convert a DDPM trained with dome272/Diffusion-Models-pytorch (or its variant with `attn_threshold`)
into a run folder that this repository's inference.py and the spec's snippet load.

    cd ddpm
    python convert_checkpoint.py --src /old/models/DDPM_conditional --out-dir models/DDPM_conditional_converted
    python convert_checkpoint.py --src /old/ckpt.pt --ema /old/ema_ckpt.pt --image-size 64 \
        --class-names benign malignant normal --out-dir models/converted
    python inference.py --ckpt models/DDPM_conditional_converted/ema_ckpt.pt --num-samples 8

--src is that code's ckpt.pt / ema_ckpt.pt (a plain state dict), the variant's checkpoint.pt (its
model_state_dict and ema_state_dict are both taken), or its models/<run>/ folder (ckpt.pt, plus
ema_ckpt.pt when present). Writes <out-dir>/ckpt.pt, ema_ckpt.pt (when there are EMA weights) and
config.json, each atomically; nothing is overwritten unless --overwrite. The network becomes our
UNet with arch="dome272" (4 attention heads, GroupNorm(1, C), no time MLP, attention wherever the feature
map side is <= attn_threshold): the same function of (x, t, y). Weights are read with weights_only=True.
"""
import json
import re
from pathlib import Path

import torch

import runtime as rt
from models import ARCHS, CheckpointMismatch, attention_levels, infer_config, rebuild_model
from runtime import UserError
from utils import MODEL_TYPE

# Their module names -> ours (facts about the two layouts; the tensors themselves are unchanged, except
# that the class table gains our "no class" row).
RENAMES = [
    (r"\.double_conv\.", ".net."),          # DoubleConv's Sequential
    (r"^(down\d)\.maxpool_conv\.", r"\1.conv."),
    (r"\.emb_layer\.", ".emb."),            # Down / Up time projections
    (r"\.mha\.in_proj_weight$", ".qkv.weight"),
    (r"\.mha\.in_proj_bias$", ".qkv.bias"),
    (r"\.mha\.out_proj\.", ".proj."),
    (r"^(sa\d)\.ln\.", r"\1.norm."),
    (r"^(sa\d)\.ff_self\.", r"\1.ff."),
]
# Their Diffusion() defaults: the noise process their models were trained with unless edited.
THEIR_DIFFUSION = {"noise_steps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_prefixes(sd):
    """Drop DataParallel / DDP / torch.compile prefixes from every key."""
    out = {}
    for k, v in sd.items():
        while k.startswith(WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def check_their_layout(sd, where):
    """Raise UserError (one line) unless sd is a state dict of their UNet / UNet_conditional."""
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{where} is not a state dict (got {type(sd).__name__}{' (empty)' if sd == {} else ''})")
    if "model_type" in sd:
        raise UserError(f"{where} is a {sd['model_type']!r} checkpoint of this repository, not one of "
                        f"dome272/Diffusion-Models-pytorch: nothing to convert")
    if not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise UserError(f"{where} is not a state dict of tensors (keys {', '.join(map(str, list(sd)[:4]))})")
    if "inc.net.0.weight" in sd:
        raise UserError(f"{where} already has this repository's UNet layout: load it directly, nothing to convert")
    if "inc.double_conv.0.weight" not in sd or "outc.weight" not in sd:
        raise UserError(f"{where} is not a UNet state dict of dome272/Diffusion-Models-pytorch (expected keys "
                        f"inc.double_conv.*, sa1.mha.*, outc.*; its keys start with "
                        f"{', '.join(repr(k) for k in list(sd)[:3])})")


def convert_state_dict(sd, image_size=64, attn_threshold=None, where="the state dict"):
    """Their state dict -> (our state dict, our model config). Checks it loads strictly into our UNet."""
    sd = strip_prefixes(sd)
    check_their_layout(sd, where)
    out = {}
    for k, v in sd.items():
        new = k
        for pat, rep in RENAMES:
            new = re.sub(pat, rep, new)
        out[new] = v.detach().clone()
    if "label_emb.weight" in out:
        # Their "no class" is "add no label embedding" (y=None); ours is an extra learned row, so a zero
        # row at index num_classes gives exactly their unconditional prediction for guidance.
        w = out["label_emb.weight"]
        out["label_emb.weight"] = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])
    if "time_mlp.0.weight" in out:
        raise UserError(f"{where} mixes both layouts (it has a time MLP, which their UNet does not)")
    try:
        cfg = infer_config(out, image_size)  # widths from the tensors, attention levels from the sa* keys
    except CheckpointMismatch as e:
        raise UserError(f"{where}: {e} (--image-size {image_size})") from None
    if attn_threshold is not None:
        levels = attention_levels("dome272", int(attn_threshold), image_size)
        found = attention_levels(cfg["arch"], cfg["attn_threshold"], image_size)
        if levels != found:
            raise UserError(f"--attn-threshold {attn_threshold} at --image-size {image_size} puts attention at "
                            f"{', '.join(sorted(levels)) or 'no level'}, but {where} has it at "
                            f"{', '.join(sorted(found)) or 'no level'}")
    model = rebuild_model(cfg)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(out)), sorted(set(out) - set(own))
    shapes = [k for k in own if k in out and own[k].shape != out[k].shape]
    if missing or unexpected or shapes:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                 f"{shapes[0]} has shape {tuple(out[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        raise UserError(f"{where} does not have the layout of dome272's UNet ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected, {len(shapes)} mis-shaped tensors; first: {first}); "
                        f"only that code's UNet / UNet_conditional (and the attn_threshold variant) convert")
    try:
        model.load_state_dict(out, strict=True)
    except CheckpointMismatch as e:  # cannot happen after the checks above; keep the message one line
        raise UserError(f"{where}: {e}") from None
    return out, cfg


def read_sources(src, ema, trust):
    """(model state dict, EMA state dict or None, description) from --src / --ema."""
    src = Path(src)
    if src.is_dir():
        if not (src / "ckpt.pt").is_file():
            raise UserError(f"--src {src} is a folder without ckpt.pt (expected that code's models/<run>/)")
        if ema is None and (src / "ema_ckpt.pt").is_file():
            ema = src / "ema_ckpt.pt"
        src = src / "ckpt.pt"
    obj = rt.load_checkpoint(src, trust, trust_flag="--trust-checkpoint")
    ema_sd = None
    if isinstance(obj, dict) and "model_state_dict" in obj:  # the variant's checkpoint.pt
        ema_sd = obj.get("ema_state_dict")
        obj = obj["model_state_dict"]
    if ema is not None:
        ema_sd = rt.load_checkpoint(ema, trust, trust_flag="--trust-checkpoint")
        if isinstance(ema_sd, dict) and "ema_state_dict" in ema_sd:
            ema_sd = ema_sd["ema_state_dict"]
    return obj, ema_sd, src, ema


def convert(args):
    """Validate, convert, write <out-dir>/ckpt.pt, ema_ckpt.pt, config.json; returns the folder."""
    if args.image_size < 8 or args.image_size % 8:
        raise UserError(f"--image-size {args.image_size} must be a positive multiple of 8 (the UNet halves it 3 times)")
    out_dir = Path(args.out_dir)
    targets = [out_dir / n for n in ("ckpt.pt", "ema_ckpt.pt", "config.json")]
    if not args.overwrite and any(p.exists() for p in targets):
        raise UserError(f"{out_dir} already holds a checkpoint; choose another --out-dir or pass --overwrite")
    model_sd, ema_sd, src, ema_path = read_sources(args.src, args.ema, args.trust_checkpoint)
    sd, cfg = convert_state_dict(model_sd, args.image_size, args.attn_threshold, where=str(src))
    ema_out = None
    if ema_sd is not None:
        ema_out, ema_cfg = convert_state_dict(ema_sd, args.image_size, args.attn_threshold,
                                              where=str(ema_path or f"{src} (ema_state_dict)"))
        if ema_cfg != cfg:
            raise UserError(f"the EMA weights ({ema_path}) are of another architecture than {src}")
    n = cfg["num_classes"]
    if args.num_classes is not None and args.num_classes != (n or 0):
        raise UserError(f"--num-classes {args.num_classes} disagrees with {src}, which has {n or 0} classes")
    names = args.class_names or ([str(i) for i in range(n)] if n else [])
    if len(names) != (n or 0):
        raise UserError(f"--class-names gives {len(names)} names, but {src} has {n or 0} classes "
                        f"(label i is the i-th class folder in sorted order, as ImageFolder numbers them)")
    if len(set(names)) != len(names):
        raise UserError("--class-names has duplicates")
    diffusion = {"noise_steps": args.noise_steps, "schedule": "linear", "beta_start": args.beta_start,
                 "beta_end": args.beta_end}
    info = {"model_type": MODEL_TYPE, "model": cfg, "diffusion": diffusion, "class_names": names,
            "step": None, "epoch": None,
            "converted_from": {"code": "dome272/Diffusion-Models-pytorch", "src": str(Path(src).resolve()),
                               "ema": str(Path(ema_path).resolve()) if ema_path else None}}
    rt.check_writable(out_dir)
    rt.atomic_save(sd, out_dir / "ckpt.pt")
    if ema_out is not None:
        rt.atomic_save(ema_out, out_dir / "ema_ckpt.pt")
    rt.atomic_write_text(json.dumps(info, indent=2), out_dir / "config.json")
    # Read back exactly as inference.py and the spec's snippet do.
    rebuild_model(cfg).load_state_dict(torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True))
    call = (f"UNet_conditional(num_classes={n}, img_size={cfg['img_size']}, arch='dome272'" if n else
            f"UNet(img_size={cfg['img_size']}, arch='dome272'")
    call += (f", attn_threshold={cfg['attn_threshold']})" if cfg["attn_threshold"] is not None else ")")
    if cfg["c_in"] != 3 or cfg["c_out"] != 3:
        call = call[:-1] + f", c_in={cfg['c_in']}, c_out={cfg['c_out']})"
    levels = sorted(attention_levels("dome272", cfg["attn_threshold"], cfg["img_size"]))
    print(f"converted {src}{' and ' + str(ema_path) if ema_path else ''} -> {out_dir} "
          f"({'EMA weights in ema_ckpt.pt, ' if ema_out is not None else 'no EMA weights, '}"
          f"{n or 'no'} classes, attention at {', '.join(levels) or 'no level'})")
    print(f"load it with {call} or: python inference.py --ckpt {out_dir / 'ckpt.pt'}")
    return out_dir


def build_parser():
    """Flags of convert_checkpoint.py (both --dash-case and --snake_case spellings)."""
    p = rt.FlagParser(description="Convert a dome272/Diffusion-Models-pytorch DDPM checkpoint.")
    p.add_argument("--src", required=True, help="their ckpt.pt / ema_ckpt.pt / checkpoint.pt, or their models/<run>/")
    p.add_argument("--ema", help="their ema_ckpt.pt (found automatically beside ckpt.pt when --src is a folder)")
    p.add_argument("--out_dir", required=True, help="folder for ckpt.pt, ema_ckpt.pt and config.json")
    p.add_argument("--image_size", type=int, default=64, help="the size the model was trained at (default 64)")
    p.add_argument("--attn_threshold", type=int,
                   help=f"their attn_threshold (default: read from which attention blocks exist; "
                        f"{ARCHS['dome272']['attn_threshold']} in their code)")
    p.add_argument("--num_classes", type=int, help="optional check of the number of classes")
    p.add_argument("--class_names", nargs="+", help="names of labels 0..N-1 (default 0 1 2 ...)")
    p.add_argument("--noise_steps", type=int, default=THEIR_DIFFUSION["noise_steps"], help="their T (default 1000)")
    p.add_argument("--beta_start", type=float, default=THEIR_DIFFUSION["beta_start"], help="default 1e-4")
    p.add_argument("--beta_end", type=float, default=THEIR_DIFFUSION["beta_end"], help="default 0.02")
    p.add_argument("--overwrite", action="store_true", help="replace a converted checkpoint in --out-dir")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow loading a pickled (non-plain) file")
    return p


def main(argv=None):
    """CLI entry: parse flags, convert, turn input errors into one-line messages."""
    return rt.run_main(convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
