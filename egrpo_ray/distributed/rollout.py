"""Rollout workers: each runs the branching sampler on its own copy of the policy, over its own
deterministic shard of the prompts, scores through the reward service and pushes whole groups.

New weights come from the weight store (object_store) or, with rollout.weight_sync "collective", from the
learner's broadcasts (distributed/weight_sync.py): ``receive_weights`` lands a sync in staging on its own
thread while ``run`` samples, and ``run`` applies it between batches, so version and weights always match.
"""
from __future__ import annotations

import threading
import time

import ray
import torch

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import ExperimentConfig
from egrpo_ray.distributed import weight_sync
from egrpo_ray.distributed.reward_service import remote_reward_fn, reward_handles
from egrpo_ray.models import build_policy
from egrpo_ray.models.base import policy_device
from egrpo_ray.prompts import PromptCursor, prompt_splits
from egrpo_ray.training import sample_and_score


def batch_seed(seed: int, worker: int, batch: int) -> int:
    """Each batch's randomness depends only on (seed, worker, batch number): resumable, reproducible."""
    return (seed * 1_000_003 + worker * 7_919 + batch * 104_729) % (2**63 - 1)


@ray.remote(concurrency_groups={"sync": 1})  # the collective sync's calls run beside run()
class RolloutWorker:
    def __init__(self, cfg: dict, index: int, queue, store, batches_done: int = 0, base_is_current: bool = False):
        torch.set_num_threads(1)
        self.cfg = ExperimentConfig.model_validate(cfg)
        self.index, self.queue, self.store = index, queue, store
        # Sampling needs no float32 master copy: the weights run (and arrive) in the model dtype.
        policy = build_policy(self.cfg.model.model_copy(update={"master_dtype": None}))
        self.synced_names = list(policy.trainable_state())  # what a sync ships; read before freezing
        self.policy = policy.eval().requires_grad_(False)
        self.strategy = build_strategy(self.cfg.sampling, self.cfg.algorithm)
        train, _ = prompt_splits(self.cfg.prompts)
        shard = train[index :: self.cfg.rollout.workers] or train
        self.cursor = PromptCursor(shard, self.cfg.seed + index)
        self.cursor.take(batches_done * self.cfg.rollout.prompts_per_batch)  # resume the prompt stream
        self.batches = batches_done
        # A fresh run's version 0 is the base model every worker loaded itself: sampling can start
        # while the learner is still starting. A resumed run waits for the checkpoint's weights.
        self.version = 0 if base_is_current else -1
        self.versions_loaded: list[int] = []
        self.sync_seconds: list[float] = []
        self.images = 0
        self.busy_seconds = 0.0
        self.receiver: weight_sync.BucketReceiver | None = None  # collective sync, once joined
        self.pending_version: int | None = None  # a whole sync waits in staging
        self.staging_lock = threading.Lock()

    def ready(self) -> bool:
        return True

    def sync_weights(self, at_least: int = 0) -> int:
        """Between batches: load newer weights if there are any; wait while ours are older than at_least
        (until the queue closes). Returns the version in use."""
        load = self._apply_received if self.cfg.rollout.weight_sync == "collective" else self._load_from_store
        while True:
            t0 = time.perf_counter()
            if load():
                self.versions_loaded.append(self.version)
                self.sync_seconds.append(time.perf_counter() - t0)
                return self.version
            if self.version >= at_least or ray.get(self.queue.is_closed.remote()):
                return self.version
            time.sleep(0.02)

    def _load_from_store(self) -> bool:
        if ray.get(self.store.latest_version.remote()) <= self.version:
            return False
        version, [ref] = ray.get(self.store.latest.remote())
        self.policy.load_trainable_state(ray.get(ref))
        self.version = version
        return True

    def _apply_received(self) -> bool:
        with self.staging_lock:
            if self.pending_version is None:
                return False
            self.receiver.apply(dict(self.policy.named_parameters()))
            self.version, self.pending_version = self.pending_version, None
            return True

    @ray.method(concurrency_group="sync")
    def join_weight_sync(self, host: str, port: int, rank: int, world: int, backend: str, bucket_bytes: int,
                         timeout_s: float) -> list[weight_sync.TensorSpec]:
        """Join the learner's weight-sync group; returns the parameter list the learner must stream."""
        params = dict(self.policy.named_parameters())
        specs = weight_sync.specs_of((name, params[name]) for name in self.synced_names)
        store = weight_sync.open_store(host, port, rank, world, timeout_s)
        group = weight_sync.SyncGroup(store, rank, world, backend, policy_device(self.policy), timeout_s)
        receiver = weight_sync.BucketReceiver(group, weight_sync.bucket_layout(specs, bucket_bytes))
        with self.staging_lock:
            self.receiver, self.pending_version = receiver, None
        return specs

    @ray.method(concurrency_group="sync")
    def receive_weights(self, version: int) -> None:
        """One sync into staging, while run() samples with the weights it has."""
        if self.receiver is None:
            raise RuntimeError("receive_weights before join_weight_sync")
        with self.staging_lock:
            self.pending_version = None  # staging is about to change: what it held is no longer whole
        self.receiver.receive()
        with self.staging_lock:
            self.pending_version = version

    def weights(self) -> tuple[int, dict[str, torch.Tensor]]:
        """The version in use and the weights a sync ships, as the sampler sees them (for checks)."""
        params = dict(self.policy.named_parameters())
        return self.version, {name: params[name].detach().cpu() for name in self.synced_names}

    def run(self) -> dict:
        """Produce scored groups until the queue closes."""
        reward_fn = remote_reward_fn(reward_handles(self.cfg))
        need = 0
        while not ray.get(self.queue.is_closed.remote()):
            self.sync_weights(need)
            if self.version < 0:
                break
            t0 = time.perf_counter()
            generator = torch.Generator().manual_seed(batch_seed(self.cfg.seed, self.index, self.batches))
            prompts = self.cursor.take(self.cfg.rollout.prompts_per_batch)
            item = sample_and_score(self.policy, self.strategy, prompts, reward_fn, generator,
                                    iteration=self.version, policy_version=self.version, worker=self.index)
            self.batches += 1
            self.images += len(item.rollout.final_latents)
            self.busy_seconds += time.perf_counter() - t0
            status = ray.get(self.queue.put.remote(item))
            while status == "full":  # back-pressure: wait for the learner to take some
                time.sleep(0.02)
                status = ray.get(self.queue.put.remote(item))
            # "stale": the learner has moved on; the next batch must use newer weights
            need = self.version + 1 if status == "stale" else 0
        return self.stats()

    def stats(self) -> dict:
        return {"worker": self.index, "batches": self.batches, "images": self.images, "busy_seconds": self.busy_seconds,
                "versions_loaded": self.versions_loaded, "sync_seconds": self.sync_seconds}
