"""Micro-benchmarks (pytest-benchmark): ``python -m pytest benchmarks/micro --benchmark-enable``."""
