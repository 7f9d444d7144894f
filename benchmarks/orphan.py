#!/usr/bin/env python3
"""How long a pool serves on after its master is SIGKILLed under load, and how many requests it answers.

    python benchmarks/orphan.py                     # 8 clients on 4 workers, this checkout
    python benchmarks/orphan.py --repo ../before    # another checkout's fastfpm

Clients send GETs one after another to `fastfpm serve` (the built-in demo); after --warmup seconds the
master gets SIGKILL, and the script watches /proc until every worker has exited (a zombie counts as
exited) or --limit seconds pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from slowclients import REPO, start_server


def worker_pids(master: int) -> list[int]:
    """The live children of master, from /proc."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == master and fields[0] != b"Z":
            found.append(int(entry))
    return found


def exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except OSError:
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose fastfpm to run")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--limit", type=float, default=30.0)
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from fastfpm.client import FastCGIClient, build_params

    workdir = Path(tempfile.mkdtemp(prefix="orphan-"))
    address = str(workdir / "fpm.sock")
    server = start_server(args.repo.resolve(), address, args.workers, [], workdir / "fastfpm.log")
    while len(workers := worker_pids(server.pid)) < args.workers:
        time.sleep(0.01)
    killed_at: list[float] = []
    after = [0]
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                with FastCGIClient(address, timeout=2) as fcgi:
                    ok = fcgi.request(build_params("GET", "/", "", {}, None, {})).status == 200
            except Exception:
                ok = False
            if ok and killed_at:
                after[0] += 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.warmup)
    killed_at.append(time.monotonic())
    os.kill(server.pid, signal.SIGKILL)
    while not all(map(exited, workers)) and time.monotonic() - killed_at[0] < args.limit:
        time.sleep(0.005)
    took = time.monotonic() - killed_at[0]
    left = [pid for pid in workers if not exited(pid)]
    stop.set()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(5)
    server.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)
    state = (f"{len(left)} workers still alive after {took:.1f} s" if left
             else f"every worker gone {took:.3f} s")
    print(f"{args.repo}: {state} after the master's SIGKILL; {after[0]} requests answered after it")


if __name__ == "__main__":
    main()
