"""``egrpo-ray train``: the single controller. It starts (or joins) the cluster, the reward service,
the replay queue, weight store and run log, the rollout workers and the Ray Train learner, then reads
the learner's metrics like a single-process loop would: progress bar, metrics.jsonl, grids, curve."""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from egrpo_ray.checkpoint import latest_checkpoint
from egrpo_ray.config import ConfigError, ExperimentConfig, add_config_args, dump_config, load_config
from egrpo_ray.outputs import MetricsWriter, plot_reward_curve, save_grid
from egrpo_ray.preflight import preflight


def _learner_scaling(cfg: ExperimentConfig):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    use_gpu = cfg.learner.num_gpus > 0
    resources = {"CPU": cfg.learner.num_cpus, **cfg.learner.resources}
    if use_gpu:
        resources["GPU"] = cfg.learner.num_gpus
    backend = cfg.learner.backend if cfg.learner.backend != "auto" else ("nccl" if use_gpu else "gloo")
    return ScalingConfig(num_workers=cfg.learner.workers, use_gpu=use_gpu, resources_per_worker=resources), TorchConfig(backend=backend)


def new_run_name(output_dir: Path) -> str:
    """The output directory's name and a random suffix (letters, digits, '-', '_', '.' only)."""
    import re
    import secrets

    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', output_dir.name)[:48]}-{secrets.token_hex(4)}"


def train(cfg: ExperimentConfig, output_dir: str | None = None, resume: bool = False, progress: bool = True,
          temp_dir: str | None = None) -> dict:
    import ray
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from egrpo_ray.distributed.actors import ReplayQueue, RunLog, WeightStore
    from egrpo_ray.distributed.cluster import init_ray, shutdown_ray, validate_on_cluster
    from egrpo_ray.distributed.learner import learner_loop
    from egrpo_ray.distributed.reward_service import delete_rewards, deploy_rewards
    from egrpo_ray.distributed.rollout import RolloutWorker

    out = Path(output_dir or cfg.logging.output_dir).resolve()
    checkpoint, meta = preflight(cfg, out, resume)
    if not cfg.cluster.run_name:  # names this run's Serve applications apart from other runs on the cluster
        cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"run_name": new_run_name(out)})})
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))

    started = init_ray(cfg, temp_dir)
    t0 = time.perf_counter()
    try:
        validate_on_cluster(cfg)
        queue = ReplayQueue.remote(cfg.learner.queue_capacity, cfg.learner.max_staleness)
        store, log = WeightStore.remote(), RunLog.remote()
        done_batches = meta.get("prompt_batches_by_worker", {})
        # Actors start (imports, model load) while Serve deploys the rewards: start-up overlaps.
        workers = [
            RolloutWorker.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                  resources=cfg.rollout.resources).remote(
                cfg.model_dump(), i, queue, store, int(done_batches.get(str(i), 0)), base_is_current=checkpoint is None)
            for i in range(cfg.rollout.workers)
        ]
        deploy_rewards(cfg)
        ready = [w.ready.remote() for w in workers]  # actor tasks run in order: ready, then run
        worker_runs = [w.run.remote() for w in workers]
        scaling, torch_config = _learner_scaling(cfg)
        trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"cfg": cfg.model_dump(), "queue": queue, "store": store, "log": log, "workers": workers,
                               "output_dir": str(out), "resume_from": str(checkpoint) if checkpoint else None},
            scaling_config=scaling, torch_config=torch_config,
            run_config=RunConfig(name="learner", storage_path=str(out / "ray_train")),
        )
        fit_error: list[BaseException] = []

        def fit() -> None:
            try:
                trainer.fit()
            except BaseException as err:  # surfaced by the driver loop below
                fit_error.append(err)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        try:
            ray.get(ready, timeout=cfg.cluster.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.get(log.request_stop.remote())
            raise ConfigError(f"rollout workers did not start within {cfg.cluster.startup_timeout_s:g} s "
                              "(the cluster lacks the resources they ask for?)") from None
        summary = _follow(cfg, out, log, thread, int(meta.get("step", 0)), progress)
        summary["startup_s"] = summary.pop("first_step_at") - t0
        t_learner_done = time.perf_counter()
        ray.get(queue.close.remote())
        worker_stats = ray.get(worker_runs, timeout=120)
        summary["rollout_drain_s"] = time.perf_counter() - t_learner_done
        if fit_error:
            raise RuntimeError(f"the learner failed: {fit_error[0]}")
        summary.update(
            wall_seconds=time.perf_counter() - t0,
            rollout_workers=worker_stats,
            queue=ray.get(queue.stats.remote()),
            resumed_from=str(checkpoint) if checkpoint else None,
            output_dir=str(out),
            latest_checkpoint=str(latest_checkpoint(out)) if latest_checkpoint(out) else None,
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary
    except KeyboardInterrupt:
        ray.get(log.request_stop.remote()) if "log" in locals() else None
        raise
    finally:
        try:
            delete_rewards(cfg)  # only this run's applications: the cluster may be shared
        finally:
            shutdown_ray(started)


def _follow(cfg: ExperimentConfig, out: Path, log, thread: threading.Thread, start_step: int, progress: bool) -> dict:
    """Stream the learner's records into metrics.jsonl, Prometheus, the progress bar, grids and the curve."""
    import ray

    writer = MetricsWriter(out)
    prometheus, server = None, None
    if cfg.logging.metrics_port is not None:
        from egrpo_ray.monitoring import RunMetrics

        prometheus = RunMetrics(out.name)
        server = prometheus.serve(cfg.logging.metrics_port, cfg.logging.metrics_host)
        bar_note = f"metrics: http://{cfg.logging.metrics_host}:{server.server_port}/metrics"
        print(bar_note, flush=True)
    n_rec = n_img = 0
    heldout: dict[str, tuple[int, float]] = {}
    probes: dict[str, float] = {}
    first_step_at = None
    bar = tqdm(total=cfg.learner.iterations, initial=start_step, desc="E-GRPO", unit="step", disable=not progress)
    try:
        while True:
            alive = thread.is_alive()
            records, images = ray.get(log.since.remote(n_rec, n_img))
            n_rec, n_img = n_rec + len(records), n_img + len(images)
            for r in records:
                if prometheus:
                    prometheus.update(r)
                if r.get("event") == "heldout":
                    heldout[r["tag"]] = (r["step"], r["heldout_reward"])
                    probes[r["tag"]] = r["train_probe_reward"]
                    bar.write(f"[{r['tag']}] held-out reward {r['heldout_reward']:.4f}, "
                              f"training-prompt probe {r['train_probe_reward']:.4f}")
                    continue
                first_step_at = first_step_at or time.perf_counter()
                writer.write(r)
                bar.update(r["step"] - bar.n)
                bar.set_postfix(reward=f"{r['reward_mean']:.3f}", ratio=f"{r['ratio_mean']:.4f}", queue=r["queue_depth"],
                                stale=f"{r['staleness_mean']:.1f}")
                if r["step"] % cfg.logging.log_every == 0:
                    bar.write(f"step {r['step']:4d}  reward {r['reward_mean']:.4f} +- {r['reward_std']:.4f}  "
                              f"zero-std {r['zero_std_ratio']:.2f}  ratio {r['ratio_mean']:.5f}  clip {r['clip_fraction']:.3f}  "
                              f"staleness {r['staleness_mean']:.2f}  queue {r['queue_depth']}  {r['images_per_s']:.1f} img/s")
            for step, tag, arr in images:
                save_grid(torch.from_numpy(arr), out / "grids" / f"heldout_{tag}.png", scale=4)
            if not alive:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        bar.write("interrupted: stopping the learner and rollout workers (Ctrl-C again to force)")
        ray.get(log.request_stop.remote())
        thread.join(timeout=120)
    finally:
        bar.close()
        if server:
            server.shutdown()
    records = writer.read()
    if records:
        plot_reward_curve(records, out / "reward_curve.png", [v for v in heldout.values()])
    return {
        "first_step_at": first_step_at or time.perf_counter(),
        "steps_completed": records[-1]["step"] if records else start_step,
        "heldout_reward_before": heldout.get("before", (0, None))[1],
        "heldout_reward_after": heldout.get("after", (0, None))[1],
        "train_probe_reward_before": probes.get("before"),
        "train_probe_reward_after": probes.get("after"),
        "train_reward_first": records[0]["reward_mean"] if records else None,
        "train_reward_last": records[-1]["reward_mean"] if records else None,
        "metrics": str(out / "metrics.jsonl"),
        "reward_curve": str(out / "reward_curve.png"),
        "grids": str(out / "grids"),
    }


def add_subcommand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run E-GRPO as the Ray actor-learner service")
    add_config_args(p)
    p.add_argument("--output-dir", help="run directory (default: logging.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.output_dir, args.resume, progress=not args.no_progress)
    before, after = summary["heldout_reward_before"], summary["heldout_reward_after"]
    print(f"\ndone in {summary['wall_seconds']:.0f} s: {summary['steps_completed']} learner steps")
    if before is not None and after is not None:
        print(f"held-out reward: {before:.4f} -> {after:.4f}")
    print(f"metrics: {summary['metrics']}\nreward curve: {summary['reward_curve']}\ngrids: {summary['grids']}")
    print(f"checkpoint: {summary['latest_checkpoint']}\nsummary: {Path(summary['output_dir']) / 'summary.json'}")
    return 0
