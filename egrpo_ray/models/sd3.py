"""Stable Diffusion 3 / 3.5 behind the policy interface (models/base.py).

Loaded from a local directory in diffusers layout (transformer/, vae/, text_encoder/ + tokenizer/
(CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G), text_encoder_3/ + tokenizer_3/ (T5-XXL, optional:
without it the T5 part of the conditioning is zeros, as StableDiffusion3Pipeline does)), or a hub id.

Conventions match StableDiffusion3Pipeline:
- latents [16, H/8, W/8]; the transformer gets the timestep 1000 * s;
- text: both CLIPs' penultimate hidden states concatenated on channels, zero-padded to the T5 width,
  then concatenated with T5's last hidden state on the sequence (77 + 256 tokens); pooled = both
  CLIPs' projected pooled outputs concatenated;
- CFG (``model.cfg_scale`` > 1): the empty prompt "" is the unconditional input;
  v = v_uncond + scale * (v_cond - v_uncond), computed in ONE batched forward of 2B rows;
- decode: latents / scaling_factor + shift_factor, VAE decode, [-1, 1] -> [0, 1].
"""
from __future__ import annotations

from typing import Optional

import torch

from egrpo_ray.config import ModelConfig
from egrpo_ray.algo.sampler import Conditioning
from egrpo_ray.models.diffusers_common import (
    DiffusersPolicy,
    check_model_path,
    has_subfolder,
    tokenizer_limit,
    torch_dtype,
)


class SD3Policy(DiffusersPolicy):
    """SD3 transformer (trained: full or LoRA) + frozen VAE and three text encoders.

    Conditioning: ``prompt_embeds`` [B, 77 + S, 4096] and ``pooled_prompt_embeds`` [B, 2048] in the model
    dtype; the unconditional embedding for CFG is kept once inside the policy, not per row.
    """

    def __init__(
        self,
        transformer,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        cfg: ModelConfig,
        trainable_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(
            transformer,
            {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3},
            cfg,
            trainable_dtype,
        )
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        patch = int(transformer.config.patch_size)
        step = self.vae_scale_factor * patch
        if cfg.resolution % step:
            raise ValueError(f"model.resolution {cfg.resolution} must be a multiple of {step} for SD3")
        hw = cfg.resolution // self.vae_scale_factor
        self.latent_shape = (int(transformer.config.in_channels), hw, hw)
        self.cfg_scale = float(cfg.cfg_scale)
        self.clip_length = tokenizer_limit(tokenizer, 77)
        self.t5_length = tokenizer_limit(tokenizer_3, 256) if tokenizer_3 is not None else 256
        self._uncond: Optional[Conditioning] = None

    @property
    def pipeline_cls(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    @classmethod
    def from_config(cls, cfg: ModelConfig, trainable_dtype: Optional[torch.dtype] = None) -> "SD3Policy":
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        path = check_model_path(cfg.path, "sd3")
        dtype = torch_dtype(cfg.dtype)
        transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype)
        te = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        te3 = tok3 = None
        if has_subfolder(path, "text_encoder_3"):
            te3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype)
            tok3 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3")
        return cls(transformer, vae, te, tok, te2, tok2, te3, tok3, cfg, trainable_dtype)

    # -- text ----------------------------------------------------------------------------------
    def _clip(self, encoder, tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        dev = next(encoder.parameters()).device
        ids = tokenizer(prompts, padding="max_length", max_length=self.clip_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(dev), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # penultimate layer, projected pooled output

    def _encode(self, prompts: list[str]) -> Conditioning:
        h1, p1 = self._clip(self.frozen_module("text_encoder"), self.tokenizer, prompts)
        h2, p2 = self._clip(self.frozen_module("text_encoder_2"), self.tokenizer_2, prompts)
        clip = torch.cat([h1, h2.to(h1.device)], dim=-1)
        te3 = self.frozen_module("text_encoder_3")
        if te3 is not None:
            ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
            t5 = te3(ids.to(next(te3.parameters()).device))[0].to(clip.device)
        else:
            width = int(self.transformer.config.joint_attention_dim)
            t5 = torch.zeros(len(prompts), self.t5_length, width, device=clip.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip.to(self.dtype), t5.to(self.dtype)], dim=-2)
        pooled = torch.cat([p1, p2.to(p1.device)], dim=-1)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled.to(self.dtype)}

    def uncond(self) -> Conditioning:
        """The unconditional ("" prompt) embedding, one row, on the policy's device."""
        if self._uncond is None:
            with torch.no_grad():
                self._uncond = {k: v.detach() for k, v in self._encode([""]).items()}
        self._uncond = {k: v.to(self.device) for k, v in self._uncond.items()}
        return self._uncond

    # -- velocity ------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b = latents.shape[0]
        dev = self.device
        x = latents.to(device=dev, dtype=self.dtype)
        t = torch.as_tensor(sigma, device=dev, dtype=torch.float32).reshape(-1).expand(b) * 1000.0
        embeds = cond["prompt_embeds"].to(dev)
        pooled = cond["pooled_prompt_embeds"].to(dev)
        cfg = self.cfg_scale > 1.0
        if cfg:
            u = self.uncond()
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            embeds = torch.cat([u["prompt_embeds"].expand(b, -1, -1), embeds])
            pooled = torch.cat([u["pooled_prompt_embeds"].expand(b, -1), pooled])
        with self._autocast():
            out = self.transformer(
                hidden_states=x,
                timestep=t,  # float32, as the pipeline passes it (1000 * s would round in bf16)
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        out = out.float()
        if cfg:
            v_uncond, v_cond = out.chunk(2)
            out = v_uncond + self.cfg_scale * (v_cond - v_uncond)
        return out.to(latents.device)  # float32, on the caller's device

    # -- images --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, chunk: int = 4) -> torch.Tensor:
        vae = self.frozen_module("vae")
        dev = next(vae.parameters()).device
        vdtype = next(vae.parameters()).dtype
        images = []
        for a in range(0, latents.shape[0], chunk):
            z = latents[a : a + chunk].float() / vae.config.scaling_factor + vae.config.shift_factor
            img = vae.decode(z.to(device=dev, dtype=vdtype), return_dict=False)[0]
            images.append((img.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)
