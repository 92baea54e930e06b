"""Starting or joining the Ray cluster, and failing fast when it cannot hold the run.

Ray would otherwise wait forever for resources it will never get (Train retries its worker group,
actors stay pending), so every resource need is summed up front and compared with the cluster.
"""
from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from typing import NamedTuple

from egrpo_ray.config import ConfigError, ExperimentConfig


class ClusterError(RuntimeError):
    """The cluster cannot run this config; the message says why in one line."""


@dataclass
class Needs:
    cpus: float
    gpus: float
    custom: dict[str, float]  # custom node resources (placement labels) the actors ask for
    detail: str


class Role(NamedTuple):
    """One kind of actor the run starts: how many, and what each asks for."""

    name: str
    count: int
    cpus: float
    gpus: float
    custom: dict[str, float]


def _roles(cfg: ExperimentConfig) -> list[Role]:
    return [
        Role("rollout", cfg.rollout.workers, cfg.rollout.num_cpus, cfg.rollout.num_gpus, cfg.rollout.resources),
        Role("learner", cfg.learner.workers, cfg.learner.num_cpus, cfg.learner.num_gpus, cfg.learner.resources),
    ] + [Role(f"reward {r.name}", r.replicas, r.num_cpus, r.num_gpus, r.resources) for r in cfg.rewards]


def resource_needs(cfg: ExperimentConfig) -> Needs:
    """CPUs, GPUs and custom resources that the run's actors ask for (queue, store and log take none)."""
    roles = _roles(cfg)
    custom: dict[str, float] = {}
    for r in roles:
        for key, amount in r.custom.items():
            custom[key] = custom.get(key, 0.0) + r.count * amount
    cpus = sum(r.count * r.cpus for r in roles)
    gpus = sum(r.count * r.gpus for r in roles)
    detail = " + ".join(f"{r.name} {r.count}x{r.cpus:g}" for r in roles)
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


def check_placement(cfg: ExperimentConfig, nodes: list[dict]) -> None:
    """Roles pinned to labelled nodes (custom resources) must fit on the nodes that carry their labels.

    ``nodes``: each alive node's total resources (``ray.nodes()[i]["Resources"]``). The cluster-wide sums of
    ``check_resources`` hide a labelled node too small for its roles (3 CPUs in all, but 2 learner ranks at
    0.75 CPU pinned to a 1-CPU node), and Ray then waits forever: Train retries its worker group. A necessary
    condition, checked per pinned role: one actor fits on some eligible node, and every pinned role that can
    only run on those nodes fits in their CPUs and GPUs together.
    """
    def fits(node: dict, cpus: float, gpus: float, custom: dict[str, float]) -> bool:
        want = {"CPU": cpus, "GPU": gpus, **custom}
        return all(float(node.get(k, 0)) + 1e-9 >= v for k, v in want.items() if v > 0)

    pinned = [(r, frozenset(i for i, node in enumerate(nodes) if fits(node, r.cpus, r.gpus, r.custom)))
              for r in _roles(cfg) if r.custom]
    for r, where in pinned:
        if not where:
            raise ClusterError(f"no node can hold one {r.name} actor ({r.cpus:g} CPU, {r.gpus:g} GPU, {r.custom}): the "
                               f"nodes labelled {sorted(r.custom)} have too few CPUs or GPUs")
    for _, where in pinned:
        sharing = [r for r, eligible in pinned if eligible <= where]  # pinned roles that can only go to these nodes
        labels = sorted({k for r in sharing for k in r.custom})
        for kind, field in (("CPU", "cpus"), ("GPU", "gpus")):
            need = sum(r.count * getattr(r, field) for r in sharing)
            have = sum(float(nodes[i].get(kind, 0)) for i in where)
            if need > have + 1e-9:
                detail = " + ".join(f"{r.name} {r.count}x{getattr(r, field):g}" for r in sharing)
                raise ClusterError(f"the actors pinned to the nodes labelled {labels} need {need:g} {kind}s ({detail}) "
                                   f"but those nodes have {have:g}; lower their num_cpus/num_gpus or label more nodes")


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


def shutdown_ray(started: bool) -> None:
    """Disconnect; a cluster this process started is shut down with it."""
    import ray

    if started:
        ray.shutdown()


def validate_on_cluster(cfg: ExperimentConfig) -> None:
    import ray

    try:
        check_resources(cfg, ray.cluster_resources())
        check_placement(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    except ClusterError as err:
        raise ConfigError(str(err)) from None
