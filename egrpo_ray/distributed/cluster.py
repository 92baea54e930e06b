"""Starting or joining the Ray cluster, and failing fast when it cannot hold the run.

Ray would otherwise wait forever for resources it will never get (Train retries its worker group,
actors stay pending), so every resource need is summed up front and compared with the cluster.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass

from egrpo_ray.config import ConfigError, ExperimentConfig


class ClusterError(RuntimeError):
    """The cluster cannot run this config; the message says why in one line."""


@dataclass
class Needs:
    cpus: float
    gpus: float
    custom: dict[str, float]  # custom node resources (placement labels) the actors ask for
    detail: str


def resource_needs(cfg: ExperimentConfig) -> Needs:
    """CPUs, GPUs and custom resources that the run's actors ask for (queue, store and log take none)."""
    parts = [
        ("rollout", cfg.rollout.workers, cfg.rollout.num_cpus, cfg.rollout.num_gpus, cfg.rollout.resources),
        ("learner", cfg.learner.workers, cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resources),
    ] + [(f"reward {r.name}", r.replicas, r.num_cpus, r.num_gpus, r.resources) for r in cfg.rewards]
    custom: dict[str, float] = {}
    for _, n, _, _, extra in parts:
        for key, amount in extra.items():
            custom[key] = custom.get(key, 0.0) + n * amount
    cpus = sum(n * c for _, n, c, _, _ in parts)
    gpus = sum(n * g for _, n, _, g, _ in parts)
    detail = " + ".join(f"{name} {n}x{c:g}" for name, n, c, _, _ in parts)
    return Needs(cpus, gpus, custom, detail)


def check_resources(cfg: ExperimentConfig, available: dict) -> None:
    needs = resource_needs(cfg)
    have_cpu, have_gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
    if needs.cpus > have_cpu + 1e-9:
        raise ClusterError(f"the config needs {needs.cpus:g} CPUs ({needs.detail}) but the cluster has {have_cpu:g}; "
                           "lower the num_cpus or worker counts, or add nodes")
    if needs.gpus > have_gpu + 1e-9:
        raise ClusterError(f"the config needs {needs.gpus:g} GPUs but the cluster has {have_gpu:g}")
    for key, amount in needs.custom.items():
        if amount > float(available.get(key, 0)) + 1e-9:
            raise ClusterError(f"the config asks for {amount:g} of the resource {key!r} but the cluster has "
                               f"{float(available.get(key, 0)):g} (label nodes with ray start --resources)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_ray(cfg: ExperimentConfig, temp_dir: str | None = None) -> bool:
    """Attach to ``cluster.address`` or start a local cluster (the embedded default) on free ports.
    Returns True when this process started the cluster (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    env = {"RAY_DEDUP_LOGS": "1"}
    if cfg.cluster.address:
        try:
            ray.init(address=cfg.cluster.address, log_to_driver=True, runtime_env={"env_vars": env})
        except ConnectionError as err:
            raise ClusterError(f"cannot reach the Ray cluster at {cfg.cluster.address}: {err}") from None
        return False
    num_cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="egrpo_ray_", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=num_cpus,
        _node_ip_address="127.0.0.1",  # a private cluster: nothing listens beyond loopback
        include_dashboard=True,  # Train's controller uses the state API, which the dashboard serves
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        _temp_dir=temp_dir,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
    )
    return True


def validate_on_cluster(cfg: ExperimentConfig) -> None:
    import ray

    try:
        check_resources(cfg, ray.cluster_resources())
    except ClusterError as err:
        raise ConfigError(str(err)) from None
