"""The shipped tiny model: weights, manifest, policy interface, and room for RL (fast, CPU)."""
import json
import shutil

import pytest
import torch

from egrpo_ray.config import LoraConfig, ModelConfig
from egrpo_ray.models import build_policy
from egrpo_ray.models import tiny
from egrpo_ray.tasks import shapes


@pytest.fixture(scope="module")
def policy():
    return build_policy(ModelConfig())


def test_shipped_weights_match_manifest():
    manifest = tiny.read_manifest()
    weights = tiny.ASSET_DIR / tiny.WEIGHTS_FILE
    assert weights.stat().st_size <= 20 * 1024 * 1024
    assert tiny.file_sha256(weights) == manifest["sha256"]
    assert manifest["data_version"] == shapes.DATA_VERSION
    assert manifest["command"].startswith("egrpo-ray pretrain-tiny")
    assert f"--seed {manifest['seed']}" in manifest["command"] and f"--steps {manifest['steps']}" in manifest["command"]
    assert manifest["model_config"]["transformer"]["guidance_embeds"] is True
    assert manifest["training"]["hparams"]["mixture"] and manifest["environment"]["threads"] == 1
    ev = manifest["evaluation"]
    assert ev["heldout_random_weights"]["alignment"] < ev["heldout"]["alignment"] < ev["heldout_ground_truth"]["alignment"]
    assert ev["heldout_ground_truth"]["alignment"] > 0.97
    assert ev["heldout_relation"]["alignment"] <= 0.5 and ev["heldout_count"]["alignment"] <= 0.5
    assert ev["heldout_single"]["alignment"] > 0.4 and ev["heldout_random_weights"]["alignment"] < 0.02
    vocab = manifest["model_config"]["text_encoder"]["vocab"]
    assert vocab == [tiny.PAD, tiny.UNK, *shapes.VOCAB]


def test_load_checks_sha_and_resolution(tmp_path):
    for name in (tiny.WEIGHTS_FILE, tiny.MANIFEST_FILE):
        shutil.copy(tiny.ASSET_DIR / name, tmp_path / name)
    assert isinstance(build_policy(ModelConfig(path=str(tmp_path))), tiny.TinyPolicy)
    manifest = json.loads((tmp_path / tiny.MANIFEST_FILE).read_text())
    manifest["sha256"] = "0" * 64
    (tmp_path / tiny.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="sha256"):
        build_policy(ModelConfig(path=str(tmp_path)))
    with pytest.raises(ValueError, match="resolution"):
        build_policy(ModelConfig(resolution=64))
    with pytest.raises(FileNotFoundError):
        build_policy(ModelConfig(path=str(tmp_path / "missing")))


def test_interface_shapes_and_dtypes(policy):
    assert isinstance(policy, tiny.TinyPolicy)
    assert policy.latent_shape == (64, 48)
    prompts = shapes.heldout_prompts()[:3] + ["a purple blob somewhere"]
    cond = policy.encode_prompts(prompts)
    assert cond["prompt_embeds"].shape == (4, 8, 64) and cond["pooled"].shape == (4, 64)
    assert not cond["prompt_embeds"].requires_grad and not cond["pooled"].requires_grad
    assert torch.equal(policy.encode_prompts(prompts[:1])["pooled"][0], cond["pooled"][0])  # cached, same
    ids, mask = policy.text_encoder.tokenize(["a purple circle"])
    assert ids[0, 1] == 1 and mask.sum() == 3  # unknown word -> UNK
    x = torch.randn(4, 64, 48)
    v = policy(x, torch.tensor([1.0, 0.7, 0.3, 0.0]), cond)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    v_scalar = policy(x, torch.tensor(0.5), cond)
    assert torch.allclose(v_scalar, policy(x, torch.full((4,), 0.5), cond))
    img = policy.decode(x * 3)
    assert img.shape == (4, 3, 32, 32) and img.min() >= 0 and img.max() <= 1


def test_pack_round_trip_and_decode_inverts_scaling(policy):
    gt = shapes.render_batch(shapes.all_specs()[:5])
    lat = tiny.images_to_latents(gt)
    assert lat.shape == (5, 64, 48)
    assert torch.equal(tiny.unpack(tiny.pack(gt)), gt)
    assert torch.allclose(policy.decode(lat), gt, atol=1e-6)
    # a token holds one 4x4 patch: token 9 = patch row 1, column 1
    assert torch.equal(tiny.pack(gt)[:, 9].reshape(5, 3, 4, 4), gt[:, :, 4:8, 4:8])
    assert torch.equal(tiny.image_ids()[9], torch.tensor([0.0, 1.0, 1.0]))


def test_trainable_state_is_transformer_only(policy):
    state = policy.trainable_state()
    n_transformer = len(list(policy.transformer.parameters()))
    assert len(state) == n_transformer and all(k.startswith("transformer.") for k in state)
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())
    x = torch.randn(2, 64, 48)
    cond = policy.encode_prompts(shapes.train_prompts()[:2])
    policy.zero_grad()
    policy(x, torch.tensor([0.5, 0.5]), cond).square().mean().backward()
    assert all(p.grad is not None for p in policy.transformer.parameters())
    policy.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in state.items()}
    policy.load_trainable_state({k: v + 1 for k, v in before.items()})
    assert all(torch.equal(policy.trainable_state()[k], before[k] + 1) for k in before)
    policy.load_trainable_state(before)


def test_lora_and_bf16_options():
    x = torch.randn(2, 64, 48)
    sigma = torch.tensor([0.9, 0.2])
    base = build_policy(ModelConfig())
    cond = base.encode_prompts(shapes.train_prompts()[:2])
    lora = build_policy(ModelConfig(lora=LoraConfig(enabled=True, rank=4)))
    state = lora.trainable_state()
    assert state and all("lora" in k for k in state)
    with torch.no_grad():
        assert torch.allclose(lora(x, sigma, cond), base(x, sigma, cond), atol=1e-5)  # LoRA starts as a no-op
        bf = build_policy(ModelConfig(dtype="bfloat16"))
        v = bf(x, sigma, cond)
    # bf16 rounds the x1000 time/guidance embeddings coarsely: close, not equal
    assert v.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(v.flatten(), base(x, sigma, cond).flatten(), dim=0) > 0.95


def test_base_model_leaves_room_for_rl(policy):
    """Single objects are learned, held-out relations and counts only weakly: RL has room and spread."""
    from egrpo_ray.rewards.alignment import AlignmentReward
    from egrpo_ray.tasks import scenes
    from egrpo_ray.tiny_pretrain import sample_images

    reward = AlignmentReward()

    def score(model, prompts):
        g = torch.Generator().manual_seed(0)
        return reward(sample_images(model, prompts, steps=16, shift=3.0, generator=g), prompts)

    single = shapes.heldout_prompts()
    compositional = scenes.prompts("heldout", ("relation", "count"))[:24]
    base_single, base_comp = score(policy, single).mean().item(), score(policy, compositional)
    rand = score(tiny.build_tiny_policy(7), compositional).mean().item()
    gt = reward(scenes.render_scenes(compositional, torch.Generator().manual_seed(0)), compositional).mean().item()
    assert rand < 0.05 and gt > 0.95
    assert base_single > base_comp.mean().item() + 0.15
    assert rand + 0.02 < base_comp.mean().item() < 0.5
    assert base_comp.std() > 0.03 and (base_comp > 0).float().mean() > 0.5  # spread, not all zeros
