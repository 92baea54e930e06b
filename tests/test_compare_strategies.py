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


def _write(root: Path, rows: list[dict]) -> None:
    (root / "runs").mkdir(exist_ok=True)
    for r in rows:
        (root / "runs" / f"{r['phase']}-{r['variant']}-lr{r['lr']:g}-{r['seed']}.json").write_text(json.dumps(r))


def _first_table(text: str) -> dict[str, str]:
    rows: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0].strip("| "), line)
    return rows


def test_report_resolves_a_clear_paired_gap_and_not_noise(tmp_path):
    noise = [0.01, -0.02, 0.015, -0.005, 0.0]
    for s, n in enumerate(noise):
        rows = [_run("egrpo", s, 0.1 + n), _run("better", s, 0.15 + n + 0.001 * s), _run("same", s, 0.1 + n + noise[s - 1]),
                _run("borderline", s, 0.1 + n + 0.01 + BORDERLINE[s])]
        rows += [_run("egrpo", 1000 + s, 0.1 + 0.1 * (lr == 1e-5), phase="sweep", lr=lr) for lr in (1e-5, 1e-4)]
        rows += [_run("egrpo", s, 9.0, lr=1e-4)]  # a final run at a lr the (widened) sweep no longer picks
        _write(tmp_path, rows)
    lines = _first_table(cs.report(tmp_path, None))  # held-out change and paired verdict
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
    against_better = _first_table(cs.report(tmp_path, None, baseline="better"))
    assert "vs better, paired" in against_better["strategy"] and "| -0.052 ±" in against_better["egrpo"]
    assert "Background noise after training" in cs.report(tmp_path, None)
    sweep_row = [l for l in cs.report(tmp_path, None).split("Learning-rate sweep")[1].splitlines() if "| egrpo" in l]
    assert sweep_row == ["| egrpo | **+0.200 (1.0 ×)** | +0.100 (1.0 ×) |"]  # the pick in bold, with its drift
    with pytest.raises(cs.ReportError, match="no such variant"):
        cs.report(tmp_path, None, baseline="nothing")
    with pytest.raises(cs.ReportError, match="no final runs in"):
        cs.report(tmp_path / "empty", None)
    cs.report(tmp_path, tmp_path / "docs")  # the curves, and the reward against the drift
    assert {p.name for p in (tmp_path / "docs").glob("*.png")} == {"reward_vs_compute.png", "reward_vs_noise.png"}


def test_noise_table_takes_geometric_means_and_paired_ratios():
    def run(factor):
        return {"quality_after": {"quality_background_noise": 0.002 * factor}}

    by = {"egrpo": {s: run(2 * f) for s, f in enumerate((1, 2, 1))},  # 2, 4, 2 x the base: geometric mean 2.5 x
          "drifts": {s: run(8 * f) for s, f in enumerate((1, 2, 1))}}  # 4 x E-GRPO's in every seed
    rows = {line.split(" | ")[0].strip("| "): line for line in cs.noise_table(by, "egrpo", 0.002) if line.startswith("| ")}
    assert rows["egrpo"].startswith("| egrpo | 2.5 ×")
    assert "| 4.00 × (4.00-4.00) | yes |" in rows["drifts"]


def test_flat_images_without_noise_count_at_the_floor_and_report(tmp_path):
    def flat(r):  # a reward hack to flat images (JPEG) leaves no background noise at all
        return {**r, "quality_after": {"quality_background_noise": 0.0},
                "curve": [{**p, "quality_background_noise": 0.0} for p in r["curve"]]}

    assert cs.log_growth(flat(_run("a", 0, 0.1)), 0.01) == pytest.approx(math.log(cs.NOISE_FLOOR / 0.01))
    sweep = [flat(_run("egrpo", 1000 + s, 0.1, "sweep", 1e-5)) for s in range(2)] + [_run("egrpo", 1000, 0, "sweep", 3e-5)]
    assert cs.best_lrs(sweep, max_growth=2) == {"egrpo": 1e-5}
    _write(tmp_path, sweep + [flat(_run("egrpo", s, 0.1)) for s in range(2)])
    assert "| egrpo |" in cs.report(tmp_path, None)


def test_best_lr_is_the_best_mean_change():
    sweep = [_run("a", 0, 0.1, "sweep", 1e-5), _run("a", 1, -0.1, "sweep", 1e-5), _run("a", 0, 0.05, "sweep", 3e-5)]
    assert cs.best_lrs(sweep) == {"a": 3e-5}


def test_a_noise_cap_picks_the_best_lr_among_those_that_do_not_drift():
    def swept(lr, change, growth):
        r = _run("a", 0, change, "sweep", lr)
        return {**r, "quality_after": {"quality_background_noise": 0.01 * growth}}  # _run's base noise: 0.01

    sweep = [swept(1e-5, 0.10, 10.0), swept(5e-6, 0.08, 3.0), swept(2.5e-6, 0.05, 1.0)]
    assert cs.best_lrs(sweep) == {"a": 1e-5}  # on reward alone: the lr that drifts 10 x
    assert cs.best_lrs(sweep, max_growth=4) == {"a": 5e-6}
    assert cs.best_lrs(sweep, max_growth=0.5) == {"a": 2.5e-6}  # none within the cap: the least drifting
    old = {k: v for k, v in _run("a", 0, 0.2, "sweep", 4e-5).items() if k != "quality_after"}
    assert cs.best_lrs(sweep + [old], max_growth=4) == {"a": 4e-5}  # no measure: it competes on reward
    assert cs.sweep_growth([swept(1e-5, 0, 2.0), swept(1e-5, 0, 8.0)]) == pytest.approx(4.0)  # geometric mean
    with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
        cs.growth_cap("0")


def test_calm_ties_take_the_smallest_lr_the_sweep_cannot_tell_from_the_best():
    def swept(lr, changes, growth):  # one run per sweep seed
        return [{**_run("a", 1000 + s, c, "sweep", lr), "quality_after": {"quality_background_noise": 0.01 * growth}}
                for s, c in enumerate(changes)]

    drifts = swept(1e-5, [0.10, 0.06, 0.09], 3.0)  # the best mean: 0.083
    calm = swept(5e-6, [0.08, 0.07, 0.08], 1.3)  # gaps 0.02, -0.01, 0.01: mean 0.0067 within its error 0.0088
    slow = swept(2.5e-6, [0.02, 0.01, 0.03], 1.0)  # gaps 0.08, 0.05, 0.06: clearly behind
    sweep = drifts + calm + slow
    assert cs.best_lrs(sweep) == {"a": 1e-5}
    assert cs.best_lrs(sweep, calm_ties=True) == {"a": 5e-6}
    assert cs.best_lrs(drifts + slow, calm_ties=True) == {"a": 1e-5}
    assert cs.best_lrs(sweep, max_growth=1.2, calm_ties=True) == {"a": 2.5e-6}  # the cap first: 5e-6 is out
    assert cs.best_lrs(drifts[:1] + calm[:1], calm_ties=True) == {"a": 1e-5}  # one seed: no error, no tie
    quiet = swept(2e-5, [0.12, 0.05, 0.10], 1.1)  # the best, tied with 1e-5, drifts less on the sweep
    assert cs.best_lrs(drifts + quiet) == {"a": 2e-5}
    assert cs.best_lrs(drifts + quiet, calm_ties=True) == {"a": 1e-5}  # the smaller lr, not the sweep's calmer one


def test_calm_ties_without_sweep_seeds_is_one_line_and_runs_nothing(tmp_path, capsys):
    args = argparse.Namespace(settings=[], variants=[], suffix=[], band=[], only=None, also_lr=[], calm_ties=True,
                              sweep_seeds=1, out=str(tmp_path / "out"))
    assert cs.cmd_run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_strategies: --calm-ties needs --sweep-seeds 2") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_forward_equivalents():
    assert cs.forward_equivalents({"learner_rows": 10, "recompute_rows": 7}, 100) == 137


@pytest.mark.parametrize("text", ["egrpo=x", "egrpo"])
def test_also_lr_errors(text):
    with pytest.raises(argparse.ArgumentTypeError, match="STRATEGY=LR"):
        cs.strategy_lr(text)
    assert cs.strategy_lr("egrpo-band0.375-0.75=5e-6") == ("egrpo-band0.375-0.75", 5e-6)


@pytest.mark.parametrize("also_lr,band,only", [("foo", [], None),
                                               ("egrpo-band0.375-0.75", [], None),  # no such band in the run
                                               ("egrpo-band0.375-0.75", ["0.375:0.75"], ["g2rpo"])])  # needs egrpo
def test_also_lr_of_an_unknown_variant_is_one_line_and_runs_nothing(tmp_path, capsys, also_lr, band, only):
    args = argparse.Namespace(settings=[], variants=[], suffix=[], band=[cs.band_setting(b) for b in band], only=only,
                              also_lr=[(also_lr, 5e-6)], out=str(tmp_path / "out"))
    assert cs.cmd_run(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"compare_strategies: --also-lr: unknown variant {also_lr!r}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_extras_are_swept_and_run_at_their_own_lr():
    args = argparse.Namespace(lrs=[1e-5, 1e-4], sweep_seeds=1, seeds=2, first_seed=0,
                              also_lr=[("egrpo", 3e-5), ("egrpo-band0.375-0.75", 5e-6)])
    common = dict(budget=100.0, draws=1, optimizer_steps=4)
    variants = {"egrpo": cs.STRATEGIES["egrpo"]}
    extras = cs.extra_variants([cs.suffix_setting("dpm2m:4")], [cs.band_setting("0.375:0.75")])
    assert extras["egrpo-suffix-dpm2m4"][1:] == ["sampling.suffix.solver=dpm2m", "sampling.suffix.steps=4"]
    assert extras["egrpo-band0.375-0.75"][1:] == ["sampling.merge.active_start=0.375",
                                                  "sampling.merge.active_fraction=0.75"]
    swept = {(j.variant, j.lr) for j in cs.sweep_jobs({**variants, **extras}, args, common)}
    assert swept == {(v, lr) for v in ("egrpo", "egrpo-all-steps", "egrpo-suffix-dpm2m4", "egrpo-band0.375-0.75")
                     for lr in (1e-5, 1e-4)}
    lrs = {"egrpo": 1e-4, "egrpo-all-steps": 1e-5, "egrpo-suffix-dpm2m4": 1e-5, "egrpo-band0.375-0.75": 3e-4}
    final = {(j.phase, j.variant, j.lr, j.seed) for j in cs.final_jobs(variants, extras, lrs, args, common)}
    assert final == {(phase, v, lr, s) for phase, v, lr in [("final", "egrpo", 1e-4), ("extra", "egrpo-all-steps", 1e-5),
                                                           ("extra", "egrpo-suffix-dpm2m4", 1e-5),
                                                           ("extra", "egrpo-band0.375-0.75", 3e-4),
                                                           ("extra", "egrpo@3e-05", 3e-5),
                                                           ("extra", "egrpo-band0.375-0.75@5e-06", 5e-6)] for s in (0, 1)}
    band_at_5e6 = [j for j in cs.final_jobs(variants, extras, lrs, args, common) if j.variant.endswith("@5e-06")]
    assert band_at_5e6[0].overrides == extras["egrpo-band0.375-0.75"]  # the band's settings, at the other lr
    args.first_seed = 10  # fresh seeds: the same jobs on seeds 10 and 11
    assert {j.seed for j in cs.final_jobs(variants, extras, lrs, args, common)} == {10, 11}


def test_a_kl_run_trains_against_the_base_and_counts_its_forwards():
    """algorithm.kl_beta > 0 builds the reference; its forwards are FE (learner rows once more)."""
    import torch

    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import load_config
    from egrpo_ray.models import build_policy
    from egrpo_ray.prompts import PromptCursor, prompt_splits
    from egrpo_ray.rewards import build_reward
    from egrpo_ray.training import make_optimizer, make_reward_fn, reference_model

    def two_iterations(kl_beta):
        cfg = load_config(cs.CONFIG, cs.COMMON + ["learner.prompts_per_step=1", "rollout.prompts_per_batch=1", "algorithm.group_size=4",
                                                  f"algorithm.kl_beta={kl_beta}", "learner.lr=1e-4"])
        torch.manual_seed(0)
        policy = build_policy(cfg.model)
        strategy, ref_fn = build_strategy(cfg.sampling, cfg.algorithm), reference_model(policy, cfg)
        reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
        cursor, optimizer = PromptCursor(prompt_splits(cfg.prompts)[0], 0), make_optimizer(policy, cfg.learner)
        gens = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        return [cs.one_iteration(policy, strategy, cursor, reward_fn, cfg, optimizer, *gens, i, 2, ref_fn=ref_fn)[1:]
                for i in range(2)]

    (plain, fe_plain), _ = two_iterations(0.0)
    (first, fe_first), (second, _) = two_iterations(0.5)
    assert fe_first - fe_plain == first["learner_rows"] > 0  # the same rollout, plus one reference forward a row
    assert plain["kl"] == 0.0 and second["kl"] > 0


def test_custom_variants_are_checked_and_kept():
    spec = ["band-kl", "sampling.merge.active_start=0.375", "algorithm.kl_beta=0.04"]
    assert cs.custom_variants([spec]) == {"band-kl": spec[1:]}
    from egrpo_ray.config import ConfigError

    for bad, error in [(["egrpo", "algorithm.kl_beta=0.04"], ValueError), (["x"], ValueError),
                       (["x@1", "algorithm.kl_beta=0.04"], ValueError), (["x", "algorithm.kl_beta=-1"], ConfigError),
                       (["x", "algorithm.no_such_key=1"], ConfigError)]:
        with pytest.raises(error):
            cs.custom_variants([bad])
    with pytest.raises(ValueError, match="taken"):
        cs.custom_variants([spec, spec])
    with pytest.raises(ValueError, match="taken"):  # a --band extra's name
        cs.custom_variants([["egrpo-band0.375-0.75", "algorithm.kl_beta=0.04"]], {"egrpo-band0.375-0.75"})


@pytest.mark.parametrize("text", ["-1", "1000", "x"])
def test_first_seed_errors(text):
    with pytest.raises(argparse.ArgumentTypeError):
        cs.first_seed(text)


def test_report_takes_each_extra_at_its_own_pick_and_older_ones_at_egrpos(tmp_path):
    sweep = [_run("egrpo", 1000, 0.1 * (lr == 1e-4), phase="sweep", lr=lr) for lr in (1e-5, 1e-4)]
    extras = [_run("egrpo-all-steps", s, change, phase="extra", lr=lr) for s in range(3)
              for lr, change in ((1e-5, 0.2), (1e-4, -0.2))]
    egrpo = [_run("egrpo", s, 0.0, lr=1e-4) for s in range(3)]
    _write(tmp_path, sweep + extras + egrpo)  # an older directory: the ablation was not swept, it ran at E-GRPO's lr
    assert "| -0.200 ±" in _first_table(cs.report(tmp_path, None))["egrpo-all-steps"]
    _write(tmp_path, [_run("egrpo-all-steps", 1000, 0.1 * (lr == 1e-5), phase="sweep", lr=lr) for lr in (1e-5, 1e-4)])
    row = _first_table(cs.report(tmp_path, None))["egrpo-all-steps"]
    assert row.startswith("| egrpo-all-steps | 1e-05 |") and "| +0.200 ±" in row


@pytest.mark.parametrize("text", ["0.5", "0.5:0.5", "0.6:0.4", "x:0.5", "0:1.5"])
def test_band_errors(text):
    with pytest.raises(argparse.ArgumentTypeError, match="START:END"):
        cs.band_setting(text)


@pytest.mark.parametrize("text", ["dpm2m", "dpm2m:", ":4", "dpm2m:x"])
def test_suffix_errors(text):
    with pytest.raises(argparse.ArgumentTypeError, match="SOLVER:STEPS"):
        cs.suffix_setting(text)


def test_report_pools_each_strategys_gradient_signal_over_seeds(tmp_path):
    from egrpo_ray.algo.gradient_noise import signal_share

    def records(seed):  # 3 pairs of updates a seed
        return [x for k in range(3) for x in ({"grad_step_sq": 1.0 + k}, {"grad_signal_sq": 0.1 * (seed + k)})]

    rows = [{**_run("egrpo", s, 0.0), "gradient_signal": records(s), "prompts_per_step": 4} for s in range(2)]
    _write(tmp_path, rows + [_run("older", s, 0.0) for s in range(2)])  # runs from before the measure
    table = cs.report(tmp_path, None).split("Gradient signal share")[1].split("Image quality")[0]
    pooled = signal_share(records(0) + records(1), 4)
    assert pooled["pairs"] == 6 and "4 prompts an update" in table
    assert f"| egrpo | 6 | {pooled['share']:.1%} ({pooled['share_low']:.1%} to {pooled['share_high']:.1%}) |" in table
    assert "older" not in table


def test_budget_table_gives_change_and_geometric_noise_growth_at_each_curve_point():
    def run(seed, growths, changes):  # a 3-point curve: the base, half the budget, the end
        curve = [{"fe": fe, "reward": 0.5 + c, "quality_background_noise": 0.002 * g}
                 for fe, c, g in zip((0.0, 50.0, 100.0), (0.0, *changes), (1.0, *growths))]
        return {"curve": curve}

    by = {"band": {0: run(0, (2, 8), (0.1, 0.2)), 1: run(1, (8, 32), (0.3, 0.2))},  # geometric means 4 x, 16 x
          "old": {0: {"curve": [{"fe": 0.0, "reward": 0.5}, {"fe": 100.0, "reward": 0.6}]}}}  # no noise: left out
    path = cs.budget_path(list(by["band"].values()), 0.002)
    assert [pytest.approx(point) for point in path] == [(0, 0, 1), (50, 0.2, 4), (100, 0.2, 16)]
    table = cs.budget_table(by, 0.002)
    assert "| strategy | 50% of the budget | 100% of the budget |" in table
    assert "| band | +0.200 / 4.0 × | +0.200 / 16.0 × |" in table and not any(r.startswith("| old") for r in table)
    assert cs.budget_table({"old": by["old"]}, 0.002) == []
