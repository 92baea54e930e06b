"""The policy interface: a text-to-image flow model as the sampler and learner see it.

Every model (the shipped tiny model, FLUX, SD3) implements this, so the algorithm code never
special-cases one. A policy is an ``nn.Module`` whose ``forward`` is the velocity, so the learner can
wrap it in DistributedDataParallel unchanged.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn

from egrpo_ray.algo.sampler import Conditioning


class Policy(nn.Module, ABC):
    """A flow-matching text-to-image model.

    Latents are held by the sampler in ``latent_shape`` (per sample, float32). ``sigma`` is the
    flow-matching noise level s in [0, 1], one value per batch row.
    """

    latent_shape: tuple[int, ...]

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Text conditioning for each prompt (implementations cache per prompt)."""

    @abstractmethod
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity v(x_s, s, c) ~ eps - x0, float32, same shape as ``latents``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W], float in [0, 1]."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (all of them, or only LoRA): what weight sync ships."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def policy_device(policy: nn.Module) -> torch.device:
    return next(policy.parameters()).device
