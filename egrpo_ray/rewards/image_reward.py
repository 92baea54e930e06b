"""ImageReward (Xu et al. 2023) on transformers' BLIP components, without the ``image-reward`` package.

The original model (THUDM/ImageReward, ``ImageReward.pt``) is BLIP: a ViT-L/16 image encoder (224 px)
and a BERT-base text encoder whose every layer cross-attends to the image tokens, then an MLP head on
the [CLS] output: Linear(768,1024) Linear(1024,128) Linear(128,64) Linear(64,16) Linear(16,1) (dropout
between, no activations), and the score normalised with the training statistics:
reward = (mlp(h_cls) - 0.16717362830052426) / 1.0333394966054072.

Here the same computation is built from ``BlipVisionModel`` (pre-norm ViT, LayerNorm eps 1e-6, final
LayerNorm over all tokens) and ``BlipTextModel`` (BERT with cross-attention, run bidirectionally:
``is_decoder=False``), which are layer-for-layer the same modules as BLIP's ``vit.py`` and ``med.py``.
The checkpoint is loaded through an explicit key mapping (``map_imagereward_key``):

    blip.visual_encoder.cls_token            -> vision.embeddings.class_embedding
    blip.visual_encoder.pos_embed            -> vision.embeddings.position_embedding
    blip.visual_encoder.patch_embed.proj.*   -> vision.embeddings.patch_embedding.*
    blip.visual_encoder.blocks.{i}.norm1.*   -> vision.encoder.layers.{i}.layer_norm1.*
    blip.visual_encoder.blocks.{i}.attn.qkv.*  -> vision.encoder.layers.{i}.self_attn.qkv.*
    blip.visual_encoder.blocks.{i}.attn.proj.* -> vision.encoder.layers.{i}.self_attn.projection.*
    blip.visual_encoder.blocks.{i}.norm2.*   -> vision.encoder.layers.{i}.layer_norm2.*
    blip.visual_encoder.blocks.{i}.mlp.fc{1,2}.* -> vision.encoder.layers.{i}.mlp.fc{1,2}.*
    blip.visual_encoder.norm.*               -> vision.post_layernorm.*
    blip.text_encoder.*                      -> text.*   (BERT names are identical: embeddings.*,
                                                encoder.layer.{i}.{attention,crossattention}.{self,output}.*,
                                                intermediate.dense, output.{dense,LayerNorm})
    mlp.layers.{0,2,4,6,7}.*                 -> head.layers.{0,2,4,6,7}.*
    ignored (unused for scoring): blip.vision_proj.*, blip.text_proj.*, *.position_ids

Every parameter of the scoring model must be present in the checkpoint (missing keys raise); only the
listed keys may be left over. Layer sizes are read from the checkpoint's shapes; the number of
attention heads (not visible in shapes) comes from ``med_config.json`` for the text encoder (default 12)
and is width / 64 for the ViT (16 for ViT-L).

Preprocessing as ImageReward's ``_transform(224)``: 8-bit RGB PIL image -> Resize(224, bicubic, PIL)
-> CenterCrop(224) -> ToTensor -> Normalize(OpenAI CLIP mean/std). Prompts: ``bert-base-uncased``
tokenizer with BLIP's added tokens ([DEC] as bos, [ENC]), padded/truncated to 35 tokens.

``path``: a directory with ``ImageReward.pt`` (or one ``*.pt``/``*.pth``/``*.safetensors`` file), an
optional ``med_config.json``, and the bert-base-uncased tokenizer files (``vocab.txt`` ...), either in
the directory itself or in ``tokenizer/`` or ``bert-base-uncased/``; or the checkpoint file itself
with those files beside it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from egrpo_ray.config import RewardConfig
from egrpo_ray.images import to_uint8
from egrpo_ray.rewards.base import Reward
from egrpo_ray.rewards.hps import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_checkpoint_state

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)  # nn.Sequential positions of the Linear layers (dropouts between)
DEFAULT_MED_CONFIG = {  # ImageReward's med_config.json (BERT-base with cross-attention)
    "hidden_size": 768,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "vocab_size": 30524,
    "pad_token_id": 0,
}
IGNORED_KEY_PATTERNS = (r"^blip\.vision_proj\.", r"^blip\.text_proj\.", r"position_ids$")

# ImageReward (BLIP ViT) vision names <-> transformers BlipVisionModel names, one table for both
# directions; {i} is a block index, {p} weight|bias, {fc} fc1|fc2.
_VISION_NAMES = [
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.{p}", "embeddings.patch_embedding.{p}"),
    ("blocks.{i}.norm1.{p}", "encoder.layers.{i}.layer_norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "encoder.layers.{i}.self_attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}"),
    ("blocks.{i}.norm2.{p}", "encoder.layers.{i}.layer_norm2.{p}"),
    ("blocks.{i}.mlp.{fc}.{p}", "encoder.layers.{i}.mlp.{fc}.{p}"),
    ("norm.{p}", "post_layernorm.{p}"),
]
_SLOTS = {"i": r"\d+", "p": "weight|bias", "fc": "fc1|fc2"}


def _rename(name: str, table: Sequence[tuple[str, str]]) -> Optional[str]:
    """Match ``name`` against each pair's left side (a template) and fill in its right side."""
    for src, dst in table:
        pattern = re.escape(src)
        for slot, alternatives in _SLOTS.items():
            pattern = pattern.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{alternatives})")
        m = re.fullmatch(pattern, name)
        if m:
            return dst.format(**m.groupdict())
    return None


def map_imagereward_key(key: str) -> Optional[str]:
    """ImageReward.pt key -> key of ``ImageRewardNet``; None for keys the scorer does not use."""
    if any(re.search(p, key) for p in IGNORED_KEY_PATTERNS):
        return None
    if key.startswith("blip.visual_encoder."):
        ours = _rename(key[len("blip.visual_encoder."):], _VISION_NAMES)
        if ours is None:
            raise KeyError(f"unknown ImageReward vision key {key!r}")
        return "vision." + ours
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder."):]
    if key.startswith("mlp.layers."):
        return "head." + key[len("mlp."):]
    raise KeyError(f"unknown ImageReward key {key!r}")


def unmap_imagereward_key(key: str) -> str:
    """Inverse of map_imagereward_key (used to write checkpoints in the original layout)."""
    if key.startswith("head."):
        return "mlp." + key[len("head."):]
    if key.startswith("text."):
        return "blip.text_encoder." + key[len("text."):]
    original = _rename(key[len("vision."):], [(b, a) for a, b in _VISION_NAMES]) if key.startswith("vision.") else None
    if original is None:
        raise KeyError(f"unknown key {key!r}")
    return "blip.visual_encoder." + original


class RewardHead(nn.Module):
    """ImageReward's MLP: five Linear layers, dropout between the first four, no activations."""

    def __init__(self, dims: Sequence[int] = (768, 1024, 128, 64, 16, 1)):
        super().__init__()
        d = list(dims)
        self.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardNet(nn.Module):
    """BLIP image encoder + cross-attending text encoder + reward head (the scoring path of ImageReward)."""

    def __init__(self, vision_config, text_config, head_dims: Sequence[int]):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = RewardHead(head_dims)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        h = out.last_hidden_state[:, 0, :].float()
        return self.head(h).squeeze(-1)


def build_configs(state: dict[str, torch.Tensor], med_config: dict):
    """Vision/text configs and head sizes from the (original-layout) checkpoint's shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise KeyError(f"ImageReward checkpoint lacks {key!r}")
        return state[key]

    v = "blip.visual_encoder."
    width = need(v + "cls_token").shape[-1]
    patch = need(v + "patch_embed.proj.weight").shape[-1]
    positions = need(v + "pos_embed").shape[1]
    grid = int(round((positions - 1) ** 0.5))
    depth = len({int(m.group(1)) for k in state for m in [re.match(rf"^{re.escape(v)}blocks\.(\d+)\.", k)] if m})
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=need(v + "blocks.0.mlp.fc1.weight").shape[0],
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 64),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )
    t = "blip.text_encoder."
    hidden = need(t + "embeddings.word_embeddings.weight").shape[1]
    layers = len({int(m.group(1)) for k in state for m in [re.match(rf"^{re.escape(t)}encoder\.layer\.(\d+)\.", k)] if m})
    text = BlipTextConfig(
        vocab_size=need(t + "embeddings.word_embeddings.weight").shape[0],
        hidden_size=hidden,
        encoder_hidden_size=need(t + "encoder.layer.0.crossattention.self.key.weight").shape[1],
        intermediate_size=need(t + "encoder.layer.0.intermediate.dense.weight").shape[0],
        num_hidden_layers=layers,
        num_attention_heads=int(med_config.get("num_attention_heads", max(1, hidden // 64))),
        max_position_embeddings=need(t + "embeddings.position_embeddings.weight").shape[0],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        is_decoder=True,  # builds the cross-attention layers; forward runs with is_decoder=False
    )
    head = [need(f"mlp.layers.{i}.weight") for i in HEAD_LINEAR_INDICES]
    head_dims = [head[0].shape[1]] + [w.shape[0] for w in head]
    return vision, text, head_dims


def _find_files(path: Path) -> tuple[Path, Path, Optional[Path]]:
    """(checkpoint file, tokenizer directory, med_config.json or None)."""
    if path.is_file():
        ckpt, root = path, path.parent
    elif path.is_dir():
        root = path
        preferred = path / "ImageReward.pt"
        if preferred.is_file():
            ckpt = preferred
        else:
            files = sorted(list(path.glob("*.pt")) + list(path.glob("*.pth")) + list(path.glob("*.safetensors")))
            if len(files) != 1:
                raise FileNotFoundError(f"{path}: expected ImageReward.pt (found {len(files)} checkpoint files)")
            ckpt = files[0]
    else:
        raise FileNotFoundError(f"ImageReward path not found: {path}")
    tok = next((d for d in (root / "tokenizer", root / "bert-base-uncased", root)
                if (d / "vocab.txt").is_file() or (d / "tokenizer.json").is_file()), None)
    if tok is None:
        raise FileNotFoundError(f"{root}: no bert-base-uncased tokenizer (vocab.txt) in it or in tokenizer/")
    med = root / "med_config.json"
    return ckpt, tok, med if med.is_file() else None


def blip_tokenizer(directory: str | Path):
    """bert-base-uncased with BLIP's extra tokens ([DEC] as bos, [ENC]) as ImageReward's init_tokenizer adds."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    try:
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    except (ValueError, KeyError, TypeError):  # newer tokenizers: plain special token
        tok.add_tokens(["[ENC]"], special_tokens=True)
    return tok


class ImageRewardModel(Reward):
    """ImageReward score of (image, prompt), normalised as the original (about -2 .. 2)."""

    name = "imagereward"

    def __init__(self, path: str | Path, device: str = "cpu", batch_size: int = 16):
        ckpt, tok_dir, med_path = _find_files(Path(path))
        med = dict(DEFAULT_MED_CONFIG)
        if med_path is not None:
            med.update(json.loads(med_path.read_text()))
        raw = load_checkpoint_state(ckpt)
        vision_cfg, text_cfg, head_dims = build_configs(raw, med)
        self.net = ImageRewardNet(vision_cfg, text_cfg, head_dims)
        mapped, ignored = {}, []
        for k, v in raw.items():
            new = map_imagereward_key(k)
            if new is None:
                ignored.append(k)
            else:
                mapped[new] = v
        expected = self.net.state_dict()
        missing = [k for k in expected if k not in mapped]
        unexpected = [k for k in mapped if k not in expected]
        if missing or unexpected:
            what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise ValueError(f"{ckpt}: not an ImageReward checkpoint ({what})")
        self.net.load_state_dict(mapped, strict=True)
        self.ignored_keys = ignored
        self.device = torch.device(device)
        self.net = self.net.to(self.device).eval().requires_grad_(False)
        self.batch_size = batch_size
        self.tokenizer = blip_tokenizer(tok_dir)
        self.image_size = int(vision_cfg.image_size)

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "ImageRewardModel":
        if not cfg.path:
            raise ValueError("rewards: 'imagereward' needs path: a directory with ImageReward.pt and the BERT tokenizer")
        return cls(cfg.path, device=cfg.device, batch_size=cfg.batch_size)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """ImageReward's _transform on 8-bit PIL images (PIL bicubic resize, as the original)."""
        from PIL import Image
        from torchvision import transforms as T

        tf = T.Compose([
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
        ])
        x = to_uint8(images).cpu()
        return torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in x])

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"imagereward: {len(images)} images but {len(prompts)} prompts")
        out = []
        for a in range(0, len(images), self.batch_size):
            pix = self.preprocess(images[a : a + self.batch_size]).to(self.device)
            txt = self.tokenizer(list(prompts[a : a + self.batch_size]), padding="max_length", truncation=True,
                                 max_length=MAX_TEXT_LENGTH, return_tensors="pt")
            raw = self.net(pix, txt["input_ids"].to(self.device), txt["attention_mask"].to(self.device))
            out.append(((raw - REWARD_MEAN) / REWARD_STD).float().cpu())
        return torch.cat(out).float()
