"""Rollout workers: each runs the branching sampler on its own copy of the policy, over its own
deterministic shard of the prompts, scores through the reward service and pushes whole groups."""
from __future__ import annotations

import time

import ray
import torch

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import ExperimentConfig
from egrpo_ray.distributed.reward_service import remote_reward_fn, reward_handles
from egrpo_ray.models import build_policy
from egrpo_ray.prompts import PromptCursor, prompt_splits
from egrpo_ray.training import sample_and_score


def batch_seed(seed: int, worker: int, batch: int) -> int:
    """Each batch's randomness depends only on (seed, worker, batch number): resumable, reproducible."""
    return (seed * 1_000_003 + worker * 7_919 + batch * 104_729) % (2**63 - 1)


@ray.remote
class RolloutWorker:
    def __init__(self, cfg: dict, index: int, queue, store, batches_done: int = 0, base_is_current: bool = False):
        torch.set_num_threads(1)
        self.cfg = ExperimentConfig.model_validate(cfg)
        self.index, self.queue, self.store = index, queue, store
        self.policy = build_policy(self.cfg.model).eval().requires_grad_(False)
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

    def ready(self) -> bool:
        return True

    def _sync_weights(self, at_least: int = 0) -> None:
        """Load the store's newest weights if newer than ours; wait while ours are older than at_least."""
        while True:
            latest = ray.get(self.store.latest_version.remote())
            if latest > self.version:
                t0 = time.perf_counter()
                version, [ref] = ray.get(self.store.latest.remote())
                self.policy.load_trainable_state(ray.get(ref))
                self.version = version
                self.versions_loaded.append(version)
                self.sync_seconds.append(time.perf_counter() - t0)
                return
            if self.version >= at_least or ray.get(self.queue.is_closed.remote()):
                return
            time.sleep(0.02)

    def run(self) -> dict:
        """Produce scored groups until the queue closes."""
        reward_fn = remote_reward_fn(reward_handles(self.cfg))
        need = 0
        while not ray.get(self.queue.is_closed.remote()):
            self._sync_weights(need)
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
