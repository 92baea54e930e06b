"""Rollout samplers over any velocity function ``(latents, sigma, conditioning) -> velocity``.

``branching_rollout`` is E-GRPO's (docs/algorithm.md section 4): one initial noise per prompt, a
deterministic ODE anchor, and per plan entry (i, l) G branches that share ONE merged SDE transition
from the anchor latent at i, then finish by ODE. ``trajectory_rollout`` serves the baselines
(DanceGRPO, Flow-GRPO, MixGRPO): G full trajectories per prompt (from one shared initial noise or
one per sample), SDE on a set of steps, ODE elsewhere.

Both return a ``Rollout``: the transitions the learner must re-score, as rows. A row is one model
forward (a start latent, a step, a prompt) and the B next-latents that branched from it: B = G for
E-GRPO (the branches share the forward), B = 1 for a trajectory's step. Step math is float32.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch

from egrpo_ray.algo.entropy import MergePlan
from egrpo_ray.algo.sde import SdeKind, flow_sigma, ode_step, sde_step
from egrpo_ray.algo.solvers import FULL_SUFFIX, SuffixSetting, solve, sub_schedule
# The sampler's calling contract, which every policy adapter (models/) implements.
Conditioning = dict[str, torch.Tensor]  # batch-first tensors; index_cond slices every entry alike
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor]  # (latents, sigma, cond) -> velocity


def index_cond(cond: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """Select (or repeat, with a repeating index) rows of every conditioning tensor."""
    return {k: v[index] for k, v in cond.items()}


@dataclass(frozen=True)
class StepKernel:
    """The noise schedule and the SDE form shared by sampler and learner."""

    sigmas: torch.Tensor  # [T+1] float64, from 1 to 0
    eta: float
    kind: SdeKind = "flow"  # "flow": Flow-GRPO's sigma_i; "dance": DanceGRPO's constant eta
    reduction: str = "mean"

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def s(self, i: torch.Tensor) -> torch.Tensor:
        return self.sigmas[i].float()

    def noise_level(self, i: torch.Tensor) -> torch.Tensor:
        """Per-row noise level at schedule index i (float32)."""
        if self.kind == "dance":
            return torch.full(i.shape, self.eta, dtype=torch.float32)
        return flow_sigma(self.sigmas[i], self.sigmas[1], self.eta).float()


@dataclass
class Rollout:
    """What one rollout hands the learner. N samples, R rows, B next-latents per row."""

    prompts: list[str]  # P prompts
    final_latents: torch.Tensor  # [N, *latent]
    sample_prompt: torch.Tensor  # [N] prompt index
    sample_group: torch.Tensor  # [N] group id: advantages are normalised within a group
    start_latents: torch.Tensor  # [R, *latent] input of the row's forward
    step_index: torch.Tensor  # [R] schedule index i of the transition's start
    step_len: torch.Tensor  # [R] l: the transition goes from s_i to s_{i+l}
    row_prompt: torch.Tensor  # [R]
    next_latents: torch.Tensor  # [R, B, *latent]
    old_log_probs: torch.Tensor  # [R, B] float32, at sampling time
    row_samples: torch.Tensor  # [R, B] sample index of each branch
    forwards: int  # image-step forwards the sampler ran

    @property
    def num_groups(self) -> int:
        return int(self.sample_group.max()) + 1 if len(self.sample_group) else 0

    def select_rows(self, rows: torch.Tensor) -> "Rollout":
        """The same rollout restricted to some rows (samples and groups kept whole)."""
        row_fields = ("start_latents", "step_index", "step_len", "row_prompt", "next_latents", "old_log_probs", "row_samples")
        return Rollout(**{f.name: getattr(self, f.name)[rows] if f.name in row_fields else getattr(self, f.name) for f in fields(self)})

    def to(self, device: torch.device | str) -> "Rollout":
        """Latents and log-probs to ``device``; index tensors stay on the CPU (they index CPU tables)."""
        moved = ("final_latents", "start_latents", "next_latents", "old_log_probs")
        return Rollout(**{f.name: getattr(self, f.name).to(device) if f.name in moved else getattr(self, f.name) for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence["Rollout"]) -> "Rollout":
        """Join rollouts of different prompts, re-indexing prompts, samples and groups."""
        out: dict[str, list] = {f.name: [] for f in fields(Rollout)}
        n_prompts = n_samples = n_groups = 0
        for r in parts:
            out["prompts"].extend(r.prompts)
            for name in ("final_latents", "start_latents", "step_index", "step_len", "next_latents", "old_log_probs"):
                out[name].append(getattr(r, name))
            out["sample_prompt"].append(r.sample_prompt + n_prompts)
            out["row_prompt"].append(r.row_prompt + n_prompts)
            out["sample_group"].append(r.sample_group + n_groups)
            out["row_samples"].append(r.row_samples + n_samples)
            out["forwards"].append(r.forwards)
            n_prompts, n_samples, n_groups = n_prompts + len(r.prompts), n_samples + len(r.final_latents), n_groups + r.num_groups
        return Rollout(
            prompts=out["prompts"],
            forwards=sum(out["forwards"]),
            **{k: torch.cat(v) for k, v in out.items() if k not in ("prompts", "forwards")},
        )


class _BatchedVelocity:
    """Wraps a velocity function: batches calls to max_batch rows and counts image-step forwards."""

    def __init__(self, fn: VelocityFn, cond: Conditioning, max_batch: int | None):
        self.fn, self.cond, self.max_batch, self.forwards = fn, cond, max_batch, 0

    def __call__(self, x: torch.Tensor, s: torch.Tensor, prompt_idx: torch.Tensor) -> torch.Tensor:
        self.forwards += len(x)
        size = self.max_batch or len(x)
        outs = [
            self.fn(x[a : a + size], s[a : a + size], index_cond(self.cond, prompt_idx[a : a + size])).float()
            for a in range(0, len(x), size)
        ]
        return torch.cat(outs)


def initial_noise(num_prompts: int, latent_shape: Sequence[int], generator: torch.Generator, per_prompt: int = 1) -> torch.Tensor:
    """[num_prompts * per_prompt, *latent] standard normal, prompt-major: one noise per prompt (a group
    that shares it) or one per sample (per_prompt = G)."""
    return torch.randn((num_prompts * per_prompt, *latent_shape), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_ode(fn: VelocityFn, cond: Conditioning, noise: torch.Tensor, sigmas: torch.Tensor, max_batch: int | None = None) -> torch.Tensor:
    """Deterministic Euler sampling from noise [P, *latent] over the schedule; returns x at s = 0."""
    velocity = _BatchedVelocity(fn, cond, max_batch)
    prompt_idx = torch.arange(len(noise))
    x = noise.float()
    for k in range(len(sigmas) - 1):
        s = sigmas[k].float().expand(len(x))
        x = ode_step(x, velocity(x, s, prompt_idx), s, sigmas[k + 1].float().expand(len(x)))
    return x


def _finish_by_ode(velocity: _BatchedVelocity, kernel: StepKernel, x: torch.Tensor, k: torch.Tensor, prompt_idx: torch.Tensor,
                   suffix: SuffixSetting | None = None) -> torch.Tensor:
    """Run every latent from its own schedule index k to s = 0 with the suffix's solver on its sub-schedule
    (algo/solvers.py), batching all latents with steps left (mixed timesteps in one batch cost no more
    than uniform ones)."""
    suffix = suffix or FULL_SUFFIX
    starts = k.tolist()
    points = {e: sub_schedule(e, kernel.steps, suffix.steps) for e in set(starts)}
    grids = torch.zeros(len(starts), max(map(len, points.values())), dtype=kernel.sigmas.dtype)  # padded per row
    for m, e in enumerate(starts):
        grids[m, : len(points[e])] = kernel.sigmas[points[e]]
    lengths = torch.tensor([len(points[e]) for e in starts])
    return solve(velocity, x, grids, lengths, prompt_idx, suffix.solver)


@torch.no_grad()
def branching_rollout(
    fn: VelocityFn,
    cond: Conditioning,
    prompts: Sequence[str],
    noise: torch.Tensor,
    kernel: StepKernel,
    plan: MergePlan,
    group_size: int,
    generator: torch.Generator,
    max_batch: int | None = None,
    suffix: SuffixSetting | None = None,
) -> Rollout:
    """E-GRPO's branching rollout for P prompts (noise [P, *latent], one per prompt).

    Groups are (prompt, entry) pairs, numbered prompt-major; rows are the same pairs, one per group.
    ``suffix`` (solver, steps) only changes how branches finish (step 3): the rows the learner sees do not.
    """
    num_prompts, num_entries, g = len(noise), len(plan.entries), group_size
    velocity = _BatchedVelocity(fn, cond, max_batch)
    prompt_idx = torch.arange(num_prompts)
    starts = {i for i, _ in plan.entries}

    # 1. The ODE anchor, up to the last entry start. Its velocity at an entry start is exactly the
    #    merged step's (same latent, same s), so the merged step costs no extra forward.
    x = noise.float()
    anchor, anchor_v = {}, {}
    for k in range(plan.last_start + 1):
        s = kernel.s(torch.full((num_prompts,), k))
        v = velocity(x, s, prompt_idx)
        if k in starts:
            anchor[k], anchor_v[k] = x, v
        if k < plan.last_start:
            x = ode_step(x, v, s, kernel.s(torch.full((num_prompts,), k + 1)))

    # 2. G merged SDE branches per (prompt, entry): rows ordered [prompt][entry], branches [G].
    start_latents, next_latents, log_probs, step_index, step_end = [], [], [], [], []
    for p in range(num_prompts):
        for i, l in plan.entries:
            xs = anchor[i][p : p + 1].expand(g, *noise.shape[1:])
            vs = anchor_v[i][p : p + 1].expand_as(xs)
            idx = torch.full((g,), i)
            out = sde_step(xs, vs, kernel.s(idx), kernel.s(idx + l), kernel.noise_level(idx), kind=kernel.kind,
                           reduction=kernel.reduction, generator=generator)
            start_latents.append(anchor[i][p])
            next_latents.append(out.sample)
            log_probs.append(out.log_prob)
            step_index.append(i)
            step_end.append(i + l)
    rows = num_prompts * num_entries
    next_latents_t = torch.stack(next_latents)  # [R, G, *]
    step_index_t, step_end_t = torch.tensor(step_index), torch.tensor(step_end)
    row_prompt = prompt_idx.repeat_interleave(num_entries)

    # 3. Finish all R*G branches by ODE in shared batches.
    branch_latents = next_latents_t.flatten(0, 1)
    final = _finish_by_ode(velocity, kernel, branch_latents, step_end_t.repeat_interleave(g), row_prompt.repeat_interleave(g), suffix)
    return Rollout(
        prompts=list(prompts),
        final_latents=final,
        sample_prompt=row_prompt.repeat_interleave(g),
        sample_group=torch.arange(rows).repeat_interleave(g),
        start_latents=torch.stack(start_latents),
        step_index=step_index_t,
        step_len=step_end_t - step_index_t,
        row_prompt=row_prompt,
        next_latents=next_latents_t,
        old_log_probs=torch.stack(log_probs),
        row_samples=torch.arange(rows * g).view(rows, g),
        forwards=velocity.forwards,
    )


@torch.no_grad()
def trajectory_rollout(
    fn: VelocityFn,
    cond: Conditioning,
    prompts: Sequence[str],
    noise: torch.Tensor,
    kernel: StepKernel,
    sde_steps: Sequence[int],
    train_steps: Sequence[int] | torch.Tensor,
    group_size: int,
    generator: torch.Generator,
    max_batch: int | None = None,
) -> Rollout:
    """G trajectories per prompt; SDE on ``sde_steps``, ODE elsewhere.

    ``noise``: [P, *latent] (the group shares its prompt's noise) or [P*G, *latent] (one per sample,
    prompt-major). A group is a prompt's G samples (trajectory-level credit). Rows are the (sample, step)
    transitions to train, each with B = 1: ``train_steps`` is a list of steps for every sample, or a
    bool mask [P*G, T] of each sample's own steps (DanceGRPO draws them per sample); trained steps must
    be SDE steps. Rows are ordered [step][sample].
    """
    num_prompts, g = len(prompts), group_size
    velocity = _BatchedVelocity(fn, cond, max_batch)
    sample_prompt = torch.arange(num_prompts).repeat_interleave(g)
    n = len(sample_prompt)
    if len(noise) == num_prompts:
        x = noise.float().repeat_interleave(g, dim=0)
    elif len(noise) == n:
        x = noise.float().clone()
    else:
        raise ValueError(f"trajectory_rollout: noise has {len(noise)} rows; expected {num_prompts} (shared) or {n} (per sample)")
    train_mask = _train_mask(train_steps, n, kernel.steps)
    sde_set = set(sde_steps)
    if bool(train_mask[:, [k for k in range(kernel.steps) if k not in sde_set]].any()):
        raise ValueError("trajectory_rollout: a trained step is not an SDE step")
    starts, nexts, log_probs, step_index, row_samples = [], [], [], [], []
    for k in range(kernel.steps):
        idx = torch.full((n,), k)
        s, s_next = kernel.s(idx), kernel.s(idx + 1)
        v = velocity(x, s, sample_prompt)
        if k in sde_set:
            out = sde_step(x, v, s, s_next, kernel.noise_level(idx), kind=kernel.kind, reduction=kernel.reduction, generator=generator)
            rows = train_mask[:, k].nonzero().squeeze(1)
            if len(rows):
                starts.append(x[rows.to(x.device)])
                nexts.append(out.sample[rows.to(x.device)])
                log_probs.append(out.log_prob[rows.to(x.device)])
                step_index.append(idx[rows])
                row_samples.append(rows)
            x = out.sample
        else:
            x = ode_step(x, v, s, s_next)
    if not starts:
        raise ValueError("trajectory_rollout: no trained SDE step")
    row_samples_t = torch.cat(row_samples)
    return Rollout(
        prompts=list(prompts),
        final_latents=x,
        sample_prompt=sample_prompt,
        sample_group=sample_prompt.clone(),
        start_latents=torch.cat(starts),
        step_index=torch.cat(step_index),
        step_len=torch.ones(len(row_samples_t), dtype=torch.long),
        row_prompt=sample_prompt[row_samples_t],
        next_latents=torch.cat(nexts).unsqueeze(1),
        old_log_probs=torch.cat(log_probs).unsqueeze(1),
        row_samples=row_samples_t.unsqueeze(1),
        forwards=velocity.forwards,
    )


def _train_mask(train_steps: Sequence[int] | torch.Tensor, num_samples: int, steps: int) -> torch.Tensor:
    """A bool mask [num_samples, steps] of the (sample, step) transitions to train."""
    if isinstance(train_steps, torch.Tensor) and train_steps.dtype == torch.bool:
        if tuple(train_steps.shape) != (num_samples, steps):
            raise ValueError(f"trajectory_rollout: train mask shape {tuple(train_steps.shape)} != {(num_samples, steps)}")
        return train_steps.cpu()
    mask = torch.zeros(num_samples, steps, dtype=torch.bool)
    mask[:, list(train_steps)] = True
    return mask
