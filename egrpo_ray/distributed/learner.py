"""The learner: the Ray Train (TorchTrainer) worker loop.

Nothing outside can call into a Train worker, so the learner pulls its groups from the replay queue,
updates through DDP or FSDP (egrpo_ray/parallel.py), and pushes weights to the rollout workers itself.
Under FSDP every collective step (weight gathers, checkpoints, sharded forwards) runs on every rank;
rank 0 alone publishes, logs metrics, scores held-out grids and writes files. Decisions every rank
must share (stop, data ready) are all-reduced so no rank waits alone in a collective.

A step has named phases (``Learner.run``): take this step's groups (a blocking get on the replay queue),
update, publish the weights, record the metrics, checkpoint. Stops: the driver sets the run log's stop
flag and closes the queue, which wakes the get; every rank then writes a checkpoint of the current step.
Restarts: Ray Train restarts a failed worker group (learner.max_failures); the new group loads the latest
checkpoint and continues under a new policy version, so no group sampled by the abandoned weights is learned.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

import ray
import torch
import torch.distributed as dist

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.algo.update import UpdateSettings, partition_count, step_seed
from egrpo_ray.checkpoint import (
    latest_checkpoint,
    load_training_state,
    prune_checkpoints,
    save_checkpoint,
)
from egrpo_ray.config import ExperimentConfig
from egrpo_ray.distributed.reward_service import remote_reward_fn, reward_handles
from egrpo_ray.distributed.rollout import retrying
from egrpo_ray.distributed.weight_sync import WeightBroadcaster
from egrpo_ray.evaluate import heldout_images, heldout_scores
from egrpo_ray.images import to_uint8
from egrpo_ray.models import build_policy
from egrpo_ray.models.diffusers_common import torch_dtype
from egrpo_ray.parallel import (
    full_trainable_state,
    gather_trainable,
    is_sharded,
    prepare_for_training,
    prepare_reference,
)
from egrpo_ray.prompts import prompt_splits, train_probe
from egrpo_ray.training import learn, make_gradient_noise, make_optimizer, reference_model

MAXED = ("grad_norm", "logprob_mismatch")  # the worst rank; counts add up; the rest average
ADDED = ("groups", "samples", "learner_rows", "recompute_rows")
QUEUE_WAIT_S = 30.0  # a get waits this long for groups; a stop wakes it at once


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


def learner_update(fn, policy, items: list, cfg: ExperimentConfig, strategy, optimizer, rank: int, step: int,
                   version: int, ref_fn=None, noise=None) -> dict[str, float]:
    """One rank's update at ``step`` (no Ray): minibatches from ``partition_rows`` seeded by (seed, rank,
    step), as many on every rank (the max: DDP and FSDP step together); groups sampled by ``version``
    (the weights now) are on-policy. With one rank this is the reference loop's ``reference_update``."""
    settings = UpdateSettings.from_config(cfg.algorithm, cfg.learner)
    step_index = torch.cat([it.rollout.step_index for it in items])
    num_parts = int(_collective(float(partition_count(step_index, settings.minibatch, settings.rows_per_minibatch)), "max"))
    generator = torch.Generator().manual_seed(step_seed(cfg.seed, rank, step))
    return learn(fn, policy, items, cfg, strategy, optimizer, generator, ref_fn, num_parts=num_parts,
                 policy_version=version, noise=noise)


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
    """The Train worker's entry point (every rank)."""
    Learner(config).run()


class Learner:
    """One rank of the learner: the policy, its optimizer, and the phases of a step."""

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        cfg = self.cfg = ExperimentConfig.model_validate(config["cfg"])
        self.queue, self.store, self.log = config["queue"], config["store"], config["log"]
        self.output_dir = config["output_dir"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.set_num_threads(1)
        torch.manual_seed(cfg.seed)

        # Eval mode, as the rollout workers sample: the learner's log-probs must be the sampler's forward.
        self.policy = build_policy(cfg.model).eval()
        self.reference = reference_model(self.policy, cfg)  # the KL reference: the base weights, never the checkpoint's
        device, dtype = ray.train.torch.get_device(), torch_dtype(cfg.model.dtype)
        if isinstance(self.reference, torch.nn.Module):  # a frozen copy (full fine-tune): placed like the policy
            prepare_reference(self.reference, cfg.learner.parallelism, dtype, device)
        self.fn = prepare_for_training(self.policy, cfg.learner.parallelism, dtype, device)
        self.sharded = is_sharded(self.policy)
        self.optimizer = make_optimizer(self.policy, cfg.learner)
        self.noise = make_gradient_noise(cfg.learner)
        self.strategy = build_strategy(cfg.sampling, cfg.algorithm)
        self.step = self.version = 0
        self.attempt = self._restore(config.get("resume_from"))
        self.checkpointed_step = self.step
        self.last_reward: float | None = None
        self.abandoned = not self._wait_for_start()
        self.publisher = None if self.abandoned else WeightPublisher(cfg, self.store, config["workers"], self.rank,
                                                                     self.sharded)

        train_prompts, self.heldout = prompt_splits(cfg.prompts)
        self.probe = train_probe(train_prompts)
        self.reward_fn = None
        if self.rank == 0 and not self.abandoned:
            report = lambda msg: self.log.failure.remote("reward_retries", msg)
            self.reward_fn = retrying(remote_reward_fn(reward_handles(cfg), cfg.cluster.reward_timeout_s),
                                      cfg.rollout.reward_retries, report, "learner")
        self.share = cfg.learner.prompts_per_step // self.world
        self.pending: list = []
        self.t_last = time.perf_counter()

    # ---------------------------------------------------------------------------------------- the loop

    def run(self) -> None:
        if self.abandoned:
            return
        self.publish()
        if self.step == 0 and self.attempt == 0:
            self.report_heldout("before")
        while self.step < self.cfg.learner.iterations:
            timings: dict[str, float] = {}
            with timed(timings, "queue_wait_s"):
                items = self.take_groups()
            if items is None:  # stopped: keep what was learned since the last checkpoint
                self.checkpoint()
                return
            metrics = self.update(items)
            with timed(timings, "weight_publish_s"):
                self.publish()
            self.record(metrics, items, timings)
            if self.step % self.cfg.logging.grid_every == 0 and self.step < self.cfg.learner.iterations:
                self.report_heldout(f"step_{self.step:06d}")
            if self.step % self.cfg.learner.checkpoint_every == 0 or self.step == self.cfg.learner.iterations:
                self.checkpoint()
            if self.world > 1:
                dist.barrier()
        if self.rank == 0:
            ray.get(self.queue.close.remote())  # stop the rollout workers: the cores go to the final evaluation
        self.report_heldout("after")

    # ---------------------------------------------------------------------------------------- phases

    def _wait_for_start(self) -> bool:
        """The driver deploys the rewards and starts the rollout workers while Train starts this group: rank 0
        waits until it reports both up (True), or stops the run first because one failed (False: no step, no
        traceback). Every rank gets rank 0's answer."""
        started = True
        if self.rank == 0:
            started, stop = ray.get(self.log.start_state.remote())
            while not (started or stop):
                time.sleep(0.2)
                started, stop = ray.get(self.log.start_state.remote())
        return _collective(float(started), "min") > 0

    def _restore(self, resume_from: str | None) -> int:
        """Load the checkpoint to start from; returns the attempt (0, or the number of Train restarts).
        A restart continues from the latest checkpoint under a policy version above every one used so far."""
        attempt = ray.get(self.log.learner_started.remote()) if self.rank == 0 else 0
        attempt = int(_collective(float(attempt), "max"))
        checkpoint = resume_from
        if attempt > 0:
            checkpoint = latest_checkpoint(self.output_dir) or resume_from
        if checkpoint:
            meta = load_training_state(checkpoint, self.policy, self.optimizer)
            self.step, self.version = int(meta["step"]), int(meta["policy_version"])
        if attempt > 0:  # the store may hold a version the queue never heard of (the group died between the two)
            used = max(ray.get(self.queue.stats.remote())["learner_version"],
                       ray.get(self.store.latest_version.remote())) if self.rank == 0 else 0
            self.version = int(_collective(float(max(self.version, used) + 1), "max"))
            if self.rank == 0:
                ray.get(self.queue.restart_from.remote(self.version))
                where = f"checkpoint step {self.step}" if checkpoint else "the base model (no checkpoint yet)"
                self.log.failure.remote("learner_restarts", f"learner worker group failed; Ray Train restarted it "
                                        f"({attempt}/{self.cfg.learner.max_failures}) from {where}")
        return attempt

    def take_groups(self) -> list | None:
        """This step's groups for this rank, or None when the run stops; every rank agrees on both."""
        while True:
            have = sum(it.num_prompts for it in self.pending)
            if have < self.share:  # blocks until enough groups arrive, the queue closes, or QUEUE_WAIT_S passes
                self.pending += ray.get(self.queue.get.remote(self.share - have, QUEUE_WAIT_S))
                have = sum(it.num_prompts for it in self.pending)
            stop = ray.get(self.log.should_stop.remote()) or (have < self.share and ray.get(self.queue.is_closed.remote()))
            if _collective(float(stop), "max") > 0:
                return None
            if _collective(float(have >= self.share), "min") > 0:
                break
        items, taken = [], 0
        while taken < self.share:
            items.append(self.pending.pop(0))
            taken += items[-1].num_prompts
        return items

    def update(self, items: list) -> dict[str, float]:
        """One group-normalised GRPO update (``learner_update``)."""
        metrics = learner_update(self.fn, self.policy, items, self.cfg, self.strategy, self.optimizer, self.rank,
                                 self.step, self.version, self.reference, self.noise)
        metrics = _reduce_metrics(metrics, self.world)
        metrics["staleness"] = [self.version - it.policy_version for it in items]  # this rank's; rank 0 logs it
        self.step, self.version = self.step + 1, self.version + 1
        self.last_reward = metrics.get("reward_mean")
        return metrics

    def publish(self) -> None:
        self.publisher.publish(self.version, self.policy)
        if self.rank == 0:
            ray.get(self.queue.set_learner_version.remote(self.version, self.cfg.learner.iterations - self.step))

    def record(self, metrics: dict, items: list, timings: dict[str, float]) -> None:
        if self.rank != 0:
            return
        staleness = metrics.pop("staleness")
        qstats = ray.get(self.queue.stats.remote())
        now = time.perf_counter()
        metrics.update(
            step=self.step, policy_version=self.version, staleness_mean=sum(staleness) / len(staleness),
            staleness_max=max(staleness), queue_depth=qstats["depth"], step_seconds=now - self.t_last,
            images_per_s=metrics["samples"] / max(now - self.t_last, 1e-9),
            dropped_stale=qstats["dropped_as_stale"], **timings,
        )
        self.t_last = now
        self.log.record.remote(metrics)

    def report_heldout(self, tag: str) -> None:
        cfg, policy = self.cfg, self.policy
        if self.rank != 0:
            if self.sharded:  # rank 0's sampling runs sharded forwards: join them
                heldout_images(policy, self.heldout, cfg, cfg.seed)
                heldout_images(policy, self.probe, cfg, cfg.seed)
            return
        weights = {r.name: r.weight for r in cfg.rewards}
        scored = heldout_scores(policy, self.heldout, self.reward_fn, cfg, cfg.seed)  # what `egrpo-ray eval` reports
        train_value = heldout_scores(policy, self.probe, self.reward_fn, cfg, cfg.seed).weighted(weights)
        self.log.add_images.remote(self.step, tag, to_uint8(scored.images).numpy())
        self.log.record.remote({"event": "heldout", "tag": tag, "step": self.step, "policy_version": self.version,
                                "heldout_reward": scored.weighted(weights), "train_probe_reward": train_value,
                                **{f"quality_{k}": v for k, v in scored.quality.items()}})

    def checkpoint(self) -> None:
        """A collective (every rank writes its shards); rank 0 adds the data cursor and the config, then keeps
        the last learner.keep_checkpoints checkpoints and the best. Nothing new since the last: nothing to do."""
        if self.step == self.checkpointed_step:
            return
        cfg, produced = self.cfg, {}
        if self.rank == 0:
            produced = {str(k): v for k, v in ray.get(self.queue.stats.remote())["produced_by_worker"].items()}
        meta = {"policy_version": self.version, "prompt_batches_by_worker": produced, "strategy": cfg.algorithm.strategy,
                "world_size": self.world, "parallelism": cfg.learner.parallelism, "reward_mean": self.last_reward,
                "config": cfg.model_dump(mode="json")}
        save_checkpoint(self.output_dir, self.step, self.policy, self.optimizer, meta, cfg.model.lora.enabled,
                        torch_dtype(cfg.model.dtype))
        self.checkpointed_step = self.step
        if self.rank == 0:
            prune_checkpoints(self.output_dir, cfg.learner.keep_checkpoints)
