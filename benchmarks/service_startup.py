"""A service run's start-up, wall time and rollout work: this working tree against a git revision, in pairs.

Each run is its own process with its own local Ray cluster (2 CPUs): tests/test_faults.py's smallest config
(2 rollout workers, 1 reward replica, 1 DDP learner), 6 steps, plus any ``--set`` overrides. Runs alternate
baseline, candidate, baseline, ... so both see the same machine; the figures are each pair's difference and the
medians. Start-up is the driver's ``startup_s`` (from the cluster up to the first learner step); sampled is the
images the rollout workers sampled (the learner learns from 6 x 2 prompts' groups), dropped the batches the
queue threw away as too stale. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/service_startup.py --baseline b061ea5 [--pairs 3]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/service_startup.py --baseline HEAD~1 --set learner.max_staleness=0
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def one_run(tree: str, overrides: list[str]) -> None:
    """In a child process: one service run of ``tree``'s code; prints its figures as one JSON line."""
    sys.path[:0] = [tree, str(Path(tree) / "tests")]
    import ray

    from egrpo_ray.config import load_config
    from egrpo_ray.distributed.driver import train
    from test_faults import SMALL

    ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             _temp_dir=tempfile.mkdtemp(prefix="egrpo_bench_", dir="/tmp"), logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": tree}})  # the workers import the same tree
    cfg = load_config(Path(tree) / "configs" / "tiny.yaml", SMALL + [f"learner.iterations={STEPS}", *overrides])
    t0 = time.perf_counter()
    summary = train(cfg, tempfile.mkdtemp(prefix="egrpo_bench_out_"), progress=False)
    queue = summary["queue"]
    print(json.dumps({"wall_s": time.perf_counter() - t0, "startup_s": summary["startup_s"],
                      "sampled": sum(w["images"] for w in summary["rollout_workers"]),
                      # a baseline before 2026-12-07 lacks dropped_as_stale
                      "dropped": queue.get("dropped_as_stale", queue.get("dropped_stale", 0)
                                           + queue.get("dropped_stale_on_put", 0))}), flush=True)
    ray.shutdown()


def measure(tree: str, overrides: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", tree, *[f"--set={o}" for o in overrides]],
                          cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.exit(f"service_startup: the run of {tree} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="git revision to compare against (e.g. a commit or HEAD~1)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for both")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_run(args.child, args.set)
    if not args.baseline:
        ap.error("--baseline REV is required")
    base = Path(tempfile.mkdtemp(prefix="egrpo_bench_base_")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline], cwd=ROOT, check=True)
    try:
        runs = {"baseline": [], "candidate": []}
        for i in range(args.pairs):
            for name, tree in (("baseline", str(base)), ("candidate", str(ROOT))):
                runs[name].append(measure(tree, args.set))
                figures = ", ".join(f"{k} {v:.1f}" for k, v in runs[name][-1].items())
                print(f"pair {i + 1} {name}: {figures}", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    for key in ("wall_s", "startup_s", "sampled", "dropped"):
        b, c = ([r[key] for r in runs[n]] for n in ("baseline", "candidate"))
        diffs = [y - x for x, y in zip(b, c)]
        ratio = f"{statistics.median(c) / statistics.median(b):.3f}" if statistics.median(b) else "-"
        print(f"{key}: baseline median {statistics.median(b):.1f}, candidate {statistics.median(c):.1f}, "
              f"ratio {ratio}; paired differences "
              f"{', '.join(f'{d:+.1f}' for d in diffs)} (median {statistics.median(diffs):+.1f})")


if __name__ == "__main__":
    main()
