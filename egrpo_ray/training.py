"""The training step's pieces, shared by the single-process reference loop and the Ray service.

Rollout side: ``sample_and_score`` (rollout, decode, reward). Learner side: ``learn`` (advantages
over whole groups, then the clipped-surrogate update). Neither knows about Ray.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from egrpo_ray.algo.advantages import combine_rewards
from egrpo_ray.algo.sampler import Rollout, sample_ode
from egrpo_ray.algo.strategies import Strategy
from egrpo_ray.algo.update import grpo_update
from egrpo_ray.config import ExperimentConfig, PromptsConfig
from egrpo_ray.models.base import Policy

RewardFn = Callable[[torch.Tensor, Sequence[str]], dict[str, torch.Tensor]]


def policy_device(policy: Policy) -> torch.device:
    return next(policy.parameters()).device


@dataclass
class ScoredRollout:
    """Whole groups of one rollout call with their rewards: the replay queue's item."""

    rollout: Rollout
    rewards: dict[str, torch.Tensor]  # name -> [N]
    policy_version: int
    worker: int = 0
    sample_seconds: float = 0.0
    reward_seconds: float = 0.0

    @property
    def num_prompts(self) -> int:
        return len(self.rollout.prompts)


def prompt_splits(cfg: PromptsConfig) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts) from the configured source."""
    if cfg.source == "tiny":
        from egrpo_ray.tasks.shapes import heldout_prompts, train_prompts

        return list(train_prompts()), list(heldout_prompts())[: cfg.heldout_count]
    from egrpo_ray.prompts import load_prompt_file

    train = load_prompt_file(cfg.train_path)
    test = load_prompt_file(cfg.test_path) if cfg.test_path else train
    return train, test[: cfg.heldout_count]


def train_probe(train_prompts: Sequence[str], count: int = 24) -> list[str]:
    """A fixed, evenly spread subset of the training prompts: scored before and after (ODE, fixed
    noise) it tells whether training-prompt reward went up, without per-step prompt noise."""
    return list(train_prompts[:: max(1, len(train_prompts) // count)][:count])


@dataclass
class PromptCursor:
    """Deterministic prompt stream: a seeded shuffle per epoch, resumable from (epoch, position)."""

    prompts: list[str]
    seed: int
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def _shuffle(self) -> None:
        self._order = list(range(len(self.prompts)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(self._order)

    def take(self, n: int) -> list[str]:
        out = []
        while len(out) < n:
            if not self._order:
                self._shuffle()
            if self.position >= len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            out.append(self.prompts[self._order[self.position]])
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._shuffle()


def make_reward_fn(rewards: Mapping[str, Callable]) -> RewardFn:
    """Score a batch of images with every reward model."""

    def score(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: reward(images, prompts).float() for name, reward in rewards.items()}

    return score


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
    import time

    t0 = time.perf_counter()
    cond = policy.encode_prompts(prompts)
    rollout = strategy.rollout(policy, cond, prompts, policy.latent_shape, generator, iteration, max_batch, policy_device(policy))
    images = policy.decode(rollout.final_latents).cpu()
    rollout = rollout.to("cpu")  # queue items travel between processes: keep them on the CPU
    t1 = time.perf_counter()
    sample_prompts = [rollout.prompts[i] for i in rollout.sample_prompt.tolist()]
    rewards = reward_fn(images, sample_prompts)
    return ScoredRollout(rollout, rewards, policy_version, worker, t1 - t0, time.perf_counter() - t1)


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
) -> dict[str, float]:
    """Advantages over the items' groups, then one clipped-surrogate update through ``fn``
    (the policy itself, or its DDP wrapper). Returns the step's metrics."""
    batch = Rollout.concat([it.rollout for it in items]).to(policy_device(policy))
    rewards = {k: torch.cat([it.rewards[k] for it in items]) for k in items[0].rewards}
    weights = {r.name: r.weight for r in cfg.rewards}
    alg = cfg.algorithm
    adv = combine_rewards(rewards, weights, batch.sample_group, alg.multi_reward, alg.adv_eps, alg.adv_clip)
    cond = policy.encode_prompts(batch.prompts)
    stats = grpo_update(
        fn, cond, batch, adv, strategy.kernel, alg, optimizer, policy.parameters(),
        cfg.learner.minibatch_rows, cfg.learner.epochs, cfg.learner.grad_clip, generator, ref_fn, parts,
    )
    total = sum(weights[k] * rewards[k] for k in rewards)
    out = {
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std(unbiased=False)),
        "zero_std_ratio": adv.zero_std_ratio,
        "groups": len(adv.valid_group),
        "samples": len(total),
        **{f"reward_{k}": float(v.mean()) for k, v in rewards.items()},
        **{k: float(v) for k, v in vars(stats).items()},
    }
    return out


@torch.no_grad()
def heldout_images(policy: Policy, prompts: Sequence[str], cfg: ExperimentConfig, seed: int, max_batch: int = 64) -> torch.Tensor:
    """Deterministic ODE samples of fixed prompts from a fixed noise seed (comparable across runs)."""
    from egrpo_ray.algo.schedule import shifted_sigmas

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=g).to(policy_device(policy))
    cond = policy.encode_prompts(prompts)
    latents = sample_ode(policy, cond, noise, shifted_sigmas(cfg.sampling.steps, cfg.sampling.shift), max_batch)
    return policy.decode(latents).cpu()


def heldout_reward(policy: Policy, prompts: Sequence[str], reward_fn: RewardFn, cfg: ExperimentConfig, seed: int) -> tuple[float, torch.Tensor]:
    images = heldout_images(policy, prompts, cfg, seed)
    scores = reward_fn(images, prompts)
    weights = {r.name: r.weight for r in cfg.rewards}
    return float(sum(weights[k] * v for k, v in scores.items()).mean()), images
