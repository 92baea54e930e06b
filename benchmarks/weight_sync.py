"""Weight-sync time against size: Ray's object store (the WeightStore path) vs the collective broadcast.

Object store: the sender passes the weights to an owner actor that puts them (as WeightStore.publish does),
then every receiver gets the object and copies it into its own tensors. Collective: WeightBroadcaster, one
sender -> 2 receiver actors over gloo, buckets landed in staging and applied. Each time is the wall time from
the sender's first call until every receiver holds the new weights; medians over the repeats after a warm-up.
Its own local Ray cluster (2 CPUs), one torch thread per process. Usage:

    .venv/bin/python benchmarks/weight_sync.py [--sizes-mb 100 1024] [--repeats 3] [--bucket-mb 256]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from egrpo_ray.config import load_config
from egrpo_ray.distributed.actors import WeightStore
from egrpo_ray.distributed.weight_sync import (
    BucketReceiver,
    SyncGroup,
    TensorSpec,
    WeightBroadcaster,
    bucket_layout,
    open_store,
    specs_of,
)

ROOT = Path(__file__).resolve().parents[1]
RECEIVERS = 2
PARAM_NUMEL = 1 << 20  # the synthetic models: 4 MiB float32 tensors


@ray.remote(num_cpus=0)
class Receiver:
    """A rollout worker's part of a sync, both ways, into tensors of its own."""

    def __init__(self, specs: list[TensorSpec]):
        torch.set_num_threads(1)
        self.params = {s.name: torch.zeros(s.shape, dtype=s.dtype) for s in specs}

    def join_weight_sync(self, host, port, rank, world, backend, bucket_bytes, timeout_s) -> list[TensorSpec]:
        specs = specs_of(self.params.items())
        group = SyncGroup(open_store(host, port, rank, world, timeout_s), rank, world, backend, None, timeout_s)
        self.receiver = BucketReceiver(group, bucket_layout(specs, bucket_bytes))
        return specs

    def receive_weights(self, version: int) -> None:
        self.receiver.receive()
        self.receiver.apply(self.params)

    def load_from_store(self, store) -> None:
        _, [ref] = ray.get(store.latest.remote())
        for name, tensor in ray.get(ref).items():
            self.params[name].copy_(tensor)

    def zero(self) -> None:
        for tensor in self.params.values():
            tensor.zero_()

    def digest(self) -> float:
        return sum(float(t.double().sum()) for t in self.params.values())


def tiny_model_weights() -> dict[str, torch.Tensor]:
    from egrpo_ray.models import build_policy

    return build_policy(load_config(ROOT / "configs" / "tiny.yaml").model).trainable_state()


def random_weights(megabytes: int) -> dict[str, torch.Tensor]:
    numel, g = megabytes * (1 << 20) // 4, torch.Generator().manual_seed(0)
    sizes = [PARAM_NUMEL] * (numel // PARAM_NUMEL) + ([numel % PARAM_NUMEL] if numel % PARAM_NUMEL else [])
    return {f"layer{i}.weight": torch.randn(n, generator=g) for i, n in enumerate(sizes)}


def time_object_store(weights, receivers, store, version: int) -> float:
    t0 = time.perf_counter()
    ray.get(store.publish.remote(version, weights))
    ray.get([r.load_from_store.remote(store) for r in receivers])
    return time.perf_counter() - t0


def time_collective(weights, broadcaster, version: int) -> float:
    t0 = time.perf_counter()
    broadcaster.publish(version, weights.items())
    return time.perf_counter() - t0


def measure(weights: dict[str, torch.Tensor], repeats: int, bucket_bytes: int) -> tuple[float, float]:
    """(object store, collective) median seconds per sync; checks both leave the sender's weights."""
    receivers = [Receiver.remote(specs_of(weights.items())) for _ in range(RECEIVERS)]
    store = WeightStore.remote()
    broadcaster = WeightBroadcaster(bucket_bytes, backend="gloo")
    broadcaster.connect(receivers, host="127.0.0.1")
    expected = sum(float(t.double().sum()) for t in weights.values())
    try:
        by_store = [time_object_store(weights, receivers, store, v) for v in range(repeats + 1)][1:]
        assert ray.get([r.digest.remote() for r in receivers]) == [expected] * RECEIVERS
        ray.get([r.zero.remote() for r in receivers])
        by_collective = [time_collective(weights, broadcaster, v) for v in range(repeats + 1)][1:]
        assert ray.get([r.digest.remote() for r in receivers]) == [expected] * RECEIVERS
    finally:
        [ray.kill(a) for a in [*receivers, store]]
    return statistics.median(by_store), statistics.median(by_collective)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=int, nargs="*", default=[100, 1024], help="synthetic float32 models")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    # 6 GB: at 1 GiB the store holds the call's argument, the new put and the old one; at 4 GB Ray spilled to disk.
    ray.init(address="local", num_cpus=2, object_store_memory=6 * 10**9, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="egrpo_ws_", dir="/tmp"), logging_level="ERROR")
    models = [("tiny model", tiny_model_weights)] + [(f"{mb} MiB", lambda mb=mb: random_weights(mb))
                                                      for mb in args.sizes_mb]
    print(f"{RECEIVERS} receivers, gloo, {args.bucket_mb} MiB buckets, median of {args.repeats} after a warm-up")
    print(f"{'weights':>12} {'tensors':>8} {'MiB':>8} {'object store s':>15} {'collective s':>13} {'ratio':>7}")
    for label, make in models:
        weights = make()
        mib = sum(t.numel() * t.element_size() for t in weights.values()) / (1 << 20)
        by_store, by_collective = measure(weights, args.repeats, args.bucket_mb << 20)
        print(f"{label:>12} {len(weights):>8} {mib:>8.1f} {by_store:>15.3f} {by_collective:>13.3f} "
              f"{by_collective / by_store:>7.2f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
