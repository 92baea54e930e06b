"""The learner: the Ray Train (TorchTrainer) worker loop.

Nothing outside can call into a Train worker, so the learner pulls its groups from the replay queue,
updates through DDP or FSDP (egrpo_ray/parallel.py), and pushes weights to the rollout workers itself.
Under FSDP every collective step (weight gathers, checkpoints, sharded forwards) runs on every rank;
rank 0 alone publishes, logs metrics, scores held-out grids and writes files. Decisions every rank
must share (stop, data ready) are all-reduced so no rank waits alone in a collective.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import ray
import torch
import torch.distributed as dist

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.checkpoint import load_training_state, save_checkpoint
from egrpo_ray.config import ExperimentConfig
from egrpo_ray.distributed.reward_service import remote_reward_fn, reward_handles
from egrpo_ray.distributed.weight_sync import WeightBroadcaster
from egrpo_ray.evaluate import heldout_images, heldout_reward
from egrpo_ray.images import to_uint8
from egrpo_ray.models import build_policy
from egrpo_ray.models.diffusers_common import torch_dtype
from egrpo_ray.parallel import full_trainable_state, gather_trainable, is_sharded, prepare_for_training
from egrpo_ray.prompts import prompt_splits, train_probe
from egrpo_ray.training import learn

MAXED = ("grad_norm", "logprob_mismatch")  # the worst rank; "groups" and "samples" add up; the rest average
ADDED = ("groups", "samples")


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
    summed = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
    maxed = summed.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    return {k: float(maxed[i] if k in MAXED else summed[i] if k in ADDED else summed[i] / world) for i, k in enumerate(names)}


@contextmanager
def timed(metrics: dict, key: str):
    t0 = time.perf_counter()
    yield
    metrics[key] = time.perf_counter() - t0


def step_seed(seed: int, rank: int, step: int) -> int:
    """The learner's minibatch randomness depends only on (seed, rank, step): a resume replays it exactly."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729 + 1) % (2**63 - 1)


class WeightPublisher:
    """Ships the learner's weights to the rollout workers after each update (every rank calls publish:
    under FSDP the full weights are gathered collectively; rank 0 sends)."""

    def __init__(self, cfg: ExperimentConfig, store, workers: list, rank: int, sharded: bool):
        self.store, self.rank, self.sharded = store, rank, sharded
        self.broadcaster = None
        if cfg.rollout.weight_sync == "collective":
            backend = None if cfg.rollout.sync_backend == "auto" else cfg.rollout.sync_backend
            self.broadcaster = WeightBroadcaster(cfg.rollout.sync_bucket_mb << 20, backend)
            if rank == 0:
                self.broadcaster.connect(workers)

    def publish(self, version: int, policy) -> None:
        if self.broadcaster is not None:
            self.broadcaster.publish(version, gather_trainable(policy))  # rank 0 sends, the rest gather
        elif self.rank == 0 or self.sharded:
            weights = full_trainable_state(policy)
            if self.rank == 0:
                ray.get(self.store.publish.remote(version, weights))


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
    compute_dtype = torch_dtype(cfg.model.dtype)
    fn = prepare_for_training(policy, cfg.learner.parallelism, compute_dtype, ray.train.torch.get_device())
    sharded = is_sharded(policy)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learner.lr,
                                  weight_decay=cfg.learner.weight_decay)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    step = version = 0
    if config.get("resume_from"):
        meta = load_training_state(config["resume_from"], policy, optimizer)
        step, version = int(meta["step"]), int(meta["policy_version"])
    publisher = WeightPublisher(cfg, store, config["workers"], rank, sharded)

    train_prompts, heldout = prompt_splits(cfg.prompts)
    probe = train_probe(train_prompts)
    reward_fn = remote_reward_fn(reward_handles(cfg)) if rank == 0 else None

    def report_heldout(tag: str) -> None:
        if rank != 0:
            if sharded:  # rank 0's sampling runs sharded forwards: join them
                heldout_images(policy, heldout, cfg, cfg.seed)
                heldout_images(policy, probe, cfg, cfg.seed)
            return
        value, images = heldout_reward(policy, heldout, reward_fn, cfg, cfg.seed)
        train_value, _ = heldout_reward(policy, probe, reward_fn, cfg, cfg.seed)
        log.add_images.remote(step, tag, to_uint8(images).numpy())
        log.record.remote({"event": "heldout", "tag": tag, "step": step, "policy_version": version,
                           "heldout_reward": value, "train_probe_reward": train_value})

    publisher.publish(version, policy)
    if rank == 0:
        ray.get(queue.set_learner_version.remote(version))
    report_heldout("before")
    share = cfg.learner.prompts_per_step // world
    pending: list = []
    t_last = time.perf_counter()
    while step < cfg.learner.iterations:
        timings: dict[str, float] = {}
        with timed(timings, "queue_wait_s"):  # this step's groups; every rank agrees to go on or to stop
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

        generator = torch.Generator().manual_seed(step_seed(cfg.seed, rank, step))
        rows = sum(len(it.rollout.step_index) for it in items)
        n_parts = int(_collective(float(-(-rows // cfg.learner.minibatch_rows)), "max"))
        parts = list(torch.tensor_split(torch.randperm(rows, generator=generator), n_parts))
        metrics = _reduce_metrics(learn(fn, policy, items, cfg, strategy, optimizer, generator, parts=parts), world)
        staleness = [version - it.policy_version for it in items]
        step, version = step + 1, version + 1
        with timed(timings, "weight_publish_s"):
            publisher.publish(version, policy)
        if rank == 0:
            ray.get(queue.set_learner_version.remote(version))
            qstats = ray.get(queue.stats.remote())
            now = time.perf_counter()
            metrics.update(
                step=step, policy_version=version, staleness_mean=sum(staleness) / len(staleness),
                staleness_max=max(staleness), queue_depth=qstats["depth"], step_seconds=now - t_last,
                images_per_s=metrics["samples"] / max(now - t_last, 1e-9),
                dropped_stale=qstats.get("dropped_stale", 0) + qstats.get("dropped_stale_on_put", 0), **timings,
            )
            t_last = now
            log.record.remote(metrics)
        if step % cfg.logging.grid_every == 0 and step < cfg.learner.iterations:
            report_heldout(f"step_{step:06d}")
        if step % cfg.learner.checkpoint_every == 0 or step == cfg.learner.iterations:
            _checkpoint(config["output_dir"], step, version, policy, optimizer, queue, cfg, rank, world)
        if world > 1:
            dist.barrier()
    if rank == 0:
        ray.get(queue.close.remote())  # stop the rollout workers: the cores go to the final evaluation
    report_heldout("after")


def _checkpoint(output_dir, step, version, policy, optimizer, queue, cfg, rank, world) -> None:
    """Every rank writes its shards; rank 0 adds the data cursor (how far each rollout worker got)."""
    produced = {}
    if rank == 0:
        produced = {str(k): v for k, v in ray.get(queue.stats.remote())["produced_by_worker"].items()}
    meta = {"policy_version": version, "prompt_batches_by_worker": produced, "strategy": cfg.algorithm.strategy,
            "world_size": world, "parallelism": cfg.learner.parallelism}
    save_checkpoint(output_dir, step, policy, optimizer, meta, cfg.model.lora.enabled, torch_dtype(cfg.model.dtype))
