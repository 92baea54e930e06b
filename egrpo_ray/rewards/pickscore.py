"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences.

``path`` is a local directory holding the ``yuvalkirstain/PickScore_v1`` CLIPModel and the processor
files PickScore uses (those of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), either in the same directory
or in a ``processor/`` subfolder. As in PickScore's reference inference code: images through the
CLIPProcessor, prompts padded/truncated to 77 tokens, both embeddings L2-normalised, and

    score = logit_scale.exp() * cosine(image, text)        (logit_scale.exp() = 100 for PickScore_v1)

so scores are ~20-23 for good images. Papers' tables (E-GRPO: 0.231 for FLUX.1-dev) print score / 100:
``scale="cosine"`` returns that instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch

from egrpo_ray.config import RewardConfig
from egrpo_ray.rewards.base import Reward
from egrpo_ray.rewards.clip_score import HFClipScorer


class PickScoreReward(Reward):
    name = "pickscore"

    def __init__(
        self, path: str | Path, device: str = "cpu", batch_size: int = 16, scale: Literal["logit", "cosine"] = "logit"
    ):
        if scale not in ("logit", "cosine"):
            raise ValueError(f"pickscore: scale must be 'logit' or 'cosine', not {scale!r}")
        self.scorer = HFClipScorer(path, device, batch_size, what="PickScore")
        self.scale = scale

    @classmethod
    def from_config(cls, cfg: RewardConfig, **kwargs) -> "PickScoreReward":
        if not cfg.path:
            raise ValueError("rewards: 'pickscore' needs path: a local PickScore_v1 CLIPModel directory")
        return cls(cfg.path, device=cfg.device, batch_size=cfg.batch_size, **kwargs)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        cos = self.scorer.cosine(images, prompts)
        if self.scale == "cosine":
            return cos
        return (cos * self.scorer.logit_scale).float()
