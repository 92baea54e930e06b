"""benchmarks/compare_strategies.py's statistics: the t-quantiles against a numeric Student-t CDF, the
interval, the paired verdict in the report (Bonferroni-corrected), the lr choice and the bad-input errors."""
import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_strategies.py"
spec = importlib.util.spec_from_file_location("compare_strategies", SCRIPT)
cs = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cs  # dataclasses look their module up
spec.loader.exec_module(cs)


def _t_cdf(t: float, df: int) -> float:
    """P(T <= t) by trapezoidal integration of torch.distributions.StudentT's density over [0, t]."""
    xs = torch.linspace(0, t, 200_001, dtype=torch.float64)
    pdf = torch.distributions.StudentT(torch.tensor(float(df), dtype=torch.float64)).log_prob(xs).exp()
    return 0.5 + float(torch.trapezoid(pdf, xs))


@pytest.mark.parametrize("q,df", [(0.975, 1), (0.975, 2), (0.975, 4), (0.975, 30), (0.99, 4), (0.9972, 4), (0.9972, 1)])
def test_t_quantile_against_torch_student_t(q, df):
    t = cs.t_quantile(q, df)
    assert _t_cdf(t, df) == pytest.approx(q, abs=2e-5)


def test_mean_ci():
    m, sd, half = cs.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (m, sd) == (3.0, pytest.approx(math.sqrt(2.5)))
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-3)
    assert math.isnan(cs.mean_ci([1.0])[2])


def _run(variant, seed, change, phase="final", lr=1e-5):
    quality = {"quality_background_noise": 0.01}
    return {"phase": phase, "variant": variant, "seed": seed, "lr": lr, "budget": 100.0, "draws": 2, "base": 0.5,
            "after": 0.5 + change, "change": change, "iterations": 3, "quality_base": quality, "quality_after": quality,
            "train_change": -change,  # the training-prompt table must read its own column
            "curve": [{"fe": 0.0, "reward": 0.5, "train_reward": 0.3}, {"fe": 100.0, "reward": 0.5 + change}]}


BORDERLINE = [0.01, -0.01, 0.005, -0.005, 0.0]


def test_report_resolves_a_clear_paired_gap_and_not_noise(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    noise = [0.01, -0.02, 0.015, -0.005, 0.0]
    for s, n in enumerate(noise):
        rows = [_run("egrpo", s, 0.1 + n), _run("better", s, 0.15 + n + 0.001 * s), _run("same", s, 0.1 + n + noise[s - 1]),
                _run("borderline", s, 0.1 + n + 0.01 + BORDERLINE[s])]
        rows += [_run("egrpo", 1000 + s, 0.1 + 0.1 * (lr == 1e-5), phase="sweep", lr=lr) for lr in (1e-5, 1e-4)]
        rows += [_run("egrpo", s, 9.0, lr=1e-4)]  # a final run at a lr the (widened) sweep no longer picks
        for r in rows:
            (runs / f"{r['phase']}-{r['variant']}-lr{r['lr']:g}-{r['seed']}.json").write_text(json.dumps(r))
    lines: dict[str, str] = {}
    for line in cs.report(tmp_path, None).splitlines():  # the first table: held-out change and paired verdict
        if line.startswith("| "):
            lines.setdefault(line.split(" | ")[0].strip("| "), line)
    assert lines["better"].rstrip(" |").endswith("yes") and "+0.052" in lines["better"]
    assert lines["same"].rstrip(" |").endswith("no")
    # outside its own 95% interval, but not once the table's 3 comparisons are corrected together
    diffs = [0.01 + b for b in BORDERLINE]
    assert cs.mean_ci(diffs)[2] < 0.01 < cs.mean_ci(diffs, 1 - 0.05 / 3)[2]
    assert lines["borderline"].rstrip(" |").endswith("no")
    training = cs.report(tmp_path, None).split("Training-prompt reward")[1].split("Image quality")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in training.splitlines() if line.startswith("| ")}
    assert "base 0.300" in training and rows["egrpo"].startswith("| egrpo | -0.100 ±")
    assert "| -0.052 ±" in rows["better"] and rows["better"].rstrip(" |").endswith("yes")
    assert rows["same"].rstrip(" |").endswith("no")


def test_best_lr_is_the_best_mean_change():
    sweep = [_run("a", 0, 0.1, "sweep", 1e-5), _run("a", 1, -0.1, "sweep", 1e-5), _run("a", 0, 0.05, "sweep", 3e-5)]
    assert cs.best_lrs(sweep) == {"a": 3e-5}


def test_forward_equivalents():
    assert cs.forward_equivalents({"learner_rows": 10, "recompute_rows": 7}, 100) == 137


@pytest.mark.parametrize("text,match", [("foo=1e-5", "unknown strategy"), ("egrpo=x", "STRATEGY=LR"), ("egrpo", "STRATEGY=LR")])
def test_also_lr_errors(text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        cs.strategy_lr(text)
    assert cs.strategy_lr("egrpo=1e-5") == ("egrpo", 1e-5)
