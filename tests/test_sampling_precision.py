"""bf16 sampling (issue 18) in ldm/, controlnet/ and dit/: the denoiser and the VAE decode really run in bf16,
the initial noise stays float32 and seeded per image, bf16 images equal the fp32 images of the same seeds
within the tolerance the READMEs state, the output folders carry the precision (fp32 names unchanged) and
the CLI default stays fp32. Tiny random networks and VAEs on CPU; bf16 is emulated (slow but correct) on
CPUs without AVX-512 bf16, so every test runs on every machine.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sampling_precision.py -q
"""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from repo_helpers import load_folder

ldm_inf, ldm_models, ldm_pc, ldm_rt = load_folder("ldm", "inference", "models", "inference_per_class", "runtime")
cn_inf, cn_models, cn_rt = load_folder("controlnet", "inference", "models", "runtime")
dit_inf, dit_sample, dit_models, dit_rt = load_folder("dit", "inference", "sample", "models", "runtime")

# The tolerance the READMEs state for 8-bit images, bf16 vs fp32 of the same seeds (levels of 255).
MEAN_TOL, MAX_TOL = 2.0, 64
CPU = torch.device("cpu")


def assert_within_tolerance(a, b):
    """8-bit images (any shape, same seeds): mean and max |difference| within the stated tolerance."""
    d = np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32))
    assert d.mean() <= MEAN_TOL and d.max() <= MAX_TOL, (d.mean(), d.max())
    return d


def to_u8(x):
    """Float images in [0, 1] -> the 8-bit levels the PNG writers store."""
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@contextlib.contextmanager
def output_dtypes(**modules):
    """Record the output dtype of every call of the given modules: {name: set of dtypes}."""
    seen = {k: set() for k in modules}
    handles = [m.register_forward_hook(lambda mod, inp, out, k=k: seen[k].add(
        (out[0] if isinstance(out, tuple) else out).dtype)) for k, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def randomise(modules, seed, scale=0.05):
    """Random trainable weights (zero-initialised output layers would make a denoiser trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for m in modules for p in m.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_vae(in_channels=3, levels=2):
    """A random AutoencoderKL (factor 2 ** (levels - 1), 4 latent channels)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                         down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                         block_out_channels=[8, 16, 16][:levels], layers_per_block=1, latent_channels=4,
                         norm_num_groups=8, sample_size=16).eval()


# ------------------------------------------------------------------------------------------------------ LDM
@pytest.fixture(scope="module")
def ldm_ckpt(tmp_path_factory):
    """A plain LDM checkpoint (tiny random UNet, 3 classes, 16 px grayscale) and its VAE folder."""
    root = tmp_path_factory.mktemp("ldm")
    tiny_vae().save_pretrained(root / "vae")
    torch.manual_seed(0)
    unet = ldm_models.build_unet(8, 4, [16, 32], 1, 16, 2, 8)
    emb = ldm_models.ClassEmbedder(3, 16)
    ckpt = {"model_type": "ldm", "format_version": 1, "unet_config": ldm_models.plain_config(unet.config),
            "unet": unet.state_dict(), "ema_unet": None, "class_embedder": emb.state_dict(),
            "ema_class_embedder": None, "class_names": ["a", "b", "c"], "num_classes": 3, "vae": str(root / "vae"),
            "vae_scaling_factor": 0.18215, "image_size": 16, "image_channels": 1,
            "noise_scheduler_config": dict(ldm_models.DEFAULT_NOISE_SCHEDULE), "step": 0}
    torch.save(ckpt, root / "ckpt.pt")
    return root / "ckpt.pt"


def test_ldm_bf16_runs_denoiser_and_decode_in_bf16_from_fp32_noise(ldm_ckpt):
    ck = torch.load(ldm_ckpt, weights_only=True)
    den, _ = ldm_models.denoiser_from_checkpoint(ck)
    vae, _ = ldm_models.load_vae(ck["vae"])
    seeds, labels = [5, 6, 7], [0, 1, 2]
    first_input = []
    den.unet.register_forward_pre_hook(lambda m, args: first_input.append(args[0].clone()) if not first_input else None)
    kw = dict(latent_channels=4, latent_size=8, scaling_factor=0.18215, image_channels=1,
              noise_config=ck["noise_scheduler_config"], scheduler="ddim", num_steps=6, cfg_scale=3.0)
    with output_dtypes(unet=den.unet.conv_in, attn=den.unet.down_blocks[0].attentions[0].proj_in,
                       vae=vae.decoder.conv_in) as seen:
        bf16 = ldm_models.sample_images(den, vae, labels, seeds, autocast=lambda: ldm_rt.autocast("bf16", CPU), **kw)
    assert seen == {"unet": {torch.bfloat16}, "attn": {torch.bfloat16}, "vae": {torch.bfloat16}}
    # The noise is drawn in float32 from one generator per image: the first UNet input is exactly it ([cond; uncond]).
    noise = ldm_models.initial_noise(seeds, (4, 8, 8))
    assert first_input[0].dtype == torch.float32 and torch.equal(first_input[0], torch.cat([noise, noise]))
    with output_dtypes(unet=den.unet.conv_in, vae=vae.decoder.conv_in) as seen:
        fp32 = ldm_models.sample_images(den, vae, labels, seeds, **kw)
    assert seen == {"unet": {torch.float32}, "vae": {torch.float32}}
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (3, 1, 16, 16)
    assert not torch.equal(bf16, fp32)  # the bf16 path differs in the last bits...
    assert_within_tolerance(to_u8(bf16), to_u8(fp32))  # ...and within the stated tolerance in 8 bits


def test_ldm_cli_bf16_folder_and_images_within_tolerance(ldm_ckpt, tmp_path):
    common = ["--checkpoint", str(ldm_ckpt), "--output_dir", str(tmp_path), "--num_samples", "2",
              "--num_inference_steps", "4", "--batch_size", "3"]
    assert ldm_inf.main(common) == 0
    assert ldm_inf.main(common + ["--mixed-precision", "bf16"]) == 0
    fp32_dir = tmp_path / "ckpt_ddim4_cfg3_seed42"  # the fp32 name of earlier versions, unchanged
    bf16_dir = tmp_path / "ckpt_ddim4_cfg3_seed42_bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == [fp32_dir.name, bf16_dir.name]
    names = sorted(p.name for p in fp32_dir.glob("*.png"))
    assert len(names) == 6 and names == sorted(p.name for p in bf16_dir.glob("*.png"))
    assert_within_tolerance([np.asarray(Image.open(fp32_dir / n)) for n in names],
                            [np.asarray(Image.open(bf16_dir / n)) for n in names])
    # auto is bf16 where the CPU has it natively, fp32 elsewhere; the folder says which ran
    args = SimpleNamespace(checkpoint=str(ldm_ckpt), trust_checkpoint=False, vae=None, mixed_precision="auto")
    gen = ldm_inf.Generator(args)
    assert gen.precision == ("bf16" if ldm_rt.bf16_supported(CPU) else "no")
    assert ldm_inf.sample_tag("x.pt", "ddim", 4, 3.0, 42, precision=gen.precision).endswith(
        "_bf16" if gen.precision == "bf16" else "_seed42")
    assert ldm_inf.interpolation_tag("x.pt", True, "fp16") == "interpolation_x_raw_fp16"


def test_ldm_per_class_settings_record_the_precision_that_ran(ldm_ckpt, tmp_path, capsys):
    common = ["--checkpoint", str(ldm_ckpt), "--output_dir", str(tmp_path), "--total_samples", "3",
              "--num_inference_steps", "2"]
    assert ldm_pc.main(common + ["--mixed_precision", "bf16"]) == 0
    assert '"mixed_precision": "bf16"' in (tmp_path / "generation_settings.json").read_text()
    with pytest.raises(SystemExit) as e:  # fp32 images are not mixed into a bf16 folder
        ldm_inf.run_main(ldm_pc.main, common)
    assert e.value.code == 2 and "other settings" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ ControlNet
def test_controlnet_bf16_denoise_and_decode_within_tolerance():
    torch.manual_seed(0)
    unet = ldm_models.build_unet(8, 4, [16, 32], 1, 16, 2, 8)  # the LDM's UNet class (diffusers), as train.py has
    controlnet = cn_models.build_controlnet(unet, 1, 2)
    randomise([controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block], 1, 0.02)  # the zero convolutions
    model = cn_models.ControlledUNet(unet, controlnet, cn_models.ClassEmbedder(3, 16)).eval()
    vae = tiny_vae()
    ldm = SimpleNamespace(vae=vae, noise_scheduler_config=dict(ldm_models.DEFAULT_NOISE_SCHEDULE),
                          scaling_factor=0.18215, image_channels=1)
    mask = (torch.arange(16)[None, :] > torch.arange(16)[:, None]).float()[None, None].expand(2, 1, 16, 16)
    labels = torch.tensor([0, 2])
    out = {}
    for prec in ("no", "bf16"):
        s = SimpleNamespace(model=model, ldm=ldm, precision=prec, device=CPU, null=3)
        lat, gens = cn_models.initial_latents([11, 12], (4, 8, 8))
        assert lat.dtype == torch.float32
        with output_dtypes(unet=unet.conv_in, controlnet=controlnet.conv_in, vae=vae.decoder.conv_in) as seen:
            out[prec] = cn_inf.denoise(s, lat, mask, labels, "ddim", 5, 1.0, 2.0, generators=gens)
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        assert seen == {"unet": {dtype}, "controlnet": {dtype}, "vae": {dtype}}
    assert out["bf16"].dtype == torch.float32 and not torch.equal(out["bf16"], out["no"])
    assert_within_tolerance(to_u8((out["bf16"] + 1) / 2), to_u8((out["no"] + 1) / 2))
    args = SimpleNamespace(checkpoint="cn.pt", no_ema=False, scheduler="ddim", num_inference_steps=5,
                           controlnet_scale=1.0, class_label=None, class_labels_csv=None)
    tag = lambda prec: cn_inf.output_tag(args, SimpleNamespace(step=7, amp=cn_rt.autocast_dtype(prec)))  # noqa: E731
    assert tag("no") == "cn-step7-ema-ddim5-scale1" and tag("bf16") == "cn-step7-ema-ddim5-scale1-bfloat16"
    assert cn_inf.parse_args(["--checkpoint", "a", "--ldm_checkpoint", "b", "--mask", "m.png"]).mixed_precision == "no"


# ------------------------------------------------------------------------------------------------------- DiT
@pytest.fixture(scope="module")
def dit_ckpt(tmp_path_factory):
    """A plain DiT checkpoint (random DiT-Ti/2, 3 classes with a null class, 16 px grayscale) and its VAE."""
    root = tmp_path_factory.mktemp("dit")
    tiny_vae(in_channels=1, levels=3).save_pretrained(root / "vae")
    model = dit_models.ALL_MODELS["DiT-Ti/2"](input_size=4, num_classes=3, class_dropout_prob=0.1)
    randomise([model], 2)  # adaLN-Zero starts every block (and the output) at zero
    ckpt = {"model_type": "dit", "ema": model.state_dict(), "step": 1, "class_names": ["a", "b", "c"],
            "config": {"num_classes": 3, "image_size": 16, "grayscale": True}, "vae": {"vae": str(root / "vae")}}
    torch.save(ckpt, root / "0000001.pt")
    return root / "0000001.pt"


def test_dit_bf16_runs_model_and_decode_in_bf16(dit_ckpt):
    args = dit_sample.parse_args(["--ckpt", str(dit_ckpt), "--sampler", "ddim", "--num-sampling-steps", "5"])
    assert args.mixed_precision == "no"  # the CLI default stays fp32
    z, img = {}, {}
    for prec in ("no", "bf16"):
        model, vae, vinfo, meta = dit_inf.load_for_sampling(args, CPU, lambda *a: None, prec)
        assert vinfo["precision"] == prec
        first = []
        model.x_embedder.register_forward_pre_hook(lambda m, a: first.append(a[0].clone()) if not first else None)
        with output_dtypes(block=model.blocks[0].attn.qkv, vae=vae.decoder.conv_in) as seen:
            z[prec] = dit_inf.sample_latents(model, dit_inf.make_sampler(args), [0, 2], [3, 4], 2.0, "ddim", 0.0,
                                             CPU, prec, True)
            img[prec] = dit_inf.decode_to_uint8(vae, vinfo, z[prec], grayscale=True)
        dtype = torch.bfloat16 if prec == "bf16" else torch.float32
        assert seen == {"block": {dtype}, "vae": {dtype}}
        noise = torch.stack([dit_inf.initial_noise(model, s) for s in (3, 4)])  # float32, one generator per image
        assert first[0].dtype == torch.float32 and torch.equal(first[0], torch.cat([noise, noise]))
    assert z["bf16"].dtype == torch.float32 and not torch.equal(z["bf16"], z["no"])
    assert_within_tolerance(img["bf16"].numpy(), img["no"].numpy())


def test_dit_cli_bf16_folder_and_images_within_tolerance(dit_ckpt, tmp_path):
    common = ["--ckpt", str(dit_ckpt), "--output-dir", str(tmp_path), "--num-samples", "3", "--batch-size", "3",
              "--sampler", "ddim", "--num-sampling-steps", "4", "--cfg-scale", "2"]
    dit_sample.main(dit_sample.parse_args(common))
    dit_sample.main(dit_sample.parse_args(common + ["--mixed_precision", "bf16"]))
    fp32_dir, bf16_dir = sorted(tmp_path.iterdir(), key=lambda p: len(p.name))
    assert bf16_dir.name == fp32_dir.name + "-bf16" and fp32_dir.name.endswith("-ddim4-seed-0")
    pngs = sorted(p.relative_to(fp32_dir) for p in fp32_dir.rglob("*_seed*.png"))
    assert len(pngs) == 3 and pngs == sorted(p.relative_to(bf16_dir) for p in bf16_dir.rglob("*_seed*.png"))
    assert_within_tolerance([np.asarray(Image.open(fp32_dir / p)) for p in pngs],
                            [np.asarray(Image.open(bf16_dir / p)) for p in pngs])
    vinfo = {"vae": "mse", "precision": "bf16"}
    meta = {"model": "DiT-Ti/2", "ckpt_tag": "x", "image_size": 16}
    assert dit_inf.interpolation_tag(SimpleNamespace(cfg_channels="auto"), meta, vinfo).endswith("-vae-mse-bf16")
    args = dit_sample.parse_args(common + ["--output-format", "png16"])
    assert dit_inf.settings_tag(args, meta, vinfo, 0).endswith("-ddim4-seed-0-bf16-png16")
