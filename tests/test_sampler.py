import pytest
import torch

from egrpo_ray.algo.entropy import paper_forwards
from egrpo_ray.algo.loss import score_rows
from egrpo_ray.algo.sampler import sample_ode
from egrpo_ray.algo.strategies import STRATEGIES, build_strategy
from egrpo_ray.config import AlgorithmConfig, MergeConfig, SamplingConfig

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _strategy(name, g=4, **alg):
    return build_strategy(SamplingConfig(steps=8, shift=3.0, eta=0.7), AlgorithmConfig(strategy=name, group_size=g, **alg))


def _rollout(policy, strategy, seed=0, iteration=0):
    cond = policy.encode_prompts(PROMPTS)
    return strategy.rollout(policy, cond, PROMPTS, policy.latent_shape, torch.Generator().manual_seed(seed), iteration)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_seeded_rollout_reproduces_itself_bit_for_bit(toy_policy, name):
    a, b = _rollout(toy_policy, _strategy(name)), _rollout(toy_policy, _strategy(name))
    for field in ("final_latents", "start_latents", "next_latents", "old_log_probs", "step_index", "row_samples"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    c = _rollout(toy_policy, _strategy(name), seed=1)
    assert not torch.equal(a.final_latents, c.final_latents)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_model_call_count_matches_the_cost_formula(toy_policy, name):
    strategy = _strategy(name)
    r = _rollout(toy_policy, strategy)
    assert r.forwards == strategy.forwards_per_prompt() * len(PROMPTS)


def test_egrpo_cost_formula_against_the_paper_count():
    strategy = build_strategy(SamplingConfig(), AlgorithmConfig())
    assert str(strategy.plan) == "(0,1) (1,1) (2,2) (4,2) (6,3)"
    assert paper_forwards(strategy.plan, 12) == 717
    # the anchor stops at the last branch point (7 forwards instead of 16) and doubles as the merged step
    assert strategy.forwards_per_prompt() == 717 - 16 - 5 + 7


def test_a_late_active_band_branches_only_there_and_costs_what_the_formula_says(toy_policy):
    sampling = SamplingConfig(steps=8, shift=3.0, eta=0.7, merge=MergeConfig(active_start=0.5, active_fraction=1.0))
    strategy = build_strategy(sampling, AlgorithmConfig(group_size=4))
    assert strategy.plan.entries[0][0] == 4
    r = _rollout(toy_policy, strategy)
    assert set(r.step_index.tolist()) == {i for i, _ in strategy.plan.entries}
    assert r.forwards == strategy.forwards_per_prompt() * len(PROMPTS)


def test_branching_groups_share_the_anchor_and_branches_differ(toy_policy):
    strategy = _strategy("egrpo", g=4)
    r = _rollout(toy_policy, strategy)
    entries = len(strategy.plan.entries)
    assert r.start_latents.shape[0] == len(PROMPTS) * entries and r.next_latents.shape[1] == 4
    # every group is one (prompt, entry) with G members
    assert torch.equal(torch.bincount(r.sample_group), torch.full((len(PROMPTS) * entries,), 4))
    for row in range(len(r.start_latents)):
        nxt = r.next_latents[row]
        assert all(not torch.equal(nxt[0], nxt[k]) for k in range(1, 4))  # branches differ
    # the entry-0 anchor latent is the prompt's initial noise: recompute it from the same generator
    noise = torch.randn((len(PROMPTS), *toy_policy.latent_shape), generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.start_latents[::entries], noise)
    # with eta = 0 every branch of a group is the anchor's own deterministic continuation (a config refuses
    # eta = 0, which leaves nothing to train; the sampler itself takes it)
    zero_eta = SamplingConfig.model_construct(steps=8, eta=0.0, merge=MergeConfig(mode="none"))
    det = _rollout(toy_policy, build_strategy(zero_eta, AlgorithmConfig(group_size=3)))
    cond = toy_policy.encode_prompts(PROMPTS)
    ode = sample_ode(toy_policy, cond, noise, _strategy("egrpo").kernel.sigmas)
    assert torch.allclose(det.final_latents.view(len(PROMPTS), -1, *toy_policy.latent_shape), ode[:, None].expand(-1, det.final_latents.shape[0] // len(PROMPTS), -1, -1), atol=1e-5)


@pytest.mark.parametrize("name", ["dancegrpo", "mixgrpo"])  # flowgrpo: per-sample noise (tests/test_baselines.py)
def test_trajectory_groups_share_initial_noise(toy_policy, name):
    r = _rollout(toy_policy, _strategy(name, g=4))
    first = r.step_index == 0  # the group's members (those that train step 0) start from the same noise
    starts, prompt = r.start_latents[first], r.row_prompt[first]
    assert all(torch.equal(starts[k], starts[prompt == prompt[k]][0]) for k in range(len(starts)))
    finals = r.final_latents.view(len(PROMPTS), 4, -1)
    assert not torch.equal(finals[:, 0], finals[:, 1])  # and diverge through the SDE steps
    assert torch.equal(r.sample_group, torch.arange(len(PROMPTS)).repeat_interleave(4))


def test_strategy_specific_steps(toy_policy):
    assert set(_rollout(toy_policy, _strategy("flowgrpo")).step_index.tolist()) == set(range(7))
    dance = _rollout(toy_policy, _strategy("dancegrpo", timestep_fraction=0.5))
    assert torch.equal(torch.bincount(dance.row_samples.flatten()), torch.full((len(PROMPTS) * 4,), 3))  # int(7 * 0.5) each
    mix = _strategy("mixgrpo", window_size=3, window_shift_every=2)
    assert set(_rollout(toy_policy, mix, iteration=0).step_index.tolist()) == {0, 1, 2}
    assert set(_rollout(toy_policy, mix, iteration=5).step_index.tolist()) == {2, 3, 4}
    g2 = _strategy("g2rpo")
    assert all(l == 1 for _, l in g2.plan.entries)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_learner_recompute_matches_sampler_log_probs(toy_policy, name):
    strategy = _strategy(name)
    r = _rollout(toy_policy, strategy)
    with torch.no_grad():
        lp = score_rows(toy_policy, toy_policy.encode_prompts(PROMPTS), r, strategy.kernel).log_probs
    assert lp.shape == r.old_log_probs.shape
    assert torch.allclose(lp, r.old_log_probs, atol=1e-4, rtol=0)
