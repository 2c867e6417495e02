"""The LoRA algebra: one module's factors, exact standard <-> merged q/k/v conversion, LoraConfig ranks and scales.

A LoRA on one module is `delta W = scale * B @ A` with `scale = alpha / rank` (alpha = rank when absent).
Conversion (design.md section 2), all exact:
  standard -> merged  A = cat(A_q, A_k, A_v), B = blockdiag(B_q, B_k, B_v) (rank r_q + r_k + r_v); when the
                      present A are identical, A is kept and B = cat(B_q, B_k, B_v) (rank r). Different scales
                      are folded into the B blocks (merged scale 1).
  merged -> standard  B split by rows. A block-diagonal B (what standard -> merged makes, or what a masked
                      training run keeps) splits back into the original per-part factors; otherwise every
                      part gets the shared A.
The same algebra splits and merges every row-stacked projection a family can merge (`row_splits()`: the q/k/v
streams, and Qwen-Image 2.1's opt-in `img_mlp.gate_up` = [gate_layer; proj]), with as many parts as it has.
Tensors and names only: no model, no file, no peft layer (the layers above use these).
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import torch

from ..names import STOCK_ORDER, STREAMS

# merged target -> (its parts in row order, the order the stock model registers them). Names are suffixes of a
# module path (`to_qkv`, `img_mlp.gate_up`). QKV is what the "merged" layout merges; the families' MERGED_LINEARS
# (opt-in merges such as 2.1's gate_up) are split back to stock names wherever a model or file lacks them.
QKV = {merged: (parts, STOCK_ORDER[merged]) for merged, parts in STREAMS.items()}


def row_splits():
    """Every merged target qwen_fused knows: QKV and each family's MERGED_LINEARS."""
    from ..families import FAMILIES

    out = dict(QKV)
    for family in FAMILIES:
        out.update(getattr(family, "MERGED_LINEARS", {}))
    return out


def part_of(name, groups):
    """`(merged module name, part index, number of parts)` when module `name` is a part of a merged target in
    `groups`, else None."""
    for merged, (parts, _) in groups.items():
        for i, part in enumerate(parts):
            if name == part or name.endswith("." + part):
                return name[:len(name) - len(part)] + merged, i, len(parts)
    return None


def merged_parts(name, groups):
    """`(the part module names in row order, in stock order)` when module `name` is a merged target, else None."""
    for merged, (parts, stock) in groups.items():
        if name == merged or name.endswith("." + merged):
            base = name[:len(name) - len(merged)]
            return [base + p for p in parts], [base + p for p in stock]
    return None


@dataclass
class LoraFactors:
    """One module's LoRA: `delta W = scale * b @ a`, a `[r, in]`, b `[out, r]`, scale = alpha / r.

    `bias` `[out]` is peft's `lora_B.bias` (lora_bias=True: `delta b = scale * bias`). `cols`, for a merged
    q/k/v LoRA whose B is kept block-diagonal, holds each part's rank columns, so saving it in the standard layout
    gives back each part's own factors even where B is still all zero. `magnitude` `[out]` is DoRA's (peft's
    `lora_magnitude_vector`): per output row of `W + scale * b @ a`, so q/k/v parts stack by rows like B.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: float | None = None  # None: alpha = rank (scale 1)
    bias: torch.Tensor | None = None
    cols: list | None = None
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


# ----------------------------------------------------------------------------------------------------------
# ranks and scales from LoraConfig kwargs

def rank_and_scale(cfg: dict, name: str, rank=None):
    """`(rank, scale)` peft gives module `name` under LoraConfig kwargs `cfg` (rank/alpha patterns, rsLoRA);
    `rank` stands in where `cfg` names none."""
    from peft.utils.other import get_pattern_key

    r_pat, a_pat = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = r_pat.get(get_pattern_key(r_pat.keys(), name), cfg.get("r", rank))
    alpha = a_pat.get(get_pattern_key(a_pat.keys(), name), cfg.get("lora_alpha", r))
    return r, alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def apply_config(modules, cfg: dict, only_missing=False):
    """Set each module's alpha to what LoraConfig kwargs `cfg` give it (alpha = scale * rank, plain alpha/r
    semantics), checking the ranks against the tensors."""
    for name, f in modules.items():
        if only_missing and f.alpha is not None:
            continue
        r, scale = rank_and_scale(cfg, name, f.rank)
        if r != f.rank:
            raise ValueError(f"{name}: the LoRA config says rank {r} but the tensors have rank {f.rank}")
        f.alpha = scale * f.rank
    return modules

# ----------------------------------------------------------------------------------------------------------
# the algebra

def to_merged(modules: dict, groups=QKV) -> dict:
    """Standard q/k/v LoRAs (the parts of `groups`) -> one LoRA per merged projection (exact; see module
    docstring)."""
    out, merging, sizes = {}, collections.defaultdict(dict), {}
    for name, f in modules.items():
        part = part_of(name, groups)
        if part is not None:
            merged, i, sizes[merged] = part
            merging[merged][i] = f
        else:
            out[name] = f
    for name, parts in merging.items():
        out[name] = _merge_parts(name, parts, sizes[name])
    return out


def _merge_parts(name, parts, k=3):
    order = sorted(parts)
    first = parts[order[0]]
    n, c = first.b.shape[0], first.a.shape[1]
    for i in order:
        if parts[i].b.shape[0] != n or parts[i].a.shape[1] != c:
            raise ValueError(f"{name}: the LoRAs of its parts disagree in shape (out {parts[i].b.shape[0]} vs {n}, in "
                             f"{parts[i].a.shape[1]} vs {c}); not one merged projection's parts")
    dtype = first.b.dtype
    for i in order:
        dtype = _promote(dtype, _promote(parts[i].a.dtype, parts[i].b.dtype))
    scales = [parts[i].scale for i in order]
    same_scale = all(s == scales[0] for s in scales)
    no_alpha = all(parts[i].alpha is None for i in order)
    same_a = all(_same(parts[i].a, first.a) for i in order)
    a = first.a.to(dtype) if same_a else torch.cat([parts[i].a.to(dtype) for i in order])
    # different scales are folded into B: in at least fp32, so that no narrow dtype rounds the scaled factors
    b_dtype = dtype if same_scale else _promote(dtype, torch.float32)
    b = torch.zeros(k * n, a.shape[0], dtype=b_dtype, device=first.b.device)
    has_bias = any(parts[i].bias is not None for i in order)
    bias = torch.zeros(k * n, dtype=b_dtype, device=first.b.device) if has_bias else None
    col, blocks = 0, [torch.arange(0)] * k
    for i in order:
        r = parts[i].rank
        cols = slice(0, r) if same_a else slice(col, col + r)
        scale = 1.0 if same_scale else parts[i].scale  # folded into B (and the bias) when the scales differ
        b[i * n:(i + 1) * n, cols] = _scaled(parts[i].b, scale, b_dtype)
        if parts[i].bias is not None:
            bias[i * n:(i + 1) * n] = _scaled(parts[i].bias, scale, b_dtype)
        blocks[i] = torch.arange(col, col + r)
        col += r
    rank = a.shape[0]
    alpha = None if no_alpha else (scales[0] * rank if same_scale else float(rank))
    return LoraFactors(a, b, alpha, bias, None if same_a else blocks, _merged_magnitude(name, parts, k))


def _merged_magnitude(name, parts, k):
    """DoRA's magnitude of the merged projection: the parts' rows stacked (each row's norm involves only its own
    part of a block-diagonal B). A part without DoRA would need its rows' weight norms, which need the model."""
    have = [i for i in sorted(parts) if parts[i].magnitude is not None]
    if not have:
        return None
    if len(have) != k:
        what = "q/k/v parts" if k == 3 else "parts"
        raise ValueError(f"{name}: DoRA on only some of its {what} ({len(have)} of {k}) is not one merged DoRA "
                         f"layer; target all {k} parts, or load it onto the unfused model")
    return torch.cat([parts[i].magnitude for i in range(k)])


# LoRA factors come in any dtype a model stores them in, fp8 included (diffusers' layerwise casting), where the CPU
# has no arithmetic or comparison: compare bits, and test or scale in a wide dtype, rounding once to the result's

def _same(a, b):
    """Bit-identical tensors (same shape and dtype)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(ints[a.element_size()]),
                                                                      b.view(ints[b.element_size()]))


def _wide(t):
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _promote(a, b):
    try:
        return torch.promote_types(a, b)
    except RuntimeError:  # float8 types promote with nothing but themselves
        return torch.float32


def _scaled(t, scale, dtype):
    return t.to(dtype) if scale == 1 else (_wide(t) * scale).to(dtype)


def to_standard(modules: dict, groups=None) -> dict:
    """Merged LoRAs (the targets of `groups`; None: every one `row_splits()` knows) -> one LoRA per part (exact;
    see module docstring)."""
    groups = row_splits() if groups is None else groups
    out = {}
    for name, f in modules.items():
        found = merged_parts(name, groups)
        if found is None:
            out[name] = f
            continue
        parts, stock = found
        k = len(parts)
        if f.b.shape[0] % k:
            raise ValueError(f"{name}: merged LoRA B has {f.b.shape[0]} rows, not {k} equal blocks of its parts")
        n = f.b.shape[0] // k
        blocks = [f.b[i * n:(i + 1) * n] for i in range(k)]
        biases = [None if f.bias is None else f.bias[i * n:(i + 1) * n] for i in range(k)]
        mags = [None if f.magnitude is None else f.magnitude[i * n:(i + 1) * n] for i in range(k)]
        cols = f.cols if f.cols is not None and _only_in(f.b, f.cols) else block_columns(f.b, k)
        for std in stock:  # the parts in diffusers' module order, as a stock model's state dict has them
            i = parts.index(std)
            if cols is None:
                out[std] = LoraFactors(f.a, blocks[i], f.alpha, biases[i], magnitude=mags[i])
            elif len(cols[i]):
                r, c = len(cols[i]), cols[i].to(f.a.device)
                out[std] = LoraFactors(f.a[c], blocks[i][:, c], None if f.alpha is None else f.scale * r,
                                       biases[i], magnitude=mags[i])
    return out


def _only_in(b, cols):
    """True when each part's row block of a merged B is zero outside its part's rank columns `cols`."""
    n = b.shape[0] // len(cols)
    outside = torch.ones(b.shape, dtype=torch.bool, device=b.device)
    for i, c in enumerate(cols):
        outside[i * n:(i + 1) * n, c.to(b.device)] = False
    return not bool(_wide(b)[outside].any())


def block_columns(b, k=3):
    """The rank columns of each of `k` parts (q/k/v: 3) when a merged B `[k n, R]` is block-diagonal, else None.

    Block-diagonal: every column is nonzero in at most one row block. Columns nonzero in no block go to the
    part(s) whose B is entirely zero (a part that never got a gradient, e.g. text queries of the last block),
    so a stock q/k/v LoRA comes back with its own rank. An all-zero B (fresh init) is not block-diagonal.
    """
    n = b.shape[0] // k
    used = torch.stack([(_wide(b[i * n:(i + 1) * n]) != 0).any(0) for i in range(k)])  # [k, R]
    if not used.any() or bool((used.sum(0) > 1).any()):
        return None
    free = ~used.any(0)
    return [(used[i] if used[i].any() else free).nonzero().flatten() for i in range(k)]


def convert(modules: dict, to: str) -> dict:
    """{module: LoraFactors} with q/k/v targets converted to `to` ("merged" | "standard"), exactly."""
    if to == "merged":
        return to_merged(modules)
    if to == "standard":
        return to_standard(modules)
    raise ValueError(f"to must be 'merged' or 'standard', got {to!r}")


def config_kwargs(modules):
    """LoraConfig kwargs for exact per-module ranks and alphas; `modules` maps name -> LoraFactors or (r, alpha)."""
    pairs = {n: (f.rank, f.alpha) if isinstance(f, LoraFactors) else f for n, f in modules.items()}
    ranks = {name: r for name, (r, _) in pairs.items()}
    alphas = {name: float(r) if a is None else a for name, (r, a) in pairs.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    return {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
            "rank_pattern": {f"^{k}": v for k, v in ranks.items() if v != r},
            "alpha_pattern": {f"^{k}": v for k, v in alphas.items() if v != alpha}}
