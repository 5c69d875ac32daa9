"""Benchmark part: DiT (our dit/ folder) training and sampling, vs diffusers' DiTTransformer2DModel.

    python benchmarks/part_dit.py --size paper --repeats 3 --device cpu --out dit.json --workdir /tmp/x

Per model size, side by side (alternating rounds, medians), in fp32 and bf16:
  ours/cached      our DiT train step on cached latents (posterior mean + std * fresh noise)
  diffusers/cached diffusers' DiTTransformer2DModel of the same size, same loss, optimizer and EMA
  ours/encode      the official recipe: the VAE encodes the batch at every step, then our step
                   (SD VAE architecture, random weights; only for the first, smallest model)
Sampling (first model): respaced DDPM vs DDIM, the same model forward with CFG, timed over a few steps and
scaled to 250 / 25 / 50 steps; plus the VAE decode of each image. In fp32 and, where bf16 is native (or
--bf16 all), in bf16 as sample.py --mixed-precision bf16 runs it (DiT and decode under autocast).
"""
import copy

from bench_common import (autocast, bf16_batch_repeats, bf16_native, bf16_plan, count_flops, entry, part_args,
                          say, setup_device, side_by_side, train_step, use_folder, write, median)

use_folder("dit")
import torch  # noqa: E402
from diffusers import AutoencoderKL, DiTTransformer2DModel  # noqa: E402

from dataset import encode_posterior  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from inference import sample_latents  # noqa: E402
from models import ALL_MODELS, model_config  # noqa: E402

# The Stable Diffusion VAE (stabilityai/sd-vae-ft-mse config.json); random weights cost the same.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(SD_VAE, block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=16)

SIZES = {
    # name, batch, latent side, classes; image side = latent * VAE factor
    "paper": dict(models=[("DiT-S/2", 8), ("DiT-B/2", 8)], latent=32, classes=1000, vae=SD_VAE,
                  emulated_bf16_batch=1, sample_steps=2, sample_batch=8),
    "small": dict(models=[("DiT-Ti/2", 2)], latent=8, classes=10, vae=TINY_VAE,
                  emulated_bf16_batch=1, sample_steps=2, sample_batch=2),
}


def diffusers_dit(name, latent, classes):
    """DiTTransformer2DModel with the architecture numbers of our registry entry `name`."""
    cfg = model_config(name)
    heads = cfg["num_heads"]
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=cfg["hidden_size"] // heads,
                                 in_channels=4, out_channels=8, num_layers=cfg["depth"], sample_size=latent,
                                 patch_size=cfg["patch_size"], num_embeds_ada_norm=classes)


class DiffusersAdapter(torch.nn.Module):
    """Calls the diffusers model with our DiT's (x, t, y) signature so both share training_losses."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, t, y):
        return self.net(x, timestep=t, class_labels=y).sample


def dit_step(model, batch, latent, classes, precision, device, vae=None, image=None):
    """One training step of `model`; with a VAE, the images are encoded inside the step (official recipe)."""
    diffusion = create_diffusion("")
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    std = (0.1 * torch.rand(batch, 4, latent, latent, generator=g)).to(device)
    images = (torch.rand(batch, 3, image, image, generator=g) * 2 - 1).to(device) if vae is not None else None
    y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def loss_fn():
        if vae is not None:
            m, s = encode_posterior(vae, images)  # no_grad inside; runs under the step's autocast
        else:
            m, s = mean, std
        z = (m + s * torch.randn(m.shape, device=device)) * 0.18215
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        return diffusion.training_losses(model, z, t, {"y": y})["loss"].mean()

    return train_step(model, loss_fn, precision, device)


def main():
    args = part_args(__doc__.splitlines()[0])
    device = setup_device(args.device)
    cfg = SIZES[args.size]
    native = bf16_native(device)
    lat, classes = cfg["latent"], cfg["classes"]
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg["vae"]).to(device).eval().requires_grad_(False)
    image = lat * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    rows, flops = [], {}
    plan = bf16_plan(args, device)
    for mi, (name, batch) in enumerate(cfg["models"]):
        eb, reps16 = bf16_batch_repeats(args, device, batch, cfg["emulated_bf16_batch"])
        # (precision, batch, rounds, variants). Emulated bf16 runs at a smaller batch, so fp32 is also
        # measured at that batch for a like-for-like ratio; 'reduced' keeps only what the targets need.
        full = ["ours/cached", "diffusers/cached"] + (["ours/encode"] if mi == 0 else [])
        groups = [("fp32", batch, args.repeats, full)]
        if plan == "full":
            groups.append(("bf16", eb, reps16, full))
        elif plan == "reduced" and mi == 0:
            groups.append(("bf16", eb, reps16, ["ours/cached", "diffusers/cached"]))
        if len(groups) > 1 and eb != batch:
            groups.append(("fp32", eb, args.repeats, ["ours/cached"]))
        for precision, b, reps, variants in groups:
            torch.manual_seed(0)
            ours = ALL_MODELS[name](input_size=lat, num_classes=classes).to(device).train()
            torch.manual_seed(0)
            theirs = DiffusersAdapter(diffusers_dit(name, lat, classes)).to(device).train()
            make = {"ours/cached": lambda: dit_step(ours, b, lat, classes, precision, device),
                    "diffusers/cached": lambda: dit_step(theirs, b, lat, classes, precision, device),
                    "ours/encode": lambda: dit_step(ours, b, lat, classes, precision, device, vae=vae, image=image)}
            fns = {v: make[v]() for v in variants}
            say(f"dit {name} {precision} batch {b}: {', '.join(fns)}")
            for variant, fn in fns.items():
                flops[(name, variant, precision, b)] = count_flops(fn) / b
            # The FLOP count warms the encode variant. Ours vs diffusers gets one more untimed step each
            # and at least 5 rounds: single steps of either model were 10-35% slow at random here
            # (page faults of the multi-GB activations), which flipped 3-round medians both ways.
            # The VAE-encode variant (~3 s/image) gets at most 2 rounds.
            if precision == "fp32":
                reps = max(reps, 5)
                for variant in fns:
                    if variant != "ours/encode":
                        fns[variant]()
            times = side_by_side(fns, reps, device, warmup=False, log=say, max_rounds={"ours/encode": 2})
            for variant, ts in times.items():
                rows.append(entry(f"{name} {variant}", b, ts, model=name, variant=variant, precision=precision,
                                  flops_per_image=flops[(name, variant, precision, b)],
                                  params=sum(p.numel() for p in (ours if variant.startswith("ours")
                                                                 else theirs).parameters())))
            del fns, make

    # Sampling: the model forward per step is the same for every sampler; time a few steps and scale.
    name, _ = cfg["models"][0]
    sb, k = cfg["sample_batch"], cfg["sample_steps"]
    torch.manual_seed(0)
    model = ALL_MODELS[name](input_size=lat, num_classes=classes).to(device).eval()
    labels, seeds = [i % classes for i in range(sb)], list(range(sb))
    spaced = create_diffusion(str(k))
    precisions = ["fp32"] + (["bf16"] if plan == "full" else [])  # emulated bf16 takes minutes per step
    fns = {(s, p): (lambda s=s, p=p: sample_latents(model, spaced, labels, seeds, 1.5, sampler=s, device=device,
                                                    precision="no" if p == "fp32" else p))
           for p in precisions for s in (("ddpm", "ddim") if p == "fp32" else ("ddim",))}
    z = torch.randn(1, 4, lat, lat, device=device)

    # sample.py keeps the VAE channels-last in bf16 (oneDNN's bf16 convolutions are faster so)
    vaes = {"fp32": vae, "bf16": copy.deepcopy(vae).to(memory_format=torch.channels_last)}

    def decode(p):
        with torch.no_grad(), autocast(p, device):
            return vaes[p].decode(z / 0.18215).sample.float()

    fns.update({("decode", p): (lambda p=p: decode(p)) for p in precisions})
    say(f"dit sampling {name} batch {sb}, {k} steps timed, {' and '.join(precisions)}")
    for (s, p), f in fns.items():  # fp32 is warm from training; bf16 builds new oneDNN primitives first
        if p != "fp32" or s == "decode":
            f()
    times = side_by_side({f"{s} {p}": f for (s, p), f in fns.items()}, min(args.repeats, 2), device, warmup=False,
                         log=say)
    sampling = []
    for p in precisions:
        dec = median(times[f"decode {p}"])
        for s, steps in (("ddpm", 250), ("ddim", 25), ("ddim", 50)):
            if f"{s} {p}" not in times:
                continue
            per_step = median(times[f"{s} {p}"]) / k
            sec = steps * per_step + sb * dec
            sampling.append({"name": f"{name} {s}-{steps}", "sampler": s, "steps": steps, "batch": sb, "precision": p,
                             "cfg_scale": 1.5, "seconds_per_step": per_step, "decode_s_per_image": dec,
                             "images_per_s": sb / sec, "latent_images_per_s": sb / (steps * per_step),
                             "timed_steps": k, "scaled": True, "times_s": times[f"{s} {p}"]})
    write(args.out, {"train": rows, "sampling": sampling, "bf16_native": native, "bf16_plan": plan, "image_size": image,
                     "latent": lat})


if __name__ == "__main__":
    main()
