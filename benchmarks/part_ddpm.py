"""Benchmark part: the pixel-space DDPM (our ddpm/ folder): training step and sampling.

    python benchmarks/part_ddpm.py --size paper --repeats 3 --device cpu --out ddpm.json --workdir /tmp/x

Training: the default conditional UNet (64x64 RGB, width 64, 10 classes), batch 8, fp32 and bf16 side by
side, plus channels-last fp32 (the --channels-last flag of train.py). Sampling (fp32, CFG 3): the
1000-step DDPM sampler vs DDIM-50, both from `Diffusion.sample`; each is timed over a few steps and
scaled (a step costs the same model forward in both).
"""
from bench_common import (bf16_batch_repeats, bf16_native, bf16_plan, count_flops, entry, median, part_args,
                          say, setup_device, side_by_side, train_step, use_folder, write)

use_folder("ddpm")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import Diffusion, UNet_conditional  # noqa: E402

SIZES = {
    "paper": dict(image=64, width=64, classes=10, batch=8, emulated_bf16_batch=1, sample_batch=8, sample_steps=2),
    "small": dict(image=16, width=8, classes=10, batch=2, emulated_bf16_batch=1, sample_batch=2, sample_steps=2),
}


def ddpm_step(model, diffusion, batch, cfg, precision, device, channels_last=False):
    """train.py's step: x_t = q(x_t|x_0), 10% labels dropped to the null class, MSE on eps."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, 3, cfg["image"], cfg["image"], generator=g) * 2 - 1).to(device)
    y = torch.randint(0, cfg["classes"], (batch,), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def loss_fn():
        t = diffusion.sample_timesteps(batch, device=device)
        yy = torch.where(torch.rand(batch, device=device) < 0.1, cfg["classes"], y)
        noise = torch.randn_like(x)
        x_t, _ = diffusion.noise_images(x, t, noise)
        return F.mse_loss(model(x_t, t, yy).float(), noise)

    return train_step(model, loss_fn, precision, device)


def build(cfg, device, channels_last=False):
    torch.manual_seed(0)
    m = UNet_conditional(num_classes=cfg["classes"], img_size=cfg["image"], base_channels=cfg["width"]).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def main():
    args = part_args(__doc__.splitlines()[0])
    device = setup_device(args.device)
    cfg = SIZES[args.size]
    native = bf16_native(device)
    diffusion = Diffusion(1000, img_size=cfg["image"], device=device)
    rows = []
    # fp32 and channels-last fp32 side by side; bf16 (a smaller batch when emulated) on its own.
    plan = bf16_plan(args, device)
    b16, reps16 = bf16_batch_repeats(args, device, cfg["batch"], cfg["emulated_bf16_batch"])
    groups = [("fp32", cfg["batch"], args.repeats, {"fp32": False, "fp32 channels-last": True})]
    if plan != "none":
        groups.append(("bf16", b16, reps16, {"bf16": False, "bf16 channels-last": True} if plan == "full"
                       else {"bf16": False}))
        if b16 != cfg["batch"]:  # fp32 at the same small batch, for a like-for-like bf16 ratio
            groups.append(("fp32", b16, args.repeats, {"fp32 (bf16 batch)": False}))
    for precision, batch, reps, variants in groups:
        fns, flops = {}, {}
        for label, cl in variants.items():
            model = build(cfg, device, cl).train()
            fns[label] = ddpm_step(model, diffusion, batch, cfg, precision, device, cl)
            flops[label] = count_flops(fns[label]) / batch
        say(f"ddpm train {precision} batch {batch}: {', '.join(fns)}")
        times = side_by_side(fns, reps, device, warmup=False, log=say)  # the FLOP count was the warm-up
        for label, ts in times.items():
            rows.append(entry(f"DDPM UNet {label}", batch, ts, variant=label, precision=precision,
                              flops_per_image=flops[label]))

    model = build(cfg, device).eval()
    sb, k = cfg["sample_batch"], cfg["sample_steps"]
    labels = torch.arange(sb, device=device) % cfg["classes"]
    fns = {s: (lambda s=s: diffusion.sample(model, sb, labels=labels, cfg_scale=3, sampler=s,
                                            steps=k, seeds=list(range(sb)), progress=False))
           for s in ("ddpm", "ddim")}
    say(f"ddpm sampling batch {sb}, {k} steps timed")
    times = side_by_side(fns, min(args.repeats, 2), device, warmup=False, log=say)  # warm from training
    sampling = []
    for s, steps in (("ddpm", 1000), ("ddim", 50), ("ddim", 25)):
        per_step = median(times[s]) / k
        sampling.append({"name": f"DDPM UNet {s}-{steps}", "sampler": s, "steps": steps, "batch": sb,
                         "cfg_scale": 3, "seconds_per_step": per_step, "images_per_s": sb / (steps * per_step),
                         "timed_steps": k, "times_s": list(times[s]), "scaled": True})
    write(args.out, {"train": rows, "sampling": sampling, "bf16_native": native,
                     "params": sum(p.numel() for p in model.parameters())})


if __name__ == "__main__":
    main()
