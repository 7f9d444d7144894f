#!/usr/bin/env python3
"""How long a burst's request waits for a new worker in a dynamic pool whose one idle worker it took.

    python benchmarks/scaleup.py                    # 20 rounds, this checkout
    python benchmarks/scaleup.py --repo ../before   # another checkout's fastfpm (e.g. main)

Each round starts `fastfpm serve` (pm dynamic, start_servers 1, min/max spare 1, max_children 6,
tests.apps.slow), waits a random part of a second (so the tick is at any phase), then sends two
requests at once, each sleeping --hold seconds. One gets the idle worker, the other a new one: the
later answer, less --hold, is from the burst's first request to a new worker having served it
(fork, the app's import, the request); that wait is what issue 12 is about.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from slowclients import REPO, start_server

sys.path.insert(0, str(REPO))
from fastfpm.client import FastCGIClient, build_params  # noqa: E402


def one_round(repo: Path, work: Path, hold: float) -> float:
    """The wait of the request that needed a new worker, in seconds."""
    address = str(work / "fpm.sock")
    proc = start_server(repo, address, 6, ["--pm", "dynamic", "--start-servers", "1",
                                           "--min-spare-servers", "1", "--max-spare-servers", "1",
                                           "tests.apps.slow:app"], work / "log")
    try:
        time.sleep(random.uniform(0.1, 1.1))
        done: list[float] = []

        def send() -> None:
            params = build_params("GET", "/", f"seconds={hold}", {}, None, {})
            FastCGIClient(address, timeout=30).request(params)
            done.append(time.monotonic())

        start = time.monotonic()
        threads = [threading.Thread(target=send) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return max(done) - start - hold
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def main() -> None:
    """Run the rounds and print the distribution in milliseconds."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--hold", type=float, default=0.5)
    args = parser.parse_args()
    waits = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as work:
            waits.append(one_round(args.repo.resolve(), Path(work), args.hold) * 1000)
    waits.sort()
    print(f"{args.repo}: {len(waits)} rounds, wait for a new worker (ms): min {waits[0]:.1f} "
          f"median {statistics.median(waits):.1f} p90 {waits[int(0.9 * (len(waits) - 1))]:.1f} "
          f"max {waits[-1]:.1f}")


if __name__ == "__main__":
    main()
