"""The Ray actor-learner service end to end on the tiny model, on a real local Ray cluster:
2 rollout workers, 1 reward replica, 2 FSDP learner workers (gloo) that broadcast weights to the rollout
workers over their own process group; the KL term pulls toward a frozen reference copy sharded like the
policy (the tiny model is a full fine-tune). tests/test_faults.py resumes a 2-rank FSDP checkpoint written on
SIGINT onto 1 DDP rank (object-store sync)."""
import json
from pathlib import Path

import pytest

from egrpo_ray.config import load_config
from egrpo_ray.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BASE = [
    "rollout.workers=2", "rewards.0.replicas=1", "learner.workers=2", "learner.num_cpus=0.5",
    "rollout.num_cpus=0.25", "rewards.0.num_cpus=0.25", "prompts.heldout_count=8",
    "learner.prompts_per_step=4", "rollout.prompts_per_batch=2", "algorithm.group_size=8",
    "learner.checkpoint_every=3", "logging.grid_every=3", "learner.max_staleness=0",
    "algorithm.old_logprob=recompute", "prompts.tiny_train_kinds=[single]",  # where 6 steps move the probe
    "rewards.0.combine=product",  # the strict product, as measured for this test (the default trains on the mean)
    "learner.lr=3e-5",  # faster than the default 1e-5: 6 steps must move the probe
]


def _records(out, name: str = "metrics.jsonl"):
    return [json.loads(l) for l in (out / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(ray_cluster, tmp_path_factory):
    from egrpo_ray.distributed.driver import train

    out = tmp_path_factory.mktemp("service")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", BASE + ["learner.iterations=6", "learner.parallelism=fsdp",
                                                               "rollout.weight_sync=collective", "algorithm.kl_beta=0.05"])
    return out, train(cfg, str(out), progress=False)


def test_end_to_end_improves_reward_and_advances_versions(first_run):
    out, summary = first_run
    records = _records(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert [r["policy_version"] for r in records] == list(range(1, 7))
    # the gradient-noise measurement (algo/gradient_noise.py) takes updates in pairs; the summary has the share
    assert [("grad_step_sq" in r, "grad_signal_sq" in r) for r in records] == [(True, False), (False, True)] * 3
    assert summary["gradient_signal"]["pairs"] == 3
    # training-prompt reward improves: fixed training prompts, fixed noise, before vs after
    assert summary["train_probe_reward_after"] > summary["train_probe_reward_before"] + 0.01, summary
    # the workers sampled only what the learner learned from: on-policy, nothing dropped, nothing past the last step
    assert summary["queue"]["dropped_as_stale"] == 0, summary["queue"]
    assert sum(w["images"] for w in summary["rollout_workers"]) == sum(r["samples"] for r in records)
    # rollout workers loaded newer weights as the learner published them
    for w in summary["rollout_workers"]:
        assert w["versions_loaded"] == sorted(w["versions_loaded"]) and len(set(w["versions_loaded"])) >= 3
    assert summary["heldout_reward_before"] is not None and summary["heldout_reward_after"] is not None
    assert 0 <= summary["background_noise_before"] <= 1 and 0 <= summary["background_noise_after"] <= 1
    assert (out / "reward_curve.png").exists() and (out / "grids" / "heldout_before.png").exists()
    assert [(r["tag"], r["step"]) for r in _records(out, "heldout.jsonl")] == [("before", 0), ("step_000003", 3), ("after", 6)]
    assert (out / "grids" / "heldout_step_000003.png").exists()  # the mid-run grid (logging.grid_every)
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == "step_000006" and (ckpt / "state" / ".metadata").exists()
    assert (ckpt / "transformer" / "diffusion_pytorch_model.safetensors").exists()  # the export users load
    assert json.loads((out / "summary.json").read_text())["heldout_reward_after"] == summary["heldout_reward_after"]


def test_strict_on_policy_ratio_is_exactly_one_on_each_first_minibatch(first_run):
    out, _ = first_run
    for r in _records(out):
        assert r["ratio_mean_first"] == 1.0
        assert r["staleness_max"] == 0
        assert r["logprob_mismatch"] < 1e-3  # the groups really came from the current weights


def test_kl_to_the_sharded_reference_starts_at_zero_and_counts_its_forwards(first_run):
    """One minibatch per step: step 1's KL is exactly 0 (policy == reference), later steps' positive."""
    out, _ = first_run
    records = _records(out)
    assert records[0]["kl"] == 0.0 and records[0]["minibatches"] == 1
    assert all(r["kl"] > 0 for r in records[1:])
    # no-grad forwards per learner row: the old log-prob recompute and the reference
    assert all(r["recompute_rows"] == 2 * r["learner_rows"] > 0 for r in records)
