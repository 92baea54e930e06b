"""The learner side: re-scoring rollout transitions and the clipped GRPO surrogate (section 5).

Each row of a Rollout is ONE model forward (start latent, step, prompt) shared by its B branches,
so E-GRPO's learner pays one forward per (prompt, entry), not one per branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from egrpo_ray.algo.advantages import Advantages
from egrpo_ray.algo.sampler import Conditioning, Rollout, StepKernel, VelocityFn, index_cond
from egrpo_ray.algo.sde import gaussian_log_prob, sde_mean_std


@dataclass
class RowScores:
    log_probs: torch.Tensor  # [R, B]
    mean: torch.Tensor  # [R, *latent]
    std: torch.Tensor  # [R]


def score_rows(fn: VelocityFn, cond: Conditioning, batch: Rollout, kernel: StepKernel) -> RowScores:
    """Log-probs of every row's next-latents under the current model: one forward per row."""
    i, l = batch.step_index, batch.step_len
    s, s_next = kernel.s(i), kernel.s(i + l)
    v = fn(batch.start_latents, s, index_cond(cond, batch.row_prompt))
    mean, std = sde_mean_std(batch.start_latents, v, s, s_next, kernel.noise_level(i), kernel.kind)
    b = batch.next_latents.shape[1]
    lp = gaussian_log_prob(
        batch.next_latents.flatten(0, 1), mean.repeat_interleave(b, 0), std.repeat_interleave(b), kernel.reduction
    )
    return RowScores(lp.view(-1, b), mean, std)


@dataclass
class LossOutput:
    loss: torch.Tensor
    ratio_mean: float
    clip_fraction: float
    kl: float
    rows_used: int
    log_probs: torch.Tensor  # [R, B] the learner's, detached


def grpo_loss(
    fn: VelocityFn,
    cond: Conditioning,
    batch: Rollout,
    advantages: Advantages,
    kernel: StepKernel,
    clip_range: float,
    old_log_probs: Optional[torch.Tensor] = None,
    kl_beta: float = 0.0,
    ref_fn: Optional[VelocityFn] = None,
    behaviour_weight: Optional[torch.Tensor] = None,
) -> LossOutput:
    """Per row: mean_k w_k max(-A_k r_k, -A_k clip(r_k, 1-eps, 1+eps)); averaged over rows whose group
    has reward spread. ``advantages`` are indexed by the batch's sample ids. ``old_log_probs`` [R, B]
    replaces the sampler's (the learner's recompute: the proximal policy); ``behaviour_weight`` [R, B]
    is decoupled PPO's w_k (else 1); ``kl_beta`` > 0 adds Flow-GRPO's KL to the reference ``ref_fn``,
    averaged over every row (as Flow-GRPO does): a group without reward spread still carries the KL's pull."""
    scores = score_rows(fn, cond, batch, kernel)
    old = batch.old_log_probs if old_log_probs is None else old_log_probs
    ratio = torch.exp(scores.log_probs - old)
    adv = advantages.values[batch.row_samples].to(ratio.device)
    clipped_ratio = ratio.clamp(1 - clip_range, 1 + clip_range)
    per_sample = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    if behaviour_weight is not None:
        per_sample = per_sample * behaviour_weight.to(per_sample.device)
    per_row = per_sample.mean(1)
    valid = advantages.valid_group[batch.sample_group[batch.row_samples[:, 0]]].float().to(ratio.device)
    rows = valid.sum().clamp_min(1.0)
    loss = (per_row * valid).sum() / rows
    kl_value = 0.0
    if kl_beta > 0:
        if ref_fn is None:
            raise ValueError("kl_beta > 0 needs a reference model")
        with torch.no_grad():
            ref = score_rows(ref_fn, cond, batch, kernel)
        kl = kl_to_reference(scores, ref, kernel.s(batch.step_index) - kernel.s(batch.step_index + batch.step_len),
                             kernel.reduction).mean()
        kl_value = float(kl.detach())
        loss = loss + kl_beta * kl
    with torch.no_grad():
        vmask = valid[:, None].expand_as(ratio).bool()
        ratio_mean = float(ratio[vmask].mean()) if vmask.any() else 1.0
        clip_frac = float(((ratio - clipped_ratio).abs() > 0)[vmask].float().mean()) if vmask.any() else 0.0
    return LossOutput(loss, ratio_mean, clip_frac, kl_value, int(valid.sum()), scores.log_probs.detach())


def kl_to_reference(scores: RowScores, ref: RowScores, ds: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per row, Flow-GRPO's KL term: ||mean - mean_ref||^2 / (2 sigma^2), reduced over the latent like the
    log-probs (its code takes the mean). sigma is the SDE's noise level, the step's std over sqrt(ds)
    (Flow-GRPO's ``std_dev_t``), so this is the exact KL of the two Gaussian steps times the step's length
    ds = s_i - s_{i+l}: Flow-GRPO's beta values carry over."""
    sq = ((scores.mean - ref.mean) ** 2).flatten(1)
    exact = (sq.mean(1) if reduction == "mean" else sq.sum(1)) / (2 * scores.std**2)
    return exact * ds.to(exact.device, exact.dtype)
