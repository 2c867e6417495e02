"""pytest-benchmark suite over the same registry as `qwen-fused bench` (the quick cases).

    python -m pytest bench/test_bench_suite.py --benchmark-columns=median,iqr,rounds

Each provider is verified against stock diffusers at reference precision before it is timed; a provider that
disagrees fails its test instead of producing a number. Without CUDA the cases run at reduced sizes. The
`qwen-fused bench` runner is the main tool (CUDA-event timing, ratios, per-GPU JSON); this suite is for
pytest-benchmark's own comparison and storage (`--benchmark-autosave`, `--benchmark-compare`).
"""
import functools

import pytest
import torch

from qwen_fused.bench import registry, runner

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PROVIDERS = [p for p in registry.select_providers(cuda=CUDA)]


@functools.lru_cache(maxsize=1)
def _workload(name):
    """One case at a time (the previous one is released): workload, reference outputs, stock errors."""
    w = registry.Workload(registry.Case.parse(name), DEVICE, tiny=not CUDA)
    ref = {k: v.detach().clone() for k, v in registry.build_reference(w).collect(w.inputs[0]).items()}
    w.release_reference()
    stock = runner.compare(registry.PROVIDERS["stock"].build(w).collect(w.inputs[0]), ref)
    return w, ref, stock


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", registry.QUICK_CASES)
def test_provider(benchmark, case, provider):
    w, ref, stock_errs = _workload(case)
    try:
        impl = registry.PROVIDERS[provider].build(w)
    except registry.Unavailable as e:
        pytest.skip(str(e))
    registry.use_backend(impl.backend)
    try:
        if impl.collect is not None:
            ok, why = runner.judge(runner.compare(impl.collect(w.inputs[0]), ref), stock_errs)
            assert ok, f"{provider} disagrees with stock diffusers: {why}"
        counter = iter(range(1 << 62))

        def step():
            for t in impl.grads:
                t.grad = None
            impl.step(w.inputs[next(counter) % len(w.inputs)])
            runner.sync(DEVICE)

        benchmark.extra_info.update(case=case, provider=provider, device=str(DEVICE), tiny=not CUDA)
        benchmark.pedantic(step, warmup_rounds=1, rounds=10 if CUDA else 3, iterations=1)
    finally:
        registry.use_backend_reset()
