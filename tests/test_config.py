import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from egrpo_ray.cli import main
from egrpo_ray.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# (YAML text or None, --set overrides, expected one-line error)
INVALID = [
    ("model: {kind: tiny}\nbogus: 1", [], "bogus: unknown key"),
    ("sampling: {stepz: 16}", [], "sampling.stepz: unknown key"),
    ("sampling: {steps: sixteen}", [], "sampling.steps: Input should be a valid integer"),
    ("sampling: {steps: 0}", [], "sampling.steps: Input should be greater than or equal to 1"),
    ("sampling: {shift: -1}", [], "sampling.shift: Input should be greater than 0"),
    ("sampling: {eta: 0}", [], "sampling.eta: Input should be greater than 0"),
    (None, ["algorithm.dance_eta=0"], "algorithm.dance_eta: Input should be greater than 0"),
    (None, ["learner.workers=2", "learner.prompts_per_step=2", "rollout.prompts_per_batch=2"],
     "each learner rank's share of learner.prompts_per_step (1) must be a multiple of rollout.prompts_per_batch (2)"),
    (None, ["sampling.merge.tau=-2"], "sampling.merge.tau: Input should be greater than or equal to 0"),
    (None, ["sampling.merge.mode=greedy"], "sampling.merge.mode: Input should be 'adaptive', 'fixed' or 'none'"),
    (None, ["sampling.merge.active_fraction=1.5"], "sampling.merge.active_fraction: Input should be less than or equal to 1"),
    (None, ["sampling.merge.active_start=0.5"], "sampling.merge: active_start (0.5) must be below active_fraction (0.5)"),
    (None, ["algorithm.strategy=ppo"], "algorithm.strategy: Input should be 'egrpo', 'g2rpo', 'dancegrpo', 'flowgrpo' or 'mixgrpo'"),
    (None, ["algorithm.group_size=1"], "algorithm.group_size: Input should be greater than or equal to 2"),
    (None, ["algorithm.clip_range=0"], "algorithm.clip_range: Input should be greater than 0"),
    (None, ["algorithm.tau=2.0"], "algorithm.tau: unknown key"),
    (None, ["learner.lr=fast"], "learner.lr: Input should be a valid number, unable to parse string as a number"),
    (None, ["learner.max_staleness=-1"], "learner.max_staleness: Input should be greater than or equal to 0"),
    (None, ["rollout.workers=0"], "rollout.workers: Input should be greater than or equal to 1"),
    ("rewards: []", [], "rewards: List should have at least 1 item after validation, not 0"),
    ("rewards: [{name: aesthetic}]", [], "rewards.0.name: Input should be 'alignment', 'jpeg', 'hps', 'clip', 'pickscore', 'imagereward' or 'random'"),
    ("rewards: [{name: hps, batch_size: 0}]", [], "rewards.0.batch_size: Input should be greater than or equal to 1"),
    ("model: {kind: flux}", [], "model.path is required for model.kind 'flux'"),
    ("prompts: {source: file}", [], "prompts.train_path is required when prompts.source is 'file'"),
    ("sampling: {steps: 4, merge: {mode: fixed, fixed_len: 6}}", [], "sampling.merge.fixed_len must not exceed sampling.steps"),
    ("cluster: {http_port: 70000}", [], "cluster.http_port: Input should be less than or equal to 65535"),
    ("- a\n- b", [], "the top level must be a mapping of keys to values"),
    ("model: [unclosed", [], "invalid YAML (line 1)"),
    (None, ["noequals"], "--set 'noequals': expected key=value"),
]


@pytest.mark.parametrize("text,overrides,expected", INVALID, ids=[e[2][:40] for e in INVALID])
def test_invalid_config_gives_one_line_and_exit_2(tmp_path, capsys, text, overrides, expected):
    args = ["config"]
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        args += ["--config", str(path)]
    for o in overrides:
        args += ["--set", o]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("egrpo-ray: error: ")
    assert expected in err


def test_missing_config_file(capsys):
    assert main(["config", "--config", "/nonexistent/x.yaml"]) == 2
    assert "config file not found: /nonexistent/x.yaml" in capsys.readouterr().err


def test_overrides_apply_and_defaults_validate(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["sampling.merge.tau=2.0", "learner.lr=1e-4", "rewards.0.weight=2"])
    assert cfg.sampling.merge.tau == 2.0 and cfg.learner.lr == 1e-4 and cfg.rewards[0].weight == 2
    assert load_config(None) == load_config(ROOT / "configs" / "tiny.yaml")  # the embedded default
    with pytest.raises(ConfigError):
        load_config(None, ["learner.lr=0"])


def test_optimizer_follows_the_learner_section():
    import torch

    from egrpo_ray.training import make_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)  # frozen (a LoRA base): not optimised
    learner = load_config(None, ["learner.lr=3e-4", "learner.adam_eps=1e-5", "learner.weight_decay=0.01"]).learner
    group = make_optimizer(model, learner).param_groups[0]
    assert (group["lr"], group["eps"], group["weight_decay"]) == (3e-4, 1e-5, 0.01)
    assert [p.shape for p in group["params"]] == [p.shape for p in model[1].parameters()]
    assert load_config(None).learner.adam_eps == 1e-8  # torch's default unless set


def test_every_shipped_config_validates():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path)
        assert yaml.safe_load(path.read_text())  # not empty


def test_console_script_exit_code_and_one_line():
    proc = subprocess.run([sys.executable, "-m", "egrpo_ray.cli", "config", "--set", "sampling.steps=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "sampling.steps" in proc.stderr


def test_plan_cli_json_and_table(capsys):
    import json

    assert main(["plan", "--steps", "16", "--shift", "3", "--eta", "0.7", "--tau", "2.2", "--group-size", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"] == [[0, 1], [1, 1], [2, 2], [4, 2], [6, 3]]
    assert len(out["sigmas"]) == 17 and len(out["entropy"]) == 16
    assert abs(out["entropy"][0] - 2.89) < 0.01 and out["forwards_per_prompt"] == 703
    assert main(["plan", "--tau", "0", "--group-size", "4"]) == 0
    table = capsys.readouterr().out
    assert "plan: (0,1) (1,1) (2,1) (3,1) (4,1) (5,1) (6,1) (7,1)" in table
    assert main(["plan", "--fixed-merge", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"] == [[0, 1], [1, 1], [2, 4], [6, 4]]
    assert main(["plan", "--active-start", "0.375", "--active-fraction", "0.75", "--json"]) == 0
    band = json.loads(capsys.readouterr().out)
    assert band["plan"] == [[6, 3], [9, 4]] and band["forwards_per_prompt"] == 10 + 8 * (7 + 3)  # G = 8
    assert main(["plan", "--steps", "0"]) == 2
