"""The learned rewards (HPS-v2.1, CLIP score, PickScore, ImageReward) load from local checkpoints built
in-process (tests/tiny_real_models.py) through their real loading paths, and score batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    import tiny_real_models as tiny
except ImportError:  # tests/ as a package
    from tests import tiny_real_models as tiny

from egrpo_ray.config import RewardConfig
from egrpo_ray.rewards import build_reward

torch.set_num_threads(min(2, torch.get_num_threads()))
PROMPTS = ["a photo of a cat", "a red circle at the top left", "mountains under a starry sky"]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 48, 40, generator=g)  # non-square, not the model size: exercises resize + crop


def _check_scores(reward, images):
    s1 = reward(images, PROMPTS)
    assert s1.shape == (3,) and s1.dtype == torch.float32 and s1.device.type == "cpu"
    assert torch.isfinite(s1).all()
    torch.testing.assert_close(reward(images, PROMPTS), s1, rtol=0, atol=0)  # deterministic
    # batching inside the reward does not change scores
    reward_bs = getattr(reward, "batch_size", None) or getattr(reward.scorer, "batch_size")
    one_by_one = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(one_by_one, s1, atol=1e-5, rtol=1e-5)
    assert reward_bs >= 1
    # the prompt matters
    swapped = reward(images, [PROMPTS[1], PROMPTS[2], PROMPTS[0]])
    assert not torch.allclose(swapped, s1)
    return s1


# -------------------------------------------------------------------------------------------- HPS


def test_hps_loads_strictly_and_scores(images):
    import open_clip
    from torchvision import transforms as T

    from egrpo_ray.rewards.hps import HPSv21Reward

    path, name = tiny.hps_checkpoint()
    reward = HPSv21Reward.from_config(RewardConfig(name="hps", path=path, batch_size=2), model_name=name)
    s = _check_scores(reward, images)
    assert float(s.abs().max()) <= 1.0 + 1e-5  # a cosine

    # the same number as hpsv2's recipe written out with torchvision on the saved 8-bit image:
    # ToTensor -> Resize(224->model size, bicubic) on the tensor -> CenterCrop -> Normalize; cosine of features
    model = open_clip.create_model(name, pretrained=None)
    model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    model.eval()
    size = reward.image_size
    tf = T.Compose([T.ToTensor(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    u8 = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    from PIL import Image

    x = torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in u8])
    with torch.no_grad():
        out = model(x, open_clip.get_tokenizer(name)(PROMPTS))
    ref = (out["image_features"] * out["text_features"]).sum(-1) if isinstance(out, dict) else None
    if ref is None:
        ref = (F.normalize(out[0], dim=-1) * F.normalize(out[1], dim=-1)).sum(-1)
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-4)


def test_hps_rejects_wrong_checkpoints(tmp_path):
    from egrpo_ray.rewards.hps import HPSv21Reward

    path, name = tiny.hps_checkpoint()
    state = torch.load(path, weights_only=True)["state_dict"]
    missing = dict(state)
    missing.pop("visual.proj")
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not an HPS"):
        HPSv21Reward(tmp_path / "missing.pt", model_name=name)
    extra = dict(state, extra_weight=torch.zeros(1))
    torch.save(extra, tmp_path / "extra.pt")  # also: a bare state dict without the "state_dict" wrapper
    with pytest.raises(ValueError, match="not an HPS"):
        HPSv21Reward(tmp_path / "extra.pt", model_name=name)
    with pytest.raises(FileNotFoundError):
        HPSv21Reward(tmp_path / "nope.pt", model_name=name)
    with pytest.raises(ValueError, match="needs path"):
        build_reward(RewardConfig(name="hps"))
    # a DDP "module." prefix and a bare dict load too
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    HPSv21Reward(tmp_path / "ddp.pt", model_name=name)


def test_hps_vit_h_14_tokenizer_is_offline():
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-H-14")(["a photo of a cat"])
    assert tokens.shape == (1, 77) and int(tokens[0, 0]) == 49406  # <start_of_text>


# ------------------------------------------------------------------------------ CLIP and PickScore


def test_clip_score_and_pickscore(images):
    from transformers import CLIPModel, CLIPProcessor

    from egrpo_ray.rewards.clip_score import to_uint8_images

    path = tiny.clip_dir()
    clip = build_reward(RewardConfig(name="clip", path=path, batch_size=2))
    s = _check_scores(clip, images)
    assert float(s.abs().max()) <= 1.0 + 1e-5
    # reference: CLIPModel's own logits_per_image / logit_scale on the processor's inputs
    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    inputs = proc(text=PROMPTS, images=to_uint8_images(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    ref = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-4)

    pick = build_reward(RewardConfig(name="pickscore", path=path, batch_size=2))
    p = _check_scores(pick, images)
    torch.testing.assert_close(p, out.logits_per_image.diagonal(), atol=1e-4, rtol=1e-4)  # logit_scale * cosine
    from egrpo_ray.rewards.pickscore import PickScoreReward

    cos = PickScoreReward(path, scale="cosine")(images, PROMPTS)
    torch.testing.assert_close(cos, s)


def test_clip_missing_dir_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_reward(RewardConfig(name="clip", path=str(tmp_path / "nope")))


# ------------------------------------------------------------------------------------ ImageReward


def _blip_reference(state, pixel, ids, mask, v_heads, t_heads):
    """ImageReward's scoring forward written directly from BLIP's vit.py / med.py on the ORIGINAL key
    names (independent of the transformers modules and of the key mapping)."""
    W = lambda k: state[k].float()  # noqa: E731

    def lin(x, p):
        return F.linear(x, W(p + ".weight"), W(p + ".bias"))

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], W(p + ".weight"), W(p + ".bias"), eps)

    def attend(q, k, v, heads, bias=None):
        b, n, d = q.shape
        split = lambda t: t.view(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        a = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
        if bias is not None:
            a = a + bias
        return (a.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)

    v = "blip.visual_encoder."
    x = F.conv2d(pixel, W(v + "patch_embed.proj.weight"), W(v + "patch_embed.proj.bias"), stride=W(v + "patch_embed.proj.weight").shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([W(v + "cls_token").expand(len(x), -1, -1), x], 1) + W(v + "pos_embed")[:, : x.shape[1] + 1]
    i = 0
    while f"{v}blocks.{i}.norm1.weight" in state:
        b = f"{v}blocks.{i}."
        h = ln(x, b + "norm1", 1e-6)
        q, k, vv = lin(h, b + "attn.qkv").chunk(3, -1)
        x = x + lin(attend(q, k, vv, v_heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
        i += 1
    img = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    pos = torch.arange(ids.shape[1])
    h = W(t + "embeddings.word_embeddings.weight")[ids] + W(t + "embeddings.position_embeddings.weight")[pos]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    i = 0
    while f"{t}encoder.layer.{i}.attention.self.query.weight" in state:
        b = f"{t}encoder.layer.{i}."
        a = attend(lin(h, b + "attention.self.query"), lin(h, b + "attention.self.key"), lin(h, b + "attention.self.value"), t_heads, bias)
        h = ln(h + lin(a, b + "attention.output.dense"), b + "attention.output.LayerNorm", 1e-12)
        c = attend(lin(h, b + "crossattention.self.query"), lin(img, b + "crossattention.self.key"),
                   lin(img, b + "crossattention.self.value"), t_heads)
        h = ln(h + lin(c, b + "crossattention.output.dense"), b + "crossattention.output.LayerNorm", 1e-12)
        h = ln(h + lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense"), b + "output.LayerNorm", 1e-12)
        i += 1
    z = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        z = lin(z, f"mlp.layers.{j}")
    return (z.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_original_layout_and_scores(images):
    from egrpo_ray.rewards.image_reward import ImageRewardModel

    path = tiny.imagereward_dir()
    state = torch.load(f"{path}/ImageReward.pt", weights_only=True)
    expected = set(tiny.imagereward_original_keys(vision_depth=2, text_layers=2))
    extras = {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
              "blip.text_encoder.embeddings.position_ids"}
    assert set(state) == expected | extras  # the checkpoint is in ImageReward's own key layout

    reward = build_reward(RewardConfig(name="imagereward", path=path, batch_size=2))
    assert isinstance(reward, ImageRewardModel) and set(reward.ignored_keys) == extras
    s = _check_scores(reward, images)
    # same numbers as BLIP's forward written directly on the original keys
    pix = reward.preprocess(images)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35) and int(tok["input_ids"][0, 0]) == reward.tokenizer.cls_token_id
    ref = _blip_reference(state, pix, tok["input_ids"], tok["attention_mask"], v_heads=2, t_heads=2)
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=1e-4)


def test_imagereward_rejects_incomplete_checkpoint(tmp_path):
    import shutil

    from egrpo_ray.rewards.image_reward import ImageRewardModel

    src = tiny.imagereward_dir()
    shutil.copytree(src, tmp_path / "ir")
    state = torch.load(tmp_path / "ir" / "ImageReward.pt", weights_only=True)
    state.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.bias")
    torch.save(state, tmp_path / "ir" / "ImageReward.pt")
    with pytest.raises(ValueError, match="missing"):
        ImageRewardModel(tmp_path / "ir")
    with pytest.raises(FileNotFoundError):
        ImageRewardModel(tmp_path / "nothing")
