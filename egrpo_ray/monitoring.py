"""Prometheus metrics of a run, for Grafana (deploy/grafana/egrpo-dashboard.json).

The driver updates them from each learner record and serves them on 127.0.0.1:<logging.metrics_port>
(another host only when ``logging.metrics_host`` is set) at /metrics.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

GAUGES = {
    "reward_mean": "training reward, mean over the step's samples",
    "reward_std": "training reward, std over the step's samples",
    "zero_std_ratio": "share of groups whose rewards have no spread",
    "ratio_mean": "importance ratio, mean",
    "clip_fraction": "share of clipped ratios",
    "kl": "KL to the reference model",
    "grad_norm": "gradient norm before clipping (max over minibatches)",
    "staleness_mean": "policy versions between sampling and learning",
    "queue_depth": "scored rollouts waiting in the replay queue",
    "queue_wait_s": "seconds the learner waited for groups",
    "weight_publish_s": "seconds to publish new weights",
    "images_per_s": "rollout images learned from per second",
    "step": "learner step",
    "policy_version": "published policy version",
}


class RunMetrics:
    def __init__(self, run: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.run = run
        self.gauges = {k: Gauge(f"egrpo_{k}", doc, ["run"], registry=self.registry) for k, doc in GAUGES.items()}
        self.heldout = Gauge("egrpo_heldout_reward", "held-out reward (ODE, fixed noise)", ["run"], registry=self.registry)
        self.dropped = Counter("egrpo_dropped_stale", "groups dropped as too stale", ["run"], registry=self.registry)
        self._dropped_seen = 0

    def serve(self, port: int, host: str = "127.0.0.1"):
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def update(self, record: dict) -> None:
        if record.get("event") == "heldout":
            self.heldout.labels(self.run).set(record["heldout_reward"])
            return
        for k, g in self.gauges.items():
            if k in record:
                g.labels(self.run).set(float(record[k]))
        dropped = int(record.get("dropped_stale", 0))
        if dropped > self._dropped_seen:
            self.dropped.labels(self.run).inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped
