"""The processes of an `egrpo-ray train` run with its own embedded cluster, followed from outside: the driver,
its descendants and anything naming the run's temp dir (orphans of a dead driver), the TCP sockets they listen
on, and the mode of the run's auth token. Used by tests/test_network.py (a SIGKILLed driver) and
tests/test_monitoring.py (a run that ends on its own or on SIGTERM, and what it listens on)."""
from __future__ import annotations

import ipaddress
import os
import stat
import time
from pathlib import Path

import psutil

from egrpo_ray.distributed.cluster import watchdog_temp_dir

# Mirrors the table "Listening beyond loopback" in docs/network.md: process name prefix -> (most such
# listeners one process may hold, why). Nothing else of the run may listen on a non-loopback address.
ALLOWED_NON_LOOPBACK: dict[str, tuple[int, str]] = {
    "ray::RayTrainWorker": (1, ("torch TCPStore of learner rank 0: the Train process group's rendezvous (Ray Train "
                               "creates it; torch binds [::], no auth). The weight-sync group's binds the node's "
                               "address only")),
    "ray::ServeReplica": (1, "Serve's inter-deployment gRPC server, hard-coded [::]:0 in Ray 2.60; Ray token auth"),
    "ray::SERVE_REPLICA::": (1, "the same Serve replica process, named after its replica id while it starts"),
}


class RunProcesses:
    """Every process of the run seen so far (Ray workers rename themselves per task: every name counts)."""

    def __init__(self):
        self.pids: dict[int, psutil.Process] = {}
        self.names: dict[int, set[str]] = {}
        self.temp_dir: str | None = None
        self.listeners: set[tuple[str, int, str, int]] = set()  # (process name, pid, address, port)
        self.token_mode: int | None = None

    def look(self, driver_pid: int | None) -> list[psutil.Process]:
        """One look at the run: records its processes, their listening sockets, its temp dir and the mode of its
        auth token; returns the processes."""
        procs = _tree(driver_pid, self.temp_dir)
        for p in procs:
            try:
                self.temp_dir = self.temp_dir or watchdog_temp_dir(p.cmdline())
                self.names.setdefault(p.pid, set()).add(p.name())
                self.pids.setdefault(p.pid, p)
            except psutil.Error:
                pass
        self.listeners |= _listeners(procs)
        token = Path(self.temp_dir or "/nonexistent") / "auth_token"
        if self.token_mode is None and token.exists():
            self.token_mode = stat.S_IMODE(token.stat().st_mode)
        return procs

    def all_names(self) -> set[str]:
        return {n for names in self.names.values() for n in names}

    def exposed(self) -> list:
        """Non-loopback listeners beyond what ALLOWED_NON_LOOPBACK allows a process of that name (a Ray worker
        renames itself per task, so every name a pid had counts)."""
        ports: dict[int, set] = {}
        for _, pid, ip, port in self.listeners:
            if not is_loopback(ip):
                ports.setdefault(pid, set()).add((ip, port))
        bad = []
        for pid, exposed in ports.items():
            limit = max((n for prefix, (n, _) in ALLOWED_NON_LOOPBACK.items()
                         for name in self.names[pid] if name.startswith(prefix)), default=0)
            if len(exposed) > limit:
                bad.append((sorted(self.names[pid]), pid, sorted(exposed)))
        return bad

    def alive(self) -> list[str]:
        """The run's processes still running (zombies count as gone)."""
        alive = []
        for pid, p in self.pids.items():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{sorted(self.names[pid])} ({pid})")
            except psutil.Error:
                pass
        return alive + [f"{p.name()} ({p.pid})" for p in _tree(None, self.temp_dir)]

    def left_after(self, seconds: float) -> list[str]:
        """Wait up to ``seconds`` for the run's processes to end and its temp dir to go; returns what is left."""
        deadline = time.monotonic() + seconds
        while (left := self.alive() + [d for d in [self.temp_dir] if d and os.path.exists(d)]) and \
                time.monotonic() < deadline:
            time.sleep(0.5)
        return left


def _tree(pid: int | None, temp_dir: str | None) -> list[psutil.Process]:
    procs = {}
    try:
        if pid is not None:
            root = psutil.Process(pid)
            procs[pid] = root
            procs.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.Error:
        pass
    if temp_dir:
        for p in psutil.process_iter():
            try:
                if any(temp_dir in a for a in p.cmdline()):
                    procs[p.pid] = p
                    procs.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.Error:
                pass
    return list(procs.values())


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return addr.is_loopback


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
