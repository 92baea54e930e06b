"""HPS-v2.1 (Human Preference Score v2.1) on open-clip-torch, without the ``hpsv2`` package.

The ``hpsv2`` package pins protobuf<4 (breaks Ray) and always downloads; its model is a plain open_clip
ViT-H-14 whose checkpoint (``HPS_v2.1_compressed.pt``, ``{"state_dict": ...}``) loads strictly into
open-clip-torch. What this module reproduces of hpsv2 (hpsv2/img_score.py + its open_clip fork's
``image_transform(224, is_train=False)``):

- model: ``open_clip.create_model("ViT-H-14", pretrained=None)``; the checkpoint's ``state_dict``
  loaded with ``strict=True`` (weights_only torch.load, or a .safetensors file);
- preprocessing (val transform): RGB image -> ToTensor (uint8 / 255) -> Resize(224, bicubic) on the
  tensor (shortest side; antialiased, torchvision's default for tensors) -> CenterCrop(224) ->
  Normalize(OpenAI CLIP mean/std). Our inputs are float images; by default they are first quantised to
  8 bits, as the saved image hpsv2 scores would be (``quantize=False`` skips that);
- tokenizer: ``open_clip.get_tokenizer("ViT-H-14")`` (the BPE vocabulary ships inside open_clip, so it
  works offline), 77 tokens;
- score: diag(image_features @ text_features.T) with both features L2-normalised, i.e. the cosine
  similarity (no logit scale), under CUDA autocast on a GPU as hpsv2 does.

``model_name`` may name another open_clip architecture (the tests register a tiny config in-process);
the preprocessing then uses that model's image size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from egrpo_ray.config import RewardConfig
from egrpo_ray.images import to_float, to_uint8
from egrpo_ray.rewards.base import Reward

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """What saving as an 8-bit image and reading it back with ToTensor does to a float image in [0, 1]."""
    return to_float(to_uint8(images))


def clip_val_transform(images: torch.Tensor, size: int, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Resize shortest side to ``size`` (bicubic, antialiased), centre crop, normalise: [B,3,H,W] in [0,1]."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = TF.resize(images, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    x = TF.center_crop(x, [size, size])
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .pt/.pth/.bin (weights_only torch.load; ``{"state_dict": ...}`` unwrapped,
    a DDP ``module.`` prefix stripped) or a .safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reward checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:  # pickle with non-tensor objects
            raise ValueError(f"{p}: cannot be read with torch.load(weights_only=True): {err}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{p}: not a state dict")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


class HPSv21Reward(Reward):
    """HPS-v2.1 score of (image, prompt): the cosine of open_clip ViT-H-14 features, about 0.2-0.4."""

    name = "hps"

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        batch_size: int = 16,
        model_name: str = "ViT-H-14",
        quantize: bool = True,
    ):
        import open_clip

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.quantize = quantize
        state = load_checkpoint_state(checkpoint)
        model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0:3]
            raise ValueError(f"{checkpoint}: not an HPS/open_clip {model_name} checkpoint ({' '.join(first)})") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @classmethod
    def from_config(cls, cfg: RewardConfig, **kwargs) -> "HPSv21Reward":
        if not cfg.path:
            raise ValueError("rewards: 'hps' needs path: the HPS_v2.1_compressed.pt checkpoint (a local file)")
        if cfg.model_name:
            kwargs.setdefault("model_name", cfg.model_name)
        return cls(cfg.path, device=cfg.device, batch_size=cfg.batch_size, **kwargs)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        import contextlib

        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"hps: {len(images)} images but {len(prompts)} prompts")
        scores = []
        for a in range(0, len(images), self.batch_size):
            x = to_float(images[a : a + self.batch_size].to(self.device))
            if self.quantize:
                x = quantize_8bit(x)
            x = clip_val_transform(x, self.image_size)
            tokens = self.tokenizer(list(prompts[a : a + self.batch_size])).to(self.device)
            with self._autocast():
                img = self.model.encode_image(x)
                txt = self.model.encode_text(tokens)
            img = F.normalize(img.float(), dim=-1)
            txt = F.normalize(txt.float(), dim=-1)
            scores.append((img * txt).sum(-1).cpu())
        return torch.cat(scores).float()
