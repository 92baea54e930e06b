"""The layering rules, checked in fresh interpreters: algo is pure torch, models and rewards never load Ray."""
import json
import pkgutil
import subprocess
import sys

import egrpo_ray.algo
import egrpo_ray.models
import egrpo_ray.rewards


def _modules(package) -> list[str]:
    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def _loaded_after_importing(modules: list[str]) -> list[str]:
    code = "import importlib, json, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_algo_imports_only_torch_and_itself():
    modules = _modules(egrpo_ray.algo)
    assert len(modules) >= 8
    loaded = _loaded_after_importing(modules)
    ours = [m for m in loaded if m.startswith("egrpo_ray.") and not m.startswith("egrpo_ray.algo")]
    assert ours == [], ours
    foreign = [m for m in loaded if m.split(".")[0] in ("pydantic", "yaml", "ray")]
    assert foreign == [], foreign


def test_models_and_rewards_never_import_ray():
    loaded = _loaded_after_importing(_modules(egrpo_ray.models) + _modules(egrpo_ray.rewards))
    assert "egrpo_ray.models.flux" in loaded and "egrpo_ray.rewards.hps" in loaded
    assert [m for m in loaded if m.split(".")[0] == "ray" or m.startswith("egrpo_ray.distributed")] == []
