"""The spec's module of networks: `from modules import UNet, UNet_conditional, count_parameters, EMA`.

    model = UNet_conditional(num_classes=10, img_size=64)     # the default conditional architecture
    model.load_state_dict(torch.load("./models/DDPM_conditional/ckpt.pt"))

A thin re-export of models.py (where the code lives), kept under the name the spec promises.
"""
from models import (EMA, Diffusion, DoubleConv, Down, SelfAttention, UNet, UNet_conditional, Up,  # noqa: F401
                    count_parameters, rebuild_model, sinusoidal_embedding)

__all__ = ["UNet", "UNet_conditional", "count_parameters", "EMA", "Diffusion", "rebuild_model", "SelfAttention",
           "DoubleConv", "Down", "Up", "sinusoidal_embedding"]
