"""What did a run change on the alignment reward? Held-out scores under both combinations, term by term.

For the base model and each run directory given (its latest checkpoint's export), samples the config's held-out
prompts x ``--draws`` by ODE with the same fixed noise as ``egrpo-ray eval`` (seed 0), and prints one row each:
the graded mean, the strict product, every term of the reward (egrpo_ray/rewards/alignment.py), and the bright
area in px, which the reward does not see (extra or grown objects raise it), beside the ground truth's area for
the same prompts. With more than one run, the last row is the mean change from the base with a 95% t interval
over the runs (for seeds of one setting). ``--json`` writes the rows. Single-threaded; docs/benchmarks.md
section 1 (probe 12) quotes its figures.

    OMP_NUM_THREADS=1 python benchmarks/alignment_terms.py runs/seed0 runs/seed1 runs/seed2 --draws 4
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.compare_strategies import mean_ci  # noqa: E402

TERMS = ("colour", "shape", "size", "aspect", "relation", "count", "presence")


def score(policy, prompts, sampling, draws: int) -> dict[str, float]:
    """Both combinations, each term and the bright area over prompts x draws (eval's fixed noise)."""
    from egrpo_ray.evaluate import score_heldout
    from egrpo_ray.rewards.alignment import AlignmentReward, object_stats

    strict, graded = AlignmentReward(), AlignmentReward(combine="mean")
    sums: dict[str, float] = {}

    def add_batch(images, batch_prompts):
        terms = strict.terms(images, batch_prompts)
        batch = {"mean": graded(images, batch_prompts), "product": terms["reward"], **{t: terms[t] for t in TERMS},
                 "area_px": object_stats(images)["area"]}
        for key, values in batch.items():
            sums[key] = sums.get(key, 0.0) + values.float().sum().item()
        return {"alignment": terms["reward"]}

    score_heldout(policy, prompts, add_batch, sampling.steps, sampling.shift, seed=0, draws=draws)
    return {key: total / (len(prompts) * draws) for key, total in sums.items()}


def change_row(base: dict[str, float], rows: list[dict[str, float]]) -> dict[str, str]:
    """Mean change from the base over the runs, with a 95% t interval."""
    out = {}
    for key in base:
        mean, _, half_width = mean_ci([r[key] - base[key] for r in rows])
        out[key] = f"{mean:+.3f} ± {half_width:.3f}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run directories (each scored at its latest checkpoint)")
    p.add_argument("--config", help="experiment config (default: the embedded tiny config)")
    p.add_argument("--draws", type=int, default=4, help="noise draws per held-out prompt")
    p.add_argument("--num-prompts", type=int, help="only the first N held-out prompts")
    p.add_argument("--json", metavar="PATH", help="write the rows here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from egrpo_ray.checkpoint import latest_checkpoint, load_export
    from egrpo_ray.config import load_config
    from egrpo_ray.evaluate import eval_prompts
    from egrpo_ray.models import build_policy
    from egrpo_ray.rewards.alignment import object_stats
    from egrpo_ray.tasks.scenes import render_scenes

    cfg = load_config(args.config)
    prompts = eval_prompts(cfg)[: args.num_prompts]
    checkpoints = {}
    for run in args.runs:
        found = latest_checkpoint(Path(run))
        if found is None:
            print(f"alignment_terms: {run}: no checkpoint", file=sys.stderr)
            return 2
        checkpoints[run] = found
    truth = render_scenes(prompts * args.draws, torch.Generator().manual_seed(0))
    print(f"{len(prompts)} held-out prompts x {args.draws} draws; ground-truth bright area "
          f"{object_stats(truth)['area'].float().mean().item():.1f} px")
    rows = {}
    for name, checkpoint in {"base": None, **checkpoints}.items():
        policy = build_policy(cfg.model)
        if checkpoint is not None:
            load_export(policy, checkpoint)
        rows[name] = score(policy, prompts, cfg.sampling, args.draws)
    keys = list(rows["base"])
    print("| run | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 1))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    if len(checkpoints) > 1:
        change = change_row(rows["base"], [rows[r] for r in checkpoints])
        print("| change (95% CI) | " + " | ".join(change[k] for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
