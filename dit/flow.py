"""Flow matching for DiT (`train.py --objective flow`): the linear interpolant, its loss and its samplers.

Written from SiT (Ma et al. 2024) and rectified flow (Liu et al. 2023); not a script. With data x0 and
noise eps ~ N(0, I), the path is x_t = (1 - t) x0 + t eps, t in [0, 1] (t = 1 is pure noise), and the
network learns the velocity v = d x_t / dt = eps - x0 by plain MSE. Sampling integrates dx/dt = v from
t = 1 to t = 0 (Euler, Heun) or runs the reverse SDE with the same marginals (Euler-Maruyama).

The same DiT network (state-dict keys of the official checkpoints; learn_sigma=False, so it outputs the
velocity only) gets t * 1000 as its timestep: its sinusoidal embedder was laid out for DDPM's integer
steps 0..999, and feeding t in [0, 1] would leave every frequency but the highest nearly constant.

Identities used below (all exact for the linear interpolant, derived from x = (1-t) x0 + t eps and the
model's v = E[eps - x0 | x_t]):
    E[x0  | x_t] = x - t v                      (the denoised estimate)
    E[eps | x_t] = x + (1 - t) v
    score        = grad log p_t(x) = -E[eps | x_t] / t = -(x + (1 - t) v) / t
"""
import torch
from tqdm.auto import tqdm

T_SCALE = 1000.0  # the DiT timestep embedder's range: model time = t * T_SCALE
SAMPLERS = ("heun", "euler", "sde")  # the first is the default for flow checkpoints
DEFAULT_STEPS = 50


def _bcast(t, x):
    """(N,) or scalar t -> a tensor broadcastable against x (N, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1, *([1] * (x.dim() - 1))) if t.dim() else t


def interpolate(x0, noise, t):
    """x_t = (1 - t) x0 + t eps."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0, noise):
    """d x_t / dt of the linear interpolant: eps - x0 (independent of t)."""
    return noise - x0


def x0_from_velocity(x, t, v):
    """E[x0 | x_t] = x - t v."""
    return x - _bcast(t, x) * v


def score_from_velocity(x, t, v):
    """grad log p_t(x) = -(x + (1 - t) v) / t (t > 0)."""
    t = _bcast(t, x)
    return -(x + (1 - t) * v) / t


def training_losses(model, x0, t, model_kwargs=None, noise=None):
    """{"loss": per-sample MSE between the model's output and eps - x0 at x_t} for t (N,) in [0, 1]."""
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = interpolate(x0, noise, t)
    out = model(x_t, t * T_SCALE, **(model_kwargs or {}))
    err = (out.float() - velocity_target(x0, noise).float()) ** 2
    return {"loss": err.mean(dim=tuple(range(1, err.dim())))}


def time_grid(steps):
    """steps + 1 times from 1 down to 0, uniform (float64 so the last one is exactly 0)."""
    return torch.linspace(1.0, 0.0, int(steps) + 1, dtype=torch.float64).tolist()


def diffusion_coefficient(t):
    """w(t) of the reverse SDE: w = t, SiT's "sigma" form; the score term -w s / 2 = (x + (1-t) v) / 2 then has
    no 1/t singularity, and the injected noise vanishes as t -> 0."""
    return t


def _noise_like(x, generators):
    """N(0, I) like x, each sample from its own generator (per-image seeds), else the global RNG."""
    if generators is None:
        return torch.randn_like(x)
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generators])


@torch.no_grad()
def sample(velocity, z, steps, sampler="heun", generators=None, progress=False):
    """Integrate from z at t = 1 to t = 0; velocity(x, t) takes a float t in [0, 1].

    euler: x <- x + dt v (steps evaluations). heun: Euler predictor, trapezoid corrector (Karras et al. 2022,
    Alg. 1); the last step (to t = 0) is Euler, as in EDM: a corrector there would evaluate the velocity at
    t = 0, which is singular for data concentrated on few points, and one Euler step keeps the method second
    order (2 * steps - 1 evaluations). sde: Euler-Maruyama of dx = [v - w(t) score / 2] dt + sqrt(w(t)) dW
    backwards in time (same marginals as the ODE for any w >= 0); its last step goes to the denoised estimate
    E[x0 | x_t] = x - t v without noise (what the ODE's Euler step gives too).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown flow sampler {sampler!r} (one of {', '.join(SAMPLERS)})")
    ts = time_grid(steps)
    x = z.float()
    for i in tqdm(range(len(ts) - 1), desc=sampler, disable=not progress):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative
        v = velocity(x, t).float()
        if sampler == "euler" or t_next == 0.0:
            x = x + dt * v
        elif sampler == "heun":
            x_pred = x + dt * v
            x = x + dt * 0.5 * (v + velocity(x_pred, t_next).float())
        else:
            w = diffusion_coefficient(t)
            drift = v - 0.5 * w * score_from_velocity(x, t, v)
            x = x + dt * drift + (w * -dt) ** 0.5 * _noise_like(x, generators)
    return x


def guided_velocity(model, y, cfg_scale, null_y=None, guide_all_channels=True):
    """velocity(x, t) of a DiT for sample(): the model at time t * 1000 with labels y (N,) (or class embeddings
    (N, D)); with cfg_scale != 1, classifier-free guidance on the velocity, v_u + s (v_c - v_u), through the
    model's forward_with_cfg (null_y: the unconditional labels / embeddings, (N,) or (N, D))."""
    def velocity(x, t):
        n = x.shape[0]
        tt = torch.full((n,), float(t) * T_SCALE, device=x.device, dtype=torch.float32)
        if cfg_scale == 1.0:
            return model(x, tt, y)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null_y]), cfg_scale,
                                     guide_all_channels=guide_all_channels)
        return out[:n]
    return velocity
