"""One whole request through a real worker, without nginx: environ building, the app call, the response.

A fastfpm pool with one worker serves ``benchmarks.apps:hello`` on a unix socket; the benchmark sends
the bytes nginx would send (stock fastcgi_params plus browser headers) and reads the answer up to
FCGI_END_REQUEST. The raw C responder (benchmarks/responders/raw_hello.c, the floor) answers the same
bytes in the same group, so the difference is what fastfpm spends per request on top of the syscalls
and the Python client both share. The parts are also measured in-process: environ building in
test_environ_bench.py, the response path in test_response_bench.py.

Run with ``python -m pytest benchmarks/micro --benchmark-enable``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.micro.nginx_request import request_bytes

REPO = Path(__file__).resolve().parents[2]
RESPONDERS = REPO / "benchmarks" / "responders"
END_REQUEST = 3


def _wait_ready(proc: subprocess.Popen[bytes], sock: Path, log: Path, needle: str | None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        ready = needle is None or needle in log.read_text(errors="replace")
        if ready and sock.exists():
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(sock))
                return
            except OSError:
                pass
        time.sleep(0.05)
    pytest.fail(f"server not ready: {log.read_text(errors='replace')[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


def _start_fastfpm(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "fastfpm.sock"
    log = tmp / "fastfpm.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    argv = [sys.executable, "-m", "fastfpm", "serve", "benchmarks.apps:hello", "--listen", str(sock)]
    argv += ["--max-children", "1"] + (["-R"] if os.geteuid() == 0 else [])
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    _wait_ready(proc, sock, log, "ready to handle connections")
    return proc, sock


def _start_raw_c(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the raw C responder")
    binary = tmp / "raw_hello"
    subprocess.run([cc, "-O2", "-o", str(binary), str(RESPONDERS / "raw_hello.c")], check=True)
    sock = tmp / "raw.sock"
    log = tmp / "raw.log"
    with open(log, "wb") as out:
        argv = [str(binary), str(sock), "1", "hello"]
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_ready(proc, sock, log, None)
    return proc, sock


@pytest.fixture(scope="module", params=["fastfpm", "raw-c"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A one-worker server on a unix socket; yields the socket path."""
    tmp = tmp_path_factory.mktemp(request.param)
    if request.param == "fastfpm":
        try:
            import fastfpm._core  # noqa: F401
        except ImportError:
            pytest.skip("fastfpm._core is not built")
        proc, sock = _start_fastfpm(tmp)
    else:
        proc, sock = _start_raw_c(tmp)
    try:
        yield sock
    finally:
        _stop(proc)


def _read_response(conn: socket.socket) -> bytes:
    """Read records until FCGI_END_REQUEST (the last record of every response)."""
    buf = bytearray()
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed before END_REQUEST")
        buf += chunk
        if len(buf) >= 16 and buf[-16] == 1 and buf[-15] == END_REQUEST:
            return bytes(buf)


@pytest.mark.benchmark(group="round trip: connect, hello, close")
def test_request_new_connection(benchmark, server: Path) -> None:
    """A fresh connection per request, as nginx does without fastcgi_keep_conn."""
    request = request_bytes()

    def one() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(server))
            conn.sendall(request)
            return _read_response(conn)

    assert b"Hello, world!" in benchmark(one)


@pytest.mark.benchmark(group="round trip: hello on a kept connection")
def test_request_kept_connection(benchmark, server: Path) -> None:
    """Requests on one connection with FCGI_KEEP_CONN, as nginx does with fastcgi_keep_conn on."""
    request = request_bytes(keep_conn=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(server))

        def one() -> bytes:
            conn.sendall(request)
            return _read_response(conn)

        assert b"Hello, world!" in benchmark(one)
