"""The learner: the Ray Train (TorchTrainer) worker loop.

Nothing outside can call into a Train worker, so the learner pulls its groups from the replay queue,
updates through DDP, and pushes weights to the store itself. Rank 0 publishes weights, logs metrics
to the run log, renders held-out grids and writes checkpoints. Decisions that every rank must share
(stop, data ready) are all-reduced so no rank waits alone in a collective.
"""
from __future__ import annotations

import time
from typing import Any

import ray
import torch
import torch.distributed as dist

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import ExperimentConfig
from egrpo_ray.distributed.reward_service import remote_reward_fn, reward_handles
from egrpo_ray.images import to_uint8
from egrpo_ray.models import build_policy
from egrpo_ray.outputs import load_checkpoint, save_checkpoint
from egrpo_ray.evaluate import heldout_reward
from egrpo_ray.prompts import prompt_splits, train_probe
from egrpo_ray.training import learn

MAXED = ("grad_norm", "logprob_mismatch")  # worst rank; "groups" and "samples" add up; the rest average


def _collective(value: float, op: str) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN, "sum": dist.ReduceOp.SUM}[op])
    return float(t)


def _reduce_metrics(metrics: dict[str, float], world: int) -> dict[str, float]:
    """Every rank's step metrics -> one record: two collectives, whatever the number of metrics."""
    if world == 1:
        return metrics
    names = list(metrics)  # the same order on every rank
    values = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
    summed, maxed = values.clone(), values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    added = ("groups", "samples")
    return {k: float(maxed[i] if k in MAXED else summed[i] if k in added else summed[i] / world) for i, k in enumerate(names)}


def learner_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.model_validate(config["cfg"])
    queue, store, log = config["queue"], config["store"], config["log"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)

    policy = build_policy(cfg.model)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed + 1 + rank)
    step = version = 0
    if config.get("resume_from"):
        weights, state, meta = load_checkpoint(config["resume_from"])
        policy.load_trainable_state(weights)
        optimizer.load_state_dict(state["optimizer"])
        step, version = int(meta["step"]), int(meta["policy_version"])
        gens = state["extra"].get("learner_generators", [])
        if rank < len(gens):
            generator.set_state(gens[rank])
    fn = ray.train.torch.prepare_model(policy) if world > 1 else policy

    train_prompts, heldout = prompt_splits(cfg.prompts)
    probe = train_probe(train_prompts)
    reward_fn = remote_reward_fn(reward_handles(cfg)) if rank == 0 else None

    def report_heldout(tag: str) -> None:
        value, images = heldout_reward(policy, heldout, reward_fn, cfg, cfg.seed)
        train_value, _ = heldout_reward(policy, probe, reward_fn, cfg, cfg.seed)
        log.add_images.remote(step, tag, to_uint8(images).numpy())
        log.record.remote({"event": "heldout", "tag": tag, "step": step, "policy_version": version,
                           "heldout_reward": value, "train_probe_reward": train_value})

    if rank == 0:
        store.publish.remote(version, policy.trainable_state())
        ray.get(queue.set_learner_version.remote(version))
        report_heldout("before")
    share = cfg.learner.prompts_per_step // world
    pending: list = []
    t_last = time.perf_counter()
    while step < cfg.learner.iterations:
        # Wait for this step's groups; every rank agrees to go on or to stop.
        t_wait = time.perf_counter()
        while True:
            have = sum(it.num_prompts for it in pending)
            if have < share:
                pending += ray.get(queue.get.remote(share - have, 2.0))
                have = sum(it.num_prompts for it in pending)
            stop = ray.get(log.should_stop.remote()) or ray.get(queue.is_closed.remote())
            if _collective(float(stop), "max") > 0:
                return
            if _collective(float(have >= share), "min") > 0:
                break
        items, taken = [], 0
        while taken < share:
            items.append(pending.pop(0))
            taken += items[-1].num_prompts
        queue_wait = time.perf_counter() - t_wait

        rows = sum(len(it.rollout.step_index) for it in items)
        n_parts = int(_collective(float(-(-rows // cfg.learner.minibatch_rows)), "max"))
        parts = list(torch.tensor_split(torch.randperm(rows, generator=generator), n_parts))
        metrics = learn(fn, policy, items, cfg, strategy, optimizer, generator, parts=parts)
        metrics = _reduce_metrics(metrics, world)
        staleness = [version - it.policy_version for it in items]
        step, version = step + 1, version + 1
        if rank == 0:
            t_pub = time.perf_counter()
            ray.get(store.publish.remote(version, policy.trainable_state()))
            ray.get(queue.set_learner_version.remote(version))
            now = time.perf_counter()
            qstats = ray.get(queue.stats.remote())
            metrics.update(
                step=step, policy_version=version, staleness_mean=sum(staleness) / len(staleness),
                staleness_max=max(staleness), queue_depth=qstats["depth"], queue_wait_s=queue_wait,
                weight_publish_s=now - t_pub, step_seconds=now - t_last,
                images_per_s=metrics["samples"] / max(now - t_last, 1e-9),
                dropped_stale=qstats.get("dropped_stale", 0) + qstats.get("dropped_stale_on_put", 0),
            )
            t_last = now
            log.record.remote(metrics)
            if step % cfg.logging.grid_every == 0 and step < cfg.learner.iterations:
                report_heldout(f"step_{step:06d}")
            if step % cfg.learner.checkpoint_every == 0 or step == cfg.learner.iterations:
                _checkpoint(config["output_dir"], step, version, policy, optimizer, generator, queue, cfg)
        if world > 1:
            dist.barrier()
    if rank == 0:
        ray.get(queue.close.remote())  # stop the rollout workers: the cores go to the final evaluation
        report_heldout("after")


def _checkpoint(output_dir, step, version, policy, optimizer, generator, queue, cfg) -> None:
    qstats = ray.get(queue.stats.remote())
    produced = {str(k): v for k, v in qstats["produced_by_worker"].items()}
    save_checkpoint(output_dir, step, policy.trainable_state(), optimizer,
                    meta={"policy_version": version, "prompt_batches_by_worker": produced, "strategy": cfg.algorithm.strategy},
                    extra={"learner_generators": [generator.get_state()]})
