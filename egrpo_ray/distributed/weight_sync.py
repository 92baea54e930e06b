"""Collective weight sync: the learner's rank 0 broadcasts new weights to the rollout workers in flat buckets.

The group is a process group of its own (its own TCPStore rendezvous, never init_process_group: a Ray Train
worker already has the default group). Both sides derive the same bucket layout from one ordered list of
(name, shape, dtype), so a sync is one control call per worker plus the broadcasts, whatever the number of
tensors. The layout's dtypes are the receivers' parameter dtypes: a bf16 rollout model gets bf16 buckets and
the sender casts its float32 master weights while packing. Receivers land the buckets in a staging copy that
the rollout worker applies between batches, so sampling never sees half-loaded weights.

nccl (device tensors, one GPU per rank) on GPU, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

DEFAULT_TIMEOUT_S = 300.0


# -- layout ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # the receiver's parameter dtype: the transfer dtype

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


@dataclass(frozen=True)
class Piece:
    """A run of one tensor's flat elements inside a bucket (a tensor larger than a bucket spans several)."""

    name: str
    start: int  # first element in the flattened tensor
    offset: int  # first element in the bucket
    numel: int


@dataclass(frozen=True)
class Bucket:
    dtype: torch.dtype
    numel: int
    pieces: tuple[Piece, ...]


def specs_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in named_tensors]


def bucket_layout(specs: Sequence[TensorSpec], bucket_bytes: int) -> list[Bucket]:
    """Flat buckets of at most ``bucket_bytes``, one dtype each, in the order they are sent.

    Tensors fill the open bucket of their dtype in spec order; a bucket closes when full or after the last
    tensor of its dtype. Closing order is the send order: a streaming sender sends each bucket as soon as its
    last piece is packed, so it holds at most one partly filled bucket per dtype.
    """
    last_of_dtype = {s.dtype: i for i, s in enumerate(specs)}
    filling: dict[torch.dtype, list[Piece]] = {}
    used: dict[torch.dtype, int] = {}
    buckets: list[Bucket] = []

    def close(dtype: torch.dtype) -> None:
        buckets.append(Bucket(dtype, used.pop(dtype), tuple(filling.pop(dtype))))

    for i, spec in enumerate(specs):
        capacity = max(1, bucket_bytes // spec.dtype.itemsize)
        start = 0
        while start < spec.numel:
            offset = used.setdefault(spec.dtype, 0)
            take = min(spec.numel - start, capacity - offset)
            filling.setdefault(spec.dtype, []).append(Piece(spec.name, start, offset, take))
            used[spec.dtype] = offset + take
            start += take
            if used[spec.dtype] == capacity:
                close(spec.dtype)
        if i == last_of_dtype[spec.dtype] and spec.dtype in filling:
            close(spec.dtype)
    return buckets


# -- the process group -----------------------------------------------------------------------------
def open_store(host: str, port: int, rank: int, world: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> TCPStore:
    """The group's rendezvous. Rank 0 hosts it on ``host``'s address only (port 0: any free port, read back
    from ``.port``): given no socket, torch's store server would listen on every interface."""
    timeout = timedelta(seconds=timeout_s)
    if rank != 0:
        return TCPStore(host, port, world_size=world, is_master=False, wait_for_workers=False, timeout=timeout)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
        sock.listen()
        port, fd = sock.getsockname()[1], sock.detach()  # the store owns the listening socket from here
    return TCPStore(host, port, world_size=world, is_master=True, wait_for_workers=False, timeout=timeout,
                    master_listen_fd=fd)


class SyncGroup:
    """Rank 0 (the learner) and the rollout workers. Constructing it returns once every rank has joined."""

    def __init__(self, store: TCPStore, rank: int, world: int, backend: str, device: torch.device | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        timeout = timedelta(seconds=timeout_s)
        prefixed = PrefixStore("weight_sync", store)  # keys apart from anything else on that store
        if backend == "nccl":
            from torch.distributed import ProcessGroupNCCL

            self.device = torch.device(device or "cpu")
            if self.device.type != "cuda" or self.device.index is None:
                raise ValueError(f"weight sync over nccl needs a CUDA device with an index, not {self.device}")
            torch.cuda.set_device(self.device)  # NCCL binds its communicator to the current device
            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = ProcessGroupNCCL(prefixed, rank, world, options)
        elif backend == "gloo":
            self.device = torch.device("cpu")
            self.pg = ProcessGroupGloo(prefixed, rank, world, timeout)
        else:
            raise ValueError(f"weight sync backend must be 'nccl' or 'gloo', not {backend!r}")
        self.store = store  # rank 0's store hosts the rendezvous: keep it as long as the group
        self.broadcast(torch.zeros(1, device=self.device))  # nccl connects lazily: make joining wait for all

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.pg.broadcast(tensor, 0).wait()  # the Backend's own call: dist.broadcast rejects unregistered groups


# -- both ends of a sync ---------------------------------------------------------------------------
class BucketSender:
    """Rank 0: packs tensors streamed in layout order and broadcasts each bucket once it is full.

    ``for name, tensor in gathered: sender.add(name, tensor)`` then ``sender.finish()``; the buffers (one
    bucket per dtype) are kept for the next sync.
    """

    def __init__(self, group: SyncGroup, specs: Sequence[TensorSpec], layout: Sequence[Bucket]):
        self.group, self.specs = group, list(specs)
        index = {s.name: i for i, s in enumerate(self.specs)}
        self.pieces: list[list[tuple[Bucket, Piece]]] = [[] for _ in self.specs]  # per tensor, in packing order
        for bucket in layout:
            for piece in bucket.pieces:
                self.pieces[index[piece.name]].append((bucket, piece))
        self.buffer_numel: dict[torch.dtype, int] = {}
        for bucket in layout:
            self.buffer_numel[bucket.dtype] = max(self.buffer_numel.get(bucket.dtype, 0), bucket.numel)
        self.buffers: dict[torch.dtype, torch.Tensor] = {}
        self.next = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._expect(name, tensor)
        flat = tensor.detach().reshape(-1)
        for bucket, piece in self.pieces[self.next]:
            buffer = self._buffer(spec.dtype)
            buffer[piece.offset : piece.offset + piece.numel].copy_(flat[piece.start : piece.start + piece.numel])
            if piece.offset + piece.numel == bucket.numel:  # its last piece
                self.group.broadcast(buffer[: bucket.numel])
        self.next += 1

    def finish(self) -> None:
        if self.next != len(self.specs):
            raise ValueError(f"weight sync: {len(self.specs) - self.next} tensors not sent, "
                             f"the first {self.specs[self.next].name!r}")
        self.next = 0

    def _expect(self, name: str, tensor: torch.Tensor) -> TensorSpec:
        if self.next >= len(self.specs):
            raise ValueError(f"weight sync: {name!r} is past the end of the layout")
        spec = self.specs[self.next]
        if name != spec.name or tuple(tensor.shape) != spec.shape:
            raise ValueError(f"weight sync: got {name!r} {tuple(tensor.shape)}, the layout expects "
                             f"{spec.name!r} {spec.shape} next (same parameters, same order on both sides)")
        return spec

    def _buffer(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.buffers:
            self.buffers[dtype] = torch.empty(self.buffer_numel[dtype], dtype=dtype, device=self.group.device)
        return self.buffers[dtype]


class BucketReceiver:
    """A rollout worker: receives a whole sync into staging; ``apply`` then copies it into the model."""

    def __init__(self, group: SyncGroup, layout: Sequence[Bucket]):
        self.group, self.layout = group, list(layout)
        self.staging = [torch.empty(b.numel, dtype=b.dtype, device=group.device) for b in self.layout]
        # On a GPU the broadcasts run on a stream of their own so the sampler's kernels never queue behind them.
        self.stream = torch.cuda.Stream(group.device) if group.device.type == "cuda" else None

    def receive(self) -> None:
        with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            for buffer in self.staging:
                self.group.broadcast(buffer)
        if self.stream:
            self.stream.synchronize()

    def apply(self, params: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for bucket, buffer in zip(self.layout, self.staging):
                for p in bucket.pieces:
                    params[p.name].view(-1)[p.start : p.start + p.numel].copy_(buffer[p.offset : p.offset + p.numel])
        if self.stream:
            torch.cuda.synchronize(self.group.device)  # staging is free again only once the copies are done


# -- the learner's side ----------------------------------------------------------------------------
class WeightBroadcaster:
    """Every learner rank builds one and calls ``publish`` (a sharded learner's gathers are collectives of
    every rank); only the rank that called ``connect`` (rank 0) sends. With nccl, ``connect`` uses the current
    CUDA device: set it first (torch.cuda.set_device(ray.train.torch.get_device()))."""

    def __init__(self, bucket_bytes: int, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.workers: list = []
        self.sender: BucketSender | None = None

    def connect(self, workers: Sequence, host: str | None = None) -> None:
        """Form the group with ``workers`` (actors with join_weight_sync / receive_weights); waits for all."""
        import ray

        host = host or ray.util.get_node_ip_address()
        world = len(workers) + 1
        store = open_store(host, 0, 0, world, self.timeout_s)
        joins = [w.join_weight_sync.remote(host, store.port, i + 1, world, self.backend, self.bucket_bytes,
                                           self.timeout_s) for i, w in enumerate(workers)]
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else None
        pool = ThreadPoolExecutor(1)
        forming = pool.submit(SyncGroup, store, 0, world, self.backend, device, self.timeout_s)
        try:
            specs = ray.get(joins)  # a worker that cannot join fails here at once, not after the group's timeout
        finally:
            pool.shutdown(wait=False)
        group = forming.result()
        if any(s != specs[0] for s in specs):
            raise ValueError("weight sync: the rollout workers hold different parameter lists")
        self.workers = list(workers)
        self.sender = BucketSender(group, specs[0], bucket_layout(specs[0], self.bucket_bytes))

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream ``(name, full tensor)`` in the workers' parameter order; returns once every worker holds
        the new weights in staging. Ranks that did not connect only run the iterator."""
        import ray

        if self.sender is None:
            for _ in named_tensors:
                pass
            return
        acks = [w.receive_weights.remote(version) for w in self.workers]  # one control message per worker
        for name, tensor in named_tensors:
            self.sender.add(name, tensor)
        self.sender.finish()
        ray.get(acks)
