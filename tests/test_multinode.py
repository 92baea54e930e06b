"""Multi-node: the service on a simulated 3-node Ray cluster (ray.cluster_utils.Cluster), nodes labelled
with custom resources. Each role goes where the config asks: rollout workers on {"rollout_node"}, the
reward replica on {"reward_node"}, both FSDP learner ranks on {"learner_node"} (the head), and the learner's
rank 0 broadcasts weights to the rollout workers across the nodes. Checkpoints land in the shared output
directory with both ranks' shards (tests/test_faults.py resumes such a checkpoint on 1 DDP rank).

The run is tests/multinode_run.py in a subprocess: a multi-node Cluster cannot share this process with the
session's local cluster (tests/conftest.py). It prints one JSON line with what it found.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from egrpo_ray.config import load_config
from egrpo_ray.distributed.cluster import ClusterError, check_placement

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "multinode_run.py"
TIMEOUT_S = 300  # 75 s on 2 cores (2026-12); the margin is for a loaded box
PLACED = {"rollout": {"rollout_node": 2}, "learner": {"learner_node": 2}, "reward": {"reward_node": 1}}


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:] if text else ""


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    parent = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # its own session: on a timeout the whole process group (driver, and the Ray nodes it started) goes
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(parent)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"{SCRIPT.name} ran past {TIMEOUT_S} s\nstderr tail:\n{_tail(err)}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        pytest.fail(f"{SCRIPT.name} printed no JSON (exit {proc.returncode})\nstderr tail:\n{_tail(err)}")
    result = json.loads(lines[-1])
    (parent / "result.json").write_text(json.dumps(result, indent=2))  # for a look after the fact
    assert "error" not in result, f"{result['error']}\nstderr tail:\n{_tail(err)}"
    return proc.returncode, result, parent / "run", err


def test_every_check_of_the_run_passed(multinode):
    rc, result, _, err = multinode
    failed = [name for name, ok in result["checks"].items() if not ok]
    assert rc == 0 and result["ok"] and not failed, f"failed: {failed}\n{json.dumps(result)}\n{_tail(err)}"


def test_each_role_ran_on_the_node_its_config_asks_for(multinode):
    _, result, _, _ = multinode
    assert set(result["nodes"]) == {"learner_node", "rollout_node", "reward_node"}
    assert len(set(result["nodes"].values())) == 3  # three distinct Ray nodes
    assert result["run"]["placement"] == PLACED


def test_weights_cross_from_the_learner_node_to_the_rollout_node(multinode):
    _, result, _, _ = multinode
    # the collective sync group spans the nodes. Which versions a worker applied depends on timing (one
    # mid-batch skips a version), so: newer weights only, and some worker got a version the learner made
    loaded = result["run"]["versions_loaded"]
    assert all(v == sorted(set(v)) for v in loaded) and max(max(v, default=-1) for v in loaded) >= 1
    # max_staleness 0: every step learned from groups sampled with the learner's current weights
    assert result["staleness_max"] == [0, 0]


def test_checkpoints_are_in_the_shared_output_directory(multinode):
    _, result, out, _ = multinode
    assert result["run"]["latest"] == "step_000002"
    # the 2 FSDP ranks wrote their shards to the one directory
    ckpt = out / "checkpoints" / "step_000002"
    assert (ckpt / "state" / ".metadata").is_file()
    assert sorted(p.name for p in (ckpt / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["parallelism"] == "fsdp" and meta["step"] == 2
    assert any((ckpt / "transformer").glob("*.safetensors"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert steps == [1, 2] == result["metrics_steps"]


def test_a_labelled_node_too_small_for_its_roles_is_refused_up_front(multinode):
    _, result, _, _ = multinode
    refusal = result["infeasible_pin_refusal"]
    assert refusal and "learner_node" in refusal and "1.5 CPUs" in refusal


def test_check_placement_without_ray():
    nodes = [{"CPU": 1.0, "learner_node": 1.0}, {"CPU": 1.0, "rollout_node": 1.0}, {"CPU": 1.0, "reward_node": 1.0}]
    pins = ["rollout.resources={rollout_node: 0.01}", "learner.resources={learner_node: 0.01}",
            "rewards.0.resources={reward_node: 0.01}", "learner.workers=2", "learner.num_cpus=0.5",
            "learner.prompts_per_step=4", "rollout.workers=2", "rollout.num_cpus=0.25", "rewards.0.num_cpus=0.25"]
    tiny = ROOT / "configs" / "tiny.yaml"
    check_placement(load_config(tiny, pins), nodes)  # fits
    check_placement(load_config(tiny), [{"CPU": 2.0}])  # nothing pinned: nothing to check
    with pytest.raises(ClusterError, match=r"learner_node.*1\.5 CPUs"):
        check_placement(load_config(tiny, pins + ["learner.num_cpus=0.75"]), nodes)
    with pytest.raises(ClusterError, match="no node can hold one learner"):  # one rank alone is too big
        check_placement(load_config(tiny, pins + ["learner.num_cpus=1.5"]), nodes)
    # two roles pinned to one node share it
    with pytest.raises(ClusterError, match=r"rollout_node.*1\.05 CPUs \(rollout 2x0\.4 \+ reward alignment 1x0\.25\)"):
        check_placement(load_config(tiny, pins + ["rewards.0.resources={rollout_node: 0.01}", "rollout.num_cpus=0.4"]),
                        nodes)
    with pytest.raises(ClusterError, match=r"learner_node.*2 GPUs"):
        check_placement(load_config(tiny, pins + ["learner.num_gpus=1"]), [{**nodes[0], "GPU": 1.0}, *nodes[1:]])
