"""The one CLI: ``egrpo-ray <command>``. Bad input prints one line and exits with code 2."""
from __future__ import annotations

import argparse
import importlib
import sys

from egrpo_ray.config import ConfigError

# Modules that register a subcommand with ``add_subcommand(subparsers)``; handlers return an exit code.
COMMAND_MODULES = [
    "egrpo_ray.cli_plan",
    "egrpo_ray.reference_loop",
    "egrpo_ray.distributed.driver",
    "egrpo_ray.distributed.reward_service",
    "egrpo_ray.evaluate",
    "egrpo_ray.tiny_pretrain",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="egrpo-ray", description="E-GRPO for flow-matching text-to-image models, on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_subcommand(sub)
    importlib.import_module("egrpo_ray.cli_plan").add_config_subcommand(sub)
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
