"""The policy interface: a text-to-image flow model as the sampler and learner see it.

Every model (the shipped tiny model, FLUX, SD3) implements this, so the algorithm code never
special-cases one. A policy is an ``nn.Module`` whose ``forward`` is the velocity, so the learner can
wrap it in DistributedDataParallel unchanged.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator, Sequence

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

    def shared_with_reference(self) -> list[object]:
        """Objects a reference copy shares instead of copying: frozen submodules (text encoders). Policies
        holding frozen parts or caches outside their submodules (the diffusers adapters) add them."""
        return [m for m in self.children()
                if any(True for _ in m.parameters()) and not any(p.requires_grad for p in m.parameters())]

    def reference_copy(self) -> "Policy":
        """A frozen copy of the current weights (eval mode, no grad) for the KL term of a full fine-tune;
        what is frozen already is shared, not copied."""
        memo = {id(o): o for o in self.shared_with_reference()}
        ref = copy.deepcopy(self, memo)
        ref.requires_grad_(False)
        return ref.eval()


def policy_device(policy: nn.Module) -> torch.device:
    return next(policy.parameters()).device


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every peft adapter layer off, then back on with the
    trainable flags it had (peft's toggle resets them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__}: no LoRA adapter to disable")
    flags = [(p, p.requires_grad) for m in layers for p in m.parameters()]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


class AdaptersDisabled:
    """A LoRA policy's KL reference: the same module and weights with its adapters switched off,
    evaluated without grad (a velocity function; it holds no weights of its own)."""

    def __init__(self, policy: nn.Module):
        self.policy = policy
        with adapters_disabled(policy):  # fail now, not at the first update, if there is no adapter
            pass

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with adapters_disabled(self.policy):
            return self.policy(latents, sigma, cond)
