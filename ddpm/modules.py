"""The spec's module of networks: `from modules import UNet, UNet_conditional, count_parameters, EMA`.

    model = UNet_conditional(num_classes=10, img_size=64)     # the default conditional architecture
    model.load_state_dict(torch.load("./models/DDPM_conditional/ckpt.pt"))
    # a grayscale run: UNet_conditional(num_classes=10, img_size=64, c_in=1, c_out=1); a checkpoint converted
    # from dome272/Diffusion-Models-pytorch: UNet_conditional(num_classes=10, img_size=64, arch="dome272")

A thin re-export of models.py (where the code lives), kept under the name the spec promises. A checkpoint
of another architecture fails in load_state_dict with one sentence naming the arguments it needs.
"""
from models import (ARCHS, EMA, CheckpointMismatch, Diffusion, DoubleConv, Down, SelfAttention, UNet,  # noqa: F401
                    UNet_conditional, Up, count_parameters, rebuild_model, sinusoidal_embedding)

__all__ = ["UNet", "UNet_conditional", "count_parameters", "EMA", "Diffusion", "rebuild_model", "SelfAttention",
           "DoubleConv", "Down", "Up", "sinusoidal_embedding", "ARCHS", "CheckpointMismatch"]
