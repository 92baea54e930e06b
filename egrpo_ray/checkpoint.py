"""Learner checkpoints and the exports users load, for any number of ranks (no Ray).

``checkpoints/step_<N>/``:
- ``state/``: the trainable weights and the AdamW state, written by ``torch.distributed.checkpoint``
  (each rank writes its shards; a resume on another rank count, DDP or FSDP, reshards on load).
- ``lora/pytorch_lora_weights.safetensors`` (LoRA runs): what diffusers' ``load_lora_weights`` reads.
- ``transformer/`` (full fine-tunes): a consolidated transformer in the model dtype (bf16 for FLUX) that
  ``FluxTransformer2DModel.from_pretrained`` / ``SD3Transformer2DModel.from_pretrained`` load.
- ``meta.json``: step, policy version, ranks and the data cursor.
- ``rng/rank_<r>.safetensors``: each rank's torch RNG states (a resume restores each rank's own).
Each checkpoint is written under a temporary name and renamed when complete, so a crash never leaves
a half-written ``step_<N>``. Loading never runs code from the checkpoint: DCP's ``.metadata`` pickle is read by
an unpickler that knows only DCP's own metadata classes, its non-tensor entries (the optimizer's step counts
and param groups) with ``torch.load(weights_only=True)``, and the exports are safetensors.
"""
from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from egrpo_ray.config import ConfigError
from egrpo_ray.parallel import full_trainable_state

STATE_DIR, LORA_DIR, TRANSFORMER_DIR, META_FILE = "state", "lora", "transformer", "meta.json"
RNG_DIR = "rng"  # one safetensors file of RNG states per rank
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


# Every global a DCP .metadata pickle of this project's checkpoints refers to (torch 2.14), plus torch's dtypes.
_METADATA_GLOBALS = {
    ("pathlib", "PosixPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "BytesStorageMetadata", "ChunkStorageMetadata", "Metadata", "MetadataIndex", "StorageMeta",
        "TensorProperties", "TensorStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which DCP's metadata never holds")


def _safe_dcp_load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load`` that runs no code from the files (see the module docstring)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except pickle.UnpicklingError as err:
                    raise ConfigError(f"{path}: refusing to load this checkpoint's metadata: {err}") from None
            metadata.storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    reader = Reader(str(path))
    reader.read_metadata()  # a refusal surfaces here as one line; inside dcp.load it is wrapped in DCP's own error
    dcp.load(state, storage_reader=reader, planner=Planner())


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
    save_rng_state(tmp)
    export_weights(policy, tmp, lora, export_dtype)
    _barrier()  # every rank's files are in tmp before it is renamed
    if _rank() == 0:
        (tmp / META_FILE).write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    _barrier()
    return final


def load_training_state(checkpoint: str | Path, policy: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load weights and optimizer state into an already wrapped/sharded policy; returns meta.json."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    checkpoint = Path(checkpoint)
    state = _training_state(policy, optimizer)
    _safe_dcp_load(state, checkpoint / STATE_DIR)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_state_options())
    load_rng_state(checkpoint)
    return read_meta(checkpoint)


def _rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / RNG_DIR / f"rank_{rank:05d}.safetensors"


def save_rng_state(checkpoint: str | Path) -> None:
    """This rank's torch RNG states (CPU, and every CUDA device's when CUDA is in use) as safetensors
    ``rng/rank_<r>.safetensors``: each rank writes its own, so a resume continues every rank's stream."""
    from safetensors.torch import save_file

    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    path = _rng_file(Path(checkpoint), _rank())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def load_rng_state(checkpoint: str | Path) -> bool:
    """Restore this rank's RNG states from ``rng/rank_<r>.safetensors``; False when the checkpoint has
    none for this rank (written on fewer ranks, or before RNG states were saved): the seeded state stays."""
    path = _rng_file(Path(checkpoint), _rank())
    if not path.is_file():
        return False
    state = _load_safetensors(path)
    torch.set_rng_state(state["cpu"])
    cuda = [state[f"cuda_{i}"] for i in range(len(state) - 1) if f"cuda_{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    return True


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from or loaded; str(error) is one line naming the file."""


META_KEYS = {"step": int, "policy_version": int}  # what a resume reads (plus the optional data cursor)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint, validated: a JSON object with integer ``step`` and ``policy_version``
    (>= 0; ``step`` matches the directory's step_<N>) and, if present, a ``prompt_batches_by_worker``
    mapping of worker index -> integer count. Raises CheckpointError (one line)."""
    path = Path(checkpoint) / META_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (an incomplete checkpoint)") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {err.start}); corrupt checkpoint metadata") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON (line {err.lineno}: {err.msg}); corrupt checkpoint metadata") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply; corrupt checkpoint metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in META_KEYS.items():
        if key not in meta:
            raise CheckpointError(f"{path}: no {key!r} (an incomplete checkpoint)")
        value = meta[key]
        if isinstance(value, bool) or not isinstance(value, kind) or value < 0:
            raise CheckpointError(f"{path}: {key!r} must be a non-negative integer, got {value!r}")
    m = _STEP_DIR.match(Path(checkpoint).name)
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"{path}: 'step' is {meta['step']} but the directory is {Path(checkpoint).name}")
    cursor = meta.get("prompt_batches_by_worker", {})
    if not isinstance(cursor, dict) or not all(
        isinstance(k, str) and k.isdigit() and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in cursor.items()
    ):
        raise CheckpointError(f"{path}: 'prompt_batches_by_worker' must map worker indices to non-negative integers")
    return meta


def check_training_state(checkpoint: str | Path) -> None:
    """The DCP files a resume reads exist and are not empty (their content is read by the learner)."""
    state = Path(checkpoint) / STATE_DIR
    if not state.is_dir():
        raise CheckpointError(f"{state}: missing (an incomplete checkpoint)")
    meta = state / ".metadata"
    if not meta.is_file() or meta.stat().st_size == 0:
        raise CheckpointError(f"{meta}: missing or empty (an incomplete checkpoint)")
    if not any(f.is_file() and f.stat().st_size > 0 for f in state.glob("*.distcp")):
        raise CheckpointError(f"{state}: no *.distcp data files (an incomplete checkpoint)")


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The complete checkpoint (``step_<N>`` with a meta.json) with the highest N, or None; temporary
    ``.tmp_step_<N>`` directories of an interrupted save are ignored."""
    root = Path(directory) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and p.is_dir() and (p / META_FILE).exists()]
    return max(found)[1] if found else None



def prune_checkpoints(directory: str | Path, keep_last: int | None, metric: str = "reward_mean") -> list[Path]:
    """Delete the checkpoints under ``directory/checkpoints`` except the last ``keep_last`` and the best
    (highest ``metric`` in meta.json). ``keep_last=None`` keeps all. Returns the deleted paths.
    Call it on one process only (rank 0), after a checkpoint is complete."""
    root = Path(directory) / "checkpoints"
    found = sorted((p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / META_FILE).exists()),
                   key=lambda p: int(p.name[5:])) if root.exists() else []
    if keep_last is None or len(found) <= keep_last:
        return []
    scores = {}
    for p in found:
        try:
            value = json.loads((p / META_FILE).read_text()).get(metric)
        except (OSError, ValueError):
            continue
        if isinstance(value, (int, float)):
            scores[p] = float(value)
    keep = set(found[-keep_last:])
    if scores:
        keep.add(max(scores, key=lambda p: (scores[p], p.name)))  # ties: the later step
    deleted = [p for p in found if p not in keep]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    return deleted

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


def save_lora(policy: nn.Module, directory: str | Path) -> Path:
    """An unsharded policy's LoRA adapter in diffusers' format, as training exports it:
    ``directory/pytorch_lora_weights.safetensors``, what ``load_lora_weights`` and ``load_lora`` read."""
    if not getattr(policy.transformer, "peft_config", None):
        raise ValueError("save_lora: the model has no LoRA adapter (model.lora.enabled)")
    _write_lora(policy, full_trainable_state(policy), Path(directory))
    return Path(directory) / LORA_FILE


def _write_lora(policy: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    # policy names "transformer.<module>.lora_A.default.weight" -> peft's "<module>.lora_A.weight"
    layers = {k.removeprefix(TRANSFORMER_PREFIX).replace(".default.", "."): v.contiguous() for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    _pipeline_cls(policy).save_lora_weights(
        directory, transformer_lora_layers=layers,
        transformer_lora_adapter_metadata=policy.transformer.peft_config["default"].to_dict(), safe_serialization=True,
    )


def _write_transformer(policy: nn.Module, state: dict[str, torch.Tensor], directory: Path) -> None:
    import logging

    from huggingface_hub import save_torch_state_dict
    from huggingface_hub.serialization import _torch as hub_torch

    # its logger (named after its file, so outside the hub's quiet logger tree) prints an INFO line per save
    hub_torch.logger.setLevel(logging.WARNING)

    weights = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
    directory.mkdir(parents=True, exist_ok=True)
    policy.transformer.save_config(directory)
    save_torch_state_dict(weights, directory, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size="10GB")


def check_safetensors(path: str | Path) -> dict[str, Any]:
    """Parse a .safetensors file's header without reading the tensors and check that every tensor's
    bytes lie inside the file (a truncated or corrupt file fails here). Returns the header.
    Raises CheckpointError (one line)."""
    import struct

    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of {n} bytes in a "
                                      f"{size}-byte file)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: corrupt safetensors file (tensor {name!r} has no valid data_offsets)")
        end = max(end, offsets[1])
    if end > data:
        raise CheckpointError(f"{path}: truncated safetensors file (tensors need {end} data bytes, the file has {data})")
    return header


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def has_export(checkpoint: str | Path) -> bool:
    checkpoint = Path(checkpoint)
    return (checkpoint / LORA_DIR / LORA_FILE).is_file() or any((checkpoint / TRANSFORMER_DIR).glob("*.safetensors"))


def check_export(checkpoint: str | Path) -> None:
    """The export ``load_export`` would read exists and its safetensors files are complete (headers
    only: no tensors are read). Raises CheckpointError (one line)."""
    checkpoint = Path(checkpoint)
    lora = checkpoint / LORA_DIR / LORA_FILE
    if lora.is_file():
        check_safetensors(lora)
        return
    files = sorted((checkpoint / TRANSFORMER_DIR).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{checkpoint}: neither {LORA_DIR}/{LORA_FILE} nor {TRANSFORMER_DIR}/*.safetensors")
    for f in files:
        check_safetensors(f)


def load_export(policy: nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint's export (LoRA adapter or transformer) into a plain, unsharded policy.
    A missing, truncated or mismatched export raises CheckpointError (one line)."""
    checkpoint = Path(checkpoint)
    check_export(checkpoint)
    if (checkpoint / LORA_DIR / LORA_FILE).is_file():
        load_lora(policy, checkpoint / LORA_DIR)
        return
    files = sorted((checkpoint / TRANSFORMER_DIR).glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(_load_safetensors(f))
    params = dict(policy.transformer.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        hint = " (a full fine-tune's export: load it with model.lora.enabled=false)" if getattr(
            policy.transformer, "peft_config", None) else ""
        raise CheckpointError(f"{checkpoint}: {len(unknown)} transformer weights not in this model, e.g. "
                              f"{unknown[0]!r}{hint}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(params[k].shape):
            raise CheckpointError(f"{checkpoint}: {k!r} has shape {tuple(v.shape)}, the model has {tuple(params[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


def check_lora(directory: str | Path) -> None:
    """``directory`` holds a complete LoRA file (headers only: no tensors are read). Raises CheckpointError."""
    path = Path(directory) / LORA_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {LORA_FILE} (a LoRA run writes it to <output_dir>/lora)")
    check_safetensors(path)


def load_lora(policy: nn.Module, directory: str | Path) -> None:
    """A diffusers-format LoRA (``directory/pytorch_lora_weights.safetensors``, as training exports it) into
    the policy's transformer. With LoRA enabled (model.lora.enabled) the weights go into its adapter, whose
    shapes must match; otherwise a new adapter is built from the file (its metadata keeps rank and alpha),
    frozen, for inference. Any model kind with a diffusers transformer, the tiny one included. A missing,
    corrupt or mismatched file raises CheckpointError (one line)."""
    from peft.utils import set_peft_model_state_dict

    directory = Path(directory)
    check_lora(directory)
    transformer, was_training = policy.transformer, policy.transformer.training
    try:
        # the pipeline's reader, as its load_lora_weights uses it (it converts other trainers' formats too);
        # Flux answers (state, alphas, metadata), SD3 (state, metadata)
        state, *_, metadata = _pipeline_cls(policy).lora_state_dict(str(directory), return_lora_metadata=True)
        state = {k: v for k, v in state.items() if k.startswith(TRANSFORMER_PREFIX)}
        if not state:
            raise CheckpointError(f"{directory}: no transformer LoRA weights in {LORA_FILE}")
        if getattr(transformer, "peft_config", None):
            result = set_peft_model_state_dict(transformer, {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in state.items()})
            if getattr(result, "unexpected_keys", None):
                raise CheckpointError(f"{directory}: LoRA keys not in this model, e.g. {result.unexpected_keys[0]!r}")
            return
        transformer.load_lora_adapter(state, prefix="transformer", adapter_name="default", metadata=metadata or None)
    except CheckpointError:
        raise
    except (KeyError, RuntimeError, ValueError) as err:  # shapes or modules of another rank or model
        raise CheckpointError(f"{directory}: LoRA weights do not fit this model ({_first_line(err)})") from None
    transformer.requires_grad_(False)
    transformer.to(next(transformer.parameters()).device)
    transformer.train(was_training)  # the new adapter's modules (LoRA dropout) take the model's mode


def export_final_lora(checkpoint: str | Path, output_dir: str | Path) -> Path | None:
    """Copy a checkpoint's LoRA export to ``<output_dir>/lora`` (what ``egrpo-ray eval --lora`` and diffusers'
    ``load_lora_weights`` read), replacing an older copy whole; None when the checkpoint has no LoRA export."""
    source = Path(checkpoint) / LORA_DIR
    if not (source / LORA_FILE).is_file():
        return None
    target = Path(output_dir) / LORA_DIR
    tmp = target.with_name(LORA_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def _first_line(err: BaseException) -> str:
    """The error's first line; where that only introduces a list ("Error(s) in loading state_dict ...:"),
    the list's first entry."""
    lines = [l.strip() for l in str(err).splitlines() if l.strip()]
    if not lines:
        return type(err).__name__
    return lines[1] if lines[0].endswith(":") and len(lines) > 1 else lines[0]
