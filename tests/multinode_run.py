"""A service run on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster), then a resume.

Run by tests/test_multinode.py in a subprocess (a multi-node Cluster cannot share the pytest process
with the session's local cluster):

    python tests/multinode_run.py OUTPUT_PARENT

Three nodes on one machine, each labelled with a custom resource: the head {"learner_node": 1} (two FSDP
learner ranks at 0.5 CPU each), {"rollout_node": 1} (two rollout workers at 0.25) and {"reward_node": 1}
(the reward replica at 0.25). Ray wants whole CPUs per node, so each node has 1 logical CPU; the run asks
for 1.75 in all, which the box's 2 cores serve (the same load as tests/test_service.py).
The config asks for each role's label (rollout.resources, learner.resources, rewards.0.resources); the
learner's rank 0 and the rollout workers form a gloo weight-sync group across the nodes.

Checks: each role's actors (Ray's state API) ran on the node that carries its label; the checkpoint is in
the shared output directory with both learner ranks' shards; rollout workers loaded weights broadcast
from the other node; ``train(resume=True)`` on 1 DDP learner rank (the 2-rank FSDP checkpoint resharded on
load) started the rollout workers from the checkpoint's weights, continued the step counter (metrics.jsonl
steps 1..N once each) and kept the base model's held-out score; and a config whose pinned learner ranks
overflow their 1-CPU node (though the cluster has the CPUs in all) is refused up front instead of hanging.
Prints one JSON line (the findings) on stdout and exits 0 only when every check passes.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from egrpo_ray.distributed.cluster import free_port  # noqa: E402 (after the path)

FIRST_ITERATIONS, RESUME_ITERATIONS, CHECKPOINT_EVERY = 2, 3, 2
# the resume changes the learner: the 2-rank FSDP checkpoint is resharded onto 1 DDP rank
RESUME_LEARNER = ["learner.workers=1", "learner.parallelism=ddp"]
LABELS = ("learner_node", "rollout_node", "reward_node")
# Actor class names: Serve's replica is "ServeReplica:<run-scoped app name>:reward_alignment"
ROLES = {"rollout": "RolloutWorker", "learner": "RayTrainWorker", "reward": ":reward_alignment"}
EXPECTED_NODE = {"rollout": "rollout_node", "learner": "learner_node", "reward": "reward_node"}

OVERRIDES = [
    # roles and where they go
    "rollout.workers=2", "rollout.num_cpus=0.25", "rollout.resources={rollout_node: 0.01}",
    "rollout.weight_sync=collective",
    "learner.workers=2", "learner.num_cpus=0.5", "learner.parallelism=fsdp", "learner.resources={learner_node: 0.01}",
    "rewards.0.replicas=1", "rewards.0.num_cpus=0.25", "rewards.0.resources={reward_node: 0.01}",
    # a short run
    "algorithm.group_size=4", "learner.prompts_per_step=2", "rollout.prompts_per_batch=1", "learner.max_staleness=0",
    "prompts.heldout_count=2", "sampling.steps=8", f"learner.checkpoint_every={CHECKPOINT_EVERY}",
    "logging.grid_every=1000",
    "cluster.startup_timeout_s=180",
]


def log(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)



def start_cluster(temp: str):
    from ray.cluster_utils import Cluster

    # Ray's "current cluster" address file goes to this run's own directory, not /tmp/ray: other clusters
    # on the machine must not find this one through ray.init() without an address.
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    common = {"temp_dir": temp, "object_store_memory": 100 << 20}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={**common, "num_cpus": 1, "resources": {"learner_node": 1},
                        # Train's controller reads the state API, which the dashboard serves
                        "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
                        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()},
    )
    # Ray wants whole CPUs per node: 3 logical CPUs, but the run asks for 1.75 of them (below the 2 cores).
    cluster.add_node(**common, num_cpus=1, resources={"rollout_node": 1}, metrics_export_port=free_port())
    cluster.add_node(**common, num_cpus=1, resources={"reward_node": 1}, metrics_export_port=free_port())
    cluster.wait_for_nodes()
    return cluster


def node_labels() -> dict[str, str]:
    """node id -> the custom label it carries."""
    import ray

    labels = {}
    for n in ray.nodes():
        if not n["Alive"]:
            continue
        mine = [k for k in LABELS if n["Resources"].get(k)]
        if len(mine) != 1:
            raise RuntimeError(f"node {n['NodeID']} carries labels {mine}, expected exactly one")
        labels[n["NodeID"]] = mine[0]
    return labels


def placement(labels: dict[str, str], seen: set[str]) -> tuple[dict, set[str]]:
    """Per role: the label of the node each of its actors (alive or finished) ran on; only actors not in
    ``seen`` (a later run's actors apart from an earlier run's)."""
    from ray.util.state import list_actors

    out: dict[str, Counter] = {role: Counter() for role in ROLES}
    ids = set()
    for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False):
        if a.actor_id in seen:
            continue
        for role, cls in ROLES.items():
            if a.class_name == cls or (cls.startswith(":") and a.class_name.startswith("ServeReplica:")
                                       and a.class_name.endswith(cls)):
                ids.add(a.actor_id)
                out[role][labels.get(a.node_id, f"unknown:{a.node_id}")] += 1
    return {role: dict(c) for role, c in out.items()}, ids


def records_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def checkpoint_facts(out: Path) -> dict:
    from egrpo_ray.checkpoint import latest_checkpoint, read_meta

    root = out / "checkpoints"
    names = sorted(p.name for p in root.glob("step_*")) if root.exists() else []
    latest = latest_checkpoint(out)
    facts = {"checkpoints": names, "latest": latest.name if latest else None}
    if latest:
        meta = read_meta(latest)
        facts.update(
            meta_step=meta["step"], meta_world_size=meta["world_size"], meta_parallelism=meta["parallelism"],
            shard_files=sorted(p.name for p in (latest / "state").glob("*.distcp")),
            dcp_metadata=(latest / "state" / ".metadata").is_file(),
            transformer_export=any((latest / "transformer").glob("*.safetensors")),
        )
    return facts


def run_once(cfg_overrides: list[str], out: Path, resume: bool, labels: dict[str, str], seen: set[str]) -> tuple[dict, set[str]]:
    from egrpo_ray.config import load_config
    from egrpo_ray.distributed.driver import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES + cfg_overrides)
    t0 = time.perf_counter()
    summary = train(cfg, str(out), resume=resume, progress=False)
    wall = time.perf_counter() - t0
    where, ids = placement(labels, seen)
    facts = {
        "wall_s": round(wall, 1),
        "steps_completed": summary["steps_completed"],
        "resumed_from": Path(summary["resumed_from"]).name if summary["resumed_from"] else None,
        "placement": where,
        "versions_loaded": [w["versions_loaded"] for w in summary["rollout_workers"]],
        "heldout_before": summary["heldout_reward_before"],
        "failures": summary["failures"],
        **checkpoint_facts(out),
    }
    return facts, ids


def infeasible_pin_rejected() -> str | None:
    """The same roles, but the two learner ranks ask for 0.75 CPU each on the 1-CPU learner node: the
    cluster has 3 CPUs in all, yet Train would retry its worker group forever. The driver's check must
    refuse it up front. Returns the refusal (None when it was accepted)."""
    from egrpo_ray.config import ConfigError, load_config
    from egrpo_ray.distributed.cluster import validate_on_cluster

    cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES + ["learner.num_cpus=0.75"])
    try:
        validate_on_cluster(cfg)
    except ConfigError as err:
        return str(err)
    return None


def evaluate(first: dict, second: dict, records: list[dict], refusal: str | None) -> dict[str, bool]:
    steps = [r["step"] for r in records]
    checks = {"infeasible_pin_rejected_up_front": refusal is not None and "learner_node" in refusal}
    for tag, run in (("first", first), ("resume", second)):
        for role, label in EXPECTED_NODE.items():
            where = run["placement"][role]
            expected_count = {"rollout": 2, "learner": 2 if tag == "first" else 1, "reward": 1}[role]
            checks[f"{tag}_{role}_on_{label}"] = set(where) == {label} and where[label] >= expected_count
        # the weight-sync group spans the learner and rollout nodes: newer weights reached the rollout node
        # (which versions each worker applied depends on timing: a worker mid-batch skips a version)
        loaded = run["versions_loaded"]
        checks[f"{tag}_rollout_workers_got_broadcast_weights"] = (
            all(v == sorted(set(v)) for v in loaded) and max(max(v, default=-1) for v in loaded) >= 1)
    # the resumed workers start without weights (version -1): their first are the checkpoint's, broadcast
    checks["resume_rollout_workers_started_from_checkpoint_weights"] = all(
        v and v[0] == FIRST_ITERATIONS for v in second["versions_loaded"])
    checks["first_checkpoint_in_output_dir"] = (
        first["latest"] == f"step_{FIRST_ITERATIONS:06d}" and first["dcp_metadata"] and first["transformer_export"]
        and first["meta_world_size"] == 2 and first["meta_parallelism"] == "fsdp")
    checks["first_checkpoint_has_both_ranks_shards"] = len(first["shard_files"]) == 2
    checks["resumed_from_first_checkpoint"] = second["resumed_from"] == f"step_{FIRST_ITERATIONS:06d}"
    checks["resume_kept_the_base_models_heldout_score"] = second["heldout_before"] == first["heldout_before"]
    checks["no_failures"] = not any(first["failures"].values()) and not any(second["failures"].values())
    checks["resume_checkpoint_written"] = (
        second["latest"] == f"step_{RESUME_ITERATIONS:06d}" and second["dcp_metadata"]
        and second["meta_world_size"] == 1 and second["meta_parallelism"] == "ddp")
    # max_staleness 0: step k learned from groups sampled with version k-1, for k >= 2 broadcast weights
    checks["every_step_on_policy"] = all(r["staleness_max"] == 0 for r in records)
    checks["first_run_steps"] = first["steps_completed"] == FIRST_ITERATIONS
    checks["resume_continued_step_counter"] = (
        steps == list(range(1, RESUME_ITERATIONS + 1)) and second["steps_completed"] == RESUME_ITERATIONS)
    return checks


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(sys.argv[1]).resolve() / "run"
    result: dict = {"ok": False}
    cluster = None
    temp = tempfile.mkdtemp(prefix="egmn_", dir="/tmp")  # short: Ray's socket paths live under it
    t0 = time.perf_counter()
    import ray

    try:
        cluster = start_cluster(temp)
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=True)
        labels = node_labels()
        result["nodes"] = {label: node_id[:12] for node_id, label in labels.items()}
        result["cluster_resources"] = {k: v for k, v in ray.cluster_resources().items()
                                       if k == "CPU" or k in LABELS}
        result["cluster_start_s"] = round(time.perf_counter() - t0, 1)
        log(f"cluster up: {result['nodes']} in {result['cluster_start_s']} s")
        refusal = result["infeasible_pin_refusal"] = infeasible_pin_rejected()

        first, seen = run_once([f"learner.iterations={FIRST_ITERATIONS}"], out, False, labels, set())
        log(f"first run: {first}")
        second, _ = run_once([f"learner.iterations={RESUME_ITERATIONS}", *RESUME_LEARNER], out, True, labels, seen)
        log(f"resumed run: {second}")
        records = records_of(out)
        result.update(first=first, resume=second, metrics_steps=[r["step"] for r in records],
                      staleness_max=[r["staleness_max"] for r in records], output_dir=str(out))
        result["checks"] = evaluate(first, second, records, refusal)
        result["ok"] = all(result["checks"].values())
    except BaseException as err:  # report, then still shut down and print the JSON line
        result["error"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        try:
            ray.shutdown()
        finally:
            if cluster is not None:
                cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, default=str), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
