import math

import torch

from egrpo_ray.algo.entropy import SQRT_2PI_E, build_plan, step_entropy
from egrpo_ray.algo.schedule import shifted_sigmas
from egrpo_ray.algo.sde import flow_sigma, gaussian_log_prob, ode_step, sde_mean_std, sde_step, step_log_prob


def _inputs(b=5, shape=(3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g), torch.randn(b, *shape, generator=g)


def test_schedule_endpoints_and_shift():
    s = shifted_sigmas(16, 3.0)
    assert len(s) == 17 and s[0] == 1 and s[-1] == 0
    assert torch.all(s[1:] < s[:-1])
    assert torch.allclose(shifted_sigmas(4, 1.0), torch.tensor([1, 0.75, 0.5, 0.25, 0], dtype=torch.float64))


def test_log_prob_matches_torch_distributions_normal():
    x, v = _inputs()
    s, s_next = torch.tensor(0.8), torch.tensor(0.7)
    sigma = flow_sigma(s, 0.9, 0.7)
    out = sde_step(x, v, s, s_next, sigma, generator=torch.Generator().manual_seed(1))
    std = float(sigma) * math.sqrt(0.1)
    ref = torch.distributions.Normal(out.mean, std).log_prob(out.sample)
    assert torch.allclose(out.log_prob, ref.flatten(1).mean(1), atol=1e-5)
    lp_sum, _, _ = step_log_prob(x, v, out.sample, s, s_next, sigma, reduction="sum")
    assert torch.allclose(lp_sum, ref.flatten(1).sum(1), rtol=1e-5)


def test_eta_zero_is_exactly_the_ode_step():
    x, v = _inputs()
    s, s_next = torch.tensor(0.6), torch.tensor(0.5)
    out = sde_step(x, v, s, s_next, flow_sigma(s, 0.9, 0.0))
    assert torch.equal(out.sample, ode_step(x, v, s, s_next))


def test_flow_mean_formula_and_std():
    x, v = _inputs()
    s, s_next, eta = 0.8, 0.7, 0.7
    sig = eta * math.sqrt(s / (1 - s))
    mean, std = sde_mean_std(x, v, torch.tensor(s), torch.tensor(s_next), torch.tensor(sig))
    ds = s_next - s
    ref = x * (1 + sig**2 / (2 * s) * ds) + v * (1 + sig**2 * (1 - s) / (2 * s)) * ds
    assert torch.allclose(mean, ref, atol=1e-5)
    assert torch.allclose(std, torch.full((5,), sig * math.sqrt(-ds)))


def test_sigma_at_one_uses_next_schedule_value():
    s = shifted_sigmas(16, 3.0)
    assert math.isclose(float(flow_sigma(s[0], s[1], 0.7)), 0.7 * math.sqrt(1 / (1 - float(s[1]))), rel_tol=1e-9)


def test_step_math_is_float32_for_bf16_inputs():
    x, v = _inputs()
    out = sde_step(x.bfloat16(), v.bfloat16(), torch.tensor(0.5), torch.tensor(0.4), torch.tensor(0.3))
    assert out.sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32


def test_entropy_closed_form_and_normal_entropy():
    s = shifted_sigmas(16, 3.0)
    for i, l in [(0, 1), (3, 1), (6, 3), (10, 2)]:
        sig = float(flow_sigma(s[i], s[1], 0.7))
        std = sig * math.sqrt(float(s[i] - s[i + l]))
        e = step_entropy(s, i, l, 0.7)
        assert math.isclose(e, SQRT_2PI_E * std, rel_tol=1e-9)
        d = 48
        h = torch.distributions.Normal(torch.zeros(d), torch.full((d,), std)).entropy().sum()
        assert math.isclose(e, math.exp(float(h) / d), rel_tol=1e-5)


def test_entropy_values_of_the_paper_setting_fall_with_the_step():
    s = shifted_sigmas(16, 3.0)
    expected = [2.89, 2.99, 2.14, 1.76, 1.54, 1.39, 1.28, 1.19, 1.12, 1.06, 1.00, 0.94, 0.87, 0.80, 0.69, 0.53]
    got = [step_entropy(s, i, 1, 0.7) for i in range(16)]
    assert all(abs(a - b) < 0.006 for a, b in zip(got, expected))
    assert all(step_entropy(s, 4, l, 0.7) < step_entropy(s, 4, l + 1, 0.7) for l in range(1, 6))


def test_merged_step_uses_sigma_at_its_start():
    s = shifted_sigmas(16, 3.0)
    x, v = _inputs()
    i, l = 6, 3
    sig_i = flow_sigma(s[i], s[1], 0.7)
    out = sde_step(x, v, s[i], s[i + l], sig_i, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.std, (sig_i * torch.sqrt(s[i] - s[i + l])).float().expand(5))
    mean_ref, _ = sde_mean_std(x, v, s[i], s[i + l], sig_i)
    assert torch.equal(out.mean, mean_ref)


def test_adaptive_fixed_and_no_merge_plans():
    s = shifted_sigmas(16, 3.0)
    assert build_plan(s, 0.7, "adaptive", 2.2).entries == ((0, 1), (1, 1), (2, 2), (4, 2), (6, 3))
    assert build_plan(s, 0.7, "none").entries == tuple((i, 1) for i in range(8))
    assert build_plan(s, 0.7, "adaptive", 0.0).entries == tuple((i, 1) for i in range(8))
    assert build_plan(s, 0.7, "fixed", 2.2, fixed_len=4).entries == ((0, 1), (1, 1), (2, 4), (6, 4))
    assert build_plan(s, 0.7, "adaptive", 2.2, max_merge=2).entries == ((0, 1), (1, 1), (2, 2), (4, 2), (6, 2))
    full = build_plan(s, 0.7, "adaptive", 2.2, active_fraction=1.0)
    assert full.entries[-1][0] + full.entries[-1][1] == 16  # capped at the end of the schedule
    band = build_plan(s, 0.7, "adaptive", 2.2, active_fraction=0.75, active_start=0.375)
    assert band.entries == ((6, 3), (9, 4))  # nothing branches before step 6; the same windows as the full plan's


def test_plan_is_printable_and_serialisable():
    from egrpo_ray.algo.entropy import MergePlan

    plan = build_plan(shifted_sigmas(16, 3.0), 0.7)
    assert str(plan) == "(0,1) (1,1) (2,2) (4,2) (6,3)"
    assert MergePlan.from_json(plan.to_json()) == plan


def test_gaussian_log_prob_reductions():
    x, m = _inputs()
    std = torch.full((5,), 0.3)
    ref = torch.distributions.Normal(m, 0.3).log_prob(x).flatten(1)
    assert torch.allclose(gaussian_log_prob(x, m, std, "mean"), ref.mean(1), atol=1e-5)
    assert torch.allclose(gaussian_log_prob(x, m, std, "sum"), ref.sum(1), rtol=1e-5)
