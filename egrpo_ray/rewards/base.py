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

    def validate_inputs(self, image_shape: Sequence[int], prompts: Sequence[str]) -> object:
        """Cheap checks before scoring: raise ValueError for images of ``image_shape`` ([B, 3, H, W]) or
        ``prompts`` this reward cannot score (the reward service answers such HTTP requests 400)."""
        shape = tuple(image_shape)
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {shape}")
        if len(prompts) != shape[0]:
            raise ValueError(f"{shape[0]} images but {len(prompts)} prompts")
        return None
