"""How much of a policy gradient is signal? The gradient noise scale of the tiny task, in prompt rollouts.

Samples ``--rollouts`` independent prompt rollouts from one fixed policy (one prompt each: for E-GRPO, a group
of G images per merged step), takes each rollout's on-policy loss gradient g_i (no optimizer step), and from
the Gram matrix K_ij = g_i . g_j estimates
- |G|^2, the squared norm of the true gradient: the mean of g_i . g_j over pairs i != j (unbiased);
- tr(S), the noise of one rollout's gradient: the mean of |g_i|^2 minus |G|^2;
- B_noise = tr(S) / |G|^2, the "simple noise scale" of McCandlish et al. (2018, An Empirical Model of
  Large-Batch Training): a minibatch of B rollouts has signal |G|^2 against noise tr(S) / B, so below
  B_noise rollouts a step is mostly noise. Times the FE a rollout costs (counted as compare_strategies.py
  does), it is the compute one signal-dominated step needs: a strategy's price for the same signal.
The 95% intervals come from a bootstrap over rollouts (pairs of the same resampled rollout left out). A random
reward (``--random-reward``, rewards independent of the images) is the control: its |G|^2 must be ~0.
``--save-mean`` keeps a run; ``--compare`` sets saved runs against the first (which needs a seed of its own).
It scores with the alignment reward's strict product, the benchmarks' reward (``--set 'rewards=[...]'`` replaces
it). Single-threaded; docs/benchmarks.md section 1 (probe 9) quotes its figures.

    OMP_NUM_THREADS=1 python benchmarks/gradient_noise.py --rollouts 240 --strategy dancegrpo --seed 2 \\
        --save-mean dancegrpo.safetensors
    python benchmarks/gradient_noise.py --compare egrpo.safetensors dancegrpo.safetensors
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.compare_strategies import STRATEGIES, STRICT_ALIGNMENT, forward_equivalents  # noqa: E402
from benchmarks.reward_probe import random_reward  # noqa: E402


def rollout_gradient(policy, strategy, cfg, item, row_weight=None) -> "torch.Tensor":
    """The flattened gradient of one rollout's on-policy loss (ratio 1: the sampler's log-probs are the old ones).
    ``row_weight`` [R, B] weights each branch's term (the loss's normaliser is unchanged)."""
    import torch

    from egrpo_ray.algo.loss import grpo_loss
    from egrpo_ray.training import group_advantages

    batch = item.rollout
    adv = group_advantages(item.rewards, batch.sample_group, cfg, strategy)
    policy.zero_grad(set_to_none=True)
    out = grpo_loss(policy, policy.encode_prompts(batch.prompts), batch, adv, strategy.kernel,
                    cfg.algorithm.clip_range, behaviour_weight=row_weight)
    out.loss.backward()
    params = [p for p in policy.parameters() if p.requires_grad]
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def step_gradients(policy, strategy, cfg, item) -> dict[int, "torch.Tensor"]:
    """The rollout's gradient split by the schedule step its rows start at ({step: flattened gradient}). On-policy
    the loss is a sum over rows with a fixed normaliser, so the parts sum to ``rollout_gradient``."""
    steps = item.rollout.step_index
    ones = item.rollout.old_log_probs.new_ones(item.rollout.old_log_probs.shape)
    return {int(s): rollout_gradient(policy, strategy, cfg, item, ones * (steps == s).view(-1, 1))
            for s in steps.unique()}


def noise_scale(gram, idx=None) -> tuple[float, float]:
    """(|G|^2, tr(S)) from the Gram matrix of per-rollout gradients, over the rollouts ``idx`` (a resample)."""
    import torch

    n = gram.shape[0]
    idx = torch.arange(n) if idx is None else idx
    sub = gram[idx][:, idx]
    distinct = idx[:, None] != idx[None, :]  # a resampled rollout paired with itself is not an independent pair
    signal = float(sub[distinct].mean())
    return signal, float(sub.diagonal().mean()) - signal


def resampled(gram, draws: int, seed: int) -> "torch.Tensor":
    """[draws, 2]: (|G|^2, tr(S)) over bootstrap resamples of the rollouts."""
    import torch

    boot, n = torch.Generator().manual_seed(seed), gram.shape[0]
    return torch.tensor([noise_scale(gram, torch.randint(0, n, (n,), generator=boot)) for _ in range(draws)],
                        dtype=torch.float64)


def ratio(num, den) -> "torch.Tensor":
    """num / den elementwise for noise / signal: infinite where the signal is not above 0."""
    import torch

    return torch.where(den > 0, num / den, torch.inf)


def ci(x) -> str:
    """The 95% percentile interval of bootstrap draws (inf sorts last; an undetermined inf / inf counts as inf)."""
    ordered = x.nan_to_num(nan=float("inf"), posinf=float("inf")).sort().values
    lo, hi = (float(ordered[min(len(x) - 1, int(q * len(x)))]) for q in (0.025, 0.975))
    return f"[{lo:.3g}, {hi:.3g}]"


def by_module(policy, grads, signal: float, noise: float) -> None:
    """Each module's share of the signal and of the noise, and its own B_noise (point estimates): a module whose
    share of the signal exceeds its share of the noise is where a step's useful part lands."""
    import torch

    sizes: dict[str, int] = {}
    for name, param in policy.named_parameters():
        if param.requires_grad:
            module = ".".join(name.rsplit(".", 1)[0].split(".")[:3])
            sizes[module] = sizes.get(module, 0) + param.numel()
    print(f"{'module':<48}{'params':>9}{'signal %':>10}{'noise %':>9}{'B_noise':>10}")
    offset = 0
    for module, size in sizes.items():
        part = grads[:, offset:offset + size]
        offset += size
        s, nz = noise_scale((part @ part.T).double())
        print(f"{module:<48}{size:>9}{100 * s / signal:>10.1f}{100 * nz / noise:>9.1f}"
              f"{nz / s if s > 0 else float('inf'):>10.3g}")


def by_step(parts: dict[int, "torch.Tensor"], lengths: dict[int, int], sigmas, signal: float, noise: float,
            draws: int, seed: int) -> None:
    """Each trained step's share of the signal and of the noise, and its own B_noise and signal with bootstrap
    intervals: where along the trajectory a rollout's useful gradient comes from. The rest of the signal is
    the cross terms between steps (their expected gradients pointing the same way)."""
    print(f"{'step':<8}{'sigma':>14}{'signal %':>10}{'noise %':>9}  {'B_noise (95% CI)':<26}signal (95% CI)")
    own = 0.0
    for step, grads in sorted(parts.items()):
        flat = grads.float()
        gram = (flat @ flat.T).double()
        s, nz = noise_scale(gram)
        own += s
        boot = resampled(gram, draws, seed)
        end = step + lengths[step]
        b_noise = f"{nz / s if s > 0 else float('inf'):.3g} {ci(ratio(boot[:, 1], boot[:, 0]))}"
        print(f"{f'{step}->{end}':<8}{f'{float(sigmas[step]):.3f}->{float(sigmas[end]):.3f}':>14}"
              f"{100 * s / signal:>10.1f}{100 * nz / noise:>9.1f}  {b_noise:<26}{s:.3g} {ci(boot[:, 0])}")
    print(f"cross terms between steps: {100 * (signal - own) / signal:.1f}% of the signal")


def compare(paths: list[str], draws: int) -> None:
    """Each saved run against the first: its FE per signal-dominated step, the ratio to the first's (independent
    bootstrap resamples of both) and the cosine between their expected gradients (mean_a . mean_b is unbiased
    for G_a . G_b and each |G|^2 is the unbiased pair estimate, so noise does not pull it toward 0). Both assume
    independent rollouts: give the first run a seed no other run uses (the same seed shares initial noise)."""
    import torch
    from safetensors.torch import load_file

    saved = {Path(p).stem: load_file(p) for p in paths}
    first = next(iter(saved))
    signal, cost, cost_draws = {}, {}, {}
    for i, (name, run) in enumerate(saved.items()):
        fe = float(run["fe_per_rollout"])
        signal[name], noise = noise_scale(run["gram"])
        cost[name] = float(ratio(torch.tensor(noise), torch.tensor(signal[name]))) * fe
        both = resampled(run["gram"], draws, i)
        cost_draws[name] = ratio(both[:, 1], both[:, 0]) * fe
    width = max(16, *(len(name) + 2 for name in saved))
    print(f"{'run':<{width}}{'rollouts':>9}{'FE/rollout':>11}  {'FE per signal-dominated step (95% CI)':<38}"
          f"{'/ ' + first + ' (95% CI)':<28}cosine of expected gradients with {first}")
    for name, run in saved.items():
        against, cosine = "", "nan (a signal is not above 0)"
        if name == first:
            cosine = ""
        elif signal[name] > 0 and signal[first] > 0:
            dot = float(run["mean"].double() @ saved[first]["mean"].double())
            cosine = f"{dot / (signal[name] * signal[first]) ** 0.5:.2f}"
        if name != first:
            against = f"{cost[name] / cost[first]:.2f} {ci(cost_draws[name] / cost_draws[first])}"
        print(f"{name:<{width}}{run['gram'].shape[0]:>9}{float(run['fe_per_rollout']):>11.0f}  "
              f"{f'{cost[name]:.3g} {ci(cost_draws[name])}':<38}{against:<28}{cosine}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rollouts", type=int, default=96, help="independent prompt rollouts")
    p.add_argument("--strategy", choices=list(STRATEGIES), default="egrpo", help="compare_strategies.py's settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-count", type=int, help="only the first N training prompts")
    p.add_argument("--random-reward", action="store_true", help="control: rewards independent of the images")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--save-mean", metavar="PATH", help="safetensors: the mean gradient, the Gram matrix and the FE "
                   "per rollout, for --compare")
    p.add_argument("--by-module", action="store_true", help="also split signal and noise by module")
    p.add_argument("--by-step", action="store_true", help="also split signal and noise by the trained step (one "
                   "bfloat16 copy of the gradients per step: rollouts x steps x 3.7 MB on the tiny model)")
    p.add_argument("--compare", nargs="+", metavar="PATH", help="saved runs, each against the first: FE per "
                   "signal-dominated step, their ratio, the cosine of their expected gradients")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    if args.compare:
        return compare(args.compare, args.bootstrap)

    torch.set_num_threads(1)
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import load_config
    from egrpo_ray.models import build_policy
    from egrpo_ray.prompts import PromptCursor, prompt_splits
    from egrpo_ray.rewards import build_reward
    from egrpo_ray.training import make_reward_fn, sample_and_score

    subset = [f"prompts.train_count={args.train_count}"] if args.train_count else []
    cfg = load_config(ROOT / "configs/tiny.yaml", [STRICT_ALIGNMENT] + STRATEGIES[args.strategy] + subset + args.settings)
    torch.manual_seed(args.seed)
    policy = build_policy(cfg.model)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    rewards = {r.name: random_reward(args.seed) if args.random_reward else build_reward(r) for r in cfg.rewards}
    reward_fn = make_reward_fn(rewards)
    train, _ = prompt_splits(cfg.prompts)
    cursor, generator = PromptCursor(train, args.seed), torch.Generator().manual_seed(args.seed)
    n = args.rollouts
    grads = torch.zeros(n, sum(p.numel() for p in policy.parameters() if p.requires_grad))
    parts, lengths = {}, {}  # --by-step: {step: [n, params] bfloat16}, {step: its length}
    fe, start = 0, time.time()
    for i in tqdm(range(n), desc="rollout gradients", disable=None):
        item = sample_and_score(policy, strategy, cursor.take(1), reward_fn, generator, i, policy_version=0)
        rows = len(item.rollout.step_index)  # one forward+backward a row, nothing recomputed
        fe += forward_equivalents({"learner_rows": rows, "recompute_rows": 0}, item.rollout.forwards)
        if not args.by_step:
            grads[i] = rollout_gradient(policy, strategy, cfg, item)
            continue
        for step, grad in step_gradients(policy, strategy, cfg, item).items():
            grads[i] += grad
            parts.setdefault(step, torch.zeros(n, grad.numel(), dtype=torch.bfloat16))[i] = grad
            lengths[step] = int(item.rollout.step_len[item.rollout.step_index == step][0])
    gram = (grads @ grads.T).double()  # float32 products: their error is ~1e-6 of |g|^2, the signal ~4e-3 of it
    signal, noise = noise_scale(gram)
    draws = resampled(gram, args.bootstrap, args.seed)
    sig, scale = draws[:, 0], ratio(draws[:, 1], draws[:, 0])
    half = n // 2
    cosine = float(torch.nn.functional.cosine_similarity(grads[:half].mean(0), grads[half:2 * half].mean(0), dim=0))
    b_noise = float(ratio(torch.tensor(noise), torch.tensor(signal)))

    print(f"{args.strategy} on {'random rewards' if args.random_reward else '+'.join(rewards)}, "
          f"{args.settings or 'configs/tiny.yaml'}, {n} rollouts, {fe / n:.0f} FE each, {time.time() - start:.0f} s")
    print(f"per-rollout gradient norm: median {float(grads.norm(dim=1).median()):.4g}")
    print(f"|G|^2 (signal) {signal:.4g} {ci(sig)}; tr(S) (noise per rollout) {noise:.4g}")
    print(f"B_noise = tr(S)/|G|^2 = {b_noise:.3g} rollouts, 95% CI {ci(scale)} "
          f"(infinite where the resampled signal is <= 0: {int((sig <= 0).sum())} of {len(sig)})")
    print(f"cosine between the mean gradients of the two halves ({half} rollouts each): {cosine:.3f}")
    if args.by_module:
        by_module(policy, grads, signal, noise)
    if args.by_step:
        by_step(parts, lengths, strategy.kernel.sigmas, signal, noise, args.bootstrap, args.seed)
    if args.save_mean:
        from safetensors.torch import save_file

        save_file({"mean": grads.mean(0), "gram": gram, "fe_per_rollout": torch.tensor(fe / n)}, args.save_mean)
    print(f"FE for one signal-dominated step (B_noise rollouts): {b_noise * fe / n:.3g}, 95% CI "
          f"{ci(scale * fe / n)}")


if __name__ == "__main__":
    main()
