"""Exponential moving average of a model's weights: the model ``pouta-train`` delivers.

A CPU budget buys ~400-2000 steps of batch 4, so the last weights carry the noise of the
last few batches; the average over the recent steps is the same training with that noise
smoothed out. Float parameters and buffers (BatchNorm's running statistics too) are
averaged, integer buffers (BatchNorm's batch counter) copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """``module`` holds ``decay * module + (1 - decay) * model`` after each ``update``.

    The decay ramps up as ``(1 + step) / (10 + step)`` to ``decay``, so early weights
    (a random start) do not linger in the average of a short run.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Blend ``model``'s weights in after optimizer step ``step`` (1-based)."""
        ours, theirs = self.module.state_dict(), model.state_dict()
        weight = 1.0 - self.decay_at(step)
        for k, v in ours.items():
            if v.is_floating_point():
                v.lerp_(theirs[k].detach(), weight)
            else:
                v.copy_(theirs[k])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
