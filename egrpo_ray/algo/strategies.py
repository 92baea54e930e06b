"""E-GRPO and the baselines as strategies of one machinery (docs/algorithm.md section 7).

A strategy decides how a prompt's samples are drawn and which transitions carry credit:
- egrpo:     entropy-merged branching from the ODE anchor; groups = (prompt, entry)
- g2rpo:     the same with tau = 0 (single-step branching, no merging)
- flowgrpo:  SDE (Flow-GRPO form) on every step; trajectory-level groups; trains all but the last step
- dancegrpo: DanceGRPO's constant-noise SDE on every step but the last (its image is the x0 prediction there);
             each sample trains its own random 60% of all but the last step
- mixgrpo:   SDE inside a window of w steps that slides one step every ``window_shift_every`` iterations,
             never reaching the last two steps
Each follows its source where the sources differ (section 8): advantage std, clip order, multi-reward
mode, shared noise.
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
    from egrpo_ray.config import AlgorithmConfig, MergeConfig, SamplingConfig


class Strategy(ABC):
    """Also resolves the options where the sources differ (docs/algorithm.md section 8): the config's
    value (algorithm.adv_std, adv_std_scope, adv_clip_order, multi_reward, shared_noise) or, when it is None,
    the strategy's own source's default. training.group_advantages passes ``adv_std``, ``adv_std_scope``,
    ``adv_clip_order`` and ``multi_reward`` to the advantages."""

    name: str
    # E-GRPO's defaults, from its authors' code (VisualGRPO, built on DanceGRPO/G2RPO): group_rewards.std()
    # is torch's unbiased std; the advantage is clamped only in the loss, after any sum over rewards.
    source_adv_std = "unbiased"
    source_adv_std_scope = "group"
    source_adv_clip_order = "after_sum"
    source_multi_reward = "reward"  # its RewardManager weight-sums the scores
    source_shared_noise = True
    noise_sharing_optional = False  # branching: the group branches off ONE anchor, so it shares the noise

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        self.sampling, self.algorithm = sampling, algorithm
        self.group_size = algorithm.group_size
        self.kernel = StepKernel(shifted_sigmas(sampling.steps, sampling.shift), sampling.eta, "flow", algorithm.logprob_reduction)
        self.adv_std = _resolved(algorithm, "adv_std", self.source_adv_std)
        self.adv_std_scope = _resolved(algorithm, "adv_std_scope", self.source_adv_std_scope)
        self.adv_clip_order = _resolved(algorithm, "adv_clip_order", self.source_adv_clip_order)
        self.multi_reward = _resolved(algorithm, "multi_reward", self.source_multi_reward)
        self.shared_noise = bool(_resolved(algorithm, "shared_noise", self.source_shared_noise))
        if not self.shared_noise and not self.noise_sharing_optional:
            raise ValueError(f"algorithm.shared_noise=false does not apply to {algorithm.strategy}: its group branches "
                             "off one ODE anchor per prompt, so it always shares the initial noise")

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
        per_prompt = 1 if self.shared_noise else self.group_size
        noise = initial_noise(len(prompts), latent_shape, generator, per_prompt).to(device or "cpu")
        return self._rollout(fn, cond, prompts, noise, generator, iteration, max_batch)

    @abstractmethod
    def _rollout(self, fn, cond, prompts, noise, generator, iteration, max_batch) -> Rollout: ...

    @abstractmethod
    def forwards_per_prompt(self, iteration: int = 0) -> int:
        """Image-step forwards the rollout of one prompt costs."""


def _resolved(algorithm: AlgorithmConfig, option: str, source_default):
    value = getattr(algorithm, option, None)
    return source_default if value is None else value


def merge_plan(sigmas: torch.Tensor, eta: float, merge: "MergeConfig", mode: str | None = None) -> MergePlan:
    """The plan a ``sampling.merge`` section asks for (``mode`` overrides its mode, as G2RPO's "none" does)."""
    return build_plan(sigmas, eta, mode or merge.mode, merge.tau, merge.fixed_len, merge.max_merge,
                      merge.active_fraction, merge.active_start)


class BranchingStrategy(Strategy):
    """E-GRPO (and G^2RPO with tau = 0): branch G merged SDE steps off the ODE anchor."""

    name = "egrpo"

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig, merge_mode: str | None = None):
        super().__init__(sampling, algorithm)
        self.plan: MergePlan = merge_plan(self.kernel.sigmas, sampling.eta, sampling.merge, merge_mode)

    def _rollout(self, fn, cond, prompts, noise, generator, iteration, max_batch) -> Rollout:
        return branching_rollout(fn, cond, prompts, noise, self.kernel, self.plan, self.group_size, generator, max_batch,
                                 self.sampling.suffix)

    def forwards_per_prompt(self, iteration: int = 0) -> int:
        return rollout_forwards(self.plan, self.group_size, self.sampling.suffix)


class G2RPO(BranchingStrategy):
    name = "g2rpo"

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        super().__init__(sampling, algorithm, merge_mode="none")


class TrajectoryStrategy(Strategy):
    """G full trajectories per prompt; trajectory-level advantage."""

    noise_sharing_optional = True

    def sde_steps(self, iteration: int) -> list[int]:
        return list(range(self.sampling.steps))

    def train_steps(self, iteration: int, num_samples: int, generator: torch.Generator) -> list[int] | torch.Tensor:
        """The steps every sample trains, or a bool mask [num_samples, T] of each sample's own."""
        return self.sde_steps(iteration)

    def _rollout(self, fn, cond, prompts, noise, generator, iteration, max_batch) -> Rollout:
        train = self.train_steps(iteration, len(prompts) * self.group_size, generator)
        return trajectory_rollout(
            fn, cond, prompts, noise, self.kernel, self.sde_steps(iteration), train, self.group_size, generator, max_batch,
        )

    def forwards_per_prompt(self, iteration: int = 0) -> int:
        return self.sampling.steps * self.group_size


class FlowGRPO(TrajectoryStrategy):
    """Flow-GRPO: SDE on every step, trains all but the last; its ``sample.same_latent`` is off by
    default (each sample its own initial noise) and its stat tracker normalises with np.std (population)
    of the whole batch (``global_std = True`` in its shipped configs), about each prompt's own mean."""

    name = "flowgrpo"
    source_adv_std = "population"
    source_adv_std_scope = "batch"
    source_shared_noise = False

    def train_steps(self, iteration: int, num_samples: int, generator: torch.Generator) -> list[int]:
        return list(range(self.sampling.steps - 1)) or [0]


class DanceGRPO(TrajectoryStrategy):
    """DanceGRPO (train_grpo_flux.py with its shipped script: --init_same_noise, --timestep_fraction 0.6):
    its own constant-noise SDE on every step but the last; the last step is never trained; each sample trains
    int((T - 1) x timestep_fraction) of the other steps, drawn by its own random permutation. Its image is
    the last step's x0 prediction (``latents = pred_original``), x - s_{T-1} v: exactly an ODE (Euler) last
    step, so the image carries no noise from a step that is never trained."""

    name = "dancegrpo"

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        super().__init__(sampling, algorithm)
        self.kernel = StepKernel(self.kernel.sigmas, algorithm.dance_eta, "dance", algorithm.logprob_reduction)

    def sde_steps(self, iteration: int) -> list[int]:
        return list(range(max(1, self.sampling.steps - 1)))  # T = 1: the only step is the trained one

    def train_steps(self, iteration: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
        steps = self.sampling.steps
        candidates = max(1, steps - 1)  # T = 1 has no "other" step: train the only one
        count = max(1, int(candidates * self.algorithm.timestep_fraction))
        mask = torch.zeros(num_samples, steps, dtype=torch.bool)
        for sample in range(num_samples):
            mask[sample, torch.randperm(candidates, generator=generator)[:count]] = True
        return mask


class MixGRPO(TrajectoryStrategy):
    """MixGRPO (progressive window, its shipped script: --roll_back, --init_same_noise): SDE and training
    on a window of w steps starting at ``start``, which moves one step every ``window_shift_every``
    iterations. Its max_timesteps = T - 2 bounds the window (it shrinks near the end and never covers
    the last two steps); past the end it rolls back to step 0. (The source's start also sits at T - 2
    for one round, an empty window that trains nothing; we roll back one round earlier.)"""

    name = "mixgrpo"
    source_multi_reward = "advantage"  # --multi_reward_mix advantage_aggr (its default and shipped script)

    def __init__(self, sampling: SamplingConfig, algorithm: AlgorithmConfig):
        super().__init__(sampling, algorithm)
        if sampling.steps < 3:
            raise ValueError("mixgrpo needs sampling.steps >= 3: its window never covers the last two steps")

    def sde_steps(self, iteration: int) -> list[int]:
        last = self.sampling.steps - 2  # exclusive bound: steps T-2 and T-1 stay ODE
        start = (iteration // self.algorithm.window_shift_every) % last
        return list(range(start, min(start + self.algorithm.window_size, last)))


STRATEGIES: dict[str, type[Strategy]] = {
    "egrpo": BranchingStrategy,
    "g2rpo": G2RPO,
    "flowgrpo": FlowGRPO,
    "dancegrpo": DanceGRPO,
    "mixgrpo": MixGRPO,
}


def build_strategy(sampling: SamplingConfig, algorithm: AlgorithmConfig) -> Strategy:
    return STRATEGIES[algorithm.strategy](sampling, algorithm)
