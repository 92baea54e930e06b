"""Tiny random-weight models of the real architectures, saved in the real on-disk layouts.

Built once per test process (memoised) in a temporary directory, then loaded back by the code under
test through its real loading paths:
- ``flux_dir()`` / ``sd3_dir()``: diffusers pipelines (FluxTransformer2DModel / SD3Transformer2DModel,
  AutoencoderKL, CLIP and T5 text encoders) written by ``Pipeline.save_pretrained``; the CLIP
  tokenizers are trained in-process with the tokenizers library and written as vocab.json +
  merges.txt (the layout of the real FLUX / SD3 repos), the T5 tokenizer as tokenizer.json;
- ``hps_checkpoint()``: a tiny open_clip config registered in-process and its weights saved as
  ``{"state_dict": ...}`` like HPS_v2.1_compressed.pt;
- ``clip_dir()``: a transformers CLIPModel + CLIPProcessor (for the CLIP-score and PickScore rewards);
- ``imagereward_dir()``: an ImageReward.pt in the original BLIP key layout (written from the key list
  of ImageReward's public code, see ``imagereward_original_keys``), med_config.json and a BERT vocab.
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import torch

CORPUS = [
    "a photo of a cat", "a red circle at the top left", "a blue square in the center", "a green triangle",
    "an astronaut riding a horse on the moon", "a bowl of fruit on a wooden table", "a city skyline at night",
    "portrait of an old man, oil painting", "a dog running on the beach", "two birds on a branch",
    "a yellow car parked in the street", "mountains under a starry sky", "a cup of coffee", "cute robot",
]
TINY_OPEN_CLIP = "egrpo-tiny-hps"
RESOLUTION = 32  # image side for the tiny diffusion models (VAE factor 8 -> 4x4 latents)


@functools.lru_cache(maxsize=1)
def root() -> Path:
    d = Path(tempfile.mkdtemp(prefix="egrpo_tiny_real_"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


# ------------------------------------------------------------------------------------ tokenizers


def _clip_bpe(vocab_size: int = 400):
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(
            Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed", invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


@functools.lru_cache(maxsize=1)
def _clip_vocab():
    return _clip_bpe()


def write_clip_tokenizer(directory: Path, pad_token: str = "<|endoftext|>") -> "object":
    """vocab.json + merges.txt + tokenizer_config.json (the real repos' layout); returns the loaded tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }))
    return CLIPTokenizer.from_pretrained(str(directory))


def write_t5_tokenizer(directory: Path, max_length: int = 32):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    ])
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    t5 = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    t5.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))


def _clip_text_config(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _t5(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=16,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def _vae(scaling: float, shift: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False,
    )


# ----------------------------------------------------------------------------------- diffusion


@functools.lru_cache(maxsize=None)
def flux_dir(guidance_embeds: bool = True) -> str:
    """A tiny FLUX.1-dev (guidance_embeds=True) or FLUX.1-schnell-like pipeline in diffusers layout."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    out = root() / ("flux-dev" if guidance_embeds else "flux-schnell")
    tok_dir = out.with_name(out.name + "-tok")
    tokenizer = write_clip_tokenizer(tok_dir / "tokenizer")
    tokenizer_2 = write_t5_tokenizer(tok_dir / "tokenizer_2")
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden=32, projection=32))
    text_encoder_2 = _t5(tokenizer_2, d_model=32)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=scheduler, vae=_vae(0.3611, 0.1159), text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(str(out))
    # the real repos ship the CLIP tokenizer as vocab.json + merges.txt: use that layout
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(tok_dir / "tokenizer", out / "tokenizer")
    return str(out)


@functools.lru_cache(maxsize=None)
def sd3_dir(with_t5: bool = True) -> str:
    """A tiny SD3 pipeline: CLIP-L-like and CLIP-G-like encoders (hidden 16 each, projections 32) and a
    T5 of width 48, so the CLIP embeddings are zero-padded to the T5 width as in the real model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(1)
    out = root() / ("sd3" if with_t5 else "sd3-no-t5")
    tok_dir = out.with_name(out.name + "-tok")
    tok = write_clip_tokenizer(tok_dir / "tokenizer")
    tok2 = write_clip_tokenizer(tok_dir / "tokenizer_2", pad_token="!")
    tok3 = write_t5_tokenizer(tok_dir / "tokenizer_3") if with_t5 else None
    te = CLIPTextModelWithProjection(_clip_text_config(tok, hidden=16, projection=32))
    te2 = CLIPTextModelWithProjection(_clip_text_config(tok2, hidden=16, projection=32))
    te3 = _t5(tok3, d_model=48) if with_t5 else None
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 8, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=64,
        out_channels=16, pos_embed_max_size=8,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(1.5305, 0.0609),
        text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
    )
    pipe.save_pretrained(str(out))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out / name)
        shutil.copytree(tok_dir / name, out / name)
    return str(out)


# -------------------------------------------------------------------------------------- rewards


def register_tiny_open_clip() -> str:
    """Register a tiny open_clip architecture (ViT + text transformer, real vocab size) in-process."""
    import open_clip

    path = root() / f"{TINY_OPEN_CLIP}.json"
    if not path.exists():
        path.write_text(json.dumps({
            "embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
        }))
    if TINY_OPEN_CLIP not in open_clip.list_models():
        open_clip.add_model_config(str(path))
    return TINY_OPEN_CLIP


@functools.lru_cache(maxsize=1)
def hps_checkpoint() -> tuple[str, str]:
    """(checkpoint path, open_clip model name): ``{"state_dict": ...}`` as HPS_v2.1_compressed.pt."""
    import open_clip

    name = register_tiny_open_clip()
    torch.manual_seed(2)
    model = open_clip.create_model(name, pretrained=None)
    path = root() / "HPS_tiny_compressed.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return str(path), name


@functools.lru_cache(maxsize=1)
def clip_dir() -> str:
    """A tiny transformers CLIPModel + CLIPProcessor (32 px images) in one directory."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(3)
    out = root() / "clip"
    tok = write_clip_tokenizer(root() / "clip-tok")
    text = _clip_text_config(tok, hidden=32, projection=16).to_dict()
    vision = dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, projection_dim=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(str(out))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(str(out))
    return str(out)


BERT_WORDS = sorted({w for s in CORPUS for w in s.replace(",", " ,").split()}) + list("abcdefghijklmnopqrstuvwxyz,.")


def imagereward_original_keys(vision_depth: int, text_layers: int) -> list[str]:
    """Parameter names of ImageReward.pt, written out from ImageReward's public model code (BLIP_Pretrain:
    BLIP's vit.py VisionTransformer + med.py BertModel with cross-attention, and the MLP head)."""
    keys = ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed",
            "blip.visual_encoder.patch_embed.proj.weight", "blip.visual_encoder.patch_embed.proj.bias",
            "blip.visual_encoder.norm.weight", "blip.visual_encoder.norm.bias"]
    for i in range(vision_depth):
        b = f"blip.visual_encoder.blocks.{i}."
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [b + m + ".weight", b + m + ".bias"]
    t = "blip.text_encoder."
    keys += [t + "embeddings.word_embeddings.weight", t + "embeddings.position_embeddings.weight",
             t + "embeddings.LayerNorm.weight", t + "embeddings.LayerNorm.bias"]
    for i in range(text_layers):
        b = f"{t}encoder.layer.{i}."
        for att in ("attention", "crossattention"):
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys += [f"{b}{att}.{m}.weight", f"{b}{att}.{m}.bias"]
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [f"{b}{m}.weight", f"{b}{m}.bias"]
    for i in (0, 2, 4, 6, 7):
        keys += [f"mlp.layers.{i}.weight", f"mlp.layers.{i}.bias"]
    return keys


@functools.lru_cache(maxsize=1)
def imagereward_dir() -> str:
    """ImageReward.pt (original key layout, plus BLIP's unused vision_proj/text_proj and position_ids),
    med_config.json and a bert-base-uncased-style vocab.txt, all tiny."""
    from transformers import BlipTextConfig, BlipVisionConfig

    from egrpo_ray.rewards.image_reward import ImageRewardNet, unmap_imagereward_key

    torch.manual_seed(4)
    out = root() / "imagereward"
    (out / "tokenizer").mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + BERT_WORDS
    (out / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (out / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    med = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 64, "hidden_act": "gelu",
           "vocab_size": len(vocab) + 2, "encoder_width": 64, "add_cross_attention": True}
    (out / "med_config.json").write_text(json.dumps(med))
    vision = BlipVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, layer_norm_eps=1e-6)
    text = BlipTextConfig(vocab_size=len(vocab) + 2, hidden_size=32, encoder_hidden_size=128, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, is_decoder=True)
    net = ImageRewardNet(vision, text, (32, 64, 32, 16, 8, 1))
    with torch.no_grad():  # make the head's output depend visibly on its input
        for p in net.head.parameters():
            p.normal_(0, 0.5)
    state = {unmap_imagereward_key(k): v for k, v in net.state_dict().items()}
    state["blip.vision_proj.weight"] = torch.randn(16, 128)
    state["blip.vision_proj.bias"] = torch.zeros(16)
    state["blip.text_proj.weight"] = torch.randn(16, 32)
    state["blip.text_proj.bias"] = torch.zeros(16)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    torch.save(state, out / "ImageReward.pt")
    return str(out)
