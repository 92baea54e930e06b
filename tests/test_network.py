"""A killed driver leaves nothing: a real `egrpo-ray train` run (tiny config, its own embedded Ray cluster, in a
subprocess), SIGKILLed once every kind of process has started (a learner worker, rollout workers, a reward
replica), leaves no process of its cluster and no temp dir behind: its watchdog ends them. What a run listens on
(loopback only, docs/network.md) and its token auth are checked on the live run of tests/test_monitoring.py,
which ends on its own or on SIGTERM and is checked for leftovers the same way."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from run_processes import RunProcesses

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("ray::RayTrainWorker", "RolloutWorker", "ServeReplica")  # name prefixes / parts of the run's actors
RUN = [  # the smallest run with every kind of process: 1 rollout worker, 1 reward replica, 1 learner rank
    "rollout.workers=1", "rewards.0.replicas=1", "learner.workers=1", "learner.num_cpus=0.5",
    "rollout.num_cpus=0.25", "rewards.0.num_cpus=0.25", "prompts.heldout_count=2", "sampling.steps=8",
    "learner.prompts_per_step=2", "rollout.prompts_per_batch=2", "algorithm.group_size=4", "learner.minibatch_rows=8",
    "learner.checkpoint_every=100", "logging.grid_every=100", "learner.max_staleness=1",
    "rollout.weight_sync=collective",
]


def _start(out: Path, iterations: int) -> subprocess.Popen:
    """The driver, its output to out.parent/driver.log (a pipe nobody reads would stall it)."""
    sets = [a for s in RUN + [f"learner.iterations={iterations}"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "driver.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "egrpo_ray.cli", "train", "--config",
                                 str(ROOT / "configs" / "tiny.yaml"), *sets, "--output-dir", str(out), "--no-progress"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _log(out: Path) -> str:
    return (out.parent / "driver.log").read_text()[-3000:]


def _every_kind_started(run: RunProcesses) -> bool:
    names = run.all_names()
    return all(any(kind in n for n in names) for kind in KINDS)


def test_a_sigkilled_driver_leaves_nothing_of_its_cluster(tmp_path):
    out = tmp_path / "run"
    proc = _start(out, iterations=50)
    run = RunProcesses()
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and not _every_kind_started(run):
            run.look(proc.pid)
            time.sleep(0.5)
        assert proc.poll() is None and _every_kind_started(run), (sorted(run.all_names()), _log(out))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = time.monotonic()
    assert run.temp_dir and run.temp_dir.startswith("/tmp/egrpo_ray_"), run.temp_dir
    left = run.left_after(60)
    assert not left, f"60 s after SIGKILL of the driver these processes of its cluster (or its temp dir) remain: {left}"
    print(f"cluster gone {time.monotonic() - killed_at:.1f} s after SIGKILL of the driver")
