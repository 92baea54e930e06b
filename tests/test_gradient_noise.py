"""benchmarks/gradient_noise.py: the noise-scale estimator against known synthetic gradients, the per-rollout
gradient against the update the training loop applies, and one small run end to end."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
spec = importlib.util.spec_from_file_location("gradient_noise", ROOT / "benchmarks" / "gradient_noise.py")
gn = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gn)


def test_noise_scale_recovers_a_known_signal_and_noise():
    gen = torch.Generator().manual_seed(0)
    n, dim, sigma = 400, 2000, 0.15  # |G|^2 = 1, tr(S) = dim * sigma^2 = 45: B_noise 45
    true = torch.randn(dim, generator=gen)
    true /= true.norm()
    grads = true + sigma * torch.randn(n, dim, generator=gen)
    signal, noise = gn.noise_scale((grads @ grads.T).double())
    assert signal == pytest.approx(1.0, abs=0.1)
    assert noise == pytest.approx(dim * sigma ** 2, rel=0.05)
    pure_noise = sigma * torch.randn(n, dim, generator=gen)
    assert abs(gn.noise_scale((pure_noise @ pure_noise.T).double())[0]) < 0.1  # no signal: ~0, not noise / n


def test_rollout_gradient_is_the_step_the_training_loop_takes():
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import load_config
    from egrpo_ray.models import build_policy
    from egrpo_ray.rewards import build_reward
    from egrpo_ray.training import learn, make_reward_fn, sample_and_score

    cfg = load_config(ROOT / "configs/tiny.yaml", ["learner.max_staleness=0", "learner.minibatch_rows=1000",
                                                   "learner.grad_clip=1000"])
    torch.manual_seed(0)
    policy = build_policy(cfg.model)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
    item = sample_and_score(policy, strategy, ["a red circle left of a blue square"], reward_fn,
                            torch.Generator().manual_seed(0), 0, policy_version=0)
    grad = gn.rollout_gradient(policy, strategy, cfg, item)
    steps = []

    class Recorder(torch.optim.SGD):  # keeps the gradient of each step it is asked to take
        def step(self, closure=None):
            steps.append(torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]]))

    params = [p for p in policy.parameters() if p.requires_grad]
    learn(policy, policy, [item], cfg, strategy, Recorder(params, lr=1.0), torch.Generator().manual_seed(1),
          policy_version=0)
    assert len(steps) == 1 and grad.norm() > 0  # one minibatch of every row, on-policy
    torch.testing.assert_close(steps[0], grad, rtol=1e-5, atol=1e-9)  # float summation order

    parts = gn.step_gradients(policy, strategy, cfg, item)  # --by-step: the same gradient, split by trained step
    assert sorted(parts) == sorted(set(item.rollout.step_index.tolist())) and len(parts) > 1
    assert all(part.norm() > 0 for part in parts.values())
    torch.testing.assert_close(sum(parts.values()), grad, rtol=1e-5, atol=1e-9)


def test_small_run_prints_the_noise_scale_and_compares_saved_means(capsys, tmp_path):
    for name, extra in (("a", ["--by-module", "--by-step"]), ("b", ["--seed", "1", "--random-reward"])):
        gn.main(["--rollouts", "4", "--bootstrap", "50", "--train-count", "1",
                 "--save-mean", str(tmp_path / f"{name}.safetensors"), *extra])
    out = capsys.readouterr().out
    assert re.search(r"egrpo on alignment, .*4 rollouts, \d+ FE each", out)
    assert re.search(r"egrpo on random rewards, .*4 rollouts", out)
    assert re.search(r"B_noise = tr\(S\)/\|G\|\^2 = \S+ rollouts, 95% CI \[", out)
    assert "transformer.transformer_blocks.0" in out and "FE for one signal-dominated step" in out
    assert re.search(r"^0->1 +1\.000->0\.978 ", out, re.M) and "cross terms between steps" in out
    gn.main(["--compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("run") and "/ a (95% CI)" in table[0] and "cosine of expected gradients" in table[0]
    assert [line.split()[0] for line in table[1:]] == ["a", "b"]
