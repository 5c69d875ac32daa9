"""Benchmark part: ControlNet (our controlnet/ folder): training step (frozen UNet, cached latents) and
mask-guided sampling with DDIM / DPM-Solver++ vs DDPM.

    python benchmarks/part_controlnet.py --size paper --repeats 3 --device cpu --out cn.json --workdir /tmp/x

Paper size: the LDM UNet of part_ldm (64,128,256,256) on 32x32x4 latents, a ControlNet copied from it with
a 1-channel 256px mask (factor-8 conditioning encoder), batch 4. Training in fp32 (bf16 training is covered by
the LDM part); sampling in fp32 and, where bf16 is native (or --bf16 all), in bf16 (inference.py
--mixed_precision bf16: the whole sampling loop under autocast). The VAE decode is the LDM part's.
"""
from bench_common import (autocast, bf16_plan, count_flops, entry, median, part_args, say, setup_device,
                          side_by_side, train_step, use_folder, write)

use_folder("controlnet")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from models import (ClassEmbedder, ControlledUNet, build_controlnet, make_sampler, noise_scheduler,  # noqa: E402
                    sample)

SIZES = {
    "paper": dict(blocks=[64, 128, 256, 256], layers=2, xdim=256, heads=8, groups=32, latent=32, factor=8,
                  batch=4, sample_batch=4, sample_steps=2),
    "small": dict(blocks=[32, 64], layers=1, xdim=64, heads=4, groups=16, latent=8, factor=2,
                  batch=2, sample_batch=2, sample_steps=2),
}
NOISE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
             prediction_type="epsilon")


def build(cfg, device):
    torch.manual_seed(0)
    n = len(cfg["blocks"])
    unet = UNet2DConditionModel(sample_size=cfg["latent"], in_channels=4, out_channels=4,
                                down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
                                block_out_channels=cfg["blocks"], layers_per_block=cfg["layers"],
                                cross_attention_dim=cfg["xdim"], attention_head_dim=cfg["heads"],
                                norm_num_groups=cfg["groups"])
    controlnet = build_controlnet(unet, 1, cfg["factor"])
    model = ControlledUNet(unet, controlnet, ClassEmbedder(10, cfg["xdim"])).to(device)
    unet.requires_grad_(False)  # --freeze_unet (the default): only the ControlNet trains
    model.encoder.requires_grad_(False)
    return model


def main():
    args = part_args(__doc__.splitlines()[0])
    device = setup_device(args.device)
    cfg = SIZES[args.size]
    sched = noise_scheduler(NOISE)
    b, lat = cfg["batch"], cfg["latent"]
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, 4, lat, lat, generator=g).to(device)
    mask = (torch.rand(b, 1, lat * cfg["factor"], lat * cfg["factor"], generator=g) > 0.5).float().to(device)
    labels = torch.randint(0, 10, (b,), generator=g).to(device)
    model = build(cfg, device)
    model.controlnet.train()

    def loss_fn():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        return F.mse_loss(model(sched.add_noise(latents, noise, t), t, labels, mask).float(), noise)

    step = train_step(model, loss_fn, "fp32", device)
    flops = count_flops(step) / b
    say(f"controlnet train fp32 batch {b}")
    rows = [entry("ControlNet", b, side_by_side({"train": step}, args.repeats, device, warmup=False, log=say)["train"],
                  precision="fp32", variant="cached", flops_per_image=flops,
                  trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))]

    model.eval()
    sb, k = cfg["sample_batch"], cfg["sample_steps"]
    x0 = torch.randn(sb, 4, lat, lat, generator=g).to(device)
    m, y = mask[:sb], labels[:sb]
    precisions = ["fp32"] + (["bf16"] if bf16_plan(args, device) == "full" else [])  # emulated: minutes per step

    def run(s, p):
        with autocast(p, device):
            return sample(model, make_sampler(s, NOISE), x0, y, m, k, cfg_scale=3.0, null_label=10,
                          generators=[torch.Generator().manual_seed(i) for i in range(sb)])

    fns = {f"{s} {p}": (lambda s=s, p=p: run(s, p)) for p in precisions
           for s in (("ddpm", "ddim", "dpmsolver") if p == "fp32" else ("ddim", "dpmsolver"))}
    say(f"controlnet sampling batch {sb}, {k} steps timed, {' and '.join(precisions)}")
    for name, f in fns.items():  # fp32 is warm from training; bf16 builds new oneDNN primitives first
        if name.endswith("bf16"):
            f()
    times = side_by_side(fns, min(args.repeats, 2), device, warmup=False, log=say)
    sampling = []
    for p in precisions:
        for s, steps in (("ddpm", 1000), ("ddim", 50), ("dpmsolver", 25)):
            if f"{s} {p}" not in times:
                continue
            per_step = median(times[f"{s} {p}"]) / k
            sampling.append({"name": f"ControlNet {s}-{steps}", "sampler": s, "steps": steps, "batch": sb,
                             "precision": p, "cfg_scale": 3.0, "seconds_per_step": per_step,
                             "latent_images_per_s": sb / (steps * per_step), "images_per_s": None,
                             "timed_steps": k, "scaled": True, "times_s": times[f"{s} {p}"]})
    write(args.out, {"train": rows, "sampling": sampling})


if __name__ == "__main__":
    main()
