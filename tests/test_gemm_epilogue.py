"""The gemm+epilogue forward (`QWEN_FUSED_BACKEND=triton-gemm`: cuBLAS x W^T + b and the LoRA delta, then the
Triton epilogue kernel) vs the float64 reference, the torch path and the fused kernel: outputs and every gradient.

Under the interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py), natively with CUDA; small fp32/fp16 shapes.
"""
import torch

import pytest
from helpers import assert_close
from test_kernels import CASES, DTYPES, _fq, _id, _leaves, _tq, check, make_stream  # noqa: F401 (_tq: skips)

from qwen_fused.kernels import set_backend

pytestmark = pytest.mark.kernel
GEMM, FUSED = "triton-gemm", "triton-fused"


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch):
    monkeypatch.setenv("QWEN_FUSED_DEBUG_NAN", "1")  # an element the epilogue kernel does not write shows as NaN
    monkeypatch.delenv("QWEN_FUSED_BACKEND", raising=False)
    set_backend(None)
    yield
    set_backend(None)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fp32_forward_backward(case):
    B, S, C, H, D, r, bias, norm, rope = case
    check([make_stream(B, S, C, H, D, r, bias, norm, rope)], H, torch.float32, GEMM, twin=FUSED)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[6]], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
def test_half_forward_backward(case, dtype):
    B, S, C, H, D, r, bias, norm, rope = case
    check([make_stream(B, S, C, H, D, r, bias, norm, rope, dtype=dtype)], H, dtype, GEMM, twin=FUSED)


def test_fp16_input_with_fp32_lora_factors():
    """peft keeps LoRA weights in fp32 beside a half-precision base: the delta stays fp32, as in the fused kernel."""
    st = make_stream(2, 9, 32, 2, 32, 6, dtype=torch.float16, lora_dtype=torch.float32)
    check([st], 2, torch.float16, GEMM, twin=FUSED)


def test_joint_streams():
    H, D = 3, 16
    txt = make_stream(2, 4, 32, H, D, None, bias=False, norm=False, rope=False, seed=3)
    img = make_stream(2, 11, 32, H, D, "3r", seed=4, strided=False)
    img["lora_scale"] = 1.3
    check([txt, img], H, torch.float32, GEMM, twin=FUSED)


def test_gemm_route_runs_cublas_then_the_epilogue_kernel(monkeypatch):
    """The forced route really is gemm+epilogue: `_gemm` runs per stream, the fused kernel never launches."""
    calls = []
    monkeypatch.setattr(_tq, "_gemm", lambda *a, _f=_tq._gemm: calls.append(1) or _f(*a))
    monkeypatch.setattr(_tq, "_qkv_fwd_kernel", None)  # a launch would fail
    txt, img = make_stream(1, 3, 32, 2, 16, 2, seed=1), make_stream(1, 5, 32, 2, 16, 2, seed=2)
    set_backend(GEMM)
    from qwen_fused.kernels import joint_qkv

    joint_qkv(txt, img, heads=2)
    assert len(calls) == 2


def test_save_y_off_recomputes_in_backward():
    """A direct op call with impl="gemm": with and without the saved pre-norm q|k, the same gradients."""
    H = 2
    st = make_stream(2, 7, 32, H, 32, 3)
    leaves = [t for _, t in _leaves([st])]
    args = _fq._op_lists([{k: st.get(k) for k in _fq.STREAM_KEYS}])
    grads = []
    for save_y in (True, False):
        q, k, v, y = torch.ops.qwen_fused.joint_qkv(*args, [0.7], H, 1e-6, save_y, "gemm")
        assert y.numel() == (q.numel() * 2 if save_y else 0)
        grads.append(torch.autograd.grad((q * 1.5 + k * k + v).sum(), leaves))
    for i, (a, b) in enumerate(zip(*grads)):
        assert_close(a, b, 1e-5, f"grad {i}")  # the recomputed y sums x W^T and the LoRA delta in another order
