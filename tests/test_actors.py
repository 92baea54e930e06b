"""The service's small actors on a real local Ray cluster."""
import time
from types import SimpleNamespace

import pytest
import ray

from egrpo_ray.config import ExperimentConfig, validate
from egrpo_ray.distributed.actors import ReplayQueue, WeightStore, version_taking
from egrpo_ray.distributed.cluster import ClusterError, check_resources


def _item(version, worker=0, prompts=1):
    return SimpleNamespace(policy_version=version, worker=worker, num_prompts=prompts)


def test_replay_queue_bounds_staleness_and_counts(ray_cluster):
    q = ReplayQueue.remote(capacity=2, max_staleness=1)
    assert ray.get(q.put.remote(_item(0))) == "ok"
    assert ray.get(q.put.remote(_item(0, prompts=2))) == "ok"
    assert ray.get(q.put.remote(_item(0))) == "full"  # back-pressure
    got = ray.get(q.get.remote(3, 1.0))
    assert [it.num_prompts for it in got] == [1, 2]  # whole items
    ray.get(q.put.remote(_item(0)))
    ray.get(q.set_learner_version.remote(2))  # version 0 is now 2 behind: dropped
    assert ray.get(q.get.remote(1, 0.2)) == []
    assert ray.get(q.put.remote(_item(0))) == "stale"
    stats = ray.get(q.stats.remote())
    assert stats["rejected_full"] == 1 and stats["dropped_stale"] == 1 and stats["dropped_stale_on_put"] == 1
    assert stats["dropped_as_stale"] == 2  # what `train` reports
    ray.get(q.close.remote())
    assert ray.get(q.put.remote(_item(2))) == "closed"


def test_replay_queue_get_waits_for_a_put(ray_cluster):
    q = ReplayQueue.remote(capacity=4, max_staleness=0)
    pending = q.get.remote(1, 10.0)
    time.sleep(0.3)
    ray.get(q.put.remote(_item(0)))
    assert len(ray.get(pending, timeout=10)) == 1


def test_version_taking_counts_whole_steps_first_in_first_out():
    # 4 prompts a step, none taken yet under version 3: prompts 1-4 go to version 3, 5-8 to 4, 9 to 5
    assert [version_taking(3, 0, 4, n) for n in (1, 4, 5, 8, 9)] == [3, 3, 4, 4, 5]
    # 3 of version 3's 4 taken: the next prompt is its last, then version 4's
    assert [version_taking(3, 3, 4, n) for n in (1, 2, 5, 6)] == [3, 4, 4, 5]
    # the step is taken (the learner is updating): the next prompt goes to version 4
    assert version_taking(3, 4, 4, 1) == 4


def test_replay_queue_admits_only_batches_the_learner_takes_within_max_staleness(ray_cluster):
    q = ReplayQueue.remote(capacity=8, max_staleness=0, prompts_per_step=4)

    def admit(worker, version, timeout_s=0.0):
        return ray.get(q.admit.remote(worker, version, 2, timeout_s))

    assert admit(0, 0) == (True, 0) and admit(1, 0) == (True, 0)  # the step's 4 prompts are being sampled
    assert admit(0, 0) == (True, 0)  # asking again replaces the worker's own admission
    assert admit(2, 0) == (False, 0)  # a third batch would be version 1's: stale on arrival
    assert ray.get([q.put.remote(_item(0, worker=w, prompts=2)) for w in (0, 1)]) == ["ok", "ok"]
    assert len(ray.get(q.get.remote(4, 1.0))) == 2  # the learner takes the step and updates
    assert admit(2, 0, timeout_s=0.2) == (False, 0)  # waited: still only version 1 takes anything
    ray.get(q.set_learner_version.remote(1))
    t0 = time.monotonic()
    assert admit(2, 0, timeout_s=30.0) == (False, 1) and time.monotonic() - t0 < 10  # newer weights: no wait
    assert admit(2, 1) == (True, 1) and admit(3, 1) == (True, 1)
    assert admit(4, 1) == (False, 1)
    ray.get(q.release.remote(3))  # worker 3 failed: its batch will not come
    assert admit(4, 1) == (True, 1)
    # one stale step allowed: version 0 may sample two steps ahead, not three
    q1 = ReplayQueue.remote(capacity=8, max_staleness=1, prompts_per_step=2)
    assert [ray.get(q1.admit.remote(w, 0, 2, 0.0))[0] for w in range(3)] == [True, True, False]
    # ... unless the run ends first: with one step left, nothing for a version that never comes
    q2 = ReplayQueue.remote(capacity=8, max_staleness=1, prompts_per_step=2)
    ray.get(q2.set_learner_version.remote(0, 1))
    assert [ray.get(q2.admit.remote(w, 0, 2, 0.0))[0] for w in range(2)] == [True, False]
    ray.get(q.close.remote())
    assert admit(5, 1, timeout_s=30.0) == (False, 1)  # closed: nothing more is admitted


def test_replay_queue_never_starves_a_learner_waiting_for_prompts(ray_cluster):
    """Batches of 3 prompts, 2 learner ranks taking 1 prompt each a step: rank 0 takes a whole batch (3 prompts,
    2 more than its share), so by the count the step is served; rank 1 still waits, and a batch with the
    current weights is admitted for it (on-policy, the count alone would wait for a version that never comes)."""
    q = ReplayQueue.remote(capacity=8, max_staleness=0, prompts_per_step=2)
    assert ray.get(q.admit.remote(0, 0, 3, 0.0)) == (True, 0)
    assert ray.get(q.put.remote(_item(0, worker=0, prompts=3))) == "ok"
    assert len(ray.get(q.get.remote(1, 1.0))) == 1  # rank 0: the whole batch
    assert ray.get(q.admit.remote(0, 0, 3, 0.0)) == (False, 0)  # nobody waits: by the count, version 1's
    rank1 = q.get.remote(1, 30.0)
    assert ray.get(q.admit.remote(0, 0, 3, 10.0)) == (True, 0)  # rank 1 waits for a prompt nobody samples
    assert ray.get(q.admit.remote(1, 0, 3, 0.2)) == (False, 0)  # one batch is enough for it
    assert ray.get(q.put.remote(_item(0, worker=0, prompts=3))) == "ok"
    assert len(ray.get(rank1, timeout=10)) == 1


def test_weight_store_owns_published_weights(ray_cluster):
    import torch

    store = WeightStore.remote()
    assert ray.get(store.latest_version.remote()) == -1
    ray.get(store.publish.remote(3, {"w": torch.ones(4)}))
    version, [ref] = ray.get(store.latest.remote())
    assert version == 3 and torch.equal(ray.get(ref)["w"], torch.ones(4))


def test_infeasible_resources_fail_fast_with_a_clear_message():
    cfg = validate({"rollout": {"workers": 8, "num_cpus": 1.0}})
    with pytest.raises(ClusterError, match=r"needs 8.75 CPUs .* cluster has 2"):
        check_resources(cfg, {"CPU": 2.0})
    with pytest.raises(ClusterError, match="GPUs"):
        check_resources(validate({"learner": {"num_gpus": 1}}), {"CPU": 8.0})
    check_resources(ExperimentConfig(), {"CPU": 2.0})  # the default fits 2 cores
