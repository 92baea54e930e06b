"""A service run on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster).

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
from the other node; and a config whose pinned learner ranks overflow their 1-CPU node (though the cluster
has the CPUs in all) is refused up front instead of hanging. (tests/test_faults.py resumes a 2-rank FSDP
checkpoint on 1 DDP rank.)
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

ITERATIONS = CHECKPOINT_EVERY = 2
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


def placement(labels: dict[str, str]) -> dict:
    """Per role: the label of the node each of its actors (alive or finished) ran on."""
    from ray.util.state import list_actors

    out: dict[str, Counter] = {role: Counter() for role in ROLES}
    for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False):
        for role, cls in ROLES.items():
            if a.class_name == cls or (cls.startswith(":") and a.class_name.startswith("ServeReplica:")
                                       and a.class_name.endswith(cls)):
                out[role][labels.get(a.node_id, f"unknown:{a.node_id}")] += 1
    return {role: dict(c) for role, c in out.items()}


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


def run(out: Path, labels: dict[str, str]) -> dict:
    from egrpo_ray.config import load_config
    from egrpo_ray.distributed.driver import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", OVERRIDES + [f"learner.iterations={ITERATIONS}"])
    t0 = time.perf_counter()
    summary = train(cfg, str(out), progress=False)
    return {
        "wall_s": round(time.perf_counter() - t0, 1),
        "steps_completed": summary["steps_completed"],
        "placement": placement(labels),
        "versions_loaded": [w["versions_loaded"] for w in summary["rollout_workers"]],
        "failures": summary["failures"],
        **checkpoint_facts(out),
    }


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


def evaluate(run: dict, records: list[dict], refusal: str | None) -> dict[str, bool]:
    checks = {"infeasible_pin_rejected_up_front": refusal is not None and "learner_node" in refusal}
    for role, label in EXPECTED_NODE.items():
        where = run["placement"][role]
        checks[f"{role}_on_{label}"] = set(where) == {label} and where[label] >= {"learner": 2}.get(role, 1)
    # the weight-sync group spans the learner and rollout nodes: newer weights reached the rollout node
    # (which versions each worker applied depends on timing: a worker mid-batch skips a version)
    loaded = run["versions_loaded"]
    checks["rollout_workers_got_broadcast_weights"] = (
        all(v == sorted(set(v)) for v in loaded) and max(max(v, default=-1) for v in loaded) >= 1)
    checks["checkpoint_in_output_dir"] = (
        run["latest"] == f"step_{ITERATIONS:06d}" and run["dcp_metadata"] and run["transformer_export"]
        and run["meta_world_size"] == 2 and run["meta_parallelism"] == "fsdp")
    checks["checkpoint_has_both_ranks_shards"] = len(run["shard_files"]) == 2
    checks["no_failures"] = not any(run["failures"].values())
    # max_staleness 0: step k learned from groups sampled with version k-1, for k >= 2 broadcast weights
    checks["every_step_on_policy"] = all(r["staleness_max"] == 0 for r in records)
    checks["every_step_once"] = ([r["step"] for r in records] == list(range(1, ITERATIONS + 1))
                                 and run["steps_completed"] == ITERATIONS)
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

        result["run"] = run(out, labels)
        log(f"run: {result['run']}")
        records = records_of(out)
        result.update(metrics_steps=[r["step"] for r in records],
                      staleness_max=[r["staleness_max"] for r in records], output_dir=str(out))
        result["checks"] = evaluate(result["run"], records, refusal)
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
