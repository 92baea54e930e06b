"""Image tensors: [B, 3, H, W], either float in [0, 1] (what decoders produce) or uint8 (what a PNG
holds and what travels to the reward service). Each conversion is written once, here."""
from __future__ import annotations

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float in [0, 1] -> uint8 by rounding (uint8 passes through); same device."""
    if images.dtype == torch.uint8:
        return images
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] (float passes through as float32); same device."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()
