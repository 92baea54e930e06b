"""Shared machinery of the diffusers policy adapters (FLUX, SD3).

- ``DiffusersPolicy``: the base of FluxPolicy and SD3Policy. The trained transformer is the only
  registered submodule, so ``named_parameters``/``state_dict``/DDP see just it; the frozen parts (VAE,
  text encoders) live beside it and still follow ``.to(device)``.
- Precision: the model runs in ``ModelConfig.dtype`` (bf16 for FLUX); velocities come back float32, so
  the step math in egrpo_ray.algo stays float32. LoRA weights are kept in float32 (peft casts the
  activations), so small learning rates are not rounded away. A full fine-tune keeps the transformer
  in the model dtype by default (memory); pass ``trainable_dtype=torch.float32`` to the constructor to
  keep float32 master weights and run the forward under autocast instead.
- LoRA: peft adapters injected through diffusers' ``add_adapter``; egrpo_ray.checkpoint saves them with
  the pipelines' ``save_lora_weights`` (peft state dict + adapter metadata, so rank/alpha survive), which
  is exactly what ``FluxPipeline.load_lora_weights`` / ``StableDiffusion3Pipeline.load_lora_weights`` read.
- ``PromptCache``: text embeddings cached per prompt string (text encoders run once per prompt).
"""
from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from egrpo_ray.config import LoraConfig, ModelConfig
from egrpo_ray.algo.sampler import Conditioning
from egrpo_ray.models.base import Policy

TRAINABLE_FILE = "trainable_state.safetensors"
POLICY_META_FILE = "egrpo_policy.json"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def check_model_path(path: Optional[str], kind: str) -> str:
    """A local directory in diffusers layout, or a hub id passed through to from_pretrained."""
    if not path:
        raise ValueError(f"model.path is required for model.kind '{kind}'")
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "transformer").is_dir():
            raise FileNotFoundError(f"model.path {p}: not a diffusers model directory (no transformer/ subfolder)")
        return str(p)
    if path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model.path {path}: no such directory")
    return path  # a hub id such as black-forest-labs/FLUX.1-dev (needs a hub or its local cache)


def has_subfolder(path: str, name: str) -> bool:
    """Whether a component exists (local directories only; a hub id is assumed complete)."""
    p = Path(path).expanduser()
    return (p / name).is_dir() if p.exists() else True


# ----------------------------------------------------------------------------------------- prompts


class PromptCache:
    """Per-prompt cache of text conditioning.

    ``encode_fn(prompts) -> dict[name, Tensor[B, ...]]`` runs only for prompts not seen yet (in chunks);
    rows are stored per prompt and stacked on request. Bounded (least recently used evicted).
    """

    def __init__(self, encode_fn: Callable[[list[str]], Conditioning], max_items: int = 8192, chunk: int = 16):
        self.encode_fn, self.max_items, self.chunk = encode_fn, max_items, chunk
        self._rows: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def put(self, prompts: Sequence[str], cond: Conditioning) -> None:
        """Insert precomputed conditioning rows (e.g. embeddings computed elsewhere)."""
        for j, prompt in enumerate(prompts):
            self._rows[prompt] = {k: v[j].detach() for k, v in cond.items()}

    def __call__(self, prompts: Sequence[str], device: torch.device | None = None) -> Conditioning:
        if len(prompts) == 0:
            raise ValueError("encode_prompts: no prompts")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        for a in range(0, len(missing), self.chunk):
            part = missing[a : a + self.chunk]
            with torch.no_grad():
                out = self.encode_fn(part)
            self.misses += len(part)
            for j, prompt in enumerate(part):
                self._rows[prompt] = {k: v[j].detach() for k, v in out.items()}
        rows = []
        for p in prompts:
            self._rows.move_to_end(p)
            rows.append(self._rows[p])
        result = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        while len(self._rows) > self.max_items:
            self._rows.popitem(last=False)
        if device is not None:
            result = {k: v.to(device) for k, v in result.items()}
        return result


def tokenizer_limit(tokenizer, default: int) -> int:
    """The sequence length a pipeline would use: its default, capped by the tokenizer's own limit."""
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < default:
        return limit
    return default


# -------------------------------------------------------------------------------------------- LoRA


def lora_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        init_lora_weights=True,  # A kaiming, B zero: the adapted model starts equal to the base model
    )


def add_lora(model: nn.Module, cfg: LoraConfig, param_dtype: torch.dtype = torch.float32) -> None:
    """Freeze ``model`` and inject a trainable peft LoRA adapter ("default") into it."""
    model.requires_grad_(False)
    try:
        model.add_adapter(lora_config(cfg))
    except ValueError as err:  # peft: none of the target modules found
        raise ValueError(f"model.lora.target_modules {list(cfg.target_modules)}: {err}") from None
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data = p.data.to(param_dtype)
            p.requires_grad_(True)


# -------------------------------------------------------------------------------------- safetensors


def save_state(state: dict[str, torch.Tensor], directory: str | Path, name: str = TRAINABLE_FILE) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))
    return path


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A trainable-state safetensors file, or a directory holding one (``trainable_state.safetensors``,
    else its only ``*.safetensors`` file)."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.is_dir():
        if (p / TRAINABLE_FILE).is_file():
            p = p / TRAINABLE_FILE
        else:
            files = sorted(p.glob("*.safetensors"))
            if len(files) != 1:
                raise FileNotFoundError(
                    f"{path}: expected {TRAINABLE_FILE} or exactly one .safetensors file, found {len(files)}"
                )
            p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    from safetensors import SafetensorError

    try:
        return load_file(str(p))
    except (SafetensorError, OSError) as err:  # truncated, corrupt, not safetensors
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{p}: not a readable safetensors file ({first})") from None


# ------------------------------------------------------------------------------------------ policy


class DiffusersPolicy(Policy):
    """Common parts of the FLUX and SD3 adapters. Subclasses set ``pipeline_cls`` and implement
    ``_encode`` (uncached text encoding), ``forward`` and ``decode``."""

    pipeline_cls = None  # FluxPipeline / StableDiffusion3Pipeline: LoRA save/load format

    def __init__(
        self,
        transformer: nn.Module,
        frozen: dict[str, nn.Module],
        cfg: ModelConfig,
        trainable_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.dtype = torch_dtype(cfg.dtype)  # compute dtype
        self.lora_enabled = cfg.lora.enabled
        self.transformer = transformer
        # Frozen components are not submodules: they stay out of named_parameters, state_dict and
        # DDP, but _apply moves them with the policy.
        self.__dict__["_frozen"] = dict(frozen)
        for m in self._frozen.values():
            if m is not None:
                m.requires_grad_(False)
                m.eval()
        if self.lora_enabled:
            add_lora(self.transformer, cfg.lora, trainable_dtype or torch.float32)
        else:
            self.transformer.requires_grad_(True)
            if trainable_dtype is not None and trainable_dtype != self.dtype:
                self.transformer.to(trainable_dtype)
        self.autocast = (not self.lora_enabled) and trainable_dtype is not None and trainable_dtype != self.dtype
        if cfg.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.cache = PromptCache(self._encode)
        self.eval()  # sampling must be deterministic given the noise (LoRA dropout only in train())

    # -- device handling -----------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for m in self._frozen.values():
            if m is not None:
                m._apply(fn, recurse)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self._frozen.values():
            if m is not None:
                m.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def shared_with_reference(self) -> list[object]:
        # text encoders and VAE are frozen already: a KL reference copies only the transformer
        return [*super().shared_with_reference(), *(m for m in self._frozen.values() if m is not None), self.cache]

    def frozen_module(self, name: str) -> nn.Module:
        return self._frozen[name]

    def _autocast(self):
        if self.autocast:
            return torch.autocast(device_type=self.device.type, dtype=self.dtype)
        return contextlib.nullcontext()

    # -- prompts -------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        return self.cache(list(prompts), self.device)

    # -- trainable state -----------------------------------------------------------------------
    def _trainable_named(self) -> Iterable[tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if self.lora_enabled and ".lora_" not in name:
                continue
            if p.requires_grad:
                yield name, p

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the LoRA weights when LoRA is on; else every trainable transformer weight."""
        return {k: v.detach() for k, v in self._trainable_named()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        unknown = [k for k in state if k not in params]
        if unknown:
            raise KeyError(f"load_trainable_state: {len(unknown)} unknown keys, e.g. {unknown[0]!r}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v.to(device=params[k].device, dtype=params[k].dtype))

    def save_trainable(self, directory: str | Path) -> Path:
        """trainable_state() as safetensors (``trainable_state.safetensors``) plus a small description."""
        path = save_state(self.trainable_state(), directory)
        meta = {"kind": self.cfg.kind, "lora": self.lora_enabled, "dtype": self.cfg.dtype, "base": self.cfg.path}
        (Path(directory) / POLICY_META_FILE).write_text(json.dumps(meta, indent=1))
        return path

    def load_trainable(self, directory: str | Path) -> None:
        self.load_trainable_state(load_state_file(directory))
