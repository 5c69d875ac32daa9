"""A web page and HTTP API for trained DDPM checkpoints (generate, interpolate; masks for mask2image models).

    cd ddpm
    python serve.py --checkpoint models/DDPM_conditional/ema_ckpt.pt            # http://127.0.0.1:7860
    python serve.py --checkpoint models/DDPM_conditional/ema_ckpt.pt models/DDPM_mask2image/ema_ckpt.pt \
        --port 8000 --auth user:secret --output_dir ./served

Every checkpoint named here is loaded once, with inference.py's loader (a bad one: one `error:` line, exit
2); requests pick one by key (GET /api/info lists them) and never name a file. The images are those
inference.py writes for the same settings, with the same names, made by the same functions (sampling.py):
API "seed" S, "num_images" N, "class" C = `inference.py --seed S --num-samples N --class-labels C`; for a
mask2image / superres / segmentation checkpoint the uploaded condition is the one file of `--condition
<sha>.png --samples-per-condition N` (sha: the first 12 hex digits of the upload's SHA-256, in the names).
Each response's images are also saved once under --output_dir/<tag>/, tag = the CLI's samples/ folder name.
serving.py (vendored) is the page, the validation, the queue and the limits; this file only adapts the DDPM.
"""
import tempfile
from argparse import Namespace
from pathlib import Path

import torch

import cond_inference
import conditional
import inference
import runtime as rt
import sampling
import serving
from runtime import UserError

UPLOAD_LABELS = {"mask2image": "Mask (PNG label map)", "superres": "Low-res image",
                 "segmentation": "Image to segment"}
UPLOAD_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif", "BMP": ".bmp"}


def build_parser():
    """Flags of `python serve.py`: the checkpoints and how to run them (inference.py's names), then the server's."""
    p = rt.FlagParser(description="Serve DDPM checkpoints: a web page and an HTTP API.")
    p.add_argument("--checkpoint", aliases=["ckpt"], nargs="+", required=True,
                   help="ckpt.pt, ema_ckpt.pt or train_state.pt of DDPM runs (one or more)")
    p.add_argument("--use_ema", action="store_true", help="the EMA weights (ema_ckpt.pt beside ckpt.pt, or the "
                                                          "'ema' entry of train_state.pt)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass (as inference.py's; the "
                                                             "same value gives pixel-identical images)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no", help="autocast while sampling")
    p.add_argument("--channels_last", action="store_true", help="channels_last memory format")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--trust_checkpoint", action="store_true", help="allow loading a pickled (non-plain) checkpoint")
    serving.add_serve_flags(p)
    return p


class DDPMBackend(serving.Backend):
    """One loaded DDPM checkpoint: what inference.py would write, per request."""

    def __init__(self, path, args, device, amp):
        model, self.cfg, self.wpath = inference.load_model(path, args.use_ema, args.trust_checkpoint)
        self.path, self.args, self.amp = str(path), args, amp
        self.task = inference.task_of(self.cfg)
        m, d = self.cfg["model"], self.cfg["diffusion"]
        self.names = list(self.cfg.get("class_names") or []) if m["num_classes"] else []
        self.k = int(self.cfg["train"].get("num_mask_classes", 2))
        self.noise_steps = d["noise_steps"]
        self.model = model.to(device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.diffusion = sampling.make_diffusion(self.cfg, device)
        self.ckpt_tag = inference.checkpoint_tag(path, self.wpath, args.use_ema)
        self.paired = self.task in conditional.PAIRED_TASKS

    def info(self):
        step = self.cfg.get("step")
        upload = {"label": UPLOAD_LABELS[self.task], "required": True} if self.paired else None
        rule = ("image j has seed + j: <class>_seed<seed + j>.png (inference.py --seed S --num-samples N "
                "--class-labels C)" if self.names else
                "image j has seed + j: sample_seed<seed + j>.png (inference.py --seed S --num-samples N)")
        if self.paired:
            rule = ("image j has seed + j: <upload sha>[_<class>]_seed<seed + j>.png (inference.py --condition "
                    "<sha>.png --seed S --samples-per-condition N)")
        out = {"title": f"DDPM {self.ckpt_tag} ({self.task}, {inference.describe(self.cfg)}"
                        + (f", step {step})" if step is not None else ")"),
               "classes": self.names, "samplers": ["ddim", "dpmsolver", "ddpm"], "default_sampler": "ddim",
               "default_steps": sampling.default_steps("ddim", self.noise_steps), "max_steps": self.noise_steps,
               "sampler_steps": {k: sampling.default_steps(k, self.noise_steps) for k in ("ddim", "dpmsolver", "ddpm")},
               "guidance": bool(self.names), "default_guidance": 3.0, "upload": upload,
               "interpolation": ["seeds", "classes"] if self.names and not self.paired else ["seeds"],
               "image_size": int(self.cfg["model"]["img_size"]), "channels": int(self.cfg["model"]["c_out"]),
               "seed_rule": rule}
        if self.paired:
            out["extra"] = {"cond_scale": {"type": "float", "default": 1.0, "min": 0.0, "max": serving.GUIDANCE_MAX,
                                           "label": "Condition guidance (cond_scale)"}}
        return out

    def settings(self, req, sampler):
        """sampling.Settings of a request (eta: the sampler's own, as inference.py without --eta)."""
        return sampling.Settings(sampler, req.steps, req.guidance, None, req.extra.get("cond_scale", 1.0),
                                 self.args.batch_size, self.amp, self.args.channels_last)

    def cli_args(self, req, n, sampler):
        """The inference.py flags this request stands for (cond_inference reads its settings from them)."""
        return Namespace(ckpt=self.path, use_ema=self.args.use_ema, output_dir=None, output_format="png",
                         sampler=sampler, sampling_steps=req.steps, eta=None, cfg_scale=req.guidance,
                         cond_scale=req.extra.get("cond_scale", 1.0), seed=req.seed, samples_per_condition=n,
                         batch_size=self.args.batch_size, class_label=req.class_name, class_labels_csv=None,
                         class_labels=None, report_dice=False, pair_layout=False, dice_threshold="otsu",
                         ground_truth=None, condition=None)

    def condition(self, req, ns):
        """The upload as cond_inference reads a --condition file: (inputs, class labels); its errors are 400s."""
        if req.upload_bytes is None:
            raise serving.BadRequest(f"this {self.task} model needs an upload ('condition'): "
                                     f"{UPLOAD_LABELS[self.task].lower()}")
        suffix = UPLOAD_SUFFIX.get(getattr(req.upload, "format", None) or "PNG", ".png")
        with tempfile.TemporaryDirectory(prefix="ddpm-serve-") as tmp:
            f = Path(tmp) / f"{req.upload_sha}{suffix}"  # our name: nothing from the client becomes a path
            f.write_bytes(req.upload_bytes)
            ns.condition = str(f)
            try:
                inputs, labels = cond_inference.single_condition(ns, self.cfg)
                enc = cond_inference.encoded(inputs, 0)
            except UserError as e:  # cond_inference names the file: say "the upload" (no server path in answers)
                msg = str(e)
                for said, meant in ((f"--condition {f}", "the upload"), (f"mask {f}", "the uploaded mask"),
                                    (f"condition {f}", "the uploaded condition"), (str(f), "the upload"),
                                    (str(tmp), "")):
                    msg = msg.replace(said, meant)
                raise serving.BadRequest(msg) from None
        return inputs, labels, enc

    def generate(self, req):
        s = self.settings(req, req.sampler)
        n, bs, seeds = req.num_images, self.args.batch_size, [req.seed + j for j in range(req.num_images)]
        outputs = []
        if self.paired:
            ns = self.cli_args(req, n, req.sampler)
            inputs, labels, enc = self.condition(req, ns)
            cls = f"_{req.class_name}" if req.class_name else ""
            out_dir, _ = cond_inference.output_folder(ns, self.task, Path(self.wpath), req.steps, cls)
            for b in range(0, n, bs):  # cond_inference.sample_jobs' batches of one condition's samples
                chunk = seeds[b:b + bs]
                x = sampling.sample_batch(self.diffusion, self.model, chunk, None if labels[0] is None else
                                          [labels[0]] * len(chunk), s, as_float=True,
                                          cond=torch.stack([enc] * len(chunk)).to(self.diffusion.device))
                outputs += [serving.Output(cond_inference.sample_name(req.upload_sha, cls, sd),
                                           sampling.png_image(img, self.task, self.k), sd, req.class_name)
                            for sd, img in zip(chunk, x.cpu())]
            return out_dir.name, outputs
        labels = [req.class_index] if self.names else None
        for b in range(0, n, bs):  # inference.sample's batches of image indices 0..N-1
            idx = list(range(b, min(b + bs, n)))
            x = sampling.sample_batch(self.diffusion, self.model, [seeds[i] for i in idx],
                                      None if labels is None else labels * len(idx), s,
                                      as_float=sampling.float_output(self.task))
            outputs += [serving.Output(inference.image_path(Path("."), i, req.seed, labels, self.names, False).name,
                                       sampling.png_image(img, self.task, self.k), seeds[i], req.class_name)
                        for i, img in zip(idx, x.cpu())]
        return inference.samples_tag(self.ckpt_tag, req.sampler, req.steps, req.guidance, req.seed), outputs

    def interpolate(self, req):
        s = self.settings(req, "ddim")
        cond, extra, classes = None, "", (req.class_index,)
        if self.paired:
            inputs, labels, cond = self.condition(req, self.cli_args(req, 1, "ddim"))
            extra, classes = f"{req.upload_sha}_cond{s.cond_scale:g}", (labels[0],)
        if req.mode == "seeds":
            seeds = (req.seed, req.seed_b)
        else:
            seeds, classes = (req.seed,), (req.class_index, req.class_b_index)
        frames = sampling.interpolation_frames(self.diffusion, self.model, req.mode, seeds, classes, s, req.frames,
                                               self.task, self.k,
                                               None if cond is None else cond.to(self.diffusion.device))
        names = [None if c is None else self.names[c] for c in classes]
        stem = sampling.interpolation_stem(req.mode, seeds, names, req.steps, req.guidance, req.frames, extra)
        return inference.interpolation_tag(self.ckpt_tag), serving.Animation(stem, frames, list(seeds),
                                                                             [c for c in names if c])


def serve(args):
    """Check the flags, load every checkpoint once, serve until Ctrl-C."""
    serving.need_web_packages()
    serving.check_serve_args(args)
    if args.batch_size < 1:
        raise UserError(f"--batch_size {args.batch_size} must be >= 1")
    device = rt.pick_device(args.device)
    amp = rt.autocast_dtype(rt.resolve_precision(args.mixed_precision, device))
    keys = serving.model_keys(args.checkpoint)
    backends = {}
    for key, path in zip(keys, args.checkpoint):
        backends[key] = DDPMBackend(path, args, device, amp)
        print(f"loaded {key}: {backends[key].wpath} ({backends[key].task}, {inference.describe(backends[key].cfg)})",
              flush=True)
    return serving.run(backends, args)


if __name__ == "__main__":
    rt.run_main(serve, build_parser().parse_args())
