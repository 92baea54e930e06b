"""Data parallelism for the learner, in plain torch.distributed (no Ray): DDP or FSDP2.

- ``ddp``: every rank holds the whole policy, its gradients and the optimizer state (LoRA, small models).
- ``fsdp``: FSDP2 (``fully_shard``) per transformer block, then the transformer: each rank keeps 1/world of
  every trainable weight in float32 (the master copy), of its gradient and of both AdamW moments; a
  block's weights are all-gathered in the compute dtype just for its forward and backward. Frozen parts
  (text encoders, VAE) stay replicated: the learner only encodes prompts with them.

Both need an initialised default process group when world > 1 (Ray Train's); FSDP needs one always.
Gathering full weights (``gather_trainable``) is a collective: every rank must run it, in the same order.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def transformer_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one (FLUX: double and single blocks; SD3: joint blocks)."""
    blocks = [*getattr(transformer, "transformer_blocks", []), *getattr(transformer, "single_transformer_blocks", [])]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__}: no transformer_blocks to shard")
    return blocks


def _trainable_to_float32(module: nn.Module) -> None:
    """The sharded trainable weights are the float32 master copy (bf16 would round away lr-2e-6 steps)."""
    for p in module.parameters(recurse=False):
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    from torch.distributed.fsdp import FSDPModule

    for child in module.children():
        if not isinstance(child, FSDPModule):  # already sharded: its weights are float32 DTensors
            _trainable_to_float32(child)


def shard_policy(policy: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """FSDP2 on ``policy.transformer`` in place: blocks first, then the rest of the transformer.

    Each block is cast (trainable weights to float32) just before it is sharded, so a rank never holds
    a full float32 copy of the model. Parameters move to ``device`` shard by shard.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (_world(),))
    # The root casts the transformer's inputs to the compute dtype; blocks take their inputs as the root
    # hands them over (the rotary embedding stays float32, as in an unsharded bf16 model). Casting there
    # too breaks gradient checkpointing: the recomputed forward would see uncast inputs.
    root_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    block_mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    transformer = policy.transformer
    for block in transformer_blocks(transformer):
        _trainable_to_float32(block)
        fully_shard(block, mesh=mesh, mp_policy=block_mp)
    _trainable_to_float32(transformer)
    fully_shard(transformer, mesh=mesh, mp_policy=root_mp)
    policy.to(device)  # frozen parts and buffers outside the transformer


def prepare_for_training(policy: nn.Module, parallelism: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Wrap (DDP) or shard (FSDP) the policy; returns the callable the update runs through."""
    if parallelism == "fsdp":
        shard_policy(policy, compute_dtype, device)
        return policy
    policy.to(device)
    if _world() == 1:
        return policy
    return nn.parallel.DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def prepare_reference(reference: nn.Module, parallelism: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Place a frozen KL reference copy like the policy: sharded per block under FSDP (each rank holds
    1/world of it; its forwards are collectives, run by every rank with the policy's), else whole on the
    device (no DDP wrapper: it has no gradients to reduce)."""
    if parallelism == "fsdp":
        # Stored in the compute dtype: FSDP casts the policy's float32 masters to it for every forward,
        # so the reference computes the same numbers at half the memory of a float32 copy.
        reference.transformer.to(compute_dtype)
        shard_policy(reference, compute_dtype, device)
    else:
        reference.to(device)
    return reference


def trainable_named(policy: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of the trainable weights, in a fixed order (the same on every rank)."""
    names = set(policy.trainable_state())
    return [(n, p) for n, p in policy.named_parameters() if n in names]


def gather_trainable(policy: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full tensor) of every trainable weight, one at a time (a sharded weight is
    all-gathered: every rank must drain the iterator). ``dtype`` casts each as it is gathered."""
    from torch.distributed.tensor import DTensor

    for name, p in trainable_named(policy):
        t = p.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        yield name, (t if dtype is None else t.to(dtype))


def full_trainable_state(policy: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable weight, whole (a collective under FSDP: call it on every rank)."""
    return {name: t.to("cpu", copy=True) for name, t in gather_trainable(policy, dtype)}


def is_sharded(policy: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in policy.parameters())
