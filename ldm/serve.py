"""Web page and HTTP API for LDM checkpoints: pick class, seed, images, guidance, sampler, steps; interpolate.

    cd ldm
    python serve.py --checkpoint ./ldm_checkpoints/checkpoint_best.pt          # http://127.0.0.1:7860
    python serve.py --checkpoint ./run_a/checkpoint_best.pt ./run_b/checkpoint_best.pt --port 8000 \
        --auth user:password --max_images 16 --output_dir ./served

Thin over the vendored serving.py (page, validation, limits, queue, auth, saving) and inference.py (the
sampling the CLI does). Every checkpoint named here is loaded once, at start, with inference.py's loader;
requests choose among them by key and never name a file. A request {"class": C, "seed": S,
"num_images": N, "guidance": G, "sampler": X, "steps": T} gives exactly the images of
`python inference.py --checkpoint CKPT --class_label C --seed S --num_samples N --cfg_scale G
--scheduler X --num_inference_steps T` (same batch size), saved once as
<output_dir>/<checkpoint>_<X><T>_cfg<G>_seed<S>[_raw]/<C>_seed<S + 1000000*c + j>.png; interpolations go to
<output_dir>/interpolation_<checkpoint>[_raw]/<stem>.png / .gif, as inference.py --interpolate_* writes them.
Needs the optional web packages: pip install fastapi uvicorn python-multipart.
"""
from pathlib import Path
from types import SimpleNamespace

import serving
from inference import (Generator, SEED_STRIDE, check_sampling_args, image_seed, interpolation_name, interpolation_tag,
                       sample_tag)
from models import SCHEDULERS
from runtime import FlagParser, run_main


def parse_args(argv=None):
    """The folder's inference vocabulary + the server's flags (serving.add_serve_flags)."""
    p = FlagParser(description="Serve LDM checkpoints as a web page and an HTTP API.")
    p.add_argument("--checkpoint", nargs="+", required=True, help="LDM checkpoint(s) to serve, loaded once at start")
    p.add_argument("--vae", default=None, help="override the VAE recorded in the checkpoints (hub id or folder)")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights even if EMA weights exist")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (as inference.py's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--mixed_precision", default="no", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--trust_checkpoint", action="store_true", help="allow loading pickled checkpoints")
    p.add_argument("--scheduler", default="ddim", choices=list(SCHEDULERS), help="the page's default sampler")
    p.add_argument("--num_inference_steps", type=int, default=50, help="the page's default steps")
    p.add_argument("--cfg_scale", type=float, default=3.0, help="the page's default guidance")
    serving.add_serve_flags(p)
    a = p.parse_args(argv)
    check_sampling_args(a)  # inference.py's range checks: the same flags, the same messages
    return a


class LDMBackend(serving.Backend):
    """One loaded checkpoint: generate() and interpolate() call the CLI's own Generator methods."""

    def __init__(self, gen, args):
        self.gen, self.args = gen, args
        c = gen.ckpt
        self.names = list(c["class_names"])
        self.max_steps = int(c["noise_scheduler_config"].get("num_train_timesteps", 1000))

    def info(self):
        a, c = self.args, self.gen.ckpt
        return {
            "title": f"LDM {Path(a.checkpoint).name}, step {c.get('step', '?')}, "
                     f"{'EMA' if self.gen.used_ema else 'raw'} weights",
            "classes": self.names, "samplers": list(SCHEDULERS), "default_sampler": a.scheduler,
            "default_steps": min(a.num_inference_steps, self.max_steps), "max_steps": self.max_steps,
            "guidance": True, "default_guidance": a.cfg_scale, "upload": None,
            "interpolation": ["seeds", "classes"] if len(self.names) > 1 else ["seeds"],
            "image_size": int(c["image_size"]), "channels": int(c["image_channels"]),
            "seed_rule": f"image j of class c has seed + {SEED_STRIDE} * c + j (c = the class's index)",
        }

    def generate(self, req):
        c = req.class_index
        seeds = [image_seed(req.seed, c, j) for j in range(req.num_images)]
        images = self.gen.images([c] * len(seeds), seeds, scheduler=req.sampler, steps=req.steps,
                                 cfg_scale=req.guidance)
        tag = sample_tag(self.args.checkpoint, req.sampler, req.steps, req.guidance, req.seed, self.args.no_ema,
                         self.gen.precision)
        name = self.names[c]
        return tag, [serving.Output(f"{name}_seed{s}.png", im, s, name) for s, im in zip(seeds, images)]

    def interpolate(self, req):
        if req.mode == "seeds":
            ca, cb, sa, sb = req.class_index, None, req.seed, req.seed_b
            seeds, labels = [sa, sb], [self.names[ca]]
        else:
            ca, cb, sa, sb = req.class_index, req.class_b_index, req.seed, None
            seeds, labels = [sa], [self.names[ca], self.names[cb]]
        frames = self.gen.interpolation(req.mode, ca, sa, cb, sb, req.frames, steps=req.steps, cfg_scale=req.guidance)
        stem = interpolation_name(req.mode, self.names, ca, cb, sa, sb, req.steps, req.guidance, req.frames)
        tag = interpolation_tag(self.args.checkpoint, self.args.no_ema, self.gen.precision)
        return tag, serving.Animation(stem, frames, seeds, labels)


def main(argv=None):
    """Check the flags, load every checkpoint (one-line error for a bad one), serve until Ctrl-C."""
    args = parse_args(argv)
    serving.need_web_packages()
    serving.check_serve_args(args)
    gens = []
    for path in args.checkpoint:  # all of them checked before any is moved to the device
        one = SimpleNamespace(**{**vars(args), "checkpoint": path, "output_format": "png"})
        gens.append((Generator(one), one))
    backends = {}
    for key, (gen, one) in zip(serving.model_keys(args.checkpoint), gens):
        gen.setup()
        backends[key] = LDMBackend(gen, one)
    return serving.run(backends, args)


if __name__ == "__main__":
    run_main(main)
