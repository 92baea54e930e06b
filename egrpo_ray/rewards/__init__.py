"""Reward models behind one interface (rewards/base.py); build_reward picks one from the config."""
from __future__ import annotations

import importlib

from egrpo_ray.config import RewardConfig
from egrpo_ray.rewards.base import Reward

__all__ = ["Reward", "build_reward", "REWARD_CLASSES"]

# name -> "module:Class"; each class has a ``from_config(RewardConfig)`` constructor.
REWARD_CLASSES = {
    "alignment": "egrpo_ray.rewards.alignment:AlignmentReward",
    "jpeg": "egrpo_ray.rewards.jpeg:JpegCompressibility",
    "hps": "egrpo_ray.rewards.hps:HPSv21Reward",
    "clip": "egrpo_ray.rewards.clip_score:ClipScoreReward",
    "pickscore": "egrpo_ray.rewards.pickscore:PickScoreReward",
    "imagereward": "egrpo_ray.rewards.image_reward:ImageRewardModel",
    "random": "egrpo_ray.rewards.control:RandomReward",  # a control: scores blind to the images
}


def build_reward(cfg: RewardConfig) -> Reward:
    module, cls = REWARD_CLASSES[cfg.name].split(":")
    return getattr(importlib.import_module(module), cls).from_config(cfg)
