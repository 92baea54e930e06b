"""``egrpo-ray plan``: the schedule, each step's entropy, the merge plan and the rollout cost; with ``--memory``,
the GPU memory per role and whether the config fits (egrpo_ray/memory_plan.py)."""
from __future__ import annotations

import argparse
import json

from egrpo_ray.config import ConfigError, ExperimentConfig, MergeConfig, add_config_args, load_config, validate


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="print the noise schedule, step entropies, the E-GRPO merge plan and the rollout cost")
    add_config_args(p)  # the sampling settings and G come from the config (default: the embedded tiny config)
    p.add_argument("--steps", type=int, help="denoising steps T (overrides the config's)")
    p.add_argument("--shift", type=float, help="schedule shift a")
    p.add_argument("--eta", type=float, help="SDE noise level")
    p.add_argument("--tau", type=float, help="entropy threshold; 0 = no merging")
    p.add_argument("--active-fraction", type=float, help="fraction of the schedule that branches (where it ends)")
    p.add_argument("--active-start", type=float, help="fraction of the schedule before which nothing branches")
    p.add_argument("--fixed-merge", type=int, metavar="L", help="merge every low-entropy step by L instead of adaptively")
    p.add_argument("--max-merge", type=int, help="cap on a merged step's length")
    p.add_argument("--group-size", type=int, help="G, for the cost (default: the config's algorithm.group_size)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--memory", action="store_true",
                   help="instead: GPU memory per role (rollout, learner, rewards) for --config, and whether it fits")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, metavar="N",
                   help="memory of one GPU for --memory, in GiB (default 80)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> ExperimentConfig:
    """The config (with --set) and the plan flags on top of it."""
    data = load_config(args.config, args.overrides).model_dump()
    sampling, merge = data["sampling"], data["sampling"]["merge"]
    for key, value in (("steps", args.steps), ("shift", args.shift), ("eta", args.eta)):
        if value is not None:
            sampling[key] = value
    for key, value in (("tau", args.tau), ("active_fraction", args.active_fraction),
                       ("active_start", args.active_start), ("max_merge", args.max_merge)):
        if value is not None:
            merge[key] = value
    if args.fixed_merge is not None:
        merge.update(mode="fixed", fixed_len=args.fixed_merge)
    if merge["tau"] == 0:
        merge["mode"] = "none"
    if args.group_size is not None:
        if args.group_size < 1:
            raise ConfigError("--group-size must be >= 1")
        data["algorithm"]["group_size"] = args.group_size
    return validate(data)


def run_memory(args: argparse.Namespace) -> int:
    """Exit 0 whether it fits or not: the answer is the output."""
    from egrpo_ray.memory_plan import format_plan, plan_memory

    plan = plan_memory(load_config(args.config, args.overrides), args.gpu_memory_gib)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        print(format_plan(plan, args.config or "the embedded default config"))
    return 0


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top: `egrpo-ray --help` must not import torch (egrpo_ray/cli.py)
    from egrpo_ray.algo.entropy import paper_forwards, rollout_forwards, step_entropy
    from egrpo_ray.algo.schedule import shifted_sigmas
    from egrpo_ray.algo.strategies import merge_plan

    if getattr(args, "memory", False):
        return run_memory(args)
    exp = _config(args)
    cfg, g, suffix = exp.sampling, exp.algorithm.group_size, exp.sampling.suffix
    m: MergeConfig = cfg.merge
    sigmas = shifted_sigmas(cfg.steps, cfg.shift)
    plan = merge_plan(sigmas, cfg.eta, m)
    entropy = [step_entropy(sigmas, i, 1, cfg.eta) for i in range(cfg.steps)]
    cost, full_cost, paper_cost = rollout_forwards(plan, g, suffix), rollout_forwards(plan, g), paper_forwards(plan, g)
    if args.json:
        print(json.dumps({
            "sigmas": [round(float(s), 6) for s in sigmas],
            "entropy": [round(e, 6) for e in entropy],
            "plan": [list(e) for e in plan.entries],
            "group_size": g,
            "suffix": {"solver": suffix.solver, "steps": suffix.steps},
            "forwards_per_prompt": cost,
            "forwards_per_prompt_full_suffix": full_cost,
            "forwards_per_prompt_paper": paper_cost,
        }))
        return 0
    starts = {i: l for i, l in plan.entries}
    print(f"steps {cfg.steps}  shift {cfg.shift}  eta {cfg.eta}  merge {m.mode}  tau {m.tau}  "
          f"active {m.active_start}-{m.active_fraction} of the schedule")
    print(f"{'step':>4} {'sigma':>8} {'E(i,1)':>8}  plan")
    covered = -1
    for i in range(cfg.steps):
        if i in starts:
            l = starts[i]
            covered = i + l - 1
            note = f"SDE {i}->{i + l}" + (f" (merged {l}, E = {step_entropy(sigmas, i, l, cfg.eta):.2f})" if l > 1 else "")
        else:
            note = "  (in merged step)" if i <= covered else "ODE"
        print(f"{i:>4} {float(sigmas[i]):>8.4f} {entropy[i]:>8.3f}  {note}")
    print(f"plan: {plan}")
    steps = "every remaining step" if suffix.steps is None else f"at most {suffix.steps} steps"
    print(f"branch suffix: {suffix.solver}, {steps}")
    print(f"rollout cost per prompt, G = {g}: {cost} image-step forwards", end="")
    if cost != full_cost:
        print(f" ({cost / full_cost:.1%} of the full Euler suffix's {full_cost}: saves {full_cost - cost})", end="")
    print(f"\npaper's count {paper_cost}: this is {cost / paper_cost:.1%} of it (the anchor stops at the last branch "
          "point and its velocity doubles as the merged step's)")
    return 0


def add_config_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="validate a config (with overrides) and print the resolved YAML")
    add_config_args(p)
    p.set_defaults(func=run_config)


def run_config(args: argparse.Namespace) -> int:
    from egrpo_ray.config import dump_config, load_config

    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0
