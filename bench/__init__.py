"""Benchmark runner for qwen-fused (installed as `qwen_fused.bench`)."""
