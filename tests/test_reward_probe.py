"""benchmarks/reward_probe.py: one iteration runs, FE are counted, and the evaluation is fixed-noise (a ~0 lr keeps it)."""
import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reward_probe.py"
spec = importlib.util.spec_from_file_location("reward_probe", SCRIPT)
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_probe_scores_both_combinations_with_fixed_noise(capsys, tmp_path):
    probe.main(["--combine", "mean", "--lr", "1e-12", "--iters", "1", "--every", "1", "--train-count", "2",
                "--set", "sampling.eta=0.3", "--grid", str(tmp_path / "grid.png")])
    lines = capsys.readouterr().out.splitlines()
    evals = [[float(v) for v in re.search(r"eval: product ([0-9.]+) mean ([0-9.]+)", line).groups()]
             for line in lines if "eval:" in line]
    assert len(evals) == 2 and evals[1] == pytest.approx(evals[0], abs=2e-4)  # ~ the same weights, the same noise
    assert evals[0][0] < evals[0][1]  # the strict product is below the graded mean on the base
    assert all(re.search(r"\| background noise [0-9.]+ area \d+ px", line) for line in lines if "eval:" in line)
    assert int(re.search(r"FE (\d+) rollout", lines[-1]).group(1)) > 0
    assert (tmp_path / "grid.png").stat().st_size > 0
    assert re.search(r"first rollout: \d+ groups, reward mean [0-9.]+, within-group std [0-9.]+", lines[2])


def test_random_reward_control_trains_on_rewards_blind_to_the_images(capsys):
    probe.main(["--random-reward", "--lr", "1e-12", "--iters", "1", "--every", "1", "--train-count", "1",
                "--set", "sampling.eta=0.3"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("train on random rewards")
    rewards = probe.random_reward(0)(None, ["p"] * 1000)
    assert 0 <= rewards.min() and rewards.max() < 1 and abs(rewards.mean().item() - 0.5) < 0.05
    assert "eval: product" in lines[-1]  # the evaluation still scores the real reward
