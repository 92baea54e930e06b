"""The random-reward control: a config reward whose scores are blind to the images."""
import torch

from egrpo_ray.config import RewardConfig, load_config
from egrpo_ray.rewards import build_reward
from egrpo_ray.rewards.control import RandomReward


def test_random_reward_is_uniform_and_blind_to_the_images():
    reward = build_reward(RewardConfig(name="random"))
    prompts = ["a red circle"] * 2000
    scores = reward(torch.zeros(2000, 3, 8, 8), prompts)
    assert scores.shape == (2000,) and scores.dtype == torch.float32
    assert 0 <= scores.min() and scores.max() < 1 and abs(scores.mean().item() - 0.5) < 0.03
    # the same stream whatever the images: black and white images get the same scores
    black, white = RandomReward(seed=3), RandomReward(seed=3)
    assert torch.equal(black(torch.zeros(5, 3, 8, 8), prompts[:5]), white(torch.ones(5, 3, 8, 8), prompts[:5]))


def test_a_run_can_train_on_the_control():
    cfg = load_config(None, ["rewards=[{name: random}]"])
    assert [r.name for r in cfg.rewards] == ["random"]
