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


# ------------------------------------------------------------------ KL reference, decoupled PPO, partitions

from egrpo_ray.algo.sde import sde_mean_std  # noqa: E402
from egrpo_ray.algo.update import behaviour_weight, partition_count, partition_rows  # noqa: E402


def _settings(old_logprob="recompute", kl_beta=0.0, rows=3, epochs=1, minibatch="random", cap=2.0):
    return UpdateSettings(clip_range=0.2, old_logprob=old_logprob, kl_beta=kl_beta, rows_per_minibatch=rows,
                          epochs=epochs, grad_clip=1e9, behaviour_ratio_cap=cap, minibatch=minibatch)


def _closed_form_kl(policy, ref, cond, r, kernel):
    """beta-free KL, Flow-GRPO's train_sd3.py written out: ((mean - mean_ref)^2).mean(latent) / (2 std_dev_t^2)
    with std_dev_t = sqrt(s / (1 - s)) * eta (s_1 in place of s = 1), the SDE's noise level at the row's
    start; averaged over rows."""
    i, l = r.step_index, r.step_len
    s, s_next = kernel.s(i), kernel.s(i + l)
    c = {k: v[r.row_prompt] for k, v in cond.items()}
    with torch.no_grad():
        m, _ = sde_mean_std(r.start_latents, policy(r.start_latents, s, c), s, s_next, kernel.noise_level(i), kernel.kind)
        m_ref, _ = sde_mean_std(r.start_latents, ref(r.start_latents, s, c), s, s_next, kernel.noise_level(i), kernel.kind)
    std_dev_t = torch.sqrt(s / (1 - torch.where(s == 1, kernel.s(torch.ones_like(i)), s))) * kernel.eta
    return float((((m - m_ref) ** 2).flatten(1).mean(1) / (2 * std_dev_t**2)).mean())


def test_kl_reference_copy_is_zero_first_then_matches_the_closed_form(toy_policy):
    strategy, cond, r, adv = _batch(toy_policy, "egrpo")
    assert bool(adv.valid_group.all())  # random rewards: every row counts, so the KL mean is over all rows
    ref = toy_policy.reference_copy()
    assert ref.embed is toy_policy.embed  # frozen parts are shared, not copied
    assert not any(p.requires_grad for p in ref.parameters()) and not ref.training
    beta = 0.5
    plain = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 0.2)
    with_kl = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 0.2, kl_beta=beta, ref_fn=ref)
    assert with_kl.kl == 0.0 and torch.equal(with_kl.loss, plain.loss)
    opt = torch.optim.SGD([p for p in toy_policy.parameters() if p.requires_grad], lr=0.5)
    grpo_update(toy_policy, cond, r, adv, strategy.kernel, _settings(kl_beta=beta), opt, torch.Generator().manual_seed(0),
                ref_fn=ref)
    plain = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 0.2)
    with_kl = grpo_loss(toy_policy, cond, r, adv, strategy.kernel, 0.2, kl_beta=beta, ref_fn=ref)
    expected = _closed_form_kl(toy_policy, ref, cond, r, strategy.kernel)
    assert expected > 1e-6
    assert with_kl.kl == pytest.approx(expected, rel=1e-5)
    assert float((with_kl.loss - plain.loss).detach()) == pytest.approx(beta * expected, rel=1e-4)


def test_kl_pulls_rows_of_groups_without_reward_spread(toy_policy):
    """Flow-GRPO averages its KL over every sample: a group whose rewards tie has no policy term but still
    its KL to the reference."""
    strategy, cond, r, _ = _batch(toy_policy, "egrpo")
    flat = group_advantages(torch.ones(len(r.final_latents)), r.sample_group)
    ref = toy_policy.reference_copy()
    with torch.no_grad():
        toy_policy.net[2].bias.add_(0.1)
    out = grpo_loss(toy_policy, cond, r, flat, strategy.kernel, 1e-4, kl_beta=0.5, ref_fn=ref)
    out.loss.backward()
    assert out.rows_used == 0
    assert out.kl == pytest.approx(_closed_form_kl(toy_policy, ref, cond, r, strategy.kernel), rel=1e-5) and out.kl > 0
    assert float(out.loss.detach()) == pytest.approx(0.5 * out.kl, rel=1e-5)
    assert torch.count_nonzero(toy_policy.net[2].bias.grad) > 0


def test_decoupled_on_policy_has_weight_one_and_equals_recompute(toy_policy):
    import copy

    strategy, cond, r, adv = _batch(toy_policy, "egrpo")
    other = copy.deepcopy(toy_policy)
    stats = {}
    for mode, policy in (("recompute", toy_policy), ("decoupled", other)):
        opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        stats[mode] = grpo_update(policy, cond, r, adv, strategy.kernel, _settings(mode, epochs=2), opt,
                                  torch.Generator().manual_seed(3), on_policy_rows=torch.ones(len(r.step_index), dtype=torch.bool))
    assert stats["decoupled"].behaviour_weight_mean == 1.0
    assert stats["decoupled"].loss == stats["recompute"].loss
    assert all(torch.equal(a, b) for a, b in zip(toy_policy.parameters(), other.parameters()))


def test_decoupled_weight_is_the_capped_behaviour_ratio_when_stale(toy_policy):
    import copy

    behaviour = copy.deepcopy(toy_policy)
    with torch.no_grad():
        behaviour.net[2].weight.mul_(1.3)  # a stale sampler: other weights drew the batch
    strategy, cond, r, adv = _batch(behaviour, "egrpo")
    cap = 1.01
    with torch.no_grad():
        prox = score_rows(toy_policy, cond, r, strategy.kernel).log_probs
    expected_w = torch.minimum(torch.exp(prox - r.old_log_probs), torch.tensor(cap))
    assert 0 < int((expected_w == cap).sum()) < expected_w.numel()  # some capped, some not
    assert torch.equal(behaviour_weight(prox, r.old_log_probs, cap), expected_w)
    # the update's loss is the weighted surrogate anchored at the learner's recompute (ratio 1 on step one)
    a = adv.values[r.row_samples]
    expected_loss = float((expected_w * torch.maximum(-a, -a)).mean(1).mean())
    opt = torch.optim.SGD([p for p in toy_policy.parameters() if p.requires_grad], lr=0.0)
    stats = grpo_update(toy_policy, cond, r, adv, strategy.kernel, _settings("decoupled", cap=cap), opt,
                        torch.Generator(), parts=[torch.arange(len(r.step_index))])
    assert stats.ratio_mean_first == 1.0
    assert stats.behaviour_weight_mean == pytest.approx(float(expected_w.mean()), rel=1e-6)
    assert stats.loss == pytest.approx(expected_loss, rel=1e-5)


def test_partitions_cover_every_row_once_and_pad_to_a_shared_count():
    step_index = torch.tensor([3, 0, 3, 5, 0, 0, 5, 3, 3])
    g = torch.Generator().manual_seed(0)
    rand = partition_rows(step_index, "random", 4, g)
    assert len(rand) == partition_count(step_index, "random", 4) == 3
    assert sorted(torch.cat(rand).tolist()) == list(range(9))
    entries = partition_rows(step_index, "by_entry", 4, g)
    assert [sorted(set(step_index[p].tolist())) for p in entries] == [[0], [3], [5]]  # one step each, in order
    assert [len(p) for p in entries] == [3, 4, 2]
    padded = partition_rows(step_index, "by_entry", 4, g, num_parts=5)  # another rank has 5 entries
    assert len(padded) == 5 and sorted(torch.cat(padded).tolist()) == list(range(9))
    assert all(len(set(step_index[p].tolist())) == 1 for p in padded)
    assert len(partition_rows(step_index, "random", 4, g, num_parts=4)) == 4
    with pytest.raises(ValueError, match="below"):
        partition_rows(step_index, "by_entry", 4, g, num_parts=2)


@pytest.mark.parametrize("mode,kl_beta,epochs", [("rollout", 0.0, 1), ("recompute", 0.0, 2), ("decoupled", 0.1, 2)])
def test_compute_accounting_counts_learner_and_recompute_rows(toy_policy, mode, kl_beta, epochs):
    strategy, cond, r, adv = _batch(toy_policy, "egrpo")
    rows = len(r.step_index)
    opt = torch.optim.SGD([p for p in toy_policy.parameters() if p.requires_grad], lr=1e-3)
    stats = grpo_update(toy_policy, cond, r, adv, strategy.kernel, _settings(mode, kl_beta, epochs=epochs), opt,
                        torch.Generator().manual_seed(0), ref_fn=toy_policy.reference_copy() if kl_beta else None)
    assert stats.learner_rows == rows * epochs
    assert stats.recompute_rows == (0 if mode == "rollout" else rows) + (rows * epochs if kl_beta else 0)
    assert stats.logprob_mismatch < 1e-4
