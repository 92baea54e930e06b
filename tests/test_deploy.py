"""The deploy files ask for exactly what the configs they run need."""
import shlex
from pathlib import Path

import yaml

from egrpo_ray.config import load_config
from egrpo_ray.distributed.cluster import check_resources, resource_needs

ROOT = Path(__file__).resolve().parents[1]


def _offered(spec: dict) -> dict:
    """CPUs and GPUs the RayJob's Ray nodes advertise (rayStartParams, as `ray start` takes them)."""
    cluster = spec["rayClusterSpec"]
    groups = [(1, cluster["headGroupSpec"])] + [(g["replicas"], g) for g in cluster["workerGroupSpecs"]]
    total = {"CPU": 0.0, "GPU": 0.0}
    for count, group in groups:
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus = float(params.get("num-cpus", limits.get("cpu", 0)))
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        assert gpus <= float(limits.get("nvidia.com/gpu", 0)) and cpus <= float(limits.get("cpu", 0))
        total["CPU"] += count * cpus
        total["GPU"] += count * gpus
    return total


def test_kuberay_job_offers_exactly_what_its_config_needs():
    job = yaml.safe_load((ROOT / "deploy" / "kuberay-rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(ROOT / config, overrides)
    offered = _offered(job["spec"])
    check_resources(cfg, offered)  # raises when the cluster cannot hold the run
    needs = resource_needs(cfg)
    assert (needs.cpus, needs.gpus) == (offered["CPU"], offered["GPU"]) == (20.0, 8.0)
    assert cfg.learner.parallelism == "fsdp" and cfg.rollout.weight_sync == "collective"
