"""One policy update on a batch of scored rollouts: the learner step shared by the single-process
reference loop and the Ray Train learner (which passes a DDP-wrapped velocity function)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from egrpo_ray.algo.advantages import Advantages
from egrpo_ray.algo.loss import grpo_loss, score_rows
from egrpo_ray.algo.sampler import Conditioning, Rollout, StepKernel, VelocityFn


@dataclass(frozen=True)
class UpdateSettings:
    """The numbers one update needs, gathered from the algorithm and learner config sections."""

    clip_range: float
    old_logprob: Literal["rollout", "recompute", "decoupled"]
    kl_beta: float
    rows_per_minibatch: int
    epochs: int
    grad_clip: float

    @classmethod
    def from_config(cls, algorithm, learner) -> "UpdateSettings":
        """From config.AlgorithmConfig and config.LearnerConfig (read by attribute: no pydantic here)."""
        old_logprob = algorithm.old_logprob
        if old_logprob == "auto":  # stale samples need the behaviour weight; on-policy the sampler's are exact
            old_logprob = "decoupled" if learner.max_staleness > 0 else "rollout"
        return cls(algorithm.clip_range, old_logprob, algorithm.kl_beta, learner.minibatch_rows,
                   learner.epochs, learner.grad_clip)


@dataclass
class UpdateStats:
    loss: float
    ratio_mean_first: float  # ratio on the update's first minibatch (exactly 1 on-policy)
    ratio_mean: float
    clip_fraction: float
    kl: float
    grad_norm: float
    logprob_mismatch: float  # max |sampler log-prob - learner log-prob| before the update
    minibatches: int


def minibatches(num_rows: int, rows_per_batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(num_rows, generator=generator)
    return [perm[a : a + rows_per_batch] for a in range(0, num_rows, rows_per_batch)]


def grpo_update(
    fn: VelocityFn,
    cond: Conditioning,
    batch: Rollout,
    advantages: Advantages,
    kernel: StepKernel,
    settings: UpdateSettings,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    ref_fn: Optional[VelocityFn] = None,
    parts: Optional[list[torch.Tensor]] = None,
) -> UpdateStats:
    """Clipped-surrogate updates of the optimizer's parameters over the batch's rows, ``epochs`` passes
    of the same minibatches.

    The row partition is fixed for the whole update so that the "recompute" old log-probs come from
    forwards of exactly the minibatches the gradient passes see (bit-identical on-policy).
    ``parts`` overrides the partition (DDP needs the same count of minibatches on every rank).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    parts = parts if parts is not None else minibatches(len(batch.step_index), settings.rows_per_minibatch, generator)
    with torch.no_grad():
        learner_old = [score_rows(fn, cond, batch.select_rows(rows), kernel).log_probs for rows in parts]
    mismatch = max(float((lp - batch.old_log_probs[rows.to(lp.device)]).abs().max()) for lp, rows in zip(learner_old, parts))
    losses, ratios, clips, kls, norms = [], [], [], [], []
    for _ in range(settings.epochs):
        for rows, old in zip(parts, learner_old):
            out = grpo_loss(
                fn, cond, batch.select_rows(rows), advantages, kernel, settings.clip_range,
                old_log_probs=old if settings.old_logprob == "recompute" else None,
                kl_beta=settings.kl_beta, ref_fn=ref_fn,
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)))
            optimizer.step()
            losses.append(float(out.loss.detach()))
            ratios.append(out.ratio_mean)
            clips.append(out.clip_fraction)
            kls.append(out.kl)
    n = len(losses)
    return UpdateStats(
        loss=sum(losses) / n, ratio_mean_first=ratios[0], ratio_mean=sum(ratios) / n,
        clip_fraction=sum(clips) / n, kl=sum(kls) / n, grad_norm=max(norms), logprob_mismatch=mismatch, minibatches=n,
    )
