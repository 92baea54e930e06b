"""Group-relative advantages (docs/algorithm.md section 5).

A_k = (R_k - mean(R)) / (std(R) + eps) within each group, clipped to +-clip. std is the population
std (numpy's default, as Flow-GRPO). A group whose rewards have no spread carries no signal: it is
flagged so the loss skips it, and counted (the zero-std ratio).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch

ZERO_STD = 1e-6  # below this spread a group is treated as constant


@dataclass
class Advantages:
    values: torch.Tensor  # [N] per sample, 0 for samples of zero-std groups
    valid_group: torch.Tensor  # [num_groups] bool: the group has reward spread
    zero_std_count: int

    @property
    def zero_std_ratio(self) -> float:
        return self.zero_std_count / max(1, len(self.valid_group))


def _group_stats(rewards: torch.Tensor, group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    ones = torch.ones_like(rewards)
    count = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, group, ones)
    mean = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / count
    var = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, group, (rewards - mean[group]) ** 2) / count
    return mean, var.sqrt()


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-8, clip: float = 5.0) -> Advantages:
    """Per-group z-scores of one reward [N] for samples with group ids [N] (0..num_groups-1)."""
    rewards = rewards.double()
    num_groups = int(group.max()) + 1
    mean, std = _group_stats(rewards, group, num_groups)
    valid = std > ZERO_STD
    adv = ((rewards - mean[group]) / (std[group] + eps)).clamp(-clip, clip)
    adv = torch.where(valid[group], adv, torch.zeros_like(adv)).float()
    return Advantages(adv, valid, int((~valid).sum()))


def combine_rewards(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group: torch.Tensor,
    mode: Literal["reward", "advantage"] = "reward",
    eps: float = 1e-8,
    clip: float = 5.0,
) -> Advantages:
    """Multi-reward advantages. "reward": weight-sum the rewards, then normalise in the group.
    "advantage": normalise each reward in the group, then weight-sum (a group counts as zero-std only
    when every reward is constant in it)."""
    if mode == "reward":
        total = sum(weights[k] * rewards[k].double() for k in rewards)
        return group_advantages(total, group, eps, clip)
    per = {k: group_advantages(r, group, eps, clip) for k, r in rewards.items()}
    values = sum(weights[k] * a.values for k, a in per.items())
    valid = torch.stack([a.valid_group for a in per.values()]).any(0)
    return Advantages(values.float(), valid, int((~valid).sum()))
