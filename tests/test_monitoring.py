"""Monitoring: the run's metrics go through Ray's metrics agent; a real Prometheus finds a live run's embedded
cluster through the targets file the driver writes, and every Grafana panel's query answers. The same run is
private: its processes listen on loopback only, beyond the allow-list of docs/network.md, and Ray's token auth
is on with a 0600 token in its own temp dir. The run then ends (SIGTERM, as `ray job stop` sends, or on its own)
and leaves no process of its cluster and no temp dir behind.

The live run sets RAY_metrics_report_interval_ms=1000 (Ray's default is 10 s) so that the run's figures reach
Prometheus within its few seconds of training."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from egrpo_ray.config import ConfigError, load_config
from egrpo_ray.distributed.cluster import free_port
from egrpo_ray.monitoring import METRICS
from run_processes import ALLOWED_NON_LOOPBACK, RunProcesses, is_loopback

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "egrpo-dashboard.json"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
REQUIRED = bool(os.environ.get("EGRPO_REQUIRE_PROMETHEUS"))
needs_prometheus = pytest.mark.skipif(PROMETHEUS is None and not REQUIRED,
                                      reason="Debian's prometheus package is not installed (.ci/run installs it)")
# Ray exports GPU figures only on nodes with GPUs
SKIPPED_METRICS = ("ray_node_gpus_", "ray_node_gram_") if shutil.which("nvidia-smi") is None else ()
RUN = "monitoring-e2e"


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def test_dashboard_imports_as_is_every_panel_on_the_datasource_variable():
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["datasource"]["uid"] == "${datasource}"
    assert "__inputs" not in dashboard and "${DS_" not in DASHBOARD.read_text()  # nothing an import must resolve
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"] and all(t.get("datasource", p["datasource"]) == p["datasource"] for t in p["targets"])
    queries = " ".join(_queries(dashboard))
    # every metric the run exports has a panel, and so do Ray's node figures
    for name, spec in METRICS.items():
        exported = f"ray_{name}" + {"counter": "_total", "histogram": "_"}.get(spec.kind, "")
        assert exported in queries, f"no panel shows {name}"
    for ray_metric in ("ray_node_cpu_utilization", "ray_node_mem_used", "ray_object_store_memory",
                       "ray_node_gpus_utilization"):
        assert ray_metric in queries


def test_removed_metrics_port_is_refused_in_one_line():
    for key in ("logging.metrics_port=9464", "logging.metrics_host=0.0.0.0"):
        with pytest.raises(ConfigError, match=r"^logging: metrics_(port|host) was removed: .*Ray's metrics agent"):
            load_config(None, [key])


@pytest.mark.skipif(PROMTOOL is None and not REQUIRED, reason="promtool (Debian's prometheus package) not installed")
def test_shipped_prometheus_config_is_valid():
    out = subprocess.run([PROMTOOL, "check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr


def _answered(prom_port: int, queries: list[str]) -> set[str]:
    answered = set()
    for q in queries:
        url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.parse.quote(q.replace('$__rate_interval', '30s'))}"
        try:
            if json.loads(_get(url))["data"]["result"]:
                answered.add(q)
        except OSError:
            pass
    return answered


@needs_prometheus
def test_prometheus_scrapes_a_live_run_and_every_panel_query_answers(tmp_path):
    assert PROMETHEUS, "prometheus binary required"
    targets = tmp_path / "targets"
    targets.mkdir()
    prom_port = free_port()
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: ray\n"
        f"    file_sd_configs: [{{files: ['{targets}/*.json'], refresh_interval: 1s}}]\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prom.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "run"
    overrides = ["learner.iterations=5", "logging.grid_every=1000", "prompts.heldout_count=2", "sampling.steps=8",
                 "algorithm.group_size=4", f"cluster.run_name={RUN}", f"logging.prometheus_targets_dir={targets}",
                 "rollout.weight_sync=collective"]  # its group's rendezvous is one more listener to check
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_metrics_report_interval_ms": "1000"}
    for key in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    log_path = tmp_path / "run.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: nothing reads the run's output while it runs
        run = subprocess.Popen([sys.executable, "-m", "egrpo_ray.cli", "train", "--output-dir", str(out),
                                "--no-progress", *[a for o in overrides for a in ("--set", o)]],
                               cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    queries = list(dict.fromkeys(q.replace("$run", RUN) for q in _queries(_dashboard())
                                 if not any(g in q for g in SKIPPED_METRICS)))
    answered: set[str] = set()
    processes = RunProcesses()
    try:
        saw_targets = False
        while run.poll() is None and len(answered) < len(queries):
            time.sleep(2.0)
            processes.look(run.pid)
            saw_targets = saw_targets or (targets / f"{RUN}.json").exists()
            # Ray's node gauges come every 5 s and age out after 2 report intervals: count each query once answered
            answered |= _answered(prom_port, [q for q in queries if q not in answered])
        if run.poll() is None:  # everything answered: stop the run (SIGTERM = `ray job stop`)
            run.terminate()
        run.wait(timeout=120)
        log = log_path.read_text()
        assert saw_targets, f"the run never wrote its Prometheus targets:\n{log[-3000:]}"
        missing = [q for q in queries if q not in answered]
        assert not missing, f"panel queries without data: {missing}\n{log[-3000:]}"
        assert run.returncode in (0, 143), log[-3000:]
        assert f"{RUN}.json" in log and "prometheus_targets.json" in log  # the driver says where the targets are
        assert "core_worker.cc" not in log, log[-3000:]  # Ray's actor-restart caveat (#53727) stays off the console
        assert not (targets / f"{RUN}.json").exists() and not (out / "prometheus_targets.json").exists()
        assert processes.temp_dir and processes.temp_dir.startswith("/tmp/egrpo_ray_"), processes.temp_dir
        assert processes.token_mode == 0o600, oct(processes.token_mode or 0)  # token auth on, token private
        assert any(n.startswith("ray::RayTrainWorker") for n in processes.all_names()), processes.all_names()
        assert {"gcs_server", "raylet"} <= {name for name, *_ in processes.listeners}  # the looks saw the cluster
        exposed = processes.exposed()
        assert not exposed, f"listening beyond loopback, not in docs/network.md ({sorted(ALLOWED_NON_LOOPBACK)}): {exposed}"
        print(*sorted(l for l in processes.listeners if not is_loopback(l[2])), sep="\n")
        left = processes.left_after(5)
        assert not left, f"5 s after the run ended these processes of its cluster (or its temp dir) remain: {left}"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
        prom.terminate()
        prom.wait(timeout=10)
