"""Spec fidelity of ddpm/ (issue 13): launch() / command-line values of 0 and False are kept, the spec's
load_state_dict snippet names the arguments a checkpoint needs, checkpoints of dome272/Diffusion-Models-pytorch
(and its variant with attn_threshold) convert to ours; plus dit/environment.yml against dit/requirements.txt.

    OMP_NUM_THREADS=1 python -m pytest tests/test_ddpm_compat.py -q

Their code is not needed here: THEIR_BLOCKS below writes down, by hand, the key names and shapes of their
modules.py (UNet / UNet_conditional: DoubleConv = Sequential(conv, GroupNorm, GELU, conv, GroupNorm), 4-head
nn.MultiheadAttention blocks sa1..sa6, widths fixed at 64/128/256/512, emb_dim 256). That the converted
network computes the same function as theirs was measured once against their code, outside this tree
(see ddpm/README.md).
"""
import json
import re

import pytest
import torch

from repo_helpers import REPO, load_folder, run_main_expect

models, modules, convert, inference, ddpm_uncond, ddpm_cond, train = load_folder(
    "ddpm", "models", "modules", "convert_checkpoint", "inference", "ddpm", "ddpm_conditional", "train")


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ------------------------------------------------------------------ launch() and command-line values
def captured_config(monkeypatch, module, **overrides):
    """Run module.launch(**overrides) with training replaced by resolving its config; return that config."""
    seen = {}

    def fake_train(args):
        seen.update(train.resolve_config(args)[0])

    monkeypatch.setattr(module, "train", fake_train)
    module.launch(**overrides)
    return seen


ZEROS = ["--ema-start", "0", "--cfg-dropout", "0", "--warmup-steps", "0", "--grad-clip", "0",
         "--ema_decay", "0", "--ckpt-every-steps", "0", "--sample-every", "0", "--max-minutes", "0"]


def test_command_line_zero_and_false_override_launch(monkeypatch, tmp_path):
    given = ddpm_uncond.cli_overrides(ZEROS + ["--no-random-flip"])
    assert given == {"ema_start": 0, "cfg_dropout": 0.0, "warmup_steps": 0, "grad_clip": 0.0, "ema_decay": 0.0,
                     "ckpt_every_steps": 0, "sample_every_epochs": 0, "max_minutes": 0.0, "random_flip": False}
    assert ddpm_uncond.cli_overrides([]) == {}  # nothing given: launch() decides everything
    # launch() of ddpm_conditional.py sets cfg_dropout = 0.1; `--cfg-dropout 0` on the command line must win
    for module in (ddpm_cond, ddpm_uncond):
        cfg = captured_config(monkeypatch, module, dataset_path=str(tmp_path),
                              **module.cli_overrides(ZEROS + ["--no-random-flip", "--epochs", "7"]))
        assert (cfg["ema_start"], cfg["cfg_dropout"], cfg["warmup_steps"], cfg["grad_clip"], cfg["ema_decay"]) == \
            (0, 0, 0, 0, 0)
        assert cfg["random_flip"] is False and cfg["max_minutes"] == 0 and cfg["sample_every_epochs"] == 0
        assert cfg["num_epochs"] == 7 and cfg["batch_size"] == (14 if module is ddpm_cond else 12)
    # without flags, launch()'s own settings hold (and the defaults where launch() sets nothing)
    cfg = captured_config(monkeypatch, ddpm_cond, dataset_path=str(tmp_path))
    assert cfg["cfg_dropout"] == 0.1 and cfg["num_epochs"] == 300 and cfg["ema_start"] == 2000


def test_launch_keyword_zero_and_false_are_kept(monkeypatch, tmp_path):
    cfg = captured_config(monkeypatch, ddpm_cond, dataset_path=str(tmp_path), ema_start=0, cfg_dropout=0,
                          warmup_steps=0, grad_clip=0, random_flip=False)
    assert (cfg["ema_start"], cfg["cfg_dropout"], cfg["warmup_steps"], cfg["grad_clip"]) == (0, 0, 0, 0)
    assert cfg["random_flip"] is False


# ------------------------------------------------------------------ the spec's load_state_dict snippet
def test_spec_snippet_on_a_grayscale_checkpoint_says_what_to_pass(tmp_path):
    """A grayscale run (c_in = c_out = 1) loaded by UNet_conditional(num_classes=..., img_size=...)."""
    gray = modules.UNet_conditional(num_classes=4, img_size=64, c_in=1, c_out=1)
    torch.save(gray.state_dict(), tmp_path / "ckpt.pt")
    model = modules.UNet_conditional(num_classes=4, img_size=64)
    with pytest.raises(RuntimeError) as e:  # still a RuntimeError, like torch's own, and a UserError
        model.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    msg = str(e.value)
    assert isinstance(e.value, models.CheckpointMismatch) and "\n" not in msg and "size mismatch" not in msg
    assert "c_in=1, c_out=1" in msg
    call = re.search(r"build it as (UNet_conditional\(.*\))$", msg).group(1)
    assert call == "UNet_conditional(num_classes=4, img_size=64, c_in=1, c_out=1)"
    fixed = eval(call, {"UNet_conditional": modules.UNet_conditional})  # the sentence is the fix
    fixed.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    assert torch.equal(fixed(torch.zeros(1, 1, 16, 16), torch.tensor([5]), torch.tensor([3])),
                       gray(torch.zeros(1, 1, 16, 16), torch.tensor([5]), torch.tensor([3])))


@pytest.mark.parametrize("kind", ["width", "classes", "unconditional", "train_state", "prefix", "theirs"])
def test_spec_snippet_other_mismatches_are_one_sentence(kind):
    small = dict(img_size=16, base_channels=8, time_dim=16)
    model = models.UNet_conditional(num_classes=3, **small)
    sd = {"width": lambda: models.UNet_conditional(num_classes=3, img_size=16, base_channels=16, time_dim=16),
          "classes": lambda: models.UNet_conditional(num_classes=5, **small),
          "unconditional": lambda: models.UNet(**small),
          }.get(kind, lambda: model)().state_dict()
    expected = {"width": "base_channels=16", "classes": "num_classes=5",
                "unconditional": "build it as UNet(img_size=16",
                "train_state": "load its ['model']", "prefix": "'module.'", "theirs": "convert_checkpoint.py"}[kind]
    if kind == "train_state":
        sd = {"model_type": "ddpm", "model": sd, "ema": sd, "step": 3}
    elif kind == "prefix":
        sd = {f"module.{k}": v for k, v in sd.items()}
    elif kind == "theirs":
        sd = their_state_dict(num_classes=3)
    with pytest.raises(models.CheckpointMismatch) as e:
        model.load_state_dict(sd)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_default_layout_is_unchanged():
    """Checkpoints written before the arch option must still load: same keys, no sa6, same size."""
    m = models.UNet_conditional(num_classes=10, img_size=64)
    sd = m.state_dict()
    assert len(sd) == 175 and models.count_parameters(m) == 23_441_923
    assert not any(k.startswith("sa6.") for k in sd) and "time_mlp.0.weight" in sd
    assert m.config() == {"c_in": 3, "c_out": 3, "img_size": 64, "time_dim": 256, "base_channels": 64,
                          "num_classes": 10}
    assert m.sa1.heads == 4 and m.sa2.heads == 8 and m.inc.net[1].num_groups == 32


# ------------------------------------------------------------------ their layout, written down by hand
def _double_conv(p, cin, cout, mid=None):
    mid = mid or cout
    return {f"{p}.double_conv.0.weight": (mid, cin, 3, 3), f"{p}.double_conv.1.weight": (mid,),
            f"{p}.double_conv.1.bias": (mid,), f"{p}.double_conv.3.weight": (cout, mid, 3, 3),
            f"{p}.double_conv.4.weight": (cout,), f"{p}.double_conv.4.bias": (cout,)}


def _emb(p, cout):
    return {f"{p}.emb_layer.1.weight": (cout, 256), f"{p}.emb_layer.1.bias": (cout,)}


def _down(p, cin, cout):
    return {**_double_conv(f"{p}.maxpool_conv.1", cin, cin), **_double_conv(f"{p}.maxpool_conv.2", cin, cout),
            **_emb(p, cout)}


def _up(p, cin, cout):
    return {**_double_conv(f"{p}.conv.0", cin, cin), **_double_conv(f"{p}.conv.1", cin, cout, cin // 2),
            **_emb(p, cout)}


def _attn(p, c):
    return {f"{p}.mha.in_proj_weight": (3 * c, c), f"{p}.mha.in_proj_bias": (3 * c,),
            f"{p}.mha.out_proj.weight": (c, c), f"{p}.mha.out_proj.bias": (c,),
            f"{p}.ln.weight": (c,), f"{p}.ln.bias": (c,),
            f"{p}.ff_self.0.weight": (c,), f"{p}.ff_self.0.bias": (c,), f"{p}.ff_self.1.weight": (c, c),
            f"{p}.ff_self.1.bias": (c,), f"{p}.ff_self.3.weight": (c, c), f"{p}.ff_self.3.bias": (c,)}


# (name, block, in, out[, feature-map side as a divisor of the image side]) in their __init__ order
THEIR_BLOCKS = [("inc", "conv", "c_in", 64), ("down1", "down", 64, 128), ("sa1", "attn", 128, 128, 2),
                ("down2", "down", 128, 256), ("sa2", "attn", 256, 256, 4), ("down3", "down", 256, 256),
                ("sa3", "attn", 256, 256, 8), ("bot1", "conv", 256, 512), ("bot2", "conv", 512, 512),
                ("bot3", "conv", 512, 256), ("up1", "up", 512, 128), ("sa4", "attn", 128, 128, 4),
                ("up2", "up", 256, 64), ("sa5", "attn", 64, 64, 2), ("up3", "up", 128, 64),
                ("sa6", "attn", 64, 64, 1)]


def their_layout(c_in=3, c_out=3, num_classes=None, img_size=64, attn_threshold=64):
    """{key: shape} of their UNet (num_classes None) or UNet_conditional; attention only where the
    feature map side is <= attn_threshold (their variant; 64 is both codes' behaviour at 64 px)."""
    shapes = {}
    for name, kind, cin, cout, *div in THEIR_BLOCKS:
        cin = c_in if cin == "c_in" else cin
        if kind == "attn":
            if img_size // div[0] <= attn_threshold:
                shapes.update(_attn(name, cin))
        else:
            shapes.update({"conv": _double_conv, "down": _down, "up": _up}[kind](name, cin, cout))
    shapes.update({"outc.weight": (c_out, 64, 1, 1), "outc.bias": (c_out,)})
    if num_classes is not None:
        shapes["label_emb.weight"] = (num_classes, 256)
    return shapes


def their_state_dict(seed=0, **layout):
    """Random tensors with their key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.05 for k, s in their_layout(**layout).items()}


def test_their_layout_matches_the_parameter_count_of_their_code():
    # Counted once from their code (UNet_conditional(num_classes=10): 23,335,299 parameters in 183 tensors;
    # UNet: 23,332,739 in 182): the hand-written layout must agree, else the tests below check a layout
    # that does not exist.
    assert sum(torch.Size(s).numel() for s in their_layout(num_classes=10).values()) == 23_335_299
    assert len(their_layout(num_classes=10)) == 183
    assert sum(torch.Size(s).numel() for s in their_layout().values()) == 23_332_739 and len(their_layout()) == 182


CASES = {  # id: (layout of their model, --image-size, attention levels expected in ours)
    "dome272_conditional_64": (dict(num_classes=10), 64, ["sa1", "sa2", "sa3", "sa4", "sa5", "sa6"]),
    "dome272_unconditional_64": (dict(), 64, ["sa1", "sa2", "sa3", "sa4", "sa5", "sa6"]),
    "variant_128_threshold_64": (dict(num_classes=4, img_size=128), 128, ["sa1", "sa2", "sa3", "sa4", "sa5"]),
    "variant_64_threshold_16": (dict(num_classes=3, attn_threshold=16), 64, ["sa2", "sa3", "sa4"]),
    "variant_grayscale_32": (dict(num_classes=2, img_size=32, c_in=1, c_out=1), 32,
                             ["sa1", "sa2", "sa3", "sa4", "sa5", "sa6"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_checkpoint_loads_in_inference_and_the_spec_snippet(case, tmp_path, capsys):
    layout, size, levels = CASES[case]
    src = their_state_dict(**layout)
    torch.save(src, tmp_path / "ckpt.pt")
    out = tmp_path / "converted"
    convert.main(["--src", str(tmp_path / "ckpt.pt"), "--out-dir", str(out), "--image-size", str(size)])
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.json"]  # no EMA given: none written
    sd = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(torch.is_tensor(v) for v in sd.values())
    # tensors are carried over unchanged under our names
    pairs = {"inc.double_conv.0.weight": "inc.net.0.weight",
             "down2.maxpool_conv.2.double_conv.3.weight": "down2.conv.2.net.3.weight",
             "up1.conv.1.double_conv.4.bias": "up1.conv.1.net.4.bias", "up3.emb_layer.1.weight": "up3.emb.1.weight",
             f"{levels[0]}.mha.in_proj_weight": f"{levels[0]}.qkv.weight",
             f"{levels[-1]}.mha.out_proj.bias": f"{levels[-1]}.proj.bias",
             f"{levels[0]}.ff_self.3.weight": f"{levels[0]}.ff.3.weight",
             f"{levels[0]}.ln.bias": f"{levels[0]}.norm.bias"}
    for theirs, ours in pairs.items():
        assert torch.equal(src[theirs], sd[ours]), (theirs, ours)
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in src.values()) + (
        256 if "num_classes" in layout else 0)
    if "num_classes" in layout:  # their "no class" (add nothing) is our extra row, all zeros
        n = layout["num_classes"]
        assert torch.equal(sd["label_emb.weight"][:n], src["label_emb.weight"])
        assert not sd["label_emb.weight"][n].any()
    info = json.loads((out / "config.json").read_text())
    assert info["model_type"] == "ddpm" and info["model"]["arch"] == "dome272"
    assert info["diffusion"] == {"noise_steps": 1000, "schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}
    assert info["class_names"] == [str(i) for i in range(layout.get("num_classes", 0))]

    # inference.py rebuilds it from config.json
    model, info2, _ = inference.load_model(out / "ckpt.pt")
    assert model.arch == "dome272" and sorted(k.split(".")[0] for k in model.state_dict()
                                              if k.endswith(".qkv.weight")) == levels
    assert model.sa2.heads == 4 and model.inc.net[1].num_groups == 1 and isinstance(model.time_mlp, torch.nn.Identity)

    # the spec's snippet: the default constructor says what to pass, the printed call loads it strictly
    n, c = layout.get("num_classes"), layout.get("c_in", 3)
    cls = modules.UNet_conditional if n else modules.UNet
    plain = cls(num_classes=n, img_size=size, c_in=c, c_out=c) if n else cls(img_size=size, c_in=c, c_out=c)
    with pytest.raises(RuntimeError, match="arch='dome272'"):
        plain.load_state_dict(torch.load(out / "ckpt.pt"))
    call = re.search(r"load it with (\S.*\)) or:", printed).group(1)
    snippet = eval(call, {"UNet_conditional": modules.UNet_conditional, "UNet": modules.UNet})
    snippet.load_state_dict(torch.load(out / "ckpt.pt"), strict=True)
    x, t = torch.randn(2, c, 16, 16), torch.tensor([0, 999])
    y = torch.tensor([0, n - 1]) if n else None
    with torch.no_grad():
        a, b = snippet(x, t, y), model(x, t, y)
    assert a.shape == x.shape and torch.isfinite(a).all() and torch.equal(a, b)


def test_converter_takes_their_run_folder_and_the_variants_checkpoint_pt(tmp_path, capsys):
    model_sd, ema_sd = their_state_dict(0, num_classes=3), their_state_dict(1, num_classes=3)
    run = tmp_path / "their_run"
    run.mkdir()
    torch.save(model_sd, run / "ckpt.pt")
    torch.save(ema_sd, run / "ema_ckpt.pt")
    torch.save({"state": {}, "param_groups": []}, run / "optim.pt")
    convert.main(["--src", str(run), "--out-dir", str(tmp_path / "a"), "--class_names", "cyst", "normal", "tumour"])
    assert torch.equal(torch.load(tmp_path / "a/ema_ckpt.pt")["inc.net.0.weight"], ema_sd["inc.double_conv.0.weight"])
    # the variant's DDP checkpoint.pt (model + EMA + optimizer + args in one file), here with 'module.' keys
    full = {"epoch": 7, "model_state_dict": {f"module.{k}": v for k, v in model_sd.items()},
            "ema_state_dict": ema_sd, "optimizer_state_dict": {"state": {}, "param_groups": []},
            "scaler_state_dict": {}, "args": {"run_name": "DDPM_conditional", "image_size": 64, "lr": 3e-4}}
    torch.save(full, tmp_path / "checkpoint.pt")
    convert.main(["--src", str(tmp_path / "checkpoint.pt"), "--out-dir", str(tmp_path / "b")])
    capsys.readouterr()
    for name in ("ckpt.pt", "ema_ckpt.pt"):
        a, b = torch.load(tmp_path / "a" / name), torch.load(tmp_path / "b" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # sampling through inference.py, with the EMA weights and a class chosen by name
    inference.main(["--ckpt", str(tmp_path / "a/ckpt.pt"), "--use-ema", "--class-labels", "tumour",
                    "--num-samples", "1", "--sampler", "ddim", "--sampling-steps", "1",
                    "--output-dir", str(tmp_path / "samples")])
    assert [p.name for p in (tmp_path / "samples").glob("*.png")] == ["tumour_seed0.png"]


def test_converter_bad_inputs_are_one_line(tmp_path, capsys):
    def fails(args, expected):
        msg = run_main_expect(convert.main, args, capsys)
        assert expected in msg, msg

    def save(obj, name):
        torch.save(obj, tmp_path / name)
        return str(tmp_path / name)

    out = ["--out-dir", str(tmp_path / "out")]
    fails(["--src", str(tmp_path / "nope.pt"), *out], "does not exist")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    fails(["--src", str(tmp_path / "junk.pt"), *out], "junk.pt is not a")  # (plain) checkpoint: runtime's words
    ours = models.UNet_conditional(num_classes=2, img_size=16, base_channels=8, time_dim=16).state_dict()
    fails(["--src", save(ours, "ours.pt"), *out], "already has this repository's UNet layout")
    fails(["--src", save({"model_type": "dit", "model": {}}, "dit.pt"), *out], "'dit' checkpoint of this repository")
    fails(["--src", save({"x_embedder.proj.weight": torch.zeros(4, 4, 2, 2), "t_embedder.mlp.0.weight":
                          torch.zeros(8, 8)}, "dit_sd.pt"), *out], "not a UNet state dict of dome272")
    no_bot2 = {k: v for k, v in their_state_dict(num_classes=2).items() if not k.startswith("bot2.")}
    fails(["--src", save(no_bot2, "no_bot2.pt"), *out], "does not have the layout of dome272's UNet")
    no_sa2 = {k: v for k, v in their_state_dict(num_classes=2).items() if not k.startswith("sa2.")}
    fails(["--src", save(no_sa2, "no_sa2.pt"), *out], "which no attn_threshold gives")
    good = save(their_state_dict(num_classes=2), "good.pt")
    fails(["--src", good, "--attn-threshold", "16", *out], "--attn-threshold 16 at --image-size 64")
    fails(["--src", good, "--class-names", "a", "b", "c", *out], "--class-names gives 3 names")
    fails(["--src", good, "--num-classes", "5", *out], "--num-classes 5 disagrees")
    fails(["--src", good, "--image-size", "60", *out], "--image-size 60 must be a positive multiple of 8")
    fails(["--src", good, "--ema", save(their_state_dict(), "uncond_ema.pt"), *out], "another architecture")
    fails(["--src", str(tmp_path), *out], "a folder without ckpt.pt")
    from argparse import Namespace
    torch.save({"model_state_dict": their_state_dict(num_classes=2), "args": Namespace(lr=1)},
               tmp_path / "pickled.pt")
    fails(["--src", str(tmp_path / "pickled.pt"), *out], "--trust-checkpoint")
    assert not (tmp_path / "out").exists()  # nothing written by any failed conversion
    convert.main(["--src", good, *out])
    fails(["--src", good, *out], "already holds a checkpoint")
    convert.main(["--src", good, *out, "--overwrite"])


# ------------------------------------------------------------------ dit/environment.yml
def test_dit_environment_yml_matches_requirements():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((REPO / "dit" / "environment.yml").read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict)][0]["pip"]
    reqs = [ln.split("#")[0].strip() for ln in (REPO / "dit" / "requirements.txt").read_text().splitlines()]
    assert sorted(pip) == sorted(r for r in reqs if r)
    assert "pip" in env["dependencies"] and env["name"] == "dit"
    for spec in pip:  # torch / torchvision: lower bounds only, never an exact pin or a CUDA build tag
        if spec.startswith(("torch", "torchvision")):
            assert re.fullmatch(r"torch(vision)?>=[\d.]+", spec), spec
