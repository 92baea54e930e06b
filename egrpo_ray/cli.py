"""The one CLI: ``egrpo-ray <command>``. Bad input prints one line and exits with code 2.

Parsing and ``--help`` import no torch, Ray or model code: every command's arguments are declared here and
its handler (``module:function``, returning an exit code) is imported only when the command runs.
``plan`` and ``config`` register themselves from egrpo_ray.cli_plan, which is as light to import.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NamedTuple

from egrpo_ray.config import ConfigError, add_config_args


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: str  # "module:function", imported when the command runs


def _reference_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--iterations", type=int, help="learner steps (default: learner.iterations)")
    p.add_argument("--output-dir", help="where metrics.jsonl and summary.json go")


def _train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    p.add_argument("--output-dir", help="run directory (default: logging.output_dir)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output directory")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (without a terminal there is none: a plain line every logging.log_every steps)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML experiment config (default: the embedded tiny default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set model.path=/models/FLUX.1-dev (repeatable)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR",
                     help="a training checkpoint (its LoRA or transformer export), a run dir (its latest checkpoint), "
                          "or a directory of trainable weights (safetensors)")
    src.add_argument("--lora", metavar="DIR", help="a LoRA in diffusers format (pytorch_lora_weights.safetensors), "
                                                  "e.g. a training run's <output_dir>/lora")
    p.add_argument("--rewards", help="comma-separated reward names (default: the config's rewards)")
    p.add_argument("--reward-path", action="append", default=[], metavar="NAME=PATH",
                   help="checkpoint path of a reward not in the config (repeatable)")
    p.add_argument("--num-prompts", type=int, help="evaluate only the first N held-out prompts")
    p.add_argument("--output-dir", help="where to write eval.json, eval_table.md, eval_grid.png "
                                        "(default: <logging.output_dir>/eval)")
    p.add_argument("--batch-size", type=int,
                   help="prompts sampled per batch (default: as training's held-out scoring, 8)")
    p.add_argument("--draws", type=int, default=1,
                   help="noise draws per prompt; each prompt's score is their mean (default 1)")
    p.add_argument("--seed", type=int, help="noise seed (default: the config's seed)")
    p.add_argument("--device", help="policy device (default: cuda if available, else cpu)")
    p.add_argument("--label", help="row label in the table (default: base / checkpoint / lora name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pretrain_tiny_args(p: argparse.ArgumentParser) -> None:
    # Defaults (None here) live in egrpo_ray/tiny_pretrain.py beside the code they parametrise.
    p.add_argument("--output-dir", help="where model.safetensors and manifest.json go (default: egrpo_ray/assets/tiny)")
    p.add_argument("--seed", type=int, help="seed for init, data and noise (default: the shipped model's, 0)")
    p.add_argument("--steps", type=int,
                   help="optimizer steps (default: the shipped model's, 1400: about 11-12 min on 2 idle cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


COMMANDS: dict[str, Command] = {
    "reference": Command("run the single-process reference loop (no Ray)", _reference_args,
                         "egrpo_ray.reference_loop:run"),
    "train": Command("run E-GRPO as the Ray actor-learner service", _train_args, "egrpo_ray.distributed.driver:run"),
    "serve-rewards": Command("serve the config's reward models over HTTP (127.0.0.1 unless configured)",
                             add_config_args, "egrpo_ray.distributed.reward_service:run_serve"),
    "eval": Command("score a model (base, checkpoint or LoRA) on held-out prompts", _eval_args,
                    "egrpo_ray.evaluate:run"),
    "pretrain-tiny": Command("pre-train the tiny text-to-image model from scratch (CPU, minutes)",
                             _pretrain_tiny_args, "egrpo_ray.tiny_pretrain:run"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _lazy(handler: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        module, _, name = handler.partition(":")
        return getattr(importlib.import_module(module), name)(args)

    run.handler = handler
    return run


def build_parser() -> argparse.ArgumentParser:
    from egrpo_ray import cli_plan

    parser = _Parser(prog="egrpo-ray", description="E-GRPO for flow-matching text-to-image models, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    cli_plan.add_subcommand(sub)
    cli_plan.add_config_subcommand(sub)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(func=_lazy(command.handler))
    return parser


def _preflight_reference(args: argparse.Namespace) -> None:
    """``reference`` reads the model, rewards and prompts and writes ``--output-dir``: check them first."""
    from egrpo_ray.config import load_config
    from egrpo_ray.preflight import check_inputs, check_output_dir

    cfg = load_config(args.config, args.overrides)
    if args.iterations is not None and args.iterations < 1:
        raise ConfigError("--iterations must be >= 1")
    check_inputs(cfg)
    check_output_dir(args.output_dir or cfg.logging.output_dir + "-reference")  # the command's default


def _preflight_serve_rewards(args: argparse.Namespace) -> None:
    from egrpo_ray.config import load_config
    from egrpo_ray.preflight import check_reward

    for i, reward in enumerate(load_config(args.config, args.overrides).rewards):
        check_reward(reward, i)


# Driver-side checks for commands whose handler does not run them itself (``train`` calls
# egrpo_ray.preflight.preflight, ``eval`` checks its inputs in egrpo_ray.evaluate.run).
PREFLIGHT = {"reference": _preflight_reference, "serve-rewards": _preflight_serve_rewards}


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check = PREFLIGHT.get(args.command)
        if check is not None:
            check(args)
        return int(args.func(args) or 0)
    except ConfigError as err:  # every bad input ends here: CheckpointError is one too
        print(f"egrpo-ray: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("egrpo-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
