"""The service's small actors on a real local Ray cluster."""
import time
from types import SimpleNamespace

import pytest
import ray

from egrpo_ray.config import ExperimentConfig, validate
from egrpo_ray.distributed.actors import ReplayQueue, WeightStore
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
    ray.get(q.close.remote())
    assert ray.get(q.put.remote(_item(2))) == "closed"


def test_replay_queue_get_waits_for_a_put(ray_cluster):
    q = ReplayQueue.remote(capacity=4, max_staleness=0)
    pending = q.get.remote(1, 10.0)
    time.sleep(0.3)
    ray.get(q.put.remote(_item(0)))
    assert len(ray.get(pending, timeout=10)) == 1


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
