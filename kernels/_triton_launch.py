"""Host side of every Triton module here: how a kernel is launched, for which GPU, output allocation, integers.

Private (imported by `_triton_qkv.py`, `_triton_block.py` and `inspect.py`, which import triton; nothing else
should).
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


# compile-only mode (`inspect.py`): (capability, record) while set; every launch then compiles for that target
# instead of running, so the checked configurations are exactly the ones the host code below chooses
_compiling: tuple[int, list] | None = None


class _Compile:
    def __init__(self, kernel, record):
        self.kernel, self.record = kernel, record

    def __getitem__(self, grid):
        def compile_only(*args, **kwargs):
            self.record.append((self.kernel, None))  # (so a compile error names its kernel)
            self.record[-1] = (self.kernel, self.kernel.warmup(*args, grid=grid, **kwargs))
        return compile_only


def launcher(kernel, probe: torch.Tensor):
    """`launcher(kernel, out)[grid](...)`. On GPUs: the kernel itself for plain tensors that nothing traces (eager
    calls, direct or through a custom op's eager body), else `wrap_triton(kernel)` (tracing: fake or functional
    tensors, dispatch modes such as make_fx), whose eager dispatch costs ~1 ms of host time outside a `triton_op`.
    Under the interpreter the kernel runs eagerly on real tensors; fake tensors (shape propagation, opcheck) need
    no launch; tracing (torch.compile) cannot capture interpreted kernels. While `inspect.py` compiles for a
    target, launches compile instead of running."""
    if _compiling is not None:
        return _Compile(kernel, _compiling[1])
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


_capabilities: dict[int, int] = {}


def capability(device: torch.device) -> int | None:
    """10 * major + minor of the GPU the kernels are built for (90: Hopper); None under the interpreter or off
    CUDA. Host code picks launch configurations by it. Cached: asked on every call."""
    if _compiling is not None:
        return _compiling[0]
    if INTERPRETED or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        major, minor = torch.cuda.get_device_capability(index)
        _capabilities[index] = 10 * major + minor
    return _capabilities[index]


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
