"""The training step, shared by the single-process reference loop and the Ray service.

Rollout side: ``sample_and_score`` (rollout, decode, reward). Learner side: ``learn`` (advantages
over whole groups, then the clipped-surrogate update). Neither knows about Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from egrpo_ray.algo.advantages import Advantages, combine_rewards
from egrpo_ray.algo.gradient_noise import GradientNoise
from egrpo_ray.algo.sampler import Rollout
from egrpo_ray.algo.strategies import Strategy
from egrpo_ray.algo.update import UpdateSettings, grpo_update
from egrpo_ray.config import ExperimentConfig, LearnerConfig
from egrpo_ray.models.base import AdaptersDisabled, Policy, policy_device

RewardFn = Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


@dataclass
class ScoredRollout:
    """Whole groups of one rollout call with their rewards: the replay queue's item."""

    rollout: Rollout
    rewards: dict[str, torch.Tensor]  # name -> [N]
    policy_version: int
    worker: int = 0

    @property
    def num_prompts(self) -> int:
        return len(self.rollout.prompts)


def make_reward_fn(rewards: Mapping[str, Callable]) -> RewardFn:
    """Score a batch of images with every reward model."""

    def score(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: reward(images, prompts).float() for name, reward in rewards.items()}

    return score


def make_optimizer(policy: torch.nn.Module, learner: LearnerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, as the config's learner section sets it (every loop builds this one)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=learner.lr, weight_decay=learner.weight_decay, eps=learner.adam_eps)


def make_gradient_noise(learner: LearnerConfig) -> GradientNoise | None:
    """The run's gradient-noise measurement (``learner.gradient_noise``; one gradient-sized buffer per rank)."""
    return GradientNoise(on_host=learner.gradient_noise_buffer == "host") if learner.gradient_noise else None


@torch.no_grad()
def sample_and_score(
    policy: Policy,
    strategy: Strategy,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    generator: torch.Generator,
    iteration: int,
    policy_version: int,
    worker: int = 0,
    max_batch: int | None = None,
) -> ScoredRollout:
    cond = policy.encode_prompts(prompts)
    rollout = strategy.rollout(policy, cond, prompts, policy.latent_shape, generator, iteration, max_batch, policy_device(policy))
    images = policy.decode(rollout.final_latents).cpu()
    rollout = rollout.to("cpu")  # queue items travel between processes: keep them on the CPU
    sample_prompts = [rollout.prompts[i] for i in rollout.sample_prompt.tolist()]
    rewards = reward_fn(images, sample_prompts)
    return ScoredRollout(rollout, rewards, policy_version, worker)


def group_advantages(rewards: Mapping[str, torch.Tensor], group: torch.Tensor, cfg: ExperimentConfig,
                     strategy: Strategy) -> Advantages:
    """The weighted rewards' advantages within each group. Multi-reward mode, std, clip order and std scope are
    the strategy's source's defaults unless configured (docs/algorithm.md section 8)."""
    alg = cfg.algorithm
    return combine_rewards(rewards, {r.name: r.weight for r in cfg.rewards}, group, strategy.multi_reward, alg.adv_eps,
                           alg.adv_clip, strategy.adv_std, strategy.adv_clip_order, strategy.adv_std_scope)


def learn(
    fn: Callable,
    policy: Policy,
    items: Sequence[ScoredRollout],
    cfg: ExperimentConfig,
    strategy: Strategy,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ref_fn: Callable | None = None,
    parts: list[torch.Tensor] | None = None,
    num_parts: int | None = None,
    policy_version: int | None = None,
    noise: GradientNoise | None = None,
) -> dict[str, float]:
    """Advantages over the items' groups, then one clipped-surrogate update through ``fn``
    (the policy itself, or its DDP wrapper). Returns the step's metrics.

    ``ref_fn``: the KL reference (``reference_model``); ``num_parts``: the minibatch count every
    data-parallel rank uses; ``policy_version``: the weights' version now, so that groups it sampled
    count as on-policy (decoupled weight exactly 1); ``noise``: the run's gradient-noise measurement, whose
    statistic for this update joins the metrics."""
    batch = Rollout.concat([it.rollout for it in items]).to(policy_device(policy))
    rewards = {k: torch.cat([it.rewards[k] for it in items]) for k in items[0].rewards}
    weights = {r.name: r.weight for r in cfg.rewards}
    adv = group_advantages(rewards, batch.sample_group, cfg, strategy)
    cond = policy.encode_prompts(batch.prompts)
    settings = UpdateSettings.from_config(cfg.algorithm, cfg.learner)
    on_policy = None
    if policy_version is not None:
        on_policy = torch.cat([torch.full((len(it.rollout.step_index),), it.policy_version == policy_version)
                               for it in items])
    stats = grpo_update(fn, cond, batch, adv, strategy.kernel, settings, optimizer, generator, ref_fn, parts,
                        num_parts, on_policy, noise)
    total = sum(weights[k] * rewards[k] for k in rewards)
    out = {
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std(unbiased=False)),
        "zero_std_ratio": adv.zero_std_ratio,
        "groups": len(adv.valid_group),
        "samples": len(total),
        **{f"reward_{k}": float(v.mean()) for k, v in rewards.items()},
        **{k: float(v) for k, v in vars(stats).items()},
        **(noise.finish() if noise is not None else {}),
    }
    return out


def reference_model(policy: Policy, cfg: ExperimentConfig) -> Callable | None:
    """The KL reference (None when algorithm.kl_beta is 0): a LoRA policy is its own reference with
    the adapters switched off (no second copy); a full fine-tune gets a frozen copy of the starting
    weights (an nn.Module: the Ray learner shards it like the policy). Build it before loading a
    checkpoint: the reference is the base model."""
    if cfg.algorithm.kl_beta <= 0:
        return None
    if cfg.model.lora.enabled:
        return AdaptersDisabled(policy)
    return policy.reference_copy()
