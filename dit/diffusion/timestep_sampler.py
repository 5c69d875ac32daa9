"""Distributions over training timesteps (uniform, or importance sampling by the loss' second moment)."""
from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.distributed as dist


def create_named_schedule_sampler(name, diffusion):
    """'uniform' or 'loss-second-moment'."""
    if name == "uniform":
        return UniformSampler(diffusion)
    if name == "loss-second-moment":
        return LossSecondMomentResampler(diffusion)
    raise NotImplementedError(f"unknown schedule sampler: {name}")


class ScheduleSampler(ABC):
    """Samples timesteps with importance weights that keep the loss estimate unbiased."""

    @abstractmethod
    def weights(self):
        """Unnormalised positive weights, one per timestep."""

    def sample(self, batch_size, device):
        """(timesteps, weights) for a batch."""
        w = self.weights()
        p = w / np.sum(w)
        idx = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = 1 / (len(p) * p[idx])
        return (torch.from_numpy(idx).long().to(device),
                torch.from_numpy(weights).float().to(device))


class UniformSampler(ScheduleSampler):
    """Every timestep equally likely."""

    def __init__(self, diffusion):
        self.diffusion = diffusion
        self._weights = np.ones([diffusion.num_timesteps])

    def weights(self):
        return self._weights


class LossAwareSampler(ScheduleSampler):
    """A sampler that learns from the losses it sees (gathered over ranks)."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather (t, loss) pairs from all ranks, then update_with_all_losses."""
        if dist.is_available() and dist.is_initialized():
            pairs = [None] * dist.get_world_size()
            dist.all_gather_object(pairs, (local_ts.tolist(), local_losses.tolist()))
            ts = [t for p in pairs for t in p[0]]
            losses = [x for p in pairs for x in p[1]]
        else:
            ts, losses = local_ts.tolist(), local_losses.tolist()
        self.update_with_all_losses(ts, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from the losses of all ranks."""


class LossSecondMomentResampler(LossAwareSampler):
    """p(t) proportional to sqrt(E[loss_t^2]) once every timestep has a loss history (Nichol & Dhariwal)."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not self._warmed_up():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        w = np.sqrt(np.mean(self._loss_history ** 2, axis=-1))
        w /= np.sum(w)
        w *= 1 - self.uniform_prob
        w += self.uniform_prob / len(w)
        return w

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def _warmed_up(self):
        return (self._loss_counts == self.history_per_term).all()
