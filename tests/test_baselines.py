"""Each baseline against its source's own formula (docs/algorithm.md section 8), written out here
independently of the code under test."""
import numpy as np
import pytest
import torch

from egrpo_ray.algo.advantages import combine_rewards, group_advantages
from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import AlgorithmConfig, SamplingConfig

PROMPTS = ["a red circle", "a blue square"]
G = 4


def _strategy(name, steps=16, **alg):
    return build_strategy(SamplingConfig(steps=steps, shift=3.0, eta=0.7), AlgorithmConfig(strategy=name, group_size=G, **alg))


def _rollout(policy, strategy, seed=0, iteration=0):
    cond = policy.encode_prompts(PROMPTS)
    return strategy.rollout(policy, cond, PROMPTS, policy.latent_shape, torch.Generator().manual_seed(seed), iteration)


def _steps_per_sample(r):
    return [sorted(r.step_index[r.row_samples[:, 0] == n].tolist()) for n in range(len(r.final_latents))]


def test_dancegrpo_trains_its_own_permutation_of_all_but_the_last_step_per_sample(toy_policy):
    r = _rollout(toy_policy, _strategy("dancegrpo"), seed=3)
    # train_grpo_flux.py: timesteps[:, :-1] (the last step dropped), an independent torch.randperm per
    # sample, then the first int(len * timestep_fraction) of it: int(15 * 0.6) = 9 of 16
    g = torch.Generator().manual_seed(3)
    torch.randn((len(PROMPTS), *toy_policy.latent_shape), generator=g)  # the shared initial noise comes first
    expected = [sorted(torch.randperm(16 - 1, generator=g)[: int((16 - 1) * 0.6)].tolist()) for _ in range(len(PROMPTS) * G)]
    assert _steps_per_sample(r) == expected
    assert all(len(s) == 9 for s in expected) and 15 not in r.step_index.tolist()
    assert len({tuple(s) for s in expected}) > 1  # the rows of different samples sit at different steps
    assert r.forwards == _strategy("dancegrpo").forwards_per_prompt() * len(PROMPTS)  # a forward on all 16


@torch.no_grad()
def test_dancegrpo_rollout_replays_its_sources_sde_and_decodes_the_last_x0_prediction(toy_policy):
    """train_grpo_flux.py, written out: flux_step on the first T - 1 steps (mean x + ds v - eta^2/2 score ds,
    score = -(x - (1 - s) x0) / s^2, std eta sqrt(-ds)), then ``latents = pred_original``, the last step's
    x0 = x - s v, which is the image (no noise from the untrained last step)."""
    seed, eta, n = 11, 0.3, len(PROMPTS) * G
    r = _rollout(toy_policy, _strategy("dancegrpo", dance_eta=eta), seed=seed)
    u = torch.linspace(1, 0, 17, dtype=torch.float64)
    sigmas = (3.0 * u / (1 + 2.0 * u)).float()  # sd3_time_shift(3, linspace(1, 0, T + 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(PROMPTS), *toy_policy.latent_shape), generator=g).repeat_interleave(G, 0)  # --init_same_noise
    for _ in range(n):
        torch.randperm(15, generator=g)  # each sample's trained steps, drawn before sampling
    cond = {k: v.repeat_interleave(G, 0) for k, v in toy_policy.encode_prompts(PROMPTS).items()}
    for k in range(16):
        s, ds = sigmas[k], sigmas[k + 1] - sigmas[k]
        v = toy_policy(x, torch.full((n,), float(s)), cond)
        x0 = x - s * v
        if k == 15:
            x = x0
            break
        score = -(x - x0 * (1 - s)) / s**2
        mean = x + ds * v + (-0.5 * eta**2 * score) * ds
        x = mean + eta * torch.sqrt(-ds) * torch.randn(x.shape, generator=g)
    torch.testing.assert_close(r.final_latents, x, rtol=1e-5, atol=1e-5)


def test_dancegrpo_and_mixgrpo_share_the_initial_noise_within_the_group(toy_policy):
    for strategy in (_strategy("dancegrpo"), _strategy("mixgrpo", window_size=4)):
        r = _rollout(toy_policy, strategy, seed=5)
        noise = torch.randn((len(PROMPTS), *toy_policy.latent_shape), generator=torch.Generator().manual_seed(5))
        first = r.step_index == 0
        assert first.any()
        assert torch.equal(r.start_latents[first], noise[r.row_prompt[first]])


@pytest.mark.parametrize("shared", [None, True])
def test_flowgrpo_draws_each_samples_own_noise_unless_shared(toy_policy, shared):
    r = _rollout(toy_policy, _strategy("flowgrpo", shared_noise=shared), seed=7)
    first = r.step_index == 0  # Flow-GRPO trains every step but the last, so step 0 has a row per sample
    starts = r.start_latents[first][r.row_samples[first, 0].argsort()]
    g = torch.Generator().manual_seed(7)
    if shared is None:  # same_latent = False: one noise per sample, drawn prompt-major
        assert torch.equal(starts, torch.randn((len(PROMPTS) * G, *toy_policy.latent_shape), generator=g))
        grouped = starts.view(len(PROMPTS), G, -1)
        assert all(not torch.equal(grouped[p, 0], grouped[p, k]) for p in range(len(PROMPTS)) for k in range(1, G))
    else:
        noise = torch.randn((len(PROMPTS), *toy_policy.latent_shape), generator=g)
        assert torch.equal(starts, noise.repeat_interleave(G, 0))
    assert sorted(set(r.step_index.tolist())) == list(range(15))


def _mixgrpo_source_windows(steps, size, iters_per_group, iterations):
    """GRPOTrainingStates (progressive, prog_overlap_step 1, roll_back) with max_timesteps = steps - 2."""
    max_t, cur, it_in_group, out = steps - 2, 0, 0, []
    for _ in range(iterations):
        out.append(list(range(cur, min(cur + size, max_t))))
        it_in_group += 1
        if it_in_group >= iters_per_group:
            it_in_group, cur = 0, cur + 1
        if cur > max_t:
            cur, it_in_group = 0, 0
    return out


@pytest.mark.parametrize("steps,size", [(16, 4), (8, 3), (5, 5)])
def test_mixgrpo_window_never_reaches_the_last_two_steps(steps, size):
    every = 2
    strategy = _strategy("mixgrpo", steps=steps, window_size=size, window_shift_every=every)
    ours = [strategy.sde_steps(it) for it in range(every * steps * 3)]
    assert all(w and max(w) < steps - 2 and len(w) <= size for w in ours)
    # one sweep of the window is the source's, round for round
    source = _mixgrpo_source_windows(steps, size, every, every * (steps - 1))
    assert ours[: every * (steps - 2)] == source[: every * (steps - 2)]
    # the source then spends a round on the empty window at max_timesteps before rolling back: we skip it
    assert all(w == [] for w in source[every * (steps - 2):])
    assert ours[every * (steps - 2)] == source[0]


def test_mixgrpo_rollout_keeps_the_last_two_steps_ode(toy_policy):
    strategy = _strategy("mixgrpo", steps=8, window_size=3, window_shift_every=1)
    for it in range(12):
        r = _rollout(toy_policy, strategy, iteration=it)
        assert set(r.step_index.tolist()) == set(strategy.sde_steps(it)) and max(r.step_index.tolist()) <= 5


@torch.no_grad()
def test_mixgrpo_steps_outside_the_window_are_plain_euler_and_the_image_is_the_last_latent(toy_policy):
    """MixGRPO's sampler outside the window: prev_sample = latents + dt * v, and the image is the final z
    (--drop_last_sample off). Replayed from the rollout's own window transitions."""
    strategy = _strategy("mixgrpo", steps=8, window_size=3, window_shift_every=1)
    r = _rollout(toy_policy, strategy, seed=2, iteration=2)
    window = strategy.sde_steps(2)
    assert window == [2, 3, 4]
    u = torch.linspace(1, 0, 9, dtype=torch.float64)
    sigmas = (3.0 * u / (1 + 2.0 * u)).float()
    n = len(PROMPTS) * G
    x = torch.randn((len(PROMPTS), *toy_policy.latent_shape), generator=torch.Generator().manual_seed(2)).repeat_interleave(G, 0)
    cond = {k: v.repeat_interleave(G, 0) for k, v in toy_policy.encode_prompts(PROMPTS).items()}
    for k in range(8):
        if k in window:  # every sample trains each window step: take the SDE sample the rollout drew
            rows = (r.step_index == k).nonzero().squeeze(1)
            order = r.row_samples[rows, 0].argsort()
            torch.testing.assert_close(r.start_latents[rows][order], x, rtol=1e-5, atol=1e-5)
            x = r.next_latents[rows][order][:, 0]
        else:
            x = x + (sigmas[k + 1] - sigmas[k]) * toy_policy(x, torch.full((n,), float(sigmas[k])), cond)
    torch.testing.assert_close(r.final_latents, x, rtol=1e-5, atol=1e-5)


def _reward_groups():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3 * G, generator=g, dtype=torch.float64), torch.arange(3).repeat_interleave(G)


def test_unbiased_std_is_torch_std_and_population_std_is_numpy_std():
    rewards, group = _reward_groups()
    unbiased = group_advantages(rewards, group, std="unbiased").values
    population = group_advantages(rewards, group, std="population").values
    for k in range(3):
        r = rewards[group == k]
        dance = (r - r.mean()) / (r.std() + 1e-8)  # DanceGRPO / G2RPO: torch's default (n - 1)
        a = r.numpy()
        flow = (a - np.mean(a)) / (np.std(a) + 1e-8)  # Flow-GRPO's stat tracker: numpy's default (n)
        assert torch.allclose(unbiased[group == k].double(), dance, atol=1e-6)
        assert np.allclose(population[group == k].double().numpy(), flow, atol=1e-6)
    assert not torch.allclose(unbiased, population)


def test_batch_scope_is_flow_grpos_global_std():
    rewards, group = _reward_groups()
    rewards[group == 2] = 0.5  # a constant group: no signal, whatever the scope
    adv = group_advantages(rewards, group, eps=1e-4, std="population", scope="batch")
    a, g = rewards.numpy(), group.numpy()
    for k in range(2):  # Flow-GRPO's stat tracker with global_std: each prompt's mean, np.std of the whole batch
        flow = (a[g == k] - np.mean(a[g == k])) / (np.std(a) + 1e-4)
        assert np.allclose(adv.values[group == k].double().numpy(), flow, atol=1e-6)
    assert adv.valid_group.tolist() == [True, True, False] and torch.all(adv.values[group == 2] == 0)
    assert not torch.allclose(adv.values, group_advantages(rewards, group, eps=1e-4, std="population").values)


def test_advantage_mode_clamps_after_the_weighted_sum():
    rewards, group = _reward_groups()
    other = rewards.flip(0) * 3
    w, clip = {"hps": 1.0, "clip": 0.7}, 1.2
    after = combine_rewards({"hps": rewards, "clip": other}, w, group, "advantage", clip=clip, std="unbiased",
                            clip_order="after_sum").values.double()
    each = combine_rewards({"hps": rewards, "clip": other}, w, group, "advantage", clip=clip, std="unbiased",
                           clip_order="each_reward").values.double()

    def z(r):  # MixGRPO advantage_aggr / G2RPO: per-reward z-scores, weighted sum, torch.clamp in the loss
        out = torch.empty_like(r)
        for k in range(3):
            x = r[group == k]
            out[group == k] = (x - x.mean()) / (x.std() + 1e-8)
        return out

    assert torch.allclose(after, torch.clamp(1.0 * z(rewards) + 0.7 * z(other), -clip, clip), atol=1e-6)
    assert torch.allclose(each, z(rewards).clamp(-clip, clip) + 0.7 * z(other).clamp(-clip, clip), atol=1e-6)
    assert not torch.allclose(after, each)


@pytest.mark.parametrize("name,std,scope,multi,shared", [
    ("egrpo", "unbiased", "group", "reward", True), ("g2rpo", "unbiased", "group", "reward", True),
    ("dancegrpo", "unbiased", "group", "reward", True), ("mixgrpo", "unbiased", "group", "advantage", True),
    ("flowgrpo", "population", "batch", "reward", False)])
def test_each_strategy_resolves_its_sources_defaults_and_the_config_overrides_them(name, std, scope, multi, shared):
    # MixGRPO's --multi_reward_mix defaults to advantage_aggr; VisualGRPO's RewardManager and Flow-GRPO's
    # multi-score reward weight-sum the scores first
    s = _strategy(name)
    assert (s.adv_std, s.adv_std_scope, s.adv_clip_order, s.multi_reward, s.shared_noise) == (
        std, scope, "after_sum", multi, shared)
    o = _strategy(name, adv_std="population" if std == "unbiased" else "unbiased", adv_clip_order="each_reward",
                  adv_std_scope="group" if scope == "batch" else "batch",
                  multi_reward="reward" if multi == "advantage" else "advantage")
    assert o.adv_std != std and o.adv_clip_order == "each_reward" and o.adv_std_scope != scope and o.multi_reward != multi


def test_branching_cannot_drop_the_shared_anchor_noise():
    with pytest.raises(ValueError, match="shared_noise"):
        _strategy("egrpo", shared_noise=False)
    assert _strategy("dancegrpo", shared_noise=False).shared_noise is False
