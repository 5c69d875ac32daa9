"""Web page and HTTP API for trained ControlNets: upload a mask, get the images inference.py would write.

    cd controlnet && python serve.py --checkpoint ./controlnet_checkpoints/checkpoint_best.pt \
        --ldm_checkpoint ../ldm/ldm_checkpoints/checkpoint_best.pt            # http://127.0.0.1:7860

Every checkpoint named at start is loaded once (inference.open_model, the CLI's loader); a request picks one
by key and never names a file. The uploaded mask (multipart field "condition") is read exactly as
`inference.py --mask FILE` reads a file: its bytes go to a temporary file named <sha>.<ext> and through the
same reader, so for the same mask, seed and settings the API's PNGs equal the CLI's pixel for pixel, under the
same names with the upload's sha256 (12 hex) in place of the mask's file stem. API "seed" + "num_images" +
"class" + "guidance" + "sampler" + "steps" + "controlnet_scale" = CLI --seed --num_images --class_label
--cfg_scale --scheduler --num_inference_steps --controlnet_scale. The page, queue, limits and auth are
serving.py's (vendored); the flags are listed in README.md ("Web UI and HTTP API").
"""
import tempfile
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

import inference
import serving
from dataset import ONE_CHANNEL_MODES, THREE_CHANNEL_MODES, load_mask, verify_file
from models import SCHEDULERS, UserError
from runtime import FlagParser, run_main

UPLOAD_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}
SCALE_MAX = 5.0


def parse_args(argv=None):
    """Command line -> argparse.Namespace (inference.py's model flags + serving's server flags)."""
    p = FlagParser(description="Serve trained ControlNets: a web page and an HTTP API (mask upload).")
    p.add_argument("--checkpoint", nargs="+", required=True, help="ControlNet checkpoint(s), each loaded once")
    p.add_argument("--ldm_checkpoint", nargs="+", required=True,
                   help="the LDM checkpoint the ControlNet(s) were trained from: one for all, or one per --checkpoint")
    p.add_argument("--vae", default=None, help="override the VAE folder recorded in the LDM checkpoint")
    p.add_argument("--no_ema", action="store_true", help="use the raw ControlNet weights instead of the EMA")
    p.add_argument("--mixed_precision", default="no", choices=("auto", "no", "fp16", "bf16"),
                   help="autocast for sampling")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (as inference.py's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow checkpoints that hold pickled objects")
    serving.add_serve_flags(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch_size is out of range: {args.batch_size}")
    if len(args.ldm_checkpoint) not in (1, len(args.checkpoint)):
        raise UserError(f"--ldm_checkpoint: give one LDM for all, or one per --checkpoint "
                        f"({len(args.ldm_checkpoint)} for {len(args.checkpoint)})")
    return args


class ControlNetBackend(serving.Backend):
    """One ControlNet checkpoint (+ its LDM), loaded at start; generate / interpolate through inference.py."""

    def __init__(self, checkpoint, ldm_checkpoint, args):
        # the CLI flags that do not change per request; a request adds the rest (request_args)
        self.base = dict(checkpoint=checkpoint, ldm_checkpoint=ldm_checkpoint, vae=args.vae, no_ema=args.no_ema,
                         mixed_precision=args.mixed_precision, batch_size=args.batch_size,
                         trust_checkpoint=args.trust_checkpoint, slice_axis=None, slice_range=None,
                         class_labels_csv=None)
        self.s = inference.open_model(SimpleNamespace(**self.base), args.device)

    def info(self):
        s = self.s
        kind = "PNG label map, 1 channel" if s.mc == 1 else "RGB PNG"
        return {"title": f"ControlNet {Path(self.base['checkpoint']).name}, step {s.step} "
                         f"({'raw' if self.base['no_ema'] else 'EMA'}), LDM {Path(self.base['ldm_checkpoint']).name}",
                "classes": list(s.class_names) if s.conditional else [],
                "samplers": list(SCHEDULERS), "default_sampler": "ddim", "default_steps": 50,
                "max_steps": int(s.ldm.noise_scheduler_config["num_train_timesteps"]),
                "guidance": s.conditional, "default_guidance": 1.0,
                "upload": {"label": f"Mask ({kind})", "required": True},
                "interpolation": ["seeds", "classes"] if s.conditional else ["seeds"],
                "image_size": s.size, "channels": s.ldm.image_channels,
                "seed_rule": "image j has seed + j (file <mask sha>[_<class>]_seed<seed + j>.png, as inference.py)",
                "extra": {"controlnet_scale": {"type": "float", "default": 1.0, "min": 0.0, "max": SCALE_MAX,
                                               "label": "ControlNet scale (mask influence, 0: ignore the mask)"}}}

    def request_args(self, req, **kw):
        """The request as inference.py's flags (what the CLI would be called with)."""
        return SimpleNamespace(**self.base, scheduler=req.sampler, num_inference_steps=req.steps,
                               controlnet_scale=float(req.extra["controlnet_scale"]),
                               cfg_scale=float(req.guidance) if self.s.conditional else 1.0, seed=req.seed,
                               class_label=req.class_name if self.s.conditional else None, **kw)

    def mask(self, req):
        """The upload -> mask tensor (C, H, W) through the CLI's file reader; BadRequest for a bad mask."""
        s = self.s
        with tempfile.TemporaryDirectory(prefix="controlnet-serve-") as tmp:
            path = Path(tmp) / f"{req.upload_sha}{UPLOAD_SUFFIX.get(req.upload.format, '.png')}"
            path.write_bytes(req.upload_bytes)
            try:
                mode = verify_file(path, "mask", s.opts)
                ch = 1 if mode in ONE_CHANNEL_MODES else 3 if mode in THREE_CHANNEL_MODES else None
                if ch != s.mc:
                    want = "a grayscale label map (1 channel)" if s.mc == 1 else "an RGB image (3 channels)"
                    got = f"{ch} channel(s) (mode {mode})" if ch else f"the unsupported image mode {mode}"
                    raise serving.BadRequest(f"the uploaded mask has {got}; this ControlNet takes {want}")
                masks = inference.read_masks([path], s.opts, s.mc)
                return load_mask(masks[0], s.mc, s.size, s.opts)
            except UserError as e:  # the reader's one line, without the server's temporary path
                text = str(e).replace(f"mask {path}", "the uploaded mask").replace(str(path), "the uploaded mask")
                raise serving.BadRequest(text) from None

    def generate(self, req):
        a = self.request_args(req, num_images=req.num_images)
        mask = self.mask(req)
        per_mask = [req.class_index if self.s.conditional else None]
        jobs = inference.plan_jobs([req.upload_sha], per_mask, self.s.class_names, a.seed, a.num_images)
        outs = [serving.Output(name, Image.fromarray(inference.to_uint8(img)), seed, a.class_label)
                for (_, seed, name), img, _ in inference.sample_jobs(self.s, a, jobs, per_mask, lambda mi: mask)]
        return inference.output_tag(a, self.s), outs

    def interpolate(self, req):
        seeds = req.mode == "seeds"
        a = self.request_args(req, interp_frames=req.frames,
                              interpolate_seeds=(req.seed, req.seed_b) if seeds else None,
                              interpolate_classes=None if seeds else (req.class_name, req.class_b))
        if not seeds:
            a.class_label = None
        mask = self.mask(req)
        plan = inference.plan_interpolation(a, self.s, req.upload_sha)
        frames = inference.interpolation_frames(self.s, a, plan, mask)
        return plan.tag, serving.Animation(plan.stem, frames, list(plan.seeds),
                                           [self.s.class_names[c] for c in plan.classes])


def serve(args):
    """Load every checkpoint (a bad one: one error line, exit 2), then serve until Ctrl-C."""
    serving.need_web_packages()
    serving.check_serve_args(args)
    ldms = args.ldm_checkpoint * len(args.checkpoint) if len(args.ldm_checkpoint) == 1 else args.ldm_checkpoint
    backends = {}
    for key, ck, ldm in zip(serving.model_keys(args.checkpoint), args.checkpoint, ldms):
        backends[key] = ControlNetBackend(ck, ldm, args)
        print(f"loaded {key}: {backends[key].info()['title']}", flush=True)
    return serving.run(backends, args)


def main(argv=None):
    """Entry point: UserError -> one `error:` line and exit 2 (runtime.run_main)."""
    return run_main(lambda: serve(parse_args(argv)))


if __name__ == "__main__":
    main()
