"""Learner checkpoints and the exports users load, for any number of ranks (no Ray).

``checkpoints/step_<N>/``:
- ``state/``: the trainable weights and the AdamW state, written by ``torch.distributed.checkpoint``
  (each rank writes its shards; a resume on another rank count, DDP or FSDP, reshards on load).
- ``lora/pytorch_lora_weights.safetensors`` (LoRA runs): what diffusers' ``load_lora_weights`` reads.
- ``transformer/`` (full fine-tunes): a consolidated transformer in the model dtype (bf16 for FLUX) that
  ``FluxTransformer2DModel.from_pretrained`` / ``SD3Transformer2DModel.from_pretrained`` load.
- ``meta.json``: step, policy version, ranks and the data cursor.
Each checkpoint is written under a temporary name and renamed when complete, so a crash never leaves
a half-written ``step_<N>``. Nothing here unpickles: DCP reads tensors, the exports are safetensors.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from egrpo_ray.parallel import full_trainable_state

STATE_DIR, LORA_DIR, TRANSFORMER_DIR, META_FILE = "state", "lora", "transformer", "meta.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default weight name
TRANSFORMER_PREFIX = "transformer."


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA run's base, text encoders) are not training state; dcp.load still fails on
    # any trainable weight missing from the checkpoint, so non-strict only tolerates the frozen ones.
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _training_state(policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optim = get_state_dict(policy, optimizer, options=_state_options())
    return {"model": model, "optim": optim}


def save_checkpoint(root: str | Path, step: int, policy: nn.Module, optimizer: torch.optim.Optimizer,
                    meta: Mapping[str, Any], lora: bool, export_dtype: torch.dtype) -> Path:
    """Write ``root/checkpoints/step_<N>`` (a collective: every rank calls it). Returns its path."""
    import torch.distributed.checkpoint as dcp

    final = Path(root) / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(f".tmp_{final.name}")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_training_state(policy, optimizer), checkpoint_id=str(tmp / STATE_DIR))
    export_weights(policy, tmp, lora, export_dtype)
    if _rank() == 0:
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    _barrier()
    return final


def load_training_state(checkpoint: str | Path, policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights and optimizer state into an already wrapped/sharded policy; returns meta.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    checkpoint = Path(checkpoint)
    state = _training_state(policy, optimizer)
    dcp.load(state, checkpoint_id=str(checkpoint / STATE_DIR))
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options())
    return read_meta(checkpoint)


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / META_FILE).read_text())


def latest_checkpoint(directory: str | Path) -> Path | None:
    root = Path(directory) / "checkpoints"
    found = sorted(p for p in root.glob("step_*") if (p / META_FILE).exists()) if root.exists() else []
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------- exports


def _pipeline_cls(policy: nn.Module):
    """The diffusers pipeline whose LoRA format fits this policy (the tiny model is FLUX-architecture)."""
    cls = getattr(policy, "pipeline_cls", None)
    if cls is None:
        from diffusers import FluxPipeline

        cls = FluxPipeline
    return cls


def export_weights(policy: nn.Module, directory: str | Path, lora: bool, dtype: torch.dtype) -> None:
    """Write the LoRA adapter (float32, as trained) or the consolidated transformer in ``dtype`` (the
    model dtype) into ``directory``. A collective under FSDP: every rank gathers, rank 0 writes."""
    state = full_trainable_state(policy, None if lora else dtype)
    if _rank() != 0:
        return
    if lora:
        _write_lora(policy, state, Path(directory) / LORA_DIR)
    else:
        _write_transformer(policy, state, Path(directory) / TRANSFORMER_DIR)


def _write_lora(policy: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    # policy names "transformer.<module>.lora_A.default.weight" -> peft's "<module>.lora_A.weight"
    layers = {k.removeprefix(TRANSFORMER_PREFIX).replace(".default.", "."): v.contiguous() for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    _pipeline_cls(policy).save_lora_weights(
        directory, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=policy.transformer.peft_config["default"].to_dict(), safe_serialization=True,
    )


def _write_transformer(policy: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    weights = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
    directory.mkdir(parents=True, exist_ok=True)
    policy.transformer.save_config(directory)
    save_torch_state_dict(weights, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB")


def has_export(checkpoint: str | Path) -> bool:
    checkpoint = Path(checkpoint)
    return (checkpoint / LORA_DIR / LORA_FILE).is_file() or any((checkpoint / TRANSFORMER_DIR).glob("*.safetensors"))


def load_export(policy: nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's export (LoRA adapter or transformer) into a plain, unsharded policy."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if (checkpoint / LORA_DIR / LORA_FILE).is_file():
        from peft.utils import set_peft_model_state_dict

        state = load_file(str(checkpoint / LORA_DIR / LORA_FILE))
        result = set_peft_model_state_dict(policy.transformer, {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items()})
        if getattr(result, "unexpected_keys", None):
            raise KeyError(f"{checkpoint}: LoRA keys not in this model, e.g. {result.unexpected_keys[0]!r}")
        return
    files = sorted((checkpoint / TRANSFORMER_DIR).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint}: neither {LORA_DIR}/{LORA_FILE} nor {TRANSFORMER_DIR}/*.safetensors")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    params = dict(policy.transformer.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))
