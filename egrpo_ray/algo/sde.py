"""One denoising transition: the ODE (Euler) step, the Flow-GRPO SDE step and the DanceGRPO SDE step.

All step math runs in float32 whatever the model's dtype (docs/algorithm.md section 2): latents and
velocities are cast up before use. A step goes from s_i to s_j (j > i), so ``ds = s_j - s_i < 0``; a
merged step of l schedule steps is the same formula with j = i + l and sigma evaluated at s_i.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

LOG_2PI = math.log(2 * math.pi)
Reduction = Literal["mean", "sum"]
SdeKind = Literal["flow", "dance"]


@dataclass
class StepResult:
    sample: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor  # one value per batch row, shape [B]
    log_prob: torch.Tensor  # [B]


def _rows(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars [B] (or a float) broadcast against a [B, ...] tensor, in float32."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def flow_sigma(s: torch.Tensor, s_next_of_one: torch.Tensor | float, eta: float) -> torch.Tensor:
    """sigma_i = eta * sqrt(s / (1 - s)); at s = 1 the denominator uses the next schedule value."""
    s = torch.as_tensor(s, dtype=torch.float64)
    denom = torch.where(s >= 1.0, 1.0 - torch.as_tensor(s_next_of_one, dtype=torch.float64), 1.0 - s)
    return eta * torch.sqrt(s / denom)


def ode_step(x: torch.Tensor, v: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
    """Deterministic Euler step x + v * (s_next - s)."""
    x, v = x.float(), v.float()
    return x + v * (_rows(s_next, x) - _rows(s, x))


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduction: Reduction = "mean") -> torch.Tensor:
    """Log-density of N(mean, std^2 I) at x, reduced over all but the batch dimension."""
    std_b = _rows(std, x)
    lp = -((x.float() - mean) ** 2) / (2 * std_b**2) - torch.log(std_b) - 0.5 * LOG_2PI
    lp = lp.flatten(1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def sde_mean_std(
    x: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    s_next: torch.Tensor,
    sigma: torch.Tensor,
    kind: SdeKind = "flow",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and per-row std of one (possibly merged) SDE transition from s to s_next.

    ``sigma`` is the noise level: Flow-GRPO's sigma_i (see flow_sigma) or DanceGRPO's constant eta.
    """
    x, v = x.float(), v.float()
    s_b, ds_b, sig_b = _rows(s, x), _rows(s_next, x) - _rows(s, x), _rows(sigma, x)
    if kind == "flow":
        mean = x * (1 + sig_b**2 / (2 * s_b) * ds_b) + v * (1 + sig_b**2 * (1 - s_b) / (2 * s_b)) * ds_b
    else:  # DanceGRPO: Euler step plus a score correction, score = -(x - (1-s) x0_hat) / s^2
        x0_hat = x - s_b * v
        score = -(x - (1 - s_b) * x0_hat) / s_b**2
        mean = x + v * ds_b - 0.5 * sig_b**2 * score * ds_b
    ds = torch.as_tensor(s_next, dtype=torch.float32, device=x.device) - torch.as_tensor(s, dtype=torch.float32, device=x.device)
    std = torch.as_tensor(sigma, dtype=torch.float32, device=x.device) * torch.sqrt(-ds)
    if std.dim() == 0:
        std = std.expand(x.shape[0])
    return mean, std


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    s_next: torch.Tensor,
    sigma: torch.Tensor,
    noise: torch.Tensor | None = None,
    kind: SdeKind = "flow",
    reduction: Reduction = "mean",
    generator: torch.Generator | None = None,
) -> StepResult:
    """Sample x_next ~ N(mean, std^2 I) and return it with its log-probability (float32)."""
    mean, std = sde_mean_std(x, v, s, s_next, sigma, kind)
    if noise is None:  # drawn on the generator's device (CPU: reproducible everywhere), then moved
        gen_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=gen_device).to(mean.device)
    std_b = _rows(std, mean)
    # With std == 0 (eta == 0) the step is exactly the ODE step; skip the 0 * noise term.
    sample = torch.where(std_b > 0, mean + std_b * noise.float(), mean)
    log_prob = gaussian_log_prob(sample, mean, std.clamp_min(1e-20), reduction)
    return StepResult(sample, mean, std, log_prob)


def step_log_prob(
    x: torch.Tensor,
    v: torch.Tensor,
    x_next: torch.Tensor,
    s: torch.Tensor,
    s_next: torch.Tensor,
    sigma: torch.Tensor,
    kind: SdeKind = "flow",
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-prob of given next latents under the transition (the learner's recompute). Returns (log_prob, mean, std)."""
    mean, std = sde_mean_std(x, v, s, s_next, sigma, kind)
    return gaussian_log_prob(x_next, mean, std, reduction), mean, std
