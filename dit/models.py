"""DiT: Diffusion Transformer (Peebles & Xie, 2023) with adaLN-Zero blocks, written from the paper.

State dicts are key-for-key and shape-for-shape those of the official checkpoints
(`DiT-XL-2-256x256.pt` ...), so the published weights load with `model.load_state_dict(sd)`.
The attention / MLP / patch-embedding modules are our own (no timm); their sub-module names
(`attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `x_embedder.proj`) give the official keys.

    python -c "from models import DiT_models; print(DiT_models['DiT-B/2'](input_size=32))"
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    """adaLN modulation of token features x (N, T, D) by per-sample shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------- embeddings
class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens with a strided convolution."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        """(N, C, H, W) -> (N, T, D)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"DiT was built for {self.img_size}x{self.img_size} inputs, got "
                             f"{tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep followed by a 2-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps -> (N, dim) features; cosines first, then sines (GLIDE's layout)."""
        half = dim // 2
        # Frequencies built in float32 on CPU, like the checkpoints were trained with.
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        freqs = freqs.to(t.device)
        angles = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        if dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb

    def forward(self, t):
        """(N,) -> (N, D)."""
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding table; row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace a random fraction (or the forced ones) of the labels by the null class."""
        if force_drop_ids is None:
            # Drawn on the labels' device (its default generator), as the official code draws it.
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        """(N,) labels -> (N, D); drops labels while training when dropout_prob > 0.

        (N, D) floating-point `labels` are class embeddings already (rows of the table, or a mix of rows for
        class interpolation) and pass through unchanged: no parameter is added, the state dict stays official."""
        if labels.is_floating_point():
            return labels
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------- transformer
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and PyTorch's SDPA kernel."""

    def __init__(self, dim, num_heads):
        super().__init__()
        assert dim % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        """(N, T, D) -> (N, T, D)."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Two linear layers with tanh-approximated GELU in between."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        """(N, T, D) -> (N, T, D)."""
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero, paper sec. 3.2)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        """x (N, T, D), conditioning c (N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm + linear map from tokens to p*p*out_channels values."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        """(N, T, D) -> (N, T, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer on (latent) images of size input_size."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed (non-trained) 2-D sin-cos positions; a Parameter so it is part of the state dict.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output layers (adaLN-Zero)."""
        if self.pos_embed.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        pe = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv is a linear map of a patch
        # The patch conv bias keeps PyTorch's default Conv2d init, like the official code: with the
        # same seed the whole initial state dict is then identical to the official one.
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens -> (N, C, H, W)."""
        n, c, p = x.shape[0], self.out_channels, self.patch_size
        h = w = int(round(x.shape[1] ** 0.5))
        assert h * w == x.shape[1]
        x = x.reshape(n, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(n, c, h * p, w * p)

    def forward(self, x, t, y, return_tokens_at=None):
        """x (N, C, H, W) latents, t (N,) timesteps, y (N,) labels or (N, D) class embeddings -> (N, C_out, H, W).

        return_tokens_at=k: (output, the hidden tokens (N, T, D) after block k, 1-based) for REPA; an argument
        rather than a hook or a sub-module, so the state dict stays the official one and torch.compile sees
        one graph."""
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        tokens = None
        for i, block in enumerate(self.blocks, 1):
            x = block(x, c)
            if i == return_tokens_at:
                tokens = x
        out = self.unpatchify(self.final_layer(x, c))
        return out if return_tokens_at is None else (out, tokens)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_all_channels=False):
        """Classifier-free guidance on a batch [cond; uncond] whose two halves share x.

        By default only the first three output channels are guided, as in the official code (its
        published FIDs were computed that way); guide_all_channels=True guides every eps channel.
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        k = self.in_channels if guide_all_channels else min(3, self.in_channels)
        eps, rest = out[:, :k], out[:, k:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


# ----------------------------------------------------------------------------- position embedding
def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M,) positions -> (M, embed_dim): sines of all frequencies, then cosines (float64)."""
    assert embed_dim % 2 == 0
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim) table for row-major tokens.

    The first half of the channels encodes the column (x) index and the second half the row (y)
    index: the layout the published checkpoints were trained with.
    """
    assert embed_dim % 2 == 0
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float32),
                             np.arange(grid_size, dtype=np.float32), indexing="ij")
    first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, cols)
    second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, rows)
    return np.concatenate([first, second], axis=1)


# ----------------------------------------------------------------------------- registry
# name -> (depth, hidden_size, patch_size, num_heads): the paper's Table 1 configurations.
_CONFIGS = {
    "DiT-XL/2": (28, 1152, 2, 16), "DiT-XL/4": (28, 1152, 4, 16), "DiT-XL/8": (28, 1152, 8, 16),
    "DiT-L/2": (24, 1024, 2, 16), "DiT-L/4": (24, 1024, 4, 16), "DiT-L/8": (24, 1024, 8, 16),
    "DiT-B/2": (12, 768, 2, 12), "DiT-B/4": (12, 768, 4, 12), "DiT-B/8": (12, 768, 8, 12),
    "DiT-S/2": (12, 384, 2, 6), "DiT-S/4": (12, 384, 4, 6), "DiT-S/8": (12, 384, 8, 6),
}
# Not in the paper: tiny sizes for CPU demos and tests (DeiT-Tiny width at a third of the depth).
_EXTRA_CONFIGS = {"DiT-Ti/1": (4, 192, 1, 3), "DiT-Ti/2": (4, 192, 2, 3), "DiT-Ti/4": (4, 192, 4, 3)}


def _factory(name, depth, hidden, patch, heads):
    def build(**kwargs):
        return DiT(depth=depth, hidden_size=hidden, patch_size=patch, num_heads=heads, **kwargs)
    build.__name__ = name.replace("-", "_").replace("/", "_")
    build.__doc__ = f"{name}: depth {depth}, hidden size {hidden}, patch {patch}, {heads} heads."
    return build


DiT_models = {name: _factory(name, *cfg) for name, cfg in _CONFIGS.items()}
DiT_extra_models = {name: _factory(name, *cfg) for name, cfg in _EXTRA_CONFIGS.items()}
ALL_MODELS = {**DiT_models, **DiT_extra_models}
for _name, _fn in ALL_MODELS.items():
    globals()[_fn.__name__] = _fn  # DiT_XL_2(...), DiT_B_2(...) like the official module


def model_config(name):
    """The architecture numbers of a registry name as a plain dict."""
    depth, hidden, patch, heads = {**_CONFIGS, **_EXTRA_CONFIGS}[name]
    return {"depth": depth, "hidden_size": hidden, "patch_size": patch, "num_heads": heads}
