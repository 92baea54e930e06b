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

from egrpo_ray.algo.gradient_noise import describe as describe_signal, signal_share
from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import ExperimentConfig, load_config
from egrpo_ray.models import build_policy
from egrpo_ray.outputs import MetricsWriter, change_lines, save_grid
from egrpo_ray.rewards import build_reward
from egrpo_ray.algo.update import step_seed
from egrpo_ray.evaluate import heldout_scores
from egrpo_ray.prompts import PromptCursor, prompt_splits, train_probe
from egrpo_ray.training import (
    learn,
    make_gradient_noise,
    make_optimizer,
    make_reward_fn,
    reference_model,
    sample_and_score,
)


def reference_update(policy, items, cfg: ExperimentConfig, strategy, optimizer, step: int, ref_fn=None,
                     noise=None) -> dict[str, float]:
    """Update ``step`` (0-based) of the reference loop: what a 1-rank Ray learner does at the same step
    (same minibatch seed, same partition, same policy version)."""
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, 0, step))
    return learn(policy, policy, items, cfg, strategy, optimizer, generator, ref_fn, policy_version=step, noise=noise)


def run_reference(cfg: ExperimentConfig, iterations: int | None = None, output_dir: str | None = None,
                  progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    iterations = iterations or cfg.learner.iterations
    policy = build_policy(cfg.model).eval()  # as the rollout workers and the learner run it
    ref_fn = reference_model(policy, cfg)  # the KL reference: the starting weights
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
    train_prompts, heldout = prompt_splits(cfg.prompts)
    cursor = PromptCursor(train_prompts, cfg.seed)
    optimizer = make_optimizer(policy, cfg.learner)
    noise = make_gradient_noise(cfg.learner)
    rollout_gen = torch.Generator().manual_seed(cfg.seed)
    writer = MetricsWriter(output_dir) if output_dir else None
    heldout_writer = MetricsWriter(output_dir, "heldout.jsonl") if output_dir else None
    weights = {r.name: r.weight for r in cfg.rewards}

    def score_heldout(step: int, tag: str) -> tuple[dict, torch.Tensor]:
        """The Ray learner's held-out record: reward, training-prompt probe, image quality (not rewarded)."""
        scored = heldout_scores(policy, heldout, reward_fn, cfg, cfg.seed)
        record = {"event": "heldout", "tag": tag, "step": step, "heldout_reward": scored.weighted(weights),
                  "train_probe_reward": heldout_scores(policy, probe, reward_fn, cfg, cfg.seed).weighted(weights),
                  **{f"quality_{k}": v for k, v in scored.quality.items()}}
        if heldout_writer:
            heldout_writer.write(record)
        return record, scored.images

    probe = train_probe(train_prompts)
    before, _ = score_heldout(0, "before")
    history, t_start = [], time.perf_counter()
    for step in tqdm(range(1, iterations + 1), desc="reference E-GRPO", disable=not progress):
        items = [
            sample_and_score(policy, strategy, cursor.take(cfg.rollout.prompts_per_batch), reward_fn, rollout_gen,
                             step - 1, policy_version=step - 1, max_batch=cfg.rollout.max_batch_rows)
            for _ in range(max(1, cfg.learner.prompts_per_step // cfg.rollout.prompts_per_batch))
        ]
        metrics = reference_update(policy, items, cfg, strategy, optimizer, step - 1, ref_fn, noise)
        metrics.update(step=step, policy_version=step, forwards=sum(it.rollout.forwards for it in items),
                       seconds=time.perf_counter() - t_start)
        history.append(metrics)
        if writer:
            writer.write(metrics)
    after, images = score_heldout(iterations, "after")
    summary = {
        "iterations": iterations,
        "strategy": cfg.algorithm.strategy,
        "heldout_reward_before": before["heldout_reward"],
        "heldout_reward_after": after["heldout_reward"],
        "train_probe_reward_before": before["train_probe_reward"],
        "train_probe_reward_after": after["train_probe_reward"],
        "heldout_quality_before": {k: v for k, v in before.items() if k.startswith("quality_")},
        "heldout_quality_after": {k: v for k, v in after.items() if k.startswith("quality_")},
        "background_noise_before": before["quality_background_noise"],
        "background_noise_after": after["quality_background_noise"],
        "train_reward_first": history[0]["reward_mean"],
        "train_reward_last": history[-1]["reward_mean"],
        "wall_seconds": time.perf_counter() - t_start,
        "rollout_forwards": sum(m["forwards"] for m in history),
        "gradient_signal": signal_share(history, cfg.learner.prompts_per_step),
    }
    if output_dir:
        save_grid(images, Path(output_dir) / "heldout_final.png", scale=4)
        (Path(output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"summary": summary, "history": history, "policy": policy}


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or cfg.logging.output_dir + "-reference")
    summary = run_reference(cfg, args.iterations, str(output_dir))["summary"]
    print(f"\ndone in {summary['wall_seconds']:.0f} s: {summary['iterations']} iterations of "
          f"{summary['strategy']} (single process, no Ray)")
    print(*change_lines(summary), sep="\n")
    if summary["gradient_signal"]:
        print(describe_signal(summary["gradient_signal"]))
    print(f"metrics: {output_dir / 'metrics.jsonl'}\nheld-out images: {output_dir / 'heldout_final.png'}\n"
          f"summary: {output_dir / 'summary.json'}")
    return 0
