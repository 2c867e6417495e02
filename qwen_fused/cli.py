"""`qwen-fused` command line: one subcommand per module, each exposing `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module under qwen_fused that defines add_parser(subparsers) and sets `func` on its parser
SUBCOMMANDS = {
    "check": "qwen_fused.check",
    "convert": "qwen_fused.convert_cli",
    "train": "qwen_fused.train",
    "edit": "qwen_fused.edit",
    "bench": "qwen_fused.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-fused", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
