"""The eager direct route of `fused_qkv` / `joint_qkv` (issue 10): an eager call that nothing traces launches the
kernels through a small autograd.Function instead of the custom op. Same forward and backward code as the op:
outputs and every gradient bit for bit; torch.compile and direct op calls still get the custom op.

Runs the Triton kernels under the interpreter on CPU (fp32, small shapes), natively on CUDA.
"""
import sys

import pytest
import torch
from test_kernels import DEV, _leaves, make_stream

from qwen_fused.kernels import BackendError, fused_qkv, joint_qkv, set_backend

_fq = sys.modules["qwen_fused.kernels.fused_qkv"]
_tq = pytest.importorskip("qwen_fused.kernels._triton_qkv")

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("clean_backend")]
OPTS = ("norm_q", "norm_k", "cos", "sin", "lora_a", "lora_b", "lora_scale")


def _call(streams, heads):
    if len(streams) == 1:
        st = streams[0]
        return fused_qkv(st["x"], st["weight"], st.get("bias"), heads=heads, **{k: st[k] for k in OPTS if k in st})
    return joint_qkv(*streams, heads=heads)


def _run(streams, heads, direct, monkeypatch, trainable=None):
    """Outputs and the gradients of every leaf (or of `trainable` keys only), by the direct route or the op."""
    monkeypatch.setattr(_fq, "DIRECT", direct)
    leaves = [t for k, t in _leaves(streams) if trainable is None or k in trainable]
    if trainable is not None:
        for st in streams:
            for k in ("x", "weight", "bias", "norm_q", "norm_k", "lora_a", "lora_b"):
                if st.get(k) is not None and k not in trainable:
                    st[k] = st[k].detach()
    ops = []
    monkeypatch.setattr(_fq, "_op_lists", lambda s, _f=_fq._op_lists: ops.append(1) or _f(s))
    out = _call(streams, heads)
    assert bool(ops) != direct, "wrong route taken"
    g = torch.Generator().manual_seed(3)
    gouts = [torch.randn(o.shape, generator=g).to(DEV, o.dtype) for o in out]
    return list(out) + list(torch.autograd.grad(out, leaves, gouts))


def _identical(a, b, names):
    assert len(a) == len(b)
    for name, x, y in zip(names, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), f"{name}: direct and custom-op routes differ (max {(x - y).abs().max():.3e})"


CASES = [  # B, S, C, H, D, rank, bias, norm, rope
    (2, 9, 32, 2, 16, 3, True, True, True),
    (1, 5, 48, 1, 32, None, False, True, False),
    (2, 7, 32, 2, 16, 2, True, False, True),
]


@pytest.mark.parametrize("backend", ["triton", "triton-fused", "triton-gemm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-S{}-C{}-H{}-D{}-r{}-b{:d}n{:d}r{:d}".format(*c))
def test_fused_qkv_direct_bit_identical_to_op(case, backend, monkeypatch):
    B, S, C, H, D, r, bias, norm, rope = case
    set_backend(backend)
    runs = [_run([make_stream(B, S, C, H, D, r, bias, norm, rope, seed=11)], H, direct, monkeypatch)
            for direct in (True, False)]
    _identical(*runs, ["q", "k", "v"] + [f"grad {i}" for i in range(len(runs[0]) - 3)])


@pytest.mark.parametrize("backend", ["triton-fused", "triton-gemm"])
@pytest.mark.parametrize("trainable", [None, ("x", "lora_a", "lora_b"), ("lora_a", "lora_b")],
                         ids=["all", "lora+x", "lora"])
def test_joint_qkv_direct_bit_identical_to_op(backend, trainable, monkeypatch):
    """Both streams, one of them without LoRA, bias or norms: outputs and every gradient (x, weight, bias, norms,
    LoRA factors), with everything trainable or as in LoRA training (frozen base)."""
    H, D = 2, 16
    set_backend(backend)

    def streams():
        txt = make_stream(2, 5, 32, H, D, None, bias=False, norm=False, seed=21, strided=False)
        img = make_stream(2, 11, 32, H, D, 4, seed=22)
        img["lora_scale"] = 1.3
        return [txt, img] if trainable is None else [make_stream(2, 5, 32, H, D, 3, seed=23), img]

    runs = [_run(streams(), H, direct, monkeypatch, trainable) for direct in (True, False)]
    _identical(*runs, ["q", "k", "v"] + [f"grad {i}" for i in range(len(runs[0]) - 3)])


def test_no_grad_direct_route_saves_nothing(monkeypatch):
    """Inference: the direct route calls the forward with save_y off and builds no autograd node."""
    seen = []
    monkeypatch.setattr(_tq, "forward", lambda *a, _f=_tq.forward: seen.append(a[3]) or _f(*a))
    txt, img = make_stream(1, 3, 32, 2, 16, 2, seed=1), make_stream(1, 6, 32, 2, 16, 2, seed=2)
    txt["x"].requires_grad_(True)
    set_backend("triton")
    with torch.no_grad():
        q, _, _ = joint_qkv(txt, img, heads=2)
    assert q.grad_fn is None and seen == [False]
    q, _, _ = joint_qkv(txt, img, heads=2)  # grad mode: an autograd node, the pre-norm q|k saved
    assert q.grad_fn is not None and seen == [False, True]


def test_errors_unchanged_on_the_direct_route():
    txt, img = make_stream(1, 3, 32, 2, 16, None), make_stream(1, 4, 32, 2, 16, None)
    set_backend("triton")
    with pytest.raises(ValueError, match="img stream: fused_qkv: bias must be"):
        joint_qkv(txt, dict(img, bias=torch.zeros(5, device=DEV)), heads=2)
    with pytest.raises(KeyError, match=r"txt has unknown keys \['a', 'z'\]"):
        joint_qkv(dict(txt, z=1, a=2), img, heads=2)
    with pytest.raises(KeyError, match="img is missing 'x'"):
        joint_qkv(txt, {"weight": img["weight"]}, heads=2)
    with pytest.raises(BackendError, match="head_dim 24"):
        fused_qkv(txt["x"], torch.randn(3 * 2 * 24, 32, device=DEV), heads=2)


def test_tensor_subclasses_and_dispatch_modes_take_the_op(monkeypatch):
    """What may trace or intercept a call (a dispatch mode here) gets the custom op, not the direct route."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    st = make_stream(1, 3, 32, 2, 16, 2)
    set_backend("triton")
    with Count():
        fused_qkv(st["x"], st["weight"], heads=2)
    assert any("qwen_fused.joint_qkv" in name for name in Count.ops)
    Count.ops.clear()
    fused_qkv(st["x"], st["weight"], heads=2)
    assert not Count.ops


def test_compile_traces_the_custom_op(monkeypatch):
    """torch.compile(fullgraph=True) of a function calling `joint_qkv` puts the custom op in the graph (never the
    direct route). A backend that runs the dynamo graph as is keeps the interpreter usable on CPU: the same outputs
    and gradients as eager."""
    H = 2
    txt, img = make_stream(1, 3, 32, H, 16, 2, seed=4), make_stream(1, 6, 32, H, 16, 2, seed=5)
    leaves = [t for _, t in _leaves([txt, img])]
    set_backend("triton")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def f(txt, img):
        q, k, v = joint_qkv(txt, img, heads=H)
        return (q * k).sum() + v.square().sum()

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend=backend)(txt, img)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert any("qwen_fused.joint_qkv" in t for t in targets), targets
    assert not any("_EagerQKV" in t for t in targets)
    grads = torch.autograd.grad(out, leaves)
    ref = f(txt, img)
    assert torch.equal(out, ref)
    for a, b in zip(grads, torch.autograd.grad(ref, leaves)):
        assert torch.equal(a, b)
    # another length: dynamo recompiles with symbolic sizes (the validation compares them), still the op
    n_graphs = len(graphs)
    txt2, img2 = make_stream(1, 4, 32, H, 16, 2, seed=6), make_stream(1, 9, 32, H, 16, 2, seed=7)
    assert torch.equal(torch.compile(f, fullgraph=True, backend=backend)(txt2, img2), f(txt2, img2))
    assert len(graphs) == n_graphs + 1
    if DEV.type == "cpu":  # aot_autograd traces the op's body: the interpreter refuses clearly, as before
        torch._dynamo.reset()
        with pytest.raises(Exception, match="cannot trace the Triton interpreter"):
            torch.compile(f, fullgraph=True, backend="aot_eager")(txt, img)


def test_autocast_direct_bit_identical_to_op(monkeypatch):
    """Under autocast both routes cast the inputs the same way and run the same kernels."""
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float16  # the interpreter computes bf16 wrongly
    set_backend("triton")
    runs = []
    for direct in (True, False):
        txt, img = make_stream(1, 5, 32, 2, 16, 2, seed=31), make_stream(1, 8, 32, 2, 16, 3, seed=32)
        with torch.autocast(DEV.type, dtype=dtype):
            runs.append(_run([txt, img], 2, direct, monkeypatch))
    assert runs[0][0].dtype == dtype
    _identical(*runs, ["q", "k", "v"] + [f"grad {i}" for i in range(len(runs[0]) - 3)])
