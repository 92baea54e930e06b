"""The service's small stateful actors: the replay queue, the weight store and the run log.

All three take no CPU (they only hold data), so they never compete with rollout and learning. They are named
after the run: a rollout worker looks them up (``run_actors``) instead of taking their handles as constructor
arguments, which Ray flags for restartable actors (ray-project/ray#53727) and would re-send on every restart.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter, deque

import ray

from egrpo_ray.monitoring import QUEUE_DROP_CAUSES, RoleMetrics, record_learner_step


@ray.remote(num_cpus=0)  # an asyncio actor: waiting gets and puts cost a coroutine each, not a thread
class ReplayQueue:
    """Whole scored groups (ScoredRollout items) tagged with the policy version that sampled them.

    Bounded: ``put`` waits up to ``timeout_s`` for room, then answers "full" and the producer tries again
    (back-pressure). Items more than ``max_staleness`` versions behind the learner are dropped and counted.
    Sampling only what will be used: a producer asks ``admit`` before it samples a batch. The queue is taken
    first in, first out, ``prompts_per_step`` prompts per learner version, so it knows which version will take
    a batch queued now (behind what is queued and what other producers are sampling); a batch that would be
    too stale by then waits, or is sampled with newer weights, instead of being sampled and dropped. When the
    learner waits for more prompts than are queued and being sampled, a batch with its current weights is
    admitted whatever the count says: a step's prompts need not come in whole batches (the learner takes whole
    items, and a rank keeps what it took beyond its share), and the count must never starve the learner.
    ``close`` stops producers and wakes every waiting call. ``produced_by_worker`` is each rollout worker's
    prompt cursor (the batches it has delivered): a restarted worker, or a resumed run, continues from it.
    Metrics (``run`` given): egrpo_queue_depth, egrpo_queue_dropped by cause (monitoring.py).
    """

    DROP_COUNTS = dict(zip(QUEUE_DROP_CAUSES, ("dropped_stale", "dropped_stale_on_put", "dropped_on_learner_restart")))

    def __init__(self, capacity: int, max_staleness: int, prompts_per_step: int = 1,
                 produced_by_worker: dict | None = None, run: str | None = None):
        self.capacity, self.max_staleness, self.prompts_per_step = capacity, max_staleness, prompts_per_step
        self.items: deque = deque()
        self.learner_version = 0
        self.taken_at_version = 0  # prompts the learner has taken under its current version
        self.last_version: int | None = None  # the last version that takes anything (the run's last step)
        self.sampling: dict[int, int] = {}  # producer -> prompts of the admitted batch it is sampling
        self.wanted = 0  # prompts that learner ranks are waiting for
        self.min_version = 0  # after a learner restart, groups sampled by the abandoned weights are refused
        self.closed = False
        self.counts = Counter()
        self.produced_by_worker: Counter = Counter({int(k): int(v) for k, v in (produced_by_worker or {}).items()})
        self.changed = asyncio.Condition()
        self.metrics = RoleMetrics(run, "queue")
        self._publish_metrics()

    def _publish_metrics(self) -> None:
        self.metrics.set("egrpo_queue_depth", len(self.items))
        for cause, key in self.DROP_COUNTS.items():
            self.metrics.set("egrpo_queue_dropped", self.counts[key], cause=cause)

    def _stale(self, item) -> bool:
        return self.learner_version - item.policy_version > self.max_staleness or item.policy_version < self.min_version

    async def _wait(self, predicate, timeout_s: float) -> None:
        if not predicate() and timeout_s > 0:
            try:
                await asyncio.wait_for(self.changed.wait_for(predicate), timeout_s)
            except asyncio.TimeoutError:
                pass

    def _admissible(self, worker: int, version: int) -> bool:
        ahead = self._prompts() + sum(n for w, n in self.sampling.items() if w != worker)
        if ahead < self.wanted and version == self.learner_version:
            return True  # the learner is waiting for prompts no one else is sampling
        # the learner takes whole items: the batch goes to the version that needs its first prompt
        taker = version_taking(self.learner_version, self.taken_at_version, self.prompts_per_step, ahead + 1)
        return taker - version <= self.max_staleness and (self.last_version is None or taker <= self.last_version)

    async def admit(self, worker: int, version: int, num_prompts: int, timeout_s: float) -> tuple[bool, int]:
        """(admitted, learner version). Admitted: a batch ``worker`` samples now with ``version`` will be taken
        within max_staleness (counted until its put). Waits up to ``timeout_s`` for that, returning early
        when the learner has newer weights than ``version``: the producer loads them and asks again."""
        async with self.changed:
            await self._wait(lambda: self.closed or self.learner_version > version
                             or self._admissible(worker, version), timeout_s)
            admitted = not self.closed and self._admissible(worker, version)
            if admitted:
                self.sampling[worker] = num_prompts
            return admitted, self.learner_version

    async def release(self, worker: int) -> None:
        """``worker`` will not deliver the batch it was admitted for (it failed)."""
        async with self.changed:
            self.sampling.pop(worker, None)
            self.changed.notify_all()

    async def put(self, item, timeout_s: float = 0.0) -> str:
        """"ok", "stale" (sampled by weights the learner has left behind), "full" (no room within
        ``timeout_s``) or "closed"."""
        async with self.changed:
            await self._wait(lambda: self.closed or self._stale(item) or len(self.items) < self.capacity, timeout_s)
            if len(self.items) >= self.capacity and not (self.closed or self._stale(item)):
                self.counts["rejected_full"] += 1
                return "full"  # still the producer's: its admission holds
            self.sampling.pop(item.worker, None)
            self.changed.notify_all()
            if self.closed:
                return "closed"
            if self._stale(item):
                self.counts["dropped_stale_on_put"] += 1
                self.produced_by_worker[item.worker] += 1
                self._publish_metrics()
                return "stale"
            self.items.append(item)
            self.counts["accepted"] += 1
            self.produced_by_worker[item.worker] += 1
            self._publish_metrics()
            return "ok"

    async def set_learner_version(self, version: int, steps_left: int | None = None) -> None:
        """The learner's weights are now ``version``; with ``steps_left``, it takes that many more steps."""
        async with self.changed:
            if version != self.learner_version:
                self.taken_at_version = 0
            self.learner_version = version
            if steps_left is not None:
                self.last_version = version + steps_left - 1
            self._drop_stale()
            self.changed.notify_all()

    async def restart_from(self, version: int) -> None:
        """A restarted learner continues with ``version``: everything sampled before it is dropped."""
        async with self.changed:
            self.counts["dropped_on_learner_restart"] += len(self.items)
            self.items.clear()
            self.learner_version = self.min_version = version
            self.taken_at_version, self.last_version = 0, None  # until the restarted learner says
            self._publish_metrics()
            self.changed.notify_all()

    def _drop_stale(self) -> None:
        keep = deque(it for it in self.items if not self._stale(it))
        self.counts["dropped_stale"] += len(self.items) - len(keep)
        self.items = keep
        self._publish_metrics()

    def _prompts(self) -> int:
        return sum(it.num_prompts for it in self.items)

    async def get(self, num_prompts: int, timeout_s: float) -> list:
        """Whole items covering at least ``num_prompts`` prompts, waiting up to ``timeout_s`` for them;
        [] on timeout or close."""
        async with self.changed:
            self._drop_stale()
            self.wanted += num_prompts
            self.changed.notify_all()  # producers may be waiting for admission
            try:
                await self._wait(lambda: self.closed or self._prompts() >= num_prompts, timeout_s)
            finally:
                self.wanted -= num_prompts
            self._drop_stale()
            if self._prompts() < num_prompts:
                return []
            out, got = [], 0
            while got < num_prompts:
                out.append(self.items.popleft())
                got += out[-1].num_prompts
            self.counts["delivered"] += len(out)
            self.taken_at_version += got
            self._publish_metrics()
            self.changed.notify_all()  # room for waiting producers
            return out

    async def close(self) -> None:
        async with self.changed:
            self.closed = True
            self.changed.notify_all()

    def is_closed(self) -> bool:
        return self.closed

    def version(self) -> int:
        """The learner's current policy version."""
        return self.learner_version

    def produced(self, worker: int) -> int:
        """How many prompt batches ``worker`` has delivered (its prompt cursor)."""
        return self.produced_by_worker[worker]

    def stats(self) -> dict:
        return {"depth": len(self.items), "learner_version": self.learner_version, **self.counts,
                "dropped_as_stale": self.counts["dropped_stale"] + self.counts["dropped_stale_on_put"],
                "produced_by_worker": dict(self.produced_by_worker)}


@ray.remote(num_cpus=0)
class WeightStore:
    """Owns the latest published weights: an object put by a Train worker would die with it."""

    def __init__(self):
        self.version = -1
        self.ref = None

    def publish(self, version: int, weights: dict) -> None:
        self.ref = ray.put(weights)  # this actor owns the object
        self.version = version

    def latest_version(self) -> int:
        return self.version

    def latest(self) -> tuple[int, list]:
        """(version, [ref]): the ref is wrapped so Ray does not resolve it on the way out."""
        return self.version, [self.ref]


@ray.remote(num_cpus=0)
class RunLog:
    """What the driver follows: per-step metrics and images from the learner, failures from anyone
    (one line each, as they happen); and what the learner follows: the stop flag, whether the run started.
    With ``run`` it also exports the learner's records (egrpo_learner_*) and the fault counts (egrpo_faults)
    as metrics: it lives as long as the run, across learner restarts."""

    FAULT_KINDS = ("rollout_restarts", "rollout_lost", "reward_retries", "learner_restarts")

    def __init__(self, run: str | None = None):
        self.records: list[dict] = []
        self.images: list[tuple[int, str, object]] = []
        self.failures: list[dict] = []
        self.stop_requested = False
        self.started = False
        self.learner_starts = 0
        self.fault_counts = Counter({k: 0 for k in self.FAULT_KINDS})
        self.learner_metrics, self.fault_metrics = RoleMetrics(run, "learner"), RoleMetrics(run, "driver")
        for kind in self.FAULT_KINDS:
            self.fault_metrics.set("egrpo_faults", 0, kind=kind)

    def record(self, metrics: dict) -> None:
        self.records.append(metrics)
        record_learner_step(self.learner_metrics, metrics)

    def add_images(self, step: int, tag: str, images_uint8) -> None:
        self.images.append((step, tag, images_uint8))

    def failure(self, kind: str, message: str) -> None:
        """``kind`` counts it (rollout_restarts, rollout_lost, reward_retries, learner_restarts)."""
        self.failures.append({"kind": kind, "message": message, "time": time.time()})
        self.fault_counts[kind] += 1
        self.fault_metrics.set("egrpo_faults", self.fault_counts[kind], kind=kind)

    def since(self, n_records: int, n_images: int, n_failures: int = 0) -> tuple[list[dict], list, list[dict]]:
        return self.records[n_records:], self.images[n_images:], self.failures[n_failures:]

    def learner_started(self) -> int:
        """Called by the learner's rank 0 at each start: 0 first, then the number of restarts."""
        self.learner_starts += 1
        return self.learner_starts - 1

    def request_stop(self) -> None:
        self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested

    def mark_started(self) -> None:
        """The driver's word that the rewards are up and the rollout workers started."""
        self.started = True

    def start_state(self) -> tuple[bool, bool]:
        """(started, stop requested): the learner waits for either before it touches a worker or a reward."""
        return self.started, self.stop_requested


def _actor_name(run: str, role: str) -> str:
    return f"{run}-{role}"


def version_taking(learner_version: int, taken_at_version: int, prompts_per_step: int, through: int) -> int:
    """The learner version that takes the queue's prompt number ``through`` (1-based, first in first out), when
    the learner has taken ``taken_at_version`` prompts under ``learner_version`` and takes ``prompts_per_step``
    per version."""
    past = through - max(0, prompts_per_step - taken_at_version)  # beyond what the current version still takes
    return learner_version if past <= 0 else learner_version + 1 + (past - 1) // prompts_per_step


def start_run_actors(run: str, queue_capacity: int, max_staleness: int, prompts_per_step: int = 1,
                     produced_by_worker: dict | None = None):
    """(queue, weight store, run log) for ``run``, named so that ``run_actors(run)`` finds them."""
    queue = ReplayQueue.options(name=_actor_name(run, "queue")).remote(queue_capacity, max_staleness,
                                                                       prompts_per_step, produced_by_worker, run=run)
    store = WeightStore.options(name=_actor_name(run, "weights")).remote()
    log = RunLog.options(name=_actor_name(run, "log")).remote(run=run)
    return queue, store, log


def run_actors(run: str):
    """(queue, weight store, run log) of a run started by ``start_run_actors``."""
    return tuple(ray.get_actor(_actor_name(run, role)) for role in ("queue", "weights", "log"))
