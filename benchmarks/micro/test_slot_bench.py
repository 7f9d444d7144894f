"""Micro-benchmark: the scoreboard writes of one request (SlotWriter.bench, no I/O), system calls included.

Run with `python -m pytest benchmarks/micro --benchmark-enable`. Each measured call writes the stages
of ROUNDS requests (reading, info, finishing, request_done, idle) in compiled code; divide by ROUNDS
(extra_info["ns_per_request"]). Since issue 10 this includes the two getrusage() calls a request's
CPU and memory figures cost, which callgrind does not see (it counts user-space instructions only).
"""

from __future__ import annotations

import pytest

core = pytest.importorskip("fastfpm._core", reason="fastfpm's compiled core is not built (pip install -e .)")
ROUNDS = 1000


def test_slot_stages_of_a_request(benchmark) -> None:
    slot = core.SlotWriter()
    benchmark(slot.bench, ROUNDS)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_request"] = round(benchmark.stats.stats.median / ROUNDS * 1e9, 1)
    assert slot.bench(1) > ROUNDS  # every round counted a request
