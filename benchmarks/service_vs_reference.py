"""The Ray service against the single-process reference loop: same tiny config, same work.

Prints wall times and their ratio (target: service / reference <= 1.25 on 2 cores), rollout images
per second, learner steps per second, weight-sync time and queue wait. Both runs happen here, now,
so the ratio is comparable even on a noisy machine. Usage:

    .venv/bin/python benchmarks/service_vs_reference.py [--iterations 12] [--set key=value ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from egrpo_ray.config import load_config
from egrpo_ray.reference_loop import run_reference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides + [f"learner.iterations={args.iterations}"])
    out = Path(tempfile.mkdtemp(prefix="egrpo_bench_"))

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    ref = run_reference(cfg, output_dir=str(out / "reference"), progress=False)
    ref_wall = time.perf_counter() - t0
    ref_steps = [m["seconds"] for m in ref["history"]]
    ref_step_s = statistics.median([b - a for a, b in zip([0.0] + ref_steps, ref_steps)])

    from egrpo_ray.distributed.driver import train

    t0 = time.perf_counter()
    summary = train(cfg, str(out / "service"), progress=False)
    svc_wall = time.perf_counter() - t0
    records = [json.loads(l) for l in (out / "service" / "metrics.jsonl").read_text().splitlines()]
    svc_step_s = statistics.median(r["step_seconds"] for r in records[1:]) if len(records) > 1 else records[0]["step_seconds"]
    # steady state: from the first learner step's end to the last's (excludes cluster start and teardown)
    images = sum(w["images"] for w in summary["rollout_workers"])
    syncs = [s for w in summary["rollout_workers"] for s in w["sync_seconds"]]
    figures = {
        "iterations": args.iterations,
        "reference_wall_s": round(ref_wall, 2),
        "service_wall_s": round(svc_wall, 2),
        "wall_ratio_total": round(svc_wall / ref_wall, 3),
        "reference_step_s_median": round(ref_step_s, 3),
        "service_step_s_median": round(svc_step_s, 3),
        "step_time_ratio_steady": round(svc_step_s / ref_step_s, 3),
        "service_learner_steps_per_s": round(1 / svc_step_s, 3),
        "service_rollout_images_per_s": round(statistics.median(r["images_per_s"] for r in records), 1),
        "service_images_sampled": images,
        "reference_images_per_s": round(ref["history"][0]["samples"] / ref_step_s, 1),
        "service_startup_s": round(summary["startup_s"], 1),
        "service_rollout_drain_s": round(summary["rollout_drain_s"], 1),
        "weight_sync_s_median": round(statistics.median(syncs), 4) if syncs else None,
        "weight_publish_s_median": round(statistics.median(r["weight_publish_s"] for r in records), 4),
        "queue_wait_s_median": round(statistics.median(r["queue_wait_s"] for r in records), 3),
        "reference_train_reward": [round(ref["summary"]["train_reward_first"], 4), round(ref["summary"]["train_reward_last"], 4)],
        "service_train_reward": [round(summary["train_reward_first"], 4), round(summary["train_reward_last"], 4)],
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
