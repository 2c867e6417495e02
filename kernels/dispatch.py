"""Which Triton forward runs a call, `fused` or `gemm`, from measured choices committed per GPU.

    kernels/tuning/<gpu-slug>.json      (installed as package data; QWEN_FUSED_TUNING_DIR overrides the folder)
    {"gpu": "NVIDIA H200",
     "tuned": {...free-form provenance: torch, triton, date, shape...},
     "choices": [{"dtype": "bfloat16", "rank": 0, "rows": 8192, "impl": "gemm", "ms": {"fused": 1.07, "gemm": 0.85},
                  "rounds_ms": {"fused": [1.07, 1.06, ...], "gemm": [0.85, 0.86, ...]}},
                 ...]}
    (`ms` and `rounds_ms`, the tuning's medians, are provenance: only dtype, rank, rows and impl are read.)

The key of a call is (GPU name, rows, LoRA rank, dtype): rows = B * (S_txt + S_img), all rows the call projects.
Among the entries of the call's dtype the nearest one decides: same LoRA-or-not first, then the nearest rows and
the nearest rank on a log scale (a table holds a few sizes, calls come at any size). No table for the GPU, or no
entry for the dtype: DEFAULT, the fused kernel, which every release so far ran (a default must not regress
until a measurement says otherwise). Under torch.compile rows are unknown (see `choose`): the entry of the largest
rows decides. `python -m qwen_fused.kernels.tune` writes the tables.

Tensors and names only: no kernels are imported here.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
from pathlib import Path

import torch

from .backend import IMPLS

DEFAULT = "fused"
ENV_DIR = "QWEN_FUSED_TUNING_DIR"
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_names: dict[int, str] = {}


def slug(name: str) -> str:
    """`NVIDIA H200` -> `nvidia-h200`, the table's file name (and bench/results' naming)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


_DEFAULT_DIR = str(Path(__file__).parent / "tuning")


def tuning_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or _DEFAULT_DIR)


@torch.compiler.assume_constant_result
def device_name(device: torch.device) -> str:
    """The GPU's name (cached per device: read on every call); `cpu` for the interpreter."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _names:
        _names[index] = torch.cuda.get_device_name(index)
    return _names[index]


def _bad(path, what):
    return ValueError(f"qwen_fused tuning table {path}: {what}; rerun `python -m qwen_fused.kernels.tune` or "
                      f"delete the file")


def parse_table(data, path="<table>") -> list[dict]:
    """Validate a table's JSON object; returns its choices. Raises ValueError naming the file and the entry."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise _bad(path, 'expected an object with a "choices" list')
    for i, e in enumerate(data["choices"]):
        if not isinstance(e, dict):
            raise _bad(path, f"choice {i} is not an object")
        if e.get("dtype") not in DTYPE_NAMES:
            raise _bad(path, f"choice {i}: dtype {e.get('dtype')!r} is not one of {', '.join(DTYPE_NAMES)}")
        for key, low in (("rows", 1), ("rank", 0)):
            if not isinstance(e.get(key), int) or isinstance(e.get(key), bool) or e[key] < low:
                raise _bad(path, f"choice {i}: {key} must be an integer >= {low}, got {e.get(key)!r}")
        if e.get("impl") not in IMPLS:
            raise _bad(path, f"choice {i}: impl {e.get('impl')!r} is not one of {', '.join(IMPLS)}")
    return data["choices"]


@functools.lru_cache(maxsize=None)
def load_table(gpu: str, directory: str) -> tuple[dict, ...] | None:
    """The choices for one GPU from `<directory>/<slug>.json`, or None without a table (read once per process)."""
    path = Path(directory) / f"{slug(gpu)}.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _bad(path, f"not readable JSON ({e})") from None
    return tuple(parse_table(data, path))


def nearest(choices, rows: int | None, rank: int, dtype: torch.dtype) -> str:
    """The impl of the entry nearest to (rows, rank) among those of `dtype`; DEFAULT if there are none.
    rows None (unknown): the largest rows measured, where the time goes."""
    def distance(e):
        far = -e["rows"] if rows is None else abs(math.log2(max(rows, 1) / e["rows"]))
        return (e["rank"] > 0) != (rank > 0), far, abs(math.log2((rank + 1) / (e["rank"] + 1)))

    same = [e for e in choices if DTYPE_NAMES[e["dtype"]] == dtype]
    return min(same, key=distance)["impl"] if same else DEFAULT


def choose(gpu: str, rows: int, rank: int, dtype: torch.dtype) -> str:
    """`fused` or `gemm` for a call of `rows` rows, LoRA rank `rank` (0: none) and `dtype` on GPU `gpu`.

    Under torch.compile the choice is made while tracing (a constant in the graph, no file access there) and
    rows count as unknown: they may be symbolic (dynamic shapes), and one graph serves every length."""
    return _choose_constant(gpu, None if torch.compiler.is_compiling() else rows, rank, dtype)


@torch.compiler.assume_constant_result
def _choose_constant(gpu, rows, rank, dtype):
    # the folder as a plain string: every eager call gets here, and building Paths costs microseconds
    return _choose(gpu, os.environ.get(ENV_DIR) or _DEFAULT_DIR, rows, rank, dtype)


@functools.lru_cache(maxsize=4096)  # every eager call asks; a model sees few distinct keys
def _choose(gpu, directory, rows, rank, dtype):
    choices = load_table(gpu, directory)
    return DEFAULT if choices is None else nearest(choices, rows, rank, dtype)


def clear_cache() -> None:
    """Forget loaded tables and decisions (after a table changed on disk)."""
    load_table.cache_clear()
    _choose.cache_clear()
