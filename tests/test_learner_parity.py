"""The two loops take the same steps, on the shipped tiny model: the reference loop's update and a
1-rank Ray learner's update (``learner_update``, what ``Learner.update`` runs) give bit-identical
weights on the same items; the learner runs the policy in the sampler's mode; a LoRA policy's KL
reference is the same module with its adapters off; every rank's RNG state is checkpointed."""
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from egrpo_ray.algo.advantages import group_advantages
from egrpo_ray.algo.loss import grpo_loss
from egrpo_ray.algo.strategies import build_strategy
from egrpo_ray.config import LoraConfig, ModelConfig, load_config
from egrpo_ray.distributed.cluster import free_port
from egrpo_ray.distributed.learner import learner_update
from egrpo_ray.models import build_policy
from egrpo_ray.models.base import AdaptersDisabled
from egrpo_ray.reference_loop import reference_update
from egrpo_ray.rewards import build_reward
from egrpo_ray.training import learn, make_reward_fn, reference_model, sample_and_score

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PROMPTS = ["a red circle at the top left", "a blue square in the centre"]


def _cfg(*overrides):
    return load_config(CONFIG, ["algorithm.group_size=4", "learner.minibatch_rows=3", "learner.lr=1e-3", *overrides])


def _items(cfg, policy, version=0):
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
    item = sample_and_score(policy, strategy, PROMPTS, reward_fn, torch.Generator().manual_seed(0), 0, version)
    return strategy, [item]


def _optimizer(policy, cfg):
    return torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learner.lr,
                             weight_decay=cfg.learner.weight_decay)


@pytest.mark.parametrize("overrides", [["learner.minibatch=random"], ["learner.minibatch=by_entry", "algorithm.kl_beta=0.1"]])
def test_reference_loop_and_one_rank_learner_take_identical_steps(overrides):
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    ref_policy, svc_policy = build_policy(cfg.model).eval(), build_policy(cfg.model).eval()
    strategy, items = _items(cfg, ref_policy)
    ref_opt, svc_opt = _optimizer(ref_policy, cfg), _optimizer(svc_policy, cfg)
    ref_kl, svc_kl = reference_model(ref_policy, cfg), reference_model(svc_policy, cfg)
    history = []
    for step in range(2):  # step 1 learns version-0 groups with version-1 weights: decoupled weights kick in
        a = reference_update(ref_policy, items, cfg, strategy, ref_opt, step, ref_kl)
        b = learner_update(svc_policy, svc_policy, items, cfg, strategy, svc_opt, rank=0, step=step, version=step,
                           ref_fn=svc_kl)
        assert a == b
        history.append(a)
    assert all(torch.equal(p, q) for p, q in zip(ref_policy.parameters(), svc_policy.parameters()))
    assert history[0]["behaviour_weight_mean"] == 1.0 and history[1]["behaviour_weight_mean"] != 1.0
    if cfg.learner.minibatch == "by_entry":  # one optimizer step per plan entry
        assert history[0]["minibatches"] == len(set(items[0].rollout.step_index.tolist()))
        assert history[0]["kl"] > 0 and history[0]["recompute_rows"] == 2 * history[0]["learner_rows"]


def test_learner_forward_runs_in_the_samplers_mode():
    """LoRA dropout 0.5: a train-mode forward would not reproduce the sampler's log-probs."""
    cfg = _cfg("model.lora.enabled=true", "model.lora.dropout=0.5", "model.lora.rank=4", "algorithm.old_logprob=recompute",
               "learner.max_staleness=0")
    policy = build_policy(cfg.model)
    assert not policy.training  # as the rollout workers (policy.eval()) and the learner run it
    with torch.no_grad():  # make the adapters matter (peft's B starts at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    strategy, items = _items(cfg, policy)
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.0)
    stats = learn(policy, policy, items, cfg, strategy, opt, torch.Generator().manual_seed(0), policy_version=0)
    assert stats["logprob_mismatch"] < 1e-4 and stats["ratio_mean_first"] == 1.0
    policy.train()  # what the learner did before: dropout changes the forward
    stats = learn(policy, policy, items, cfg, strategy, opt, torch.Generator().manual_seed(0), policy_version=0)
    assert stats["logprob_mismatch"] > 1e-2


def test_lora_reference_is_the_base_model_with_adapters_off():
    cfg = _cfg("model.lora.enabled=true", "model.lora.rank=4", "algorithm.kl_beta=0.1")
    torch.manual_seed(0)
    policy = build_policy(cfg.model)
    base = build_policy(cfg.model.model_copy(update={"lora": LoraConfig(enabled=False)})).eval()
    ref = reference_model(policy, cfg)
    assert isinstance(ref, AdaptersDisabled) and ref.policy is policy  # no second copy
    strategy, items = _items(cfg, policy)
    r = items[0].rollout
    cond = policy.encode_prompts(r.prompts)
    s = strategy.kernel.s(r.step_index)
    c = {k: v[r.row_prompt] for k, v in cond.items()}
    adv = group_advantages(items[0].rewards["alignment"], r.sample_group)
    start = grpo_loss(policy, cond, r, adv, strategy.kernel, 1e-3, kl_beta=0.1, ref_fn=ref)
    assert start.kl == 0.0  # peft's B starts at zero: policy == reference
    opt = _optimizer(policy, cfg)
    first = learn(policy, policy, items, cfg, strategy, opt, torch.Generator().manual_seed(0), ref, policy_version=0)
    assert first["kl"] > 0  # kl is 0 on the first minibatch only; later ones see the moved adapters
    with torch.no_grad():
        assert torch.equal(ref(r.start_latents, s, c), base(r.start_latents, s, c))  # the base, after an update
        assert not torch.equal(policy(r.start_latents, s, c), base(r.start_latents, s, c))
    lora = [p for n, p in policy.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)  # the toggle left the adapters trainable


def test_lora_reference_under_fsdp_is_the_base_model():
    """LoRA + FSDP + KL (a 1-rank gloo group): switching the adapters off on the sharded module gives the
    base model's velocity, and the sharded policy with its adapters on does not."""
    from egrpo_ray.parallel import prepare_for_training

    cfg = _cfg("model.lora.enabled=true", "model.lora.rank=4", "algorithm.kl_beta=0.1", "learner.parallelism=fsdp")
    torch.manual_seed(0)
    policy = build_policy(cfg.model).eval()
    base = build_policy(cfg.model.model_copy(update={"lora": LoraConfig(enabled=False)})).eval()
    with torch.no_grad():  # make the adapters matter (peft's B starts at zero)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ref = reference_model(policy, cfg)  # built before sharding, as the learner does
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        fn = prepare_for_training(policy, "fsdp", torch.float32, torch.device("cpu"))
        cond = policy.encode_prompts(PROMPTS)
        x, s = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(2)), torch.tensor([0.7, 0.4])
        with torch.no_grad():
            expected = base(x, s, cond)
            assert torch.allclose(ref(x, s, cond), expected, atol=1e-5)
            assert not torch.allclose(fn(x, s, cond), expected, atol=1e-3)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- RNG in checkpoints


def _rng_rank(rank: int, port: int, out: str) -> None:
    from egrpo_ray.checkpoint import load_rng_state, save_rng_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)
    torch.rand(rank + 1)  # a different position in each rank's stream
    save_rng_state(out)
    expected = torch.rand(4)
    dist.barrier()
    torch.manual_seed(12345)  # a fresh process would start seeded alike on every rank
    assert load_rng_state(out)
    assert torch.equal(torch.rand(4), expected), f"rank {rank} did not get its own RNG state back"
    dist.destroy_process_group()


def test_every_rank_restores_its_own_rng_state(tmp_path):
    mp.start_processes(_rng_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    files = sorted(p.name for p in (tmp_path / "rng").iterdir())
    assert files == ["rank_00000.safetensors", "rank_00001.safetensors"]
    assert (tmp_path / "rng" / files[0]).read_bytes() != (tmp_path / "rng" / files[1]).read_bytes()


def test_flux_reference_copy_shares_the_frozen_encoders_and_copies_the_transformer():
    try:
        import tiny_real_models as tiny
    except ImportError:  # tests/ as a package
        from tests import tiny_real_models as tiny

    policy = build_policy(ModelConfig(kind="flux", path=tiny.flux_dir(), resolution=tiny.RESOLUTION, dtype="float32"))
    ref = policy.reference_copy()
    assert all(ref.frozen_module(k) is policy.frozen_module(k) for k in policy._frozen)  # no second text encoder
    assert ref.cache is policy.cache and ref.transformer is not policy.transformer
    assert not any(p.requires_grad for p in ref.parameters()) and any(p.requires_grad for p in policy.parameters())
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    s = torch.full((2,), 0.7)
    with torch.no_grad():
        assert torch.equal(ref(x, s, cond), policy(x, s, cond))
        next(p for p in policy.transformer.parameters() if p.requires_grad).add_(0.1)
        assert not torch.equal(ref(x, s, cond), policy(x, s, cond))  # the copy keeps the starting weights
