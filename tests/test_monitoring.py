"""The run's Prometheus metrics scraped by a real Prometheus, and every Grafana panel's query answered."""
import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from egrpo_ray.distributed.cluster import free_port
from egrpo_ray.monitoring import RunMetrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("EGRPO_REQUIRE_PROMETHEUS"),
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def test_exporter_serves_on_loopback_only():
    m = RunMetrics("unit")
    server = m.serve(0)
    try:
        m.update({"step": 3, "reward_mean": 0.5, "dropped_stale": 2})
        m.update({"event": "heldout", "heldout_reward": 0.7})
        text = _get(f"http://127.0.0.1:{server.server_port}/metrics")
        assert 'egrpo_reward_mean{run="unit"} 0.5' in text and 'egrpo_dropped_stale_total{run="unit"} 2.0' in text
        assert 'egrpo_heldout_reward{run="unit"} 0.7' in text
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()


@needs_prometheus
def test_prometheus_scrapes_the_run_and_every_dashboard_query_answers(tmp_path):
    assert PROMETHEUS, "prometheus binary required"
    m = RunMetrics("e2e")
    exporter = m.serve(0)
    prom_port = free_port()
    (tmp_path / "prom.yml").write_text(
        "global: {scrape_interval: 1s}\nscrape_configs:\n  - job_name: egrpo\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{exporter.server_port}']}}]\n")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prom.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        records = [{"step": s, "policy_version": s, "reward_mean": 0.5 + 0.01 * s, "reward_std": 0.1, "zero_std_ratio": 0.0,
                    "ratio_mean": 1.0, "clip_fraction": 0.0, "kl": 0.0, "grad_norm": 0.3, "staleness_mean": 0.5,
                    "queue_depth": 2, "queue_wait_s": 0.1, "weight_publish_s": 0.01, "images_per_s": 40.0, "dropped_stale": s}
                   for s in range(1, 4)]
        dashboard = json.loads((ROOT / "deploy" / "grafana" / "egrpo-dashboard.json").read_text())
        queries = [t["expr"].replace("$run", ".*") for p in dashboard["panels"] for t in p["targets"]]
        m.update({"event": "heldout", "heldout_reward": 0.6})
        deadline, missing = time.time() + 60, queries
        step = 0
        while time.time() < deadline and missing:
            m.update(records[min(step, 2)])
            step += 1
            time.sleep(1.0)
            try:
                missing = [q for q in queries if not json.loads(_get(
                    f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.parse.quote(q)}"))["data"]["result"]]
            except OSError:
                continue
        assert not missing, f"panel queries without data: {missing}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        exporter.shutdown()
