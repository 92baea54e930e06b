"""FLUX.1-dev / FLUX.1-schnell behind the policy interface (models/base.py).

Loaded from a local directory in diffusers layout (transformer/, vae/, text_encoder/ (CLIP-L),
tokenizer/, text_encoder_2/ (T5-XXL), tokenizer_2/), or a hub id passed through to from_pretrained.

What the sampler sees is FluxPipeline's packed latent: a [(H/16)*(W/16), 64] token sequence (2x2 patches
of the 16-channel VAE latent), so ``latent_shape = (tokens, 64)`` and the SDE noise is drawn in that
space exactly as the reference implementations do. Conventions match FluxPipeline:
- time: the transformer gets s itself (the pipeline passes t/1000; the model scales by 1000 inside);
- guidance: FLUX.1-dev has ``guidance_embeds`` and gets ``model.guidance`` (3.5) per row; schnell has none;
- text: CLIP-L pooled output (77 tokens) + T5 last hidden state (512 tokens for dev, 256 for schnell,
  capped by the tokenizer's ``model_max_length``), txt_ids all zero, img_ids = (0, row, col);
- decode: unpack, latents / scaling_factor + shift_factor, VAE decode, [-1, 1] -> [0, 1].
"""
from __future__ import annotations

from typing import Optional

import torch

from egrpo_ray.config import ModelConfig
from egrpo_ray.algo.sampler import Conditioning
from egrpo_ray.models.diffusers_common import DiffusersPolicy, check_model_path, tokenizer_limit, torch_dtype


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)*(w/2), 4C] (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)*(w/2), 4C] -> [B, C, h, w] (FluxPipeline._unpack_latents), h and w in latent pixels."""
    b, n, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def latent_image_ids(h2: int, w2: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids [(h2*w2), 3] = (0, row, col) of the packed tokens (FluxPipeline._prepare_latent_image_ids)."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = torch.arange(h2)[:, None]
    ids[..., 2] = torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


class FluxPolicy(DiffusersPolicy):
    """FLUX transformer (trained: full or LoRA) + frozen VAE, CLIP-L and T5 encoders.

    Conditioning: ``prompt_embeds`` [B, S, 4096] (T5) and ``pooled_prompt_embeds`` [B, 768] (CLIP),
    both in the model dtype. ``forward`` returns the float32 velocity in packed-token space.
    """

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        cfg: ModelConfig,
        trainable_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(
            transformer, {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}, cfg,
            trainable_dtype,
        )
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        tcfg = transformer.config
        self.guidance_embeds = bool(tcfg.guidance_embeds)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        step = 2 * self.vae_scale_factor
        if cfg.resolution % step:
            raise ValueError(f"model.resolution {cfg.resolution} must be a multiple of {step} for FLUX")
        self.latent_hw = cfg.resolution // self.vae_scale_factor
        grid = self.latent_hw // 2
        self.latent_shape = (grid * grid, int(tcfg.in_channels))
        self.clip_length = tokenizer_limit(tokenizer, 77)
        # FluxPipeline's default: 512 T5 tokens for dev; schnell (no guidance embedding) is used with 256.
        self.t5_length = tokenizer_limit(tokenizer_2, 512 if self.guidance_embeds else 256)
        self.register_buffer("img_ids", latent_image_ids(grid, grid), persistent=False)

    @property
    def pipeline_cls(self):
        from diffusers import FluxPipeline

        return FluxPipeline

    @classmethod
    def from_config(cls, cfg: ModelConfig, trainable_dtype: Optional[torch.dtype] = None) -> "FluxPolicy":
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = check_model_path(cfg.path, "flux")
        dtype = torch_dtype(cfg.dtype)
        transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        text_encoder_2 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        tokenizer_2 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2")
        return cls(transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, cfg, trainable_dtype)

    # -- text ----------------------------------------------------------------------------------
    def _encode(self, prompts: list[str]) -> Conditioning:
        te, te2 = self.frozen_module("text_encoder"), self.frozen_module("text_encoder_2")
        dev = next(te.parameters()).device
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                             return_tensors="pt").input_ids
        pooled = te(ids.to(dev), output_hidden_states=False).pooler_output
        ids2 = self.tokenizer_2(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                return_tensors="pt").input_ids
        dev2 = next(te2.parameters()).device
        embeds = te2(ids2.to(dev2), output_hidden_states=False)[0]
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # -- velocity ------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b = latents.shape[0]
        dev = self.device
        x = latents.to(device=dev, dtype=self.dtype)
        s = torch.as_tensor(sigma, device=dev, dtype=torch.float32).reshape(-1).expand(b)
        embeds = cond["prompt_embeds"].to(dev)
        guidance = None
        if self.guidance_embeds:
            guidance = torch.full((b,), float(self.cfg.guidance), device=dev, dtype=torch.float32)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=dev, dtype=self.dtype)
        with self._autocast():
            out = self.transformer(
                hidden_states=x,
                timestep=s.to(self.dtype),
                guidance=guidance,
                pooled_projections=cond["pooled_prompt_embeds"].to(dev),
                encoder_hidden_states=embeds,
                txt_ids=txt_ids,
                img_ids=self.img_ids.to(device=dev, dtype=self.dtype),
                return_dict=False,
            )[0]
        return out.float().to(latents.device)  # float32, on the caller's device

    # -- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        vae = self.frozen_module("vae")
        dev = next(vae.parameters()).device
        vdtype = next(vae.parameters()).dtype
        images = []
        for a in range(0, latents.shape[0], chunk):
            z = unpack_latents(latents[a : a + chunk].float(), self.latent_hw, self.latent_hw)
            z = z / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(z.to(device=dev, dtype=vdtype), return_dict=False)[0]
            images.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> packed latents (VAE mean), the inverse of decode (for tests/SFT)."""
        vae = self.frozen_module("vae")
        dev = next(vae.parameters()).device
        vdtype = next(vae.parameters()).dtype
        with torch.no_grad():
            z = vae.encode((images * 2 - 1).to(device=dev, dtype=vdtype)).latent_dist.mean
        z = (z.float() - vae.config.shift_factor) * vae.config.scaling_factor
        return pack_latents(z)
