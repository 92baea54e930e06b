"""Group-relative advantages (docs/algorithm.md sections 5 and 8).

A_k = (R_k - mean(R)) / (std(R) + eps) within each group, clipped to +-clip. Where the sources differ
the caller picks (the strategy resolves its own source's default):
- std: "unbiased" (torch.std, divides by n - 1: DanceGRPO, G2RPO, MixGRPO, the E-GRPO code) or
  "population" (numpy's default, divides by n: Flow-GRPO);
- std scope: "group" (each group's own spread: every source but one) or "batch" (one spread over every
  sample of the update, each group keeping its own mean: Flow-GRPO's ``global_std``, on by default in its
  shipped configs). With several learner ranks (an initialised torch.distributed group) the spread is over
  every rank's samples, as the source gathers all GPUs' rewards: every rank must then compute it;
- clip order in "advantage" mode: "after_sum" clamps the weighted sum of the per-reward z-scores (every
  source clamps in the loss, after the sum), "each_reward" clamps each z-score before the sum.
A group whose rewards have no spread carries no signal: it is flagged so the loss skips it, and
counted (the zero-std ratio).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.distributed as dist

ZERO_STD = 1e-6  # below this spread a group is treated as constant
StdKind = Literal["population", "unbiased"]
ClipOrder = Literal["each_reward", "after_sum"]
StdScope = Literal["group", "batch"]


@dataclass
class Advantages:
    values: torch.Tensor  # [N] per sample, 0 for samples of zero-std groups
    valid_group: torch.Tensor  # [num_groups] bool: the group has reward spread
    zero_std_count: int

    @property
    def zero_std_ratio(self) -> float:
        return self.zero_std_count / max(1, len(self.valid_group))


def _group_stats(rewards: torch.Tensor, group: torch.Tensor, num_groups: int, std: StdKind) -> tuple[torch.Tensor, torch.Tensor]:
    if std not in ("population", "unbiased"):
        raise ValueError(f"advantage std must be 'population' or 'unbiased', got {std!r}")
    ones = torch.ones_like(rewards)
    count = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, group, ones)
    mean = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, group, rewards) / count
    sq = torch.zeros(num_groups, dtype=rewards.dtype).index_add_(0, group, (rewards - mean[group]) ** 2)
    dof = (count - 1).clamp(min=1) if std == "unbiased" else count  # a 1-sample group has zero spread either way
    return mean, (sq / dof).sqrt()


def _zscores(rewards: torch.Tensor, group: torch.Tensor, eps: float, std: StdKind,
             scope: StdScope = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """Unclipped z-scores [N] (float64) about each group's mean, and the groups with spread."""
    if scope not in ("group", "batch"):
        raise ValueError(f"advantage std scope must be 'group' or 'batch', got {scope!r}")
    rewards = rewards.double()
    mean, sd = _group_stats(rewards, group, int(group.max()) + 1, std)
    spread = sd[group] if scope == "group" else _batch_spread(rewards, std)
    return (rewards - mean[group]) / (spread + eps), sd > ZERO_STD


def _batch_spread(rewards: torch.Tensor, std: StdKind) -> torch.Tensor:
    """The std of every sample of the update, on every learner rank (two passes: count and sum, then the
    squared deviations, each summed over the ranks)."""
    count_sum = torch.stack([torch.tensor(float(len(rewards)), dtype=torch.float64), rewards.sum()])
    _sum_over_ranks(count_sum)
    count, total = count_sum.tolist()
    sq = ((rewards - total / count) ** 2).sum().reshape(1)
    _sum_over_ranks(sq)
    dof = max(count - 1, 1) if std == "unbiased" else count
    return (sq[0] / dof).sqrt()


def _sum_over_ranks(t: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)


def _finish(z: torch.Tensor, valid: torch.Tensor, group: torch.Tensor, clip: float) -> Advantages:
    adv = torch.where(valid[group], z.clamp(-clip, clip), torch.zeros_like(z)).float()
    return Advantages(adv, valid, int((~valid).sum()))


def group_advantages(rewards: torch.Tensor, group: torch.Tensor, eps: float = 1e-8, clip: float = 5.0,
                     std: StdKind = "population", scope: StdScope = "group") -> Advantages:
    """Per-group z-scores of one reward [N] for samples with group ids [N] (0..num_groups-1)."""
    z, valid = _zscores(rewards, group, eps, std, scope)
    return _finish(z, valid, group, clip)


def combine_rewards(
    rewards: Mapping[str, torch.Tensor],
    weights: Mapping[str, float],
    group: torch.Tensor,
    mode: Literal["reward", "advantage"] = "reward",
    eps: float = 1e-8,
    clip: float = 5.0,
    std: StdKind = "population",
    clip_order: ClipOrder = "each_reward",
    scope: StdScope = "group",
) -> Advantages:
    """Multi-reward advantages. "reward": weight-sum the rewards, then normalise in the group.
    "advantage": normalise each reward in the group, then weight-sum, clipping each z-score before the
    sum or only the sum (``clip_order``); a group counts as zero-std only when every reward is constant
    in it."""
    if mode == "reward":
        total = sum(weights[k] * rewards[k].double() for k in rewards)
        return group_advantages(total, group, eps, clip, std, scope)
    if clip_order not in ("each_reward", "after_sum"):
        raise ValueError(f"advantage clip order must be 'each_reward' or 'after_sum', got {clip_order!r}")
    per = {k: _zscores(r, group, eps, std, scope) for k, r in rewards.items()}
    # a constant reward contributes 0 in its group (its numerator is 0 there anyway)
    parts = {k: torch.where(valid[group], z, torch.zeros_like(z)) for k, (z, valid) in per.items()}
    if clip_order == "each_reward":
        parts = {k: z.clamp(-clip, clip) for k, z in parts.items()}
    total = sum(weights[k] * z for k, z in parts.items())
    valid = torch.stack([v for _, v in per.values()]).any(0)
    return _finish(total, valid, group, float("inf") if clip_order == "each_reward" else clip)
