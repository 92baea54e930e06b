"""Rollout workers: each runs the branching sampler on its own copy of the policy, over its own
deterministic shard of the prompts, scores through the reward service and pushes whole groups.

Faults: a worker runs as a restartable actor (rollout.max_restarts). Ray re-runs ``__init__`` with the original
arguments, so a restarted worker reads its prompt cursor from the replay queue (the batches it delivered) and
waits for the learner's current weights; ``RolloutFleet`` (used by the driver) notices the death, reports it in
one line and gives the new actor its loop back. A failed reward call (a reward replica died; Serve replaces it)
is retried rollout.reward_retries times, so the sampled group is kept.

New weights come from the weight store (object_store) or, with rollout.weight_sync "collective", from the
learner's broadcasts (distributed/weight_sync.py): ``receive_weights`` lands a sync in staging on its own
thread while ``run`` samples, and ``run`` applies it between batches, so version and weights always match.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable

import ray
import torch

from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import ExperimentConfig
from egrpo_ray.distributed import weight_sync
from egrpo_ray.distributed.actors import run_actors
from egrpo_ray.distributed.reward_service import remote_reward_fn, reward_handles
from egrpo_ray.models import build_policy
from egrpo_ray.models.base import policy_device
from egrpo_ray.monitoring import RoleMetrics
from egrpo_ray.prompts import PromptCursor, prompt_splits
from egrpo_ray.training import sample_and_score

QUEUE_WAIT_S = 30.0  # a put waits this long for room (back-pressure), an admission for its turn, then tries again


def retrying(reward_fn, retries: int, report: Callable[[str], None], who: str):
    """``reward_fn`` with each failed call (a Ray error: the replica died, the call timed out) retried up to
    ``retries`` times, one reported line per retry; Serve routes the retry to a live replica."""

    from ray.serve.exceptions import RayServeException  # no replica yet, back-pressure, replica unavailable

    def score(images, prompts):
        for attempt in range(retries + 1):
            try:
                return reward_fn(images, prompts)
            except (ray.exceptions.RayError, RayServeException, TimeoutError) as err:
                if attempt == retries:
                    raise
                report(f"{who}: reward call failed ({type(err).__name__}); retry {attempt + 1}/{retries}")
                time.sleep(min(2.0**attempt, 8.0))

    return score


def batch_seed(seed: int, worker: int, batch: int) -> int:
    """Each batch's randomness depends only on (seed, worker, batch number): resumable, reproducible."""
    return (seed * 1_000_003 + worker * 7_919 + batch * 104_729) % (2**63 - 1)


@ray.remote(concurrency_groups={"sync": 1, "control": 1})  # the collective sync's calls (and pid) run beside run()
class RolloutWorker:
    def __init__(self, cfg: dict, index: int, batches_done: int = 0, base_is_current: bool = False):
        torch.set_num_threads(1)
        self.cfg = ExperimentConfig.model_validate(cfg)
        self.index = index
        self.queue, self.store, self.log = run_actors(self.cfg.cluster.run_name)
        with warnings.catch_warnings():  # Ray's property reads its own deprecated actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:  # the constructor's arguments are the first start's: the queue knows how far we got
            batches_done, base_is_current = ray.get(self.queue.produced.remote(index)), False
        # Sampling needs no float32 master copy: the weights run (and arrive) in the model dtype.
        policy = build_policy(self.cfg.model.model_copy(update={"master_dtype": None}))
        self.synced_names = list(policy.trainable_state())  # what a sync ships; read before freezing
        self.policy = policy.eval().requires_grad_(False)
        self.strategy = build_strategy(self.cfg.sampling, self.cfg.algorithm)
        train, _ = prompt_splits(self.cfg.prompts)
        self.shard = train[index :: self.cfg.rollout.workers] or train
        self._position(batches_done)
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
        self.runs = 0
        self.metrics = RoleMetrics(self.cfg.cluster.run_name, "rollout", worker=str(index))

    def _position(self, batches_done: int) -> None:
        """Put the prompt stream after ``batches_done`` batches (a resume, a restart)."""
        self.cursor = PromptCursor(self.shard, self.cfg.seed + self.index)
        self.cursor.take(batches_done * self.cfg.rollout.prompts_per_batch)
        self.batches = batches_done

    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    def _report(self, message: str) -> None:
        self.log.failure.remote("reward_retries", message)

    def sync_weights(self, at_least: int = 0) -> int:
        """Between batches: load newer weights if there are any; wait while ours are older than at_least
        (until the queue closes). Returns the version in use."""
        load = self._apply_received if self.cfg.rollout.weight_sync == "collective" else self._load_from_store
        while True:
            t0 = time.perf_counter()
            if load():
                self.versions_loaded.append(self.version)
                self.sync_seconds.append(time.perf_counter() - t0)
                self.metrics.observe("egrpo_rollout_weight_sync_seconds", self.sync_seconds[-1])
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
        reward_fn = retrying(remote_reward_fn(reward_handles(self.cfg), self.cfg.cluster.reward_timeout_s),
                             self.cfg.rollout.reward_retries, self._report,
                             f"rollout worker {self.index}")
        if self.runs:  # the loop failed and is given back: the batch it was on is redone
            self._position(ray.get(self.queue.produced.remote(self.index)))
        self.runs += 1
        need, batch = 0, self.cfg.rollout.prompts_per_batch
        while not ray.get(self.queue.is_closed.remote()):
            self.sync_weights(need)
            if self.version < 0:
                break
            admitted, learner_version = ray.get(self.queue.admit.remote(self.index, self.version, batch, QUEUE_WAIT_S))
            if not admitted:  # sampled now, the batch would go stale in the queue: newer weights first, or wait
                need = learner_version if learner_version > self.version else 0
                continue
            t0 = time.perf_counter()
            generator = torch.Generator().manual_seed(batch_seed(self.cfg.seed, self.index, self.batches))
            prompts = self.cursor.take(batch)
            item = sample_and_score(self.policy, self.strategy, prompts, reward_fn, generator,
                                    iteration=self.version, policy_version=self.version, worker=self.index,
                                    max_batch=self.cfg.rollout.max_batch_rows)
            self.batches += 1
            self.images += len(item.rollout.final_latents)
            self.busy_seconds += time.perf_counter() - t0
            self.metrics.observe("egrpo_rollout_sampler_seconds", time.perf_counter() - t0)
            self.metrics.inc("egrpo_rollout_images", len(item.rollout.final_latents))
            status = ray.get(self.queue.put.remote(item, QUEUE_WAIT_S))
            while status == "full":  # back-pressure: the put waits for the learner to take some
                status = ray.get(self.queue.put.remote(item, QUEUE_WAIT_S))
            if status == "ok":
                self.metrics.inc("egrpo_rollout_groups", item.num_prompts)
            if self.metrics.enabled:
                self.metrics.set("egrpo_rollout_staleness", ray.get(self.queue.version.remote()) - self.version)
            # "stale": the learner has moved on; the next batch must use newer weights
            need = self.version + 1 if status == "stale" else 0
        return self.stats()

    def stats(self) -> dict:
        return {"worker": self.index, "batches": self.batches, "images": self.images, "busy_seconds": self.busy_seconds,
                "versions_loaded": self.versions_loaded, "sync_seconds": self.sync_seconds}


class RolloutFleet:
    """The driver's view of the rollout workers: their ``run`` loops, and what happens when one dies.

    ``check`` (called from the driver loop, never blocks) sees a worker whose loop ended with an error and
    reports it in one line, counted in the run log. Within rollout.max_restarts Ray restarts the actor (it
    rejoins at its prompt cursor, the batches the queue has from it); the fleet probes it until it answers and
    gives it its loop back. Past that the worker is lost and the others go on."""

    def __init__(self, cfg: ExperimentConfig, workers: list, queue, log):
        self.cfg, self.workers, self.queue, self.log = cfg, workers, queue, log
        self.runs = {i: w.run.remote() for i, w in enumerate(workers)}
        self.probes: dict[int, object] = {}  # restarting workers: a ready() call that answers once it is back
        self.restarts = [0] * len(workers)
        self.lost: set[int] = set()
        self.stats: dict[int, dict] = {}

    def check(self) -> None:
        for i, ref in self._finished(self.runs):
            try:
                self.stats[i] = ray.get(ref)
            except ray.exceptions.RayError as err:
                self._failed(i, err)
        for i, ref in self._finished(self.probes):
            try:
                ray.get(ref)
                self.runs[i] = self.workers[i].run.remote()  # back: it continues at its prompt cursor
            except ray.exceptions.ActorUnavailableError:
                self.probes[i] = self.workers[i].ready.remote()  # still restarting
            except ray.exceptions.RayError as err:
                self._lose(i, f"did not come back ({_first_line(err)})")

    @staticmethod
    def _finished(refs: dict[int, object]) -> list[tuple[int, object]]:
        if not refs:
            return []
        done, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        return [(i, refs.pop(i)) for i in [i for i, ref in refs.items() if ref in done]]

    def _failed(self, i: int, err: Exception) -> None:
        if ray.get(self.queue.is_closed.remote()):
            return  # the run is ending: nothing to restart
        self.queue.release.remote(i)  # the batch it was sampling will not come
        died = isinstance(err, ray.exceptions.RayActorError)
        what = "died" if died else f"failed ({_first_line(err)})"
        if self.restarts[i] >= self.cfg.rollout.max_restarts:
            self._lose(i, f"{what}; no restarts left (rollout.max_restarts = {self.cfg.rollout.max_restarts})")
            return
        self.restarts[i] += 1
        if died:  # Ray is restarting the actor
            self.probes[i] = self.workers[i].ready.remote()
        else:  # the actor lives: give it its loop back
            self.runs[i] = self.workers[i].run.remote()
        cursor = ray.get(self.queue.produced.remote(i))
        self.log.failure.remote("rollout_restarts", f"rollout worker {i} {what}; restarting it "
                                                    f"({self.restarts[i]}/{self.cfg.rollout.max_restarts}), "
                                                    f"it rejoins at prompt batch {cursor}")

    def _lose(self, i: int, why: str) -> None:
        self.lost.add(i)
        self.log.failure.remote("rollout_lost", f"rollout worker {i} {why}; "
                                                f"{len(self.workers) - len(self.lost)} worker(s) go on")

    def all_lost(self) -> bool:
        return len(self.lost) == len(self.workers)

    def drain(self, timeout_s: float) -> list[dict]:
        """After the queue closed: each worker's stats (a worker that died on the way out is left out)."""
        deadline = time.monotonic() + timeout_s
        for i, ref in list(self.runs.items()):
            try:
                self.stats[i] = ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass
        self.runs.clear()
        self.probes.clear()
        return [dict(self.stats[i], restarts=self.restarts[i]) for i in sorted(self.stats)]


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1][:200]}" if text else type(err).__name__
