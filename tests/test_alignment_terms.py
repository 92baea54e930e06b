"""benchmarks/alignment_terms.py: both combinations and every term on eval's fixed noise, and the change row."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "alignment_terms.py"
spec = importlib.util.spec_from_file_location("alignment_terms", SCRIPT)
terms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(terms)


def test_base_row_matches_the_eval_command(capsys, tmp_path):
    assert terms.main(["--num-prompts", "3", "--draws", "1", "--json", str(tmp_path / "rows.json")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"3 held-out prompts x 1 draws; ground-truth bright area [0-9.]+ px", out)
    header, _, base = out.splitlines()[1:4]
    assert header.split(" | ")[1:3] == ["mean", "product"] and base.startswith("| base |")
    values = [float(v) for v in base.strip(" |").split(" | ")[1:]]
    assert 0 <= values[1] <= values[0] <= 1  # the strict product never exceeds the graded mean

    from egrpo_ray.config import load_config
    from egrpo_ray.evaluate import eval_prompts, heldout_reward
    from egrpo_ray.models import build_policy
    from egrpo_ray.rewards.alignment import AlignmentReward
    from egrpo_ray.training import make_reward_fn

    cfg = load_config(None, ["rewards=[{name: alignment}]"])  # the strict product alone
    strict = make_reward_fn({"alignment": AlignmentReward()})
    expected, _ = heldout_reward(build_policy(cfg.model), eval_prompts(cfg)[:3], strict, cfg, seed=0)
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rows["base"]["product"] == pytest.approx(expected, abs=1e-6)  # the noise of training's held-out and eval


def test_change_row_is_the_mean_change_with_a_t_interval():
    base = {"mean": 0.4}
    row = terms.change_row(base, [{"mean": 0.5}, {"mean": 0.6}, {"mean": 0.7}])
    assert row["mean"] == f"+0.200 ± {4.30 * 0.1 / 3 ** 0.5:.3f}"


def test_a_run_without_checkpoints_is_a_one_line_error(capsys, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert terms.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"alignment_terms: {tmp_path}: no checkpoint"
