#!/usr/bin/env python3
"""Where the keep-alive path spends: CPU and system calls per request, kept vs short connections.

    python benchmarks/keepalive_syscalls.py                      # unix socket, 4 workers
    python benchmarks/keepalive_syscalls.py --transport tcp --rounds 6 --connections 32

One fastfpm (pm static, benchmarks.apps:hello) behind nginx, which either passes every request over a
new FastCGI connection ("short") or through an upstream pool (`keepalive --pool`, `fastcgi_keep_conn
on`, "kept"). nginx is started afresh for each round with only that path, so that in a short round
the workers hold no kept connections left over from a kept one (a worker holding some waits in
epoll, not in accept(), and accepts differently: `--mixed` measures that case, one nginx serving
both paths for the whole run). wrk loads the paths in alternating rounds; the backend's CPU per request (its
whole process tree, from /proc) is compared within the same run, which is what issue 12's goal
asks ("the keep-alive path below the short path in the same run"). Then one more round per path
under `strace -f -c` on every worker gives the system calls per request, by name (strace slows
the worker down, so those rounds' CPU is not used); `--perf` counts them with `perf stat` on the
syscall tracepoints instead (a fixed list of calls, PERF_CALLS; barely slower than untraced).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from run import descendants, free_port, tree_cpu_seconds
from slowclients import REPO, start_server

NGINX_CONF = """\
{user}daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    client_body_temp_path {tmp}/nginx-body;
{servers}
}}
"""
SERVER_BLOCKS = {
    "short": """\
    upstream short {{ server {backend}; }}
    server {{ listen 127.0.0.1:{port};
              location / {{ include /etc/nginx/fastcgi_params; fastcgi_pass short; }} }}""",
    "kept": """\
    upstream kept {{ server {backend}; keepalive {pool}; }}
    server {{ listen 127.0.0.1:{port};
              location / {{ include /etc/nginx/fastcgi_params; fastcgi_pass kept;
                           fastcgi_keep_conn on; }} }}""",
}


class Nginx:
    """nginx serving some of the paths on their ports, from a config of its own in tmp."""

    def __init__(self, tmp: Path, backend: str, pool: int, ports: dict[str, int]) -> None:
        servers = "\n".join(SERVER_BLOCKS[name].format(backend=backend, pool=pool, port=port)
                            for name, port in ports.items())
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(user="user root root;\n" if os.geteuid() == 0 else "",
                                          tmp=tmp, servers=servers))
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)], start_new_session=True)
        deadline = time.monotonic() + 10
        for port in ports.values():
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        log = (tmp / "nginx-error.log").read_text()
                        raise SystemExit(f"nginx did not start: {log}") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        """Stop nginx (its kept connections close; the workers see EOF and drop them)."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        time.sleep(0.3)


def wrk(port: int, seconds: int, connections: int) -> tuple[int, int, float]:
    """(requests, errors incl. non-2xx and timeouts, p99 ms) of one wrk run on port."""
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(non2xx.group(1)) if non2xx else 0
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return requests, errors, float(p99.group(1)) * scale


def strace_counts(pids: list[int], port: int, seconds: int, connections: int) -> tuple[int, dict[str, int]]:
    """(requests, calls by name) of the workers over one wrk run under `strace -f -c`."""
    argv = ["strace", "-f", "-c", "-o", "/dev/stderr"]
    for pid in pids:
        argv += ["-p", str(pid)]
    tracer = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached
    requests, _, _ = wrk(port, seconds, connections)
    tracer.send_signal(signal.SIGINT)
    _, err = tracer.communicate(timeout=30)
    calls: dict[str, int] = {}
    for line in err.splitlines():
        fields = line.split()
        if len(fields) >= 5 and fields[-1] != "total" and fields[3].isdigit():
            calls[fields[-1]] = int(fields[3])
    return requests, calls


def measure(args: argparse.Namespace, tmp: Path, backend: str, fpm_pid: int) -> None:
    """The CPU rounds, then the strace rounds, printed."""
    paths = {"short": free_port(), "kept": free_port()}
    shared = Nginx(tmp, backend, args.pool, paths) if args.mixed else None

    def round_on(name: str, run):  # noqa: ANN001, ANN202 - a small local helper
        nginx = shared or Nginx(tmp, backend, args.pool, {name: paths[name]})
        try:
            wrk(paths[name], 1, args.connections)  # nginx's pool filled, the workers' code paged in
            return run(paths[name])
        finally:
            if shared is None:
                nginx.stop()

    cpu: dict[str, list[float]] = {name: [] for name in paths}
    p99: dict[str, list[float]] = {name: [] for name in paths}
    errors = dict.fromkeys(paths, 0)

    def cpu_round(name: str, port: int) -> None:
        before = tree_cpu_seconds(fpm_pid)
        requests, errs, tail = wrk(port, args.seconds, args.connections)
        cpu[name].append((tree_cpu_seconds(fpm_pid) - before) / requests * 1e6)
        p99[name].append(tail)
        errors[name] += errs

    try:
        for _ in range(args.rounds):
            for name in paths:
                round_on(name, lambda port, name=name: cpu_round(name, port))
        ratios = [k / s for k, s in zip(cpu["kept"], cpu["short"], strict=True)]
        mixed = " (mixed: one nginx)" if args.mixed else ""
        print(f"{args.transport}, {args.workers} workers, nginx keepalive {args.pool}, "
              f"wrk -c{args.connections}, {args.rounds} rounds of {args.seconds} s per path{mixed}")
        for name in paths:
            print(f"  {name:5}: CPU {statistics.median(cpu[name]):5.1f} µs/req "
                  f"(rounds {', '.join(f'{x:.1f}' for x in cpu[name])}), "
                  f"p99 median {statistics.median(p99[name]):.2f} ms, errors {errors[name]}")
        print(f"  kept / short CPU per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
        if args.no_strace:
            return
        workers = descendants(fpm_pid)
        count = perf_counts if args.perf else strace_counts
        for name in paths:
            requests, calls = round_on(name, lambda port: count(workers, port, args.seconds,
                                                                args.connections))
            per = ", ".join(f"{call} {n / requests:.2f}" for call, n in
                            sorted(calls.items(), key=lambda kv: -kv[1]) if n / requests >= 0.01)
            print(f"  {name:5} under {'perf' if args.perf else 'strace'}: {requests} requests, "
                  f"{sum(calls.values()) / requests:.2f} calls/request: {per}")
    finally:
        if shared is not None:
            shared.stop()


PERF_CALLS = ("accept4", "fcntl", "epoll_wait", "epoll_ctl", "recvfrom", "sendto", "close", "poll",
              "getrusage", "getppid")


def perf_counts(pids: list[int], port: int, seconds: int, connections: int) -> tuple[int, dict[str, int]]:
    """(requests, calls by name) of the workers over one wrk run, counted by `perf stat` on the
    syscall tracepoints: it does not slow the workers down as strace does, so nginx's connection
    churn is what it is without tracing."""
    argv = ["perf", "stat", "-x", ",", "-p", ",".join(map(str, pids)),
            *[arg for call in PERF_CALLS for arg in ("-e", f"syscalls:sys_enter_{call}")],
            "--", "sleep", str(seconds + 1)]
    counter = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    requests, _, _ = wrk(port, seconds, connections)
    _, err = counter.communicate(timeout=30)
    calls: dict[str, int] = {}
    for line in err.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
            calls[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
    return requests, calls


def main() -> None:
    """Start fastfpm and measure."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["unix", "tcp"], default="unix")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--pool", type=int, default=32, help="nginx upstream keepalive (default 32)")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--mixed", action="store_true", help="one nginx serving both paths throughout")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--perf", action="store_true",
                        help="count the calls with perf stat (syscall tracepoints) instead of strace")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ka-syscalls-") as tmp_name:
        tmp = Path(tmp_name)
        address = str(tmp / "fpm.sock") if args.transport == "unix" else f"127.0.0.1:{free_port()}"
        backend = f"unix:{address}" if args.transport == "unix" else address
        fpm = start_server(REPO, address, args.workers, ["benchmarks.apps:hello"], tmp / "fpm.log")
        try:
            measure(args, tmp, backend, fpm.pid)
        finally:
            os.killpg(fpm.pid, signal.SIGTERM)
            fpm.wait(10)


if __name__ == "__main__":
    main()
