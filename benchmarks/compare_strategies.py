"""Every strategy at equal compute on the tiny task: the evidence behind docs/benchmarks.md.

Compute is counted by the code in forward-equivalents (FE): rollout forwards (what the sampler ran) +
3 x learner rows that ran a forward and backward + no-grad learner forwards (the old-log-prob recompute
and reference-model forwards). Every run trains until it has spent ``--budget`` FE.

Phases (one command runs them in order, skipping runs whose result file exists, so it resumes):
1. sweep:  each strategy at each learning rate of ``--lrs`` (``--sweep-seeds`` seeds), scored on the
           validation prompts (carved from the training prompts, never trained on, never the held-out ones);
           each strategy keeps the lr with the best mean validation change (``--max-noise-growth`` caps the
           drift first; ``--calm-ties`` takes the smallest lr within one standard error of the best).
2. final:  each strategy at its own lr, ``--seeds`` seeds, scored on the held-out prompts at 4 points of the
           budget (curves), each score averaged over ``--draws`` noise draws per prompt; plus the image-quality
           check that is not part of the reward.
3. extras: the step-subset ablation (E-GRPO merging in the first half of the steps vs all of them), any
           ``--suffix`` setting (issue 13: a coarse ODE suffix) and any ``--band`` (E-GRPO branching only in a
           band of the schedule, ``sampling.merge.active_start`` to ``active_fraction``) and any ``--variant``
           of the user's own (a name and config overrides), same seeds. They are
           swept like the strategies and run at their own pick: the suffix takes 2.6x the updates, so E-GRPO's
           lr need not be its best.
Runs are single-threaded processes (torch.set_num_threads(1)), ``--workers`` at a time; with ``--device cuda``
they share one GPU (the tiny model's forwards are tiny: a GPU runs many such processes at once).

    python benchmarks/compare_strategies.py run --out bench --workers 2
    python benchmarks/compare_strategies.py report --out bench --docs-dir docs/benchmarks

``report`` prints (and writes to <out>/report.md) the tables: mean and 95% t-interval of the held-out change per
strategy (at the end and halfway), paired differences against E-GRPO or ``--baseline`` (paired by seed: same
prompts stream and noise; "resolved" only under a Bonferroni correction over the table's comparisons), the
training-prompt reward, quality per strategy (background noise as growth over the base, with paired ratios), the
share of an update that is signal while training (learner.gradient_noise, pooled over seeds), and writes the
reward-vs-compute curves as PNG.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
EVAL_SEED = 424242  # the same evaluation noise for every run: base scores agree, differences are training's
CURVE_POINTS = (0.25, 0.5, 0.75, 1.0)
SWEEP_SEED = 1000  # sweep runs use seeds 1000 and up, final runs 0 and up
TRAIN_PROBE = 24  # training prompts scored beside the held-out ones (prompts.train_probe)

# Each strategy at its own source's settings (docs/algorithm.md section 8); the lr is swept.
STRATEGIES: dict[str, list[str]] = {
    "egrpo": ["algorithm.strategy=egrpo"],
    "egrpo-fixed2": ["algorithm.strategy=egrpo", "sampling.merge.mode=fixed", "sampling.merge.fixed_len=2"],
    "egrpo-fixed4": ["algorithm.strategy=egrpo", "sampling.merge.mode=fixed", "sampling.merge.fixed_len=4"],
    "g2rpo": ["algorithm.strategy=g2rpo"],
    "dancegrpo": ["algorithm.strategy=dancegrpo"],
    "flowgrpo": ["algorithm.strategy=flowgrpo"],
    # the window must travel the schedule within a short run (the source moves it every 25 of 300 iterations)
    "mixgrpo": ["algorithm.strategy=mixgrpo", "algorithm.window_shift_every=3"],
}
ABLATION = {"egrpo-all-steps": ["algorithm.strategy=egrpo", "sampling.merge.active_fraction=1.0"]}
# The benchmarks' reward is the strict product, every attribute right at once (configs/tiny.yaml trains the
# quick start on the graded mean); JPEG runs replace it with --set 'rewards=[{name: jpeg}]'.
STRICT_ALIGNMENT = "rewards=[{name: alignment, combine: product}]"
COMMON = [STRICT_ALIGNMENT, "learner.max_staleness=0", "learner.prompts_per_step=4", "rollout.prompts_per_batch=4"]


@dataclass
class Job:
    phase: str  # sweep | final | extra
    variant: str
    overrides: list[str]
    seed: int
    lr: float
    budget: float
    draws: int
    optimizer_steps: int  # per iteration, the same for every strategy
    device: str = "cpu"
    settings: list[str] = field(default_factory=list)  # --set overrides, every run alike

    @property
    def key(self) -> str:
        return f"{self.phase}-{self.variant}-lr{self.lr:g}-s{self.seed}"


# ------------------------------------------------------------------------------------------------ one run


def forward_equivalents(metrics: dict, rollout_forwards: int) -> float:
    return rollout_forwards + 3 * metrics["learner_rows"] + metrics["recompute_rows"]


def one_iteration(policy, strategy, cursor, reward_fn, cfg, optimizer, rollout_gen, learner_gen, iteration: int,
                  optimizer_steps: int, noise=None, ref_fn=None):
    """Sample and score one batch on-policy, then one update (with the KL to ``ref_fn`` when the config sets
    algorithm.kl_beta); returns (item, metrics, FE spent). On the first iteration it sizes the minibatches so
    that every strategy takes ``optimizer_steps`` optimizer steps."""
    from egrpo_ray.training import learn, sample_and_score

    item = sample_and_score(policy, strategy, cursor.take(cfg.learner.prompts_per_step), reward_fn, rollout_gen,
                            iteration, policy_version=iteration)
    if iteration == 0:
        cfg.learner.minibatch_rows = max(1, math.ceil(len(item.rollout.step_index) / optimizer_steps))
    metrics = learn(policy, policy, [item], cfg, strategy, optimizer, learner_gen, ref_fn, policy_version=iteration,
                    noise=noise)
    return item, metrics, forward_equivalents(metrics, item.rollout.forwards)


def run_job(job: Job) -> dict:
    """Train one (strategy, lr, seed) until the FE budget is spent; score on the phase's prompts."""
    import torch

    torch.set_num_threads(1)
    from egrpo_ray.algo.strategies import build_strategy
    from egrpo_ray.config import load_config
    from egrpo_ray.evaluate import heldout_reward
    from egrpo_ray.models import build_policy
    from egrpo_ray.prompts import PromptCursor, prompt_splits, train_probe, validation_prompts
    from egrpo_ray.quality import image_quality
    from egrpo_ray.rewards import build_reward
    from egrpo_ray.training import make_gradient_noise, make_optimizer, make_reward_fn, reference_model

    cfg = load_config(CONFIG, COMMON + job.settings + job.overrides + [f"seed={job.seed}", f"learner.lr={job.lr}"])
    torch.manual_seed(cfg.seed)
    policy = build_policy(cfg.model).to(job.device)
    ref_fn = reference_model(policy, cfg)  # the KL reference (None unless algorithm.kl_beta > 0): the base weights
    strategy = build_strategy(cfg.sampling, cfg.algorithm)
    reward_fn = make_reward_fn({r.name: build_reward(r) for r in cfg.rewards})
    (train, heldout), validation = prompt_splits(cfg.prompts), validation_prompts(cfg.prompts)
    scored = validation if job.phase == "sweep" else heldout
    probe = train_probe(train, TRAIN_PROBE)  # fixed training prompts: does the run climb its own objective?
    optimizer = make_optimizer(policy, cfg.learner)
    cursor = PromptCursor(train, cfg.seed)
    rollout_gen = torch.Generator().manual_seed(cfg.seed)
    learner_gen = torch.Generator().manual_seed(cfg.seed + 1)
    noise = make_gradient_noise(cfg.learner)  # the share of each update that is signal; it draws no random numbers

    def evaluate() -> dict:
        value, images = heldout_reward(policy, scored, reward_fn, cfg, EVAL_SEED, draws=job.draws)
        train_value, _ = heldout_reward(policy, probe, reward_fn, cfg, EVAL_SEED, draws=job.draws)
        return {"reward": value, "train_reward": train_value, **{f"quality_{k}": v for k, v in image_quality(images).items()}}

    t0, spent, iteration, curve = time.perf_counter(), 0.0, 0, [{"fe": 0.0, **evaluate()}]
    marks = [p * job.budget for p in CURVE_POINTS]
    train_rewards, kls, signal, train_seconds = [], [], [], 0.0
    while spent < job.budget:
        t_iter = time.perf_counter()
        item, metrics, fe = one_iteration(policy, strategy, cursor, reward_fn, cfg, optimizer, rollout_gen, learner_gen,
                                          iteration, job.optimizer_steps, noise, ref_fn)  # every strategy: as many optimizer steps
        train_seconds += time.perf_counter() - t_iter
        signal.append({k: metrics[k] for k in ("grad_step_sq", "grad_signal_sq") if k in metrics})
        if iteration == 0:
            rows = len(item.rollout.step_index)
        spent += fe
        train_rewards.append(metrics["reward_mean"])
        kls.append(metrics["kl"])
        iteration += 1
        while marks and spent >= marks[0]:
            marks.pop(0)
            curve.append({"fe": spent, "iteration": iteration, **evaluate()})
    final, base = curve[-1], curve[0]
    return {**asdict(job), "key": job.key, "iterations": iteration, "fe": spent, "minibatch_rows": cfg.learner.minibatch_rows,
            "rows_per_iteration": rows, "base": base["reward"], "after": final["reward"],
            "change": final["reward"] - base["reward"], "train_change": final["train_reward"] - base["train_reward"],
            "curve": curve, "train_reward_first": train_rewards[0],
            "train_reward_last": sum(train_rewards[-3:]) / len(train_rewards[-3:]),
            "kl_last": sum(kls[-3:]) / len(kls[-3:]),  # the KL to the base model (0 unless kl_beta > 0)
            "quality_base": {k: v for k, v in base.items() if k.startswith("quality_")},
            "quality_after": {k: v for k, v in final.items() if k.startswith("quality_")},
            "gradient_signal": signal, "prompts_per_step": cfg.learner.prompts_per_step,
            "seconds": time.perf_counter() - t0, "train_seconds": train_seconds}


def _run_and_save(args: tuple[Job, Path]) -> str:
    job, out = args
    path = out / "runs" / f"{job.key}.json"
    try:
        result = run_job(job)
    except Exception as err:  # a failed run is reported, not fatal: the others still count
        return f"FAILED {job.key}: {type(err).__name__}: {err}"
    path.write_text(json.dumps(result))
    return (f"{job.key}: change {result['change']:+.4f} in {result['iterations']} it, {result['seconds']:.0f}s "
            f"({result['fe'] / result['train_seconds']:.0f} FE/s training)")


def run_all(jobs: list[Job], out: Path, workers: int) -> list[dict]:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (out / "runs" / f"{j.key}.json").exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already done; running {len(todo)} on {workers} processes", flush=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        for i, line in enumerate(pool.imap_unordered(_run_and_save, [(j, out) for j in todo]), 1):
            print(f"[{i}/{len(todo)}] {line}", flush=True)
    return [json.loads((out / "runs" / f"{j.key}.json").read_text()) for j in jobs if (out / "runs" / f"{j.key}.json").exists()]


def sweep_growth(runs: list[dict]) -> float | None:
    """Background noise after the runs, × the base's (geometric mean); None where a run predates the measure."""
    if not all("quality_after" in r for r in runs):
        return None
    logs = [log_growth(r, r["quality_base"]["quality_background_noise"]) for r in runs]
    return math.exp(sum(logs) / len(logs))


def best_lrs(sweep: list[dict], max_growth: float | None = None, calm_ties: bool = False) -> dict[str, float]:
    """Per variant, the lr with the best mean validation change. A sweep on reward alone cannot see drift, so with
    ``max_growth`` only lrs whose sweep runs' background noise grew at most that many times the base's compete;
    where none does, the least drifting lr is taken (runs without the measure always compete). With ``calm_ties``
    (the one-standard-error rule) the smallest of the competing lrs the sweep cannot tell from the best wins: drift
    grows with the lr, and a few sweep seeds measure it too noisily to rank lrs by it (probe 21)."""
    grids: dict[str, dict[float, list[dict]]] = {}
    for r in sweep:
        grids.setdefault(r["variant"], {}).setdefault(r["lr"], []).append(r)
    picks = {}
    for variant, grid in grids.items():
        rank = {lr: lr_rank(runs, max_growth) for lr, runs in grid.items()}
        best = max(grid, key=rank.get)
        if calm_ties and rank[best][0]:
            best = min([best] + [lr for lr in grid if rank[lr][0] and within_one_se(grid[best], grid[lr])])
        picks[variant] = best
    return picks


def lr_rank(runs: list[dict], max_growth: float | None) -> tuple[bool, float]:
    """(within the drift cap?, mean validation change if so, else minus the noise growth): higher is better."""
    growth = sweep_growth(runs)
    within = max_growth is None or growth is None or growth <= max_growth
    return within, sum(r["change"] for r in runs) / len(runs) if within else -growth


def within_one_se(best: list[dict], other: list[dict]) -> bool:
    """Is ``other``'s mean validation change within one standard error of ``best``'s? Paired by sweep seed (the
    same prompt stream and noise); fewer than two shared seeds give no error to compare with: not a tie."""
    other_by_seed = {r["seed"]: r["change"] for r in other}
    gaps = [r["change"] - other_by_seed[r["seed"]] for r in best if r["seed"] in other_by_seed]
    if len(gaps) < 2:
        return False
    mean, std, _ = mean_ci(gaps)
    return mean <= std / math.sqrt(len(gaps))


def cmd_run(args: argparse.Namespace) -> int:
    from egrpo_ray.config import ConfigError, load_config

    try:  # a bad --set fails here, in one line, not in every worker
        load_config(CONFIG, COMMON + args.settings)
    except ConfigError as err:
        print(f"compare_strategies: --set: {err}".splitlines()[0], file=sys.stderr)
        return 2
    try:
        custom = custom_variants(args.variants, set(extra_variants(args.suffix, args.band)))
    except (ValueError, ConfigError) as err:
        print(f"compare_strategies: --variant: {err}".splitlines()[0], file=sys.stderr)
        return 2
    variants = {k: v for k, v in STRATEGIES.items() if not args.only or k in args.only}
    extras = {**extra_variants(args.suffix, args.band), **custom} if "egrpo" in variants else {}
    unknown = [name for name, _ in args.also_lr if name not in {**STRATEGIES, **extras}]
    if unknown:
        print(f"compare_strategies: --also-lr: unknown variant {unknown[0]!r}; expected a strategy or one of this "
              f"run's extras: {', '.join([*STRATEGIES, *extras])}", file=sys.stderr)
        return 2
    if args.calm_ties and args.sweep_seeds < 2:
        print("compare_strategies: --calm-ties needs --sweep-seeds 2 or more (a standard error over sweep seeds)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = dict(budget=args.budget, draws=args.draws, optimizer_steps=args.optimizer_steps, device=args.device,
                  settings=args.settings)
    swept = run_all(sweep_jobs({**variants, **extras}, args, common), out, args.workers)
    lrs = best_lrs(swept, args.max_growth, args.calm_ties)
    every_sweep = [r for r in load_runs(out) if r["phase"] == "sweep"]  # earlier runs too
    every_pick = best_lrs(every_sweep, args.max_growth, args.calm_ties)
    (out / "chosen_lrs.json").write_text(json.dumps(every_pick, indent=2))
    print("chosen learning rates (validation prompts):", json.dumps(lrs), flush=True)
    run_all(final_jobs(variants, extras, lrs, args, common), out, args.workers)
    return 0


def extra_variants(suffixes: list[tuple[str, int]], bands: list[tuple[float, float]] = ()) -> dict[str, list[str]]:
    """The step-subset ablation, one E-GRPO variant per ``--suffix`` setting (solver, steps) and one per
    ``--band`` (start, end)."""
    extras = dict(ABLATION)
    for solver, steps in suffixes:
        extras[f"egrpo-suffix-{solver}{steps}"] = ["algorithm.strategy=egrpo", f"sampling.suffix.solver={solver}",
                                                  f"sampling.suffix.steps={steps}"]
    for start, end in bands:
        extras[f"egrpo-band{start:g}-{end:g}"] = ["algorithm.strategy=egrpo", f"sampling.merge.active_start={start}",
                                                 f"sampling.merge.active_fraction={end}"]
    return extras


def custom_variants(specs: list[list[str]], taken: set[str] = frozenset()) -> dict[str, list[str]]:
    """``--variant NAME KEY=VALUE ...``: an extra of the user's own, swept and run like the others. The overrides
    are checked here, in one line, not in every worker; ``taken``: the run's other extras' names."""
    from egrpo_ray.config import load_config

    custom = {}
    for name, *overrides in specs:
        if name in STRATEGIES or name in ABLATION or name in taken or name in custom or "@" in name or "/" in name:
            raise ValueError(f"{name!r}: the name is taken or has '@' or '/' in it; pick another")
        if not overrides:
            raise ValueError(f"{name!r}: no overrides given; expected NAME KEY=VALUE [KEY=VALUE ...]")
        load_config(CONFIG, COMMON + overrides)
        custom[name] = overrides
    return custom


def sweep_jobs(variants: dict[str, list[str]], args: argparse.Namespace, common: dict) -> list[Job]:
    return [Job("sweep", name, ov, SWEEP_SEED + s, lr, **common) for name, ov in variants.items() for lr in args.lrs
            for s in range(args.sweep_seeds)]


def final_jobs(variants: dict[str, list[str]], extras: dict[str, list[str]], lrs: dict[str, float],
               args: argparse.Namespace, common: dict) -> list[Job]:
    """Each strategy and extra at its own swept lr; then the ``--also-lr`` runs."""
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    final = [Job("final", name, ov, s, lrs[name], **common) for name, ov in variants.items() if name in lrs for s in seeds]
    final += [Job("extra", name, ov, s, lrs[name], **common) for name, ov in extras.items() if name in lrs for s in seeds]
    for name, lr in args.also_lr:  # a variant again at another lr: how much the one-seed sweep's pick matters
        overrides = {**STRATEGIES, **extras}[name]
        final += [Job("extra", f"{name}@{lr:g}", overrides, s, lr, **common) for s in seeds]
    return final


# ------------------------------------------------------------------------------------------------ report

def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (x >= 0): Simpson's rule on the density."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda u: math.exp(log_norm - (df + 1) / 2 * math.log1p(u * u / df))  # noqa: E731
    h = x / intervals
    odd = sum(density((2 * k - 1) * h) for k in range(1, intervals // 2 + 1))
    even = sum(density(2 * k * h) for k in range(1, intervals // 2))
    return 0.5 + h / 3 * (density(0.0) + 4 * odd + 2 * even + density(x))


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q > 0.5) of Student's t, by bisection on ``t_cdf``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < q:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, sample std, half-width of the two-sided ``level`` t-interval of the mean)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)


def paired_stats(by: dict[str, dict[int, dict]], value, baseline: str = "egrpo"):
    """Per variant: (name, (mean, CI) of ``value(run)``, and against the baseline (mean paired difference, its CI,
    resolved?) or None). Paired by seed.

    The intervals are 95% each. A difference counts as resolved only when it also holds with the table's
    comparisons corrected together (Bonferroni: each at 1 - 0.05 / m), so that a table of m comparisons
    does not call a noise difference resolved one time in 20 per row."""
    ref = by.get(baseline, {})
    compared = [name for name in by if name != baseline and ref]
    family_level = 1 - 0.05 / max(1, len(compared))
    for name, seeds in by.items():
        m, _, ci = mean_ci([value(r) for r in seeds.values()])
        paired = None
        if name in compared:
            diffs = [value(seeds[s]) - value(ref[s]) for s in seeds if s in ref]
            dm, _, dci = mean_ci(diffs)
            paired = dm, dci, abs(dm) > mean_ci(diffs, family_level)[2]
        yield name, (m, ci), paired


def change_cells(by: dict[str, dict[int, dict]], key: str, baseline: str = "egrpo") -> list[tuple[str, str]]:
    """Per strategy: "change ± CI | paired difference to the baseline ± CI | resolved?" table cells."""
    rows = []
    for name, (m, ci), paired in paired_stats(by, lambda r: r[key], baseline):
        cells = f"{paired[0]:+.3f} ± {paired[1]:.3f} | {'yes' if paired[2] else 'no'}" if paired else " | "
        rows.append((name, f"{m:+.3f} ± {ci:.3f} | {cells}"))
    return rows


def load_runs(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def table_order(variant: str) -> tuple[int, str]:
    """The strategies first, in their STRATEGIES order, then the extras by name."""
    order = list(STRATEGIES)
    return (order.index(variant) if variant in order else len(order), variant)


class ReportError(Exception):
    """Nothing to report: no final runs, or no runs of the baseline."""


def baseline_label(baseline: str) -> str:
    return "E-GRPO" if baseline == "egrpo" else baseline


def report(out: Path, docs_dir: Path | None, baseline: str = "egrpo", max_growth: float | None = None,
           calm_ties: bool = False) -> str:
    """The tables (paired differences against ``baseline``, E-GRPO unless asked), report.md and the curves;
    ``max_growth`` and ``calm_ties``: the lr picks' rule, as in ``best_lrs``."""
    every = load_runs(out)
    sweep = [r for r in every if r["phase"] == "sweep"]
    # a widened grid or more sweep seeds may move a pick: report the runs at the current one
    chosen = best_lrs(sweep, max_growth, calm_ties)

    def current(r: dict) -> bool:  # each run at its variant's pick; "name@lr" (--also-lr) at its own lr
        swept = r["variant"] in chosen or r["phase"] != "extra"  # extras of older runs were not swept: E-GRPO's lr
        pick = chosen.get(r["variant"] if swept else "egrpo", r["lr"])
        return r["phase"] != "sweep" and ("@" in r["variant"] or r["lr"] == pick)

    runs = sorted((r for r in every if current(r)), key=lambda r: table_order(r["variant"]))
    by: dict[str, dict[int, dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    if not by:
        raise ReportError(f"no final runs in {out / 'runs'}: `run` makes them (sweep runs alone make no table)")
    if baseline not in by:
        raise ReportError(f"--baseline {baseline}: no such variant in {out}; there are {', '.join(by)}")
    vs = f"vs {baseline_label(baseline)}, paired (95% CI)"
    base_noise = runs[0]["quality_base"]["quality_background_noise"]
    lines = [f"Budget per run: {runs[0]['budget']:.0f} forward-equivalents; held-out score = mean reward over "
             f"the held-out prompts x {runs[0]['draws']} noise draws (ODE, fixed evaluation noise); base "
             f"{runs[0]['base']:.3f}.", f"--set for every run: {' '.join(runs[0].get('settings') or ['none'])}.", ""]
    lines += [f"| strategy | lr | seeds | iterations | held-out after | change (95% CI) | {vs} | resolved? |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, cells in change_cells(by, "change", baseline):
        rs = list(by[name].values())
        after, _, _ = mean_ci([r["after"] for r in rs])
        its = sum(r["iterations"] for r in rs) / len(rs)
        lines.append(f"| {name} | {rs[0]['lr']:g} | {len(rs)} | {its:.0f} | {after:.3f} | {cells} |")
    for r in runs:  # speed: the held-out change halfway through the budget (curve points 0, 25, 50, 75, 100%)
        r["half_change"] = r["curve"][len(r["curve"]) // 2]["reward"] - r["curve"][0]["reward"]
    lines += ["", "Held-out change at half the budget (how fast each climbs):", "",
              f"| strategy | change (95% CI) | {vs} | resolved? |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {cell} |" for name, cell in change_cells(by, "half_change", baseline)]
    if all("train_change" in r for r in runs):
        lines += ["", f"Training-prompt reward (the run's own objective: {TRAIN_PROBE} fixed training prompts x "
                  f"{runs[0]['draws']} draws, ODE, the same noise; base {runs[0]['curve'][0]['train_reward']:.3f}):", "",
                  f"| strategy | change (95% CI) | {vs} | resolved? |", "| --- | --- | --- | --- |"]
        lines += [f"| {name} | {cell} |" for name, cell in change_cells(by, "train_change", baseline)]
    lines += signal_table(by)
    lines += ["", "Image quality after training (not part of the reward; mean over seeds; base in the first row):", ""]
    qkeys = sorted(next(iter(runs))["quality_after"])
    lines += ["| strategy | " + " | ".join(k.removeprefix("quality_") for k in qkeys) + " |",
              "| --- |" + " --- |" * len(qkeys)]
    lines.append("| base | " + " | ".join(f"{runs[0]['quality_base'][k]:.4f}" for k in qkeys) + " |")
    for name, seeds in by.items():
        rs = list(seeds.values())
        lines.append(f"| {name} | " + " | ".join(f"{sum(r['quality_after'][k] for r in rs) / len(rs):.4f}" for k in qkeys) + " |")
    lines += noise_table(by, baseline, base_noise)
    lines += budget_table(by, base_noise)
    if sweep:
        rule = (f"picks only among lrs whose noise grew at most {max_growth:g} ×, else the least drifting"
                if max_growth else "picked on reward alone")
        rule += "; of those within one standard error of the best, the smallest" if calm_ties else ""
        counts = sorted(set(Counter((r["variant"], r["lr"]) for r in sweep).values()))
        seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        lines += ["", f"Learning-rate sweep (mean validation change per lr over {seeds} sweep seed(s), and the "
                  f"background noise after, × the base's; the chosen lr in bold, {rule}):", ""]
        lrs = sorted({r["lr"] for r in sweep})
        lines += ["| strategy | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "| --- |" + " --- |" * len(lrs)]
        for name in sorted({r["variant"] for r in sweep}, key=table_order):
            cells = []
            for lr in lrs:
                runs = [r for r in sweep if r["variant"] == name and r["lr"] == lr]
                growth = sweep_growth(runs) if runs else None
                cell = f"{sum(r['change'] for r in runs) / len(runs):+.3f}" if runs else "-"
                cell += f" ({growth:.1f} ×)" if growth is not None else ""
                cells.append(f"**{cell}**" if lr == chosen.get(name) else cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    if docs_dir is not None:
        plot_curves(by, docs_dir / "reward_vs_compute.png")
        plot_tradeoff(by, base_noise, docs_dir / "reward_vs_noise.png")
    return text


NOISE_FLOOR = 1e-4  # under the smallest non-zero share measured (1/8192): about one pixel of the held-out background


def noise_log_ratio(noise: float, base: float) -> float:
    """log(noise / base), each floored at NOISE_FLOOR: a reward hack to flat images (JPEG) leaves no noise at all."""
    return math.log(max(noise, NOISE_FLOOR) / max(base, NOISE_FLOOR))


def log_growth(run: dict, base: float) -> float:
    """log(background noise after training / the base model's)."""
    return noise_log_ratio(run["quality_after"]["quality_background_noise"], base)


def noise_table(by: dict[str, dict[int, dict]], baseline: str, base: float) -> list[str]:
    """Background noise after training as a multiple of the base model's: it grows by factors and a few seeds
    blow up, so means and paired differences are taken on its logarithm (geometric means, ratios)."""
    def interval(m: float, ci: float, digits: int) -> str:
        return f"{math.exp(m):.{digits}f} × ({math.exp(m - ci):.{digits}f}-{math.exp(m + ci):.{digits}f})"

    rows = []
    for name, (m, ci), paired in paired_stats(by, lambda r: log_growth(r, base), baseline):
        ratio = f"{interval(paired[0], paired[1], 2)} | {'yes' if paired[2] else 'no'}" if paired else " | "
        rows.append(f"| {name} | {interval(m, ci, 1)} | {ratio} |")
    label = baseline_label(baseline)
    return ["", f"Background noise after training, a multiple of the base's {base:.4f} (drift the reward does not "
            f"see; geometric mean over seeds, and the paired ratio to {label}):", "",
            f"| strategy | growth (95% CI) | ratio to {label}, paired (95% CI) | resolved? |", "| --- | --- | --- | --- |",
            *rows]


def noisy_curves(rs: list[dict]) -> bool:
    """Whether every run's curve points carry the background noise (runs before the quality check lack it)."""
    return all("quality_background_noise" in p for r in rs for p in r["curve"])


def budget_path(rs: list[dict], base: float) -> list[tuple[float, float, float]]:
    """(mean FE, mean held-out change, geometric-mean noise growth) at each curve point: what stopping a variant
    earlier, after fewer updates, would have given."""
    path = []
    for i in range(len(rs[0]["curve"])):
        points = [r["curve"][i] for r in rs]
        log_growth_mean = sum(noise_log_ratio(p["quality_background_noise"], base) for p in points) / len(points)
        path.append((sum(p["fe"] for p in points) / len(points),
                     sum(p["reward"] - r["curve"][0]["reward"] for p, r in zip(points, rs)) / len(rs),
                     math.exp(log_growth_mean)))
    return path


def budget_table(by: dict[str, dict[int, dict]], base: float) -> list[str]:
    """Held-out change and noise growth at each curve point (25, 50, ... 100% of the budget), mean over seeds."""
    paths = {name: budget_path(list(seeds.values()), base) for name, seeds in by.items()
             if noisy_curves(list(seeds.values()))}
    if not paths:
        return []
    points = len(next(iter(paths.values()))) - 1  # the first is the base
    head = " | ".join(f"{100 * k // points}% of the budget" for k in range(1, points + 1))
    return ["", "Along the budget: held-out change / background-noise growth (× the base's; geometric mean) at each "
            "curve point, mean over seeds. A variant stopped earlier, after fewer updates, ends where its row stands "
            "then:", "", f"| strategy | {head} |", "| --- |" + " --- |" * points,
            *[f"| {name} | " + " | ".join(f"{change:+.3f} / {growth:.1f} ×" for _, change, growth in path[1:]) + " |"
              for name, path in paths.items()]]


def signal_table(by: dict[str, dict[int, dict]]) -> list[str]:
    """The share of an update that is signal while training (learner.gradient_noise), pairs pooled over seeds;
    strategies whose runs predate the measure are left out."""
    from egrpo_ray.algo.gradient_noise import signal_share

    rows, prompts = [], None
    for name, seeds in by.items():
        rs = list(seeds.values())
        if not all("gradient_signal" in r for r in rs):
            continue
        prompts = rs[0]["prompts_per_step"]
        stats = signal_share([x for r in rs for x in r["gradient_signal"]], prompts)
        if stats is None:
            rows.append(f"| {name} | fewer than 2 | | |")
            continue
        if "noise_scale_prompts" in stats:
            scale = f"{stats['noise_scale_prompts']:.0f} ({stats['noise_scale_low']:.0f}-{stats['noise_scale_high']:.0f})"
        else:
            scale = (f"at least {stats['noise_scale_at_least']:.0f}" if "noise_scale_at_least" in stats
                     else "share below 0: consecutive updates disagree" if stats["share_high"] < 0 else "not resolved")
        rows.append(f"| {name} | {stats['pairs']} | {stats['share']:.1%} ({stats['share_low']:.1%} to "
                    f"{stats['share_high']:.1%}) | {scale} |")
    if not rows:
        return []
    return ["", f"Gradient signal share of an update while training ({prompts} prompts an update; pairs of updates "
            "pooled over seeds; B_noise: the prompts at which an update is half signal):", "",
            "| strategy | pairs | share (95% CI) | B_noise, prompts (95% CI) |", "| --- | --- | --- | --- |", *rows]


def variant_colour(plt, k: int):
    """The k-th variant's colour: distinct for 20 variants, beyond the default cycle's 10 (--also-lr adds some)."""
    return plt.get_cmap("tab20").colors[2 * k % 20 + k // 10 % 2]


def plot_tradeoff(by: dict[str, dict[int, dict]], base_noise: float, path: Path) -> None:
    """Held-out change against background-noise growth at the end, one point per variant with its 95% CIs:
    what a variant gains on the reward and what it costs in drift the reward does not see. A dotted path
    through the curve points (from the base at 1 ×) shows where the variant stood on the way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (name, seeds) in enumerate(by.items()):
        rs = list(seeds.values())
        change, _, change_ci = mean_ci([r["change"] for r in rs])
        log_mean, _, log_ci = mean_ci([log_growth(r, base_noise) for r in rs])
        log_ci = 0.0 if math.isnan(log_ci) else log_ci
        growth = math.exp(log_mean)
        xerr = [[growth - math.exp(log_mean - log_ci)], [math.exp(log_mean + log_ci) - growth]]
        yerr = [0 if math.isnan(change_ci) else change_ci]
        ax.errorbar([growth], [change], xerr=xerr, yerr=yerr, capsize=3, marker="o", color=variant_colour(plt, k))
        if noisy_curves(rs):  # the way there: where the variant stood at each curve point
            _, changes, growths = zip(*budget_path(rs, base_noise))
            ax.plot(growths, changes, ":", marker=".", alpha=0.6, color=variant_colour(plt, k))
        ax.annotate(name, (growth, change), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"background noise after training, x the base's {base_noise:.4f} (geometric mean over seeds)")
    ax.set_ylabel("held-out reward change")
    ax.set_title("What each variant gains, and the drift it costs (mean and 95% CI over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(by: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    for k, (name, seeds) in enumerate(by.items()):
        rs = list(seeds.values())
        points = len(rs[0]["curve"])
        xs = [sum(r["curve"][i]["fe"] for r in rs) / len(rs) for i in range(points)]
        stats = [mean_ci([r["curve"][i]["reward"] for r in rs]) for i in range(points)]
        ys = [m for m, _, _ in stats]
        err = [0 if math.isnan(c) else c for _, _, c in stats]
        ax.errorbar(xs, ys, yerr=err, label=name, capsize=3, marker="o", markersize=3, color=variant_colour(plt, k))
    ax.set_xlabel("forward-equivalents (rollout forwards + 3 x learner rows + recompute forwards)")
    ax.set_ylabel("held-out reward (mean of noise draws)")
    ax.set_title("Held-out reward vs compute, mean and 95% CI over seeds")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        print(report(Path(args.out), Path(args.docs_dir) if args.docs_dir else None, args.baseline, args.max_growth,
                     args.calm_ties))
    except ReportError as err:
        print(f"compare_strategies: {err}", file=sys.stderr)
        return 2
    return 0


CALM_TIES_HELP = ("of the lrs whose mean validation change is within one standard error of the best's (paired over "
                  "sweep seeds: needs --sweep-seeds 2 or more), pick the smallest: drift grows with the lr")
MAX_GROWTH_HELP = ("pick each lr only among those whose sweep runs' background noise grew at most this many times "
                   "the base's (else the least drifting): a sweep on reward alone picks the lr that drifts")


def growth_cap(text: str) -> float:
    try:
        cap = float(text)
    except ValueError:
        cap = 0.0
    if not cap > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive number, e.g. 4 (× the base's noise)")
    return cap


def strategy_lr(text: str) -> tuple[str, float]:
    """NAME=LR; the name is checked in ``cmd_run``, where the run's extras (bands, suffixes, variants) are known."""
    name, _, lr = text.partition("=")
    try:
        return name, float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STRATEGY=LR, e.g. egrpo=1e-5") from None


def first_seed(text: str) -> int:
    """The final runs' first seed: below the sweep's seeds (1000 and up), which final runs should not repeat."""
    if not text.isdigit() or int(text) >= SWEEP_SEED:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number from 0 to {SWEEP_SEED - 1}")
    return int(text)


def band_setting(text: str) -> tuple[float, float]:
    start, _, end = text.partition(":")
    error = argparse.ArgumentTypeError(f"{text!r}: expected START:END fractions of the schedule, "
                                       "0 <= START < END <= 1, e.g. 0.375:0.75")
    try:
        band = float(start), float(end)
    except ValueError:
        raise error from None
    if not 0 <= band[0] < band[1] <= 1:
        raise error
    return band


def suffix_setting(text: str) -> tuple[str, int]:
    solver, _, steps = text.partition(":")
    if not solver or not steps.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected SOLVER:STEPS, e.g. dpm2m:4")
    return solver, int(steps)


def main() -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the sweep, the final runs and the extras (resumable)")
    r.add_argument("--out", required=True)
    r.add_argument("--workers", type=int, default=2, help="single-threaded processes at a time")
    r.add_argument("--budget", type=float, default=60_000, help="forward-equivalents per run")
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--first-seed", type=first_seed, default=0, help="final runs use seeds first-seed .. first-seed + "
                   "seeds - 1: fresh seeds test a hint found on earlier ones")
    r.add_argument("--sweep-seeds", type=int, default=1)
    r.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 3e-5, 1e-4])
    r.add_argument("--draws", type=int, default=4, help="noise draws per held-out prompt")
    r.add_argument("--optimizer-steps", type=int, default=4, help="optimizer steps per iteration, every strategy")
    r.add_argument("--device", default="cpu", help="where each run's policy lives (cuda: processes share the GPU)")
    r.add_argument("--only", nargs="*", help="strategies to run (default: all)")
    r.add_argument("--suffix", nargs="*", default=[], type=suffix_setting, help="extra E-GRPO runs with a coarse ODE suffix, e.g. dpm2m:3")
    r.add_argument("--band", nargs="*", default=[], type=band_setting, help="extra E-GRPO runs that branch only "
                   "in a band of the schedule, e.g. 0.375:0.75")
    r.add_argument("--variant", dest="variants", action="append", nargs="+", default=[], metavar="NAME KEY=VALUE",
                   help="an extra of your own (needs egrpo in --only), swept and run at its pick, e.g. --variant "
                   "band-kl algorithm.strategy=egrpo sampling.merge.active_start=0.375 algorithm.kl_beta=0.04")
    r.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, e.g. prompts.tiny_train_kinds=[single,relation,count]")
    r.add_argument("--max-noise-growth", dest="max_growth", type=growth_cap, help=MAX_GROWTH_HELP)
    r.add_argument("--calm-ties", action="store_true", help=CALM_TIES_HELP)
    r.add_argument("--also-lr", nargs="*", default=[], type=strategy_lr, metavar="STRATEGY=LR",
                   help="extra final runs of a strategy or extra at another lr, e.g. egrpo=1e-5 (reported as "
                   "egrpo@1e-05) or egrpo-band0.375-0.75=5e-6")
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report", help="tables, paired differences and curves from a run's results")
    rep.add_argument("--out", required=True)
    rep.add_argument("--docs-dir", help="where the curve PNG goes")
    rep.add_argument("--baseline", default="egrpo", help="the variant every paired difference is taken against")
    rep.add_argument("--max-noise-growth", dest="max_growth", type=growth_cap, help=MAX_GROWTH_HELP)
    rep.add_argument("--calm-ties", action="store_true", help=CALM_TIES_HELP)
    rep.set_defaults(func=cmd_report)
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
