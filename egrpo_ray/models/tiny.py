"""The tiny text-to-image flow model shipped with the package (the embedded default).

- Denoiser: diffusers' ``FluxTransformer2DModel`` with a small config (2 double-stream + 2 single-stream
  blocks, 4 heads x 32, joint and pooled dims 64, rope axes (8, 12, 12), guidance embedding on), so it
  runs the FLUX code path: packed latents, 3-axis rope position ids, time + guidance + pooled-text
  embedding (timestep = s in [0, 1], scaled by 1000 inside diffusers; guidance fixed at the trained
  value).
- Pixel space, no VAE: a 32x32 RGB image in model space x = 2 * image - 1 (in [-1, 1]) is cut into 4x4
  patches and packed FLUX-style (channel-major, then patch row, patch column) into 64 tokens of 48
  channels; image ids are (0, patch row, patch column), text ids are zeros, as in FLUX.
- Text encoder (no download): learned word embeddings over the shapes grammar's vocabulary (plus PAD and
  UNK: unknown words map to UNK, prompts longer than ``max_len`` words are truncated) + learned position
  embeddings + LayerNorm give the per-token ``prompt_embeds`` [B, L, 64]; a linear map of their masked
  mean gives ``pooled`` [B, 64]. It is trained with the transformer in pre-training, then frozen:
  ``trainable_state()`` is the transformer only and ``encode_prompts`` caches per prompt, without grad.

Files (``egrpo_ray/assets/tiny/`` or ``ModelConfig.path``): ``model.safetensors`` (keys
``transformer.*`` and ``text_encoder.*``) and ``manifest.json`` (``model_config`` rebuilds the modules;
``sha256`` of the safetensors file is checked on load).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from egrpo_ray.config import ModelConfig
from egrpo_ray.algo.sampler import Conditioning
from egrpo_ray.models.base import Policy
from egrpo_ray.tasks import shapes

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"

IMAGE_SIZE = 32
PATCH = 4
CHANNELS = 3
GRID = IMAGE_SIZE // PATCH  # 8 x 8 tokens
TOKEN_DIM = CHANNELS * PATCH * PATCH  # 48

DEFAULT_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": TOKEN_DIM,
    "out_channels": TOKEN_DIM,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": [8, 12, 12],
}
PAD, UNK = "<pad>", "<unk>"


def default_model_config() -> dict[str, Any]:
    """Everything needed to rebuild the modules (stored in the manifest)."""
    return {
        "transformer": dict(DEFAULT_TRANSFORMER_CONFIG),
        "text_encoder": {"vocab": [PAD, UNK, *shapes.VOCAB], "dim": 64, "max_len": 8},
        "guidance": 3.5,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH,
        "image_scaling": "x = 2 * image - 1",
    }


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] (model space) -> [B, 64, 48]."""
    B = images.shape[0]
    x = images.reshape(B, CHANNELS, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, GRID * GRID, TOKEN_DIM)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """[B, 64, 48] -> [B, 3, 32, 32] (model space)."""
    B = latents.shape[0]
    x = latents.reshape(B, GRID, GRID, CHANNELS, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)


def images_to_latents(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> packed model-space latents (what pre-training denoises)."""
    return pack(images.float() * 2 - 1)


def image_ids() -> torch.Tensor:
    """FLUX image position ids [64, 3]: (0, patch row, patch column)."""
    ids = torch.zeros(GRID, GRID, 3)
    ids[..., 1] = torch.arange(GRID)[:, None]
    ids[..., 2] = torch.arange(GRID)[None, :]
    return ids.reshape(GRID * GRID, 3)


class TinyTextEncoder(nn.Module):
    """Word + position embeddings over a fixed vocabulary; see the module docstring."""

    def __init__(self, vocab: Sequence[str], dim: int = 64, max_len: int = 8):
        super().__init__()
        if list(vocab[:2]) != [PAD, UNK]:
            raise ValueError("the vocabulary must start with the PAD and UNK tokens")
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len
        self.dim = dim
        self.token = nn.Embedding(len(self.vocab), dim)
        self.position = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, dim)

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, max_len] long, mask [B, max_len] bool); PAD = 0, UNK = 1."""
        ids = torch.zeros(len(prompts), self.max_len, dtype=torch.long)
        for b, p in enumerate(prompts):
            words = shapes.tokenize(p)[: self.max_len]
            if words:
                ids[b, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words])
        return ids, ids != 0

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.token(ids) + self.position[: ids.shape[1]])
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = self.pool((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        return h, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        dev = self.token.weight.device
        return self(ids.to(dev), mask.to(dev))


class TinyPolicy(Policy):
    """The tiny FLUX-architecture pixel-space policy. Latents: packed [B, 64, 48] float32."""

    latent_shape = (GRID * GRID, TOKEN_DIM)
    CACHE_LIMIT = 4096

    def __init__(self, model_config: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32):
        from diffusers import FluxTransformer2DModel

        super().__init__()
        self.model_config = model_config or default_model_config()
        tcfg = dict(self.model_config["transformer"])
        tcfg["axes_dims_rope"] = tuple(tcfg["axes_dims_rope"])
        self.transformer = FluxTransformer2DModel(**tcfg)
        if dtype != torch.float32:
            self.transformer.to(dtype)
        self.text_encoder = TinyTextEncoder(**self.model_config["text_encoder"])
        self.guidance = float(self.model_config["guidance"])
        self.model_dtype = dtype
        self.register_buffer("img_ids", image_ids(), persistent=False)
        self.register_buffer("txt_ids", torch.zeros(self.text_encoder.max_len, 3), persistent=False)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Eval mode, as the rollout workers sample: the learner's log-prob recompute must see the same
        # forward (LoRA dropout off). Pre-training switches to train() itself.
        self.eval()

    # -- text ---------------------------------------------------------------------------------
    def freeze_text_encoder(self) -> None:
        self.text_encoder.requires_grad_(False)
        self.text_encoder.eval()
        self.clear_cache()

    def clear_cache(self) -> None:
        self._cache.clear()

    def shared_with_reference(self) -> list[object]:
        return [*super().shared_with_reference(), self._cache]

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """{"prompt_embeds": [B, L, 64], "pooled": [B, 64]}, float32, no grad, cached per prompt."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self.CACHE_LIMIT:
                self._cache.clear()
            with torch.no_grad():
                emb, pooled = self.text_encoder.encode(missing)
            for i, p in enumerate(missing):
                self._cache[p] = (emb[i].float().cpu(), pooled[i].float().cpu())
        dev = self.img_ids.device
        return {
            "prompt_embeds": torch.stack([self._cache[p][0] for p in prompts]).to(dev),
            "pooled": torch.stack([self._cache[p][1] for p in prompts]).to(dev),
        }

    def encode_prompts_with_grad(self, prompts: Sequence[str]) -> Conditioning:
        """Uncached conditioning that back-propagates into the text encoder (pre-training only)."""
        emb, pooled = self.text_encoder.encode(prompts)
        return {"prompt_embeds": emb, "pooled": pooled}

    # -- denoiser -----------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        B = latents.shape[0]
        dt = self.model_dtype
        sigma = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32)
        if sigma.dim() == 0:
            sigma = sigma.expand(B)
        out = self.transformer(
            hidden_states=latents.to(dt),
            encoder_hidden_states=cond["prompt_embeds"].to(dt),
            pooled_projections=cond["pooled"].to(dt),
            timestep=sigma.to(dt),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids[: cond["prompt_embeds"].shape[1]],
            guidance=torch.full((B,), self.guidance, device=latents.device, dtype=dt),
            return_dict=False,
        )[0]
        return out.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((unpack(latents.float()) + 1) / 2).clamp(0, 1)


def build_tiny_policy(seed: int = 0, model_config: dict[str, Any] | None = None, dtype: torch.dtype = torch.float32) -> TinyPolicy:
    """A freshly initialised (random-weights) tiny policy, seeded."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return TinyPolicy(model_config, dtype)
    finally:
        torch.random.set_rng_state(state)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tiny_weights(policy: TinyPolicy, out_dir: str | Path) -> str:
    """Write model.safetensors (float32, transformer + text encoder); returns its sha256."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return file_sha256(out / WEIGHTS_FILE)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n", 2)[:2]).strip()
    return text[:300] or type(err).__name__


def read_manifest(directory: str | Path | None = None) -> dict[str, Any]:
    """manifest.json as a dict; a missing, unreadable or malformed manifest raises one-line errors
    (FileNotFoundError when missing, ValueError otherwise)."""
    path = Path(directory or ASSET_DIR) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a valid JSON manifest ({getattr(err, 'msg', None) or type(err).__name__})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not a valid manifest (expected a JSON object)")
    return manifest


def check_tiny_files(directory: str | Path | None = None) -> dict[str, Any]:
    """Validate a tiny model directory without building the model: both files present, the manifest
    holds a model_config and the sha256 of the weights, the hash matches, the safetensors header parses
    and covers the file. Returns the manifest. Errors are one line: FileNotFoundError or ValueError."""
    from egrpo_ray.checkpoint import CheckpointError, check_safetensors

    directory = Path(directory) if directory else ASSET_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"tiny model directory not found: {directory}")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file() or not (directory / MANIFEST_FILE).is_file():
        raise FileNotFoundError(f"tiny model files missing in {directory} (need {WEIGHTS_FILE} and {MANIFEST_FILE}); run `egrpo-ray pretrain-tiny --output-dir {directory}`")
    manifest = read_manifest(directory)
    mc = manifest.get("model_config")
    if not isinstance(mc, dict) or not isinstance(mc.get("transformer"), dict) or not isinstance(mc.get("text_encoder"), dict):
        raise ValueError(f"{directory / MANIFEST_FILE}: no valid 'model_config' (transformer and text_encoder settings)")
    sha = file_sha256(weights)
    if manifest.get("sha256") != sha:
        raise ValueError(f"{weights}: sha256 {sha} does not match the manifest's {manifest.get('sha256')}")
    try:
        check_safetensors(weights)
    except CheckpointError as err:
        raise ValueError(str(err)) from None
    return manifest


def load_tiny_policy(cfg: ModelConfig | None = None) -> TinyPolicy:
    """Load the shipped tiny model (or ``cfg.path``: a directory with the same two files).

    Checks the file's sha256 against the manifest, freezes the text encoder, applies the config's
    dtype, gradient checkpointing and LoRA (peft on the transformer; then only LoRA weights train).
    A missing, corrupt or mismatched model raises a one-line FileNotFoundError or ValueError.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = cfg or ModelConfig()
    if cfg.resolution != IMAGE_SIZE:
        raise ValueError(f"model.resolution: the tiny model generates {IMAGE_SIZE}x{IMAGE_SIZE} images, not {cfg.resolution}")
    directory = Path(cfg.path) if cfg.path else ASSET_DIR
    weights = directory / WEIGHTS_FILE
    manifest = check_tiny_files(directory)
    try:
        policy = TinyPolicy(manifest["model_config"])
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{directory / MANIFEST_FILE}: model_config cannot build the tiny model ({_first_line(err)})") from None
    try:
        policy.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise ValueError(f"{weights}: does not load into the tiny model ({_first_line(err)})") from None
    policy.freeze_text_encoder()
    dtype = _DTYPES[cfg.dtype]
    if dtype != torch.float32:
        policy.transformer.to(dtype)
        policy.model_dtype = dtype
    if cfg.gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig

        policy.transformer.requires_grad_(False)
        try:
            policy.transformer.add_adapter(
                PeftLoraConfig(
                    r=cfg.lora.rank,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules),
                    init_lora_weights="gaussian",
                )
            )
        except ValueError as err:  # peft: no module matches the targets
            raise ValueError(f"model.lora.target_modules {list(cfg.lora.target_modules)}: {_first_line(err)}") from None
    return policy.eval()  # the adapter's new modules (LoRA dropout) start in train mode
