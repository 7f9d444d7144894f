#!/usr/bin/env python3
"""How long normal requests wait while silent or trickling connections are held open against a pool.

    python benchmarks/slowclients.py --silent 8 --workers 4 --transport unix
    python benchmarks/slowclients.py --silent 8 --transport tcp --reconnect --requests 100 --interval 0.05
    python benchmarks/slowclients.py --trickle 8 --server-args "--idle-timeout 5"
    python benchmarks/slowclients.py --repo ../baseline --silent 8     # another checkout's fastfpm

A silent connection connects and sends nothing; a trickling one sends a valid FastCGI request one
byte per second. With --reconnect each one that the server closes is opened again at once (an
attacker who keeps at it). While they are held, --requests normal GETs go one after another
through the project's client (each on a fresh connection, as nginx sends them), and the time each
waited is reported (--interval spaces them out). The server is `python -m fastfpm serve` with the
built-in demo app.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY = "NOTICE: ready to handle connections"


def free_port() -> int:
    """An ephemeral 127.0.0.1 port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(repo: Path, address: str, workers: int, extra: list[str],
                 log: Path) -> subprocess.Popen[bytes]:
    """`fastfpm serve` from repo on address; returns once its log says it is ready."""
    env = dict(os.environ, PYTHONPATH=str(repo), PYTHONDONTWRITEBYTECODE="1")
    command = [sys.executable, "-m", "fastfpm", "serve", "--listen", address, "--max-children", str(workers),
               "--pm", "static", "-R", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 20
    while READY not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def connect(address: str) -> socket.socket:
    """A connected socket to address (a unix path or 127.0.0.1:port)."""
    if address.startswith("/"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address)
    else:
        host, port = address.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)))
    return sock


def request_bytes() -> bytes:
    """A whole GET / as nginx sends it, built with the reference codec."""
    from fastfpm import protocol as p

    pairs = p.encode_pairs([(b"REQUEST_METHOD", b"GET"), (b"SCRIPT_NAME", b"/"), (b"REQUEST_URI", b"/"),
                            (b"SERVER_PROTOCOL", b"HTTP/1.1"), (b"QUERY_STRING", b"")])
    return (p.encode_begin_request(1) + p.encode_stream(p.PARAMS, 1, pairs) + p.encode_record(p.PARAMS, 1)
            + p.encode_record(p.STDIN, 1))


class Attackers:
    """count connections held open, silent or trickling a byte a second; reopened when closed if asked."""

    def __init__(self, address: str, count: int, trickle: bool, reconnect: bool) -> None:
        self.address, self.trickle, self.reconnect = address, trickle, reconnect
        self.payload = request_bytes()
        self.socks: list[tuple[socket.socket, int]] = [(connect(address), 0) for _ in range(count)]
        self.closed_by_server = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        next_byte = time.monotonic() + 1
        while not self.stop.is_set():
            readable, _, _ = select.select([s for s, _ in self.socks], [], [], 0.05)
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.closed_by_server += 1
                    index = next(i for i, (s, _) in enumerate(self.socks) if s is sock)
                    sock.close()
                    if self.reconnect:
                        self.socks[index] = (connect(self.address), 0)
                    else:
                        del self.socks[index]
            if self.trickle and time.monotonic() >= next_byte:
                next_byte += 1
                for i, (sock, sent) in enumerate(self.socks):
                    if sent < len(self.payload):
                        try:
                            sock.send(self.payload[sent:sent + 1])
                        except OSError:
                            continue
                        self.socks[i] = (sock, sent + 1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for sock, _ in self.socks:
            sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose fastfpm to run")
    parser.add_argument("--transport", choices=("unix", "tcp"), default="unix")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--silent", type=int, default=0, help="silent connections to hold open")
    parser.add_argument("--trickle", type=int, default=0, help="connections sending a byte a second")
    parser.add_argument("--reconnect", action="store_true", help="reopen each one the server closes")
    parser.add_argument("--requests", type=int, default=20, help="normal requests, one after another")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between normal requests")
    parser.add_argument("--timeout", type=float, default=30.0, help="a normal request's client timeout")
    parser.add_argument("--server-args", default="", help="more `fastfpm serve` arguments")
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo))
    from fastfpm.client import FastCGIClient, build_params

    workdir = Path(tempfile.mkdtemp(prefix="slowclients-"))
    address = str(workdir / "fpm.sock") if args.transport == "unix" else f"127.0.0.1:{free_port()}"
    server = start_server(args.repo.resolve(), address, args.workers, shlex.split(args.server_args),
                          workdir / "fastfpm.log")
    attackers = None
    try:
        if args.silent or args.trickle:
            attackers = Attackers(address, args.silent or args.trickle, bool(args.trickle), args.reconnect)
            time.sleep(0.5)  # let the workers take them
        waits, failed = [], 0
        for _ in range(args.requests):
            started = time.monotonic()
            try:
                with FastCGIClient(address, timeout=args.timeout) as client:
                    response = client.request(build_params("GET", "/", "", {}, None, {}))
                ok = response.status == 200
            except Exception:
                ok = False
            waits.append(time.monotonic() - started)
            failed += not ok
            time.sleep(args.interval)
        closed = attackers.closed_by_server if attackers else 0
    finally:
        if attackers:
            attackers.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
    kind = "silent" if args.silent else "trickling" if args.trickle else "attacking"
    print(f"{args.transport}, {args.workers} workers, {args.silent or args.trickle} {kind} connections"
          f"{' (reconnecting)' if args.reconnect else ''}, server args {args.server_args!r}:")
    print(f"  {args.requests - failed}/{args.requests} answered; wait median "
          f"{statistics.median(waits) * 1000:.1f} ms, max {max(waits) * 1000:.1f} ms, "
          f"total {sum(waits):.2f} s; {closed} attacker connections closed by the server")


if __name__ == "__main__":
    main()
