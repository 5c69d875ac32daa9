"""A web page and an HTTP API over DiT checkpoints: the images sample.py writes, with its names and seeds.

    cd dit && python serve.py --checkpoint ./results/000-DiT-B-2/checkpoints/0050000.pt   # http://127.0.0.1:7860
    python serve.py --checkpoint a.pt b.pt --port 8000 --auth user:secret --output_dir ./served

POST /api/generate {"class": "cat", "seed": 3, "num_images": 2, "guidance": 4, "sampler": "ddim", "steps": 50}
gives the images of `sample.py --ckpt CKPT --class-labels cat --seed 3 --num-samples 2 --cfg-scale 4
--sampler ddim --num-sampling-steps 50` (pixel for pixel with the same --batch-size; image j has seed 3 + j),
saved once as <output_dir>/<the CLI's settings folder>/cat_seed3.png (the CLI adds a class sub-folder).
Flow-matching checkpoints (train.py --objective flow) take "sampler": "heun" (their default), "euler" or "sde".
POST /api/interpolate is `sample.py --interpolate_seeds A B` / `--interpolate_classes A B`. Only the
checkpoints named here are served (loaded once, at start); serving.py holds the page, the checks, the queue.
"""
import argparse
import sys

import inference as inf
import serving
from runtime import FlagParser, UserError, run_main


def parse_args(argv=None):
    """serve.py flags: DiT's sampling vocabulary (sample.py's names) + the server's (serving.py)."""
    p = FlagParser(description="Serve DiT checkpoints: web page + HTTP API.")
    p.add_argument("--checkpoint", aliases=["ckpt"], nargs="+", required=True,
                   help="checkpoint(s) to serve (ours or official DiT files), each loaded once; the page picks one")
    p.add_argument("--vae", default=None,
                   help="ema | mse | <hub id> | <folder>; default: each checkpoint's training VAE")
    p.add_argument("--cfg-channels", choices=["auto", "3", "all"], default="auto",
                   help="eps channels CFG guides (as sample.py): auto = 3 for official weights, all for ours")
    p.add_argument("--guide-all-channels", action="store_true", help="same as --cfg-channels all")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per forward pass, as sample.py's --batch-size (the same value gives the same bits)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--mixed-precision", choices=["auto", "no", "fp16", "bf16"], default="no",
                   help="as sample.py's: bf16 / fp16 autocast for the DiT and the VAE decode (auto: where native)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow checkpoints that contain pickled Python objects (only files you trust)")
    serving.add_serve_flags(p)
    args = p.parse_args(argv)
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    serving.check_serve_args(args)  # a bad server flag is named before minutes of model loading
    return args


class DiTBackend(serving.Backend):
    """One DiT checkpoint (EMA weights, as sample.py samples them) behind the page and the API."""

    def __init__(self, path, args, device, precision):
        # sample.py's flags that are fixed for the server's life; the request sets cfg, sampler and steps.
        self.opts = argparse.Namespace(ckpt=path, model=None, image_size=None, num_classes=None, vae=args.vae,
                                       trust_checkpoint=args.trust_checkpoint, cfg_channels=args.cfg_channels,
                                       guide_all_channels=args.guide_all_channels, batch_size=args.batch_size,
                                       eta=0.0, output_format="png", sampler=None, num_sampling_steps=None)
        self.device, self.precision = device, precision
        self.model, self.vae, self.vinfo, self.meta = inf.load_for_sampling(self.opts, device, print, precision)
        self.guide_all = inf.guide_all(self.model, self.opts, self.meta)
        objective = self.meta["objective"]  # diffusion: ddpm / ddim; flow: heun / euler / sde
        self.samplers, self.interp_sampler = list(inf.SAMPLERS[objective]), inf.DETERMINISTIC[objective]

    def flags(self, req, sampler):
        """The request as sample.py's parsed flags (what settings_tag and the samplers read)."""
        return argparse.Namespace(**{**vars(self.opts), "cfg_scale": req.guidance, "sampler": sampler,
                                     "num_sampling_steps": req.steps})

    def info(self):
        m = self.meta
        step = f", step {m['step']}" if m.get("step") is not None else ""
        gray = m.get("grayscale") or self.vinfo["image_channels"] == 1
        return {"title": f"DiT {m['model']} {m['ckpt_tag']}{step} (EMA), {m['image_size']} px",
                "classes": list(m["class_names"]), "samplers": sorted(self.samplers),
                "default_sampler": self.interp_sampler, "interpolation_sampler": self.interp_sampler,
                "default_steps": inf.INTERP_STEPS, "max_steps": 1000,
                "guidance": bool(m["has_null"]),
                "default_guidance": 4.0 if m["has_null"] else 1.0, "upload": None,
                "interpolation": ["seeds", "classes"] if m["num_classes"] > 1 else ["seeds"],
                "image_size": m["image_size"], "channels": 1 if gray else self.vinfo["image_channels"],
                "seed_rule": "image j has seed + j (its own noise and sampling steps), as sample.py --seed"}

    def generate(self, req):
        a = self.flags(req, req.sampler)
        names = self.meta["class_names"]
        outputs = []
        jobs = inf.image_jobs([req.class_index], req.seed, req.num_images)
        for batch, z in inf.sample_batches(self.model, inf.make_sampler(a), jobs, a, self.device, self.precision,
                                           self.guide_all, progress=False):
            for (lab, seed), image in zip(batch, inf.render_png(self.vae, self.vinfo, z, self.meta)):
                # the CLI's own relative path: <class_name>/<class_name>_seed<S>.png under the settings folder
                outputs.append(serving.Output(inf.image_path("", names[lab], seed).as_posix(), image, seed,
                                              names[lab]))
        return inf.settings_tag(a, self.meta, self.vinfo, req.seed), outputs

    def interpolate(self, req):
        a = self.flags(req, self.interp_sampler)  # deterministic: DDIM, or the flow ODE (Heun)
        if req.mode == "seeds":
            seeds, labels = (req.seed, req.seed_b), (req.class_index,)
        else:
            seeds, labels = (req.seed,), (req.class_index, req.class_b_index)
        frames = inf.interpolation_frames(self.model, self.vae, self.vinfo, self.meta, req.mode, seeds, labels,
                                          req.frames, a, self.device, self.precision, self.guide_all)
        stem = inf.interpolation_stem(a, self.meta, req.mode, seeds, labels, req.frames)
        anim = serving.Animation(stem, frames, list(seeds), [self.meta["class_names"][lab] for lab in labels])
        return inf.interpolation_tag(a, self.meta, self.vinfo), anim


def main(args):
    """Load every checkpoint (a bad one stops with one line, exit 2), then serve until Ctrl-C."""
    serving.need_web_packages()
    device, precision = inf.resolve_device_precision(args.mixed_precision, args.device)
    keys = serving.model_keys(args.checkpoint)
    backends = {key: DiTBackend(path, args, device, precision) for key, path in zip(keys, args.checkpoint)}
    return serving.run(backends, args)


if __name__ == "__main__":
    run_main(lambda a: main(parse_args(a)), sys.argv[1:])
