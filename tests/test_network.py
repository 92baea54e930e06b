"""The embedded cluster is private: a real `egrpo-ray train` run (tiny config, its own embedded Ray cluster, in
a subprocess) listens on loopback only and keeps Ray's token auth on with a 0600 token in its own temp dir; its
driver, SIGKILLed after the first step, leaves no process of its cluster and no temp dir behind. A run that
ends on its own or on SIGTERM is checked the same way in tests/test_monitoring.py.

docs/network.md lists what listens where; ALLOWED_NON_LOOPBACK mirrors its allow-list of listeners that may bind
beyond loopback (none for the embedded default)."""
import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from run_processes import RunProcesses

ROOT = Path(__file__).resolve().parents[1]
# Mirrors the table "Listening beyond loopback" in docs/network.md: process name prefix -> (most such
# listeners one process may hold, why). Nothing else of the run may listen on a non-loopback address.
ALLOWED_NON_LOOPBACK: dict[str, tuple[int, str]] = {
    "ray::RayTrainWorker": (2, ("torch TCPStore of learner rank 0: the Train process group's rendezvous, and with "
                               "rollout.weight_sync=collective the weight-sync group's; torch binds [::], no auth")),
    "ray::ServeReplica": (1, "Serve's inter-deployment gRPC server, hard-coded [::]:0 in Ray 2.60; Ray token auth"),
    "ray::SERVE_REPLICA::": (1, "the same Serve replica process, named after its replica id while it starts"),
}
RUN = [  # the smallest run with every kind of process: 1 rollout worker, 1 reward replica, 1 learner rank
    "rollout.workers=1", "rewards.0.replicas=1", "learner.workers=1", "learner.num_cpus=0.5",
    "rollout.num_cpus=0.25", "rewards.0.num_cpus=0.25", "prompts.heldout_count=2", "sampling.steps=8",
    "learner.prompts_per_step=2", "rollout.prompts_per_batch=2", "algorithm.group_size=4", "learner.minibatch_rows=8",
    "learner.checkpoint_every=100", "logging.grid_every=100", "learner.max_staleness=1",
    "rollout.weight_sync=collective",
]


def _start(out: Path, iterations: int) -> subprocess.Popen:
    """The driver, its output to out.parent/driver.log (a pipe nobody reads would stall it)."""
    sets = [a for s in RUN + [f"learner.iterations={iterations}"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "driver.log", "w") as log:
        return subprocess.Popen([sys.executable, "-m", "egrpo_ray.cli", "train", "--config",
                                 str(ROOT / "configs" / "tiny.yaml"), *sets, "--output-dir", str(out), "--no-progress"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _log(out: Path) -> str:
    return (out.parent / "driver.log").read_text()[-3000:]


def _listening_sockets() -> dict[str, tuple[str, int]]:
    """socket inode -> (address, port) of every listening TCP socket (/proc/net/tcp, tcp6)."""
    found = {}
    for path, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hexip, hexport = f[1].split(":")
            raw = b"".join(bytes.fromhex(hexip[i:i + 8])[::-1] for i in range(0, len(hexip), 8))  # host-order words
            found[f[9]] = (str(ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)), int(hexport, 16))
    return found


def _listeners(procs) -> set[tuple[str, int, str, int]]:
    """(process name, pid, address, port) of each listening TCP socket the processes hold."""
    sockets, found = _listening_sockets(), set()
    for p in procs:
        try:
            name, fds = p.name(), os.listdir(f"/proc/{p.pid}/fd")
        except (OSError, psutil.Error):
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{p.pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in sockets:
                found.add((name, p.pid, *sockets[link[8:-1]]))
    return found


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _exposed(listeners) -> list:
    """Non-loopback listeners beyond what ALLOWED_NON_LOOPBACK allows a process of that name (a Ray worker renames
    itself per task, so every name a pid had counts)."""
    names: dict[int, set] = {}
    ports: dict[int, set] = {}
    for name, pid, ip, port in listeners:
        names.setdefault(pid, set()).add(name)
        if not _loopback(ip):
            ports.setdefault(pid, set()).add((ip, port))
    bad = []
    for pid, exposed in ports.items():
        limit = max((n for prefix, (n, _) in ALLOWED_NON_LOOPBACK.items()
                     for name in names[pid] if name.startswith(prefix)), default=0)
        if len(exposed) > limit:
            bad.append((sorted(names[pid]), pid, sorted(exposed)))
    return bad


def _follow(proc: subprocess.Popen, until, timeout: float, state: dict | None = None) -> dict:
    """Poll the run's process tree every 0.5 s until ``until(state)`` or the driver exits; returns the state."""
    state = state or {"run": RunProcesses(), "listeners": set(), "token_mode": None}
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        state["listeners"] |= _listeners(state["run"].look(proc.pid))
        temp_dir = state["run"].temp_dir
        if temp_dir and state["token_mode"] is None and (Path(temp_dir) / "auth_token").exists():
            state["token_mode"] = stat.S_IMODE((Path(temp_dir) / "auth_token").stat().st_mode)
        if until(state):
            break
        time.sleep(0.5)
    return state


def _steps(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_run_listens_on_loopback_only_and_a_sigkilled_driver_leaves_nothing(tmp_path):
    t0 = time.monotonic()
    out = tmp_path / "run"
    proc = _start(out, iterations=50)
    try:
        # every process is up and has served a step (with collective sync, the learner's weight-sync group too)
        state = _follow(proc, lambda s: _steps(out) >= 1, timeout=240)
        assert proc.poll() is None and _steps(out) >= 1, _log(out)
        print(f"\nthe first step done {time.monotonic() - t0:.0f} s after the start")
        time.sleep(2)
        state = _follow(proc, lambda s: True, timeout=5, state=state)  # one more look: the latest workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = time.monotonic()
    run = state["run"]
    names = {n for ns in run.names.values() for n in ns}
    assert any(n.startswith("ray::RayTrainWorker") for n in names) and any("RolloutWorker" in n for n in names), names

    listening = {name for name, *_ in state["listeners"]}
    assert {"gcs_server", "raylet"} <= listening, state["listeners"]  # the poll saw the cluster
    exposed = _exposed(state["listeners"])
    assert not exposed, f"listening beyond loopback, not in docs/network.md: {exposed}"
    for row in sorted(state["listeners"]):
        print(*row)
    assert run.temp_dir and run.temp_dir.startswith("/tmp/egrpo_ray_"), run.temp_dir
    assert state["token_mode"] == 0o600, oct(state["token_mode"] or 0)  # token auth on, token private

    left = run.left_after(60)
    assert not left, f"60 s after SIGKILL of the driver these processes of its cluster (or its temp dir) remain: {left}"
    beyond = sorted((n, ip, port) for n, _, ip, port in state["listeners"] if not _loopback(ip))
    print(f"{len(state['listeners'])} listeners, beyond loopback only the documented {beyond}; "
          f"cluster gone {time.monotonic() - killed_at:.1f} s after SIGKILL of the driver")
