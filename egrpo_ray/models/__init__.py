"""Policy adapters behind one interface (models/base.py); build_policy picks one from the config."""
from __future__ import annotations

from egrpo_ray.config import ModelConfig
from egrpo_ray.models.base import Policy

__all__ = ["Policy", "build_policy"]


def build_policy(cfg: ModelConfig) -> Policy:
    """Load the configured policy (imports lazily: the FLUX and SD3 adapters pull in more of diffusers)."""
    if cfg.kind == "tiny":
        from egrpo_ray.models.tiny import load_tiny_policy

        return load_tiny_policy(cfg)
    import torch

    master = torch.float32 if cfg.master_dtype == "float32" else None
    if cfg.kind == "flux":
        from egrpo_ray.models.flux import FluxPolicy

        return FluxPolicy.from_config(cfg, trainable_dtype=master)
    from egrpo_ray.models.sd3 import SD3Policy

    return SD3Policy.from_config(cfg, trainable_dtype=master)
