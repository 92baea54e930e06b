"""Does RL move the alignment reward? One in-process E-GRPO run, scored under both ways to combine its terms.

Trains the tiny model on configs/tiny.yaml (on-policy, 4 optimizer steps an iteration: compare_strategies.py's
loop) with the alignment reward combined as ``--combine`` (product: strict; mean: graded
partial credit), and every ``--every`` iterations prints the FE spent, the mean rollout reward of the last 10
iterations and the evaluation reward (ODE, fixed noise) under BOTH combinations, so a run trained on one can be
judged by the other, with two things the reward does not see: background noise (egrpo_ray.quality) and the
bright area (extra objects raise it); first, the first rollout's within-group spread (do the groups rank samples?).
``--train-count N`` trains on the first N training prompts and evaluates those over max(4, 32 / N) noise
draws each (does RL fit them?); otherwise it trains on the config's training prompts and evaluates the
held-out ones over 4 draws (does it generalise?). ``--random-reward`` trains on rewards independent of the
images (a control: what the optimizer alone does to them); ``--grid`` writes the base and latest images.
Single-threaded (torch.set_num_threads(1)); docs/benchmarks.md section 1 quotes its figures.

    OMP_NUM_THREADS=1 python benchmarks/reward_probe.py --combine product --lr 1e-5 --iters 120 --train-count 1 \
        --set 'prompts.tiny_train_kinds=[relation]' --set sampling.eta=0.3 --grid one-prompt.png
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def group_spread(rewards, group) -> str:
    """Do the groups rank their samples? The mean reward and the mean within-group standard deviation."""
    spreads = [rewards[group == g].std().item() for g in group.unique()]
    return (f"first rollout: {len(spreads)} groups, reward mean {rewards.mean().item():.4f}, "
            f"within-group std {sum(spreads) / len(spreads):.4f}")


def random_reward(seed: int):
    """A control: rewards drawn uniformly, independent of the images (egrpo_ray/rewards/control.py)."""
    from egrpo_ray.rewards.control import RandomReward

    return RandomReward(seed)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--combine", choices=["product", "mean"], default="product", help="the training reward")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--iters", type=int, default=120)
    p.add_argument("--every", type=int, default=20, help="evaluate every N iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-count", type=int, help="train on the first N training prompts and evaluate them")
    p.add_argument("--random-reward", action="store_true", help="control: train on rewards independent of the images")
    p.add_argument("--grid", help="PNG: the first 16 evaluation images, base beside the latest evaluation's")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from benchmarks.compare_strategies import one_iteration
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import load_config
    from egrpo_ray.evaluate import heldout_scores
    from egrpo_ray.models import build_policy
    from egrpo_ray.outputs import save_comparison
    from egrpo_ray.prompts import PromptCursor, prompt_splits
    from egrpo_ray.rewards.alignment import COMBINES, AlignmentReward, object_stats
    from egrpo_ray.training import make_optimizer, make_reward_fn

    train_reward = make_reward_fn({"alignment": random_reward(args.seed) if args.random_reward
                                   else AlignmentReward(combine=args.combine)})
    both = make_reward_fn({c: AlignmentReward(combine=c) for c in COMBINES})  # evaluation: named by combination
    subset = [f"prompts.train_count={args.train_count}"] if args.train_count else []
    settings = ["learner.max_staleness=0", f"learner.lr={args.lr}", *subset, *args.settings]
    cfg = load_config(ROOT / "configs/tiny.yaml", settings)
    torch.manual_seed(args.seed)
    policy = build_policy(cfg.model)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    train, heldout = prompt_splits(cfg.prompts)
    eval_prompts = train * max(4, 32 // len(train)) if args.train_count else heldout * 4

    shown: dict = {}  # the first evaluation's images, beside which --grid shows the latest

    def evaluate() -> str:
        """Both combinations on the same images, and what the reward does not see: the background noise and
        the bright area (px; spraying extra objects raises it)."""
        scored = heldout_scores(policy, eval_prompts, both, cfg, 4242)
        latest = scored.images[:16]
        if args.grid:
            save_comparison(shown.setdefault("base", latest), latest, eval_prompts[:16], args.grid,
                            labels=("base", "latest"))
        area = object_stats(scored.images)["area"].mean().item()
        return (" ".join(f"{c} {scored.per_prompt[c].mean().item():.4f}" for c in COMBINES)
                + f" | background noise {scored.quality['background_noise']:.3f} area {area:.0f} px")

    optimizer = make_optimizer(policy, cfg.learner)
    cursor = PromptCursor(train, args.seed)
    rollout_gen, learn_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    trained_on = "random rewards" if args.random_reward else args.combine
    print(f"train on {trained_on}, lr {args.lr}, seed {args.seed}, {args.settings or 'configs/tiny.yaml'}; evaluating "
          f"{'training' if args.train_count else 'held-out'} prompts x draws = {len(eval_prompts)}", flush=True)
    print(f"iteration 0 FE 0 eval: {evaluate()}", flush=True)
    rewards, fe, start = [], 0.0, time.time()
    for it in range(args.iters):
        item, metrics, spent = one_iteration(policy, strategy, cursor, train_reward, cfg, optimizer,
                                             rollout_gen, learn_gen, it, optimizer_steps=4)
        if it == 0:
            print(group_spread(item.rewards["alignment"], item.rollout.sample_group), flush=True)
        fe += spent
        rewards.append(metrics["reward_mean"])
        if (it + 1) % args.every == 0:
            recent = sum(rewards[-10:]) / len(rewards[-10:])
            print(f"iteration {it + 1} FE {fe:.0f} rollout(last 10) {recent:.4f} eval: {evaluate()} "
                  f"[{time.time() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
