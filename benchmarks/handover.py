#!/usr/bin/env python3
"""Replacing the master under wrk, through nginx (issue 12, listen.reuseport).

    python benchmarks/handover.py                     # 6 s per run, unix and TCP, keep_conn off and on
    python benchmarks/handover.py --duration 4 --transports tcp --keepalive on

Each run starts a fastfpm master with listen.reuseport (tests/apps/master_pid.py: a 2 ms pause,
then the master's pid) behind the test suite's nginx (tests/servers.py: one FastCGI connection per
request on one port, an upstream with keepalive 8, keepalive_requests 100 as docs/operations.md
recommends (--nginx-default: nginx's 1000) and fastcgi_keep_conn on on the other), runs wrk
for --duration seconds and, at a third of it, starts a second master on the same address, waits
until it is ready and stops the first with SIGQUIT: docs/operations.md's procedure. A reference run
of the same length without a hand-over comes first in each pair, so the requests column reads as a
ratio measured in the same run.

Printed per run: requests, non-2xx answers, wrk's socket errors (connect, read, write, timeout),
nginx's error-log lines about the upstream (each a request nginx retried on another connection
when it answered 200, or a failure when it did not), and which masters answered.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.servers import FastFPMServer, Launcher, Nginx, free_port, nginx_binary  # noqa: E402
from tests.test_handover import HandoverNginx  # noqa: E402

APP = "tests.apps.master_pid:app"


@dataclass
class Run:
    """One wrk run, with or without a hand-over half-way."""

    transport: str
    keepalive: bool
    handover: bool
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    upstream_lines: int = 0
    note: str = ""

    def row(self) -> str:
        """A Markdown table row."""
        return (f"| {self.transport} | {'on' if self.keepalive else 'off'} | "
                f"{'hand-over' if self.handover else 'none (reference)'} | {self.requests:,} | "
                f"{self.non_2xx} | {self.socket_errors} | {self.upstream_lines} | {self.note} |")


def make_master(launcher: Launcher, transport: str, address: str, workers: int) -> FastFPMServer:
    """A master (not started) with listen.reuseport on address."""
    workdir = launcher.directory("fpm")
    if transport == "unix":
        server = FastFPMServer(APP, workdir, "unix", max_children=workers, extra_args=["--listen-reuseport"])
        server.socket_path = Path(address)
        server.address = address
        return server
    return FastFPMServer(APP, workdir, "tcp", max_children=workers, extra_args=["--listen-reuseport"],
                         port=int(address.rpartition(":")[2]))


def run_wrk(port: int, duration: int, connections: int) -> subprocess.Popen[bytes]:
    """wrk against nginx's port, with the suite's report.lua."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
            "-s", str(BENCH_DIR / "wrk" / "report.lua"), f"http://127.0.0.1:{port}/"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def report_of(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """wrk's FASTFPM_BENCH line."""
    out, err = proc.communicate(timeout=timeout)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("FASTFPM_BENCH "):
            return json.loads(line.split(" ", 1)[1])
    said = err.decode(errors="replace")[-300:]
    raise RuntimeError(f"wrk printed no report (exit {proc.returncode}): {said}")


def one_run(tmp: Path, run: Run, duration: int, connections: int, workers: int,
            nginx_default: bool = False) -> Run:
    """A fresh master and nginx; wrk; a second master and SIGQUIT to the first at a third."""
    def make_dir(name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp))

    with Launcher(make_dir) as launcher:
        address = (str(make_dir("sock") / "app.sock") if run.transport == "unix"
                   else f"127.0.0.1:{free_port()}")
        old = launcher.start(make_master(launcher, run.transport, address, workers))
        web = (Nginx if nginx_default else HandoverNginx)(nginx_binary(), make_dir("nginx"), old.nginx_pass)
        launcher.start(web)
        proc = run_wrk(web.keepalive_port if run.keepalive else web.port, duration, connections)
        try:
            if run.handover:
                time.sleep(duration / 3)
                started = time.monotonic()
                new = launcher.start(make_master(launcher, run.transport, address, workers))
                ready = time.monotonic() - started
                old.signal(signal.SIGQUIT)
                assert old.proc is not None
                old.proc.wait(30)
                run.note = (f"new master ready in {ready:.2f}s, old one gone "
                            f"{time.monotonic() - started - ready:.2f}s after SIGQUIT (exit "
                            f"{old.proc.returncode}); new pid {new.pid}")
            report = report_of(proc, duration + 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        run.requests = int(report["requests"])
        run.non_2xx = int(report["status"])
        run.socket_errors = int(report["connect"] + report["read"] + report["write"] + report["timeout"])
        run.upstream_lines = sum(1 for line in web.error_log_text().splitlines() if "upstream" in line)
    return run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=6, help="seconds of wrk per run (default 6)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--workers", type=int, default=4, help="workers per master (default 4)")
    parser.add_argument("--transports", default="unix,tcp", help="unix, tcp or both (default)")
    parser.add_argument("--keepalive", default="off,on", help="fastcgi_keep_conn: off, on or both (default)")
    parser.add_argument("--nginx-default", action="store_true",
                        help="nginx's default keepalive_requests (1000) instead of docs/operations.md's 100")
    parser.add_argument("--repeat", type=int, default=1, help="hand-over runs per case (default 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Every case asked for: a reference run, then the hand-over runs; one table."""
    opts = parse_args(argv)
    print(f"# wrk -t1 -c{opts.connections} -d{opts.duration}s through nginx, {opts.workers} workers per "
          f"master, {APP}", file=sys.stderr)
    print("| transport | keep_conn | event | requests | non-2xx | socket errors | nginx upstream lines | |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="fastfpm-handover-") as tmp:
        for transport in opts.transports.split(","):
            for keep in opts.keepalive.split(","):
                for handover in [False] + [True] * opts.repeat:
                    run = Run(transport, keep == "on", handover)
                    print(one_run(Path(tmp), run, opts.duration, opts.connections, opts.workers,
                                  opts.nginx_default).row(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
