#!/usr/bin/env python3
"""Two fastfpm hosts behind one nginx upstream under wrk: one host SIGKILLed, one reloaded (issue 11).

    python benchmarks/failover.py                      # 10 s per run, every case
    python benchmarks/failover.py --duration 4         # a quick run
    python benchmarks/failover.py --events kill --methods POST --keepalive on

The hosts are fastfpm masters on 127.0.0.2 and 127.0.0.3 (same port) serving
``benchmarks.apps:sleep10ms`` (io10ms: a 10 ms wait per request, so that each host always has
requests in its workers and its accept queue when it is struck; ``--app hello`` for the 13-byte
hello), behind nginx with docs/scaling.md's upstream settings: the processes
and the nginx configuration are the test suite's (tests/fleet.py), so this measures what
tests/test_scaling.py asserts, at wrk's rate. Each run starts a fresh pair of hosts, runs wrk for
``--duration`` seconds and, half-way through, either kills the first host (SIGKILL to its master
and workers at once, as a machine dies) or reloads it (SIGUSR2).

Printed per run: the requests wrk completed, those that failed (non-2xx answers plus socket
errors), and for a kill the requests that were in flight on the dead host: nginx had sent them to
it and got no answer, read from nginx's access log (which records, per request, each host tried
and the bytes sent to it). A GET among those is passed to the other host; a POST is not (nginx
does not send a non-idempotent request twice), so it fails. Counts, not timings: they do not
depend on how busy the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.fleet import Fleet, kill_host, start_fleet  # noqa: E402
from tests.servers import Launcher, wait_until  # noqa: E402

APPS = {"io10ms": "benchmarks.apps:sleep10ms", "hello": "benchmarks.apps:hello"}
POST_LUA = 'wrk.method = "POST"\nwrk.body = "order=42&quantity=1"\n' \
           'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n'


@dataclass
class Run:
    """One wrk run against a fresh pair of hosts, and what happened in it."""

    event: str  # "kill" or "reload"
    method: str
    keepalive: bool
    requests: int = 0
    failed: int = 0
    in_flight: int = 0  # kill: requests nginx had sent to the dead host and got no answer from
    retried: int = 0  # kill: those of them the other host answered
    workers: int = 0
    queued: int = -1  # kill: connections waiting in the dead host's accept queue just before it
    note: str = ""

    def row(self) -> str:
        """A Markdown table row."""
        flight = "-"
        if self.event == "kill":
            flight = (f"{self.in_flight} ({self.retried} answered by the other host); just before: "
                      f"{self.workers} workers, {self.queued} in its accept queue")
        return (f"| {self.event} | {self.method} | {'on' if self.keepalive else 'off'} | {self.requests:,} "
                f"| {self.failed} | {flight} | {self.note} |")


def accept_queue(address: str) -> int:
    """Connections waiting in the accept queue of the TCP socket listening on address (HOST:PORT):
    the rx_queue column /proc/net/tcp shows for a listening socket."""
    host, port = address.rsplit(":", 1)
    local = "".join(f"{int(part):02X}" for part in reversed(host.split("."))) + f":{int(port):04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[3] == "0A":  # 0A: TCP_LISTEN
                return int(fields[4].split(":")[1], 16)
    raise RuntimeError(f"nothing listens on {address}")


def wrk_script(tmp: Path, method: str) -> Path:
    """The wrk script: POST's method and body (for POST) and the suite's report.lua."""
    path = tmp / f"wrk-{method}.lua"
    path.write_text((POST_LUA if method == "POST" else "") + (BENCH_DIR / "wrk" / "report.lua").read_text())
    return path


def run_wrk(port: int, script: Path, duration: int, connections: int,
            at_half: Callable[[], None]) -> dict[str, Any]:
    """wrk against nginx's port; at_half() is called half-way through. wrk's report (report.lua)."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "-s", str(script),
            f"http://127.0.0.1:{port}/"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(duration / 2)
        at_half()
        out, err = proc.communicate(timeout=duration + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("FASTFPM_BENCH "):
            return json.loads(line.split(" ", 1)[1])
    said = err.decode(errors="replace")[-300:]
    raise RuntimeError(f"wrk printed no report (exit {proc.returncode}): {said}")


def one_run(tmp: Path, run: Run, app: str, duration: int, connections: int) -> Run:
    """Start two hosts and nginx, run wrk, kill or reload the first host half-way."""
    def make_dir(name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))

    with Launcher(make_dir) as launcher:
        fleet: Fleet = start_fleet(launcher, app, run.workers)
        target = fleet.hosts[0]
        old = set(target.settled_workers())
        mark = target.log_size()

        def strike() -> None:
            if run.event == "kill":
                run.queued = accept_queue(target.address)
                kill_host(target)
            else:
                target.signal(signal.SIGUSR2)

        script = wrk_script(tmp, run.method)
        report = run_wrk(fleet.port(run.keepalive), script, duration, connections, strike)
        run.requests = int(report["requests"])
        run.failed = int(report["status"] + report["connect"] + report["read"] + report["write"]
                         + report["timeout"])
        if run.event == "kill":
            lost = [e for e in fleet.nginx.access_log_entries() if e.lost_on(target.address)]
            run.in_flight = len(lost)
            run.retried = sum(1 for e in lost if e.status == 200)
        else:
            target.wait_for_log("reloaded: generation 2", mark, timeout=20)
            wait_until(lambda: not set(target.worker_pids()) & old, 20, message="the old generation to exit")
            run.note = "workers replaced"
    return run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of wrk per run (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--app", choices=sorted(APPS), default="io10ms",
                        help="io10ms (default: every request waits 10 ms, so the hosts always hold some) "
                             "or hello")
    parser.add_argument("--workers", type=int, default=4, help="workers per host (default 4)")
    parser.add_argument("--events", default="kill,reload", help="kill, reload or both (default)")
    parser.add_argument("--methods", default="GET,POST", help="GET, POST or both (default)")
    parser.add_argument("--keepalive", default="off,on", help="fastcgi_keep_conn: off, on or both (default)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every case asked for and print the table."""
    opts = parse_args(argv)
    cases = [Run(event, method, keep == "on", workers=opts.workers)
             for event in opts.events.split(",") for method in opts.methods.split(",")
             for keep in opts.keepalive.split(",")]
    print(f"# {len(cases)} runs: 2 hosts x {opts.workers} workers, wrk -t1 -c{opts.connections} "
          f"-d{opts.duration}s, {APPS[opts.app]}; the first host killed or reloaded half-way",
          file=sys.stderr)
    print("| event | method | keep_conn | requests | failed | in flight on the dead host | |")
    print("|---|---|---|---:|---:|---|---|")
    with tempfile.TemporaryDirectory(prefix="fastfpm-failover-") as tmp:
        for run in cases:
            print(one_run(Path(tmp), run, APPS[opts.app], opts.duration, opts.connections).row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
