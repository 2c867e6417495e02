"""Block-level ops (`linear_gelu`, `linear_gate_residual`, `modulated_layernorm`): forward and every gradient vs stock
diffusers / peft / torch modules and vs the torch path, on both routes; routing and errors; opcheck; torch.compile.

Without CUDA the Triton route runs under Triton's interpreter (TRITON_INTERPRET=1, set by conftest before triton is
imported), in fp32/fp16 at small odd sizes; outputs are NaN-filled before the kernels write them. The `gpu` tests
run the Triton route in bf16 at real width against a float64 reference.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch import nn  # noqa: E402

from qwen_fused.kernels import (BackendError, linear_gate_residual, linear_gelu, modulated_layernorm,  # noqa: E402
                                set_backend)
from qwen_fused.kernels import _torch_block, block_ops  # noqa: E402
from qwen_fused.numerics import rel_err  # noqa: E402

from helpers import assert_close  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, S, C, N, R = 2, 7, 40, 72, 3  # odd sizes: no dimension a multiple of any tile
TOL = 1e-5  # fp32: reassociation in the GEMMs and the fp32 epilogue, a few ulp of the largest value


def _tb():
    pytest.importorskip("triton")
    from qwen_fused.kernels import _triton_block

    if DEV.type == "cpu" and not _triton_block.INTERPRETED:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    return _triton_block


pytestmark = pytest.mark.usefixtures("clean_backend")


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.kernel)])
def backend(request):
    if request.param == "triton":
        _tb()
    set_backend(request.param)
    return request.param


def rnd(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(device=DEV, dtype=dtype)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def check_grads(out, ref, ours, theirs, names, tol=TOL):
    """Forward and the gradient of every input under a random upstream gradient (a sum would hide layout errors)."""
    assert_close(out, ref, tol, "output")
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out)
    da = torch.autograd.grad(out, ours, g)
    db = torch.autograd.grad(ref, theirs, g)
    for name, a, b in zip(names, da, db):
        assert_close(a, b, tol, f"grad {name}")


# ---------------------------------------------------------------------------------------------------------------
# against stock modules


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_vs_stock(backend, bias):
    from diffusers.models.activations import GELU

    g = torch.Generator().manual_seed(0)
    stock = GELU(C, N, approximate="tanh", bias=bias).to(DEV)  # diffusers FeedForward's "gelu-approximate"
    with torch.no_grad():
        stock.proj.weight.copy_(rnd(g, N, C, scale=C ** -0.5))
    x = rnd(g, B, S, C, scale=2.0)  # wide enough that GELU's curved part and both tails are exercised
    xs = leaf(x)
    ref = stock(xs)
    xo, w = leaf(x), leaf(stock.proj.weight)
    ours = [xo, w] + ([leaf(stock.proj.bias)] if bias else [])
    theirs = [xs, stock.proj.weight] + ([stock.proj.bias] if bias else [])
    out = linear_gelu(xo, w, ours[2] if bias else None)
    check_grads(out, ref, ours, theirs, ["x", "weight", "bias"])


def test_linear_gelu_4d_input(backend):
    g = torch.Generator().manual_seed(1)
    x, w, b = rnd(g, 2, 3, 5, C), rnd(g, N, C), rnd(g, N)
    assert_close(linear_gelu(x, w, b), _torch_block.linear_gelu(x, w, b), TOL, "4-d x")


def test_gelu_is_the_tanh_approximation(backend):
    """Elementwise over [-10, 10] against float64 tanh-GELU, through an identity weight (the GEMM is exact): a wrong
    constant or exact-erf GELU is off by >= 1e-5 somewhere; both routes are within a few fp32 ulp."""
    h = torch.linspace(-10, 10, 14 * 64, device=DEV).view(2, 7, 64)
    out = linear_gelu(h, torch.eye(64, device=DEV))
    ref = nn.functional.gelu(h.double(), approximate="tanh")
    bad = (out.double() - ref).abs() > 1e-6 * h.double().abs().clamp_min(1)
    assert not bad.any(), f"{int(bad.sum())} values off, first at h={h[bad][0].item()}"


def _peft_lora(base, rank, alpha, g, lora_dtype=None):
    """`base` wrapped in peft's LoRA layer (vanilla LoRA, no dropout), with random factors."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.Module()
    holder.proj = base
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"]), holder)
    layer = holder.proj
    with torch.no_grad():  # peft initialises B to zero; make the LoRA branch count
        for m in (layer.lora_A["default"], layer.lora_B["default"]):
            m.weight.data = rnd(g, *m.weight.shape, scale=0.3, dtype=lora_dtype or m.weight.dtype)
    layer.requires_grad_(True)  # peft freezes the base layer; every gradient is checked here
    return layer


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "no-lora"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_gate_residual_vs_stock(backend, lora, bias):
    g = torch.Generator().manual_seed(2)
    base = nn.Linear(C, N, bias=bias).to(DEV)
    layer = _peft_lora(base, R, 2 * R, g) if lora else base  # lora_alpha / r = 2
    x, gate, res = rnd(g, B, S, C), rnd(g, B, N), rnd(g, B, S, N)
    xs, gs, rs = leaf(x), leaf(gate), leaf(res)
    ref = rs + gs.unsqueeze(1) * layer(xs)  # QwenImageTransformerBlock's gated residual add
    params = [base.weight] + ([base.bias] if bias else [])
    if lora:
        params += [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    theirs = [xs, gs, rs] + params
    ours = [leaf(t) for t in theirs]
    xo, go, ro, w = ours[:4]
    bo = ours[4] if bias else None
    kw = dict(lora_a=ours[-2], lora_b=ours[-1], lora_scale=2.0) if lora else {}
    out = linear_gate_residual(xo, w, bo, go, ro, **kw)
    names = ["x", "gate", "residual", "weight"] + (["bias"] if bias else []) + (["lora_a", "lora_b"] if lora else [])
    check_grads(out, ref, ours, theirs, names)


def test_linear_gate_residual_lora_training(backend):
    """Frozen base weight, bias and gate (LoRA training): only x, residual and the LoRA factors get gradients."""
    g = torch.Generator().manual_seed(13)
    x, w, b, gate, res = rnd(g, B, S, C), rnd(g, N, C), rnd(g, N), rnd(g, B, N), rnd(g, B, S, N)
    a, lb = rnd(g, R, C, scale=0.3), rnd(g, N, R, scale=0.3)
    theirs = [leaf(t) for t in (x, res, a, lb)]
    xs, rs, as_, bs = theirs
    ref = _torch_block.linear_gate_residual(xs, w, b, gate, rs, lora_a=as_, lora_b=bs, lora_scale=0.7)
    ours = [leaf(t) for t in (x, res, a, lb)]
    xo, ro, ao, bo = ours
    out = linear_gate_residual(xo, w, b, gate, ro, lora_a=ao, lora_b=bo, lora_scale=0.7)
    check_grads(out, ref, ours, theirs, ["x", "residual", "lora_a", "lora_b"])


def test_linear_gate_residual_strided_gate(backend):
    """The gate is a chunk of the modulation output `[B, 3N]` (row stride 3N), as in the block."""
    g = torch.Generator().manual_seed(3)
    mod = rnd(g, B, 3 * N)
    gate = mod.chunk(3, dim=-1)[2]
    x, w, b, res = rnd(g, B, S, C), rnd(g, N, C), rnd(g, N), rnd(g, B, S, N)
    ref = _torch_block.linear_gate_residual(x, w, b, gate.contiguous(), res)
    assert_close(linear_gate_residual(x, w, b, gate, res), ref, TOL, "strided gate")


def test_modulated_layernorm_vs_stock(backend):
    g = torch.Generator().manual_seed(4)
    norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
    x = rnd(g, B, S, C, scale=3.0) + 1.5  # a mean far from zero: a one-pass variance would lose digits
    mod = rnd(g, B, 3 * C)
    shift, scale, _ = mod.chunk(3, dim=-1)  # strided, as _modulate's chunks are
    theirs = [leaf(x), leaf(shift), leaf(scale)]
    xs, ss, cs = theirs
    ref = norm(xs) * (1 + cs.unsqueeze(1)) + ss.unsqueeze(1)
    ours = [leaf(x), leaf(shift), leaf(scale)]
    out = modulated_layernorm(*ours, eps=1e-6)
    check_grads(out, ref, ours, theirs, ["x", "shift", "scale"])


def test_torch_path_is_stock_bitwise():
    """The torch path rounds where stock does: identical bits in fp16 (the Triton route is allowed to differ)."""
    set_backend("torch")
    g = torch.Generator().manual_seed(5)
    h = torch.float16
    x, gate, res, shift, scale = (rnd(g, B, S, C, dtype=h), rnd(g, B, N, dtype=h), rnd(g, B, S, N, dtype=h),
                                  rnd(g, B, C, dtype=h), rnd(g, B, C, dtype=h))
    base = nn.Linear(C, N).to(DEV, h)
    # fp32 LoRA beside an fp16 base, as peft keeps it under autocast training: the sum promotes, then casts back
    layer = _peft_lora(base, R, R, g, lora_dtype=torch.float32)
    a, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        assert torch.equal(linear_gelu(x, base.weight, base.bias),
                           nn.functional.gelu(base(x), approximate="tanh"))
        assert torch.equal(linear_gate_residual(x, base.weight, base.bias, gate, res, lora_a=a, lora_b=lb),
                           res + gate.unsqueeze(1) * layer(x))
        ln = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6).to(DEV, h)
        assert torch.equal(modulated_layernorm(x, shift, scale), ln(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


# ---------------------------------------------------------------------------------------------------------------
# the Triton route: rounding once in fp16 is no worse than stock, against float64


@pytest.mark.kernel
def test_triton_fp16_no_worse_than_stock():
    _tb()
    g = torch.Generator().manual_seed(6)
    h = torch.float16
    x, w, b = rnd(g, B, S, C, dtype=h), rnd(g, N, C, scale=C ** -0.5, dtype=h), rnd(g, N, dtype=h)
    gate, res = rnd(g, B, N, dtype=h), rnd(g, B, S, N, dtype=h)
    a, lb = rnd(g, R, C, scale=0.3, dtype=h), rnd(g, N, R, scale=0.3, dtype=h)
    shift, scale = rnd(g, B, C, dtype=h), rnd(g, B, C, dtype=h)
    xn = rnd(g, B, S, C, dtype=h)
    cases = {
        "linear_gelu": (linear_gelu, (x, w, b), {}),
        "linear_gate_residual": (linear_gate_residual, (x, w, b, gate, res), dict(lora_a=a, lora_b=lb)),
        "modulated_layernorm": (modulated_layernorm, (xn, shift, scale), {}),
    }
    for name, (fn, args, kw) in cases.items():
        set_backend("torch")
        ref = fn(*[t.double() for t in args], **{k: v.double() for k, v in kw.items()})
        stock = fn(*args, **kw)
        set_backend("triton")
        ours = fn(*args, **kw)
        assert ours.dtype == h
        (s_max, s_rms), (o_max, o_rms) = rel_err(stock, ref), rel_err(ours, ref)
        # fp16 half-ulp is ~5e-4 relative: the floor keeps a lucky stock run from failing an equally good route
        assert o_max <= 1.5 * s_max + 5e-4 and o_rms <= 1.25 * s_rms + 1e-4, (name, o_max, s_max, o_rms, s_rms)


@pytest.mark.kernel
def test_triton_route_runs_the_kernels(monkeypatch):
    """Under `triton` each op goes through the custom op and the Triton module (not silently the torch path)."""
    tb = _tb()
    calls = []
    for fn in ("linear_gelu", "linear_gate_residual", "modulated_layernorm"):
        orig = getattr(tb, fn)
        monkeypatch.setattr(tb, fn, lambda *a, _o=orig, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    set_backend("triton")
    g = torch.Generator().manual_seed(7)
    x, w, gate, res = rnd(g, B, S, C), rnd(g, N, C), rnd(g, B, N), rnd(g, B, S, N)
    linear_gelu(x, w)
    linear_gate_residual(x, w, None, gate, res)
    modulated_layernorm(x, rnd(g, B, C), rnd(g, B, C))
    assert calls == ["linear_gelu", "linear_gate_residual", "modulated_layernorm"]


@pytest.mark.kernel
def test_gate_is_per_sample():
    """A gate broadcast along the wrong axis (per token, or sample 0 for all) fails here even when S == N."""
    _tb()
    set_backend("triton")
    g = torch.Generator().manual_seed(8)
    n = 8
    x, w, res = rnd(g, 3, n, C), rnd(g, n, C), torch.zeros(3, n, n, device=DEV)
    gate = torch.arange(1.0, 3 * n + 1, device=DEV).view(3, n)
    y = x @ w.t()
    assert_close(linear_gate_residual(x, w, None, gate, res), gate[:, None, :] * y, TOL, "gate broadcast")


# ---------------------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile


def _op_cases(dtype=torch.float32):
    g = torch.Generator().manual_seed(10)

    def p(*shape, scale=1.0):
        return rnd(g, *shape, scale=scale, dtype=dtype).requires_grad_(True)

    x, w, b = p(B, S, C), p(N, C, scale=0.2), p(N)
    return [
        (torch.ops.qwen_fused.linear_gelu.default, (x, w, b, True)),
        (torch.ops.qwen_fused.linear_gelu.default, (x, w, None, False)),
        (torch.ops.qwen_fused.linear_gate_residual.default, (x, w, b, p(B, N), p(B, S, N), p(R, C), p(N, R), 0.5)),
        (torch.ops.qwen_fused.linear_gate_residual.default, (x, w, None, p(B, N), p(B, S, N), None, None, 1.0)),
        (torch.ops.qwen_fused.modulated_layernorm.default, (p(B, S, C), p(B, C), p(B, C), 1e-6)),
    ]


def test_opcheck(backend):
    interpreted = DEV.type == "cpu" and backend == "triton"
    # torch.compile cannot trace the interpreter, so the aot-dispatch checks run only for compiled kernels
    kw = dict(test_utils=("test_schema", "test_autograd_registration", "test_faketensor")) if interpreted else {}
    for op, args in _op_cases():
        torch.library.opcheck(op, args, **kw)


def _block_half(x, w1, b1, w2, b2, mod, a, lb):
    shift, scale, gate = mod.chunk(3, dim=-1)
    h = linear_gelu(modulated_layernorm(x, shift, scale), w1, b1)
    return linear_gate_residual(h, w2, b2, gate, x, lora_a=a, lora_b=lb, lora_scale=0.5)


def test_compile_fullgraph_matches_eager():
    """The three ops in one function under torch.compile(fullgraph=True) (torch route on CPU, Triton on CUDA):
    same output and gradients as eager."""
    g = torch.Generator().manual_seed(11)
    args = [rnd(g, B, S, C), rnd(g, N, C, scale=0.2), rnd(g, N), rnd(g, C, N, scale=0.2), rnd(g, C),
            rnd(g, B, 3 * C), rnd(g, R, N), rnd(g, C, R)]
    args = [leaf(t) for t in args]
    torch._dynamo.reset()
    compiled = torch.compile(_block_half, fullgraph=True, backend="inductor" if DEV.type == "cuda" else "aot_eager")
    out, ref = compiled(*args), _block_half(*args)
    check_grads(out, ref, args, args, ["x", "w1", "b1", "w2", "b2", "mod", "lora_a", "lora_b"])


def test_compile_fullgraph_custom_ops():
    """The custom ops themselves (their torch branches on CPU) compile whole, forward and backward."""
    set_backend("torch")
    cases = _op_cases()
    leaves = [t for _, args in cases for t in args if isinstance(t, torch.Tensor)]

    def f(*cs):
        total = 0
        for op, args in cs:
            out = op(*args)
            total = total + (out[0] if isinstance(out, tuple) else out).square().sum()
        return total

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(*cases)
    ref = f(*cases)
    assert_close(out, ref, TOL, "loss")
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, leaves), torch.autograd.grad(ref, leaves))):
        assert_close(a, b, TOL, f"grad {i}")


@pytest.mark.kernel
def test_compile_refuses_interpreter_clearly():
    if DEV.type == "cuda":
        pytest.skip("interpreter only")
    _tb()
    set_backend("triton")
    op, args = _op_cases()[-1]
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot trace the Triton interpreter"):
        torch.compile(lambda *a: op(*a), fullgraph=True, backend="aot_eager")(*args)


# ---------------------------------------------------------------------------------------------------------------
# errors and routing


def _good():
    g = torch.Generator().manual_seed(12)
    return dict(x=rnd(g, B, S, C), weight=rnd(g, N, C), bias=rnd(g, N), gate=rnd(g, B, N), residual=rnd(g, B, S, N),
                lora_a=rnd(g, R, C), lora_b=rnd(g, N, R), shift=rnd(g, B, C), scale=rnd(g, B, C))


def _lgr(d):
    return linear_gate_residual(d["x"], d["weight"], d["bias"], d["gate"], d["residual"], lora_a=d["lora_a"],
                                lora_b=d["lora_b"])


@pytest.mark.parametrize("key, bad, match", [
    ("weight", (N, C + 1), r"weight \(72, 41\) takes C=41 input features but x has shape \(2, 7, 40\)"),
    ("bias", (N + 1,), r"bias must be \[N=72\]"),
    ("gate", (B, S, N), r"gate must be \[B=2, N=72\], got \(2, 7, 72\)"),
    ("gate", (1, N), r"gate must be \[B=2, N=72\], got \(1, 72\)"),
    ("residual", (B, S, C), r"residual must be \[B=2, S=7, N=72\]"),
    ("lora_a", (R, C + 1), r"lora_a must be \[r, C=40\]"),
    ("lora_b", (N, R + 1), r"lora_b must be \[N=72, r=3\]"),
    ("x", (B * S, C), r"x must be \[B, S, C\], got shape \(14, 40\)"),
], ids=["weight", "bias", "gate-per-token", "gate-batch", "residual", "lora_a", "lora_b", "x-2d"])
def test_linear_gate_residual_shape_errors(key, bad, match):
    d = _good()
    d[key] = torch.zeros(bad, device=DEV)
    with pytest.raises(ValueError, match=match):
        _lgr(d)


def test_other_errors():
    d = _good()
    with pytest.raises(ValueError, match="lora_a and lora_b must be given together"):
        linear_gate_residual(d["x"], d["weight"], None, d["gate"], d["residual"], lora_a=d["lora_a"])
    with pytest.raises(TypeError, match="gate must be a floating tensor, got torch.int64"):
        linear_gate_residual(d["x"], d["weight"], None, d["gate"].long(), d["residual"])
    with pytest.raises(ValueError, match=r"scale must be \[B=2, C=40\], got \(2, 41\)"):
        modulated_layernorm(d["x"], d["shift"], torch.zeros(B, C + 1))
    with pytest.raises(ValueError, match=r"x must be \[B, S, C\]"):
        modulated_layernorm(d["x"][0], d["shift"], d["scale"])
    with pytest.raises(ValueError, match="weight must be \\[N, C\\]"):
        linear_gelu(d["x"], d["weight"][0])
    with pytest.raises(ValueError, match="shift is on meta but x is on"):
        modulated_layernorm(d["x"], d["shift"].to("meta"), d["scale"])
    with pytest.raises(TypeError, match="lora_a and lora_b must share one dtype"):
        linear_gate_residual(d["x"], d["weight"], None, d["gate"], d["residual"], lora_a=d["lora_a"],
                             lora_b=d["lora_b"].double())


@pytest.mark.kernel
def test_triton_backend_refuses_what_kernels_cannot_serve():
    _tb()
    set_backend("triton")
    d = _good()
    with pytest.raises(BackendError, match="residual dtype torch.float64 differs from x dtype torch.float32"):
        linear_gate_residual(d["x"], d["weight"], None, d["gate"], d["residual"].double())
    with pytest.raises(BackendError, match="dtype torch.float64 is not supported"):
        modulated_layernorm(d["x"].double(), d["shift"].double(), d["scale"].double())
    # the torch path serves mixed dtypes by promotion, as stock does
    set_backend("torch")
    out = linear_gate_residual(d["x"], d["weight"], None, d["gate"], d["residual"].double())
    assert out.dtype == torch.float64


def test_auto_on_cpu_is_the_torch_path(monkeypatch):
    if DEV.type == "cuda":
        pytest.skip("cpu routing")
    assert block_ops.route(torch.zeros(1), {}) == "torch"
    monkeypatch.setenv("QWEN_FUSED_BACKEND", "torch")
    assert block_ops.route(torch.zeros(1), {}) == "torch"


# ---------------------------------------------------------------------------------------------------------------
# GPU: the Triton route in bf16 at real width vs float64, no further from it than stock (the torch path in bf16)

GPU_FACTOR = 1.25  # ours rounds once where stock rounds two to four times; the GEMMs are the same cuBLAS calls


def _gpu_compare(fn, args, kw, grads=True):
    torch.manual_seed(0)
    ref_args = [leaf(t.double()) for t in args]
    ref_kw = {k: leaf(v.double()) for k, v in kw.items()}
    runs = {}
    for name in ("ref", "torch", "triton"):
        set_backend("torch" if name != "triton" else "triton")
        a = ref_args if name == "ref" else [leaf(t) for t in args]
        k = ref_kw if name == "ref" else {n: leaf(v) for n, v in kw.items()}
        with torch.set_grad_enabled(grads):  # without autograd linear_gelu takes cuBLASLt's GELU epilogue
            out = fn(*a, **k)
        leaves = a + list(k.values())
        up = torch.randn(out.shape, device=out.device, generator=torch.Generator(out.device).manual_seed(1))
        runs[name] = [out] + (list(torch.autograd.grad(out, leaves, up.to(out.dtype))) if grads else [])
    assert runs["triton"][0].dtype == torch.bfloat16
    for i, (ours, stock, ref) in enumerate(zip(runs["triton"], runs["torch"], runs["ref"])):
        (o_max, o_rms), (s_max, s_rms) = rel_err(ours, ref), rel_err(stock, ref)
        assert o_rms <= GPU_FACTOR * s_rms + 1e-6, (i, o_rms, s_rms)
        assert o_max <= GPU_FACTOR * s_max + 1e-6, (i, o_max, s_max)


def _bf16(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.kernel
def test_gpu_modulated_layernorm_bf16():
    x = _bf16(2, 1024, 3072, scale=2.0) + 0.5
    _gpu_compare(modulated_layernorm, [x, _bf16(2, 3072), _bf16(2, 3072, scale=0.3)], {})


@pytest.mark.gpu
@pytest.mark.kernel
@pytest.mark.parametrize("grads", [True, False], ids=["train", "inference"])  # inference: cuBLASLt's GELU epilogue
def test_gpu_linear_gelu_bf16(grads):
    args = [_bf16(2, 1024, 3072), _bf16(12288, 3072, scale=3072 ** -0.5), _bf16(12288, scale=0.1)]
    _gpu_compare(linear_gelu, args, {}, grads=grads)


@pytest.mark.gpu
@pytest.mark.kernel
@pytest.mark.parametrize("rank", [0, 16])
def test_gpu_linear_gate_residual_bf16(rank):
    args = [_bf16(2, 1024, 12288), _bf16(3072, 12288, scale=12288 ** -0.5), _bf16(3072, scale=0.1),
            _bf16(2, 3072, scale=0.3), _bf16(2, 1024, 3072)]
    kw = dict(lora_a=_bf16(rank, 12288, scale=0.01), lora_b=_bf16(3072, rank, scale=0.01)) if rank else {}
    _gpu_compare(linear_gate_residual, args, kw)
