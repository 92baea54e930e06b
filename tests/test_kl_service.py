"""The KL term in the Ray service: 2 FSDP learner ranks with a frozen reference copy sharded like the
policy (the tiny model is a full fine-tune). One minibatch per step: step 1's KL is exactly 0 (policy ==
reference), step 2's is positive, and the run finishes."""
import json
from pathlib import Path

from egrpo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_service_with_kl_to_a_sharded_reference_finishes(ray_cluster, tmp_path):
    from egrpo_ray.distributed.driver import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        "rollout.workers=1", "rewards.0.replicas=1", "learner.workers=2", "learner.parallelism=fsdp",
        "learner.num_cpus=0.5", "rollout.num_cpus=0.25", "rewards.0.num_cpus=0.25", "prompts.heldout_count=2",
        "learner.prompts_per_step=4", "rollout.prompts_per_batch=2", "algorithm.group_size=4",
        "learner.minibatch_rows=1000", "learner.iterations=2", "learner.checkpoint_every=2", "logging.grid_every=100",
        "algorithm.kl_beta=0.05",
    ])
    summary = train(cfg, str(tmp_path), progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["kl"] == 0.0 and records[0]["minibatches"] == 1
    assert records[1]["kl"] > 0
    assert records[0]["recompute_rows"] >= records[0]["learner_rows"] > 0  # reference forwards are counted
    assert summary["heldout_reward_after"] is not None
