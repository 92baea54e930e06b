"""``egrpo-ray eval``: score a model (base, checkpoint or LoRA) on held-out prompts with any rewards.

Sampling is the deterministic ODE sampler (egrpo_ray.algo.sampler.sample_ode) over the configured
schedule (steps, shift), from a fixed noise per prompt: prompt i's noise comes from its own generator
seeded with ``seed + i`` (draw k > 0: ``seed + k * DRAW_STRIDE + i``), so a prompt gets the same image
whatever the prompt count, and two models are compared on identical noise. ``score_heldout`` is the one
scoring function: ``egrpo-ray eval``, both training loops' held-out records and the strategy benchmark
use it, so the same weights give the same number everywhere. Outputs in ``output_dir``:

- ``eval.json``: settings, per reward mean / std (population std over prompts) / min / max, and every
  prompt's scores;
- ``eval_table.md``: the paper's table row (HPS, CLIP, PickScore, ImageReward first; "mean ± std");
- ``eval_grid.png``: the first ``grid_max`` images.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from egrpo_ray.algo.sampler import sample_ode
from egrpo_ray.algo.schedule import shifted_sigmas
from egrpo_ray.config import ConfigError, ExperimentConfig, RewardConfig
from egrpo_ray.models.base import Policy, policy_device
from egrpo_ray.training import RewardFn

TABLE_ORDER = ("hps", "clip", "pickscore", "imagereward")
COLUMN_NAMES = {"hps": "HPS", "clip": "CLIP", "pickscore": "PickScore", "imagereward": "ImageReward"}


HELDOUT_BATCH = 8  # prompts per sampling batch, in eval and in training's held-out scoring alike
DRAW_STRIDE = 1_000_003  # noise seed offset between draws (far above any prompt count)


def prompt_noise(latent_shape: Sequence[int], seed: int, start: int, count: int, draw: int = 0) -> torch.Tensor:
    """Noise for prompts start..start+count-1, each from its own generator (batch-size independent);
    ``draw`` k picks the k-th independent noise per prompt (draw 0: seed + i)."""
    base = seed + draw * DRAW_STRIDE + start
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(base + k)) for k in range(count)]
    return torch.stack(rows)


@dataclass
class HeldoutScores:
    """Per reward, each prompt's score averaged over the draws; draw 0's images; their image quality."""

    per_prompt: dict[str, torch.Tensor]  # name -> [P]
    images: torch.Tensor  # [min(P, keep_images), 3, H, W] of draw 0, CPU
    quality: dict[str, float]  # egrpo_ray.quality.image_quality over all of draw 0's images
    sample_seconds: float

    def weighted(self, weights: Mapping[str, float]) -> float:
        """The weighted sum of the rewards, averaged over prompts (training's held-out reward)."""
        return float(sum(weights[k] * v for k, v in self.per_prompt.items()).mean())


@torch.no_grad()
def score_heldout(policy, prompts: Sequence[str], reward_fn: Optional[RewardFn], steps: int, shift: float, seed: int,
                  batch_size: int = HELDOUT_BATCH, draws: int = 1, keep_images: Optional[int] = None,
                  on_batch: Optional[Callable[[int], None]] = None) -> Optional[HeldoutScores]:
    """ODE-sample every prompt ``draws`` times (eval mode, fixed per-prompt noise) and score each batch.

    ``reward_fn`` None only samples (FSDP ranks other than 0 join rank 0's sharded forwards this way)
    and returns None. ``on_batch`` is called with the number of images after each batch (progress).
    """
    from egrpo_ray.quality import image_quality_per_image

    prompts = list(prompts)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    was_training = policy.training
    policy.eval()
    sigmas = shifted_sigmas(steps, shift)
    device = policy_device(policy)
    scores: dict[str, list[list[torch.Tensor]]] = {}
    kept: list[torch.Tensor] = []
    quality: dict[str, list[torch.Tensor]] = {}
    sample_s = 0.0
    keep = len(prompts) if keep_images is None else keep_images
    try:
        for draw in range(draws):
            for a in range(0, len(prompts), batch_size):
                batch = prompts[a : a + batch_size]
                ts = time.perf_counter()
                cond = policy.encode_prompts(batch)
                noise = prompt_noise(policy.latent_shape, seed, a, len(batch), draw).to(device)
                images = policy.decode(sample_ode(policy, cond, noise, sigmas)).float().cpu()
                sample_s += time.perf_counter() - ts
                if reward_fn is not None:
                    for name, v in reward_fn(images, batch).items():
                        v = torch.as_tensor(v).detach().float().cpu().reshape(-1)
                        if len(v) != len(batch):
                            raise ValueError(f"reward {name} returned {len(v)} scores for {len(batch)} images")
                        scores.setdefault(name, [[] for _ in range(draws)])[draw].append(v)
                    if draw == 0:  # image quality (not rewarded) of every draw-0 image
                        for k, q in image_quality_per_image(images).items():
                            quality.setdefault(k, []).append(q.cpu())
                        kept.extend(images[: max(0, keep - len(kept))])
                if on_batch is not None:
                    on_batch(len(batch))
    finally:
        policy.train(was_training)
    if reward_fn is None:
        return None
    per_prompt = {name: torch.stack([torch.cat(d) for d in per_draw]).mean(0) for name, per_draw in scores.items()}
    images = torch.stack(kept) if kept else torch.empty(0)
    return HeldoutScores(per_prompt, images, {k: float(torch.cat(v).mean()) for k, v in quality.items()}, sample_s)


def _reward_fn(rewards: Mapping[str, "object"]) -> RewardFn:
    """eval's reward models (name -> model) as one scoring function."""

    def score(images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {name: reward(images, list(prompts)) for name, reward in rewards.items()}

    return score


def _ordered(names: Sequence[str]) -> list[str]:
    known = [n for n in TABLE_ORDER if n in names]
    return known + [n for n in names if n not in TABLE_ORDER]


def format_table(summary: Mapping[str, Mapping[str, float]], label: str, digits: int = 3) -> str:
    names = _ordered(list(summary))
    header = "| model | " + " | ".join(COLUMN_NAMES.get(n, n) for n in names) + " |"
    rule = "| --- | " + " | ".join("---" for _ in names) + " |"
    cells = [f"{summary[n]['mean']:.{digits}f} ± {summary[n]['std']:.{digits}f}" for n in names]
    return "\n".join([header, rule, f"| {label} | " + " | ".join(cells) + " |"]) + "\n"


def evaluate(
    policy,
    prompts: Sequence[str],
    rewards: Mapping[str, "object"],
    steps: int,
    shift: float,
    seed: int,
    batch_size: int,
    output_dir: str | Path,
    label: str = "model",
    grid_max: int = 64,
    grid_columns: int = 8,
    draws: int = 1,
    on_batch: Optional[Callable[[int], None]] = None,
) -> dict:
    """Sample every prompt ``draws`` times by ODE (``score_heldout``), score with every reward (each
    prompt's score: the mean over draws), write eval.json, eval_table.md and eval_grid.png.
    Returns the eval.json content."""
    from egrpo_ray.outputs import save_grid

    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate: no prompts")
    if not rewards:
        raise ValueError("evaluate: no rewards")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scored = score_heldout(policy, prompts, _reward_fn(rewards), steps, shift, seed, batch_size, draws,
                           keep_images=grid_max, on_batch=on_batch)
    per_reward = scored.per_prompt
    grid = list(scored.images)
    sample_s = scored.sample_seconds
    summary = {
        name: {
            "mean": float(v.mean()),
            "std": float(v.std(unbiased=False)),
            "min": float(v.min()),
            "max": float(v.max()),
        }
        for name, v in per_reward.items()
    }
    result = {
        "label": label,
        "num_prompts": len(prompts),
        "steps": steps,
        "shift": shift,
        "seed": seed,
        "draws": draws,
        "sampler": "ode",
        "seconds": round(time.perf_counter() - t0, 3),
        "sample_seconds": round(sample_s, 3),
        "rewards": summary,
        "quality": scored.quality,  # image checks the rewards do not see (egrpo_ray.quality), draw 0
        "per_prompt": [
            {"prompt": p, **{name: float(per_reward[name][i]) for name in per_reward}} for i, p in enumerate(prompts)
        ],
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    (out_dir / "eval_table.md").write_text(format_table(summary, label))
    save_grid(torch.stack(grid), out_dir / "eval_grid.png", columns=min(grid_columns, len(grid)),
              captions=prompts[: len(grid)])
    return result


# ------------------------------------------------------------------------------------------- CLI


def eval_prompts(cfg) -> list[str]:
    """The whole test file, or the tiny task's held-out prompts exactly as training scores them."""
    from egrpo_ray.prompts import load_prompt_file, prompt_splits

    if cfg.prompts.source == "file":
        if not cfg.prompts.test_path:
            raise ConfigError("prompts.test_path is required for eval when prompts.source is 'file'")
        return load_prompt_file(cfg.prompts.test_path)
    return prompt_splits(cfg.prompts)[1]


def _reward_configs(cfg, names_arg: Optional[str], path_args: Sequence[str]) -> list[RewardConfig]:
    from egrpo_ray.rewards import REWARD_CLASSES

    paths = {}
    for item in path_args:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--reward-path {item!r}: expected NAME=PATH")
        paths[name.strip()] = path.strip()
    configured = {r.name: r for r in cfg.rewards}
    names = [n.strip() for n in names_arg.split(",") if n.strip()] if names_arg else list(configured)
    if not names:
        raise ConfigError("--rewards: no reward names given")
    out = []
    for name in names:
        if name not in REWARD_CLASSES:
            raise ConfigError(f"--rewards: unknown reward {name!r} (known: {', '.join(REWARD_CLASSES)})")
        rc = configured.get(name) or RewardConfig(name=name)
        if name in paths:
            rc = rc.model_copy(update={"path": paths[name]})
        out.append(rc)
    return out


def _resolve_checkpoint(path: str) -> Path:
    p = Path(path)
    if (p / "checkpoints").is_dir():
        from egrpo_ray.checkpoint import latest_checkpoint

        found = latest_checkpoint(p)
        if found is None:
            raise ConfigError(f"--checkpoint {p}: no checkpoint in {p / 'checkpoints'}")
        return found
    if not p.exists():
        raise ConfigError(f"--checkpoint {p}: not found")
    return p


def _check_device(name: Optional[str]) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    return name


def _check_state_file(ckpt: Path) -> None:
    """A directory of trainable weights (or one file): the safetensors file load_state_file reads, complete."""
    from egrpo_ray.checkpoint import CheckpointError, check_safetensors
    from egrpo_ray.models.diffusers_common import TRAINABLE_FILE

    path = ckpt
    if ckpt.is_dir():
        files = [ckpt / TRAINABLE_FILE] if (ckpt / TRAINABLE_FILE).is_file() else sorted(ckpt.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(f"--checkpoint {ckpt}: not a checkpoint (no lora/ or transformer/ export, no "
                              f"{TRAINABLE_FILE}; {len(files)} .safetensors files)")
        path = files[0]
    try:
        check_safetensors(path)
    except CheckpointError as err:
        raise ConfigError(f"--checkpoint: {err}") from None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def run(args: argparse.Namespace) -> int:
    from egrpo_ray.config import load_config
    from egrpo_ray.models import build_policy
    from egrpo_ray.preflight import check_model, check_output_dir, check_reward
    from egrpo_ray.rewards import build_reward

    # Everything is checked before a model is loaded or a file written: one line and exit 2.
    cfg = load_config(args.config, args.overrides)
    prompts = eval_prompts(cfg)
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ConfigError("--num-prompts must be >= 1")
        prompts = prompts[: args.num_prompts]
    batch_size = HELDOUT_BATCH if args.batch_size is None else args.batch_size  # training's held-out batches
    if batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
    if args.draws < 1:
        raise ConfigError("--draws must be >= 1")
    device = _check_device(args.device)
    reward_configs = _reward_configs(cfg, args.rewards, args.reward_path)
    for i, rc in enumerate(reward_configs):
        check_reward(rc, i)
    check_model(cfg.model)
    ckpt = None
    if args.checkpoint:
        from egrpo_ray.checkpoint import check_export, has_export, load_export
        from egrpo_ray.models.diffusers_common import load_state_file

        ckpt = _resolve_checkpoint(args.checkpoint)
        if has_export(ckpt):
            try:
                check_export(ckpt)  # a truncated or corrupt export fails here, not after the model loaded
            except ConfigError as err:
                raise ConfigError(f"--checkpoint: {err}") from None
        else:
            _check_state_file(ckpt)
    elif args.lora:
        from egrpo_ray.checkpoint import check_lora

        if not Path(args.lora).exists():
            raise ConfigError(f"--lora {args.lora}: not found")
        try:
            check_lora(args.lora)  # before the model loads (minutes for FLUX)
        except ConfigError as err:
            raise ConfigError(f"--lora {err}") from None
    output_dir = args.output_dir or str(Path(cfg.logging.output_dir) / "eval")
    check_output_dir(output_dir, "--output-dir")

    rewards = {}
    for rc in reward_configs:
        try:
            rewards[rc.name] = build_reward(rc)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ConfigError(f"reward {rc.name}: {_first_line(err)}") from None
    try:
        policy = build_policy(cfg.model)
    except (FileNotFoundError, OSError, ValueError) as err:
        raise ConfigError(f"model: {_first_line(err)}") from None
    label = args.label or "base"
    if ckpt is not None:
        try:
            if has_export(ckpt):  # a training checkpoint: its LoRA or transformer export
                load_export(policy, ckpt)
            else:  # a save_trainable directory
                policy.load_trainable_state(load_state_file(ckpt))
        except ConfigError:
            raise
        except (FileNotFoundError, KeyError, RuntimeError, ValueError) as err:
            raise ConfigError(f"--checkpoint {ckpt}: {_first_line(err)}") from None
        label = args.label or ckpt.name
    elif args.lora:
        from egrpo_ray.checkpoint import load_lora

        try:
            load_lora(policy, args.lora)
        except ConfigError as err:
            raise ConfigError(f"--lora {_first_line(err)}") from None
        label = args.label or f"lora:{Path(args.lora).name}"
    policy.to(device)
    seed = cfg.seed if args.seed is None else args.seed
    from egrpo_ray.outputs import Progress

    # a bar on a terminal, else a line per ~10% (a FLUX eval takes minutes)
    total = len(prompts) * args.draws
    progress = Progress(total, "eval", "images", every=max(1, total // 10), enabled=not args.no_progress)
    try:
        result = evaluate(policy, prompts, rewards, cfg.sampling.steps, cfg.sampling.shift, seed, batch_size,
                          output_dir, label=label, draws=args.draws, on_batch=progress.update)
    finally:
        progress.close()
    print(format_table(result["rewards"], label), end="")
    print(f"wrote {Path(output_dir) / 'eval.json'}, eval_table.md, eval_grid.png")
    return 0


# Held-out scoring during training (the learner's before/after and periodic grids): score_heldout,
# with the config's schedule and the eval command's batch size, so its numbers are eval's.
@torch.no_grad()
def heldout_images(policy: Policy, prompts: Sequence[str], cfg: ExperimentConfig, seed: int, draws: int = 1) -> None:
    """Run held-out sampling without scoring (FSDP ranks other than 0 join rank 0's sharded forwards)."""
    score_heldout(policy, prompts, None, cfg.sampling.steps, cfg.sampling.shift, seed, draws=draws)


def heldout_scores(policy: Policy, prompts: Sequence[str], reward_fn: RewardFn, cfg: ExperimentConfig, seed: int,
                   draws: int = 1) -> HeldoutScores:
    return score_heldout(policy, prompts, reward_fn, cfg.sampling.steps, cfg.sampling.shift, seed, draws=draws)


def heldout_reward(policy: Policy, prompts: Sequence[str], reward_fn: RewardFn, cfg: ExperimentConfig, seed: int,
                   draws: int = 1) -> tuple[float, torch.Tensor]:
    """Training's held-out reward (the config's weighted reward sum, mean over prompts and draws) and
    draw 0's images."""
    scored = heldout_scores(policy, prompts, reward_fn, cfg, seed, draws)
    return scored.weighted({r.name: r.weight for r in cfg.rewards}), scored.images
