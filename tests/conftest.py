"""Test markers: `kernel` (Triton kernels, run under TRITON_INTERPRET=1 on CPU) and `gpu` (needs CUDA).

GPU tests are skipped here, in one place, when no CUDA device is present.
"""
import os

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter, which must be chosen before triton is first
# imported (any test module may import it at collection): decide it here, before every test module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def clean_backend(monkeypatch):
    """Kernel tests: the default backend before and after, and outputs NaN-filled before the kernels write them
    (QWEN_FUSED_DEBUG_NAN), so an element no kernel wrote shows."""
    from qwen_fused.kernels import set_backend

    monkeypatch.setenv("QWEN_FUSED_DEBUG_NAN", "1")
    monkeypatch.delenv("QWEN_FUSED_BACKEND", raising=False)
    set_backend(None)
    yield
    set_backend(None)


def pytest_configure(config):
    config.addinivalue_line("markers", "kernel: Triton kernel tests (interpreter on CPU, native on GPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
