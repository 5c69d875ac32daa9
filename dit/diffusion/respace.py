"""Timestep respacing: run a diffusion trained with T steps using a subset of its timesteps.

    from diffusion import create_diffusion; d = create_diffusion("250")   # 250 of 1000 steps
    d = create_diffusion("ddim50")                                         # evenly strided, DDIM-style
"""
import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """Set of original timesteps to keep.

    section_counts: a list of ints or a comma string ("10,15,20"): the T steps are cut into equal
    sections and each section i keeps section_counts[i] steps, evenly spread (rounded with Python's
    round, first and last of the section included). "ddimN" keeps range(0, T, stride) with exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {want} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional index (rather than i * stride) so the kept set is the reference one.
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion over the kept timesteps, with betas recomputed so alphas_cumprod match."""

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        last, betas = 1.0, []
        for i, alpha_bar in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                betas.append(1 - alpha_bar / last)
                last = alpha_bar
                self.timestep_map.append(i)
        kwargs["betas"] = np.array(betas)
        super().__init__(**kwargs)

    def p_mean_variance(self, model, *args, **kwargs):
        """As GaussianDiffusion, with the model called on original timesteps."""
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        """As GaussianDiffusion, with the model called on original timesteps."""
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        """As GaussianDiffusion, with cond_fn called on original timesteps."""
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        """As GaussianDiffusion, with cond_fn called on original timesteps."""
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps)

    def _scale_timesteps(self, t):
        return t  # the wrapper maps indices to original timesteps


class _WrappedModel:
    """Calls model(x, timestep_map[t]) so the network always sees timesteps of the original chain."""

    def __init__(self, model, timestep_map, original_num_steps):
        self.model = model
        self.timestep_map = timestep_map
        self.original_num_steps = original_num_steps

    def __call__(self, x, ts, **kwargs):
        mapping = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, mapping[ts], **kwargs)
