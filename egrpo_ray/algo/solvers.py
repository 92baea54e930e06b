"""Deterministic ODE solvers for E-GRPO's suffix: each branch's path from its merged SDE step to s = 0.

The suffix only has to rank a group's branches, so it may run a higher-order solver on a coarser
sub-schedule (``sampling.suffix``, issue 13). For a velocity v ~ eps - x0 of the flow x_s = (1-s) x0 + s eps:
- euler: x_t = x_s + (t - s) v (the schedule's own ODE step)
- heun:  Euler predictor, trapezoidal corrector (2 forwards per step); a final step to t = 0 stays Euler,
         as in Karras et al.'s Heun sampler (the corrector would evaluate the model at s = 0)
- dpm2m: DPM-Solver++(2M) on the data prediction x0 = x - s v, lambda = log((1 - s) / s); one forward per
         step, first order on the first step and on the final step to 0 (where it is exactly Euler).
Rows integrate on their own grids (branches of different entries start at different s) in shared batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from egrpo_ray.algo.sde import _rows, ode_step

SOLVERS = ("euler", "heun", "dpm2m")
# (latents [M, ...], s [M] float32, prompt index [M]) -> velocity [M, ...]; counts its own forwards
RowVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SuffixSetting(Protocol):  # config.SuffixConfig or Suffix: read by attribute, algo never imports pydantic
    solver: str
    steps: int | None


@dataclass(frozen=True)
class Suffix:
    solver: str = "euler"
    steps: int | None = None  # None: every remaining schedule step


FULL_SUFFIX = Suffix()


def sub_schedule(start: int, end: int, steps: int | None) -> list[int]:
    """Schedule indices from ``start`` to ``end`` (both kept) thinned to ``steps`` steps, evenly spaced in index.
    None, or at least as many steps as remain, keeps every index."""
    remaining = end - start
    if steps is None or steps >= remaining:
        return list(range(start, end + 1))
    if steps < 1:
        raise ValueError(f"suffix steps must be >= 1, got {steps}")
    # round(j * remaining / steps), half up, in integers: strictly increasing since remaining / steps > 1
    return [start + (2 * j * remaining + steps) // (2 * steps) for j in range(steps + 1)]


def solver_forwards(solver: str, steps: int) -> int:
    """Forwards of ``steps`` steps of a solver on a grid that ends at s = 0."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown suffix solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    if steps <= 0:
        return 0
    return 2 * steps - 1 if solver == "heun" else steps


def suffix_forwards(remaining: int, suffix: SuffixSetting | None) -> int:
    """Forwards one branch's suffix costs with ``remaining`` schedule steps left (ending at s = 0)."""
    suffix = suffix or FULL_SUFFIX
    return solver_forwards(suffix.solver, len(sub_schedule(0, remaining, suffix.steps)) - 1)


def _lambda(s: torch.Tensor) -> torch.Tensor:
    """Half log signal-to-noise ratio log((1 - s) / s) of the flow schedule (float64)."""
    return torch.log1p(-s) - torch.log(s)


def solve(velocity: RowVelocity, x: torch.Tensor, grids: torch.Tensor, lengths: torch.Tensor,
          prompt_idx: torch.Tensor, solver: str = "euler") -> torch.Tensor:
    """Integrate every row of x along its own grid of sigmas (grids [M, K] float64, descending, row m's
    first ``lengths[m]`` entries used). All rows with steps left share each velocity call."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown suffix solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    x, pos, last = x.float().clone(), torch.zeros(len(x), dtype=torch.long), lengths - 1
    prev_x0 = torch.zeros_like(x) if solver == "dpm2m" else None
    while True:
        active = (pos < last).nonzero().squeeze(1)
        if len(active) == 0:
            return x
        p = pos[active]
        s64, t64 = grids[active, p], grids[active, p + 1]
        s, t = s64.float(), t64.float()
        xa = x[active]
        v = velocity(xa, s, prompt_idx[active])
        if solver == "euler":
            x[active] = ode_step(xa, v, s, t)
        elif solver == "heun":
            x[active] = _heun(velocity, xa, v, s, t, prompt_idx[active])
        else:
            x[active], prev_x0[active] = _dpm2m(xa, v, s64, t64, grids[active, (p - 1).clamp_min(0)], p > 0, prev_x0[active])
        pos[active] += 1


def _heun(velocity: RowVelocity, x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
          prompt_idx: torch.Tensor) -> torch.Tensor:
    out = ode_step(x, v, s, t)
    corrected = (t > 0).nonzero().squeeze(1)
    if len(corrected):
        c = corrected
        v_end = velocity(out[c], t[c], prompt_idx[c])
        out[c] = ode_step(x[c], (v[c] + v_end) / 2, s[c], t[c])
    return out


def _dpm2m(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, t: torch.Tensor, s_prev: torch.Tensor,
           has_prev: torch.Tensor, prev_x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++(2M) step from s to t (float64 sigmas); returns (x_t, this step's x0)."""
    x0 = x - _rows(s.float(), x) * v
    second = has_prev & (t > 0)
    denoised = x0
    if second.any():
        h = _lambda(t[second]) - _lambda(s[second])
        r = (_lambda(s[second]) - _lambda(s_prev[second])) / h
        c = _rows((1 / (2 * r)).float(), x0[second])
        denoised = x0.clone()
        denoised[second] = (1 + c) * x0[second] - c * prev_x0[second]
    ratio = _rows((t / s).float(), x)  # sigma_t / sigma_s; alpha_t (1 - e^-h) = 1 - t / s for this schedule
    return ratio * x + (1 - ratio) * denoised, x0
