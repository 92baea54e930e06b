"""The branches' ODE suffix (sampling.suffix, issue 13): solvers, sub-schedules, exact forward counts, and that
only the branches' finish changes (the rows the learner re-scores do not)."""
import json
import math

import pytest
import torch

from egrpo_ray.algo.entropy import rollout_forwards
from egrpo_ray.algo.sampler import index_cond
from egrpo_ray.algo.sde import ode_step
from egrpo_ray.algo.solvers import SOLVERS, Suffix, solve, solver_forwards, sub_schedule, suffix_forwards
from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.cli import main
from egrpo_ray.config import AlgorithmConfig, SamplingConfig, SuffixConfig

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _strategy(solver="euler", steps=None, g=4, sampling_steps=8):
    sampling = SamplingConfig(steps=sampling_steps, shift=3.0, eta=0.7, suffix=SuffixConfig(solver=solver, steps=steps))
    return build_strategy(sampling, AlgorithmConfig(strategy="egrpo", group_size=g))


def _rollout(policy, strategy, seed=0, max_batch=None):
    cond = policy.encode_prompts(PROMPTS)
    return strategy.rollout(policy, cond, PROMPTS, policy.latent_shape, torch.Generator().manual_seed(seed), 0, max_batch)


# --------------------------------------------------------------------------------------------- sub-schedule


def test_sub_schedule_keeps_both_ends_and_spaces_evenly():
    assert sub_schedule(3, 16, None) == list(range(3, 17))
    assert sub_schedule(3, 16, 13) == sub_schedule(3, 16, 50) == list(range(3, 17))
    assert sub_schedule(0, 12, 4) == [0, 3, 6, 9, 12]
    assert sub_schedule(9, 16, 1) == [9, 16]
    for start, steps in [(1, 3), (2, 5), (4, 2), (9, 6), (15, 4)]:
        points = sub_schedule(start, 16, steps)
        assert points[0] == start and points[-1] == 16 and len(points) == min(steps, 16 - start) + 1
        assert all(b > a for a, b in zip(points, points[1:]))
    assert sub_schedule(16, 16, 3) == [16]  # a branch that ends on the last step has no suffix


def test_suffix_forward_formula():
    assert [solver_forwards(s, 4) for s in SOLVERS] == [4, 7, 4]  # heun's last step to 0 is Euler
    assert suffix_forwards(7, None) == 7 and suffix_forwards(7, Suffix("heun", None)) == 13
    assert suffix_forwards(7, Suffix("dpm2m", 3)) == 3 and suffix_forwards(2, Suffix("dpm2m", 3)) == 2
    assert suffix_forwards(0, Suffix("heun", 3)) == 0
    with pytest.raises(ValueError):
        suffix_forwards(5, Suffix("rk4", 2))


def test_paper_plan_costs():
    """The paper's plan at G = 12: remaining suffix steps 15, 14, 12, 10, 7 after its five entries."""
    plan = _strategy(g=12, sampling_steps=16).plan
    assert rollout_forwards(plan, 12) == rollout_forwards(plan, 12, Suffix("euler", None)) == 7 + 12 * 58
    assert rollout_forwards(plan, 12, Suffix("dpm2m", 4)) == 7 + 12 * 20
    assert rollout_forwards(plan, 12, Suffix("heun", 3)) == 7 + 12 * 25
    assert rollout_forwards(plan, 12, Suffix("euler", 8)) == 7 + 12 * (8 + 8 + 8 + 8 + 7)


# ------------------------------------------------------------------------------------ the sampler's suffix


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [None, 1, 2, 3, 50])
def test_counted_forwards_equal_the_formula(toy_policy, solver, steps):
    strategy = _strategy(solver, steps)
    r = _rollout(toy_policy, strategy, max_batch=5)  # chunked calls count the same
    assert r.forwards == strategy.forwards_per_prompt() * len(PROMPTS)


def test_chunked_forwards_sample_the_same(toy_policy):  # rollout.max_batch_rows caps memory, not the samples
    strategy = _strategy("dpm2m", 3)
    whole, chunked = _rollout(toy_policy, strategy), _rollout(toy_policy, strategy, max_batch=5)
    for name in ("final_latents", "next_latents", "old_log_probs"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-5, atol=1e-5)


def _old_finish(policy, cond, kernel, x, k, prompt_idx):
    """The pre-suffix sampler's finish (one Euler step per schedule step, all latents with steps left batched)."""
    x, k = x.clone(), k.clone()
    while (k < kernel.steps).any():
        active = (k < kernel.steps).nonzero().squeeze(1)
        s, s_next = kernel.s(k[active]), kernel.s(k[active] + 1)
        v = policy(x[active], s, index_cond(cond, prompt_idx[active])).float()
        x[active] = ode_step(x[active], v, s, s_next)
        k[active] += 1
    return x


@pytest.mark.parametrize("steps", [None, 50])
def test_euler_full_suffix_is_bit_identical_to_the_plain_sampler(toy_policy, steps):
    strategy = _strategy("euler", steps)
    r = _rollout(toy_policy, strategy)
    g = strategy.group_size
    ends = (r.step_index + r.step_len).repeat_interleave(g)
    old = _old_finish(toy_policy, toy_policy.encode_prompts(PROMPTS), strategy.kernel, r.next_latents.flatten(0, 1), ends,
                      r.row_prompt.repeat_interleave(g))
    assert torch.equal(r.final_latents, old)


def test_suffix_changes_only_the_branches_finish(toy_policy):
    base = _rollout(toy_policy, _strategy())
    for solver, steps in [("euler", 2), ("heun", 2), ("dpm2m", 3), ("heun", None)]:
        r = _rollout(toy_policy, _strategy(solver, steps))
        for field in ("start_latents", "next_latents", "old_log_probs", "step_index", "step_len", "row_samples", "sample_group"):
            assert torch.equal(getattr(r, field), getattr(base, field)), (solver, steps, field)
        assert not torch.equal(r.final_latents, base.final_latents)


# ------------------------------------------------------------------------- order of accuracy, closed form

MU = torch.tensor([[0.8, -1.2, 0.3, 2.0]], dtype=torch.float64)
C = torch.tensor([[0.3, 0.6, 1.5, 0.2]], dtype=torch.float64)


def _var(s):
    return (1 - s) ** 2 * C**2 + s**2


def _gaussian_velocity(x, s, prompt_idx):
    """The exact flow-matching velocity of data N(MU, C^2) against N(0, 1) noise: x(s) = (1-s) MU + sqrt(var(s)) z."""
    s = s.double()[:, None]
    return (-MU + (s - (1 - s) * C**2) / _var(s) * (x.double() - (1 - s) * MU)).float()


def _exact(x, s_from, s_to):
    z = (x.double() - (1 - s_from) * MU) / _var(s_from).sqrt()
    return (1 - s_to) * MU + _var(torch.tensor(s_to)).sqrt() * z


class _Counting:
    def __init__(self):
        self.forwards = 0

    def __call__(self, x, s, prompt_idx):
        self.forwards += len(x)
        return _gaussian_velocity(x, s, prompt_idx)


X0 = torch.tensor([[0.5, -0.3, 1.1, -0.7]])
S_FROM = 0.9


def _error(solver, grid):
    counting = _Counting()
    out = solve(counting, X0, grid[None], torch.tensor([len(grid)]), torch.zeros(1, dtype=torch.long), solver)
    if grid[-1] == 0:  # solver_forwards counts grids that end at s = 0 (heun's last step is then Euler)
        assert counting.forwards == solver_forwards(solver, len(grid) - 1)
    return float((out.double() - _exact(X0, S_FROM, float(grid[-1]))).abs().max())


def _lambda_uniform(steps, s_to=0.1):
    """Sigmas evenly spaced in lambda = log((1 - s) / s), the variable DPM-Solver's order is stated in; a grid
    that reaches s = 0 has unbounded lambda steps at its end, so orders are measured on [0.9, 0.1]."""
    lam = torch.linspace(math.log((1 - S_FROM) / S_FROM), math.log((1 - s_to) / s_to), steps + 1, dtype=torch.float64)
    return torch.sigmoid(-lam)


@pytest.mark.parametrize("solver,order", [("euler", 1), ("heun", 2), ("dpm2m", 2)])
def test_solver_order_of_accuracy(solver, order):
    errors = [_error(solver, _lambda_uniform(n)) for n in (16, 32, 64, 128)]
    rates = [a / b for a, b in zip(errors, errors[1:])]  # halving the step divides the error by 2^order
    assert all(2**order * 0.8 < r < 2**order * 1.25 for r in rates), (errors, rates)


def test_second_order_solvers_beat_euler_at_equal_forwards():
    """To s = 0 on a grid evenly spaced in s (as the shifted schedule is near 0), where the suffix really runs."""
    def to_zero(steps):
        return torch.linspace(S_FROM, 0.0, steps + 1, dtype=torch.float64)

    for forwards in (4, 8, 16):
        euler = _error("euler", to_zero(forwards))
        assert _error("dpm2m", to_zero(forwards)) < euler / 2
        assert _error("heun", to_zero((forwards + 1) // 2)) < euler  # heun: 2n - 1 forwards for n steps


def test_rows_on_different_grids_share_batches_and_match_solving_alone():
    grids = torch.zeros(3, 5, dtype=torch.float64)
    grids[0, :5] = torch.tensor([0.9, 0.7, 0.4, 0.2, 0.0])
    grids[1, :3] = torch.tensor([0.6, 0.3, 0.0])
    grids[2, :2] = torch.tensor([0.3, 0.0])
    lengths = torch.tensor([5, 3, 2])
    x = torch.tensor([[0.5, -0.3, 1.1, -0.7], [1.0, 0.2, -0.4, 0.3], [-0.2, 0.9, 0.1, 0.6]])
    for solver in SOLVERS:
        together = solve(_gaussian_velocity, x, grids, lengths, torch.zeros(3, dtype=torch.long), solver)
        for m in range(3):
            alone = solve(_gaussian_velocity, x[m : m + 1], grids[m : m + 1, : lengths[m]], lengths[m : m + 1],
                          torch.zeros(1, dtype=torch.long), solver)
            assert torch.allclose(together[m : m + 1], alone, atol=1e-6), solver


# ------------------------------------------------------------------------------------------------ plan CLI


def test_plan_uses_the_config_group_size_and_prints_the_suffix_cost(capsys):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    assert main(["plan", "--config", str(cfg), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group_size"] == 8 and out["forwards_per_prompt"] == out["forwards_per_prompt_full_suffix"] == 7 + 8 * 58
    assert main(["plan", "--config", str(cfg), "--set", "algorithm.group_size=12", "--set", "sampling.suffix.solver=dpm2m",
                 "--set", "sampling.suffix.steps=4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["group_size"] == 12 and out["suffix"] == {"solver": "dpm2m", "steps": 4}
    assert out["forwards_per_prompt"] == 247 and out["forwards_per_prompt_full_suffix"] == 703
    assert out["forwards_per_prompt_paper"] == 717
    assert main(["plan", "--group-size", "12", "--set", "sampling.suffix.solver=heun", "--set", "sampling.suffix.steps=3"]) == 0
    table = capsys.readouterr().out
    assert "G = 12: 307 image-step forwards (43.7% of the full Euler suffix's 703: saves 396)" in table
    assert main(["plan", "--set", "sampling.suffix.solver=rk4"]) == 2
