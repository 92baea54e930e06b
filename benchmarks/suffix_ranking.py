"""Does a coarse ODE suffix rank a group's branches like the full one? (issue 13)

E-GRPO's rollout cost is almost all the deterministic suffix that carries each branch from its merged SDE step
to the image; the suffix only has to rank the G branches of a group. For every suffix setting this script runs
the real sampler (egrpo_ray.algo.sampler.branching_rollout) with the same generator seeds as the full Euler
suffix, so the anchor and every merged step's noise are the same and only the suffix differs (checked), scores
every branch with the config's rewards (the embedded default's: the alignment reward's strict product, the
benchmarks' reward), and prints per setting:
- within-group Spearman rank correlation of the rewards against the full suffix's (mean; 10th percentile over
  groups; groups whose rewards are constant under either suffix are left out and counted),
- the Pearson correlation of the group advantages (the learner's, algo/advantages.py) against the full suffix's,
- the mean reward shift (coarse minus full) and the final latents' mean relative error against the full suffix's,
- rollout forwards per prompt with the config's plan and G (counted by the sampler, equal to the formula), and
  with the paper's plan at G = 12 (T = 16, shift 3, eta 0.7, tau = 2.2) and its share of the paper's count 717.

    OMP_NUM_THREADS=1 python benchmarks/suffix_ranking.py --prompts 64 --group-size 12 --out suffix_ranking.json
    python benchmarks/suffix_ranking.py --config configs/flux-hps.yaml --device cuda --prompts 32

Single-threaded torch (torch.set_num_threads(1)): the numbers do not depend on threads, the run time does.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SOLVERS = ("euler", "heun", "dpm2m")
STEPS = (1, 2, 3, 4, 6, 8)
TARGET_SHARE, TARGET_SPEARMAN = 0.40, 0.95


def average_ranks(values):
    """Ranks 1..n, ties sharing their average rank."""
    less = (values[None, :] < values[:, None]).sum(1).double()
    equal = (values[None, :] == values[:, None]).sum(1).double()
    return less + (equal + 1) / 2


def pearson(a, b) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def group_spearman(full, coarse, group) -> tuple[list[float], int]:
    """Spearman per group with reward spread under the full suffix (the learner skips the others: counted);
    a group the coarse suffix makes constant ranks nothing (0)."""
    values, skipped = [], 0
    for g in range(int(group.max()) + 1):
        a, b = full[group == g], coarse[group == g]
        if bool((a == a[0]).all()):
            skipped += 1
            continue
        values.append(0.0 if bool((b == b[0]).all()) else pearson(average_ranks(a), average_ranks(b)))
    return values, skipped


def quantile(values: list[float], q: float) -> float:
    import torch

    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q)) if values else float("nan")


def paper_plan_cost(suffix) -> tuple[int, int]:
    """(forwards per prompt with ``suffix``, the paper's count 717) for the paper's plan at G = 12."""
    from egrpo_ray.algo.entropy import build_plan, paper_forwards, rollout_forwards
    from egrpo_ray.algo.schedule import shifted_sigmas

    plan = build_plan(shifted_sigmas(16, 3.0), 0.7, "adaptive", 2.2)
    return rollout_forwards(plan, 12, suffix), paper_forwards(plan, 12)


def weights_description(cfg) -> str:
    """Which weights ran: the tiny model's file with its sha256 and mtime, else the config's model path."""
    if cfg.model.kind != "tiny":
        return str(getattr(cfg.model, "path", None) or cfg.model.kind)
    from egrpo_ray.models.tiny import ASSET_DIR, WEIGHTS_FILE, read_manifest

    directory = Path(cfg.model.path) if cfg.model.path else ASSET_DIR
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime((directory / WEIGHTS_FILE).stat().st_mtime))
    return f"{directory / WEIGHTS_FILE} sha256 {str(read_manifest(directory).get('sha256'))[:12]} modified {stamp}"


def score_setting(policy, cfg, suffix, prompts, args, reward_fn, weights) -> dict:
    """Rewards [N], sample groups [N], counted forwards and next-latents of one suffix setting."""
    import torch

    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.models.base import policy_device

    strategy = build_strategy(cfg.sampling.model_copy(update={"suffix": suffix}), cfg.algorithm)
    totals, groups, merged, finals, forwards, n_groups = [], [], [], [], 0, 0
    device = policy_device(policy)
    t0 = time.perf_counter()
    for c in range(0, len(prompts), args.chunk):
        chunk = prompts[c : c + args.chunk]
        cond = policy.encode_prompts(chunk)
        gen = torch.Generator().manual_seed(args.seed * 100_003 + c)  # per chunk, the same for every setting
        r = strategy.rollout(policy, cond, chunk, policy.latent_shape, gen, 0, args.max_batch, device)
        images = policy.decode(r.final_latents).float().cpu()
        r = r.to("cpu")
        rewards = reward_fn(images, [chunk[i] for i in r.sample_prompt.tolist()])
        totals.append(sum(weights[k] * v.double() for k, v in rewards.items()))
        groups.append(r.sample_group + n_groups)
        merged.append(r.next_latents)
        finals.append(r.final_latents)
        forwards += r.forwards
        n_groups += r.num_groups
    print(f"  {suffix.solver} {suffix.steps or 'full'}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    per_prompt = forwards / len(prompts)
    if per_prompt != strategy.forwards_per_prompt():  # the sampler's count must equal the formula
        raise RuntimeError(f"counted {per_prompt} forwards per prompt, formula {strategy.forwards_per_prompt()}")
    return {"rewards": torch.cat(totals), "group": torch.cat(groups), "merged": torch.cat(merged), "final": torch.cat(finals),
            "forwards_per_prompt": strategy.forwards_per_prompt(), "seconds": time.perf_counter() - t0,
            "adv": (strategy.adv_std, strategy.adv_clip_order)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment config (default: the embedded tiny config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--prompts", type=int, default=64, help="prompts (each gives one group per plan entry)")
    p.add_argument("--group-size", type=int, help="G (default: the config's)")
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="suffix steps to try, comma-separated")
    p.add_argument("--chunk", type=int, default=8, help="prompts per sampler call")
    p.add_argument("--max-batch", type=int, help="rows per model call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from benchmarks.compare_strategies import STRICT_ALIGNMENT
    from egrpo_ray.algo.advantages import combine_rewards
    from egrpo_ray.algo.solvers import Suffix
    from egrpo_ray.config import ConfigError, SuffixConfig, load_config
    from egrpo_ray.models import build_policy
    from egrpo_ray.prompts import prompt_splits
    from egrpo_ray.rewards import build_reward
    from egrpo_ray.training import make_reward_fn

    strict = [STRICT_ALIGNMENT] if args.config is None else []  # the embedded default's benchmark reward
    overrides = strict + list(args.overrides) + ([f"algorithm.group_size={args.group_size}"] if args.group_size else [])
    try:
        cfg = load_config(args.config, overrides)
        settings = [SuffixConfig(solver=s, steps=int(n)) for s in args.solvers.split(",") for n in args.steps.split(",")]
    except (ConfigError, ValueError) as err:
        print(f"suffix_ranking: {err}".splitlines()[0], file=sys.stderr)
        return 2
    if cfg.algorithm.strategy not in ("egrpo", "g2rpo"):
        print(f"suffix_ranking: the suffix belongs to the branching strategies, not {cfg.algorithm.strategy}", file=sys.stderr)
        return 2
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.model).to(args.device).eval()
    reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
    weights = {r.name: r.weight for r in cfg.rewards}
    train, _ = prompt_splits(cfg.prompts)
    prompts = [train[i % len(train)] for i in range(args.prompts)]
    header = {
        "config": args.config or "embedded default (configs/tiny.yaml)", "overrides": overrides, "model": cfg.model.kind,
        "weights": weights_description(cfg), "prompts": len(prompts),
        "group_size": cfg.algorithm.group_size, "sampling_steps": cfg.sampling.steps, "seed": args.seed,
        "torch_threads": torch.get_num_threads(),
    }

    full = score_setting(policy, cfg, SuffixConfig(), prompts, args, reward_fn, weights)
    alg = cfg.algorithm
    std, _ = full["adv"]

    def advantages(rewards):
        return combine_rewards({"r": rewards}, {"r": 1.0}, full["group"], "reward", alg.adv_eps, alg.adv_clip, std).values

    full_adv = advantages(full["rewards"])
    full_paper, paper_count = paper_plan_cost(Suffix())
    spread_groups = len(group_spearman(full["rewards"], full["rewards"], full["group"])[0])
    rows = [{"solver": "euler", "steps": None, "spearman_mean": 1.0, "spearman_p10": 1.0,
             "groups_without_spread": int(full["group"].max()) + 1 - spread_groups,
             "advantage_corr": 1.0, "reward_shift": 0.0, "latent_rel_err": 0.0, "forwards_per_prompt": full["forwards_per_prompt"],
             "paper_plan_forwards": full_paper, "paper_plan_share": full_paper / paper_count,
             "seconds": full["seconds"]}]
    for suffix in settings:
        out = score_setting(policy, cfg, suffix, prompts, args, reward_fn, weights)
        if not torch.equal(out["merged"], full["merged"]):
            raise RuntimeError("the merged steps differ between suffix settings: the comparison would not be paired")
        rho, skipped = group_spearman(full["rewards"], out["rewards"], full["group"])
        paper_cost, _ = paper_plan_cost(suffix)
        rows.append({
            "solver": suffix.solver, "steps": suffix.steps,
            "spearman_mean": sum(rho) / len(rho) if rho else float("nan"), "spearman_p10": quantile(rho, 0.1),
            "groups_without_spread": skipped, "advantage_corr": pearson(full_adv, advantages(out["rewards"])),
            "reward_shift": float((out["rewards"] - full["rewards"]).mean()),
            "latent_rel_err": float(((out["final"] - full["final"]).flatten(1).norm(dim=1)
                                     / full["final"].flatten(1).norm(dim=1)).mean()),
            "forwards_per_prompt": out["forwards_per_prompt"], "paper_plan_forwards": paper_cost,
            "paper_plan_share": paper_cost / paper_count, "seconds": out["seconds"],
        })
    for row in rows:
        row["meets_target"] = row["paper_plan_share"] <= TARGET_SHARE and row["spearman_mean"] >= TARGET_SPEARMAN

    groups = int(full["group"].max()) + 1
    print(f"suffix ranking: {header['config']}, model {header['model']} (weights {header['weights']}), "
          f"{len(prompts)} prompts x {groups // len(prompts)} entries = {groups} groups of G = {header['group_size']} "
          f"({spread_groups} with reward spread under the full suffix: the Spearman is over those), "
          f"seed {args.seed}, torch threads {header['torch_threads']} (as OMP_NUM_THREADS=1)")
    print(f"reference: the full Euler suffix; paper plan at G = 12: full suffix {full_paper}, paper's count {paper_count}")
    print(f"target: paper-plan forwards <= {TARGET_SHARE:.0%} of {paper_count} and mean within-group Spearman >= {TARGET_SPEARMAN}")
    cols = ("solver", "steps", "Spearman", "p10", "adv corr", "R shift", "latent err", "fwd/prompt", "paper fwd", "share",
            "target")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        steps = "full" if r["steps"] is None else str(r["steps"])
        print(f"| {r['solver']} | {steps} | {r['spearman_mean']:.3f} | {r['spearman_p10']:.3f} | {r['advantage_corr']:.3f} | "
              f"{r['reward_shift']:+.4f} | {r['latent_rel_err']:.4f} | {r['forwards_per_prompt']} | {r['paper_plan_forwards']} | "
              f"{r['paper_plan_share']:.1%} | {'yes' if r['meets_target'] else 'no'} |")
    meeting = [r for r in rows[1:] if r["meets_target"]]
    if meeting:
        best = max(meeting, key=lambda r: (r["spearman_mean"], -r["paper_plan_forwards"]))
        print(f"best setting meeting the target: {best['solver']} {best['steps']} steps "
              f"(Spearman {best['spearman_mean']:.3f}, {best['paper_plan_share']:.1%} of {paper_count})")
    else:
        print("no setting meets the target")
    if args.out:
        Path(args.out).write_text(json.dumps({**header, "groups": groups, "groups_with_spread": spread_groups,
                                              "paper_count": paper_count, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
