"""`qwen-fused` command line: one subcommand per module, each exposing `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

from .cli_util import ArgumentParser, HelpFormatter

DESCRIPTION = """\
Qwen-Image and Qwen-Image-Edit with fused q/k/v attention: the same results as diffusers, faster.

  train a LoRA for Qwen-Image-Edit on image pairs   qwen-fused train ...
  edit images, with or without LoRAs                qwen-fused edit ...
  check that fused equals stock on this machine     qwen-fused check
  convert LoRAs and checkpoints between the         qwen-fused convert --input X --output Y --direction D
    standard and merged (to_qkv) layouts
  benchmark fused against stock diffusers           qwen-fused bench --quick

`qwen-fused train --demo` and `qwen-fused edit --demo` try it offline on a tiny random model;
`qwen-fused COMMAND --help` lists a command's options and their defaults.
"""

# subcommand -> module under qwen_fused that defines add_parser(subparsers) and sets `func` on its parser
SUBCOMMANDS = {
    "check": "qwen_fused.check_cli",  # the options without torch; the run: qwen_fused.check
    "convert": "qwen_fused.convert_cli",
    "train": "qwen_fused.train_args",  # the options without torch; the run: qwen_fused.train
    "edit": "qwen_fused.edit",
    "bench": "qwen_fused.bench.cli",
}


def build_parser(only=None) -> argparse.ArgumentParser:
    """The `qwen-fused` parser with `only` that subcommand in full: `qwen-fused train --help` then imports the train
    module alone, whose options need neither torch nor diffusers (seconds saved). Without a subcommand (`--help`, a
    typo, nothing) the others are bare names, and nothing heavy is imported either: DESCRIPTION lists them."""
    parser = ArgumentParser(prog="qwen-fused", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    for name, module in SUBCOMMANDS.items():
        if only in (None, name):
            if only is None:
                sub.add_parser(name)
            else:
                importlib.import_module(module).add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(only).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
