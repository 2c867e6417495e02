"""The benchmark registry: cases (`cases.py`), the workloads every provider of a case shares (`workloads.py`)
and the providers (`providers.py`); model-level cases run through `model_level.py`. The runner and the CLI see
them through this module."""
from .cases import (FULL_MODEL_BLOCKS, Q21_CASES, QUICK_CASES, QUICK_MODEL_CASES, SHAPES, Case, all_cases,
                    select_cases)
from .providers import (BASELINES, PROVIDERS, Impl, Provider, Unavailable, build_ours, build_reference,
                        select_providers, use_backend, use_backend_reset)
from .workloads import Params, Workload, canonical_grads

__all__ = ["FULL_MODEL_BLOCKS", "Q21_CASES", "QUICK_CASES", "QUICK_MODEL_CASES", "SHAPES", "Case", "all_cases",
           "select_cases",
           "BASELINES", "PROVIDERS", "Impl", "Provider", "Unavailable", "build_ours", "build_reference",
           "select_providers", "use_backend", "use_backend_reset", "Workload", "Params", "canonical_grads"]
