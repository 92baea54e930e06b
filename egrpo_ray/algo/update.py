"""One policy update on a batch of scored rollouts: the learner step shared by the single-process
reference loop and the Ray Train learner (which passes a DDP-wrapped velocity function).

Both loops split rows into minibatches with ``partition_rows`` and seed it with ``step_seed``, so the
oracle and the service take the same optimizer steps on the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from egrpo_ray.algo.advantages import Advantages
from egrpo_ray.algo.gradient_noise import GradientNoise
from egrpo_ray.algo.loss import grpo_loss, score_rows
from egrpo_ray.algo.sampler import Conditioning, Rollout, StepKernel, VelocityFn

Minibatching = Literal["random", "by_entry"]


@dataclass(frozen=True)
class UpdateSettings:
    """The numbers one update needs, gathered from the algorithm and learner config sections."""

    clip_range: float
    old_logprob: Literal["rollout", "recompute", "decoupled"]
    kl_beta: float
    rows_per_minibatch: int
    epochs: int
    grad_clip: float
    behaviour_ratio_cap: float = 2.0  # decoupled: cap on pi_prox / pi_behaviour
    minibatch: Minibatching = "random"

    @classmethod
    def from_config(cls, algorithm, learner) -> "UpdateSettings":
        """From config.AlgorithmConfig and config.LearnerConfig (read by attribute: no pydantic here)."""
        old_logprob = algorithm.old_logprob
        if old_logprob == "auto":  # stale samples need the behaviour weight; on-policy the sampler's are exact
            old_logprob = "decoupled" if learner.max_staleness > 0 else "rollout"
        return cls(algorithm.clip_range, old_logprob, algorithm.kl_beta, learner.minibatch_rows,
                   learner.epochs, learner.grad_clip, algorithm.behaviour_ratio_cap, learner.minibatch)


@dataclass
class UpdateStats:
    loss: float
    ratio_mean_first: float  # ratio on the update's first minibatch (exactly 1 on-policy)
    ratio_mean: float
    clip_fraction: float
    kl: float
    grad_norm: float
    # max |sampler log-prob - learner log-prob| before the update: over the on-policy rows (all rows if
    # none or unknown) when the learner recomputes them, else over the first minibatch's forward
    logprob_mismatch: float
    minibatches: int
    behaviour_weight_mean: float  # decoupled: mean capped pi_prox / pi_behaviour (1 otherwise)
    learner_rows: int  # rows that ran a forward + backward, summed over epochs
    recompute_rows: int  # no-grad learner forwards: old-log-prob recompute and reference-model rows


def step_seed(seed: int, rank: int, step: int) -> int:
    """The learner's minibatch randomness depends only on (seed, rank, step): a resume replays it
    exactly, and the reference loop (rank 0) draws what a 1-rank service draws."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 1) % (2**63 - 1)


def partition_count(step_index: torch.Tensor, minibatch: Minibatching, rows_per_minibatch: int) -> int:
    """How many minibatches these rows make on their own. Data-parallel ranks must step together:
    they take the max over ranks and pass it to ``partition_rows`` as ``num_parts``."""
    if minibatch == "by_entry":
        return len(torch.unique(step_index))
    return -(-len(step_index) // rows_per_minibatch)


def partition_rows(step_index: torch.Tensor, minibatch: Minibatching, rows_per_minibatch: int,
                   generator: torch.Generator, num_parts: Optional[int] = None) -> list[torch.Tensor]:
    """Row indices of each minibatch (one optimizer step each).

    ``random``: a permutation cut into ``num_parts`` near-equal parts. ``by_entry`` (the paper's
    code): one part per plan entry, i.e. the rows sharing a step index, over all prompts, in schedule
    order. ``num_parts`` above this batch's own count (another rank has more) splits the largest parts.
    """
    own = partition_count(step_index, minibatch, rows_per_minibatch)
    num_parts = own if num_parts is None else num_parts
    if num_parts < own:
        raise ValueError(f"partition_rows: num_parts={num_parts} is below this batch's {own} minibatches")
    if minibatch == "random":
        return list(torch.tensor_split(torch.randperm(len(step_index), generator=generator), num_parts))
    if minibatch != "by_entry":
        raise ValueError(f"partition_rows: unknown minibatch mode {minibatch!r} (random or by_entry)")
    parts = [(step_index == i).nonzero().squeeze(1) for i in torch.unique(step_index)]
    while len(parts) < num_parts:
        k = max(range(len(parts)), key=lambda j: len(parts[j]))
        parts[k : k + 1] = list(torch.tensor_split(parts[k], 2))
    return parts


def behaviour_weight(prox_log_probs: torch.Tensor, behaviour_log_probs: torch.Tensor, cap: float,
                     on_policy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decoupled PPO's per-sample weight min(pi_prox / pi_behaviour, cap), [R, B]. Rows that the current
    weights sampled (``on_policy`` [R]) get exactly 1: there the two policies are the same one, and
    their log-probs differ only by float rounding of different batch shapes."""
    w = torch.exp(prox_log_probs - behaviour_log_probs.to(prox_log_probs.device)).clamp(max=cap)
    if on_policy is not None:
        w = torch.where(on_policy.to(w.device)[:, None], torch.ones_like(w), w)
    return w


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
    num_parts: Optional[int] = None,
    on_policy_rows: Optional[torch.Tensor] = None,
    noise: Optional[GradientNoise] = None,
) -> UpdateStats:
    """Clipped-surrogate updates of the optimizer's parameters over the batch's rows, ``epochs`` passes
    of the same minibatches.

    Old log-probs: ``rollout`` uses the sampler's; ``recompute`` and ``decoupled`` a no-grad learner
    forward of exactly the minibatches the gradient passes see (bit-identical on-policy), and
    ``decoupled`` also weights each sample by ``behaviour_weight`` (``on_policy_rows`` [R] marks rows
    sampled by the current weights). ``parts`` overrides the partition; else ``partition_rows`` with
    ``num_parts`` (DDP/FSDP: the max over ranks). ``noise`` sees each first-epoch minibatch gradient before
    clipping; the caller ends its measurement (``GradientNoise.finish``).
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if parts is None:
        parts = partition_rows(batch.step_index, settings.minibatch, settings.rows_per_minibatch, generator, num_parts)
    recompute = settings.old_logprob in ("recompute", "decoupled")
    olds: list[Optional[torch.Tensor]] = [None] * len(parts)
    weights: list[Optional[torch.Tensor]] = [None] * len(parts)
    mismatch = None
    if recompute:
        with torch.no_grad():
            olds = [score_rows(fn, cond, batch.select_rows(rows), kernel).log_probs for rows in parts]
        gaps = torch.cat([(lp - batch.old_log_probs[rows].to(lp.device)).abs().amax(1).cpu() for lp, rows in zip(olds, parts)])
        mine = torch.cat(parts)
        if on_policy_rows is not None and bool(on_policy_rows[mine].any()):  # stale rows differ by design
            gaps = gaps[on_policy_rows[mine]]
        mismatch = float(gaps.max()) if len(gaps) else 0.0
    if settings.old_logprob == "decoupled":
        weights = [behaviour_weight(old, batch.old_log_probs[rows], settings.behaviour_ratio_cap,
                                    None if on_policy_rows is None else on_policy_rows[rows])
                   for old, rows in zip(olds, parts)]
    losses, ratios, clips, kls, norms = [], [], [], [], []
    for epoch in range(settings.epochs):
        for rows, old, weight in zip(parts, olds, weights):
            sub = batch.select_rows(rows)
            out = grpo_loss(fn, cond, sub, advantages, kernel, settings.clip_range, old_log_probs=old,
                            kl_beta=settings.kl_beta, ref_fn=ref_fn, behaviour_weight=weight)
            if mismatch is None:  # rollout mode: the first minibatch's forward still sees the sampler's weights
                mismatch = float((out.log_probs - sub.old_log_probs).abs().max())
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if noise is not None and epoch == 0:
                noise.add(params)
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)))
            optimizer.step()
            losses.append(float(out.loss.detach()))
            ratios.append(out.ratio_mean)
            clips.append(out.clip_fraction)
            kls.append(out.kl)
    n, rows_total = len(losses), sum(len(rows) for rows in parts)
    weight_mean = 1.0
    if settings.old_logprob == "decoupled":
        weight_mean = float(torch.cat([w.flatten() for w in weights]).mean())
    return UpdateStats(
        loss=sum(losses) / n, ratio_mean_first=ratios[0], ratio_mean=sum(ratios) / n,
        clip_fraction=sum(clips) / n, kl=sum(kls) / n, grad_norm=max(norms), logprob_mismatch=mismatch, minibatches=n,
        behaviour_weight_mean=weight_mean, learner_rows=rows_total * settings.epochs,
        recompute_rows=(rows_total if recompute else 0) + (rows_total * settings.epochs if settings.kl_beta > 0 else 0),
    )
