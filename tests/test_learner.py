import pytest
import torch

from egrpo_ray.algo.advantages import combine_rewards, group_advantages
from egrpo_ray.algo.loss import grpo_loss, score_rows
from egrpo_ray.algo.strategies import STRATEGIES, build_strategy
from egrpo_ray.algo.update import UpdateSettings, grpo_update
from egrpo_ray.config import AlgorithmConfig, SamplingConfig

PROMPTS = ["a red circle", "a blue square"]


def _batch(policy, name, g=4, **alg):
    strategy = build_strategy(SamplingConfig(steps=8), AlgorithmConfig(strategy=name, group_size=g, **alg))
    cond = policy.encode_prompts(PROMPTS)
    r = strategy.rollout(policy, cond, PROMPTS, policy.latent_shape, torch.Generator().manual_seed(0))
    rewards = torch.randn(len(r.final_latents), generator=torch.Generator().manual_seed(1))
    return strategy, cond, r, group_advantages(rewards, r.sample_group)


def test_group_zscores_clip_and_zero_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 100.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    a = group_advantages(rewards, group, clip=1.5)
    g0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ref = (g0 - g0.mean()) / (g0.std(unbiased=False) + 1e-8)
    assert torch.allclose(a.values[:4], ref.clamp(-1.5, 1.5))
    assert torch.equal(a.valid_group, torch.tensor([True, False, True]))
    assert a.zero_std_count == 1 and abs(a.zero_std_ratio - 1 / 3) < 1e-9
    assert torch.equal(a.values[4:8], torch.zeros(4))
    assert a.values[11] == 1.5 and float(a.values[8]) == pytest.approx(-1 / 3 ** 0.5, rel=1e-6)  # z = 1.73 -> clipped
    unclipped = group_advantages(rewards, group, clip=5.0)
    assert torch.allclose(unclipped.values[:4], ref)


def test_multi_reward_modes():
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    hps = torch.tensor([0.30, 0.31, 0.32, 0.2, 0.2, 0.2])
    clip = torch.tensor([10.0, 30.0, 20.0, 1.0, 2.0, 3.0])
    w = {"hps": 1.0, "clip": 0.5}
    by_reward = combine_rewards({"hps": hps, "clip": clip}, w, group, "reward")
    assert torch.allclose(by_reward.values, group_advantages(hps + 0.5 * clip, group).values, atol=1e-6)
    by_adv = combine_rewards({"hps": hps, "clip": clip}, w, group, "advantage")
    ref = group_advantages(hps, group).values + 0.5 * group_advantages(clip, group).values
    assert torch.allclose(by_adv.values, ref, atol=1e-6)
    assert by_adv.zero_std_count == 0  # group 1 is constant in hps but not in clip


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_ratio_is_exactly_one_with_identical_weights(toy_policy, name):
    strategy, cond, r, adv = _batch(toy_policy, name)
    with torch.no_grad():
        old = score_rows(toy_policy, cond, r, strategy.kernel).log_probs
    new = score_rows(toy_policy, cond, r, strategy.kernel).log_probs
    assert torch.equal(torch.exp(new - old), torch.ones_like(new))
    out = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 1e-4, old_log_probs=old)
    assert out.ratio_mean == 1.0 and out.clip_fraction == 0.0
    # and the update's first minibatch, recompute mode, is exactly on-policy too
    opt = torch.optim.SGD(toy_policy.parameters(), lr=0.0)
    settings = UpdateSettings(clip_range=1e-4, old_logprob="recompute", kl_beta=0.0, rows_per_minibatch=3, epochs=1,
                              grad_clip=1.0)
    stats = grpo_update(toy_policy, cond, r, adv, strategy.kernel, settings, opt, torch.Generator().manual_seed(0))
    assert stats.ratio_mean_first == 1.0
    assert stats.logprob_mismatch < 1e-4  # the sampler's own log-probs agree to float32 precision


@pytest.mark.parametrize("name", ["egrpo", "flowgrpo"])
def test_one_gradient_step_moves_log_probs_with_the_advantage(toy_policy, name):
    strategy, cond, r, adv = _batch(toy_policy, name, g=6)
    opt = torch.optim.SGD([p for p in toy_policy.parameters() if p.requires_grad], lr=0.02)
    before = score_rows(toy_policy, cond, r, strategy.kernel).log_probs.detach()
    out = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, clip_range=0.2)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    after = score_rows(toy_policy, cond, r, strategy.kernel).log_probs.detach()
    delta, a = after - before, adv.values[r.row_samples]
    assert float(delta[a > 0].mean()) > 0 > float(delta[a < 0].mean())
    assert float((delta * a).sum()) > 0


def test_zero_std_groups_carry_no_gradient(toy_policy):
    strategy, cond, r, _ = _batch(toy_policy, "egrpo")
    flat = group_advantages(torch.ones(len(r.final_latents)), r.sample_group)
    assert flat.zero_std_ratio == 1.0
    out = grpo_loss(toy_policy, cond, r, flat, strategy.kernel, 1e-4)
    out.loss.backward()
    assert out.rows_used == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in toy_policy.parameters())


def test_kl_to_reference_is_zero_for_identical_models_and_positive_after_a_change(toy_policy):
    import copy

    strategy, cond, r, adv = _batch(toy_policy, "egrpo")
    ref = copy.deepcopy(toy_policy)
    out = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 1e-4, kl_beta=0.1, ref_fn=ref)
    assert out.kl == 0.0
    with torch.no_grad():
        toy_policy.net[2].bias.add_(0.1)
    out = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 1e-4, kl_beta=0.1, ref_fn=ref)
    assert out.kl > 0
