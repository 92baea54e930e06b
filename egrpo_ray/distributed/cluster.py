"""Starting or joining the Ray cluster, and failing fast when it cannot hold the run.

Ray would otherwise wait forever for resources it will never get (Train retries its worker group,
actors stay pending), so every resource need is summed up front and compared with the cluster.
"""
from __future__ import annotations

import os
import shutil
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


# The embedded cluster this process started (at most one): what shutdown_ray must undo.
_EMBEDDED: dict | None = None
TOKEN_FILE = "auth_token"  # in the run's temp dir, mode 0600
WATCHDOG_MODULE = "egrpo_ray.distributed.cluster"
METRIC_PORT_ENV = ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT")  # read by Ray's monitor and dashboard


def init_ray(cfg: ExperimentConfig, temp_dir: str | None = None, *, loopback: bool = True, token_auth: bool = True,
             watchdog: bool = True) -> bool:
    """Attach to ``cluster.address`` or start a local cluster (the embedded default) on free ports.
    Returns True when this process started the cluster (and so should shut it down).

    The embedded cluster is private (docs/network.md): every Ray process binds 127.0.0.1 (``loopback``),
    Ray's token auth is on with a fresh token in the run's temp dir (``token_auth``), and a small watchdog
    process (``watchdog``) ends the cluster and removes the temp dir if this process dies without
    shutdown_ray (SIGKILL, OOM killer)."""
    import ray

    global _EMBEDDED
    if ray.is_initialized():
        return False
    # Worker output still reaches this console (log_to_driver: real warnings and errors), Serve's INFO
    # lines do not: they stay in the session's log files (RAY_SERVE_LOG_TO_STDERR=0, quiet_serve_logger).
    env = {"RAY_DEDUP_LOGS": "1", "RAY_SERVE_LOG_TO_STDERR": "0"}
    runtime_env = {"env_vars": env, "worker_process_setup_hook": f"{WATCHDOG_MODULE}.quiet_serve_logger"}
    if cfg.cluster.address:
        try:
            ray.init(address=cfg.cluster.address, log_to_driver=True, runtime_env=runtime_env)
            quiet_serve_logger()
        except ConnectionError as err:
            raise ClusterError(f"cannot reach the Ray cluster at {cfg.cluster.address}: {err}") from None
        return False
    num_cpus = cfg.cluster.num_cpus or os.cpu_count() or 1
    own_temp = temp_dir is None
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="egrpo_ray_", dir="/tmp")  # mode 0700
    restore = _private_cluster_env(temp_dir, loopback, token_auth)
    # Train's preemption watcher follows node drains: a one-node cluster has none, and creating it prints
    # Ray's ray-project/ray#53727 line on every run.
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    if loopback:  # gloo binds the address of the host name unless told the interface (torch's TCPStore: all, always)
        env["GLOO_SOCKET_IFNAME"] = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,  # Train's controller uses the state API, which the dashboard serves
            dashboard_host="127.0.0.1",
            dashboard_port=free_port(),
            _temp_dir=temp_dir,
            runtime_env=runtime_env,
            log_to_driver=True,
            configure_logging=True,
            logging_level="WARNING",
        )
    except BaseException:
        try:
            ray.shutdown()
        finally:
            _restore_env(restore)
            if own_temp:
                shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    _EMBEDDED = {"temp_dir": temp_dir, "own_temp": own_temp, "restore": restore,
                 "watchdog": _start_watchdog(temp_dir, own_temp) if watchdog else None}
    quiet_serve_logger()
    return True


class _ServeInfoToFilesOnly:
    """A filter on the ``ray.serve`` logger: INFO records pass only in a process where Serve logs to files
    (its controller and replicas, kept off the console by RAY_SERVE_LOG_TO_STDERR=0); elsewhere (driver,
    rollout workers, learners) Serve's default logger writes only to stderr, and its INFO lines go."""

    def filter(self, record) -> bool:
        import logging

        handlers = logging.getLogger("ray.serve").handlers
        return record.levelno >= logging.WARNING or any(isinstance(h, logging.FileHandler) for h in handlers)


def quiet_serve_logger() -> None:
    """Keep Serve's routine INFO lines (started, deploying, replica added/removed, router started) off the
    console. Runs in the driver and, as the runtime env's worker_process_setup_hook, in every worker; a
    filter, not a level, because Serve resets the level whenever it configures its logger."""
    import logging

    logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _ServeInfoToFilesOnly) for f in logger.filters):
        logger.addFilter(_ServeInfoToFilesOnly())


def shutdown_ray(started: bool, *, wait_s: float = 20.0) -> None:
    """Disconnect; a cluster this process started is shut down with it: every process of that cluster has
    exited when this returns (stragglers are killed after ``wait_s``), and the temp dir init_ray made is gone."""
    import ray

    global _EMBEDDED
    if not started:
        return
    state, _EMBEDDED = _EMBEDDED, None
    if state is None:  # started by an older init_ray or by hand: plain shutdown
        ray.shutdown()
        return
    procs = cluster_processes(os.getpid(), state["temp_dir"])
    try:
        # no serve.shutdown() first: it kills the Serve controller under the driver's own pending calls and
        # the raylet prints each as a failed task; ray.shutdown ends every process of the cluster quietly
        ray.shutdown()
    finally:
        _end_processes(procs, wait_s)
        _end_processes(cluster_processes(os.getpid(), state["temp_dir"]), 5.0)  # started during shutdown
        if state["watchdog"] is not None:
            state["watchdog"].terminate()
            state["watchdog"].wait(10)
        _restore_env(state["restore"])
        if state["own_temp"]:
            shutil.rmtree(state["temp_dir"], ignore_errors=True)


def _private_cluster_env(temp_dir: str, loopback: bool, token_auth: bool) -> dict:
    """Set what the embedded cluster's processes inherit; returns what _restore_env puts back.

    loopback: Ray replaces 127.0.0.1 as the node IP by the routable address (``_node_ip_address`` does not pin
    it), and gcs_server, raylet, the agents and every worker bind their gRPC ports to the node IP. Ray's own
    single-node mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the macOS/Windows default) makes the node IP
    127.0.0.1, so every process binds loopback. The variable is read when ``ray`` is imported: the child
    processes read it from the environment, this (already importing) process gets the module constant set.

    token_auth: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN_PATH at a fresh 0600 token in the run's temp dir
    (never ~/.ray/auth_token, which Ray writes world-readable and shares between every cluster of the user).

    Metrics: the node's metrics agent takes a free port (on 127.0.0.1 with ``loopback``); Ray's autoscaler and
    dashboard export theirs on fixed defaults (44217, 44227) unless told otherwise, so a second cluster on the
    machine would list the first one's in its Prometheus targets: free ports here, unless the caller set them.
    """
    from ray._private import ray_constants

    keys = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN",
            *METRIC_PORT_ENV)
    restore = {"env": {k: os.environ.get(k) for k in keys}, "enable_cluster": ray_constants.ENABLE_RAY_CLUSTER,
               "auth": token_auth}
    for key in METRIC_PORT_ENV:
        os.environ.setdefault(key, str(free_port()))
    if loopback:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    if token_auth:
        import secrets

        path = os.path.join(temp_dir, TOKEN_FILE)
        if os.path.exists(path):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what Ray's own generator writes: 256 bits
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = path
        _reload_ray_auth()
    return restore


def _reload_ray_auth() -> None:
    """Make this process's Ray core see the auth settings now in os.environ (mode and token are cached)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _restore_env(restore: dict) -> None:
    from ray._private import ray_constants

    for key, value in restore["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    ray_constants.ENABLE_RAY_CLUSTER = restore["enable_cluster"]
    if restore["auth"]:
        _reload_ray_auth()


# --- the cluster's processes, and the watchdog that ends them when the driver dies ------------------------------

def cluster_processes(driver_pid: int, temp_dir: str) -> list:
    """The processes of the embedded cluster started by ``driver_pid``: its children whose command line names the
    cluster's temp dir (gcs_server, raylet, dashboard, monitor, log monitor), and all their descendants (agents,
    workers). Orphans of a dead driver are found by the temp dir in their command line or their parent."""
    import psutil

    def names_temp(p) -> bool:
        try:
            cmd = p.cmdline()
        except psutil.Error:
            return False
        return any(temp_dir in arg for arg in cmd) and WATCHDOG_MODULE not in cmd

    try:
        heads = [p for p in psutil.Process(driver_pid).children() if names_temp(p)]
    except psutil.Error:
        heads = [p for p in psutil.process_iter() if names_temp(p)]
    found = {}
    for head in heads:
        found[head.pid] = head
        try:
            for child in head.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass
    return list(found.values())


def _end_processes(procs: list, wait_s: float) -> list:
    """Wait up to wait_s for procs to exit, then SIGTERM, then SIGKILL; returns those still alive (none)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for sig_wait in ("terminate", "kill"):
        for p in alive:
            try:
                getattr(p, sig_wait)()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(alive, timeout=3)
        if not alive:
            break
    return alive


def _start_watchdog(temp_dir: str, remove_temp: bool):
    """A process of its own session (Ctrl-C in the terminal does not reach it) that watches this one."""
    import subprocess
    import sys

    import psutil

    me = psutil.Process()
    return subprocess.Popen(
        [sys.executable, "-m", WATCHDOG_MODULE, "--watch", str(me.pid), repr(me.create_time()),
         temp_dir, "1" if remove_temp else "0"],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        close_fds=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _watch(driver_pid: int, driver_ctime: float, temp_dir: str, remove_temp: bool, poll_s: float = 1.0) -> None:
    """Until the driver is gone, remember the cluster's processes; then end them and remove the temp dir.
    SIGTERM (from shutdown_ray, which cleans up itself) ends the watchdog without touching anything."""
    import signal
    import time

    import psutil

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    known: dict[int, psutil.Process] = {}
    while True:
        try:
            driver = psutil.Process(driver_pid)
            alive = abs(driver.create_time() - driver_ctime) < 1.0 and driver.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if not alive:
            break
        for p in cluster_processes(driver_pid, temp_dir):
            known.setdefault(p.pid, p)  # psutil.Process checks pid reuse (create time) before signalling
        known = {pid: p for pid, p in known.items() if p.is_running()}
        time.sleep(poll_s)
    procs = {p.pid: p for p in known.values() if p.is_running()}
    for p in psutil.process_iter():  # orphans started after the last look: named by the temp dir
        try:
            cmd = p.cmdline()
            if p.pid != os.getpid() and any(temp_dir in arg for arg in cmd) and WATCHDOG_MODULE not in cmd:
                procs[p.pid] = p
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _end_processes(list(procs.values()), 5.0)
    if remove_temp:
        shutil.rmtree(temp_dir, ignore_errors=True)


def validate_on_cluster(cfg: ExperimentConfig) -> None:
    import ray

    try:
        check_resources(cfg, ray.cluster_resources())
        check_placement(cfg, [n["Resources"] for n in ray.nodes() if n["Alive"]])
    except ClusterError as err:
        raise ConfigError(str(err)) from None


def watchdog_temp_dir(cmdline: list[str]) -> str | None:
    """The run's temp dir, read from a process's command line if it is this module's watchdog."""
    if "--watch" in cmdline and WATCHDOG_MODULE in cmdline:
        return cmdline[cmdline.index("--watch") + 3]
    return None


if __name__ == "__main__":  # the watchdog: python -m egrpo_ray.distributed.cluster --watch PID CTIME TEMP_DIR 0|1
    import sys

    if len(sys.argv) == 6 and sys.argv[1] == "--watch":
        _watch(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5] == "1")
