"""CLIP score: cosine similarity of CLIP image and text embeddings (transformers CLIPModel).

``path`` is a local directory holding a ``CLIPModel`` (config + weights) and its ``CLIPProcessor``
files (image processor + tokenizer), e.g. a copy of openai/clip-vit-large-patch14 or
laion/CLIP-ViT-H-14-laion2B-s32B-b79K; processor files may instead sit in a ``processor/`` subfolder.
Images go through the processor as 8-bit RGB images (what a saved sample is), prompts are truncated to
the tokenizer's 77 tokens. The score is the plain cosine (no x100, no clamp at 0), the scale on which
the paper reports CLIP score (~0.36-0.40 for FLUX.1-dev).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from egrpo_ray.config import RewardConfig
from egrpo_ray.images import to_uint8
from egrpo_ray.rewards.base import Reward


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] images -> list of HxWx3 uint8 arrays (what a saved PNG holds)."""
    x = to_uint8(images).cpu()
    return [im.permute(1, 2, 0).numpy() for im in x]


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


class HFClipScorer:
    """A transformers CLIPModel + CLIPProcessor from a local directory; cosine or logit-scaled scores."""

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16, what: str = "CLIP"):
        from transformers import CLIPModel, CLIPProcessor

        p = Path(path)
        if not p.is_dir():
            raise FileNotFoundError(f"{what} model directory not found: {p}")
        proc_dir = p / "processor" if (p / "processor").is_dir() else p
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = CLIPModel.from_pretrained(str(p)).to(self.device).eval().requires_grad_(False)
        try:
            self.processor = CLIPProcessor.from_pretrained(str(proc_dir))
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(
                f"{proc_dir}: no CLIPProcessor files (preprocessor_config.json + tokenizer) for the {what} model: {err}"
            ) from None
        tok = self.processor.tokenizer
        limit = getattr(tok, "model_max_length", 77)
        self.max_length = limit if isinstance(limit, int) and 0 < limit <= 77 else 77

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        with torch.no_grad():
            for a in range(0, len(images), self.batch_size):
                pix = self.processor(images=to_uint8_images(images[a : a + self.batch_size]), return_tensors="pt")
                txt = self.processor(
                    text=list(prompts[a : a + self.batch_size]), padding=True, truncation=True,
                    max_length=self.max_length, return_tensors="pt",
                )
                img_f = _features(self.model.get_image_features(pixel_values=pix["pixel_values"].to(self.device)))
                txt_f = _features(self.model.get_text_features(
                    input_ids=txt["input_ids"].to(self.device), attention_mask=txt["attention_mask"].to(self.device)
                ))
                img_f = F.normalize(img_f.float(), dim=-1)
                txt_f = F.normalize(txt_f.float(), dim=-1)
                out.append((img_f * txt_f).sum(-1).cpu())
        return torch.cat(out).float()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())


class ClipScoreReward(Reward):
    """Cosine similarity between the CLIP image embedding and the prompt's text embedding."""

    name = "clip"

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):
        self.scorer = HFClipScorer(path, device, batch_size, what="CLIP")

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "ClipScoreReward":
        if not cfg.path:
            raise ValueError("rewards: 'clip' needs path: a local CLIPModel directory")
        return cls(cfg.path, device=cfg.device, batch_size=cfg.batch_size)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.scorer.cosine(images, prompts)
