"""Benchmark part: the latent diffusion model (our ldm/ folder): training with cached latents vs encoding
every step, fp32 vs bf16, and sampling with DDIM / DPM-Solver++ vs DDPM.

    python benchmarks/part_ldm.py --size paper --repeats 3 --device cpu --out ldm.json --workdir /tmp/x

Paper size: diffusers UNet2DConditionModel (64,128,256,256) on 32x32x4 latents (256px images through the
SD VAE architecture with random weights), 10 classes, batch 8. The loss is ldm/train.py's
`diffusion_loss` (a fresh posterior sample every step); `cached` feeds stored posterior mean/std,
`encode` runs the VAE encoder on the batch first, as training without --cache_latents does.
Sampling (CFG 3): each sampler timed over a few steps and scaled, plus the VAE decode per image; in fp32 and,
where bf16 is native (or --bf16 all), in bf16 as inference.py --mixed_precision bf16 runs it (UNet and decode
under autocast). `cached, 2 heads` trains the same UNet with 2 attention heads instead of 8 (head width 32
instead of 8 at the first level): a model change, measured only to show what it would buy.
"""
import copy

from bench_common import (autocast, bf16_batch_repeats, bf16_native, bf16_plan, count_flops, entry, median,
                          part_args, say, setup_device, side_by_side, train_step, use_folder, write)

use_folder("ldm")
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler  # noqa: E402

from models import (DEFAULT_NOISE_SCHEDULE, ClassEmbedder, Denoiser, build_unet, make_sampler,  # noqa: E402
                    sample_latents, vae_posterior)
from train import diffusion_loss, draw_noise  # noqa: E402

SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
              block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, act_fn="silu", sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(SD_VAE, block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, sample_size=16)
SIZES = {
    "paper": dict(unet=dict(block_out_channels=[64, 128, 256, 256], layers_per_block=2, cross_attention_dim=256,
                            attention_head_dim=8, norm_num_groups=32),
                  latent=32, vae=SD_VAE, classes=10, batch=8, emulated_bf16_batch=1, sample_batch=8,
                  sample_steps=2),
    "small": dict(unet=dict(block_out_channels=[32, 64], layers_per_block=1, cross_attention_dim=64,
                            attention_head_dim=4, norm_num_groups=16),
                  latent=8, vae=TINY_VAE, classes=10, batch=2, emulated_bf16_batch=1, sample_batch=2,
                  sample_steps=2),
}


def build(cfg, device, **unet_overrides):
    torch.manual_seed(0)
    unet = build_unet(cfg["latent"], 4, **{**cfg["unet"], **unet_overrides})
    return Denoiser(unet, ClassEmbedder(cfg["classes"], cfg["unet"]["cross_attention_dim"])).to(device)


def ldm_step(model, batch, cfg, precision, device, vae=None, image=None):
    """train.py's step: posterior (cached or encoded now) -> fresh latent sample -> noise-prediction MSE."""
    sched = DDPMScheduler(**DEFAULT_NOISE_SCHEDULE)
    g = torch.Generator().manual_seed(0)
    lat = cfg["latent"]
    mean = torch.randn(batch, 4, lat, lat, generator=g).to(device)
    std = (0.1 * torch.rand(batch, 4, lat, lat, generator=g)).to(device)
    images = (torch.rand(batch, 3, image, image, generator=g) * 2 - 1).to(device) if vae is not None else None
    labels = torch.randint(0, cfg["classes"], (batch,), generator=g).to(device)

    def loss_fn():
        if vae is not None:
            with torch.no_grad():
                m, s = vae_posterior(vae, images)
            m, s = m.float(), s.float()
        else:
            m, s = mean, std
        rand = draw_noise(g, m.shape, 0.1, 1000)
        return diffusion_loss(model, m, s, labels, rand, sched, 0.18215, cfg["classes"], device)

    return train_step(model, loss_fn, precision, device)


def main():
    args = part_args(__doc__.splitlines()[0])
    device = setup_device(args.device)
    cfg = SIZES[args.size]
    native = bf16_native(device)
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg["vae"]).to(device).eval().requires_grad_(False)
    image = cfg["latent"] * 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    rows = []
    plan = bf16_plan(args, device)
    b16, reps16 = bf16_batch_repeats(args, device, cfg["batch"], cfg["emulated_bf16_batch"])
    groups = [("fp32", cfg["batch"], args.repeats, ["cached", "encode", "cached, 2 heads"])]
    if plan != "none":
        groups.append(("bf16", b16, reps16, ["cached", "encode"] if plan == "full" else ["cached"]))
        if b16 != cfg["batch"]:
            groups.append(("fp32", b16, args.repeats, ["cached"]))
    for precision, batch, reps, variants in groups:
        model = build(cfg, device).train()
        fns = {v: ldm_step(model, batch, cfg, precision, device, **({"vae": vae, "image": image}
                                                                    if v == "encode" else {}))
               for v in variants if v != "cached, 2 heads"}
        if "cached, 2 heads" in variants:
            fns["cached, 2 heads"] = ldm_step(build(cfg, device, attention_head_dim=2).train(), batch, cfg, precision,
                                              device)
        flops = {k: count_flops(f) / batch for k, f in fns.items()}
        say(f"ldm train {precision} batch {batch}: {', '.join(fns)}")
        # The FLOP count was the warm-up; the VAE-encode variant (seconds per image) gets at most 2 rounds.
        times = side_by_side(fns, reps, device, warmup=False, log=say, max_rounds={"encode": 2})
        for k, ts in times.items():
            rows.append(entry(f"LDM UNet {k}", batch, ts, variant=k, precision=precision,
                              flops_per_image=flops[k]))

    model = build(cfg, device).eval()
    sb, k = cfg["sample_batch"], cfg["sample_steps"]
    labels = torch.arange(sb, device=device) % cfg["classes"]
    noise_cfg = dict(DEFAULT_NOISE_SCHEDULE)
    precisions = ["fp32"] + (["bf16"] if plan == "full" else [])  # emulated bf16 takes minutes per step

    def run(name, precision):
        gens = [torch.Generator().manual_seed(i) for i in range(sb)]
        return sample_latents(model, make_sampler(name, noise_cfg), labels, gens, (4, cfg["latent"], cfg["latent"]),
                              k, 3.0, device, autocast=lambda: autocast(precision, device))

    # inference.py keeps the VAE channels-last in bf16 (oneDNN's bf16 convolutions are faster so)
    vaes = {"fp32": vae, "bf16": copy.deepcopy(vae).to(memory_format=torch.channels_last)}

    def decode(precision):
        with autocast(precision, device):
            return vaes[precision].decode(z / 0.18215).sample.float()

    # bf16: DDIM and DPM-Solver++ only (a DDPM step costs what a DDIM step does)
    fns = {(s, p): (lambda s=s, p=p: run(s, p)) for p in precisions
           for s in (("ddpm", "ddim", "dpmsolver") if p == "fp32" else ("ddim", "dpmsolver"))}
    z = torch.randn(1, 4, cfg["latent"], cfg["latent"], device=device)
    fns.update({("decode", p): (lambda p=p: decode(p)) for p in precisions})
    say(f"ldm sampling batch {sb}, {k} steps timed, {' and '.join(precisions)}")
    with torch.no_grad():
        for (s, p), f in fns.items():  # fp32 is warm from training; bf16 builds new oneDNN primitives first
            if p != "fp32" or s == "decode":
                f()
        times = side_by_side({f"{s} {p}": f for (s, p), f in fns.items()}, min(args.repeats, 2), device,
                             warmup=False, log=say)
    sampling = []
    for p in precisions:
        dec = median(times[f"decode {p}"])
        for s, steps in (("ddpm", 1000), ("ddim", 50), ("ddim", 25), ("dpmsolver", 25)):
            if f"{s} {p}" not in times:
                continue
            per_step = median(times[f"{s} {p}"]) / k
            sampling.append({"name": f"LDM UNet {s}-{steps}", "sampler": s, "steps": steps, "batch": sb,
                             "precision": p, "cfg_scale": 3.0, "seconds_per_step": per_step, "decode_s_per_image": dec,
                             "images_per_s": sb / (steps * per_step + sb * dec),
                             "latent_images_per_s": sb / (steps * per_step), "timed_steps": k, "scaled": True,
                             "times_s": times[f"{s} {p}"]})
    write(args.out, {"train": rows, "sampling": sampling, "bf16_native": native, "image_size": image,
                     "params": sum(p.numel() for p in model.parameters())})


if __name__ == "__main__":
    main()
