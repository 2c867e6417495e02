"""Merged QKV projection with LoRA, QK RMSNorm and interleaved RoPE.

    fused_qkv(x, weight, bias=None, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6,
              lora_a=None, lora_b=None, lora_scale=1.0) -> (q, k, v)

    x        [B, S, C]
    weight   [3 * heads * D, C]          rows: Wq, Wk, Wv
    bias     [3 * heads * D]             or None
    norm_q/k [D]                         RMSNorm weights (None: no norm on that tensor)
    cos/sin  [S, D // 2] float32         angle of pair i at position s (None: no RoPE)
    lora_a   [r, C], lora_b [3 * heads * D, r]
    q, k, v  [B, S, heads, D] in x.dtype

    y = x W^T + b + lora_scale * (x A^T) B^T
    q, k, v = y split in three, then per head; q and k RMS-normalised over D (fp32) with their weights,
    then (t[2i], t[2i+1]) rotated by (cos[s, i], sin[s, i]).

The epilogue runs in fp32 and rounds once to x.dtype (stock diffusers rounds after the GEMM, after the
norm, after the norm weight and after RoPE; see design.md section 1).

`joint_qkv` is the model-level op: both streams of a Qwen-Image block in, q/k/v of the joint
[text; image] sequence out, each `[B, S_txt + S_img, heads, D]` contiguous.

Example::

    q, k, v = fused_qkv(x, w, b, heads=24, norm_q=nq, norm_k=nk, cos=cos, sin=sin)

This module is the op's contract: validation, the route of each call (decided once, in `_run`), the custom op
registered with torch.library (what torch.compile traces), and the direct eager route (`_EagerQKV`: a plain eager
call launches the same kernels without the op's host overhead, same results bit for bit). The math lives in
`_torch_qkv.py` (the torch path) and `_triton_qkv.py` (the kernels, imported lazily so that the package runs
without triton).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _available, _linear, _torch_qkv, dispatch
from .backend import debug_nan, forced_impl, get_backend, use_triton

__all__ = ["fused_qkv", "joint_qkv", "rope_tables", "check_inputs"]
STREAM_KEYS = ("x", "weight", "bias", "norm_q", "norm_k", "cos", "sin", "lora_a", "lora_b", "lora_scale")
_LISTS = STREAM_KEYS[:-1]  # tensor arguments of the op, one list each


def rope_tables(freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' complex RoPE freqs `[S, D // 2]` -> contiguous float32 `(cos, sin)`, each `[S, D // 2]`.

    Call once per forward (the model's pos_embed output), not once per block.
    """
    if not torch.is_complex(freqs):
        raise TypeError(f"rope_tables expects complex freqs [S, D//2], got dtype {freqs.dtype}")
    if freqs.dim() != 2:
        raise ValueError(f"rope_tables expects freqs of shape [S, D//2], got {tuple(freqs.shape)}")
    real = torch.view_as_real(freqs.to(torch.complex64))
    return real[..., 0].contiguous(), real[..., 1].contiguous()


def check_inputs(x, weight, bias, heads, norm_q, norm_k, cos, sin, lora_a, lora_b) -> int:
    """Validate the fused_qkv contract; returns head_dim D. Errors name the argument and both shapes."""
    if x.dim() != 3:
        raise ValueError(f"fused_qkv: x must be [B, S, C], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"fused_qkv: weight must be [3*heads*D, C], got shape {tuple(weight.shape)}")
    B, S, C = x.shape
    N, K = weight.shape
    if K != C:
        raise ValueError(f"fused_qkv: weight has {K} input features but x has C={C} (x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)})")
    if not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"fused_qkv: heads must be a positive int, got {heads!r}")
    if N % (3 * heads):
        raise ValueError(f"fused_qkv: weight rows {N} are not 3 * heads * D for heads={heads}")
    D = N // (3 * heads)
    if not x.is_floating_point():
        raise TypeError(f"fused_qkv: x must be a floating tensor, got {x.dtype}")
    dev = x.device
    for name, t in (("weight", weight), ("bias", bias), ("norm_q", norm_q), ("norm_k", norm_k), ("lora_a", lora_a),
                    ("lora_b", lora_b)):
        if t is not None and t.device != dev:
            raise ValueError(f"fused_qkv: {name} is on {t.device} but x is on {dev}")
    if weight.dtype != x.dtype:
        raise TypeError(f"fused_qkv: weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    # (torch.Size compares equal to a tuple: no tuple() per call)
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"fused_qkv: bias must be [{N}], got {tuple(bias.shape)}")
    for name, t in (("norm_q", norm_q), ("norm_k", norm_k)):
        if t is not None and t.shape != (D,):
            raise ValueError(f"fused_qkv: {name} must be [D={D}] (head_dim), got {tuple(t.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("fused_qkv: cos and sin must be given together")
    if cos is not None:
        if D % 2:
            raise ValueError(f"fused_qkv: RoPE needs an even head_dim, got D={D}")
        for name, t in (("cos", cos), ("sin", sin)):
            if t.shape != (S, D // 2):
                raise ValueError(f"fused_qkv: {name} must be [S={S}, D//2={D // 2}], got {tuple(t.shape)}")
            if t.dtype != torch.float32:
                raise TypeError(f"fused_qkv: {name} must be float32, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"fused_qkv: {name} is on {t.device} but x is on {dev}")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("fused_qkv: lora_a and lora_b must be given together")
    if lora_a is not None:
        if lora_a.dim() != 2 or lora_a.shape[1] != C:
            raise ValueError(f"fused_qkv: lora_a must be [r, C={C}], got {tuple(lora_a.shape)}")
        r = lora_a.shape[0]
        if lora_b.shape != (N, r):
            raise ValueError(f"fused_qkv: lora_b must be [{N}, r={r}], got {tuple(lora_b.shape)}")
        if lora_a.dtype != lora_b.dtype or not lora_a.is_floating_point():
            raise TypeError(f"fused_qkv: lora_a and lora_b must share one floating dtype, got {lora_a.dtype} "
                            f"and {lora_b.dtype}")
    return D


# ----------------------------------------------------------------------------------------------------------
# the route: the torch path, or the Triton kernels with one of their two forwards (`fused`: one kernel; `gemm`:
# cuBLAS, then an epilogue kernel), by the backend setting (backend.py) and the per-GPU table (dispatch.py)

DTYPES = _available.DTYPES


def triton_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the Triton kernels cannot serve this call, or None when they can."""
    if torch.compiler.is_compiling():  # traced once per graph; dynamo need not see the cache
        return _find_problem(device.type, dtype, head_dim)
    return _cached_problem(device.type, dtype, head_dim)


def _find_problem(device_type, dtype, head_dim):
    # depends on nothing that changes within a process (triton's importability, the interpreter flag)
    if dtype in DTYPES and (head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1)):
        return f"head_dim {head_dim} is not a power of two in [16, 256]"
    return _available.triton_problem(device_type, dtype)


_cached_problem = functools.lru_cache(maxsize=None)(_find_problem)  # every eager Triton call asks


def route(device: torch.device, dtype: torch.dtype, head_dim: int, rows: int = 0, rank: int = 0) -> str:
    """Route one call of `rows` rows (all streams) and LoRA rank `rank` (0: none): `torch`, `fused` or `gemm`.

    Raises under a `triton*` backend that cannot serve the call; `auto` falls back to torch with one warning."""
    if not use_triton(device.type, lambda: triton_problem(device, dtype, head_dim)):
        return "torch"
    return forced_impl(get_backend()) or dispatch.choose(dispatch.device_name(device), rows, rank, dtype)


def _key(xs, lora_as):
    """The dispatch key's rows and LoRA rank of one call (absent LoRA factors are rank 0 or None)."""
    # a plain max over a list: dynamo cannot trace max(generator, default=...) (fullgraph compile of the blocks)
    return sum(x.shape[0] * x.shape[1] for x in xs), max([0] + [a.shape[0] for a in lora_as if a is not None])


# ----------------------------------------------------------------------------------------------------------
# public entry points

_KEYSET = frozenset(STREAM_KEYS)
_DEFAULTS = dict.fromkeys(STREAM_KEYS)  # a stream's absent arguments
_DEFAULTS["lora_scale"] = 1.0


def fused_qkv(x, weight, bias=None, *, heads, norm_q=None, norm_k=None, cos=None, sin=None, eps=1e-6,
              lora_a=None, lora_b=None, lora_scale=1.0):
    """Merged QKV projection + LoRA + QK RMSNorm + RoPE; see the module docstring for shapes."""
    st = {"x": x, "weight": weight, "bias": bias, "norm_q": norm_q, "norm_k": norm_k, "cos": cos, "sin": sin,
          "lora_a": lora_a, "lora_b": lora_b, "lora_scale": lora_scale}
    return _run((st,), heads, eps)


def joint_qkv(txt: dict, img: dict, *, heads: int, eps: float = 1e-6):
    """Both streams of a block -> joint q, k, v `[B, S_txt + S_img, heads, D]`, text rows first.

    `txt` and `img` hold `fused_qkv` arguments: x, weight, bias, norm_q, norm_k, cos, sin, lora_a, lora_b,
    lora_scale (all but x and weight optional). On the Triton path one launch per stream writes its rows of the
    shared outputs (no concatenation copies).
    """
    streams = []
    for name, s in (("txt", txt), ("img", img)):
        for key in s:
            if key not in _KEYSET:
                unknown = sorted(k for k in s if k not in _KEYSET)
                raise KeyError(f"joint_qkv: {name} has unknown keys {unknown}; allowed: {', '.join(STREAM_KEYS)}")
        st = {**_DEFAULTS, **s}
        for key in ("x", "weight"):
            if st[key] is None:
                raise KeyError(f"joint_qkv: {name} is missing {key!r}")
        streams.append(st)
    return _run(streams, heads, eps)


def _autocast(st):
    """Under autocast, run in the autocast dtype as F.linear would (casts are differentiable)."""
    dt = torch.get_autocast_dtype(st["x"].device.type)
    return {k: (v.to(dt) if k in ("x", "weight", "bias", "lora_a", "lora_b") and isinstance(v, Tensor)
                and v.is_floating_point() else v) for k, v in st.items()}


def _run(streams, heads, eps):
    x0 = streams[0]["x"]
    if torch.is_autocast_enabled(x0.device.type):
        streams = [_autocast(st) for st in streams]
        x0 = streams[0]["x"]
    dims = []
    for i, st in enumerate(streams):
        try:
            dims.append(check_inputs(st["x"], st["weight"], st["bias"], heads, st["norm_q"], st["norm_k"], st["cos"],
                                     st["sin"], st["lora_a"], st["lora_b"]))
        except (ValueError, TypeError) as e:
            if len(streams) == 1:
                raise
            raise type(e)(f"{('txt', 'img')[i]} stream: {e}") from None
    for st, D in zip(streams[1:], dims[1:]):
        x = st["x"]
        if D != dims[0] or x.shape[0] != x0.shape[0] or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(f"joint_qkv: streams disagree (txt x {tuple(x0.shape)} {x0.dtype} D={dims[0]} on "
                             f"{x0.device}, img x {tuple(x.shape)} {x.dtype} D={D} on {x.device})")
    impl = route(x0.device, x0.dtype, dims[0], *_key([st["x"] for st in streams], [st["lora_a"] for st in streams]))
    if impl != "torch":
        if DIRECT and not torch.compiler.is_compiling():
            flat = [st[k] for k in _LISTS for st in streams]  # the op's lists, concatenated
            if _eager(flat):
                return _direct(streams, flat, heads, float(eps), impl)
        tensors = [st[k] for st in streams for k in _LISTS]
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        save_y = grad and any(st["norm_q"] is not None or st["norm_k"] is not None for st in streams)
        q, k, v, _ = torch.ops.qwen_fused.joint_qkv(*_op_lists(streams),
                                                    [float(st["lora_scale"]) for st in streams], heads, float(eps),
                                                    save_y, impl)
        return q, k, v
    outs = [_torch_qkv.fused_qkv_torch(st["x"], st["weight"], st["bias"], heads=heads, norm_q=st["norm_q"],
                                       norm_k=st["norm_k"], cos=st["cos"], sin=st["sin"], eps=eps, lora_a=st["lora_a"],
                                       lora_b=st["lora_b"], lora_scale=st["lora_scale"]) for st in streams]
    if len(outs) == 1:
        return outs[0]
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))


# ----------------------------------------------------------------------------------------------------------
# the custom op: `qwen_fused::joint_qkv` (forward) and `qwen_fused::joint_qkv_bwd` (epilogue backward).
# Each takes per-stream lists (one entry for fused_qkv, two for joint_qkv). The forward's `impl` is the route:
# `fused` or `gemm` runs `_triton_qkv`, `torch` its mirror in `_torch_qkv`. `_run` calls the op only on a Triton
# route that it cannot take directly (tracing, see the end of this file) and passes it; a direct call of the op
# (opcheck, torch.compile of the op) leaves it None and gets `route`'s.
# The backward's `kernels` flag follows the forward (both Triton forwards save the same pre-norm y and share one
# epilogue backward); its GEMMs are plain torch matmuls in `_grads` (shared with the direct route).
# Absent optional tensors travel as empty tensors (rank-0 LoRA factors for LoRA): torch.library differentiates a
# tensor list only when it holds no None, and a LoRA on one stream only must still get its gradient.


def _op_lists(streams):
    """Stream dicts -> the op's nine tensor lists, absent entries replaced by empty placeholders."""
    out = []
    for key in _LISTS:
        lst = []
        for st in streams:
            t = st[key]
            if t is None:
                x, w = st["x"], st["weight"]
                shape = {"lora_a": (0, x.shape[-1]), "lora_b": (w.shape[0], 0)}.get(key, (0,))
                t = x.new_empty(shape, dtype=torch.float32 if key in ("cos", "sin") else x.dtype)
            lst.append(t)
        out.append(lst)
    return out


def _present(key, t):
    if t is None:
        return None
    if key in ("lora_a", "lora_b"):
        return t if t.shape[-2 if key == "lora_a" else -1] > 0 else None
    return t if t.numel() > 0 else None


def _streams(*lists):
    """The op's lists (+ lora_scale) -> stream dicts with None for absent tensors."""
    return [{k: (_present(k, v) if k in _LISTS[2:] else v) for k, v in zip(STREAM_KEYS, vals)}
            for vals in zip(*lists)]


def _op_route(impl, x, weight, lora_a, heads):
    """The forward op's route: its `impl`, or `route`'s when a direct call left it None."""
    if impl is None:
        return route(x[0].device, x[0].dtype, weight[0].shape[0] // (3 * heads), *_key(x, lora_a))
    return impl


@torch.library.triton_op("qwen_fused::joint_qkv", mutates_args=())
def _joint_qkv_op(x: list[Tensor], weight: list[Tensor], bias: list[Tensor], norm_q: list[Tensor],
                  norm_k: list[Tensor], cos: list[Tensor], sin: list[Tensor],
                  lora_a: list[Tensor], lora_b: list[Tensor], lora_scale: list[float],
                  heads: int, eps: float, save_y: bool,
                  impl: str | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """q, k, v `[B, sum S, H, D]` and the pre-norm q|k `[B, sum S, 2 H D]` kept for backward (empty unless save_y)."""
    streams = _streams(x, weight, bias, norm_q, norm_k, cos, sin, lora_a, lora_b, lora_scale)
    impl = _op_route(impl, x, weight, lora_a, heads)
    if impl != "torch":
        from . import _triton_qkv

        return _triton_qkv.forward(streams, heads, eps, save_y, debug_nan(), impl)
    return _torch_qkv.forward(streams, heads, eps, save_y)


@torch.library.triton_op("qwen_fused::joint_qkv_bwd", mutates_args=())
def _joint_qkv_bwd_op(dq: Tensor, dk: Tensor, dv: Tensor, y: Tensor, x: list[Tensor], weight: list[Tensor],
                      norm_q: list[Tensor], norm_k: list[Tensor], cos: list[Tensor],
                      sin: list[Tensor], heads: int, eps: float, need_dnorm: bool,
                      kernels: bool) -> tuple[Tensor, Tensor]:
    """Epilogue backward: dY `[sum B*S, 3 H D]` (streams stacked by rows) and norm-weight grads `[streams, 2, D]`."""
    n = len(x)
    streams = _streams(x, weight, [x[0].new_empty(0)] * n, norm_q, norm_k, cos, sin,
                       [x[0].new_empty(0, 0)] * n, [x[0].new_empty(0, 0)] * n, [1.0] * n)
    if kernels:
        from . import _triton_qkv

        return _triton_qkv.epilogue_backward(dq, dk, dv, y, streams, heads, eps, need_dnorm, debug_nan())
    return _torch_qkv.epilogue_backward(dq, dk, dv, y, streams, heads, eps, need_dnorm)


def _setup_context(ctx, inputs, output):
    lists = inputs[:9]
    ctx.n = len(lists[0])
    ctx.lora_scale, ctx.heads, ctx.eps = inputs[9], inputs[10], inputs[11]
    ctx.kernels = _op_route(inputs[13], lists[0], lists[1], lists[7], ctx.heads) != "torch"  # backward's route
    ctx.mark_non_differentiable(output[3])
    # bias is not needed in backward unless y must be recomputed; keep it (a view, no copy)
    ctx.save_for_backward(*[t for lst in lists for t in lst], output[3])


def _backward(ctx, dq, dk, dv, _dy_unused):
    n = ctx.n
    saved = ctx.saved_tensors
    lists = [list(saved[i * n:(i + 1) * n]) for i in range(9)]
    # per-stream flags; an input list holding no tensor comes as one bool
    need = {k: list(f) if isinstance(f, (list, tuple)) else [f] * n for k, f in zip(_LISTS, ctx.needs_input_grad[:9])}
    grads = _grads(lists, saved[9 * n], need, ctx.lora_scale, ctx.heads, ctx.eps, ctx.kernels, dq, dk, dv,
                   _epilogue_op)
    # no grads for the other inputs, as many as torch passed (it drops `impl` when left at its default)
    return tuple(grads[k] for k in _LISTS) + (None,) * (len(ctx.needs_input_grad) - len(_LISTS))


def _epilogue_op(dq, dk, dv, y, lists, streams, heads, eps, need_dnorm, kernels):
    """The epilogue backward through its custom op (the op's backward: traceable by torch.compile)."""
    return torch.ops.qwen_fused.joint_qkv_bwd(dq, dk, dv, y, lists[0], lists[1], lists[3], lists[4], lists[5],
                                              lists[6], heads, eps, need_dnorm, kernels)


def _grads(lists, y, need, lora_scale, heads, eps, kernels, dq, dk, dv, epilogue):
    """The backward of both routes (custom op and direct): gradients of the op's nine tensor lists.

    `lists` are the forward's tensor lists (absent tensors as None or the op's placeholders), `y` the saved pre-norm
    q|k (empty when not saved), `need` the per-stream needs-grad flags by list name, `epilogue` runs the epilogue
    backward (`_epilogue_op` or `_epilogue_direct`, which launch the same function). Returns {name: [grad per
    stream]}."""
    n = len(lists[0])
    streams = _streams(*lists, lora_scale)
    x0 = streams[0]["x"]
    B, S_tot = x0.shape[0], sum(st["x"].shape[1] for st in streams)
    D = streams[0]["weight"].shape[0] // (3 * heads)
    shape = (B, S_tot, heads, D)
    dq, dk, dv = (torch.zeros(shape, dtype=x0.dtype, device=x0.device) if g is None else g for g in (dq, dk, dv))
    has_norm = any(st["norm_q"] is not None or st["norm_k"] is not None for st in streams)
    if has_norm and y.numel() == 0:  # forward ran without save_y (e.g. called directly): recompute pre-norm q|k
        y = torch.cat([_torch_qkv.project(st["x"], st["weight"], st["bias"], st["lora_a"], st["lora_b"],
                                          st["lora_scale"])[..., : 2 * heads * D].to(x0.dtype) for st in streams],
                      dim=1)
    need_dnorm = any(need["norm_q"]) or any(need["norm_k"])
    dy_all, dnorm = epilogue(dq, dk, dv, y, lists, streams, heads, eps, need_dnorm, kernels)
    grads = {k: [None] * n for k in _LISTS}
    m0 = 0
    for i, st in enumerate(streams):
        x, w, a, lb, s = st["x"], st["weight"], st["lora_a"], st["lora_b"], st["lora_scale"]
        Bs, S, C = x.shape
        dy = dy_all[m0:m0 + Bs * S]
        m0 += Bs * S
        flags = tuple(need[k][i] for k in ("x", "weight", "bias", "lora_a", "lora_b"))
        dx, grads["weight"][i], grads["bias"][i], grads["lora_a"][i], grads["lora_b"][i] = \
            _linear.lora_linear_backward(dy, x.reshape(Bs * S, C), w, None if st["bias"] is None else st["bias"].dtype,
                                         a, lb, s, flags)
        for j, key in ((7, "lora_a"), (8, "lora_b")):
            if need[key][i] and grads[key][i] is None:  # rank 0 (the placeholder of an absent LoRA needs none)
                grads[key][i] = torch.zeros_like(lists[j][i])
        if dx is not None:
            grads["x"][i] = dx.view(Bs, S, C)
        for j, key in enumerate(("norm_q", "norm_k")):
            if need[key][i] and st[key] is not None:
                grads[key][i] = dnorm[i, j].to(st[key].dtype)
    return grads


_joint_qkv_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# the direct eager route. The custom op costs ~0.5 ms of host time per call in eager mode (argument flattening,
# placeholders, the dispatcher, the op's autograd wrapper): a LoRA training step at train-512 is host-bound, so an
# eager call that nothing traces launches the kernels itself, through `_EagerQKV`, with the op's forward
# (`_triton_qkv.forward`) and the op's backward math (`_grads`, `_triton_qkv.epilogue_backward`): same results, bit
# for bit. torch.compile, fake or functional tensors, tensor subclasses, dispatch modes and functorch transforms
# get the custom op, which they can trace.

DIRECT = True  # False sends eager calls through the custom op too (benchmarks and tests compare the two)
_PLAIN = frozenset((type(None), Tensor, torch.nn.Parameter))
_tq = None  # `_triton_qkv`, imported on first use (triton is optional)


def _triton():
    global _tq
    if _tq is None:
        from . import _triton_qkv

        _tq = _triton_qkv
    return _tq


def _eager(flat) -> bool:
    """Whether an eager call (not compiling) may skip the custom op: plain tensors (`flat`: the op's lists,
    concatenated, x of the first stream first) that no dispatch mode or functorch transform intercepts."""
    return (not torch._C._len_torch_dispatch_stack() and torch._C._functorch.peek_interpreter_stack() is None
            and _PLAIN.issuperset(map(type, flat)) and not torch._is_functional_tensor(flat[0]))


def _direct(streams, flat, heads, eps, impl):
    if torch.is_grad_enabled():
        for t in flat:
            if t is not None and t.requires_grad:
                save_y = any(st["norm_q"] is not None or st["norm_k"] is not None for st in streams)
                return _EagerQKV.apply((streams, heads, eps, save_y, impl), *flat)
    q, k, v, _ = _triton().forward(streams, heads, eps, False, debug_nan(), impl)
    return q, k, v


class _EagerQKV(torch.autograd.Function):
    """The custom op's forward and backward without the op: inputs (spec, *the op's lists concatenated)."""

    @staticmethod
    def forward(ctx, spec, *flat):
        streams, heads, eps, save_y, impl = spec
        q, k, v, y = _triton().forward(streams, heads, eps, save_y, debug_nan(), impl)
        ctx.n, ctx.heads, ctx.eps = len(streams), heads, eps
        ctx.lora_scale = [float(st["lora_scale"]) for st in streams]
        ctx.save_for_backward(*flat, y)
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        n = ctx.n
        saved = ctx.saved_tensors
        lists = [list(saved[i * n:(i + 1) * n]) for i in range(9)]
        flags = ctx.needs_input_grad
        need = {k: flags[1 + i * n:1 + (i + 1) * n] for i, k in enumerate(_LISTS)}
        grads = _grads(lists, saved[9 * n], need, ctx.lora_scale, ctx.heads, ctx.eps, True, dq, dk, dv,
                       _epilogue_direct)
        return (None,) + tuple(g for k in _LISTS for g in grads[k])


def _epilogue_direct(dq, dk, dv, y, lists, streams, heads, eps, need_dnorm, kernels):
    return _triton().epilogue_backward(dq, dk, dv, y, streams, heads, eps, need_dnorm, debug_nan())
