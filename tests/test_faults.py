"""Faults and stops of the Ray service on the tiny model, on a real local Ray cluster (2 cores):
a SIGKILLed rollout worker is restarted (and, with collective weight sync, the learner with it), a SIGKILLed
reward replica replaced, and a SIGKILLed learner worker makes Ray Train restart the group from the latest
checkpoint, and the run finishes with every step; a reward that cannot start, or rollout workers that do not
start in time, end the run in one line; Ctrl-C (SIGINT) on the CLI checkpoints the current step of a 2-rank
FSDP learner and exits 130, and --resume on 1 DDP rank then finishes with exactly one metrics line per step."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from egrpo_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = [  # the smallest run that still exercises every part: 2 rollout workers, 1 DDP learner
    "rollout.workers=2", "learner.workers=1", "rewards.0.replicas=1", "learner.num_cpus=0.5", "rollout.num_cpus=0.25",
    "rewards.0.num_cpus=0.25", "prompts.heldout_count=4", "learner.prompts_per_step=2", "algorithm.group_size=4",
    "sampling.steps=8", "logging.grid_every=100", "learner.checkpoint_every=2", "learner.keep_checkpoints=2",
]
STEPS = 6


def _records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out)]


def _wait_for(out: Path, reached, what: str, run: threading.Thread | subprocess.Popen, timeout_s: float = 300) -> None:
    """Until ``reached(metrics records)``; fails if the run ends or stalls first."""
    deadline = time.monotonic() + timeout_s
    while not reached(_records(out)):
        alive = run.is_alive() if isinstance(run, threading.Thread) else run.poll() is None
        assert alive and time.monotonic() < deadline, f"the run ended or stalled before {what}"
        time.sleep(0.2)


def _wait_for_step(out: Path, step: int, run: threading.Thread | subprocess.Popen) -> None:
    _wait_for(out, lambda records: any(r["step"] >= step for r in records), f"step {step}", run)


def _train_in_background(out: Path, overrides: list[str]):
    """train() on the session cluster, on a thread; returns (thread, result holder)."""
    from egrpo_ray.distributed.driver import train

    cfg = load_config(ROOT / "configs" / "tiny.yaml", SMALL + [f"learner.iterations={STEPS}"] + overrides)
    result: dict = {}

    def go():
        try:
            result["summary"] = train(cfg, str(out), progress=False)
        except BaseException as err:  # reported by the test
            result["error"] = err

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread, result


def _alive_pids(class_name: str) -> list[int]:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # explicit: other Ray instances may run on this machine
    return [a.pid for a in list_actors(address=address, filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])]


def _finish(thread, result, timeout_s: float = 300) -> dict:
    thread.join(timeout_s)
    assert not thread.is_alive(), "the run did not finish"
    assert "error" not in result, result.get("error")
    return result["summary"]


def test_a_run_survives_a_killed_rollout_worker_reward_replica_and_learner_worker(ray_cluster, tmp_path):
    """Four faults in one run (collective weight sync): a SIGKILLed rollout worker is restarted and given its loop
    back; it also broke the broadcast group, so the learner's next publish fails and Ray Train restarts the
    learner from the latest checkpoint, whose new group takes in the restarted worker. Then a SIGKILLed learner
    worker makes Ray Train restart the group again, and Serve replaces a SIGKILLed reward replica (calls that hit
    the dead one are retried). Every step runs once; a policy version is never reused."""
    import ray

    out = tmp_path / "faults"
    thread, result = _train_in_background(out, ["cluster.run_name=faults", "rollout.weight_sync=collective",
                                                "learner.max_failures=2"])
    _wait_for_step(out, 2, thread)
    victim = ray.get_actor("faults-rollout-0")
    os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
    # the broken broadcast group: until a step of the restarted learner is in the metrics
    _wait_for(out, lambda records: any(r["learner_restarts"] >= 1 for r in records), "the learner's restart", thread)
    [learner] = _alive_pids("RayTrainWorker")
    os.kill(learner, signal.SIGKILL)
    [replica] = _alive_pids("ServeReplica:egrpo-faults-alignment:reward_alignment")
    os.kill(replica, signal.SIGKILL)
    summary = _finish(thread, result)
    records = _records(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # replayed steps replace their first lines
    versions = [r["policy_version"] for r in records]
    assert versions == sorted(set(versions))
    assert summary["completed"] and summary["heldout_reward_after"] is not None
    assert summary["failures"]["learner_restarts"] == 2
    assert summary["failures"]["rollout_restarts"] == 1 and summary["failures"]["rollout_lost"] == 0
    assert [w["restarts"] for w in summary["rollout_workers"]] == [1, 0]
    assert records[-1]["rollout_restarts"] == 1 and records[-1]["learner_restarts"] == 2  # in the metrics too
    kept = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert kept[-1] == f"step_{STEPS:06d}" and len(kept) <= 3  # the last 2 and the best


def _cli_train(config: Path, out: Path, sets: list[str], session_cluster: bool = True) -> list[str]:
    """``egrpo-ray train`` joined to the session cluster (no second cluster start), or on its own embedded one."""
    import ray

    if session_cluster:
        sets = sets + [f"cluster.address={ray.get_runtime_context().gcs_address}"]
    return [sys.executable, "-m", "egrpo_ray.cli", "train", "--config", str(config), "--output-dir", str(out),
            "--no-progress", *[a for s in sets for a in ("--set", s)]]


def _failed_start(tmp_path: Path, config: Path, sets: list[str]) -> str:
    """Run a start that must fail; returns its last line after checking there is no crash output. Serve's
    controller logs a failed replica's traceback; it reaches this console only because the session's cluster
    started Serve without the run's runtime env (a run that starts Serve keeps that log in files)."""
    done = subprocess.run(_cli_train(config, tmp_path / "out", SMALL + sets), check=False, capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True, cwd=ROOT, timeout=180)
    text = done.stdout + done.stderr
    assert done.returncode == 2, text[-3000:]
    ours = "\n".join(l for l in text.splitlines() if "(ServeController pid=" not in l)
    assert not any(crash in ours for crash in ("Traceback", "Stack trace", "Fatal Python error")), ours[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_a_reward_that_cannot_start_ends_the_run_in_one_line(ray_cluster, tmp_path):
    """A reward whose model does not load in its replica (a CLIP directory with a config.json and no weights)
    passes the up-front checks; Serve gives its application up after start_attempts (1: Serve's own rule would
    load it 3 times) while Train starts the learner. The run ends with one line naming the reward and the
    replica's error; the learner, told to stop while still starting, is ended with the driver, and no traceback
    reaches the console."""
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    (tmp_path / "run.yaml").write_text(f"rewards:\n  - {{name: clip, path: {tmp_path / 'clip'}, start_attempts: 1}}\n")
    last = _failed_start(tmp_path, tmp_path / "run.yaml", [])
    assert last.startswith("egrpo-ray: error: reward 'clip': its Serve application did not start "
                           "(1 failed replica start; OSError: "), last


def test_a_run_its_cluster_cannot_hold_ends_in_one_line(tmp_path):
    """The driver's check against the cluster it started (here its own, embedded) refuses before Serve starts:
    one line and exit 2, with nothing of Serve to clean up in the way."""
    cmd = _cli_train(ROOT / "configs" / "tiny.yaml", tmp_path / "out", ["rollout.resources={nosuch: 1}"],
                     session_cluster=False)
    done = subprocess.run(cmd, check=False, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                          cwd=ROOT, timeout=180)
    assert done.returncode == 2 and "Traceback" not in done.stdout + done.stderr, (done.stdout + done.stderr)[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith("egrpo-ray: error: ") and "nosuch" in done.stderr


def test_rollout_workers_that_do_not_start_in_time_end_the_run_in_one_line(ray_cluster, tmp_path):
    """cluster.startup_timeout_s runs out while the rollout workers load (collective weight sync: the learner's
    group would wait for them): the workers are stopped, the learner ends, and the run ends in one line."""
    last = _failed_start(tmp_path, ROOT / "configs" / "tiny.yaml",
                         ["cluster.startup_timeout_s=0.001", "rollout.weight_sync=collective"])
    assert last == ("egrpo-ray: error: rollout workers did not start within 0.001 s "
                    "(the cluster lacks the resources they ask for?)"), last


def test_sigint_checkpoints_the_current_step_then_resume_finishes(ray_cluster, tmp_path):
    """Ctrl-C stops a 2-rank FSDP run after the current step's checkpoint (both ranks' shards); --resume continues
    on 1 DDP rank (the checkpoint resharded on load) with rollout workers started from the checkpoint's weights."""
    out = tmp_path / "sigint"
    # 1 prompt a batch: each of the 2 ranks takes whole batches of its 1-prompt share
    sets = SMALL[:-2] + [f"learner.iterations={STEPS}", "learner.checkpoint_every=4", "rollout.prompts_per_batch=1"]
    cmd = _cli_train(ROOT / "configs" / "tiny.yaml", out, sets + ["learner.workers=2", "learner.parallelism=fsdp"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, text[-3000:]
    stopped = max(_steps(out))
    assert f"interrupted at step {stopped}; resume with --resume" in text
    stop_checkpoint = out / "checkpoints" / f"step_{stopped:06d}"  # the stop wrote the current step
    assert sorted(p.name for p in (stop_checkpoint / "state").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    stopped_version = json.loads((stop_checkpoint / "meta.json").read_text())["policy_version"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] and summary["exit_code"] == 130 and not summary["completed"]
    before = summary["heldout_reward_before"]

    resume = _cli_train(ROOT / "configs" / "tiny.yaml", out, sets + ["learner.workers=1", "learner.parallelism=ddp"])
    resumed = subprocess.run(resume + ["--resume"], check=False, env=env, capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert _steps(out) == list(range(1, STEPS + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps_completed"] == STEPS and summary["steps_this_run"] == STEPS - stopped
    assert re.search(r"^rollout: \d+ images sampled, \d+ batch(es)? dropped as too stale$", resumed.stdout, re.M)
    assert f"{STEPS} learner steps ({STEPS - stopped} this run, resumed from step_{stopped:06d})" in resumed.stdout
    assert summary["heldout_reward_before"] == before  # the base model's, not the checkpoint's
    # the resumed workers wait without weights: the first they load are the checkpoint's
    assert all(w["versions_loaded"][0] == stopped_version for w in summary["rollout_workers"]), summary["rollout_workers"]
    meta = json.loads((out / "checkpoints" / f"step_{STEPS:06d}" / "meta.json").read_text())
    assert meta["world_size"] == 1 and meta["parallelism"] == "ddp"


# -- the pieces, without a cluster (milliseconds) ---------------------------------------------------------


def test_metrics_writer_keeps_one_line_per_step(tmp_path):
    from egrpo_ray.outputs import MetricsWriter

    w = MetricsWriter(tmp_path)
    for step in [1, 2, 3, 4, 3, 4, 5]:  # a learner restart from the checkpoint at step 2 replays 3 and 4
        w.write({"step": step, "v": step})
    assert [r["step"] for r in w.read()] == [1, 2, 3, 4, 5]
    MetricsWriter(tmp_path).rewind(2)  # a resume from the checkpoint at step 2
    assert [r["step"] for r in MetricsWriter(tmp_path).read()] == [1, 2]


def test_prune_keeps_the_last_k_and_the_best(tmp_path):
    from egrpo_ray.checkpoint import prune_checkpoints

    rewards = {2: 0.5, 4: 0.9, 6: 0.6, 8: 0.7, 10: 0.4}
    for step, r in rewards.items():
        d = tmp_path / "checkpoints" / f"step_{step:06d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"step": step, "reward_mean": r}))
    assert prune_checkpoints(tmp_path, None) == []
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004", "step_000008", "step_000010"]


def test_resume_refuses_a_changed_algorithm_and_names_the_keys():
    from egrpo_ray.config import ConfigError
    from egrpo_ray.distributed.driver import check_resume_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    meta = {"step": 5, "config": cfg.model_dump(mode="json")}
    free = load_config(ROOT / "configs" / "tiny.yaml", ["learner.iterations=99", "learner.lr=1e-5", "rollout.workers=1",
                                                        "rewards.0.replicas=2", "learner.workers=2"])
    check_resume_config(free, meta)  # schedule, scale and placement may change
    changed = load_config(ROOT / "configs" / "tiny.yaml", ["algorithm.group_size=4", "model.resolution=16"])
    with pytest.raises(ConfigError, match=r"algorithm\.group_size \(8 -> 4\).*model\.resolution \(32 -> 16\)"):
        check_resume_config(changed, meta)


def test_reward_calls_are_retried_with_one_line_each():
    import ray

    from egrpo_ray.distributed.rollout import retrying

    calls, lines = [], []

    def flaky(images, prompts):
        calls.append(1)
        if len(calls) < 3:  # a dead replica, then one that does not answer in cluster.reward_timeout_s
            raise ray.exceptions.RayError("replica died") if len(calls) == 1 else TimeoutError("no answer")
        return {"alignment": 1.0}

    assert retrying(flaky, 3, lines.append, "worker 0")(None, []) == {"alignment": 1.0}
    assert len(calls) == 3 and len(lines) == 2 and "retry 1/3" in lines[0] and "(TimeoutError); retry 2/3" in lines[1]

    def down(images, prompts):
        raise ray.exceptions.RayError("no replica")

    with pytest.raises(ray.exceptions.RayError):  # past the retries the error surfaces
        retrying(down, 1, lines.append, "worker 0")(None, [])


def test_sigterm_and_sigint_ask_for_a_stop_then_force():
    from egrpo_ray.distributed.driver import StopSignals

    for sig in (signal.SIGTERM, signal.SIGINT):
        signals = StopSignals()
        try:
            os.kill(os.getpid(), sig)
            time.sleep(0.05)
            assert signals.received == sig
            with pytest.raises(KeyboardInterrupt):  # a second signal forces
                os.kill(os.getpid(), sig)
                time.sleep(0.05)
        finally:
            signals.restore()
