"""E-GRPO and the baselines as strategies of one machinery (docs/algorithm.md section 7).

A strategy decides how a prompt's samples are drawn and which transitions carry credit:
- egrpo:     entropy-merged branching from the ODE anchor; groups = (prompt, entry)
- g2rpo:     the same with tau = 0 (single-step branching, no merging)
- flowgrpo:  SDE (Flow-GRPO form) on every step; trajectory-level groups; trains all but the last step
- dancegrpo: DanceGRPO's constant-noise SDE on every step; trains a random fraction of the steps
- mixgrpo:   SDE inside a window of w steps that slides one step every ``window_shift_every`` iterations
The learner is the same for all: rows of (start latent, step) with their branches (algo/loss.py).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Sequence

import torch

from egrpo_ray.algo.entropy import MergePlan, build_plan, rollout_forwards
from egrpo_ray.algo.sampler import (Conditioning, Rollout, StepKernel, VelocityFn, branching_rollout, initial_noise,
                                    trajectory_rollout)
from egrpo_ray.algo.schedule import shifted_sigmas

if TYPE_CHECKING:  # the config sections are read by attribute: algo never imports pydantic at run time
    from egrpo_ray.config import AlgorithmConfig, SamplingConfig


class Strategy(ABC):
    name: str

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        self.sampling, self.algorithm = sampling, algorithm
        self.group_size = algorithm.group_size
        self.kernel = StepKernel(shifted_sigmas(sampling.steps, sampling.shift), sampling.eta, "flow", algorithm.logprob_reduction)

    def rollout(
        self,
        fn: VelocityFn,
        cond: Conditioning,
        prompts: Sequence[str],
        latent_shape: Sequence[int],
        generator: torch.Generator,
        iteration: int = 0,
        max_batch: int | None = None,
        device: torch.device | str | None = None,
    ) -> Rollout:
        """Sample every prompt's groups on ``device``. All randomness comes from ``generator`` (a CPU
        generator gives the same samples on any device, up to the model's numerics)."""
        noise = initial_noise(len(prompts), latent_shape, generator).to(device or "cpu")
        return self._rollout(fn, cond, prompts, noise, generator, iteration, max_batch)

    @abstractmethod
    def _rollout(self, fn, cond, prompts, noise, generator, iteration, max_batch) -> Rollout: ...

    @abstractmethod
    def forwards_per_prompt(self, iteration: int = 0) -> int:
        """Image-step forwards the rollout of one prompt costs."""


class BranchingStrategy(Strategy):
    """E-GRPO (and G^2RPO with tau = 0): branch G merged SDE steps off the ODE anchor."""

    name = "egrpo"

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig, merge_mode: str | None = None):
        super().__init__(sampling, algorithm)
        m = sampling.merge
        self.plan: MergePlan = build_plan(
            self.kernel.sigmas, sampling.eta, merge_mode or m.mode, m.tau, m.fixed_len, m.max_merge, m.active_fraction
        )

    def _rollout(self, fn, cond, prompts, noise, generator, iteration, max_batch) -> Rollout:
        return branching_rollout(fn, cond, prompts, noise, self.kernel, self.plan, self.group_size, generator, max_batch)

    def forwards_per_prompt(self, iteration: int = 0) -> int:
        return rollout_forwards(self.plan, self.group_size)


class G2RPO(BranchingStrategy):
    name = "g2rpo"

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        super().__init__(sampling, algorithm, merge_mode="none")


class TrajectoryStrategy(Strategy):
    """G full trajectories per prompt from shared noise; trajectory-level advantage."""

    def sde_steps(self, iteration: int) -> list[int]:
        return list(range(self.sampling.steps))

    def train_steps(self, iteration: int, generator: torch.Generator) -> list[int]:
        return self.sde_steps(iteration)

    def _rollout(self, fn, cond, prompts, noise, generator, iteration, max_batch) -> Rollout:
        return trajectory_rollout(
            fn, cond, prompts, noise, self.kernel, self.sde_steps(iteration), self.train_steps(iteration, generator),
            self.group_size, generator, max_batch,
        )

    def forwards_per_prompt(self, iteration: int = 0) -> int:
        return self.sampling.steps * self.group_size


class FlowGRPO(TrajectoryStrategy):
    name = "flowgrpo"

    def train_steps(self, iteration: int, generator: torch.Generator) -> list[int]:
        return list(range(self.sampling.steps - 1)) or [0]


class DanceGRPO(TrajectoryStrategy):
    name = "dancegrpo"

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        super().__init__(sampling, algorithm)
        self.kernel = StepKernel(self.kernel.sigmas, algorithm.dance_eta, "dance", algorithm.logprob_reduction)

    def train_steps(self, iteration: int, generator: torch.Generator) -> list[int]:
        steps = self.sampling.steps
        count = max(1, round(self.algorithm.timestep_fraction * steps))
        return sorted(torch.randperm(steps, generator=generator)[:count].tolist())


class MixGRPO(TrajectoryStrategy):
    name = "mixgrpo"

    def sde_steps(self, iteration: int) -> list[int]:
        w = self.algorithm.window_size
        start = min(iteration // self.algorithm.window_shift_every, self.sampling.steps - w)
        return list(range(start, start + w))


STRATEGIES: dict[str, type[Strategy]] = {
    "egrpo": BranchingStrategy,
    "g2rpo": G2RPO,
    "flowgrpo": FlowGRPO,
    "dancegrpo": DanceGRPO,
    "mixgrpo": MixGRPO,
}


def build_strategy(sampling: SamplingConfig, algorithm: AlgorithmConfig) -> Strategy:
    return STRATEGIES[algorithm.strategy](sampling, algorithm)
