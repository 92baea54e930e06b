"""The shifted flow-matching noise schedule (docs/algorithm.md section 1)."""
from __future__ import annotations

import torch


def shifted_sigmas(steps: int, shift: float) -> torch.Tensor:
    """s_k = a*u_k / (1 + (a-1)*u_k) for u_k = 1 - k/T, k = 0..T: T+1 float64 values from 1 to 0."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    u = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    return shift * u / (1.0 + (shift - 1.0) * u)
