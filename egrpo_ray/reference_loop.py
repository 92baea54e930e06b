"""The single-process reference loop: any strategy, no Ray. Tests use it, and the Ray service's
overhead is measured against it (benchmarks/service_vs_reference.py).

Reads top to bottom: build, then per iteration sample -> score -> learn -> log.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import ExperimentConfig, add_config_args, load_config
from egrpo_ray.models import build_policy
from egrpo_ray.outputs import MetricsWriter, save_grid
from egrpo_ray.rewards import build_reward
from egrpo_ray.evaluate import heldout_reward
from egrpo_ray.prompts import PromptCursor, prompt_splits, train_probe
from egrpo_ray.training import learn, make_reward_fn, sample_and_score


def run_reference(cfg: ExperimentConfig, iterations: int | None = None, output_dir: str | None = None,
                  progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    iterations = iterations or cfg.learner.iterations
    policy = build_policy(cfg.model)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
    train_prompts, heldout = prompt_splits(cfg.prompts)
    cursor = PromptCursor(train_prompts, cfg.seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
    rollout_gen = torch.Generator().manual_seed(cfg.seed)
    learner_gen = torch.Generator().manual_seed(cfg.seed + 1)
    writer = MetricsWriter(output_dir) if output_dir else None

    probe = train_probe(train_prompts)
    before, _ = heldout_reward(policy, heldout, reward_fn, cfg, cfg.seed)
    train_before, _ = heldout_reward(policy, probe, reward_fn, cfg, cfg.seed)
    history, t_start = [], time.perf_counter()
    for step in tqdm(range(1, iterations + 1), desc="reference E-GRPO", disable=not progress):
        items = [
            sample_and_score(policy, strategy, cursor.take(cfg.rollout.prompts_per_batch), reward_fn, rollout_gen,
                             step - 1, policy_version=step - 1)
            for _ in range(max(1, cfg.learner.prompts_per_step // cfg.rollout.prompts_per_batch))
        ]
        metrics = learn(policy, policy, items, cfg, strategy, optimizer, learner_gen)
        metrics.update(step=step, policy_version=step, forwards=sum(it.rollout.forwards for it in items),
                       seconds=time.perf_counter() - t_start)
        history.append(metrics)
        if writer:
            writer.write(metrics)
    after, images = heldout_reward(policy, heldout, reward_fn, cfg, cfg.seed)
    train_after, _ = heldout_reward(policy, probe, reward_fn, cfg, cfg.seed)
    summary = {
        "iterations": iterations,
        "strategy": cfg.algorithm.strategy,
        "heldout_reward_before": before,
        "heldout_reward_after": after,
        "train_probe_reward_before": train_before,
        "train_probe_reward_after": train_after,
        "train_reward_first": history[0]["reward_mean"],
        "train_reward_last": history[-1]["reward_mean"],
        "wall_seconds": time.perf_counter() - t_start,
        "rollout_forwards": sum(m["forwards"] for m in history),
    }
    if output_dir:
        save_grid(images, Path(output_dir) / "heldout_final.png", scale=4)
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary, "history": history, "policy": policy}


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reference", help="run the single-process reference loop (no Ray)")
    add_config_args(p)
    p.add_argument("--iterations", type=int, help="learner steps (default: learner.iterations)")
    p.add_argument("--output-dir", help="where metrics.jsonl and summary.json go")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = run_reference(cfg, args.iterations, args.output_dir or cfg.logging.output_dir + "-reference")
    print(json.dumps(out["summary"], indent=2))
    return 0
