"""Host side of every Triton module here: how a kernel is launched, output allocation, integer helpers.

Private (imported by `_triton_qkv.py` and `_triton_block.py`, which import triton; nothing else should).
"""
from __future__ import annotations

import torch
import triton
from torch.library import wrap_triton

from .backend import BackendError


@triton.jit
def _probe(X):
    pass


# set by TRITON_INTERPRET=1 before triton's first import: kernels then run on CPU tensors in the interpreter
INTERPRETED = type(_probe).__name__ == "InterpretedFunction"


class _Skip:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def launcher(kernel, probe: torch.Tensor):
    """`launcher(kernel, out)[grid](...)`. On GPUs: the kernel itself for plain tensors that nothing traces (eager
    calls, direct or through a custom op's eager body), else `wrap_triton(kernel)` (tracing: fake or functional
    tensors, dispatch modes such as make_fx), whose eager dispatch costs ~1 ms of host time outside a `triton_op`.
    Under the interpreter the kernel runs eagerly on real tensors; fake tensors (shape propagation, opcheck) need
    no launch; tracing (torch.compile) cannot capture interpreted kernels."""
    if not INTERPRETED:
        if type(probe) is torch.Tensor and not torch._C._len_torch_dispatch_stack() \
                and not torch._is_functional_tensor(probe):
            return kernel
        return wrap_triton(kernel)
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(probe, FunctionalTensor) or torch._is_functional_tensor(probe):
        raise BackendError("torch.compile cannot trace the Triton interpreter (TRITON_INTERPRET=1); compile with "
                           "QWEN_FUSED_BACKEND=torch or auto on CPU")
    if isinstance(probe, FakeTensor):
        return _Skip()
    return kernel


def alloc(shape, like, poison: bool, dtype=None):
    """An output for a kernel to fill; NaN-filled when `poison` (backend.debug_nan), so unwritten elements show."""
    dtype = dtype or like.dtype
    if poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


# host-side integer helpers: triton's own are ConstexprFunctions in recent versions, ~10 us per call on the host
def cdiv(a, b):
    return (a + b - 1) // b


def next_pow2(n):
    n -= 1  # as triton.next_power_of_2 (works on SymInts too)
    for shift in (1, 2, 4, 8, 16, 32):
        n |= n >> shift
    return n + 1
