"""What the evaluation test modules share: a tiny TorchScript-able feature extractor."""
import torch
import torch.nn as nn


class TinyFeatures(nn.Module):
    """A TorchScript-able feature extractor: fixed conv + global pooling -> 8-d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))
