"""The memory plan against the tensors a learner really allocates, on CPU.

Weights, master weights, gradients and AdamW moments must EQUAL the summed bytes of the tensors of a learner
built the way the learner builds it (build_policy, prepare_for_training, AdamW over the trainable parameters,
one step); parameter counts from the meta device must equal the loaded models'; the activation formula must
match the bytes autograd saves for backward on small random FLUX and SD3 transformers.
"""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from egrpo_ray.algo.gradient_noise import GradientNoise
from egrpo_ray.cli import main
from egrpo_ray.config import LoraConfig, ModelConfig, RewardConfig, load_config, validate
from egrpo_ray.distributed.cluster import free_port
from egrpo_ray.memory_plan import (ACTIVATION_BYTES, BACKWARD_WORKING_SET, GIB, learner_activation_bytes, rollout_batch_rows,
                                   learner_memory, plan_memory, policy_parts, reward_memory, saved_activation_bytes)
from egrpo_ray.models import build_policy
from egrpo_ray.parallel import prepare_for_training
from tests import tiny_real_models as real

ROOT = Path(__file__).resolve().parent.parent
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@pytest.fixture(scope="module")
def gloo_group():
    """A 1-rank gloo process group in this process (FSDP2 needs one), destroyed at the end."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _experiment(model: ModelConfig, parallelism: str = "ddp", rows: int = 2) -> "object":
    return validate({"model": model.model_dump(), "learner": {"parallelism": parallelism, "minibatch_rows": rows}})


def _policy_modules(policy: nn.Module) -> list[nn.Module]:
    frozen = getattr(policy, "_frozen", {})
    return [policy, *(m for m in frozen.values() if m is not None)]


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _by_dtype(tensors) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tensors:
        t = _local(t)
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def _learner_step(cfg) -> dict[str, dict[str, int]]:
    """Build the learner as the learner does, take one AdamW step, and sum the bytes it holds."""
    torch.manual_seed(0)
    policy = build_policy(cfg.model)
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    fn = prepare_for_training(policy, cfg.learner.parallelism, compute, torch.device("cpu"))
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    policy.train()
    cond = policy.encode_prompts(["a red circle", "a blue square"])
    x = torch.randn(2, *policy.latent_shape)
    fn(x, torch.tensor([0.5, 0.3]), cond).square().mean().backward()
    noise = GradientNoise()
    noise.add(params)
    noise.finish()
    opt.step()
    seen, weights = set(), []
    for m in _policy_modules(policy):
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                weights.append(t)
    moments = [v for state in opt.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    steps = [state["step"] for state in opt.state.values()]
    assert all(s.dim() == 0 and s.device.type == "cpu" for s in steps)  # AdamW's counters: 0-dim, never on the GPU
    return {"weights": _by_dtype(weights), "grads": _by_dtype(p.grad for p in params),
            "optimizer": _by_dtype(moments), "noise": noise.buffer_bytes}


def _check_equal(cfg) -> None:
    measured = _learner_step(cfg)
    plan = learner_memory(cfg)
    held = dict(plan.weights)
    if plan.master:
        held["float32"] = held.get("float32", 0) + plan.master
    assert held == measured["weights"]
    assert plan.gradients == sum(measured["grads"].values())
    assert plan.optimizer == sum(measured["optimizer"].values())
    assert plan.other["gradient noise buffer"] == measured["noise"] > 0
    assert len(measured["grads"]) == 1  # one gradient dtype: that of the trainable weights


# ---------------------------------------------------------------------------------- (a), (b)


@pytest.mark.parametrize("lora", [False, True])
def test_tiny_ddp_bytes_equal_the_learners_tensors(lora):
    _check_equal(_experiment(ModelConfig(lora=LoraConfig(enabled=lora, rank=4, alpha=4.0))))


@pytest.mark.parametrize("dtype,lora", [("float32", False), ("bfloat16", False), ("float32", True)])
def test_tiny_fsdp_bytes_equal_the_local_shards(gloo_group, dtype, lora):
    cfg = _experiment(ModelConfig(dtype=dtype, lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)), "fsdp")
    _check_equal(cfg)
    plan = learner_memory(cfg)
    if dtype == "bfloat16":  # the sharded float32 trainable weights are the master copy
        assert plan.master > 0 and plan.weights.get("bfloat16", 0) == 0
    assert plan.transient["fsdp unsharded params"] > 0


@pytest.mark.parametrize("kind,dtype,master,lora,parallelism", [
    ("flux", "bfloat16", None, True, "ddp"),
    ("flux", "bfloat16", "float32", False, "ddp"),
    ("flux", "bfloat16", "float32", False, "fsdp"),
    ("sd3", "float32", None, False, "ddp"),
    ("sd3", "bfloat16", None, True, "fsdp"),
])
def test_real_architectures_bytes_equal(gloo_group, kind, dtype, master, lora, parallelism):
    path = real.flux_dir() if kind == "flux" else real.sd3_dir()
    model = ModelConfig(kind=kind, path=path, dtype=dtype, master_dtype=master, resolution=real.RESOLUTION,
                        lora=LoraConfig(enabled=lora, rank=4, alpha=4.0,
                                        target_modules=FLUX_TARGETS if kind == "flux" else ["to_q", "to_k", "to_v"]))
    _check_equal(_experiment(model, parallelism))


@pytest.mark.parametrize("dtype,parallelism,lora", [("float32", "ddp", False), ("bfloat16", "fsdp", False),
                                                    ("float32", "ddp", True)])
def test_kl_reference_bytes_equal_the_reference_copy(gloo_group, dtype, parallelism, lora):
    """kl_beta > 0: the plan counts the frozen copy training.reference_model builds, placed as the learner
    places it (LoRA: no copy, the adapters are switched off)."""
    from egrpo_ray.parallel import prepare_reference
    from egrpo_ray.training import reference_model

    cfg = _experiment(ModelConfig(dtype=dtype, lora=LoraConfig(enabled=lora, rank=4, alpha=4.0)), parallelism)
    cfg.algorithm.kl_beta = 0.04
    policy = build_policy(cfg.model)
    reference = reference_model(policy, cfg)
    counted = learner_memory(cfg).other.get("kl reference copy", 0)
    if lora:
        assert not isinstance(reference, nn.Module) and counted == 0
        return
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    prepare_reference(reference, parallelism, compute, torch.device("cpu"))
    shared = {id(t) for m in _policy_modules(policy) for t in m.parameters()}  # text encoders: not copied
    copied = [t for t in reference.parameters() if id(t) not in shared]
    assert counted == sum(_by_dtype(copied).values()) > 0


# ---------------------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
@pytest.mark.parametrize("lora", [False, True])
def test_meta_counts_equal_the_loaded_models(kind, lora):
    path = real.flux_dir() if kind == "flux" else real.sd3_dir()
    cfg = ModelConfig(kind=kind, path=path, dtype="bfloat16", resolution=real.RESOLUTION,
                      lora=LoraConfig(enabled=lora, rank=8, alpha=8.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    parts = policy_parts(cfg)
    policy = build_policy(cfg)

    def counts(m: nn.Module) -> tuple[int, int]:
        return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)

    assert counts(parts.transformer) == counts(policy.transformer)
    assert set(parts.frozen) == {k for k, v in policy._frozen.items() if v is not None}
    for name, module in parts.frozen.items():
        assert counts(module) == counts(policy.frozen_module(name)), name
    trainable = {n for n, p in parts.transformer.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in policy.transformer.named_parameters() if p.requires_grad}
    if lora:  # peft's own parameter set: r * (in + out) per targeted Linear
        linears = [m for n, m in policy.transformer.named_modules() if hasattr(m, "lora_A")]
        assert counts(parts.transformer)[1] == sum(8 * (m.in_features + m.out_features) for m in linears)
    assert parts.image_tokens == policy.latent_shape[0] if kind == "flux" else True


# ------------------------------------------------------------------------------- activations


def _flux(hidden=256):
    from diffusers import FluxTransformer2DModel

    hd = hidden // 4
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=hd,
                                  num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                                  guidance_embeds=True, axes_dims_rope=(hd - 2 * (3 * hd // 8), 3 * hd // 8, 3 * hd // 8))


def _sd3(hidden=256):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=hidden // 4,
                                 num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=hidden,
                                 pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16, qk_norm="rms_norm")


def _forward(model, rows: int, dtype):
    txt = 24
    e, p = torch.randn(rows, txt, 64, dtype=dtype), torch.randn(rows, 32, dtype=dtype)
    if hasattr(model, "single_transformer_blocks"):
        x = torch.randn(rows, 64, 16, dtype=dtype)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(-1, 3)
        return lambda: model(hidden_states=x, encoder_hidden_states=e, pooled_projections=p,
                             timestep=torch.full((rows,), 0.5, dtype=dtype), img_ids=ids, txt_ids=torch.zeros(txt, 3),
                             guidance=torch.full((rows,), 3.5, dtype=dtype), return_dict=False)[0], 64, txt
    x = torch.randn(rows, 16, 16, 16, dtype=dtype)
    return lambda: model(hidden_states=x, encoder_hidden_states=e, pooled_projections=p,
                         timestep=torch.full((rows,), 500.0), return_dict=False)[0], 64, txt


@pytest.mark.parametrize("arch", ["flux", "sd3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_formula_matches_saved_tensors(arch, dtype, ckpt):
    torch.manual_seed(0)
    model = nn.Module.to(_flux() if arch == "flux" else _sd3(), dtype)
    if ckpt:
        model.enable_gradient_checkpointing()
    rows = 2
    run, img, txt = _forward(model, rows, dtype)
    saved = sum(saved_activation_bytes(model, run).values())
    tokens_hidden = rows * (img + txt) * 256
    formula = learner_activation_bytes(model, img, txt, rows, dtype, ckpt, device="cpu")
    regime = "fp32" if dtype == torch.float32 else "bf16"
    expected = saved + BACKWARD_WORKING_SET[regime] * tokens_hidden  # the working set is not a saved tensor
    if ckpt:  # one block is recomputed during backward: its saved bytes come back once
        block = "flux_double" if arch == "flux" else "sd3_joint"
        expected += ACTIVATION_BYTES["cpu"][regime][block] * tokens_hidden
    assert abs(formula - expected) / expected < 0.05, (formula, expected)  # measured: within 1.1 %


# ---------------------------------------------------------------------------------------- (d)


def _run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", "--memory", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_when_it_fits_and_when_not(capsys):
    code, out, _ = _run_cli(capsys, "--config", str(ROOT / "configs/tiny.yaml"), "--json")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is True and plan["gpus_needed"] == 0
    assert set(plan["roles"]) == {"rollout", "learner", "reward_alignment"}
    for role in plan["roles"].values():
        assert {"per_gpu_gib", "gpus"} <= set(role)

    cfg = load_config(ROOT / "configs/flux-hps.yaml")
    code, out, _ = _run_cli(capsys, "--config", str(ROOT / "configs/flux-hps.yaml"), "--json", "--gpu-memory-gib", "8")
    plan = json.loads(out)
    assert code == 0 and plan["fits"] is False and plan["gpu_memory_gib"] == 8
    assert plan["roles"]["learner"]["gpus"] == cfg.learner.workers * cfg.learner.num_gpus
    assert plan["roles"]["rollout"]["gpus"] == pytest.approx(cfg.rollout.workers * cfg.rollout.num_gpus)
    assert plan["gpus_needed"] >= sum(r["gpus"] for r in plan["roles"].values())
    code, out, _ = _run_cli(capsys, "--config", str(ROOT / "configs/flux-hps.yaml"), "--json", "--gpu-memory-gib", "2000")
    assert code == 0 and json.loads(out)["fits"] is True

    code, out, _ = _run_cli(capsys, "--config", str(ROOT / "configs/flux-hps.yaml"), "--gpu-memory-gib", "8")
    assert code == 0 and out.strip().splitlines()[-1].startswith(f"needs {plan['gpus_needed']} GPUs; fits on "
                                                                 f"{plan['gpus_needed']} x 8 GiB: no")


def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    for model in ({"kind": "flux", "path": str(tmp_path / "empty")}, {"kind": "tiny", "path": str(tmp_path / "nope")}):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(json.dumps({"model": model}))
        code, out, err = _run_cli(capsys, "--config", str(cfg))
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    code, _, err = _run_cli(capsys, "--gpu-memory-gib", "0")
    assert code == 2 and "gpu-memory-gib" in err


# ---------------------------------------------------------------------------------------- (e)


def test_flux_hps_config_with_published_architecture(capsys):
    cfg = load_config(ROOT / "configs/flux-hps.yaml")
    assert not os.path.isdir(cfg.model.path)  # the placeholder: FLUX.1-dev's published architecture stands in
    main(["plan", "--memory", "--config", str(ROOT / "configs/flux-hps.yaml")])
    text = capsys.readouterr().out
    assert "published architecture" in text and "fits on 8 x 80 GiB: yes" in text
    parts = policy_parts(cfg.model)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(n(parts.transformer) / 1e9, 2) == 11.90
    assert round(n(parts.frozen["text_encoder_2"]) / 1e9, 2) == 4.76
    assert round(n(parts.frozen["text_encoder"]) / 1e6) == 123 and round(n(parts.frozen["vae"]) / 1e6) == 84
    # scale-notes: FSDP over 8 ranks, 16 bytes per parameter (float32 master, gradients, two moments) / 8
    fsdp = validate({**cfg.model_dump(), "learner": {**cfg.learner.model_dump(), "workers": 8, "parallelism": "fsdp",
                                                     "prompts_per_step": 8}})
    learner = plan_memory(fsdp).roles["learner"]
    per_param = (learner.master + learner.gradients + learner.optimizer) / (n(parts.transformer) / 8)
    assert abs(per_param - 16) < 0.01
    assert learner.per_gpu < 80 * GIB


FLUX_BASELINES = ["flux-dancegrpo", "flux-flowgrpo", "flux-g2rpo", "flux-hps-clip", "flux-mixgrpo"]


@pytest.mark.parametrize("name", ["flux-hps", "flux-hps-lora", *FLUX_BASELINES, "sd35-hps"])
def test_every_shipped_gpu_config_fits_one_8_x_80_gib_node(name):
    plan = plan_memory(load_config(ROOT / f"configs/{name}.yaml"))
    assert plan.fits and plan.gpus_needed == 8, [(g["workers"], g["bytes"] / GIB) for g in plan.gpus]


def test_sd35_config_changes_only_the_model_from_flux_hps():
    """SD3.5-large at 1024 px with guidance: every other setting is flux-hps's, so the two runs compare models."""
    flux, sd35 = load_config(ROOT / "configs/flux-hps.yaml"), load_config(ROOT / "configs/sd35-hps.yaml")
    assert (sd35.model.kind, sd35.model.resolution, sd35.model.cfg_scale) == ("sd3", 1024, 4.5)
    for part in ("sampling", "algorithm", "rewards", "prompts", "rollout", "learner", "cluster"):
        assert getattr(sd35, part) == getattr(flux, part), part
    plan = plan_memory(sd35)
    assert any("counted SD3.5-large's published architecture" in n for n in plan.notes), plan.notes
    assert "120 rows a forward" in " ".join(plan.roles["rollout"].notes)  # flux-hps's 60, twice for guidance


@pytest.mark.parametrize("name", FLUX_BASELINES)
def test_flux_baselines_learn_and_sample_as_flux_hps(name):
    """A comparison on FLUX is fair only with the same model, schedule, group, learner and placement."""
    ours, theirs = load_config(ROOT / "configs/flux-hps.yaml"), load_config(ROOT / f"configs/{name}.yaml")
    assert theirs.model == ours.model
    same = ["workers", "parallelism", "num_gpus", "iterations", "prompts_per_step", "lr", "epochs", "max_staleness"]
    assert {k: getattr(theirs.learner, k) for k in same} == {k: getattr(ours.learner, k) for k in same}
    rollout = ["workers", "prompts_per_batch", "num_gpus", "weight_sync"]
    assert {k: getattr(theirs.rollout, k) for k in rollout} == {k: getattr(ours.rollout, k) for k in rollout}
    assert (theirs.sampling.steps, theirs.sampling.shift, theirs.algorithm.group_size) == (16, 3.0, 12)


def test_max_batch_rows_caps_the_planned_sampling_forward():
    cfg = load_config(ROOT / "configs/flux-g2rpo.yaml")
    capped = plan_memory(cfg).roles["rollout"]
    whole = plan_memory(load_config(ROOT / "configs/flux-g2rpo.yaml", ["rollout.max_batch_rows=null"])).roles["rollout"]
    assert rollout_batch_rows(cfg) == 48 and whole.phases["sampling"] == pytest.approx(2 * capped.phases["sampling"], rel=0.05)


def test_a_host_gradient_noise_buffer_takes_no_gpu_memory():
    on_gpu = plan_memory(load_config(ROOT / "configs/flux-hps.yaml", ["learner.gradient_noise_buffer=device"]))
    on_host = plan_memory(load_config(ROOT / "configs/flux-hps.yaml"))
    buffer = on_gpu.roles["learner"].other["gradient noise buffer"]
    assert "gradient noise buffer" not in on_host.roles["learner"].other
    assert on_gpu.roles["learner"].per_gpu - on_host.roles["learner"].per_gpu == buffer
    assert f"gradient noise buffer in host memory: {buffer / GIB:.2f} GiB per rank" in on_host.roles["learner"].notes


# the published CLIPModel configs (openai/clip-vit-large-patch14, laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
CLIP_L14 = dict(text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
                vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                   patch_size=14), projection_dim=768)
CLIP_H14 = dict(text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
                vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                                   patch_size=14), projection_dim=1024)


@pytest.mark.parametrize("name,config", [("openai/clip-vit-large-patch14", CLIP_L14),
                                         ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", CLIP_H14)])
def test_clip_reward_published_size_follows_the_checkpoint_a_path_names(name, config):
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        params = sum(p.numel() for p in CLIPModel(CLIPConfig(**config)).parameters())
    reward = RewardConfig(name="clip", path=f"/models/{name.split('/')[1]}", device="cuda", num_gpus=0.2)
    assert reward_memory(reward).weights["float32"] == pytest.approx(params * 4, rel=1e-5)
