"""The deploy files run as shipped: the KubeRay pods offer exactly what their config needs (the project's
own resource checks), mount every path the config reads or writes, expose Ray's metrics port to the
PodMonitor, and run the image docker/Dockerfile builds. There is no Docker daemon or registry here: the
Dockerfile is parsed, and its steps after FROM are replayed on this machine (the package they install runs)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from egrpo_ray.config import load_config
from egrpo_ray.distributed.cluster import check_placement, check_resources, resource_needs

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
MANIFESTS = ["kuberay-rayjob.yaml", "kuberay-raycluster.yaml"]


def _load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def _cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def _groups(manifest: dict) -> list[tuple[int, dict]]:
    """(replicas, group) for the head group and every worker group."""
    spec = _cluster_spec(manifest)
    return [(1, spec["headGroupSpec"])] + [(g["replicas"], g) for g in spec["workerGroupSpecs"]]


def _container(group: dict) -> dict:
    (container,) = group["template"]["spec"]["containers"]
    return container


def _nodes(manifest: dict) -> list[dict]:
    """Each Ray node's resources as ray.nodes() would report them (rayStartParams, as `ray start` takes them)."""
    nodes = []
    for count, group in _groups(manifest):
        params, res = group.get("rayStartParams", {}), _container(group)["resources"]
        limits = res["limits"]
        cpus = float(params.get("num-cpus", limits.get("cpu", 0)))
        gpus = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
        # Ray must not advertise more than the pod gets; GPUs are requested as they are limited
        assert gpus <= float(limits.get("nvidia.com/gpu", 0)) and cpus <= float(limits.get("cpu", 0))
        assert res.get("requests", {}).get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
        nodes += [{"CPU": cpus, "GPU": gpus}] * count
    return nodes


def _train_argv(manifest: dict) -> list[str]:
    """`egrpo-ray train ...` of a RayJob's entrypoint (inside its `bash -c` wrapper) or, for a RayCluster,
    the config named in its annotation."""
    if manifest["kind"] == "RayCluster":
        return ["egrpo-ray", "train", "--config", manifest["metadata"]["annotations"]["egrpo-ray/config"],
                "--set", "cluster.address=auto"]
    argv = shlex.split(manifest["spec"]["entrypoint"])
    if argv[:2] == ["bash", "-c"]:
        argv = shlex.split(argv[2].split("exec ", 1)[1])
    assert argv[:2] == ["egrpo-ray", "train"], argv
    return argv


def _workdir() -> str:
    (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)
    return workdir.rstrip("/") + "/"


def _config(manifest: dict):
    argv = _train_argv(manifest)
    path = argv[argv.index("--config") + 1].removeprefix(_workdir())  # the image keeps the repo at WORKDIR
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return load_config(ROOT / path, overrides), argv


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_pods_offer_exactly_what_the_config_needs(name):
    (manifest,) = _load(name)
    cfg, _ = _config(manifest)
    nodes = _nodes(manifest)
    offered = {"CPU": sum(n["CPU"] for n in nodes), "GPU": sum(n["GPU"] for n in nodes)}
    check_resources(cfg, offered)  # raises when the cluster cannot hold the run
    check_placement(cfg, nodes)
    needs = resource_needs(cfg)
    assert (needs.cpus, needs.gpus) == (offered["CPU"], offered["GPU"]) == (20.0, 8.0)
    # every GPU actor fits on the one GPU node: no node offers more GPUs than a real 8-GPU node has
    assert max(n["GPU"] for n in nodes) == 8.0
    assert cfg.learner.parallelism == "fsdp" and cfg.rollout.weight_sync == "collective"
    assert cfg.cluster.address == "auto"


def _mounted_at(container: dict, volumes: dict, path: str) -> dict | None:
    """The volume a path falls under in this container (the longest mount prefix), or None."""
    best = None
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/") + "/"
        if path.startswith(mount) and (best is None or len(mount) > len(best[0])):
            best = (mount, m)
    return None if best is None else {**best[1], "volume": volumes[best[1]["name"]]}


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_pods_mount_what_the_config_reads_and_writes(name):
    (manifest,) = _load(name)
    cfg, argv = _config(manifest)
    output_dir = argv[argv.index("--output-dir") + 1] if "--output-dir" in argv else "/runs/flux-hps"
    reads = [cfg.model.path, cfg.prompts.train_path, cfg.prompts.test_path] + [r.path for r in cfg.rewards]
    claims = {d["metadata"]["name"]: d for d in _load("kuberay-storage.yaml")}
    for _, group in _groups(manifest):
        container = _container(group)
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        for path in reads:
            mount = _mounted_at(container, volumes, path)
            assert mount is not None, f"{container['name']}: nothing mounted at {path}"
            assert mount.get("readOnly") and mount["volume"]["persistentVolumeClaim"]["claimName"] in claims
        out = _mounted_at(container, volumes, output_dir.rstrip("/") + "/")
        assert out is not None and not out.get("readOnly"), f"{container['name']}: {output_dir} not writable"
        claim = claims[out["volume"]["persistentVolumeClaim"]["claimName"]]
        assert "ReadWriteMany" in claim["spec"]["accessModes"]  # head and GPU pods write the same run


def test_kuberay_pods_expose_metrics_to_the_podmonitor():
    (monitor,) = _load("podmonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    for name in MANIFESTS:
        (manifest,) = _load(name)
        for _, group in _groups(manifest):
            # KubeRay adds ray.io/is-ray-node to every Ray pod; the template adds the app label
            labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
            assert all(labels.get(k) == v for k, v in selector.items()), (name, labels)
            port = int(group["rayStartParams"]["metrics-export-port"])
            ports = {p["name"]: p["containerPort"] for p in _container(group)["ports"]}
            assert ports[endpoint["port"]] == port == 8080


def test_rayjob_limits_its_life_and_retries_by_resuming():
    (job,) = _load("kuberay-rayjob.yaml")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    argv = _train_argv(job)
    out = argv[argv.index("--output-dir") + 1]
    assert f"ls -d {out}/checkpoints/step_*" in spec["entrypoint"] and "$resume" in spec["entrypoint"]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_manifests_run_the_image_the_dockerfile_builds():
    version = _pyproject()["project"]["version"]
    docs = DOCKERFILE.read_text() + (DEPLOY / "kuberay-rayjob.yaml").read_text()
    assert f"docker build -f docker/Dockerfile -t egrpo-ray:{version} ." in docs  # how to build it is written down
    for name in MANIFESTS:
        (manifest,) = _load(name)
        assert _cluster_spec(manifest)["rayVersion"] == _pin("ray")
        for _, group in _groups(manifest):
            container = _container(group)
            assert container["image"] == f"egrpo-ray:{version}" and container["imagePullPolicy"] == "IfNotPresent"


def _pin(name: str) -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^]]*\])?==(\S+)", dep)
        if m:
            return m.group(2)
    raise AssertionError(f"{name} is not pinned in pyproject.toml")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(l for l in DOCKERFILE.read_text().splitlines() if not l.lstrip().startswith("#")))
    return [(l.split(None, 1)[0].upper(), l.split(None, 1)[1]) for l in text.splitlines() if l.strip()]


def test_dockerfile_builds_on_ray_gpu_with_a_dependency_layer_and_no_root():
    steps = _instructions()
    kinds = [k for k, _ in steps]
    assert steps[0] == ("FROM", f"rayproject/ray:{_pin('ray')}-py311-gpu")  # pinned, Ray as pyproject pins it
    copies = [i for i, (k, _) in enumerate(steps) if k == "COPY"]
    copied = {i: steps[i][1].split()[-2] for i in copies}
    code_at = next(i for i, src in copied.items() if src == "egrpo_ray")
    deps_at = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "requirements.txt" in a)
    # pyproject alone before the dependency install; the code only after it
    assert [src for i, src in copied.items() if i < deps_at] == ["pyproject.toml"] and code_at > deps_at
    deps = steps[deps_at][1]
    # torch from PyTorch's index at the pin, the rest held to it: pip never picks another torch
    assert re.search(r"pip install --index-url \"?\$TORCH_INDEX_URL\"? -r /tmp/torch.txt", deps)
    assert "-c /tmp/torch.txt" in deps and "^(torch|torchvision)==" in deps
    assert any(k == "ARG" and a.startswith("TORCH_INDEX_URL=https://download.pytorch.org/whl/cu") for k, a in steps)
    installs = [a for i, (k, a) in enumerate(steps) if k == "RUN" and "pip install" in a and i > code_at]
    assert installs and all(" -e " not in f" {a} " and "--editable" not in a for a in installs)
    assert any(re.search(r"pip install (--no-deps )?\.(\s|$)", a) for a in installs)  # the package, built
    assert any(k == "RUN" and "apt-get install" in a and re.search(r"\bwget\b", a) for k, a in steps)
    user, as_root = "root", []
    for k, a in steps:
        user = a.strip() if k == "USER" else user
        as_root += [a] if k == "RUN" and user == "root" else []
    assert user == "ray" and all(a.startswith("apt-get ") for a in as_root)  # root only for apt-get
    assert all(k != "VOLUME" for k in kinds)  # volumes are the deployment's (deploy/), not the image's
    # the build context sends only what is copied (BuildKit's docker/Dockerfile.dockerignore), and all of that
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and set(copied.values()) == _context_files()


def _context_files() -> set[str]:
    """What BuildKit sends as the build context: docker/Dockerfile.dockerignore's `!` allow-list after `*`."""
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    return {l[1:].rstrip("/") for l in ignore if l.startswith("!")}


# The replay's pip: every call is recorded; only the install of the package itself (`pip install ... .`)
# runs, into the image's stand-in site-packages. The dependency installs need PyTorch's CUDA index and GBs
# of wheels; this venv already holds the same pins (what they would install is checked from their files).
_PIP = """pip() { printf '%s\\n' "$*" >> "$PIP_CALLS"
  case " $* " in *" . "*) python -m pip "$@" --no-build-isolation --quiet --target "$SITE" ;; esac; }
"""


def _replay(rootfs: Path) -> tuple[Path, list[str]]:
    """The Dockerfile's steps after FROM, with rootfs standing in for the image's /: COPY from the build
    context, ENV and ARG defaults into RUN's environment, RUN (as `ray`) with bash in WORKDIR. The RUNs as
    root install Debian packages on the base image and are skipped. Returns (site-packages, pip calls)."""
    context = rootfs.parent / "context"
    for name in _context_files():
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, context / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            context.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, context / name)
    site, calls = rootfs / "site-packages", rootfs / "pip-calls"
    # PIP_NO_INDEX: a pip call the function does not catch (`python -m pip`) fails here, never downloads
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "SITE": str(site),
           "PIP_CALLS": str(calls), "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1"}
    workdir, user = rootfs, "root"
    for kind, args in _instructions()[1:]:
        if kind in ("ENV", "ARG"):
            env.update(a.split("=", 1) for a in shlex.split(args) if "=" in a)
        elif kind == "USER":
            user = args.strip()
        elif kind == "WORKDIR":
            workdir = rootfs / args.strip().lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif kind == "COPY":
            *sources, dest = [a for a in shlex.split(args) if not a.startswith("--")]
            for src in sources:  # a directory's contents go to dest; a file into dest/ (or to dest)
                target = workdir / dest / (src if dest.endswith("/") and (context / src).is_file() else "")
                if (context / src).is_dir():
                    shutil.copytree(context / src, target, symlinks=True, dirs_exist_ok=True)
                else:
                    shutil.copy2(context / src, target)
        elif kind == "RUN" and user != "root":
            script = args.replace("/tmp/", f"{rootfs}/tmp/")
            (rootfs / "tmp").mkdir(exist_ok=True)
            done = subprocess.run(["bash", "-c", f"set -e\n{_PIP}{script}"], cwd=workdir, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"RUN {args}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    return site, calls.read_text().splitlines()


def test_the_dockerfile_replayed_installs_a_package_that_runs_the_embedded_default(tmp_path):
    rootfs = tmp_path / "image"
    site, pip_calls = _replay(rootfs)
    # the dependency layer: exactly pyproject's dependencies, torch and torchvision at their pins
    requirements = (rootfs / "tmp" / "requirements.txt").read_text().split()
    assert requirements == _pyproject()["project"]["dependencies"]
    assert (rootfs / "tmp" / "torch.txt").read_text().split() == [f"torch=={_pin('torch')}",
                                                                   f"torchvision=={_pin('torchvision')}"]
    assert len(pip_calls) == 3 and pip_calls[-1] == "install --no-deps ."  # torch, the rest, the package
    # the package was built, not linked: the default config and the tiny model are files inside it
    installed = site / "egrpo_ray" / "assets"
    default = installed / "default.yaml"
    assert default.is_file() and not default.is_symlink()
    assert default.read_bytes() == (ROOT / "configs" / "tiny.yaml").read_bytes()
    assert (installed / "tiny" / "model.safetensors").is_file()
    # the configs the manifests name are in the image at the path they name
    for name in MANIFESTS:
        (manifest,) = _load(name)
        argv = _train_argv(manifest)
        config = argv[argv.index("--config") + 1]
        assert (rootfs / _workdir().lstrip("/") / config.removeprefix(_workdir())).is_file(), config
    # the installed CLI, run outside the repository, imports the installed package and scores the default
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import egrpo_ray; print(egrpo_ray.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), where
    done = subprocess.run([str(site / "bin" / "egrpo-ray"), "eval", "--num-prompts", "2", "--no-progress",
                           "--output-dir", str(tmp_path / "eval")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scores["num_prompts"] == 2 and 0 < scores["rewards"]["alignment"]["mean"] < 1, scores
