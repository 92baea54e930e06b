"""The reward interface: score (images, prompts) to floats. No Ray here."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch


class Reward(ABC):
    """A reward model. ``images`` are [B, 3, H, W], float in [0, 1] or uint8 (egrpo_ray/images.py);
    returns [B] float32 on the CPU."""

    name: str = "reward"

    @abstractmethod
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...
