"""``egrpo-ray train``: the single controller. It starts (or joins) the cluster, the reward service,
the replay queue, weight store and run log, the rollout workers and the Ray Train learner, then follows
the run like a single-process loop would: progress bar, metrics.jsonl, grids, curve, one line per failure.

Start-up overlaps: Serve deploys the rewards while the rollout workers load the model and Ray Train starts
the learner, which builds its model, then waits for the driver's word that the rewards are up and the rollout
workers started. A reward that cannot start (Serve gives its application up), or rollout workers that do not
start within cluster.startup_timeout_s, end the run in one line, with the learner and the workers stopped.

Faults: rollout workers are restartable actors (``RolloutFleet`` gives a restarted one its loop back); reward
replicas are replaced by Serve and the calls retried; the learner group is restarted by Ray Train from the
latest checkpoint (FailureConfig). Stops: Ctrl-C (SIGINT) and SIGTERM (``ray job stop``) ask the learner to
checkpoint the current step, then the run ends with exit code 130 / 143 and summary.json says so. ``ray job
stop`` sends SIGKILL 3 s after SIGTERM unless the job's runtime env sets RAY_JOB_STOP_WAIT_TIME_S (say 300):
the learner finishes its step before it checkpoints.
Resume: the output directory's metrics and held-out records are cut back to the checkpoint's step, so each
step has exactly one line, and a config change that alters the algorithm or the model is refused.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from egrpo_ray.algo.gradient_noise import describe as describe_signal, signal_share
from egrpo_ray.checkpoint import export_final_lora, latest_checkpoint
from egrpo_ray.config import (
    ConfigError,
    ExperimentConfig,
    dump_config,
    load_config,
)
from egrpo_ray.outputs import MetricsWriter, Progress, change_lines, plot_reward_curve, save_comparison, save_grid
from egrpo_ray.preflight import preflight
from egrpo_ray.prompts import prompt_splits

# Config sections whose change alters the algorithm or the model: a resume with a different value is refused.
GUARDED = ("seed", "model", "sampling", "algorithm", "prompts", "rewards")
# Reward settings that only place or batch the deployment (free to change on resume).
REWARD_DEPLOYMENT_KEYS = {"replicas", "num_cpus", "num_gpus", "resources", "batch_size", "batch_wait_s",
                          "autoscale_max_replicas", "start_attempts"}
FAILURE_KINDS = ("rollout_restarts", "rollout_lost", "reward_retries", "learner_restarts")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# How long a failed start waits for fit() to return: a learner already waiting for the start ends within a
# second. One still starting (Train's worker group, the model load: minutes for FLUX) is left to Ray, which
# ends it with the driver; waiting for it to load only to stop would delay the error.
ABANDON_WAIT_S = 5.0

# learner.backend -> the process group's. NCCL reduces CUDA tensors only ("No backend type associated with
# device type cpu"); the learner's CPU reductions (learner.py: minibatch counts, metrics) need gloo beside it.
LEARNER_BACKENDS = {"gloo": "gloo", "nccl": "cpu:gloo,cuda:nccl"}


class LearnerFailed(RuntimeError):
    """The learner failed more often than learner.max_failures allows (one line; the run can be resumed)."""


def _learner_scaling(cfg: ExperimentConfig):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    use_gpu = cfg.learner.num_gpus > 0
    resources = {"CPU": cfg.learner.num_cpus, **cfg.learner.resources}
    if use_gpu:
        resources["GPU"] = cfg.learner.num_gpus
    backend = cfg.learner.backend if cfg.learner.backend != "auto" else ("nccl" if use_gpu else "gloo")
    return (ScalingConfig(num_workers=cfg.learner.workers, use_gpu=use_gpu, resources_per_worker=resources),
            TorchConfig(backend=LEARNER_BACKENDS[backend]))


def new_run_name(output_dir: Path) -> str:
    """The output directory's name and a random suffix (letters, digits, '-', '_', '.' only)."""
    import re
    import secrets

    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', output_dir.name)[:48]}-{secrets.token_hex(4)}"


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _flatten(item, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): value}


def guarded_settings(config: dict) -> dict:
    """The flattened settings a resume must not change (GUARDED, without reward deployment settings)."""
    flat = _flatten({k: config.get(k) for k in GUARDED})
    return {k: v for k, v in flat.items() if not (k.startswith("rewards.") and k.split(".")[-1] in REWARD_DEPLOYMENT_KEYS)}


def check_resume_config(cfg: ExperimentConfig, meta: dict) -> None:
    """Refuse a resume whose config changes the algorithm or the model, naming the keys."""
    if not isinstance(meta.get("config"), dict):
        return  # a checkpoint from before configs were recorded
    old, new = guarded_settings(meta["config"]), guarded_settings(cfg.model_dump(mode="json"))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise ConfigError(f"--resume: the config changes what the checkpoint was trained with: {shown}{more}; "
                          "resume with the checkpoint's values or start a new run in another output directory")


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (``ray job stop``) ask for a clean stop: the first sets ``received``, a second
    forces (KeyboardInterrupt). Replaces Ray's handler, which aborts the driver with a C++ stack dump."""

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


class RunHistory:
    """metrics.jsonl and heldout.jsonl of the output directory, one record per step across stops, restarts
    and resumes; the held-out 'before' of a resumed run is the first run's (the base model's)."""

    def __init__(self, out: Path, resume_step: int | None):
        self.metrics = MetricsWriter(out)
        self.heldout = MetricsWriter(out, "heldout.jsonl")
        if resume_step is None:  # a fresh run starts fresh files
            self.metrics.rewind(-1)
            self.heldout.rewind(-1)
        else:
            self.metrics.rewind(resume_step)
            self.heldout.rewind(resume_step)
        last = (self.metrics.read() or [{}])[-1]
        self.failures = Counter({k: int(last.get(k, 0)) for k in FAILURE_KINDS})  # counts so far, across resumes
        self.steps_this_run = 0

    def add_step(self, record: dict) -> dict:
        record = {**record, **{k: self.failures[k] for k in FAILURE_KINDS}}
        self.metrics.write(record)
        self.steps_this_run += 1
        return record

    def heldout_by_tag(self) -> dict[str, dict]:
        return {r["tag"]: r for r in self.heldout.read()}


def train(cfg: ExperimentConfig, output_dir: str | None = None, resume: bool = False, progress: bool = True,
          temp_dir: str | None = None) -> dict:
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from egrpo_ray.distributed.actors import start_run_actors
    from egrpo_ray.distributed.cluster import (
        init_ray,
        shutdown_ray,
        validate_on_cluster,
    )
    from egrpo_ray.distributed.learner import learner_loop
    from egrpo_ray.distributed.reward_service import (
        RewardDeployFailed,
        delete_rewards,
        deploy_rewards,
        wait_for_rewards,
    )
    from egrpo_ray.distributed.rollout import RolloutFleet, RolloutWorker

    out = Path(output_dir or cfg.logging.output_dir).resolve()
    checkpoint, meta = preflight(cfg, out, resume)
    if checkpoint:
        check_resume_config(cfg, meta)
    if not cfg.cluster.run_name:  # names this run's Serve applications apart from other runs on the cluster
        cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"run_name": new_run_name(out)})})
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    start_step = int(meta.get("step", 0))
    history = RunHistory(out, start_step if checkpoint else None)

    started = init_ray(cfg, temp_dir)
    signals = StopSignals()  # after ray.init: ours replace Ray's
    t0 = time.perf_counter()
    rewards_deployed = False  # a run refused before Serve starts has no applications to delete
    try:
        validate_on_cluster(cfg)
        done_batches = meta.get("prompt_batches_by_worker", {})
        queue, store, log = start_run_actors(cfg.cluster.run_name, cfg.learner.queue_capacity,
                                             cfg.learner.max_staleness, cfg.learner.prompts_per_step, done_batches)
        # Actors and the learner start (imports, model load) while Serve deploys the rewards: start-up overlaps.
        workers = [
            RolloutWorker.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                  resources=cfg.rollout.resources, max_restarts=cfg.rollout.max_restarts,
                                  name=f"{cfg.cluster.run_name}-rollout-{i}").remote(
                cfg.model_dump(), i, int(done_batches.get(str(i), 0)), base_is_current=checkpoint is None)
            for i in range(cfg.rollout.workers)
        ]
        rewards_deployed = True
        deploy_rewards(cfg, wait=False)  # Serve starts the replicas while Train starts the learner
        scaling, torch_config = _learner_scaling(cfg)
        trainer = TorchTrainer(
            learner_loop,
            train_loop_config={"cfg": cfg.model_dump(), "queue": queue, "store": store, "log": log, "workers": workers,
                               "output_dir": str(out), "resume_from": str(checkpoint) if checkpoint else None},
            scaling_config=scaling, torch_config=torch_config,
            # Train's own failure logs are tracebacks; the run log reports each restart in one line instead.
            run_config=RunConfig(name="learner", storage_path=str(out / "ray_train"),
                                 failure_config=FailureConfig(max_failures=cfg.learner.max_failures),
                                 logging_config=LoggingConfig(log_level="ERROR")),
        )
        learner = _Background(trainer.fit)
        try:
            wait_for_rewards(cfg)
        except RewardDeployFailed:
            _abandon_start(log, queue, workers, learner)
            raise
        ready = [w.ready.remote() for w in workers]  # actor tasks run in order: ready, then run
        fleet = RolloutFleet(cfg, workers, queue, log)
        try:
            ray.get(ready, timeout=cfg.cluster.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            _abandon_start(log, queue, workers, learner)
            raise ConfigError(f"rollout workers did not start within {cfg.cluster.startup_timeout_s:g} s "
                              "(the cluster lacks the resources they ask for?)") from None
        ray.get(log.mark_started.remote())

        summary = _follow(cfg, out, history, log, queue, fleet, learner, signals, start_step, progress)

        summary["startup_s"] = summary.pop("first_step_at") - t0
        t_learner_done = time.perf_counter()
        ray.get(queue.close.remote())
        worker_stats = fleet.drain(120)
        summary["rollout_drain_s"] = time.perf_counter() - t_learner_done
        latest = latest_checkpoint(out)
        # LoRA runs: the latest checkpoint's adapter as <output_dir>/lora (`egrpo-ray eval --lora <output_dir>/lora`)
        lora = export_final_lora(latest, out) if latest and cfg.model.lora.enabled else None
        summary.update(
            lora=str(lora) if lora else None,
            wall_seconds=time.perf_counter() - t0,
            rollout_workers=worker_stats,
            queue=ray.get(queue.stats.remote()),
            resumed_from=str(checkpoint) if checkpoint else None,
            output_dir=str(out),
            latest_checkpoint=str(latest) if latest else None,
        )
        if learner.error is not None:
            summary.update(failed=True, error=_first_line(learner.error))
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        if learner.error is not None:
            raise LearnerFailed(f"the learner failed ({_first_line(learner.error)}) after "
                                f"{summary['failures']['learner_restarts']} restart(s) (learner.max_failures = "
                                f"{cfg.learner.max_failures}); last checkpoint: {summary['latest_checkpoint']}; "
                                "resume with --resume")
        return summary
    except KeyboardInterrupt:  # a second Ctrl-C: stop without waiting for the checkpoint
        if "log" in locals():
            _request_stop(log, queue)
        raise
    finally:
        signals.restore()
        try:
            if rewards_deployed:
                delete_rewards(cfg)  # only this run's applications: the cluster may be shared
        finally:
            shutdown_ray(started)


class _Background:
    """Runs ``fn`` (TorchTrainer.fit) on a thread; its exception is kept for the driver loop."""

    def __init__(self, fn):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            fn()
        except BaseException as err:  # surfaced by the driver
            self.error = err

    def is_alive(self) -> bool:
        return self.thread.is_alive()


def _prometheus_targets(cfg: ExperimentConfig, out: Path):
    """The cluster's Prometheus file_sd targets, mirrored into the output dir (and logging.prometheus_targets_dir)
    for the run's duration; prints where, once."""
    from egrpo_ray.monitoring import RUN_TARGETS_FILE, TargetsMirror

    paths = [out / RUN_TARGETS_FILE]
    if cfg.logging.prometheus_targets_dir:
        paths.append(Path(cfg.logging.prometheus_targets_dir).expanduser().resolve() / f"{cfg.cluster.run_name}.json")
    targets = TargetsMirror(cfg.cluster.run_name, paths)
    source = targets.refresh()
    if source is None:
        print("metrics: exported by Ray's metrics agents (this driver cannot read the cluster's Prometheus "
              "discovery file: scrape the head node's /tmp/ray/prom_metrics_service_discovery.json)", flush=True)
    else:
        print(f"metrics: Prometheus file_sd targets in {', '.join(str(p) for p in paths)} (run {cfg.cluster.run_name})",
              flush=True)
    return targets


def _request_stop(log, queue) -> None:
    import ray

    ray.get([log.request_stop.remote(), queue.close.remote()])


def _abandon_start(log, queue, workers: list, learner: _Background) -> None:
    """A start that failed: stop the rollout workers (actors still loading when the driver exits abort with
    native stack dumps) and ask the learner to stop; it ends without a step if it reaches its wait for the
    start within ABANDON_WAIT_S."""
    import ray

    _request_stop(log, queue)
    for worker in workers:
        ray.kill(worker, no_restart=True)
    learner.thread.join(ABANDON_WAIT_S)


def _first_line(err: BaseException) -> str:
    lines = [l for l in str(err).strip().splitlines() if l.strip()]
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


GRID_MAX = 64  # held-out images shown in a grid (FLUX's held-out set has 400)


def save_heldout_grid(out: Path, tag: str, images: torch.Tensor, prompts: list[str]) -> None:
    """grids/heldout_<tag>.png captioned with the prompts; at "after", grids/heldout_before_after.png too."""
    images = images[:GRID_MAX]
    save_grid(images, out / "grids" / f"heldout_{tag}.png", captions=prompts[: len(images)])
    if tag == "after" and (out / "grids" / "heldout_before.npy").exists():
        before = torch.from_numpy(np.load(out / "grids" / "heldout_before.npy"))
        save_comparison(before, images, prompts, out / "grids" / "heldout_before_after.png")
    if tag == "before":  # kept for the side-by-side at the end, across resumes
        np.save(out / "grids" / "heldout_before.npy", images.numpy())


def _follow(cfg: ExperimentConfig, out: Path, history: RunHistory, log, queue, fleet, learner: _Background,
            signals: StopSignals, start_step: int, progress: bool) -> dict:
    """The driver loop: stream the learner's records into metrics.jsonl, the progress bar, grids and the curve;
    print each failure as it is reported; restart dead rollout workers; turn a signal into a stop; keep the
    Prometheus targets of the cluster (whose agents export the run's metrics) copied where Prometheus looks."""
    import ray

    targets = _prometheus_targets(cfg, out)
    n_rec = n_img = n_fail = 0
    first_step_at, stopping, lost_all = None, False, False
    # a bar on a terminal only; elsewhere the step lines below are the progress
    bar = Progress(cfg.learner.iterations, "E-GRPO", "step", initial=start_step, enabled=progress)
    heldout_prompts = prompt_splits(cfg.prompts)[1]
    try:
        while True:
            alive = learner.is_alive()
            records, images, failures = ray.get(log.since.remote(n_rec, n_img, n_fail))
            n_rec, n_img, n_fail = n_rec + len(records), n_img + len(images), n_fail + len(failures)
            for f in failures:  # one line each, as it happens
                history.failures[f["kind"]] += 1
                bar.write(f"[fault] {f['message']}")
            for r in records:
                if r.get("event") == "heldout":
                    history.heldout.write(r)
                    bar.write(f"[{r['tag']}] held-out reward {r['heldout_reward']:.4f}, "
                              f"training-prompt probe {r['train_probe_reward']:.4f}")
                    continue
                first_step_at = first_step_at or time.perf_counter()
                r = history.add_step(r)
                bar.set(r["step"], reward=f"{r['reward_mean']:.3f}", ratio=f"{r['ratio_mean']:.4f}",
                        queue=r["queue_depth"], stale=f"{r['staleness_mean']:.1f}")
                if r["step"] % cfg.logging.log_every == 0:
                    bar.write(f"step {r['step']:4d}  reward {r['reward_mean']:.4f} +- {r['reward_std']:.4f}  "
                              f"zero-std {r['zero_std_ratio']:.2f}  ratio {r['ratio_mean']:.5f}  clip {r['clip_fraction']:.3f}  "
                              f"staleness {r['staleness_mean']:.2f}  queue {r['queue_depth']}  {r['images_per_s']:.1f} img/s")
            for step, tag, arr in images:
                save_heldout_grid(out, tag, torch.tensor(arr), heldout_prompts)
            if not alive:
                break
            targets.refresh()
            if not stopping:
                fleet.check()
                lost_all = fleet.all_lost()
                if signals.received is not None or lost_all:
                    stopping = True
                    why = "every rollout worker is lost" if lost_all else signal.Signals(signals.received).name
                    bar.write(f"stopping ({why}): the learner checkpoints the current step (Ctrl-C again to force)")
                    _request_stop(log, queue)
            time.sleep(0.5)
    finally:
        bar.close()
        targets.remove()
    records = history.metrics.read()
    heldout = history.heldout_by_tag()
    if records:  # every held-out score, a resumed run's earlier 'after' included
        plot_reward_curve(records, out / "reward_curve.png",
                          sorted((h["step"], h["heldout_reward"]) for h in history.heldout.read()))
    last_step = records[-1]["step"] if records else start_step
    summary = {
        "first_step_at": first_step_at or time.perf_counter(),
        "steps_completed": last_step,
        "steps_this_run": history.steps_this_run,
        "completed": last_step >= cfg.learner.iterations and learner.error is None,
        "interrupted": signals.received is not None,
        "exit_code": EXIT_CODES.get(signals.received, 0) if signals.received is not None else (1 if lost_all else 0),
        "failures": {k: history.failures[k] for k in FAILURE_KINDS},
        "heldout_reward_before": heldout.get("before", {}).get("heldout_reward"),
        "heldout_reward_after": heldout.get("after", {}).get("heldout_reward"),
        "train_probe_reward_before": heldout.get("before", {}).get("train_probe_reward"),
        "train_probe_reward_after": heldout.get("after", {}).get("train_probe_reward"),
        "background_noise_before": heldout.get("before", {}).get("quality_background_noise"),
        "background_noise_after": heldout.get("after", {}).get("quality_background_noise"),
        "train_reward_first": records[0]["reward_mean"] if records else None,
        "train_reward_last": records[-1]["reward_mean"] if records else None,
        "gradient_signal": signal_share(records, cfg.learner.prompts_per_step),
        "metrics": str(out / "metrics.jsonl"),
        "reward_curve": str(out / "reward_curve.png"),
        "grids": str(out / "grids"),
    }
    if lost_all and signals.received is None:
        summary["failed"], summary["error"] = True, "every rollout worker was lost (rollout.max_restarts)"
    return summary


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, args.output_dir, args.resume, progress=not args.no_progress)
    except LearnerFailed as err:
        print(f"egrpo-ray: error: {err}", file=sys.stderr)
        return 1
    summary_path = Path(summary["output_dir"]) / "summary.json"
    if summary["interrupted"]:
        if summary["latest_checkpoint"]:
            print(f"\ninterrupted at step {summary['steps_completed']}; resume with --resume "
                  f"(checkpoint: {summary['latest_checkpoint']})", flush=True)
        else:
            print("\ninterrupted before the first step: no checkpoint, nothing to resume", flush=True)
        return summary["exit_code"]
    if summary.get("failed"):
        print(f"egrpo-ray: error: {summary['error']} at step {summary['steps_completed']}; resume with --resume",
              file=sys.stderr)
        return 1
    steps, ran = summary["steps_completed"], summary["steps_this_run"]
    resumed = f" ({ran} this run, resumed from {Path(summary['resumed_from']).name})" if summary["resumed_from"] else ""
    print(f"\ndone in {summary['wall_seconds']:.0f} s: {steps} learner steps{resumed}")
    print(*change_lines(summary), sep="\n")
    dropped = summary["queue"]["dropped_as_stale"]
    print(f"rollout: {sum(w['images'] for w in summary['rollout_workers'])} images sampled, "
          f"{dropped} {'batch' if dropped == 1 else 'batches'} dropped as too stale")
    if summary.get("gradient_signal"):
        print(describe_signal(summary["gradient_signal"]))
    failures = {k: v for k, v in summary["failures"].items() if v}
    if failures:
        print("faults survived: " + ", ".join(f"{k} {v}" for k, v in failures.items()))
    print(f"metrics: {summary['metrics']}\nreward curve: {summary['reward_curve']}\ngrids: {summary['grids']}")
    print(f"checkpoint: {summary['latest_checkpoint']}\nsummary: {summary_path}")
    if summary.get("lora"):
        print(f"LoRA: {summary['lora']} (egrpo-ray eval --lora {summary['lora']})")
    return 0
