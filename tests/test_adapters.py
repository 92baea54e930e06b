"""FLUX and SD3 policy adapters on tiny random models of the real architectures (tests/tiny_real_models.py).

Checks against diffusers' own pipelines built from the same saved directory: text conditioning equals
``Pipeline.encode_prompt``; ODE sampling + decode through the policy equals ``Pipeline.__call__`` with the
same sigmas and noise (so time scaling, guidance, packing, position ids, CFG and the VAE scaling/shift
are the pipelines' conventions); a LoRA saved by the policy loads through ``load_lora_weights``.
"""
from __future__ import annotations

import pytest
import torch

try:
    import tiny_real_models as tiny
except ImportError:  # tests/ as a package
    from tests import tiny_real_models as tiny

from egrpo_ray.algo.sampler import sample_ode
from egrpo_ray.algo.schedule import shifted_sigmas
from egrpo_ray.checkpoint import load_lora, save_lora
from egrpo_ray.config import LoraConfig, ModelConfig
from egrpo_ray.models import build_policy

torch.set_num_threads(min(2, torch.get_num_threads()))
PROMPTS = ["a photo of a cat", "an astronaut riding a horse on the moon"]
LORA = LoraConfig(enabled=True, rank=4, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])


@pytest.fixture(scope="session")
def flux_path():
    return tiny.flux_dir()


@pytest.fixture(scope="session")
def sd3_path():
    return tiny.sd3_dir()


def flux_cfg(path, **kw):
    return ModelConfig(kind="flux", path=path, resolution=tiny.RESOLUTION, **kw)


def sd3_cfg(path, **kw):
    return ModelConfig(kind="sd3", path=path, resolution=tiny.RESOLUTION, **kw)


def _pipeline_scheduler():
    """An Euler flow scheduler that uses the given sigmas as they are (shift 1, no dynamic shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def _perturb_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ------------------------------------------------------------------------------------------ FLUX


def test_flux_shapes_dtypes_and_cache(flux_path):
    pol = build_policy(flux_cfg(flux_path, dtype="bfloat16"))
    assert type(pol).__name__ == "FluxPolicy"
    assert pol.latent_shape == ((tiny.RESOLUTION // 16) ** 2, 64)
    assert pol.guidance_embeds and pol.t5_length == 32  # dev default 512, capped by the tokenizer
    cond = pol.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 32, 32) and cond["pooled_prompt_embeds"].shape == (2, 32)
    assert cond["prompt_embeds"].dtype == torch.bfloat16
    misses = pol.cache.misses
    again = pol.encode_prompts([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert pol.cache.misses == misses  # cached per prompt
    assert torch.equal(again["prompt_embeds"][1], cond["prompt_embeds"][0])
    x = torch.randn(3, *pol.latent_shape)
    v = pol(x, torch.tensor([1.0, 0.6, 0.1]), again)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    img = pol.decode(x)
    assert img.shape == (3, 3, tiny.RESOLUTION, tiny.RESOLUTION) and img.dtype == torch.float32
    assert 0 <= float(img.min()) and float(img.max()) <= 1
    # only the transformer is a registered module (what DDP and trainable_state see)
    names = [n for n, _ in pol.named_parameters()]
    assert names and all(n.startswith("transformer.") for n in names)
    assert set(pol.trainable_state()) == set(names)


def test_flux_matches_pipeline(flux_path):
    """Policy conditioning, packing, ODE sampling and decode equal FluxPipeline's (float32)."""
    from diffusers import FluxPipeline

    pol = build_policy(flux_cfg(flux_path, dtype="float32", guidance=3.5))
    pipe = FluxPipeline.from_pretrained(flux_path, dtype=torch.float32)
    pipe.scheduler = _pipeline_scheduler()
    embeds, pooled, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=pol.t5_length)
    cond = pol.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)
    # packing and position ids are FluxPipeline's
    from egrpo_ray.models.flux import latent_image_ids, pack_latents, unpack_latents

    z = torch.randn(2, 16, 4, 6)
    torch.testing.assert_close(pack_latents(z), FluxPipeline._pack_latents(z, 2, 16, 4, 6))
    torch.testing.assert_close(unpack_latents(pack_latents(z), 4, 6), z)
    torch.testing.assert_close(latent_image_ids(2, 3), FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32))

    sigmas = shifted_sigmas(4, 3.0)
    noise = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(0))
    ours = pol.decode(sample_ode(pol, cond, noise, sigmas))
    ref = pipe(prompt=PROMPTS, height=tiny.RESOLUTION, width=tiny.RESOLUTION, num_inference_steps=4,
               sigmas=sigmas[:-1].tolist(), guidance_scale=3.5, latents=noise.clone(), output_type="pt",
               max_sequence_length=pol.t5_length).images
    torch.testing.assert_close(ours, ref.float(), atol=2e-5, rtol=1e-4)


def test_flux_schnell_without_guidance_embedding():
    pol = build_policy(flux_cfg(tiny.flux_dir(guidance_embeds=False), dtype="float32"))
    assert not pol.guidance_embeds and pol.t5_length == 32  # schnell default 256, capped by the tokenizer
    v = pol(torch.randn(1, *pol.latent_shape), torch.tensor([0.5]), pol.encode_prompts(PROMPTS[:1]))
    assert v.shape == (1, *pol.latent_shape)


def test_flux_lora_saves_for_diffusers_and_loads_back(flux_path, tmp_path):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    pol = build_policy(flux_cfg(flux_path, dtype="bfloat16", lora=LORA))
    state = pol.trainable_state()
    assert state and all(".lora_" in k for k in state)
    assert all(v.dtype == torch.float32 for v in state.values())  # float32 LoRA weights on a bf16 model
    n_lora = sum(v.numel() for v in state.values())
    assert n_lora == sum(p.numel() for p in pol.parameters() if p.requires_grad)
    _perturb_lora(pol)
    weights = save_lora(pol, tmp_path / "lora")
    assert weights.name == "pytorch_lora_weights.safetensors"

    pipe = FluxPipeline.from_pretrained(flux_path, dtype=torch.float32)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
    ours = get_peft_model_state_dict(pol.transformer)
    assert set(loaded) == set(ours) and len(ours) == len(state)
    for k in ours:
        torch.testing.assert_close(loaded[k].float(), ours[k].float())
    cfg = pipe.transformer.peft_config["default_0"]
    assert cfg.r == 4 and cfg.lora_alpha == 8.0  # metadata kept rank and alpha (scale 2, not 1)

    # a fresh policy reads the same file back, and so does a policy without LoRA enabled
    pol2 = build_policy(flux_cfg(flux_path, dtype="bfloat16", lora=LORA))
    load_lora(pol2, tmp_path / "lora")
    for k, v in pol.trainable_state().items():
        torch.testing.assert_close(pol2.trainable_state()[k], v)
    pol3 = build_policy(flux_cfg(flux_path, dtype="bfloat16"))
    load_lora(pol3, tmp_path / "lora")
    x, s, c = torch.randn(2, *pol.latent_shape), torch.tensor([0.9, 0.3]), pol.encode_prompts(PROMPTS)
    torch.testing.assert_close(pol3(x, s, c), pol(x, s, c), atol=3e-2, rtol=3e-2)

    # trainable-state safetensors round trip
    pol.save_trainable(tmp_path / "ckpt")
    pol2 = build_policy(flux_cfg(flux_path, dtype="bfloat16", lora=LORA))
    pol2.load_trainable(tmp_path / "ckpt")
    torch.testing.assert_close(pol2(x, s, c), pol(x, s, c))


def test_flux_gradient_checkpointing_lora_and_full(flux_path):
    for lora in (LORA, LoraConfig()):
        pol = build_policy(flux_cfg(flux_path, dtype="bfloat16", gradient_checkpointing=True, lora=lora))
        assert pol.transformer.is_gradient_checkpointing
        pol.train()
        if lora.enabled:
            _perturb_lora(pol)
        v = pol(torch.randn(2, *pol.latent_shape), torch.tensor([0.8, 0.4]), pol.encode_prompts(PROMPTS))
        (v**2).mean().backward()
        named = dict(pol.named_parameters())
        grads = {k: p.grad for k, p in named.items() if p.requires_grad}
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())
        if lora.enabled:
            assert all(".lora_" in k for k in grads)
            assert all(p.grad is None for k, p in named.items() if ".lora_" not in k)
        else:
            assert len(grads) == len(named)


def test_full_finetune_float32_master_weights(flux_path):
    from egrpo_ray.models.flux import FluxPolicy

    pol = FluxPolicy.from_config(flux_cfg(flux_path, dtype="bfloat16"), trainable_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in pol.parameters()) and pol.autocast
    v = pol(torch.randn(1, *pol.latent_shape), torch.tensor([0.5]), pol.encode_prompts(PROMPTS[:1]))
    assert v.dtype == torch.float32


# ------------------------------------------------------------------------------------------- SD3


def test_sd3_shapes_and_cfg(sd3_path):
    pol = build_policy(sd3_cfg(sd3_path, dtype="bfloat16", cfg_scale=4.5))
    assert type(pol).__name__ == "SD3Policy"
    assert pol.latent_shape == (16, tiny.RESOLUTION // 8, tiny.RESOLUTION // 8)
    cond = pol.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + 32, 48)  # CLIP (padded to T5 width) + T5 tokens
    assert cond["pooled_prompt_embeds"].shape == (2, 64)
    x, s = torch.randn(2, *pol.latent_shape), torch.tensor([0.7, 0.2])
    v = pol(x, s, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    # CFG = uncond + scale * (cond - uncond) from ONE batched forward of 2B rows
    calls = []
    hook = pol.transformer.register_forward_hook(lambda m, a, kw, out: calls.append(kw["hidden_states"].shape[0]),
                                                 with_kwargs=True)
    pol(x, s, cond)
    hook.remove()
    assert calls == [4]
    pol.cfg_scale = 1.0
    v_cond = pol(x, s, cond)
    u = pol.uncond()
    v_unc = pol(x, s, {k: t.expand(2, *t.shape[1:]) for k, t in u.items()})
    torch.testing.assert_close(v, v_unc + 4.5 * (v_cond - v_unc), atol=0.1, rtol=0.05)  # bf16 batch effects
    img = pol.decode(x)
    assert img.shape == (2, 3, tiny.RESOLUTION, tiny.RESOLUTION) and 0 <= float(img.min()) <= float(img.max()) <= 1


def test_sd3_matches_pipeline_with_cfg(sd3_path):
    from diffusers import StableDiffusion3Pipeline

    pol = build_policy(sd3_cfg(sd3_path, dtype="float32", cfg_scale=3.0))
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path, dtype=torch.float32)
    pipe.scheduler = _pipeline_scheduler()
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                         max_sequence_length=pol.t5_length)
    cond = pol.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond["prompt_embeds"], embeds)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled)
    torch.testing.assert_close(pol.uncond()["prompt_embeds"][0], neg[0])
    sigmas = shifted_sigmas(3, 3.0)
    noise = torch.randn(2, *pol.latent_shape, generator=torch.Generator().manual_seed(1))
    ours = pol.decode(sample_ode(pol, cond, noise, sigmas))
    ref = pipe(prompt=PROMPTS, height=tiny.RESOLUTION, width=tiny.RESOLUTION, num_inference_steps=3,
               sigmas=sigmas[:-1].tolist(), guidance_scale=3.0, latents=noise.clone(), output_type="pt",
               max_sequence_length=pol.t5_length).images
    torch.testing.assert_close(ours, ref.float(), atol=2e-5, rtol=1e-4)


def test_sd3_without_t5_and_lora(tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    path = tiny.sd3_dir(with_t5=False)
    pol = build_policy(sd3_cfg(path, dtype="float32", lora=LORA))
    cond = pol.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 77 + 256, 48)
    assert float(cond["prompt_embeds"][:, 77:].abs().max()) == 0.0  # no T5: zeros, as the pipeline
    _perturb_lora(pol, seed=3)
    save_lora(pol, tmp_path)
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(tmp_path))
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="default_0")
    ours = get_peft_model_state_dict(pol.transformer)
    assert set(loaded) == set(ours)
    for k in ours:
        torch.testing.assert_close(loaded[k], ours[k])


# ------------------------------------------------------------------- sampler and learner through them


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_branching_rollout_and_learner_step(kind, flux_path, sd3_path):
    """A short E-GRPO branching rollout and one clipped-surrogate update through the real adapters."""
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import ExperimentConfig, RewardConfig
    from egrpo_ray.training import learn, sample_and_score

    model = (flux_cfg(flux_path, dtype="float32", lora=LORA) if kind == "flux"
             else sd3_cfg(sd3_path, dtype="float32", cfg_scale=2.0, lora=LORA))
    cfg = ExperimentConfig(
        model=model, rewards=[RewardConfig(name="hps")],
        sampling={"steps": 4, "shift": 3.0, "eta": 0.7, "merge": {"tau": 2.2, "active_fraction": 0.5}},
        algorithm={"group_size": 2, "clip_range": 1e-2, "window_size": 2},
        learner={"minibatch_rows": 8, "lr": 1e-3},
    )
    pol = build_policy(cfg.model)
    _perturb_lora(pol, seed=5)
    strategy = build_strategy(cfg.sampling, cfg.algorithm)

    def reward_fn(images, prompts):  # a cheap stand-in reward with spread
        return {"hps": images.mean(dim=(1, 2, 3))}

    g = torch.Generator().manual_seed(0)
    item = sample_and_score(pol, strategy, PROMPTS, reward_fn, g, iteration=0, policy_version=0)
    r = item.rollout
    entries = len(strategy.plan.entries)
    assert r.final_latents.shape == (2 * entries * 2, *pol.latent_shape)
    assert r.next_latents.shape == (2 * entries, 2, *pol.latent_shape)
    assert r.forwards == strategy.forwards_per_prompt() * 2
    before = {k: v.clone() for k, v in pol.trainable_state().items()}
    optim = torch.optim.AdamW([p for p in pol.parameters() if p.requires_grad], lr=cfg.learner.lr)
    pol.train()
    stats = learn(pol, pol, [item], cfg, strategy, optim, torch.Generator().manual_seed(1))
    assert stats["logprob_mismatch"] < 1e-3
    assert abs(stats["ratio_mean_first"] - 1.0) < 1e-3  # on-policy: ratio 1
    after = pol.trainable_state()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_shipped_sd35_config_trains_a_tiny_sd3(tmp_path):
    """configs/sd35-hps.yaml's algorithm, schedule and guidance through the reference loop, on a tiny random SD3
    (model path, size and dtype, the reward, prompts and scale overridden for a CPU): the ratio is exactly 1."""
    from pathlib import Path

    from egrpo_ray.config import load_config
    from egrpo_ray.reference_loop import run_reference

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS + ["a blue car", "a city at night"]) + "\n")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "sd35-hps.yaml", [
        f"model.path={tiny.sd3_dir()}", f"model.resolution={tiny.RESOLUTION}", "model.dtype=float32",
        "model.master_dtype=null", "model.gradient_checkpointing=false", "rewards=[{name: jpeg}]",
        f"prompts.train_path={prompts}", f"prompts.test_path={prompts}", "prompts.heldout_count=2",
        "learner.workers=1", "learner.prompts_per_step=2", "learner.iterations=2", "learner.gradient_noise_buffer=device"])
    assert cfg.model.cfg_scale == 4.5 and cfg.algorithm.group_size == 12
    history = run_reference(cfg, progress=False)["history"]
    assert len(history) == 2 and all(m["ratio_mean_first"] == 1.0 and m["learner_rows"] > 0 for m in history)
