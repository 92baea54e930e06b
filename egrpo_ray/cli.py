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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"egrpo-ray: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("egrpo-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
