"""The processes of an `egrpo-ray train` run with its own embedded cluster, followed from outside: the driver,
its descendants and anything naming the run's temp dir (orphans of a dead driver). Used by tests/test_network.py
(a SIGKILLed driver) and tests/test_monitoring.py (a run that ends on its own or on SIGTERM)."""
from __future__ import annotations

import os
import time

import psutil

from egrpo_ray.distributed.cluster import watchdog_temp_dir


class RunProcesses:
    """Every process of the run seen so far (Ray workers rename themselves per task: every name counts)."""

    def __init__(self):
        self.pids: dict[int, psutil.Process] = {}
        self.names: dict[int, set[str]] = {}
        self.temp_dir: str | None = None

    def look(self, driver_pid: int | None) -> list[psutil.Process]:
        """One look at the run: records its processes and finds its temp dir; returns the processes."""
        procs = _tree(driver_pid, self.temp_dir)
        for p in procs:
            try:
                self.temp_dir = self.temp_dir or watchdog_temp_dir(p.cmdline())
                self.names.setdefault(p.pid, set()).add(p.name())
                self.pids.setdefault(p.pid, p)
            except psutil.Error:
                pass
        return procs

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
