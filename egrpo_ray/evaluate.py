"""``egrpo-ray eval``: score a model (base, checkpoint or LoRA) on held-out prompts with any rewards.

Sampling is the deterministic ODE sampler (egrpo_ray.algo.sampler.sample_ode) over the configured
schedule (steps, shift), from a fixed noise per prompt: prompt i's noise comes from its own generator
seeded with ``seed + i``, so a prompt gets the same image whatever the batch size or prompt count, and
two models are compared on identical noise. Outputs in ``output_dir``:

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
from typing import Mapping, Optional, Sequence

import torch

from egrpo_ray.algo.sampler import sample_ode
from egrpo_ray.algo.schedule import shifted_sigmas
from egrpo_ray.config import ConfigError, ExperimentConfig, RewardConfig
from egrpo_ray.models.base import Policy, policy_device
from egrpo_ray.training import RewardFn

TABLE_ORDER = ("hps", "clip", "pickscore", "imagereward")
COLUMN_NAMES = {"hps": "HPS", "clip": "CLIP", "pickscore": "PickScore", "imagereward": "ImageReward"}


def prompt_noise(latent_shape: Sequence[int], seed: int, start: int, count: int) -> torch.Tensor:
    """Noise for prompts start..start+count-1, each from its own generator (batch-size independent)."""
    rows = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(seed + start + k)) for k in range(count)]
    return torch.stack(rows)


def _ordered(names: Sequence[str]) -> list[str]:
    known = [n for n in TABLE_ORDER if n in names]
    return known + [n for n in names if n not in TABLE_ORDER]


def format_table(summary: Mapping[str, Mapping[str, float]], label: str, digits: int = 3) -> str:
    names = _ordered(list(summary))
    header = "| model | " + " | ".join(COLUMN_NAMES.get(n, n) for n in names) + " |"
    rule = "| --- | " + " | ".join("---" for _ in names) + " |"
    cells = [f"{summary[n]['mean']:.{digits}f} ± {summary[n]['std']:.{digits}f}" for n in names]
    return "\n".join([header, rule, f"| {label} | " + " | ".join(cells) + " |"]) + "\n"


@torch.no_grad()
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
) -> dict:
    """Sample every prompt once by ODE, score with every reward, write eval.json, eval_table.md and
    eval_grid.png. Returns the eval.json content."""
    from egrpo_ray.outputs import save_grid

    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate: no prompts")
    if not rewards:
        raise ValueError("evaluate: no rewards")
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = policy.training
    policy.eval()
    sigmas = shifted_sigmas(steps, shift)
    device = next(iter(policy.parameters()), torch.empty(0)).device
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    grid: list[torch.Tensor] = []
    t0 = time.perf_counter()
    sample_s = 0.0
    try:
        for a in range(0, len(prompts), batch_size):
            batch = prompts[a : a + batch_size]
            ts = time.perf_counter()
            cond = policy.encode_prompts(batch)
            noise = prompt_noise(policy.latent_shape, seed, a, len(batch)).to(device)
            latents = sample_ode(policy, cond, noise, sigmas)
            images = policy.decode(latents).float()
            sample_s += time.perf_counter() - ts
            for name, reward in rewards.items():
                s = torch.as_tensor(reward(images, batch)).detach().float().cpu().reshape(-1)
                if len(s) != len(batch):
                    raise ValueError(f"reward {name} returned {len(s)} scores for {len(batch)} images")
                scores[name].append(s)
            if len(grid) < grid_max:
                grid.extend(images[: grid_max - len(grid)].cpu())
    finally:
        policy.train(was_training)
    per_reward = {name: torch.cat(v) for name, v in scores.items()}
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
        "sampler": "ode",
        "seconds": round(time.perf_counter() - t0, 3),
        "sample_seconds": round(sample_s, 3),
        "rewards": summary,
        "per_prompt": [
            {"prompt": p, **{name: float(per_reward[name][i]) for name in per_reward}} for i, p in enumerate(prompts)
        ],
    }
    (out_dir / "eval.json").write_text(json.dumps(result, indent=1))
    (out_dir / "eval_table.md").write_text(format_table(summary, label))
    save_grid(torch.stack(grid), out_dir / "eval_grid.png", columns=min(grid_columns, len(grid)))
    return result


# ------------------------------------------------------------------------------------------- CLI


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a model (base, checkpoint or LoRA) on held-out prompts")
    p.add_argument("--config", help="YAML experiment config (default: the embedded tiny default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.path=/models/FLUX.1-dev (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a training checkpoint (its LoRA or transformer export), a run dir (its latest checkpoint), "
                          "or a directory of trainable weights (safetensors)")
    src.add_argument("--lora", metavar="DIR", help="a LoRA in diffusers format (pytorch_lora_weights.safetensors)")
    p.add_argument("--rewards", help="comma-separated reward names (default: the config's rewards)")
    p.add_argument("--reward-path", action="append", default=[], metavar="NAME=PATH",
                   help="checkpoint path of a reward not in the config (repeatable)")
    p.add_argument("--num-prompts", type=int, help="evaluate only the first N held-out prompts")
    p.add_argument("--output-dir", help="where to write eval.json, eval_table.md, eval_grid.png "
                                        "(default: <logging.output_dir>/eval)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts sampled per batch (default 8)")
    p.add_argument("--seed", type=int, help="noise seed (default: the config's seed)")
    p.add_argument("--device", help="policy device (default: cuda if available, else cpu)")
    p.add_argument("--label", help="row label in the table (default: base / checkpoint / lora name)")
    p.set_defaults(func=run)


def eval_prompts(cfg) -> list[str]:
    if cfg.prompts.source == "file":
        from egrpo_ray.prompts import load_prompt_file

        if not cfg.prompts.test_path:
            raise ConfigError("prompts.test_path is required for eval when prompts.source is 'file'")
        return load_prompt_file(cfg.prompts.test_path)
    from egrpo_ray.tasks.shapes import heldout_prompts

    return list(heldout_prompts())


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
    if args.batch_size < 1:
        raise ConfigError("--batch-size must be >= 1")
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
    elif args.lora and not Path(args.lora).exists():
        raise ConfigError(f"--lora {args.lora}: not found")
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
        if not hasattr(policy, "load_lora"):
            raise ConfigError(f"--lora: model.kind '{cfg.model.kind}' has no LoRA support")
        try:
            policy.load_lora(args.lora)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise ConfigError(f"--lora {args.lora}: {_first_line(err)}") from None
        label = args.label or f"lora:{Path(args.lora).name}"
    policy.to(device)
    seed = cfg.seed if args.seed is None else args.seed
    result = evaluate(policy, prompts, rewards, cfg.sampling.steps, cfg.sampling.shift, seed, args.batch_size,
                      output_dir, label=label)
    print(format_table(result["rewards"], label), end="")
    print(f"wrote {Path(output_dir) / 'eval.json'}, eval_table.md, eval_grid.png")
    return 0


# Held-out scoring during training (the learner's before/after and periodic grids).
@torch.no_grad()
def heldout_images(policy: Policy, prompts: Sequence[str], cfg: ExperimentConfig, seed: int, max_batch: int = 64) -> torch.Tensor:
    """Deterministic ODE samples of fixed prompts from a fixed noise seed (comparable across runs)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=g).to(policy_device(policy))
    cond = policy.encode_prompts(prompts)
    latents = sample_ode(policy, cond, noise, shifted_sigmas(cfg.sampling.steps, cfg.sampling.shift), max_batch)
    return policy.decode(latents).cpu()


def heldout_reward(policy: Policy, prompts: Sequence[str], reward_fn: RewardFn, cfg: ExperimentConfig, seed: int) -> tuple[float, torch.Tensor]:
    images = heldout_images(policy, prompts, cfg, seed)
    scores = reward_fn(images, prompts)
    weights = {r.name: r.weight for r in cfg.rewards}
    return float(sum(weights[k] * v for k, v in scores.items()).mean()), images
