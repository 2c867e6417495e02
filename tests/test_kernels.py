"""Triton kernels of `fused_qkv` / `joint_qkv`: forward and every gradient vs an independent float64 reference and
vs the torch path; joint-layout writes; backend routing and errors; opcheck; torch.compile; the whole model.

Without CUDA the kernels run under Triton's interpreter on CPU (TRITON_INTERPRET=1, set below before the kernels
module is imported); with CUDA the same tests run natively on the GPU, plus the `gpu` tests at real width.
Outputs are NaN-filled before the kernels write them (QWEN_FUSED_DEBUG_NAN=1), so an unwritten element fails.
"""
import copy
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import assert_close, clone_inputs, merged_view, rel_err, tiny_inputs, tiny_transformer  # noqa: E402

import qwen_fused  # noqa: E402
from qwen_fused import kernels  # noqa: E402
from qwen_fused.kernels import BackendError, fused_qkv, joint_qkv, set_backend  # noqa: E402

_fq = sys.modules["qwen_fused.kernels.fused_qkv"]  # the module (the package attribute is the function)
triton = pytest.importorskip("triton")
_tq = pytest.importorskip("qwen_fused.kernels._triton_qkv")

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_backend")]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu" and not _tq.INTERPRETED:
    pytest.skip("qwen_fused's Triton kernels were imported before TRITON_INTERPRET=1 was set", allow_module_level=True)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])


# ---------------------------------------------------------------------------------------------------------------
# independent float64 reference: per head, RoPE as complex multiplication


def reference(st, heads, eps):
    x, w = st["x"].double(), st["weight"].double()
    y = torch.einsum("bsc,nc->bsn", x, w)
    if st.get("bias") is not None:
        y = y + st["bias"].double()
    a = st.get("lora_a")
    if a is not None and a.shape[0]:
        y = y + st["lora_scale"] * torch.einsum("bsr,nr->bsn", x @ a.double().T, st["lora_b"].double())
    q, k, v = y.unflatten(-1, (3, heads, -1)).unbind(2)

    def epi(t, nw):
        if nw is not None:
            t = t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * nw.double()
        if st.get("cos") is not None:
            rot = torch.complex(st["cos"].double(), st["sin"].double())[None, :, None, :]
            t = torch.view_as_real(torch.view_as_complex(t.unflatten(-1, (-1, 2)).contiguous()) * rot).flatten(-2)
        return t

    return epi(q, st.get("norm_q")), epi(k, st.get("norm_k")), v


def make_stream(B, S, C, H, D, rank, bias=True, norm=True, rope=True, dtype=torch.float32, seed=0, strided=True,
                lora_dtype=None):
    """Random inputs of one stream; `rank` may be "3r" (a converted standard LoRA: A stacked, B block-diagonal)."""
    g = torch.Generator().manual_seed(seed)
    N = 3 * H * D

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    st = dict(x=rnd(B, S, C), weight=rnd(N, C, scale=C ** -0.5), lora_scale=0.7)
    st["bias"] = rnd(N, scale=0.5) if bias else None
    st["norm_q"] = (torch.rand(D, generator=g) + 0.5).to(dtype) if norm else None
    st["norm_k"] = (torch.rand(D, generator=g) + 0.5).to(dtype) if norm else None
    ld = lora_dtype or dtype
    if rank == "3r":
        r = 4
        st["lora_a"] = torch.cat([torch.randn(r, C, generator=g) * C ** -0.5 for _ in range(3)]).to(ld)
        st["lora_b"] = torch.block_diag(*[torch.randn(H * D, r, generator=g) * r ** -0.5 for _ in range(3)]).to(ld)
    elif rank is not None:
        st["lora_a"] = (torch.randn(rank, C, generator=g) * C ** -0.5).to(ld)
        st["lora_b"] = (torch.randn(N, rank, generator=g) * max(rank, 1) ** -0.5).to(ld)
    if rope:
        ang = torch.rand(S, D // 2, generator=g) * 6.3
        table = torch.stack([ang.cos(), ang.sin()], dim=-1)  # [S, D//2, 2], as the pos_embed hook makes it
        st["cos"], st["sin"] = (table[..., 0], table[..., 1]) if strided else (ang.cos(), ang.sin())
    return {k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in st.items()}


def _leaves(streams):
    out = []
    for st in streams:
        for key in ("x", "weight", "bias", "norm_q", "norm_k", "lora_a", "lora_b"):
            if st.get(key) is not None:
                st[key] = st[key].detach().requires_grad_(True)
                out.append((key, st[key]))
    return out


def _call(streams, heads, backend, eps=1e-6):
    set_backend(backend)
    try:
        if len(streams) == 1:
            st = streams[0]
            return fused_qkv(st["x"], st["weight"], st.get("bias"), heads=heads, eps=eps,
                             **{k: v for k, v in st.items() if k not in ("x", "weight", "bias")})
        return joint_qkv(*streams, heads=heads, eps=eps)
    finally:
        set_backend(None)


def _joint_ref(streams, heads, eps=1e-6):
    outs = [reference(st, heads, eps) for st in streams]
    return tuple(torch.cat(p, dim=1) for p in zip(*outs))


def check(streams, heads, dtype, backend="triton", twin=None):
    """Triton path (`backend` may force one forward) vs float64 reference and vs torch path: outputs and every
    gradient; with `twin` (another backend) also vs that one, within one rounding of the half dtype."""
    leaves = _leaves(streams)
    out = _call(streams, heads, backend)
    B, S = streams[0]["x"].shape[0], sum(st["x"].shape[1] for st in streams)
    D = streams[0]["weight"].shape[0] // (3 * heads)
    for o in out:
        assert o.shape == (B, S, heads, D) and o.dtype == dtype and o.is_contiguous()
    g = torch.Generator().manual_seed(7)
    gouts = [torch.randn(o.shape, generator=g).to(DEV, dtype) for o in out]
    tensors = [t for _, t in leaves]
    grads = torch.autograd.grad(out, tensors, gouts)
    tout = _call(streams, heads, "torch")
    tgrads = torch.autograd.grad(tout, tensors, gouts, allow_unused=True, materialize_grads=True)
    ref = _joint_ref(streams, heads)
    rgrads = torch.autograd.grad(ref, tensors, [t.double() for t in gouts], allow_unused=True,
                                 materialize_grads=True)
    names = ["q", "k", "v"] + [f"d{k}[{i}]" for i, (k, _) in enumerate(leaves)]
    if twin is not None:
        wout = _call(streams, heads, twin)
        wgrads = torch.autograd.grad(wout, tensors, gouts, allow_unused=True, materialize_grads=True)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        for name, a, w in zip(names, list(out) + list(grads), list(wout) + list(wgrads)):
            if a.numel():
                assert_close(a, w, tol, f"{name} {backend} vs {twin}")
    for name, a, t, r in zip(names, list(out) + list(grads), list(tout) + list(tgrads), list(ref) + list(rgrads)):
        assert a.shape == r.shape, name
        if a.numel() == 0:  # rank-0 LoRA factors
            continue
        if dtype == torch.float32:
            assert_close(a, r, 1e-5, f"{name} vs float64")
            assert_close(a, t, 1e-5, f"{name} vs torch path")
        else:
            # one rounding of the fp32 epilogue: never further from float64 than the torch path (which rounds
            # after the GEMM too), beyond a quarter of one ulp of slack
            ulp = torch.finfo(dtype).eps
            err, terr = rel_err(a, r)[0], rel_err(t, r)[0]
            assert torch.isfinite(a).all(), name
            print(f"{name}: triton {err:.2e} torch path {terr:.2e}", file=sys.stderr)
            assert err <= max(terr, ulp) + ulp / 4, f"{name}: triton {err:.2e} vs torch path {terr:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# forward + backward, one stream

CASES = [  # B, S, C, H, D, rank, bias, norm, rope
    (1, 1, 32, 1, 64, 0, True, True, True),
    (3, 37, 48, 2, 32, 5, True, True, True),
    (2, 70, 40, 3, 64, 16, True, True, True),
    (1, 37, 96, 1, 128, 1, True, True, True),
    (2, 37, 32, 3, 16, "3r", True, True, True),
    (2, 5, 64, 2, 128, None, True, True, True),
    (2, 37, 48, 2, 32, 5, False, True, True),
    (2, 37, 48, 2, 32, 5, True, False, True),
    (2, 37, 48, 2, 32, 5, True, True, False),
    (1, 37, 48, 3, 32, None, False, False, False),
    (2, 6, 40, 2, 16, 1, False, False, True),
]


def _id(c):
    B, S, C, H, D, r, bias, norm, rope = c
    flags = "".join(f for f, on in (("-bias", bias), ("-norm", norm), ("-rope", rope)) if on)
    return f"B{B}-S{S}-C{C}-H{H}-D{D}-r{r}{flags}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_forward_backward(case):
    B, S, C, H, D, r, bias, norm, rope = case
    check([make_stream(B, S, C, H, D, r, bias, norm, rope)], H, torch.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[3], CASES[4]], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_half_forward_backward(case, dtype):
    B, S, C, H, D, r, bias, norm, rope = case
    check([make_stream(B, S, C, H, D, r, bias, norm, rope, dtype=dtype)], H, dtype)


def test_fp16_input_with_fp32_lora_factors():
    """peft keeps LoRA weights in fp32 beside a half-precision base: the LoRA product runs in fp32."""
    st = make_stream(2, 9, 32, 2, 32, 6, dtype=torch.float16, lora_dtype=torch.float32)
    check([st], 2, torch.float16)


# ---------------------------------------------------------------------------------------------------------------
# joint layout: both streams write their rows of one [B, S_txt + S_img, H, D] output


@pytest.mark.parametrize("s_txt,s_img,B", [(1, 37, 2), (7, 70, 1), (5, 9, 3)])
def test_joint_layout(s_txt, s_img, B):
    H, D = 2, 32
    txt = make_stream(B, s_txt, 48, H, D, 3, seed=1, strided=False)
    img = make_stream(B, s_img, 40, H, D, "3r", seed=2, norm=True)
    img["lora_scale"] = 1.3
    check([txt, img], H, torch.float32)


def test_joint_streams_with_different_options():
    H, D = 3, 16
    txt = make_stream(2, 4, 32, H, D, None, bias=False, norm=False, rope=False, seed=3)
    img = make_stream(2, 11, 32, H, D, 2, seed=4)
    check([txt, img], H, torch.float32)


def test_save_y_off_recomputes_in_backward():
    """Called directly without the saved pre-norm q|k (save_y=False), backward recomputes it: same gradients."""
    H = 2
    st = make_stream(2, 7, 32, H, 32, 3)
    leaves = [t for _, t in _leaves([st])]
    set_backend("triton")
    args = _fq._op_lists([{k: st.get(k) for k in _fq.STREAM_KEYS}])
    grads = []
    for save_y in (True, False):
        q, k, v, y = torch.ops.qwen_fused.joint_qkv(*args, [0.7], H, 1e-6, save_y)
        assert y.numel() == (q.numel() * 2 if save_y else 0)
        grads.append(torch.autograd.grad((q * 1.5 + k * k + v).sum(), leaves))
    for a, b in zip(*grads):
        assert_close(a, b, 1e-6, "grad")


def test_frozen_base_weight_gets_no_grad():
    """LoRA training: base weight, bias and norms frozen -> only x and the LoRA factors get gradients."""
    st = make_stream(1, 9, 32, 2, 16, 4)
    for key in ("x", "lora_a", "lora_b"):
        st[key].requires_grad_(True)
    set_backend("triton")
    q, k, v = fused_qkv(st["x"], st["weight"], st["bias"], heads=2,
                        **{k: st[k] for k in ("norm_q", "norm_k", "cos", "sin", "lora_a", "lora_b", "lora_scale")})
    (q.sum() + k.sum() + v.sum()).backward()
    assert st["weight"].grad is None and st["bias"].grad is None and st["norm_q"].grad is None
    assert all(st[k].grad is not None and torch.isfinite(st[k].grad).all() for k in ("x", "lora_a", "lora_b"))


def test_activation_checkpointing_same_gradients():
    """torch.utils.checkpoint (non-reentrant) recomputes the op in backward: same gradients as without."""
    from torch.utils.checkpoint import checkpoint

    st = make_stream(2, 9, 32, 2, 32, 3)
    leaves = [t for _, t in _leaves([st])]
    set_backend("triton")
    kw = {k: st[k] for k in ("norm_q", "norm_k", "cos", "sin", "lora_a", "lora_b", "lora_scale")}

    def f(x, w, b):
        q, k, v = fused_qkv(x, w, b, heads=2, **kw)
        return (q * k).sum() + v.square().sum()

    plain = torch.autograd.grad(f(st["x"], st["weight"], st["bias"]), leaves)
    ckpt = torch.autograd.grad(checkpoint(f, st["x"], st["weight"], st["bias"], use_reentrant=False), leaves)
    for i, (a, b) in enumerate(zip(ckpt, plain)):
        assert_close(a, b, 1e-6, f"grad {i}")


def test_autocast_runs_in_the_autocast_dtype():
    """fp32 weights, autocast to a half dtype: inputs cast as F.linear would; gradients reach the fp32 leaves."""
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float16
    st = make_stream(1, 5, 32, 2, 16, 2)
    set_backend("auto" if DEV.type == "cuda" else "torch")  # half-precision autocast on CPU: torch path
    x = st["x"].requires_grad_(True)
    with torch.autocast(DEV.type, dtype=dtype):
        q, k, v = fused_qkv(x, st["weight"], st["bias"], heads=2, norm_q=st["norm_q"], norm_k=st["norm_k"])
    assert q.dtype == k.dtype == v.dtype == dtype
    q.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# backend routing and errors


def test_backend_setting_and_env(monkeypatch):
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv("QWEN_FUSED_BACKEND", "torch")
    assert kernels.get_backend() == "torch"
    set_backend("triton")
    assert kernels.get_backend() == "triton"
    set_backend(None)
    monkeypatch.setenv("QWEN_FUSED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="unknown qwen_fused backend 'cuda'"):
        kernels.get_backend()
    with pytest.raises(ValueError, match="choose one of auto, triton, torch"):
        set_backend("fast")


def test_torch_backend_and_cpu_auto_never_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton kernel launched")

    monkeypatch.setattr(_tq, "forward", boom)
    st = make_stream(1, 3, 16, 1, 16, 2)
    set_backend("torch")
    fused_qkv(st["x"], st["weight"], heads=1)
    if DEV.type == "cpu":
        set_backend("auto")
        fused_qkv(st["x"], st["weight"], heads=1)
    set_backend("triton")
    with pytest.raises(AssertionError, match="launched"):
        fused_qkv(st["x"], st["weight"], heads=1)


@pytest.mark.parametrize("what,match", [
    ("head_dim", "head_dim 24 is not a power of two"),
    ("small_head_dim", "head_dim 8 is not a power of two"),
    ("float64", "dtype torch.float64 is not supported"),
])
def test_triton_backend_refuses_what_it_cannot_compute(what, match):
    D = {"head_dim": 24, "small_head_dim": 8}.get(what, 16)
    dtype = torch.float64 if what == "float64" else torch.float32
    x = torch.randn(1, 3, 16, dtype=dtype, device=DEV)
    w = torch.randn(3 * 2 * D, 16, dtype=dtype, device=DEV)
    set_backend("triton")
    with pytest.raises(BackendError, match=match):
        fused_qkv(x, w, heads=2)
    set_backend("torch")  # the torch path computes it
    assert fused_qkv(x, w, heads=2)[0].shape == (1, 3, 2, D)


def test_joint_errors_name_the_problem():
    txt, img = make_stream(1, 3, 16, 1, 16, None), make_stream(2, 4, 16, 1, 16, None)
    with pytest.raises(ValueError, match="streams disagree"):
        joint_qkv(txt, img, heads=1)
    with pytest.raises(KeyError, match="unknown keys \\['norm_x'\\]"):
        joint_qkv(dict(txt, norm_x=None), txt, heads=1)
    with pytest.raises(KeyError, match="missing 'weight'"):
        joint_qkv({"x": txt["x"]}, txt, heads=1)
    with pytest.raises(ValueError, match="img stream: fused_qkv: bias must be"):
        joint_qkv(txt, dict(txt, bias=torch.zeros(5, device=DEV)), heads=1)


# ---------------------------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile


def _op_args(save_y=True, dtype=torch.float32):
    H, D = 2, 16
    streams = [make_stream(2, 5, 24, H, D, 3, seed=5, dtype=dtype), make_stream(2, 7, 24, H, D, 3, seed=6, dtype=dtype)]
    del streams[0]["bias"], streams[1]["norm_k"]  # placeholders for absent tensors in the lists
    _leaves(streams)
    return _fq._op_lists([{k: st.get(k) for k in _fq.STREAM_KEYS} for st in streams]) + [[0.5, 1.0], H, 1e-6, save_y]


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_opcheck(backend):
    set_backend(backend)
    interpreted = DEV.type == "cpu" and backend == "triton"
    # torch.compile cannot trace the interpreter, so the aot-dispatch checks run only for compiled kernels
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") if interpreted else None
    for save_y in (True, False):
        kw = {} if utils is None else dict(test_utils=utils)
        torch.library.opcheck(torch.ops.qwen_fused.joint_qkv.default, _op_args(save_y), **kw)


def test_compile_fullgraph_forward_backward_torch_branch():
    """The op (torch branch on CPU, Triton on CUDA) under torch.compile(fullgraph=True): forward and backward."""
    args = _op_args()
    leaves = [t for lst in args[:9] for t in lst if t.requires_grad]

    def f(*a):
        q, k, v, _ = torch.ops.qwen_fused.joint_qkv(*a)
        return (q * k).sum() + (v * v).sum() + q.square().sum()

    torch._dynamo.reset()
    backend = "inductor" if DEV.type == "cuda" else "aot_eager"
    out = torch.compile(f, fullgraph=True, backend=backend)(*args)
    grads = torch.autograd.grad(out, leaves)
    ref = f(*args)
    rgrads = torch.autograd.grad(ref, leaves)
    assert_close(out, ref, 1e-5, "loss")
    for i, (a, b) in enumerate(zip(grads, rgrads)):
        assert_close(a, b, 1e-5, f"grad {i}")


def test_compile_refuses_interpreter_clearly():
    if DEV.type == "cuda":
        pytest.skip("interpreter only")
    set_backend("triton")
    args = _op_args()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="cannot trace the Triton interpreter"):
        torch.compile(lambda *a: torch.ops.qwen_fused.joint_qkv(*a)[0], fullgraph=True, backend="aot_eager")(*args)


# ---------------------------------------------------------------------------------------------------------------
# the whole model with QWEN_FUSED_BACKEND=triton vs stock diffusers (fp32, forward and every gradient)


@pytest.mark.parametrize("model_kw,input_kw", [
    (dict(heads=3, head_dim=32), dict(batch=2, txt_len=5, img_shapes=((1, 2, 3), (1, 3, 3)), valid_lens=(5, 2))),
])
def test_whole_model_triton_backend_matches_stock(model_kw, input_kw, monkeypatch):
    monkeypatch.setenv("QWEN_FUSED_BACKEND", "triton")
    stock = tiny_transformer(**model_kw).to(DEV)
    fused = qwen_fused.fuse_qkv(copy.deepcopy(stock))
    kw = {k: (v.to(DEV) if torch.is_tensor(v) else v) for k, v in tiny_inputs(**input_kw).items()}
    for key in ("hidden_states", "encoder_hidden_states"):
        kw[key].requires_grad_(True)
    kw2 = clone_inputs(kw)
    calls = []
    monkeypatch.setattr(_tq, "forward", lambda *a, _f=_tq.forward: calls.append(1) or _f(*a))

    def run(model, inputs):
        out = model(**inputs).sample
        (out * torch.linspace(-1, 1, out.numel(), device=DEV).view_as(out)).sum().backward()
        return out

    ref, out = run(stock, kw), run(fused, kw2)
    assert len(calls) == len(fused.transformer_blocks)  # the kernels ran, once per block
    assert_close(out, ref, 1e-5, "output")
    for key in ("hidden_states", "encoder_hidden_states"):
        assert_close(kw2[key].grad, kw[key].grad, 1e-5, f"grad {key}")
    stock_grads = merged_view({n: p.grad for n, p in stock.named_parameters()})
    for name, p in fused.named_parameters():
        if stock_grads[name] is None:
            assert p.grad is None, name
        elif stock_grads[name].abs().max() == 0:
            assert p.grad.abs().max() == 0, name
        else:
            assert_close(p.grad, stock_grads[name], 1e-5, f"grad {name}")
    mx, rms = rel_err(out, ref)
    print(f"whole model, triton backend: max rel {mx:.2e}, rms rel {rms:.2e}", file=sys.stderr)
