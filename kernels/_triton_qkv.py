"""Triton kernels of the fused QKV op (private; imported lazily by `fused_qkv.py`; mirrored by `_torch_qkv.py`).

Forward, one launch per stream:  acc = lora_scale * S B^T  (S = x A^T, precomputed, [M, r])
                                 acc += x W^T              (K loop)
                                 epilogue: + bias; the tile's column block picks q, k or v; q/k: RMSNorm
                                 per head (fp32, weight) and interleaved RoPE; round once; store into the joint
                                 [B, S_txt + S_img, H, D] outputs at the stream's row offset.
A tile is BLOCK_M rows x BLOCK_N = HPT * D columns, HPT dividing heads, so it owns whole heads of one of q/k/v.

Forward "gemm" (the other implementation, same results within rounding): cuBLAS computes y = x W^T + b and adds
the LoRA delta with one more GEMM (beta=1); `_qkv_epilogue_kernel` then reads y once and runs the same epilogue
(`_store_qkv`). Why two: a Triton GEMM below cuBLAS speed loses more than fusing the epilogue saves (design.md
section 9); which one is faster depends on the GPU and the shape, so dispatch.py picks from measurements.

Backward epilogue, one launch per stream: dq/dk/dv (joint layout) -> dY [M, 3 * H * D] (RoPE transposed, RMSNorm
backward from the saved pre-norm y), plus per-tile partial sums for the norm-weight gradients. The GEMMs of the
backward (dX, dA, dB, dW) are cuBLAS calls in `fused_qkv.py`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._linear import cast
from ._triton_launch import INTERPRETED, alloc, capability, cdiv, launcher, next_pow2  # noqa: F401


@triton.jit
def _norm_rope(acc, NW, COS, SIN, s_idx, m_mask, stride_cs, stride_cd, stride_ss, stride_sd, eps,
               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
               ROPE: tl.constexpr):
    HPT: tl.constexpr = BLOCK_N // D
    if NORM:
        a3 = tl.reshape(acc, (BLOCK_M, HPT, D))
        rstd = tl.rsqrt(tl.sum(a3 * a3, axis=2) / D + tl.cast(eps, tl.float32))
        w = tl.load(NW + tl.arange(0, D)).to(tl.float32)
        acc = tl.reshape(a3 * rstd[:, :, None] * w[None, None, :], (BLOCK_M, BLOCK_N))
    if ROPE:
        HALF: tl.constexpr = BLOCK_N // 2
        pair = tl.arange(0, HALF) % (D // 2)
        c = tl.load(COS + s_idx[:, None] * stride_cs + pair[None, :] * stride_cd, mask=m_mask[:, None], other=0.0)
        s = tl.load(SIN + s_idx[:, None] * stride_ss + pair[None, :] * stride_sd, mask=m_mask[:, None], other=0.0)
        e, o = tl.split(tl.reshape(acc, (BLOCK_M, HALF, 2)))
        acc = tl.reshape(tl.join(e * c - o * s, e * s + o * c), (BLOCK_M, BLOCK_N))
    return acc


@triton.jit(do_not_specialize=["M", "S", "S_TOT", "ROW_OFF"])
def _qkv_fwd_kernel(X, W, BIAS, SL, LB, NQ, NK, COS, SIN, Q, K, V, Y,
                    M, S, S_TOT, ROW_OFF, C, R, HD,
                    stride_cs, stride_cd, stride_ss, stride_sd, lora_scale, eps,
                    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_NQ: tl.constexpr, HAS_NK: tl.constexpr,
                    HAS_ROPE: tl.constexpr, SAVE_Y: tl.constexpr, PRECISION: tl.constexpr,
                    LORA_PRECISION: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = 3 * HD // BLOCK_N
    # grouped launch order: GROUP_M row tiles share each W column block while it sits in L2
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = rm < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA:
        rr0 = tl.arange(0, BLOCK_R)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + rr0
            s_t = tl.load(SL + rm[:, None] * R + rr[None, :], mask=m_mask[:, None] & (rr[None, :] < R), other=0.0)
            b_t = tl.load(LB + rn[None, :] * R + rr[:, None], mask=rr[:, None] < R, other=0.0)
            acc = tl.dot(s_t, b_t, acc, input_precision=LORA_PRECISION)
        # torch.compile passes Python floats as fp64 scalars: keep the tile fp32 (dot needs an fp32 acc)
        acc = acc * tl.cast(lora_scale, tl.float32)
    rk = tl.arange(0, BLOCK_K)
    for k0 in range(0, C, BLOCK_K):
        kk = k0 + rk
        a = tl.load(X + rm[:, None] * C + kk[None, :], mask=m_mask[:, None] & (kk[None, :] < C), other=0.0)
        b = tl.load(W + rn[None, :] * C + kk[:, None], mask=kk[:, None] < C, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn).to(tl.float32)[None, :]
    _store_qkv(acc, pid_n, rm, m_mask, NQ, NK, COS, SIN, Q, K, V, Y, S, S_TOT, ROW_OFF, HD,
               stride_cs, stride_cd, stride_ss, stride_sd, eps, HAS_NQ, HAS_NK, HAS_ROPE, SAVE_Y, D, BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M", "S", "S_TOT", "ROW_OFF"])
def _qkv_epilogue_kernel(YIN, NQ, NK, COS, SIN, Q, K, V, Y, M, S, S_TOT, ROW_OFF, HD,
                         stride_cs, stride_cd, stride_ss, stride_sd, eps,
                         HAS_NQ: tl.constexpr, HAS_NK: tl.constexpr, HAS_ROPE: tl.constexpr, SAVE_Y: tl.constexpr,
                         D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the gemm route's second half: y [M, 3 * HD] (x W^T + b + LoRA, computed by cuBLAS) read once
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = rm < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.load(YIN + rm[:, None] * (3 * HD) + cols[None, :], mask=m_mask[:, None], other=0.0).to(tl.float32)
    _store_qkv(acc, pid_n, rm, m_mask, NQ, NK, COS, SIN, Q, K, V, Y, S, S_TOT, ROW_OFF, HD,
               stride_cs, stride_cd, stride_ss, stride_sd, eps, HAS_NQ, HAS_NK, HAS_ROPE, SAVE_Y, D, BLOCK_M, BLOCK_N)


@triton.jit
def _store_qkv(acc, pid_n, rm, m_mask, NQ, NK, COS, SIN, Q, K, V, Y, S, S_TOT, ROW_OFF, HD,
               stride_cs, stride_cd, stride_ss, stride_sd, eps, HAS_NQ: tl.constexpr, HAS_NK: tl.constexpr,
               HAS_ROPE: tl.constexpr, SAVE_Y: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    # the forward epilogue of both routes: an fp32 tile of y (bias added) -> the joint q/k/v outputs
    section = (pid_n * BLOCK_N) // HD  # 0: q, 1: k, 2: v
    col = pid_n * BLOCK_N - section * HD + tl.arange(0, BLOCK_N)
    b_idx = rm // S
    s_idx = rm - b_idx * S
    orow = b_idx * S_TOT + ROW_OFF + s_idx
    offs = orow[:, None] * HD + col[None, :]
    omask = m_mask[:, None]
    if section == 2:
        tl.store(V + offs, acc.to(V.dtype.element_ty), mask=omask)
    else:
        if SAVE_Y:
            y_offs = orow[:, None] * (2 * HD) + section * HD + col[None, :]
            tl.store(Y + y_offs, acc.to(Y.dtype.element_ty), mask=omask)
        if section == 0:
            out = _norm_rope(acc, NQ, COS, SIN, s_idx, m_mask, stride_cs, stride_cd, stride_ss, stride_sd, eps,
                             D, BLOCK_M, BLOCK_N, HAS_NQ, HAS_ROPE)
            tl.store(Q + offs, out.to(Q.dtype.element_ty), mask=omask)
        else:
            out = _norm_rope(acc, NK, COS, SIN, s_idx, m_mask, stride_cs, stride_cd, stride_ss, stride_sd, eps,
                             D, BLOCK_M, BLOCK_N, HAS_NK, HAS_ROPE)
            tl.store(K + offs, out.to(K.dtype.element_ty), mask=omask)


@triton.jit
def _norm_rope_bwd(g, Y, NW, COS, SIN, DWP, y_offs, s_idx, m_mask, stride_cs, stride_cd, stride_ss, stride_sd,
                   eps, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
                   ROPE: tl.constexpr, NEED_DW: tl.constexpr):
    HPT: tl.constexpr = BLOCK_N // D
    if ROPE:  # transpose of the rotation
        HALF: tl.constexpr = BLOCK_N // 2
        pair = tl.arange(0, HALF) % (D // 2)
        c = tl.load(COS + s_idx[:, None] * stride_cs + pair[None, :] * stride_cd, mask=m_mask[:, None], other=0.0)
        s = tl.load(SIN + s_idx[:, None] * stride_ss + pair[None, :] * stride_sd, mask=m_mask[:, None], other=0.0)
        ge, go = tl.split(tl.reshape(g, (BLOCK_M, HALF, 2)))
        g = tl.reshape(tl.join(ge * c + go * s, go * c - ge * s), (BLOCK_M, BLOCK_N))
    if NORM:
        y3 = tl.reshape(tl.load(Y + y_offs, mask=m_mask[:, None], other=0.0).to(tl.float32), (BLOCK_M, HPT, D))
        rstd = tl.rsqrt(tl.sum(y3 * y3, axis=2) / D + tl.cast(eps, tl.float32))
        xh = y3 * rstd[:, :, None]
        g3 = tl.reshape(g, (BLOCK_M, HPT, D))
        if NEED_DW:
            tl.store(DWP + tl.arange(0, D), tl.sum(tl.sum(g3 * xh, axis=1), axis=0))
        gx = g3 * tl.load(NW + tl.arange(0, D)).to(tl.float32)[None, None, :]
        dot = tl.sum(gx * xh, axis=2) / D
        g = tl.reshape(rstd[:, :, None] * (gx - xh * dot[:, :, None]), (BLOCK_M, BLOCK_N))
    return g


@triton.jit(do_not_specialize=["M", "S", "S_TOT", "ROW_OFF", "M_BASE"])
def _qkv_bwd_epilogue_kernel(DQ, DK, DV, Y, NQ, NK, COS, SIN, DY, DWP,
                             M, S, S_TOT, ROW_OFF, M_BASE, HD,
                             stride_cs, stride_cd, stride_ss, stride_sd, eps,
                             HAS_NQ: tl.constexpr, HAS_NK: tl.constexpr, HAS_ROPE: tl.constexpr,
                             NEED_DW: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = rm < M
    section = (pid_n * BLOCK_N) // HD
    col = pid_n * BLOCK_N - section * HD + tl.arange(0, BLOCK_N)
    b_idx = rm // S
    s_idx = rm - b_idx * S
    orow = b_idx * S_TOT + ROW_OFF + s_idx
    offs = orow[:, None] * HD + col[None, :]
    y_offs = orow[:, None] * (2 * HD) + section * HD + col[None, :]
    dy_offs = (M_BASE + rm)[:, None] * (3 * HD) + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    omask = m_mask[:, None]
    dwp = DWP + (pid_m * tl.num_programs(1) + pid_n) * D
    if section == 2:  # fp32 like the other branches: Triton requires one type across if/else
        g = tl.load(DV + offs, mask=omask, other=0.0).to(tl.float32)
    elif section == 0:
        g = _norm_rope_bwd(tl.load(DQ + offs, mask=omask, other=0.0).to(tl.float32), Y, NQ, COS, SIN, dwp, y_offs,
                           s_idx, m_mask, stride_cs, stride_cd, stride_ss, stride_sd, eps, D, BLOCK_M, BLOCK_N,
                           HAS_NQ, HAS_ROPE, NEED_DW)
    else:
        g = _norm_rope_bwd(tl.load(DK + offs, mask=omask, other=0.0).to(tl.float32), Y, NK, COS, SIN, dwp, y_offs,
                           s_idx, m_mask, stride_cs, stride_cd, stride_ss, stride_sd, eps, D, BLOCK_M, BLOCK_N,
                           HAS_NK, HAS_ROPE, NEED_DW)
    tl.store(DY + dy_offs, g.to(DY.dtype.element_ty), mask=omask)


def _heads_per_tile(heads: int, head_dim: int, max_n: int) -> int:
    hpt = 1
    while heads % (hpt * 2) == 0 and hpt * 2 * head_dim <= max_n:
        hpt *= 2
    return hpt


# (BLOCK_M, max_n, BLOCK_K, num_warps, num_stages) of the fused forward. Every row compiles without register
# spills and within the target's shared memory (`python -m qwen_fused.kernels.inspect`, tests/test_compile.py).
TILES = {
    "interpreter": (32, 128, 32, 4, 1),
    "fp32": (64, 128, 16, 8, 2),  # BLOCK_K 32 held 248-255 registers a thread at 4 warps, spilled at 8
    # Hopper and datacenter Blackwell (227 KB shared memory); BLOCK_N 128 leaves registers for the fp32 epilogue
    "sm90": (128, 128, 64, 8, 4),
    # Ampere, Ada and consumer Blackwell (sm_120: ~100 KB shared memory, as on consumer Ampere); 4 warps spilled
    # 330-650 bytes a thread on sm_80
    "sm80": (128, 128, 32, 8, 3),
    "older": (64, 128, 32, 4, 2),
}
TILE_KEYS = ("BLOCK_M", "max_n", "BLOCK_K", "num_warps", "num_stages")
# the epilogue-only kernels (gemm route forward, backward): memory-bound, so occupancy matters; 4 warps held a
# 64 x 128 fp32 tile at 152-182 registers a thread, 8 warps halve that
EPILOGUE_BLOCK_M, EPILOGUE_WARPS = 64, 8


def tile_row(cap: int | None, dtype: torch.dtype) -> str:
    """The TILES row for a target (`_triton_launch.capability`) and dtype."""
    if cap is None:
        return "interpreter"
    if dtype == torch.float32:
        return "fp32"
    if cap in (90, 100, 103):
        return "sm90"
    return "sm80" if cap >= 80 else "older"


def tiles(device: torch.device, dtype: torch.dtype) -> dict:
    """Tile config, keyed on the target GPU and dtype only (never on sequence length).

    `max_n` caps BLOCK_N = heads-per-tile * head_dim. QWEN_FUSED_TILES="BLOCK_M,max_n,BLOCK_K,num_warps,num_stages"
    overrides it on GPUs and in `inspect.py` (tuning runs, judging a config; read per call).
    """
    cap = capability(device)
    override = os.environ.get("QWEN_FUSED_TILES") if cap is not None else None
    if override:
        vals = [int(v) for v in override.split(",")]
        if len(vals) != 5:
            raise ValueError(f"QWEN_FUSED_TILES must be BLOCK_M,max_n,BLOCK_K,num_warps,num_stages; got {override!r}")
        return dict(zip(TILE_KEYS, vals))
    return dict(zip(TILE_KEYS, TILES[tile_row(cap, dtype)]))


def _or(t, dummy):
    return dummy if t is None else t


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # (ignored for 16-bit operands)


def _lora_dot(cap, x_dtype, factor_dtype, rank: int) -> tuple[str, int]:
    """(input precision, BLOCK_R) of the LoRA product S (s B)^T in the fused forward, for target `cap`.

    fp32 factors beside a 16-bit base (mixed-precision training) need an fp32-accurate product. On Hopper an "ieee"
    dot there is FMA code in another register layout than the tensor-core accumulator it feeds, and spilled (255
    registers, inspect.py); "tf32x3" (three tf32 products, about fp32 accuracy) runs on tensor cores without
    spills. On sm_80 and sm_120 it is the other way round. fp32 factors also take BLOCK_R <= 32: 64 spilled
    1.8 KB a thread."""
    if factor_dtype != torch.float32:  # 16-bit factors, or none (then unused)
        precision = "tf32"
    else:
        precision = "tf32x3" if tile_row(cap, x_dtype) == "sm90" else "ieee"
    return precision, max(16, min(32 if factor_dtype == torch.float32 else 64, next_pow2(max(rank, 1))))


def _rope_strides(cos, sin):
    if cos is None:
        return 0, 0, 0, 0
    return cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1)


def forward(streams, heads: int, eps: float, save_y: bool, poison: bool, impl: str = "fused"):
    """streams: list of dicts (x, weight, bias, norm_q, norm_k, cos, sin, lora_a, lora_b, lora_scale).

    impl "fused": one kernel does the GEMM, the LoRA product and the epilogue. impl "gemm": cuBLAS computes
    y = x W^T + b (+ the LoRA delta), then `_qkv_epilogue_kernel` reads y once.
    Returns q, k, v `[B, sum S, heads, D]` and the pre-norm q|k `[B, sum S, 2 * heads * D]` (empty unless save_y).
    """
    x0 = streams[0]["x"]
    B = x0.shape[0]
    N = streams[0]["weight"].shape[0]
    HD = N // 3
    D = HD // heads
    S_tot = sum(s["x"].shape[1] for s in streams)
    q = alloc((B, S_tot, heads, D), x0, poison)
    k = alloc((B, S_tot, heads, D), x0, poison)
    v = alloc((B, S_tot, heads, D), x0, poison)
    y = alloc((B, S_tot, 2 * HD), x0, poison) if save_y else x0.new_empty(0)
    cfg = tiles(x0.device, x0.dtype)
    block_n = _heads_per_tile(heads, D, cfg["max_n"]) * D
    dummy = x0.new_empty(8)  # stands in for absent tensors (never read); keeps outputs unaliased among the args
    row_off = 0
    for st in streams:
        x = st["x"]
        S, C = x.shape[1], x.shape[2]
        M = B * S
        if M > 0:
            x2 = x.reshape(M, C).contiguous()
            a, lb, scale = st.get("lora_a"), st.get("lora_b"), float(st.get("lora_scale", 1.0))
            has_lora = a is not None and a.shape[0] > 0
            # S = x A^T in the LoRA dtype, as peft's lora_A computes it
            sl = cast(torch.mm(cast(x2, a.dtype), a.t()), lb.dtype) if has_lora else None
            cos, sin = st.get("cos"), st.get("sin")
            nq, nk, bias = st.get("norm_q"), st.get("norm_k"), st.get("bias")
            outs = (_or(nq, dummy), _or(nk, dummy), _or(cos, dummy), _or(sin, dummy), q, k, v,
                    y if save_y else dummy)
            flags = dict(HAS_NQ=nq is not None, HAS_NK=nk is not None, HAS_ROPE=cos is not None, SAVE_Y=save_y, D=D)
            if impl == "gemm":
                yin = _gemm(x2, st["weight"], bias, sl, lb, scale)
                block_m = min(cfg["BLOCK_M"], EPILOGUE_BLOCK_M)  # no K loop to amortise: more tiles in flight
                launcher(_qkv_epilogue_kernel, q)[(cdiv(M, block_m), N // block_n)](
                    yin, *outs, M, S, S_tot, row_off, HD, *_rope_strides(cos, sin), float(eps), **flags,
                    BLOCK_M=block_m, BLOCK_N=block_n, num_warps=EPILOGUE_WARPS, num_stages=1,
                )
            else:
                R = a.shape[0] if has_lora else 0
                lora_precision, block_r = _lora_dot(capability(x.device), x.dtype, lb.dtype if has_lora else None, R)
                grid = (cdiv(M, cfg["BLOCK_M"]) * (N // block_n),)
                launcher(_qkv_fwd_kernel, q)[grid](
                    x2, st["weight"].contiguous(), _or(bias, dummy), sl.contiguous() if has_lora else dummy,
                    lb.contiguous() if has_lora else dummy, *outs,
                    M, S, S_tot, row_off, C, R, HD, *_rope_strides(cos, sin), scale, float(eps), **flags,
                    HAS_BIAS=bias is not None, HAS_LORA=has_lora, PRECISION=_precision(x.dtype),
                    LORA_PRECISION=lora_precision, BLOCK_M=cfg["BLOCK_M"],
                    BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"], GROUP_M=8, num_warps=cfg["num_warps"],
                    BLOCK_R=block_r, num_stages=cfg["num_stages"],
                )
        row_off += S
    return q, k, v, y


def _gemm(x2, weight, bias, sl, lb, scale):
    """y = x W^T + b + scale * S B^T on cuBLAS, as the fused kernel computes it: the LoRA product in the wider of
    the two dtypes (fp32 LoRA factors beside a half-precision base stay fp32, y then fp32 too), accumulated into y
    by one more GEMM (beta=1) instead of a separate add pass."""
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
    if sl is not None:
        acc = torch.promote_types(y.dtype, lb.dtype)
        y = y.to(acc)
        y.addmm_(sl.to(acc), lb.to(acc).t(), alpha=scale)
    return y


def epilogue_backward(dq, dk, dv, y, streams, heads: int, eps: float, need_dnorm: bool, poison: bool = False):
    """dq/dk/dv joint `[B, sum S, H, D]` -> dY `[sum M, 3 * H * D]` (stream i at rows sum_{j<i} M_j) in dq.dtype,
    and the norm-weight gradients `[len(streams), 2, D]` float32 (zeros unless need_dnorm)."""
    B, S_tot, _, D = dq.shape
    HD = heads * D
    M_all = sum(B * s["x"].shape[1] for s in streams)
    dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()
    dy = alloc((M_all, 3 * HD), dq, poison)
    cfg = tiles(dq.device, dq.dtype)
    block_m = min(cfg["BLOCK_M"], EPILOGUE_BLOCK_M)
    block_n = _heads_per_tile(heads, D, 128) * D
    num_n = 3 * HD // block_n
    dummy = dq.new_empty(8)
    # without norm-weight grads the kernel never writes its partial sums: one unwritten stand-in (no fill launch)
    dwp = None if need_dnorm else torch.empty((1,), dtype=torch.float32, device=dq.device)
    dnorm = []
    row_off = m_base = 0
    for st in streams:
        S = st["x"].shape[1]
        M = B * S
        nq, nk, cos, sin = st.get("norm_q"), st.get("norm_k"), st.get("cos"), st.get("sin")
        num_m = cdiv(M, block_m)
        if need_dnorm:
            dwp = torch.zeros((num_m, num_n, D), dtype=torch.float32, device=dq.device)
        if M > 0:
            launcher(_qkv_bwd_epilogue_kernel, dy)[(num_m, num_n)](
                dq, dk, dv, y if y.numel() else dummy, _or(nq, dummy), _or(nk, dummy), _or(cos, dummy),
                _or(sin, dummy), dy, dwp,
                M, S, S_tot, row_off, m_base, HD, *_rope_strides(cos, sin), float(eps),
                HAS_NQ=nq is not None, HAS_NK=nk is not None, HAS_ROPE=cos is not None, NEED_DW=need_dnorm,
                D=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=EPILOGUE_WARPS, num_stages=1,
            )
        if need_dnorm:
            per_n = dwp.sum(0)  # [num_n, D]
            q_tiles = HD // block_n
            dnorm.append(torch.stack([per_n[:q_tiles].sum(0), per_n[q_tiles:2 * q_tiles].sum(0)]))
        row_off += S
        m_base += M
    if not need_dnorm:
        return dy, torch.zeros((len(streams), 2, D), dtype=torch.float32, device=dq.device)
    return dy, torch.stack(dnorm)
