"""Collective weight sync (distributed/weight_sync.py): the bucket layout, a gloo round trip in one process,
and real RolloutWorker actors synced through the object store and through the collective group."""
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from egrpo_ray.config import load_config
from egrpo_ray.distributed.weight_sync import (
    BucketReceiver,
    BucketSender,
    SyncGroup,
    TensorSpec,
    WeightBroadcaster,
    bucket_layout,
    open_store,
    specs_of,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
F32, BF16 = torch.float32, torch.bfloat16
SPECS = [TensorSpec("a", (3, 5), F32), TensorSpec("b", (40,), BF16), TensorSpec("c", (7, 9), F32),
         TensorSpec("empty", (0, 4), F32), TensorSpec("d", (2,), BF16), TensorSpec("e", (100,), F32)]


def _covered(layout) -> dict[str, list[int]]:
    """Every tensor's element indices, in the order the layout places them."""
    seen: dict[str, list[int]] = {}
    for bucket in layout:
        for p in bucket.pieces:
            seen.setdefault(p.name, []).extend(range(p.start, p.start + p.numel))
    return seen


# -- layout -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bucket_bytes", [1, 16, 64, 100, 1 << 20])
def test_layout_respects_the_cap_and_covers_every_element_once(bucket_bytes):
    layout = bucket_layout(SPECS, bucket_bytes)
    assert layout == bucket_layout(list(SPECS), bucket_bytes)  # deterministic: both sides derive the same
    for bucket in layout:
        assert bucket.numel * bucket.dtype.itemsize <= max(bucket_bytes, bucket.dtype.itemsize)
        assert [p.offset for p in bucket.pieces] == [sum(q.numel for q in bucket.pieces[:k]) for k in
                                                      range(len(bucket.pieces))]  # pieces tile the bucket
        assert sum(p.numel for p in bucket.pieces) == bucket.numel
        assert all({s.name: s.dtype for s in SPECS}[p.name] == bucket.dtype for p in bucket.pieces)
    assert _covered(layout) == {s.name: list(range(s.numel)) for s in SPECS if s.numel}


def test_layout_groups_per_dtype_and_sends_a_bucket_once_its_last_tensor_is_in():
    layout = bucket_layout(SPECS, 1 << 20)  # everything fits: one bucket per dtype
    assert [(b.dtype, [p.name for p in b.pieces]) for b in layout] == [(BF16, ["b", "d"]), (F32, ["a", "c", "e"])]
    split = bucket_layout([TensorSpec("big", (10,), F32)], 16)  # 4 floats per bucket: 4 + 4 + 2
    assert [(b.numel, b.pieces[0].start) for b in split] == [(4, 0), (4, 4), (2, 8)]


# -- one process, two gloo ranks --------------------------------------------------------------------------
def _pair_of_groups(world: int = 2) -> list[SyncGroup]:
    store = open_store("127.0.0.1", 0, 0, world, timeout_s=30)
    groups: list = [None] * world

    def join(rank):
        s = store if rank == 0 else open_store("127.0.0.1", store.port, rank, world, timeout_s=30)
        groups[rank] = SyncGroup(s, rank, world, "gloo", timeout_s=30)

    threads = [threading.Thread(target=join, args=(r,)) for r in range(world)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return groups


def test_the_store_listens_on_the_given_address_only():
    import os

    import psutil

    store = open_store("127.0.0.1", 0, 0, 1, timeout_s=30)
    store.set("k", "v")
    listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(os.getpid()).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == store.port}
    assert listening == {("127.0.0.1", store.port)} and store.get("k") == b"v"


def test_round_trip_is_exact_and_stays_in_staging_until_applied():
    sender_group, receiver_group = _pair_of_groups()
    g = torch.Generator().manual_seed(0)
    source = {s.name: torch.randn(s.shape, generator=g) for s in SPECS}  # float32 masters
    live = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in SPECS}  # the receiver's params
    layout = bucket_layout(specs_of(live.items()), 64)
    sender, receiver = BucketSender(sender_group, specs_of(live.items()), layout), BucketReceiver(receiver_group, layout)
    for _ in range(2):  # buffers are reused by the next sync
        t = threading.Thread(target=receiver.receive)
        t.start()
        for name, tensor in source.items():
            sender.add(name, tensor)
        sender.finish()
        t.join()
        assert all(not v.any() for v in live.values())  # not applied yet
        receiver.apply(live)
        for name, tensor in source.items():
            assert torch.equal(live[name], tensor.to(live[name].dtype))  # cast on the sender, exactly
        live = {k: torch.zeros_like(v) for k, v in live.items()}


def test_sender_rejects_tensors_out_of_layout_order():
    (group,) = _pair_of_groups(world=1)
    sender = BucketSender(group, SPECS, bucket_layout(SPECS, 64))
    with pytest.raises(ValueError, match="layout expects 'a'"):
        sender.add("b", torch.zeros(40))
    sender.add("a", torch.zeros(3, 5))
    with pytest.raises(ValueError, match="5 tensors not sent, the first 'b'"):
        sender.finish()


# -- real rollout workers --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(ray_cluster):
    """Per model dtype, started once: (weight store, a worker syncing through it, collective workers: two in
    float32, where the atomicity test uses them too, one in bfloat16)."""
    from egrpo_ray.distributed.actors import start_run_actors
    from egrpo_ray.distributed.rollout import RolloutWorker

    started: dict = {}
    held: list = []

    def get(dtype: str):
        if dtype not in started:
            run = f"weight-sync-{dtype}"
            queue, store, log = start_run_actors(run, 4, 0)  # the workers find them by name; held here
            modes = ["object_store"] + ["collective"] * (2 if dtype == "float32" else 1)
            workers = [RolloutWorker.options(num_cpus=0).remote(
                load_config(TINY, [f"model.dtype={dtype}", f"rollout.weight_sync={mode}", f"cluster.run_name={run}"])
                .model_dump(), i, base_is_current=True) for i, mode in enumerate(modes)]
            ray.get([w.ready.remote() for w in workers])
            started[dtype] = store, workers[0], workers[1:]
            held.append((queue, log))
        return started[dtype]

    yield get
    for _, by_store, by_collective in started.values():
        [ray.kill(w) for w in [by_store, *by_collective]]


def _perturbed_master(seed: int) -> dict[str, torch.Tensor]:
    """The learner's float32 weights after a deterministic update."""
    from egrpo_ray.models import build_policy

    policy = build_policy(load_config(TINY).model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_state().values():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return policy.trainable_state()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_collective_and_object_store_leave_bit_identical_weights(fleet, dtype):
    store, by_store, by_collective = fleet(dtype)
    master = _perturbed_master(seed=1)
    ray.get(store.publish.remote(1, master))
    broadcaster = WeightBroadcaster(bucket_bytes=1 << 20, backend="gloo", timeout_s=60)
    broadcaster.connect(by_collective)
    broadcaster.publish(1, master.items())
    workers = [by_store, *by_collective]
    assert ray.get([w.sync_weights.remote() for w in workers]) == [1] * len(workers)
    (_, expected), *others = ray.get([w.weights.remote() for w in workers])
    assert expected.keys() == master.keys()
    for name, tensor in expected.items():
        assert tensor.dtype == {"float32": F32, "bfloat16": BF16}[dtype]
        assert torch.equal(tensor, master[name].to(tensor.dtype))  # the bf16 worker: the master, rounded once
        assert all(torch.equal(state[name], tensor) for _, state in others)


def test_a_worker_never_sees_half_a_sync(fleet):
    """The sender streams slowly in many buckets while a reader keeps applying and snapshotting between
    batches, as run() does: every snapshot holds one version's weights, and that version's number."""
    _, _, workers = fleet("float32")
    shapes = {k: v.shape for k, v in ray.get(workers[0].weights.remote())[1].items()}
    published = list(range(101, 107))
    done = threading.Event()
    snapshots: list[tuple[int, float, float]] = []  # (version, smallest weight, largest weight)

    def read() -> None:
        while True:
            last = done.is_set()
            for w in workers:
                ray.get(w.sync_weights.remote())
                version, state = ray.get(w.weights.remote())
                lo, hi = torch.aminmax(torch.cat([t.flatten() for t in state.values()]))
                snapshots.append((version, float(lo), float(hi)))
            if last:
                return

    def slowly(version: int):
        for name, shape in shapes.items():
            time.sleep(0.002)
            yield name, torch.full(shape, float(version))

    broadcaster = WeightBroadcaster(bucket_bytes=16 << 10, backend="gloo", timeout_s=60)  # ~450 buckets
    broadcaster.connect(workers)
    reader = threading.Thread(target=read)
    reader.start()
    for version in published:
        broadcaster.publish(version, slowly(version))
    done.set()
    reader.join()
    synced = [s for s in snapshots if s[0] in published]
    assert synced and all(lo == hi == v for v, lo, hi in synced), [s for s in synced if not s[1] == s[2] == s[0]][:3]
    first = snapshots.index(synced[0])
    assert all(v < published[0] for v, _, _ in snapshots[:first])  # before the first sync: earlier weights
    assert [v for v, _, _ in snapshots[-2:]] == [published[-1]] * 2  # the last sync reached both workers


@ray.remote(num_cpus=0)
class CannotJoin:
    def join_weight_sync(self, *args):
        raise RuntimeError("no GPU here")


def test_a_worker_that_cannot_join_fails_the_connect_with_its_own_error(ray_cluster):
    with pytest.raises(ray.exceptions.RayTaskError, match="no GPU here"):
        WeightBroadcaster(bucket_bytes=1024, backend="gloo", timeout_s=5).connect([CannotJoin.remote()])
