"""The service's small stateful actors: the replay queue, the weight store and the run log.

All three take no CPU (they only hold data), so they never compete with rollout and learning.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

import ray


@ray.remote(num_cpus=0, max_concurrency=16)  # threads: a waiting get must not block puts
class ReplayQueue:
    """Whole scored groups (ScoredRollout items) tagged with the policy version that sampled them.

    Bounded: ``put`` answers "full" and the producer waits (back-pressure). ``get`` drops items older
    than ``max_staleness`` versions behind the learner and counts them. ``close`` stops producers.
    """

    def __init__(self, capacity: int, max_staleness: int):
        self.capacity, self.max_staleness = capacity, max_staleness
        self.items: deque = deque()
        self.learner_version = 0
        self.closed = False
        self.counts = Counter()
        self.produced_by_worker: Counter = Counter()
        self.cv = threading.Condition()

    def put(self, item) -> str:
        with self.cv:
            if self.closed:
                return "closed"
            if self.learner_version - item.policy_version > self.max_staleness:
                self.counts["dropped_stale_on_put"] += 1
                self.produced_by_worker[item.worker] += 1
                return "stale"
            if len(self.items) >= self.capacity:
                self.counts["rejected_full"] += 1
                return "full"
            self.items.append(item)
            self.counts["accepted"] += 1
            self.produced_by_worker[item.worker] += 1
            self.cv.notify_all()
            return "ok"

    def set_learner_version(self, version: int) -> None:
        with self.cv:
            self.learner_version = version
            self._drop_stale()

    def _drop_stale(self) -> None:
        keep = deque(it for it in self.items if self.learner_version - it.policy_version <= self.max_staleness)
        self.counts["dropped_stale"] += len(self.items) - len(keep)
        self.items = keep

    def get(self, num_prompts: int, timeout_s: float) -> list:
        """Whole items covering at least ``num_prompts`` prompts; [] on timeout or close."""
        deadline = time.monotonic() + timeout_s
        with self.cv:
            while True:
                self._drop_stale()
                if sum(it.num_prompts for it in self.items) >= num_prompts:
                    out, got = [], 0
                    while got < num_prompts:
                        it = self.items.popleft()
                        out.append(it)
                        got += it.num_prompts
                    self.counts["delivered"] += len(out)
                    return out
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return []
                self.cv.wait(min(left, 1.0))

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()

    def is_closed(self) -> bool:
        return self.closed

    def stats(self) -> dict:
        return {"depth": len(self.items), "learner_version": self.learner_version, **self.counts,
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
    """Per-step metrics and images from the learner, polled by the driver; also the stop flag."""

    def __init__(self):
        self.records: list[dict] = []
        self.images: list[tuple[int, str, object]] = []
        self.stop_requested = False

    def record(self, metrics: dict) -> None:
        self.records.append(metrics)

    def add_images(self, step: int, tag: str, images_uint8) -> None:
        self.images.append((step, tag, images_uint8))

    def since(self, n_records: int, n_images: int) -> tuple[list[dict], list]:
        return self.records[n_records:], self.images[n_images:]

    def request_stop(self) -> None:
        self.stop_requested = True

    def should_stop(self) -> bool:
        return self.stop_requested
