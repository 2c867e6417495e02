"""`qwen-fused check`: stock diffusers vs fused, side by side, each against a float64 run.

For outputs and gradients it prints max and RMS relative error of fused vs stock, stock vs float64 and
fused vs float64, and exits non-zero if fused is further from float64 than stock is.
"""
from __future__ import annotations

# this module is the command's options, without torch (`--help` answers at once); the run is check.py

# the --dtype names and the torch dtype each means (names here, so that the parser imports no torch)
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def add_parser(sub):
    p = sub.add_parser("check", help="equivalence suite: stock diffusers vs fused, both vs float64",
                       description=__doc__)
    p.add_argument("--device", default=None, help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--no_real_width", action="store_true",
                   help="skip the real-width blocks (Qwen-Image 3072, 2.1 4096 wide; tiny models only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random models and inputs")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .check import run_command

    return run_command(args)
