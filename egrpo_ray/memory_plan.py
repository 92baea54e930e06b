"""GPU memory per role (rollout, learner, each reward), counted without loading a single weight.

``plan_memory(cfg)`` answers "does this config fit on N GPUs of M GiB?" before anything starts. No Ray.

How the numbers are made
------------------------
Parameters are COUNTED, not guessed: the policy's modules are instantiated on the meta device from their
configs (diffusers ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` / ``AutoencoderKL`` and transformers
CLIP / T5 from the ``config.json`` in each subfolder of ``model.path``; the tiny model from its manifest), with
exactly the dtypes and trainable flags the loaders give them (models/tiny.py, models/diffusers_common.py),
and LoRA is injected with the same peft call the policies use. When ``model.path`` is not a local directory
(a placeholder like ``/models/FLUX.1-dev``, or a hub id) the published FLUX.1-dev / SD3.5-large configs below
stand in, and the plan says so.

Per learner rank (``learner.parallelism``, world = ``learner.workers``):
- ddp: every weight, gradient and AdamW moment whole. Weights keep their loaded dtypes; a full fine-tune with
  ``master_dtype: float32`` keeps the transformer in float32 (the "master" column) and runs it under autocast,
  which holds a compute-dtype copy of every trainable weight during forward and backward ("autocast copy").
  With world > 1, DDP's gradient buckets are a second copy of the gradients.
- fsdp (egrpo_ray/parallel.py): each transformer parameter is split on dim 0 into ``world`` chunks of
  ceil(dim0 / world) rows (the largest shard, rank 0's, is counted); trainable ones become float32 (the master
  copy when the compute dtype is lower), frozen ones keep their dtype, buffers and the frozen encoders / VAE
  stay whole. Gradients and both AdamW moments are float32 shards. Transients: the root's parameters and two
  blocks (the one running + the prefetched next one) unsharded in the compute dtype, plus the running block's
  gradients in the compute dtype and again in float32 for the reduce-scatter.
- ``learner.gradient_noise`` (on by default): one float32 copy of the gradients (a shard under FSDP), none
  with ``learner.gradient_noise_buffer: host`` (the copy lives in host memory; the plan notes its size).
- AdamW: two moments per trainable parameter in that parameter's dtype (its ``step`` counters are 0-dim CPU
  tensors, not counted). The foreach step allocates one more moment-sized temporary (sqrt of exp_avg_sq).

Activations (training, per learner forward of ``learner.minibatch_rows`` rows; SD3 with CFG doubles them):
    no checkpointing:  rows * T * H * (n_double * c_double + n_single * c_single + c_outer + w)
    checkpointing:     rows * T * H * (n_blocks * e + max(c_block) + c_outer + w)
where T = image + text tokens, H = hidden width, c_* = bytes one block saves for backward per token per hidden
unit (``ACTIVATION_BYTES``), e = the compute dtype's element size (a checkpointed block keeps only its input
hidden states), max(c_block) = the one block recomputed at a time during backward, c_outer = embedders, final
norm and projection, and w = the backward's own temporaries (``BACKWARD_WORKING_SET``). Everything scales with
T * H because attention runs in memory-efficient kernels (no T^2 matrix is kept). The constants are measured
with ``saved_activation_bytes`` (tensors saved for backward, each storage once, parameters left out) on random
FLUX and SD3 transformers of hidden 256 and 512 (per-token costs agree within 1%), and w as the allocator's peak
minus the saved bytes: on CPU (torch 2.14.1, diffusers 0.42.1; peak = glibc mallinfo2 sampled after every op)
and on one H100 (torch 2.11, max_memory_allocated). The two differ: CUDA's flash attention and fused norms save
less in pure 16-bit (FLUX double block 46.6 vs 59 bytes), and CUDA autocast runs LayerNorm in float32 (58.6),
so the tables are per device and regime; tests/test_memory_plan.py checks the CPU ones.

Inference (rollout sampling, held-out evaluation): peak live bytes of one no-grad forward, ``INFERENCE_BYTES``
per token per hidden unit per row, plus the VAE decode (``VAE_DECODE_BYTES_PER_PIXEL`` per output pixel per
image, 4 images per decode chunk as the policies decode), measured the same ways.

Rollout worker: its policy built without master weights (distributed/rollout.py), everything frozen in the model
dtype; with ``weight_sync: collective`` a staging copy of the trainable weights in that dtype; sampling runs all
branches of a batch's prompts in one forward (prompts_per_batch x merge-plan entries x G rows for E-GRPO), or
``rollout.max_batch_rows`` rows a forward where set.
Learner and rollout also keep every prompt's text embeddings on the GPU (PromptCache, up to 8192 prompts): the
plan counts the prompts a run reaches (train prompts seen, plus held-out and probe prompts on the learner).

Peak per GPU = persistent (weights, master, optimizer, staging / buckets / prompt cache) + the largest phase:
backward (activations + transients; gradients are freed by zero_grad(set_to_none) before each backward and
grow as activations are freed, so the larger end is counted), optimizer step (gradients + temporaries), or
held-out evaluation (rank 0: gradients + sampling + decode).

Checking on a GPU: build the measured model's parts with ``policy_parts(cfg.model, transformer_config=...,
with_frozen=False)`` and compare ``learner_memory(cfg, parts).step_peak`` (one training step: no prompt cache, no
held-out evaluation) with ``torch.cuda.max_memory_allocated()`` around a step; ``learner_activation_bytes``
gives the activation term alone.

GPU packing: a worker with num_gpus >= 1 gets ceil(num_gpus) GPUs of its own (its memory is counted on one of
them: the code uses one device per process); fractional workers are packed first-fit-decreasing by their GPU
fraction, as Ray places them (by resource, not by memory), and a shared GPU holds the sum of its workers.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from egrpo_ray.config import ConfigError, ExperimentConfig, ModelConfig, RewardConfig

GIB = 1024**3
DEFAULT_GPU_GIB = 80.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --------------------------------------------------------------------------------------- constants

# Published architectures, used when model.path is not a local directory.
FLUX_DEV = {
    "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56]},
    "vae": {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    # CLIP-L/14 text tower (123M) and T5 v1.1 XXL encoder (4.76B)
    "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                     "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 768, "hidden_act": "quick_gelu"},
    "text_encoder_2": {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
                       "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "is_encoder_decoder": False},
    "t5_tokens": 512,
}
SD35_LARGE = {
    "transformer": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 38, "attention_head_dim": 64,
                    "num_attention_heads": 38, "joint_attention_dim": 4096, "caption_projection_dim": 2432,
                    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "vae": {**FLUX_DEV["vae"], "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "text_encoder": FLUX_DEV["text_encoder"],  # CLIP-L/14 with projection
    "text_encoder_2": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                       "vocab_size": 49408, "max_position_embeddings": 77, "projection_dim": 1280, "hidden_act": "gelu"},
    "text_encoder_3": FLUX_DEV["text_encoder_2"],
    "t5_tokens": 256,
}

# Learned rewards without a local path: (parameters, what), weights float32 as the reward classes load them.
REWARD_PARAMS = {
    "hps": (986_109_000, "open_clip ViT-H-14 (HPS-v2.1)"),
    "pickscore": (986_109_000, "CLIP ViT-H/14 (PickScore_v1)"),
    "clip": (427_616_000, "CLIP ViT-L/14"),
    "imagereward": (447_000_000, "BLIP ViT-L + BERT-base (ImageReward.pt, 1.79 GB float32)"),
}
REWARD_VIT = {"hps": (257, 1280), "pickscore": (257, 1280), "clip": (257, 1024), "imagereward": (577, 1024)}
# The CLIP score's other published checkpoint, known by the directory name a (placeholder) path gives it
CLIP_H14 = "clip-vit-h-14-laion2b-s32b-b79k"
CLIP_H14_SIZE = (986_109_000, "CLIP ViT-H/14 (laion2B)")

# Bytes saved for backward per token per hidden unit per row, by one block (see the module docstring), by device
# and precision regime: "fp32"; "bf16" (16-bit weights and compute: LoRA, full fine-tune without master weights,
# FSDP without autocast); "autocast" (16-bit compute under autocast: master_dtype float32, FSDP or DDP).
# cuda: measured on one H100 (torch 2.11, flash attention); cpu: measured here (torch 2.14). CPU autocast keeps
# LayerNorm in 16 bits, so its "autocast" is its "bf16"; float32 on CUDA was not measured (the CPU figures stand in).
_CPU_FP32 = {"flux_double": 101.0, "flux_single": 84.3, "flux_outer": 11.1, "sd3_joint": 96.7, "sd3_outer": 10.3}
_CPU_BF16 = {"flux_double": 59.0, "flux_single": 50.2, "flux_outer": 5.6, "sd3_joint": 56.4, "sd3_outer": 5.2}
ACTIVATION_BYTES = {
    "cuda": {
        "fp32": _CPU_FP32,
        "bf16": {"flux_double": 46.6, "flux_single": 38.2, "flux_outer": 5.6, "sd3_joint": 53.8, "sd3_outer": 3.5},
        "autocast": {"flux_double": 58.6, "flux_single": 48.2, "flux_outer": 8.4, "sd3_joint": 65.1, "sd3_outer": 5.5},
    },
    "cpu": {"fp32": _CPU_FP32, "bf16": _CPU_BF16, "autocast": _CPU_BF16},
}
# The backward's own temporaries (gradients of activations in flight), per token per hidden unit per row:
# measured as peak minus saved bytes, 15-18 (16-bit) and 29-31 (float32) on both devices.
BACKWARD_WORKING_SET = {"fp32": 32.0, "bf16": 18.0, "autocast": 18.0}
# No-grad forward peak per token per hidden unit per row (16-bit: the larger of H100 and CPU).
INFERENCE_BYTES = {"flux": {4: 61.0, 2: 36.3}, "sd3": {4: 44.0, 2: 22.0}}
# VAE decode peak per output pixel per image: 16-bit measured on the H100 at 512 px; float32 twice that.
VAE_DECODE_BYTES_PER_PIXEL = {4: 4900.0, 2: 2450.0}
DECODE_CHUNK = 4  # images per VAE decode (FluxPolicy / SD3Policy.decode)
PROMPT_CACHE_ITEMS = 8192  # PromptCache's bound (models/diffusers_common.py)
PROBE_PROMPTS = 24  # prompts.train_probe


# -------------------------------------------------------------------------------------------- result


@dataclass
class RoleMemory:
    """Bytes one worker of a role holds on its GPU (on its CPU when the role asks for no GPU)."""

    name: str
    workers: int
    gpus_per_worker: float
    weights: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes (frozen + trainable, as held)
    master: int = 0  # float32 trainable weights behind a lower compute dtype
    gradients: int = 0
    optimizer: int = 0  # AdamW exp_avg + exp_avg_sq
    other: dict[str, int] = field(default_factory=dict)  # persistent extras: DDP buckets, sync staging, prompt cache
    transient: dict[str, int] = field(default_factory=dict)  # short-lived buffers of the backward (FSDP, autocast)
    activations: int = 0  # at the configured gradient-checkpointing setting (inference for rollout / rewards)
    activations_ckpt: Optional[int] = None
    activations_no_ckpt: Optional[int] = None
    phases: dict[str, int] = field(default_factory=dict)  # what comes and goes on top of the persistent bytes
    notes: list[str] = field(default_factory=list)

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def persistent(self) -> int:
        return self.weight_bytes + self.master + self.optimizer + sum(self.other.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get) if self.phases else ""

    @property
    def per_gpu(self) -> int:
        return self.persistent + max(self.phases.values(), default=0)

    @property
    def step_peak(self) -> int:
        """One training step alone (what torch.cuda.max_memory_allocated sees around forward, backward and
        optimizer step): the persistent bytes less the prompt cache, plus the larger of those two phases."""
        steps = [self.phases[k] for k in ("backward", "optimizer step") if k in self.phases]
        return self.persistent - self.other.get("prompt cache", 0) + max(steps, default=0)

    def to_json(self) -> dict[str, Any]:
        gib = lambda b: round(b / GIB, 3)  # noqa: E731
        return {
            "per_gpu_gib": gib(self.per_gpu),
            "gpus": _num(self.gpus),
            "workers": self.workers,
            "gpus_per_worker": _num(self.gpus_per_worker),
            "device": "gpu" if self.on_gpu else "cpu",
            "weights_gib": gib(self.weight_bytes),
            "weights_by_dtype_gib": {k: gib(v) for k, v in self.weights.items()},
            "master_gib": gib(self.master),
            "gradients_gib": gib(self.gradients),
            "optimizer_gib": gib(self.optimizer),
            "other_gib": {k: gib(v) for k, v in self.other.items()},
            "transient_gib": {k: gib(v) for k, v in self.transient.items()},
            "activations_gib": gib(self.activations),
            "activations_ckpt_gib": None if self.activations_ckpt is None else gib(self.activations_ckpt),
            "activations_no_ckpt_gib": None if self.activations_no_ckpt is None else gib(self.activations_no_ckpt),
            "phases_gib": {k: gib(v) for k, v in self.phases.items()},
            "peak_phase": self.peak_phase,
            "notes": list(self.notes),
        }


@dataclass
class MemoryPlan:
    roles: dict[str, RoleMemory]
    gpu_memory_gib: float
    gpus: list[dict[str, Any]]  # one entry per GPU: {"workers": ["learner 0", ...], "bytes": N}
    notes: list[str] = field(default_factory=list)

    @property
    def gpus_needed(self) -> int:
        return len(self.gpus)

    @property
    def fits(self) -> bool:
        return all(g["bytes"] <= self.gpu_memory_gib * GIB for g in self.gpus)

    def to_json(self) -> dict[str, Any]:
        return {
            "roles": {name: r.to_json() for name, r in self.roles.items()},
            "gpus_needed": self.gpus_needed,
            "gpu_memory_gib": self.gpu_memory_gib,
            "fits": self.fits,
            "gpus": [{"workers": g["workers"], "used_gib": round(g["bytes"] / GIB, 3)} for g in self.gpus],
            "notes": list(self.notes),
        }


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


# ----------------------------------------------------------------------------- the policy on meta


class PolicyParts(NamedTuple):
    """The policy's modules on the meta device, as the loaders would build them, and its token counts."""

    kind: str  # "tiny" | "flux" | "sd3"
    transformer: nn.Module  # trainable flags and dtypes as loaded (LoRA injected)
    frozen: dict[str, nn.Module]  # modules held beside the transformer (encoders, VAE; the tiny text encoder)
    extra_tensors: list[torch.Tensor]  # tensors the policy holds itself (position-id buffers)
    image_tokens: int
    text_tokens: int
    vae_scale: int  # 0: no VAE
    autocast: bool  # full fine-tune with float32 master weights: forward under autocast
    notes: list[str]


def _is_local_dir(path: Optional[str]) -> bool:
    return bool(path) and Path(path).expanduser().is_dir()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"model.path: {path} not found (a diffusers model directory has one per component)") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: invalid JSON ({err.msg})") from None


def _token_limit(directory: Path, name: str, default: int) -> int:
    """tokenizer_limit (models/diffusers_common.py) from the tokenizer's config file, without loading it."""
    cfg_file = directory / name / "tokenizer_config.json"
    limit = json.loads(cfg_file.read_text()).get("model_max_length") if cfg_file.is_file() else None
    return limit if isinstance(limit, int) and 0 < limit < default else default


def _meta_text_encoder(cls_name: str, config: dict, dtype: torch.dtype) -> nn.Module:
    import transformers

    config_cls = {"CLIPTextModel": "CLIPTextConfig", "CLIPTextModelWithProjection": "CLIPTextConfig",
                  "T5EncoderModel": "T5Config"}[cls_name]
    cfg = getattr(transformers, config_cls)(**{k: v for k, v in config.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(cfg)
    model.to(dtype)
    if dtype == torch.float16:  # from_pretrained keeps _keep_in_fp32_modules in float32 for fp16 only
        keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
        for name, module in model.named_modules():
            if keep & set(name.split(".")):
                module.to(torch.float32)
    return model


def _meta_diffusers(cls_name: str, config: dict, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cls = getattr(diffusers, cls_name)
    with torch.device("meta"):
        model = cls.from_config(config)
    return nn.Module.to(model, dtype)  # diffusers' own .to() warns about _keep_in_fp32_modules (none here)


def _apply_training_flags(transformer: nn.Module, cfg: ModelConfig) -> bool:
    """DiffusersPolicy.__init__'s dtype and trainable handling; returns whether the forward runs under autocast."""
    from egrpo_ray.models.diffusers_common import add_lora

    dtype = _DTYPES[cfg.dtype]
    master = torch.float32 if cfg.master_dtype == "float32" else None
    if cfg.lora.enabled:
        with torch.device("meta"):
            try:
                add_lora(transformer, cfg.lora, master or torch.float32)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        return False
    transformer.requires_grad_(True)
    if master is not None and master != dtype:
        nn.Module.to(transformer, master)
        return True
    return False


def _tiny_parts(cfg: ModelConfig) -> PolicyParts:
    from egrpo_ray.models import tiny

    if cfg.resolution != tiny.IMAGE_SIZE:
        raise ConfigError(f"model.resolution: the tiny model generates {tiny.IMAGE_SIZE}x{tiny.IMAGE_SIZE} images, not {cfg.resolution}")
    directory = Path(cfg.path).expanduser() if cfg.path else tiny.ASSET_DIR
    if not (directory / tiny.MANIFEST_FILE).is_file():
        raise ConfigError(f"model.path: no tiny model manifest in {directory} (need {tiny.MANIFEST_FILE}); "
                          f"run `egrpo-ray pretrain-tiny --output-dir {directory}`")
    manifest = tiny.read_manifest(directory)
    with torch.device("meta"):  # load_tiny_policy's steps, on meta
        policy = tiny.TinyPolicy(manifest["model_config"])
        policy.freeze_text_encoder()
        dtype = _DTYPES[cfg.dtype]
        if dtype != torch.float32:
            nn.Module.to(policy.transformer, dtype)
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            policy.transformer.requires_grad_(False)
            policy.transformer.add_adapter(PeftLoraConfig(
                r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                target_modules=list(cfg.lora.target_modules), init_lora_weights="gaussian"))
    notes = []
    if cfg.master_dtype:
        notes.append("the tiny model ignores model.master_dtype")
    return PolicyParts("tiny", policy.transformer, {"text_encoder": policy.text_encoder}, list(policy.buffers()),
                       tiny.GRID * tiny.GRID, policy.text_encoder.max_len, 0, False, notes)


def policy_parts(cfg: ModelConfig, transformer_config: Optional[dict] = None, with_frozen: bool = True) -> PolicyParts:
    """Build the configured policy on the meta device (no weights read).

    ``transformer_config`` replaces the transformer's config (e.g. a FLUX-width model with fewer blocks for a
    one-GPU measurement); ``with_frozen=False`` leaves out the text encoders and the VAE."""
    if cfg.kind == "tiny":
        return _tiny_parts(cfg)
    dtype = _DTYPES[cfg.dtype]
    notes: list[str] = []
    if _is_local_dir(cfg.path):
        root = Path(cfg.path).expanduser()
        if not (root / "transformer").is_dir():
            raise ConfigError(f"model.path {root}: not a diffusers model directory (no transformer/ subfolder)")
        configs = {name: _read_json(root / name / "config.json") for name in
                   ("transformer", "vae", "text_encoder", "text_encoder_2")}
        if cfg.kind == "sd3" and (root / "text_encoder_3").is_dir():
            configs["text_encoder_3"] = _read_json(root / "text_encoder_3" / "config.json")
        guidance = bool(configs["transformer"].get("guidance_embeds", False))
        if cfg.kind == "flux":
            text_tokens = _token_limit(root, "tokenizer_2", 512 if guidance else 256)
        else:
            t5 = _token_limit(root, "tokenizer_3", 256) if "text_encoder_3" in configs else 256
            text_tokens = _token_limit(root, "tokenizer", 77) + t5
    else:
        published = FLUX_DEV if cfg.kind == "flux" else SD35_LARGE
        configs = {k: v for k, v in published.items() if k != "t5_tokens"}
        text_tokens = published["t5_tokens"] + (77 if cfg.kind == "sd3" else 0)
        what = "FLUX.1-dev" if cfg.kind == "flux" else "SD3.5-large"
        notes.append(f"model.path {cfg.path} is not a local directory: counted {what}'s published architecture")
    if transformer_config is not None:
        configs["transformer"] = dict(transformer_config)
        notes.append("transformer config overridden")

    cls = "FluxTransformer2DModel" if cfg.kind == "flux" else "SD3Transformer2DModel"
    transformer = _meta_diffusers(cls, configs["transformer"], dtype)
    autocast = _apply_training_flags(transformer, cfg)
    vae_cfg = configs["vae"]
    vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    latent = cfg.resolution // vae_scale
    if cfg.kind == "flux":
        if cfg.resolution % (2 * vae_scale):
            raise ConfigError(f"model.resolution {cfg.resolution} must be a multiple of {2 * vae_scale} for FLUX")
        image_tokens = (latent // 2) ** 2
        encoders = {"text_encoder": "CLIPTextModel", "text_encoder_2": "T5EncoderModel"}
    else:
        patch = int(transformer.config.patch_size)
        if cfg.resolution % (vae_scale * patch):
            raise ConfigError(f"model.resolution {cfg.resolution} must be a multiple of {vae_scale * patch} for SD3")
        image_tokens = (latent // patch) ** 2
        encoders = {"text_encoder": "CLIPTextModelWithProjection", "text_encoder_2": "CLIPTextModelWithProjection",
                    "text_encoder_3": "T5EncoderModel"}
    frozen: dict[str, nn.Module] = {}
    if with_frozen:
        frozen["vae"] = _meta_diffusers("AutoencoderKL", vae_cfg, dtype)
        for name, enc_cls in encoders.items():
            if name in configs:
                frozen[name] = _meta_text_encoder(enc_cls, configs[name], dtype)
        for module in frozen.values():
            module.requires_grad_(False)
    else:
        vae_scale = 0
    # FluxPolicy's img_ids buffer (float32 position ids of the packed latent tokens)
    extra = [torch.empty(image_tokens, 3, device="meta")] if cfg.kind == "flux" else []
    return PolicyParts(cfg.kind, transformer, frozen, extra, image_tokens, text_tokens, vae_scale, autocast, notes)


# ----------------------------------------------------------------------------------- accounting


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _nbytes(t: torch.Tensor, world: int = 1, dtype: Optional[torch.dtype] = None) -> int:
    """Bytes of ``t`` (in ``dtype`` if given), or of its largest dim-0 shard over ``world`` ranks (FSDP2's chunking)."""
    size = (dtype or t.dtype).itemsize
    if world == 1 or t.dim() == 0 or t.shape[0] == 0:
        return t.numel() * size
    return math.ceil(t.shape[0] / world) * (t.numel() // t.shape[0]) * size


def _add(acc: dict[str, int], dtype: torch.dtype, nbytes: int) -> None:
    if nbytes:
        name = _dtype_name(dtype)
        acc[name] = acc.get(name, 0) + nbytes


def _unique_tensors(modules: list[nn.Module]) -> tuple[list[tuple[str, nn.Parameter]], list[torch.Tensor]]:
    seen: set[int] = set()
    params, buffers = [], []
    for m in modules:
        for n, p in m.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append((n, p))
        for b in m.buffers():
            if id(b) not in seen:
                seen.add(id(b))
                buffers.append(b)
    return params, buffers


def _blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    kind = "sd3_joint" if not hasattr(transformer, "single_transformer_blocks") else "flux_double"
    return ([(kind, b) for b in getattr(transformer, "transformer_blocks", [])]
            + [("flux_single", b) for b in getattr(transformer, "single_transformer_blocks", [])])


def _hidden(transformer: nn.Module) -> int:
    c = transformer.config
    return int(c.num_attention_heads) * int(c.attention_head_dim)


def _numel(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def activation_regime(compute_dtype: torch.dtype, autocast: bool) -> str:
    return "fp32" if compute_dtype.itemsize >= 4 else ("autocast" if autocast else "bf16")


def learner_activation_bytes(transformer: nn.Module, image_tokens: int, text_tokens: int, rows: int,
                             compute_dtype: torch.dtype, checkpointing: bool, autocast: bool = False,
                             device: str = "cuda") -> int:
    """Activation bytes of one training forward + backward of ``rows`` rows (formula in the module docstring).

    ``transformer`` may live on any device (meta included): only its config and block list are read.
    ``autocast``: the forward runs under autocast (a full fine-tune with master_dtype float32); ``device``
    picks the constants ("cuda" or "cpu": their attention and norm kernels save different tensors)."""
    regime = activation_regime(compute_dtype, autocast)
    table = ACTIVATION_BYTES[device][regime]
    blocks = [kind for kind, _ in _blocks(transformer)]
    outer = "flux_outer" if "flux_double" in blocks else "sd3_outer"
    per_token_hidden = table[outer] + BACKWARD_WORKING_SET[regime]
    if checkpointing:  # each block keeps its input hidden states; one block is recomputed at a time
        per_token_hidden += len(blocks) * compute_dtype.itemsize + max((table[k] for k in blocks), default=0.0)
    else:
        per_token_hidden += sum(table[k] for k in blocks)
    return int(rows * (image_tokens + text_tokens) * _hidden(transformer) * per_token_hidden)


def inference_activation_bytes(transformer: nn.Module, image_tokens: int, text_tokens: int, rows: int,
                               compute_dtype: torch.dtype) -> int:
    """Peak bytes of one no-grad forward of ``rows`` rows, beyond the weights."""
    e = compute_dtype.itemsize
    arch = "flux" if hasattr(transformer, "single_transformer_blocks") else "sd3"
    return int(rows * (image_tokens + text_tokens) * _hidden(transformer) * INFERENCE_BYTES[arch][4 if e >= 4 else 2])


def vae_decode_bytes(resolution: int, images: int, dtype: torch.dtype) -> int:
    e = dtype.itemsize
    return int(images * resolution * resolution * VAE_DECODE_BYTES_PER_PIXEL[4 if e >= 4 else 2])


def _prompt_bytes(parts: PolicyParts, dtype: torch.dtype) -> int:
    """GPU bytes one cached prompt's conditioning takes (the tiny model caches on the CPU)."""
    if parts.kind == "tiny":
        return 0
    c = parts.transformer.config
    e = dtype.itemsize
    return (parts.text_tokens * int(c.joint_attention_dim) + int(c.pooled_projection_dim)) * e


def _rows_factor(cfg: ExperimentConfig) -> int:
    return 2 if cfg.model.kind == "sd3" and cfg.model.cfg_scale > 1 else 1  # CFG: one batched forward of 2B rows


def rollout_batch_rows(cfg: ExperimentConfig) -> int:
    """The largest forward a rollout worker runs: every branch of every (prompt, entry) at once, or
    ``rollout.max_batch_rows`` where that is fewer."""
    from egrpo_ray.algo.strategies import BranchingStrategy, build_strategy

    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    entries = len(strategy.plan.entries) if isinstance(strategy, BranchingStrategy) else 1
    rows = cfg.rollout.prompts_per_batch * entries * cfg.algorithm.group_size
    return min(rows, cfg.rollout.max_batch_rows or rows) * _rows_factor(cfg)


def learner_memory(cfg: ExperimentConfig, parts: Optional[PolicyParts] = None) -> RoleMemory:
    """One learner rank: weights, master, gradients, AdamW, transients and activations."""
    parts = parts or policy_parts(cfg.model)
    lc = cfg.learner
    fsdp = lc.parallelism == "fsdp"
    world = lc.workers
    compute = _DTYPES[cfg.model.dtype]
    ce = compute.itemsize
    role = RoleMemory("learner", lc.workers, lc.num_gpus, notes=list(parts.notes))

    t_params, t_buffers = _unique_tensors([parts.transformer])
    f_params, f_buffers = _unique_tensors(list(parts.frozen.values()))
    trainable = [p for _, p in t_params if p.requires_grad]

    def held(p: torch.Tensor) -> tuple[torch.dtype, int]:
        """(dtype, bytes) a transformer parameter takes on this rank (FSDP: a float32 shard if trainable)."""
        if fsdp:
            dtype = torch.float32 if p.requires_grad else p.dtype
            return dtype, _nbytes(p, world, dtype)
        return p.dtype, _nbytes(p)

    for _, p in t_params:
        dtype, nb = held(p)
        is_master = p.requires_grad and dtype == torch.float32 and compute != torch.float32 and (fsdp or parts.autocast)
        if is_master:
            role.master += nb
        else:
            _add(role.weights, dtype, nb)
    for t in [*t_buffers, *f_buffers, *parts.extra_tensors]:
        _add(role.weights, t.dtype, _nbytes(t))
    for _, p in f_params:
        _add(role.weights, p.dtype, _nbytes(p))

    grad_bytes = sum(held(p)[1] for p in trainable)
    role.gradients = grad_bytes
    role.optimizer = 2 * grad_bytes
    if not fsdp and world > 1:
        role.other["ddp buckets"] = grad_bytes
    if lc.gradient_noise:  # algo/gradient_noise.py: one float32 copy of the gradients (a shard under FSDP)
        buffer = sum(_nbytes(p, world if fsdp else 1, torch.float32) for p in trainable)
        if lc.gradient_noise_buffer == "device":
            role.other["gradient noise buffer"] = buffer
        else:
            role.notes.append(f"gradient noise buffer in host memory: {buffer / GIB:.2f} GiB per rank")
    n_train = sum(p.numel() for p in trainable)
    if fsdp:
        blocks = [b for _, b in _blocks(parts.transformer)]
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for _, p in t_params if id(p) not in in_blocks)
        biggest = max(blocks, key=_numel)
        role.transient["fsdp unsharded params"] = (root + 2 * _numel(biggest)) * ce
        role.transient["fsdp block grads"] = _numel(biggest, trainable_only=True) * (ce + 4)
    elif parts.autocast:
        role.transient["autocast copy"] = n_train * ce
    step_temp = grad_bytes  # foreach AdamW: sqrt(exp_avg_sq)
    if cfg.rollout.weight_sync == "collective":
        largest = max((p.numel() * 4 for p in trainable), default=0)
        step_temp = max(step_temp, cfg.rollout.sync_bucket_mb * 2**20 + largest)

    rows = lc.minibatch_rows * _rows_factor(cfg)
    act = {ckpt: learner_activation_bytes(parts.transformer, parts.image_tokens, parts.text_tokens, rows, compute,
                                          ckpt, parts.autocast) for ckpt in (True, False)}
    role.activations_ckpt, role.activations_no_ckpt = act[True], act[False]
    role.activations = act[cfg.model.gradient_checkpointing]

    prompts = min(PROMPT_CACHE_ITEMS, math.ceil(lc.iterations * lc.prompts_per_step / world)
                  + cfg.prompts.heldout_count + PROBE_PROMPTS)
    if _prompt_bytes(parts, compute):
        role.other["prompt cache"] = prompts * _prompt_bytes(parts, compute)
    backward_transient = sum(role.transient.values())
    role.phases["backward"] = role.activations + backward_transient
    role.phases["optimizer step"] = role.gradients + max(step_temp, backward_transient)
    from egrpo_ray.evaluate import HELDOUT_BATCH  # held-out sampling batches (evaluate.score_heldout)

    eval_rows = min(HELDOUT_BATCH, cfg.prompts.heldout_count) * _rows_factor(cfg)
    sample = inference_activation_bytes(parts.transformer, parts.image_tokens, parts.text_tokens, eval_rows, compute)
    decode = vae_decode_bytes(cfg.model.resolution, DECODE_CHUNK, compute) if parts.vae_scale else 0
    role.phases["heldout eval (rank 0)"] = (role.gradients + role.transient.get("fsdp unsharded params", 0)
                                            + role.transient.get("autocast copy", 0) + max(sample, decode))
    if cfg.algorithm.kl_beta > 0 and not cfg.model.lora.enabled:
        # training.reference_model: a frozen copy of the transformer (LoRA disables its adapters instead),
        # in the compute dtype and sharded per block under FSDP (parallel.prepare_reference)
        role.other["kl reference copy"] = sum(_nbytes(p, world, compute) if fsdp else _nbytes(p) for _, p in t_params)
    return role


def rollout_model(cfg: ModelConfig) -> ModelConfig:
    """The model config a rollout worker builds its policy from (distributed/rollout.py): no master copy."""
    return cfg.model_copy(update={"master_dtype": None})


def rollout_memory(cfg: ExperimentConfig, parts: Optional[PolicyParts] = None) -> RoleMemory:
    """One rollout worker: its policy (frozen, in the model dtype), sync staging, sampling and decoding."""
    parts = parts or policy_parts(rollout_model(cfg.model))
    rc = cfg.rollout
    compute = _DTYPES[cfg.model.dtype]
    role = RoleMemory("rollout", rc.workers, rc.num_gpus, notes=list(parts.notes))
    params, buffers = _unique_tensors([parts.transformer, *parts.frozen.values()])
    for _, p in params:
        _add(role.weights, p.dtype, _nbytes(p))
    for t in [*buffers, *parts.extra_tensors]:
        _add(role.weights, t.dtype, _nbytes(t))
    trainable = [p for _, p in parts.transformer.named_parameters() if p.requires_grad]
    if rc.weight_sync == "collective":
        role.other["sync staging"] = sum(_nbytes(p) for p in trainable)
    rows = rollout_batch_rows(cfg)
    role.activations = inference_activation_bytes(parts.transformer, parts.image_tokens, parts.text_tokens, rows, compute)
    role.phases["sampling"] = role.activations
    if parts.vae_scale:
        role.phases["decode"] = vae_decode_bytes(cfg.model.resolution, DECODE_CHUNK, compute)
    lc = cfg.learner
    prompts = min(PROMPT_CACHE_ITEMS, math.ceil(lc.iterations * lc.prompts_per_step / rc.workers) + rc.prompts_per_batch)
    if _prompt_bytes(parts, compute):
        role.other["prompt cache"] = prompts * _prompt_bytes(parts, compute)
    how = "at most rollout.max_batch_rows" if rc.max_batch_rows else "all branches of a batch's prompts at once"
    role.notes.append(f"sampling batch: {rows} rows a forward ({how})")
    return role


def reward_memory(rc: RewardConfig) -> RoleMemory:
    """One reward replica: the model's weights (float32, as the reward classes load them) and a scoring batch."""
    role = RoleMemory(f"reward {rc.name}", rc.replicas, rc.num_gpus)
    if rc.name in ("alignment", "jpeg"):
        role.notes.append("programmatic reward: no model")
        return role
    path = Path(rc.path).expanduser() if rc.path else None
    clip_h14 = rc.name == "clip" and path is not None and path.name.lower() == CLIP_H14
    if path is not None and path.is_file():
        role.weights["float32"] = path.stat().st_size
        role.notes.append(f"weights: the size of {path.name}")
    elif path is not None and (path / "config.json").is_file():
        from transformers import CLIPConfig, CLIPModel

        with torch.device("meta"):
            model = CLIPModel(CLIPConfig.from_pretrained(str(path)))
        role.weights["float32"] = sum(p.numel() for p in model.parameters()) * 4
        role.notes.append(f"weights: CLIPModel counted from {path / 'config.json'}")
    elif rc.name == "imagereward" and path is not None and (path / "ImageReward.pt").is_file():
        role.weights["float32"] = (path / "ImageReward.pt").stat().st_size
    else:
        if rc.model_name and rc.name == "hps" and rc.model_name != "ViT-H-14":
            raise ConfigError(f"rewards: hps model_name {rc.model_name!r} has no known size; give a local path")
        params, what = CLIP_H14_SIZE if clip_h14 else REWARD_PARAMS[rc.name]
        role.weights["float32"] = params * 4
        role.notes.append(f"weights: {what}, {params / 1e6:.0f}M parameters (published size; path not local)")
    tokens, width = REWARD_VIT["hps" if clip_h14 else rc.name]  # ViT-H/14: HPS's image tower
    e = 2 if rc.name == "hps" and rc.device.startswith("cuda") else 4  # HPS scores under fp16 autocast on CUDA
    role.activations = int(rc.batch_size * tokens * width * (16 * e))  # ~16 live values per token per unit
    role.phases["scoring"] = role.activations
    return role


def pack_gpus(roles: list[RoleMemory]) -> list[dict[str, Any]]:
    """Assign every GPU worker to GPUs (see the module docstring); returns one entry per GPU."""
    gpus: list[dict[str, Any]] = []
    fractional: list[tuple[float, str, int]] = []
    for r in roles:
        if not r.on_gpu:
            continue
        for i in range(r.workers):
            label = f"{r.name} {i}"
            if r.gpus_per_worker >= 1:
                whole = math.ceil(r.gpus_per_worker)
                gpus.append({"workers": [label], "bytes": r.per_gpu, "free": 0.0})
                gpus += [{"workers": [f"{label} (idle)"], "bytes": 0, "free": 0.0} for _ in range(whole - 1)]
            else:
                fractional.append((r.gpus_per_worker, label, r.per_gpu))
    shared: list[dict[str, Any]] = []
    for frac, label, nbytes in sorted(fractional, key=lambda x: -x[0]):
        gpu = next((g for g in shared if g["free"] + 1e-9 >= frac), None)
        if gpu is None:
            gpu = {"workers": [], "bytes": 0, "free": 1.0}
            shared.append(gpu)
        gpu["workers"].append(label)
        gpu["bytes"] += nbytes
        gpu["free"] -= frac
    return [{"workers": g["workers"], "bytes": g["bytes"]} for g in gpus + shared]


def plan_memory(cfg: ExperimentConfig, gpu_memory_gib: float = DEFAULT_GPU_GIB) -> MemoryPlan:
    """Per-role memory, the GPUs the config asks for and whether every GPU holds what lands on it."""
    if gpu_memory_gib <= 0:
        raise ConfigError("--gpu-memory-gib must be > 0")
    parts = policy_parts(cfg.model)
    sampler = parts if not cfg.model.master_dtype else policy_parts(rollout_model(cfg.model))
    roles: dict[str, RoleMemory] = {"rollout": rollout_memory(cfg, sampler), "learner": learner_memory(cfg, parts)}
    for i, rc in enumerate(cfg.rewards):
        name = f"reward_{rc.name}" if f"reward_{rc.name}" not in roles else f"reward_{rc.name}_{i}"
        roles[name] = reward_memory(rc)
        roles[name].name = name
    plan = MemoryPlan(roles, gpu_memory_gib, pack_gpus(list(roles.values())), notes=list(parts.notes))
    for r in roles.values():
        if r.gpus_per_worker > 1:
            r.notes.append(f"num_gpus {r.gpus_per_worker:g} per worker: counted on one GPU (one device per process)")
    return plan


# --------------------------------------------------------------------------------- measurement


def saved_activation_bytes(model: nn.Module, run: Callable[[], Any]) -> dict[str, int]:
    """Bytes of the tensors autograd saves for backward while ``run()`` executes, each storage once and the
    model's parameters left out, attributed to the block type that saved them first ("outer" = outside the
    blocks). Works on any device; what the activation constants were calibrated with."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}
    where = ["outer"]
    hooks = []

    def enter(kind: str) -> Callable:
        def hook(module, args) -> None:
            where.append(kind)
        return hook

    def leave(module, args, output) -> None:
        where.pop()

    for kind, block in _blocks(model):
        hooks.append(block.register_forward_pre_hook(enter(kind)))
        hooks.append(block.register_forward_hook(leave))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (where[-1], storage.nbytes())
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
    finally:
        for h in hooks:
            h.remove()
    totals: dict[str, int] = {}
    for kind, nbytes in seen.values():
        totals[kind] = totals.get(kind, 0) + nbytes
    return totals


# ----------------------------------------------------------------------------------------- text


def format_plan(plan: MemoryPlan, title: str = "") -> str:
    """The table ``egrpo-ray plan --memory`` prints."""
    g = lambda b: f"{b / GIB:8.2f}"  # noqa: E731
    head = (f"{'role':<20} {'workers':>7} {'GPU/w':>5} {'weights':>8} {'master':>8} {'grads':>8} {'optim':>8} "
            f"{'other':>8} {'transient':>9} {'act ckpt':>8} {'act full':>8} {'per-GPU':>8}  peak phase")
    lines = [f"memory plan{': ' + title if title else ''} (GiB = 2^30 bytes)", head]
    for name, r in plan.roles.items():
        ck = g(r.activations_ckpt) if r.activations_ckpt is not None else f"{'-':>8}"
        full = g(r.activations_no_ckpt) if r.activations_no_ckpt is not None else g(r.activations)
        lines.append(f"{name:<20} {r.workers:>7} {r.gpus_per_worker:>5g} {g(r.weight_bytes)} {g(r.master)} "
                     f"{g(r.gradients)} {g(r.optimizer)} {g(sum(r.other.values()))} {sum(r.transient.values()) / GIB:9.2f} "
                     f"{ck} {full} {g(r.per_gpu)}  {r.peak_phase}{'' if r.on_gpu else ' (CPU)'}")
    lines.append("per-GPU = weights + master + optimizer + other + the largest phase (backward: activations at the "
                 "configured checkpointing + transient; optimizer step: gradients + temporaries; eval; sampling)")
    for name, r in plan.roles.items():
        details = [f"{k} {v / GIB:.2f}" for k, v in {**r.weights, **r.other, **r.transient}.items() if v >= GIB / 1000]
        phases = [f"{k} {v / GIB:.2f}" for k, v in r.phases.items()]
        lines.append(f"  {name}: " + ", ".join(details) + (f"; phases: {', '.join(phases)}" if phases else ""))
        for note in r.notes:
            if note not in plan.notes:
                lines.append(f"    - {note}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    if plan.gpus:
        over = [f"GPU {i} ({', '.join(x['workers'])}) {x['bytes'] / GIB:.1f} GiB" for i, x in enumerate(plan.gpus)
                if x["bytes"] > plan.gpu_memory_gib * GIB]
        verdict = "yes" if plan.fits else "no: " + "; ".join(over)
        lines.append(f"needs {plan.gpus_needed} GPUs; fits on {plan.gpus_needed} x {plan.gpu_memory_gib:g} GiB: {verdict}")
    else:
        lines.append("needs 0 GPUs (every role runs on CPUs); fits: yes")
    return "\n".join(lines)
