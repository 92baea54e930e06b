"""A control, not a reward: scores drawn uniformly from [0, 1), independent of the images and prompts.

Trained on it, a run has no signal at all, so whatever happens to its images (drift, growing objects,
background noise) is the optimizer's own doing, the policy gradient's noise. Set a real run beside one trained
on ``rewards: [{name: random}]`` with the same seed and lr, and score both with the real reward
(``egrpo-ray eval --rewards alignment`` or benchmarks/alignment_terms.py): only the difference is the reward's.
"""
from __future__ import annotations

import threading
from typing import Sequence

import torch

from egrpo_ray.config import RewardConfig
from egrpo_ray.rewards.base import Reward


class RandomReward(Reward):
    name = "random"

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self._lock = threading.Lock()  # the reward service may score batches in worker threads

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RandomReward":
        return cls()

    def __call__(self, images: torch.Tensor | None, prompts: Sequence[str]) -> torch.Tensor:
        with self._lock:
            return torch.rand(len(prompts), generator=self.generator)
