"""Soak test (not in CI): a long tiny run of `egrpo-ray train` on its own embedded cluster, sampled every
interval: each Ray process's private RSS (RSS less shared pages) summed by role, the object store's usage, and the replay queue's depth (from
metrics.jsonl). At the end it prints the table and a least-squares slope per series (MB/min, queue rows/min)
and stops the run by itself (SIGINT: the driver's Ctrl-C path, which shuts the cluster down).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --minutes 30        # the soak
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py --minutes 5 --interval 30

A leak shows as a steady positive slope after the first samples (start-up allocations); --skip drops those.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from egrpo_ray.distributed.cluster import watchdog_temp_dir

ROOT = Path(__file__).resolve().parents[1]
RUN = [  # tiny, on 2 cores: 2 rollout workers, 1 reward replica, 1 learner rank; never ends, never checkpoints
    "rollout.workers=2", "rewards.0.replicas=1", "learner.workers=1", "learner.num_cpus=0.5", "rollout.num_cpus=0.25",
    "rewards.0.num_cpus=0.25", "prompts.heldout_count=2", "learner.prompts_per_step=4", "rollout.prompts_per_batch=2",
    "algorithm.group_size=8", "learner.iterations=1000000", "learner.checkpoint_every=1000000",
    "logging.grid_every=1000000", "logging.log_every=1000000",
]


def role(name: str, cmdline: list[str]) -> str:
    """A process's role: Ray workers by actor class (method, app and replica ids dropped), head processes by name."""
    if name.startswith("ray::"):
        base = name[5:]
        if base.startswith(("SERVE_REPLICA::", "ServeReplica")):
            return "ServeReplica"
        base = re.split(r"[.:]", base.split(":")[-1] if "-rollout-" in base else base)[0]
        return base or "worker"
    joined = " ".join(cmdline)
    for key in ("dashboard/agent.py", "runtime_env/agent", "dashboard.py", "monitor.py", "log_monitor.py"):
        if key in joined:
            return key.split("/")[-1].replace(".py", "")
    if name.startswith("ray-dashboard-"):
        return "dashboard-modules"
    if "multiprocessing.forkserver" in joined:
        return "dashboard-forkserver"
    if "egrpo_ray.cli" in joined:
        return "driver"
    if "egrpo_ray.distributed.cluster" in joined:
        return "watchdog"
    return name


def processes(driver: psutil.Process) -> list[psutil.Process]:
    try:
        return [driver] + driver.children(recursive=True)
    except psutil.Error:
        return []


def temp_dir_of(procs) -> str | None:
    for p in procs:
        try:
            found = watchdog_temp_dir(p.cmdline())
        except psutil.Error:
            continue
        if found:
            return found
    return None


def rss_by_role(procs) -> dict[str, float]:
    """Private RSS (RSS less shared pages: the object store's mapping is counted once, as store_MB) by role."""
    out: dict[str, float] = {}
    for p in procs:
        try:
            r = role(p.name(), p.cmdline())
            m = p.memory_info()
            out[r] = out.get(r, 0.0) + (m.rss - m.shared) / 2**20
        except psutil.Error:
            pass
    return out


def object_store_mb(temp_dir: str) -> float | None:
    """Bytes in the object store, asked of the raylet like `ray memory --stats-only` (token from the run's dir)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address  # noqa: I001

        port = next(Path(temp_dir, "session_latest").glob("gcs_server_port_*")).read_text().strip()
        address = f"127.0.0.1:{port}"  # the embedded cluster is on loopback
        reply = get_memory_info_reply(get_state_from_address(address), timeout_seconds=20)
        return reply.store_stats.object_store_bytes_used / 2**20
    except Exception as err:  # noqa: BLE001 - a sample is skipped, the soak goes on
        print(f"object store: {err!r}", file=sys.stderr)
        return None


def queue_depth(out: Path) -> tuple[float | None, int]:
    """Mean replay-queue depth over the records since the last sample, and the step reached."""
    try:
        records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    except OSError:
        return None, 0
    if not records:
        return None, 0
    return float(records[-1]["queue_depth"]), int(records[-1]["step"])


def slope(xs: list[float], ys: list[float | None]) -> float | None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="how long to sample (default 30)")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between samples (default 60)")
    ap.add_argument("--skip", type=int, default=1, help="samples left out of the slopes (start-up; default 1)")
    ap.add_argument("--output-dir", help="run directory (default: a new temp dir)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides")
    args = ap.parse_args()

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="egrpo_soak_")) / "run"
    sets = [a for s in RUN + args.overrides for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / "driver.log", "w")  # noqa: SIM115 - the driver writes it for the whole soak
    driver_proc = subprocess.Popen(
        [sys.executable, "-m", "egrpo_ray.cli", "train", "--config", str(ROOT / "configs" / "tiny.yaml"), *sets,
         "--output-dir", str(out), "--no-progress"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    driver = psutil.Process(driver_proc.pid)
    print(f"soak: {args.minutes:g} min, a sample every {args.interval:g} s; run {out}, log {out.parent / 'driver.log'}")

    temp_dir = None
    while temp_dir is None and driver_proc.poll() is None:  # the embedded cluster's temp dir names its token
        temp_dir = temp_dir_of(processes(driver))
        time.sleep(0.5)
    if temp_dir is None:
        print(f"the run ended before its cluster started:\n{(out.parent / 'driver.log').read_text()[-3000:]}")
        return 1
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(Path(temp_dir) / "auth_token"),
                      RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # before ray is imported: the cluster's settings
    os.environ.pop("RAY_AUTH_TOKEN", None)
    while driver_proc.poll() is None and queue_depth(out)[1] == 0:  # sample from the first learner step on
        time.sleep(1)

    t0 = time.monotonic()
    samples: list[dict] = []
    try:
        while driver_proc.poll() is None:
            minute = (time.monotonic() - t0) / 60
            depth, step = queue_depth(out)
            sample = {"min": minute, "step": step, "queue": depth, "store_MB": object_store_mb(temp_dir),
                      **{f"{k}_MB": v for k, v in rss_by_role(processes(driver)).items()}}
            sample["total_MB"] = sum(v for k, v in sample.items() if k.endswith("_MB") and k != "store_MB" and v)
            samples.append(sample)
            print(f"t={minute:5.1f} min  step {step}  queue {depth}  object store {sample['store_MB'] or 0:.1f} MB  "
                  f"RSS {sample['total_MB']:.0f} MB", flush=True)
            if minute * 60 + args.interval > args.minutes * 60 + 1:
                break
            time.sleep(max(0.0, t0 + len(samples) * args.interval - time.monotonic()))
    finally:
        if driver_proc.poll() is None:
            driver_proc.send_signal(signal.SIGINT)  # the driver's Ctrl-C: stops workers, shuts the cluster down
            try:
                driver_proc.wait(180)
            except subprocess.TimeoutExpired:
                driver_proc.kill()
                driver_proc.wait()
    if driver_proc.returncode not in (0, 130, -signal.SIGINT):
        print(f"the run ended with {driver_proc.returncode}:\n{(out.parent / 'driver.log').read_text()[-3000:]}")

    keys = sorted({k for s in samples for k in s if k not in ("min", "step")}, key=lambda k: (k != "queue", k))
    print("\n" + "series".ljust(24) + "".join(f"{s['min']:>8.1f}" for s in samples) + "   slope/min")
    used = samples[args.skip:] if len(samples) > args.skip + 1 else samples
    for k in keys:
        sl = slope([s["min"] for s in used], [s.get(k) for s in used])
        cells = "".join(f"{s[k]:8.1f}" if s.get(k) is not None else "       -" for s in samples)
        print(k.ljust(24) + cells + (f"   {sl:+.3f}" if sl is not None else "   -"))
    steps = [s["step"] for s in samples]
    print(f"learner steps {steps[0]} -> {steps[-1]} over {samples[-1]['min']:.1f} min; "
          f"slopes from sample {min(args.skip, len(samples) - 1)} on (MB/min; queue: rows/min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
