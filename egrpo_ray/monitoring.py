"""The run's metrics, exported through Ray's own metrics agent (``ray.util.metrics``).

Every role records into the process it runs in; Ray's agent on each node serves them, with Ray's own
metrics, as ``ray_<name>`` (counters ``ray_<name>_total``; histograms ``_bucket``/``_sum``/``_count``) on the
node's metrics export port, which Ray lists in ``prom_metrics_service_discovery.json`` (Prometheus
file_sd) and KubeRay's PodMonitor scrapes. No port of our own. deploy/grafana/egrpo-dashboard.json draws
them; README "Monitoring" says what each means.

Tags stay few and bounded: ``run`` (cluster.run_name) and ``role`` on every metric, plus ``worker``
(rollout worker index), ``reward`` (reward name), ``cause`` or ``kind`` where listed below.

Ray ages a gauge out after two report intervals without a new value (metrics_report_interval_ms, 10 s by
default), so a gauge set once per learner step would blink out between slow steps; each process re-sets
its gauges' last values on a background thread (``_GaugeKeeper``) until the process ends.
"""
from __future__ import annotations

import threading
from typing import NamedTuple

SECONDS_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 300, 900]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class Spec(NamedTuple):
    kind: str  # gauge | counter | histogram
    role: str
    doc: str
    tags: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


LEARNER_GAUGES = {  # learner record key -> description (metric egrpo_learner_<key>)
    "reward_mean": "training reward, mean over the step's samples",
    "reward_std": "training reward, std over the step's samples",
    "zero_std_ratio": "share of groups whose rewards have no spread (no learning signal)",
    "ratio_mean": "importance ratio pi/pi_old, mean over minibatches",
    "clip_fraction": "share of clipped ratios",
    "kl": "KL to the reference model (0 unless algorithm.kl_beta > 0)",
    "grad_norm": "gradient norm before clipping (max over minibatches and ranks)",
    "loss": "surrogate loss, mean over minibatches",
    # algo/gradient_noise.py: averaged over a window, signal_sq / step_sq is the share of an update that is signal
    "grad_step_sq": "squared norm of an update's mean gradient before clipping (first update of each pair)",
    "grad_signal_sq": "dot of an update's gradient with the previous one's: estimates |true gradient|^2",
    "staleness_mean": "policy versions between sampling and learning, mean over the step's groups",
    "queue_wait_s": "seconds the learner waited for groups this step",
    "weight_publish_s": "seconds to publish the new weights to the rollout workers",
    "images_per_s": "images learned from per second of wall time",
    "step": "learner step",
    "policy_version": "published policy version",
}

METRICS: dict[str, Spec] = {
    # rollout workers
    "egrpo_rollout_groups": Spec("counter", "rollout", "scored groups pushed to the replay queue", ("worker",)),
    "egrpo_rollout_images": Spec("counter", "rollout", "images sampled and scored", ("worker",)),
    "egrpo_rollout_sampler_seconds": Spec("histogram", "rollout", "seconds to sample and score one prompt batch",
                                          ("worker",), tuple(SECONDS_BUCKETS)),
    "egrpo_rollout_weight_sync_seconds": Spec("histogram", "rollout", "seconds to load one new weight version",
                                              ("worker",), tuple(SECONDS_BUCKETS)),
    "egrpo_rollout_staleness": Spec("gauge", "rollout", "learner version minus the version this worker samples with",
                                    ("worker",)),
    # reward deployments (one series per replica; sum by reward)
    "egrpo_reward_batch_images": Spec("histogram", "reward", "images per model batch", ("reward",),
                                      tuple(BATCH_BUCKETS)),
    "egrpo_reward_latency_seconds": Spec("histogram", "reward", "seconds from a score call's arrival to its answer",
                                         ("reward",), tuple(SECONDS_BUCKETS)),
    "egrpo_reward_queue": Spec("gauge", "reward", "score calls waiting or being scored in the replica", ("reward",)),
    # replay queue
    "egrpo_queue_depth": Spec("gauge", "queue", "scored groups waiting in the replay queue"),
    "egrpo_queue_dropped": Spec("gauge", "queue", "groups dropped so far, by cause", ("cause",)),
    # learner (recorded from the learner's step records)
    **{f"egrpo_learner_{k}": Spec("gauge", "learner", doc) for k, doc in LEARNER_GAUGES.items()},
    "egrpo_learner_step_seconds": Spec("histogram", "learner", "wall seconds per learner step", (),
                                       tuple(SECONDS_BUCKETS)),
    "egrpo_learner_heldout_reward": Spec("gauge", "learner", "held-out reward (ODE sampling, fixed noise)"),
    # faults the run survived
    "egrpo_faults": Spec("gauge", "driver", "faults survived so far, by kind", ("kind",)),
}
QUEUE_DROP_CAUSES = ("stale", "stale_on_put", "learner_restart")


def _report_interval_s() -> float:
    import ray

    try:  # what Ray's emitters use: metrics_report_interval_ms, at least 1 s
        return max(int(ray._config.metrics_report_interval_ms()), 1000) / 1000
    except Exception:
        return 10.0


class _GaugeKeeper:
    """Re-sets every gauge's last value twice per report interval, so Ray keeps exporting it."""

    def __init__(self):
        self.values: dict[tuple, tuple[object, float, dict]] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def keep(self, gauge, name: str, value: float, tags: dict) -> None:
        with self.lock:
            self.values[(name, tuple(sorted(tags.items())))] = (gauge, value, tags)
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="egrpo-gauges", daemon=True)
                self.thread.start()

    def _loop(self) -> None:
        import time

        period = _report_interval_s() / 2
        while True:
            time.sleep(period)
            with self.lock:
                items = list(self.values.values())
            for gauge, value, tags in items:
                try:
                    gauge.set(value, tags=tags)
                except Exception:  # a metric must never take a role down
                    pass


_KEEPER = _GaugeKeeper()
_CREATED: dict[str, object] = {}  # one ray.util.metrics object per name and process
_CREATED_LOCK = threading.Lock()


def _metric(name: str):
    with _CREATED_LOCK:
        if name not in _CREATED:
            from ray.util import metrics

            spec = METRICS[name]
            keys = ("run", "role", *spec.tags)
            if spec.kind == "gauge":
                _CREATED[name] = metrics.Gauge(name, description=spec.doc, tag_keys=keys)
            elif spec.kind == "counter":
                _CREATED[name] = metrics.Counter(name, description=spec.doc, tag_keys=keys)
            else:
                _CREATED[name] = metrics.Histogram(name, description=spec.doc, boundaries=list(spec.buckets),
                                                   tag_keys=keys)
        return _CREATED[name]


class RoleMetrics:
    """One role's metrics in this process. ``run=None`` records nothing (actors built outside a run, tests).

    >>> m = RoleMetrics("my-run", "rollout", worker="0")
    >>> m.inc("egrpo_rollout_groups"); m.observe("egrpo_rollout_sampler_seconds", 1.2)
    """

    def __init__(self, run: str | None, role: str, **tags: str):
        self.enabled = bool(run)
        self.role = role
        self.tags = {"run": run or "", "role": role, **{k: str(v) for k, v in tags.items()}}

    def _tags(self, name: str, extra: dict) -> dict:
        spec = METRICS[name]
        if spec.role != self.role:
            raise ValueError(f"{name} belongs to role {spec.role!r}, not {self.role!r}")
        tags = {**self.tags, **{k: str(v) for k, v in extra.items()}}
        return {k: tags[k] for k in ("run", "role", *spec.tags)}

    def set(self, name: str, value: float, **tags: str) -> None:
        if self.enabled:
            tags = self._tags(name, tags)
            gauge = _metric(name)
            gauge.set(float(value), tags=tags)
            _KEEPER.keep(gauge, name, float(value), tags)

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        if self.enabled and value > 0:
            _metric(name).inc(float(value), tags=self._tags(name, tags))

    def observe(self, name: str, value: float, **tags: str) -> None:
        if self.enabled:
            _metric(name).observe(float(value), tags=self._tags(name, tags))


def record_learner_step(metrics: RoleMetrics, record: dict) -> None:
    """A learner record (metrics.jsonl line, or a held-out event) -> the learner's gauges."""
    if record.get("event") == "heldout":
        metrics.set("egrpo_learner_heldout_reward", record["heldout_reward"])
        return
    for key in LEARNER_GAUGES:
        if key in record:
            metrics.set(f"egrpo_learner_{key}", record[key])
    if "step_seconds" in record:
        metrics.observe("egrpo_learner_step_seconds", record["step_seconds"])


# --- Prometheus discovery of the run's cluster -----------------------------------------------------------------

DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # what Ray writes into its session dir (file_sd format)
RUN_TARGETS_FILE = "prometheus_targets.json"  # the run's copy in its output directory


def cluster_discovery_file() -> str | None:
    """The connected cluster's Prometheus file_sd file (Ray's dashboard writes it every 5 s), where this process
    can read it: on the head node; None elsewhere."""
    import os

    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if node is None:
        return None
    session = node.get_session_dir_path()
    return os.path.join(session, DISCOVERY_FILE) if session and os.path.isdir(session) else None


class TargetsMirror:
    """Keeps copies of the cluster's discovery file where a Prometheus finds them: ``<output_dir>/
    prometheus_targets.json`` and, with logging.prometheus_targets_dir, ``<dir>/<run>.json`` (one file_sd glob
    then finds every run). The copies label their targets ``egrpo_run`` (not ``run``: a target label that the
    scraped series carry too would be renamed ``exported_run``) and are removed when the run ends (Prometheus
    then drops the targets instead of scraping dead ports)."""

    def __init__(self, run: str, paths: list):
        self.run, self.paths, self.last = run, [str(p) for p in paths], None

    def refresh(self) -> str | None:
        """Copy the discovery file if it changed; returns the source path (None where it cannot be read)."""
        import json
        import os

        source = cluster_discovery_file()
        if source is None:
            return None
        try:
            with open(source) as f:
                groups = json.load(f)
        except (OSError, ValueError):  # not written yet
            return source
        for group in groups:
            group.setdefault("labels", {})["egrpo_run"] = self.run
        text = json.dumps(groups)
        if text != self.last:
            for path in self.paths:
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
                tmp = f"{path}.tmp"
                with open(tmp, "w") as f:
                    f.write(text)
                os.replace(tmp, path)  # atomic: Prometheus never reads half a file
            self.last = text
        return source

    def remove(self) -> None:
        import os

        for path in self.paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
