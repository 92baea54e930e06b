"""The gradient-noise measurement taken while training (egrpo_ray/algo/gradient_noise.py): its statistics against
gradients recorded independently from the optimizer, its run-level share against a known synthetic share, and
its line in a run's summary. The two-rank FSDP check is in test_parallel.py."""
import pytest
import torch

from egrpo_ray.algo.gradient_noise import GradientNoise, describe, signal_share
from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.algo.update import UpdateSettings, grpo_update
from egrpo_ray.config import load_config
from egrpo_ray.models import build_policy
from egrpo_ray.training import group_advantages, make_gradient_noise


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads]).double()


@pytest.mark.parametrize("buffer", ["device", "host"])
def test_pairs_of_updates_match_the_gradients_the_optimizer_saw(buffer):
    cfg = load_config(None, ["algorithm.group_size=4", "sampling.steps=8", f"learner.gradient_noise_buffer={buffer}"])
    torch.manual_seed(0)
    policy = build_policy(cfg.model)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    params = [p for p in policy.parameters() if p.requires_grad]
    steps: list[torch.Tensor] = []

    class Recorder(torch.optim.SGD):  # an SGD step that also keeps the gradient it was given
        def step(self, closure=None):
            steps.append(_flat(p.grad for p in params))
            return super().step(closure)

    optimizer = Recorder(params, lr=1e-3)
    # two epochs (the second must not count), four minibatches an epoch, no clipping (the statistic is pre-clip)
    settings = UpdateSettings(clip_range=1e-3, old_logprob="recompute", kl_beta=0.0, rows_per_minibatch=3, epochs=2,
                              grad_clip=1e9)
    prompts = ["a red circle left of a blue square", "two green triangles"]
    noise, reported, per_update = make_gradient_noise(cfg.learner), [], []
    for update in range(3):
        batch = strategy.rollout(policy, policy.encode_prompts(prompts), prompts, policy.latent_shape,
                                 torch.Generator().manual_seed(update))
        rewards = {"alignment": torch.rand(len(batch.final_latents), generator=torch.Generator().manual_seed(10 + update))}
        adv = group_advantages(rewards, batch.sample_group, cfg, strategy)
        before = len(steps)
        stats = grpo_update(policy, policy.encode_prompts(prompts), batch, adv, strategy.kernel, settings, optimizer,
                            torch.Generator().manual_seed(update), noise=noise)
        first_epoch = steps[before : before + stats.minibatches // 2]
        assert len(first_epoch) >= 2
        per_update.append(torch.stack(first_epoch).mean(0))
        reported.append(noise.finish())
    a0, a1, a2 = per_update
    assert reported[0].keys() == {"grad_step_sq"} and reported[1].keys() == {"grad_signal_sq"}
    assert reported[2].keys() == {"grad_step_sq"}  # a new pair starts
    assert reported[0]["grad_step_sq"] == pytest.approx(float(a0 @ a0), rel=1e-5)
    assert reported[1]["grad_signal_sq"] == pytest.approx(float(a1 @ a0), rel=1e-4)
    assert reported[2]["grad_step_sq"] == pytest.approx(float(a2 @ a2), rel=1e-5)
    assert noise.buffer_bytes == sum(p.numel() * 4 for p in params)  # one float32 copy of the gradients
    assert {t.device.type for t in noise._kept if t is not None} == {"cpu"}  # the host, or this CPU's "device"


def _synthetic_run(true_sq: float, pairs: int, prompts: int, seed: int) -> list[dict]:
    """Updates whose gradient is G plus noise of one prompt's variance 1/prompts: tr(S) = 1 per prompt."""
    gen = torch.Generator().manual_seed(seed)
    dim = 4000
    true = torch.randn(dim, generator=gen)
    true *= true_sq ** 0.5 / true.norm()
    param = torch.nn.Parameter(torch.zeros(dim))
    noise, records = GradientNoise(), []
    for _ in range(2 * pairs):
        for _ in range(2):  # two minibatches an update, each of prompts / 2 prompts
            param.grad = true + torch.randn(dim, generator=gen) * (2 / prompts / dim) ** 0.5
            noise.add([param])
        records.append(noise.finish())
    return records


def test_signal_share_recovers_a_known_share_and_noise_scale():
    # |G|^2 = 0.05, tr(S) / P = 1 / 4: share 0.05 / 0.30 = 1/6, B_noise = tr(S) / |G|^2 = 20 prompts
    stats = signal_share(_synthetic_run(0.05, 200, 4, seed=0), prompts_per_step=4)
    assert stats["pairs"] == 200 and stats["share_low"] < 1 / 6 < stats["share_high"]
    assert stats["share"] == pytest.approx(1 / 6, rel=0.1)
    assert stats["noise_scale_low"] < 20 < stats["noise_scale_high"]
    assert "half signal at about" in describe(stats)
    pure_noise = signal_share(_synthetic_run(0.0, 200, 4, seed=1), prompts_per_step=4)
    assert pure_noise["share_low"] < 0 < pure_noise["share_high"] < 0.05
    assert "not resolved above 0" in describe(pure_noise) and pure_noise["noise_scale_at_least"] > 4 * 19


def test_signal_share_needs_two_pairs():
    assert signal_share([{"grad_step_sq": 1.0}, {"grad_signal_sq": 0.1}], 4) is None
    assert describe(None) is None


@pytest.mark.parametrize("on_host", [False, True])
def test_a_parameter_without_gradient_in_a_pair_counts_zero_not_the_last_pairs_gradient(on_host):
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    noise = GradientNoise(on_host=on_host)
    a.grad, b.grad = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([5.0, 5.0])
    noise.add([a, b])
    assert noise.finish() == {"grad_step_sq": pytest.approx(9.0 + 50.0)}
    noise.add([a, b])
    noise.finish()  # the pair's second update
    a.grad, b.grad = torch.tensor([0.0, 3.0, 4.0]), None  # b gets no gradient in this pair
    noise.add([a, b])
    a.grad = torch.tensor([0.0, 1.0, 0.0])
    noise.add([a, b])
    assert noise.finish() == {"grad_step_sq": pytest.approx(8.0)}  # the mean of the two, (0, 2, 2); b counts 0
    a.grad, b.grad = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([7.0, 7.0])
    noise.add([a, b])
    assert noise.finish() == {"grad_signal_sq": pytest.approx(2.0)}  # (1, 0, 1) . (0, 2, 2); b's stale 5s count 0
