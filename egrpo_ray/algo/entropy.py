"""Step entropy and merge plans (docs/algorithm.md section 3).

One SDE step is Gaussian with covariance std^2 I, so its per-dimension entropy power is
E(i, l) = exp(h/d) = sqrt(2 pi e) * sigma_i * sqrt(s_i - s_{i+l}). The paper gives the threshold
(tau = 2.2) but not the scale; this per-dimension reading reproduces its plans.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from egrpo_ray.algo.sde import flow_sigma
from egrpo_ray.algo.solvers import SuffixSetting, suffix_forwards

SQRT_2PI_E = math.sqrt(2 * math.pi * math.e)


def noise_level(sigmas: torch.Tensor, i: int, eta: float) -> float:
    """Flow-GRPO's sigma_i at schedule index i (s_1 stands in for s_0 = 1 in the denominator)."""
    return float(flow_sigma(sigmas[i], sigmas[1], eta))


def step_entropy(sigmas: torch.Tensor, i: int, l: int, eta: float) -> float:
    """E(i, l): the entropy power of one SDE transition from s_i to s_{i+l}, sigma taken at s_i."""
    return SQRT_2PI_E * noise_level(sigmas, i, eta) * math.sqrt(float(sigmas[i] - sigmas[i + l]))


@dataclass(frozen=True)
class MergePlan:
    """Entries (i, l): one merged SDE transition from schedule step i to i + l; ODE everywhere else."""

    steps: int
    entries: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        prev_end = 0
        for i, l in self.entries:
            if l < 1 or i < prev_end or i + l > self.steps:
                raise ValueError(f"invalid merge plan entry ({i}, {l}) for {self.steps} steps")
            prev_end = i + l

    def __str__(self) -> str:
        return " ".join(f"({i},{l})" for i, l in self.entries)

    def to_json(self) -> str:
        return json.dumps({"steps": self.steps, "entries": [list(e) for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> "MergePlan":
        d = json.loads(text)
        return cls(d["steps"], tuple((int(i), int(l)) for i, l in d["entries"]))

    @property
    def last_start(self) -> int:
        return self.entries[-1][0]


def build_plan(
    sigmas: torch.Tensor,
    eta: float,
    mode: Literal["adaptive", "fixed", "none"] = "adaptive",
    tau: float = 2.2,
    fixed_len: int = 2,
    max_merge: Optional[int] = None,
    active_fraction: float = 0.5,
    active_start: float = 0.0,
) -> MergePlan:
    """Walk i over the active part of the schedule, [active_start, active_fraction) x T, and choose each
    entry's length.

    adaptive: the smallest l with E(i, l) >= tau. fixed: l = fixed_len wherever the single step is
    low-entropy (E(i, 1) < tau), else 1. none (or tau = 0): every active step alone (G^2RPO).
    l is capped at the end of the schedule and at max_merge.
    """
    steps = len(sigmas) - 1
    active_end = steps * active_fraction
    entries, i = [], int(steps * active_start)
    while i < active_end:
        cap = steps - i if max_merge is None else min(max_merge, steps - i)
        if mode == "none" or tau <= 0:
            l = 1
        elif mode == "fixed":
            l = 1 if step_entropy(sigmas, i, 1, eta) >= tau else fixed_len
        else:
            l = next((k for k in range(1, cap + 1) if step_entropy(sigmas, i, k, eta) >= tau), cap)
        l = max(1, min(l, cap))
        entries.append((i, l))
        i += l
    return MergePlan(steps, tuple(entries))


def rollout_forwards(plan: MergePlan, group_size: int, suffix: SuffixSetting | None = None) -> int:
    """Image-step forwards per prompt of the branching sampler (algo/sampler.py).

    The anchor runs to the last entry start; its velocity at each entry start is the shared merged
    step's (same input, same sigma), then every branch finishes by ODE: (last_start + 1) + G * sum(T - i - l)
    with the full Euler suffix; ``suffix`` (solver, steps) replaces each T - i - l by that suffix's forwards.
    """
    return plan.last_start + 1 + group_size * sum(suffix_forwards(plan.steps - i - l, suffix) for i, l in plan.entries)


def paper_forwards(plan: MergePlan, group_size: int) -> int:
    """The paper's count, T + sum(1 + G * (T - i - l)): a full anchor and a separate merged-step call."""
    return plan.steps + sum(1 + group_size * (plan.steps - i - l) for i, l in plan.entries)
