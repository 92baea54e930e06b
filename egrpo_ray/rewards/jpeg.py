"""JPEG compressibility, the DDPO reward: minus the size in kB (1 kB = 1000 bytes) of the image saved as
JPEG by PIL at quality 95 (default chroma subsampling, no optimisation pass). Images are [B, 3, H, W]
float in [0, 1], quantised to uint8 by rounding. Higher (closer to 0) = more compressible; not
bounded to [0, 1], so weigh it accordingly when mixing with other rewards (advantages are normalised
per group, so its scale matters only for the "reward" multi-reward mode).
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from egrpo_ray.config import RewardConfig
from egrpo_ray.images import to_uint8
from egrpo_ray.rewards.base import Reward


def jpeg_size_bytes(image: np.ndarray, quality: int = 95) -> int:
    """Bytes of one HxWx3 uint8 image encoded as JPEG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.tell()


class JpegCompressibility(Reward):
    name = "jpeg"

    def __init__(self, quality: int = 95):
        self.quality = quality

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "JpegCompressibility":
        return cls()

    def __call__(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        arr = to_uint8(images).cpu().permute(0, 2, 3, 1).contiguous().numpy()
        sizes = [jpeg_size_bytes(a, self.quality) for a in arr]
        return -torch.tensor(sizes, dtype=torch.float32) / 1000.0
