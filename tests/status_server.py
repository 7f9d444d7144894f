"""The servers the status tests talk to: a fastfpm pool serving its own status page, and php-fpm.

`status_target()` is the server `status` and `top` are tested against (tests/test_statuscli.py,
tests/test_top.py): a fastfpm pool whose workers answer pm.status_path themselves, behind the
StatusTarget protocol, so the tests only use what it offers. `PhpFpm` is Debian's php-fpm 8.2
(which .ci/run installs), the one php-fpm launcher of the tests: tests/test_status.py compares
fastfpm's page with its page, format by format.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from fastfpm.client import FastCGIClient, FastCGIError, build_params
from tests.servers import ConfiguredServer, _stop_process, _tail, missing_requirement, wait_until

PHP_FPM = "php-fpm8.2"
STATUS_PATH = "/status"
PING_PATH = "/ping"


class StatusTarget(Protocol):
    """What the status tests need from a server: where it listens and how to keep a worker busy."""

    address: str
    status_path: str
    pool: str
    missing_path: str          # a path the server answers with a 404, not the status page
    busy_path: str             # the request URI path a busy() request shows in the status page

    def busy(self, seconds: float) -> threading.Thread:
        """Start a request that keeps one worker Running for about `seconds` (in a thread)."""
        ...


# ------------------------------------------------------------------ fastfpm, the server under test

STATUS_POOL = """\
[{pool}]
listen = {{dir}}/fpm.sock
app = tests.apps.slow:sleep_or_404
pm = static
pm.max_children = {children}
pm.status_path = {status_path}
"""


class FastfpmStatusPool:
    """`fastfpm serve -c FILE`: a static pool whose workers serve pm.status_path; its app sleeps
    on /sleep?ms=N and answers every other path with a 404."""

    def __init__(self, workdir: Path, pool: str = "www", children: int = 2) -> None:
        self.pool = pool
        self.status_path = STATUS_PATH
        self.busy_path = "/sleep"
        self.missing_path = "/missing"
        self.server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
        self.server.max_children = children
        self.server.rewrite(STATUS_POOL.format(pool=pool, children=children, status_path=STATUS_PATH))
        self.address = self.server.address

    def start(self) -> FastfpmStatusPool:
        """Start the master; every worker is accepting when it returns."""
        self.server.start()
        self.server.settled_workers()
        return self

    def busy(self, seconds: float) -> threading.Thread:
        """GET /sleep?ms=... in a thread: one worker is Running it for about `seconds`."""
        params = build_params("GET", self.busy_path, f"ms={int(seconds * 1000)}")

        def run() -> None:
            # A test that failed early may stop the server under it: that is not this thread's news.
            with contextlib.suppress(OSError, FastCGIError), \
                    FastCGIClient(self.address, timeout=seconds + 10) as client:
                client.request(params)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self.server.stop()


@contextlib.contextmanager
def status_target(make_dir: Callable[[str], Path], children: int = 2) -> Iterator[StatusTarget]:
    """The server under test (a fastfpm pool of `children` workers), started in a fresh directory
    and stopped afterwards."""
    server = FastfpmStatusPool(make_dir("fpm"), children=children)
    try:
        yield server.start()
    finally:
        server.stop()


# ------------------------------------------------------------------ php-fpm, the reference

PHP_FPM_CONF = """\
[global]
error_log = {dir}/php-fpm.log
pid = {dir}/php-fpm.pid

[{pool}]
listen = {dir}/php-fpm.sock
pm = static
pm.max_children = {children}
pm.status_path = {status_path}
ping.path = {ping_path}
"""


def php_fpm_binary() -> str:
    """php-fpm 8.2's binary; skip the test when it is missing (fail when CI is set)."""
    found = shutil.which(PHP_FPM) or next(
        (p for p in (f"/usr/sbin/{PHP_FPM}", f"/usr/local/sbin/{PHP_FPM}") if os.access(p, os.X_OK)), None)
    if found:
        return found
    missing_requirement(f"{PHP_FPM} is not installed (apt-get install php8.2-fpm); the comparison "
                        "tests need it")


class PhpFpm:
    """`php-fpm8.2 -n -y CONF -F` (no php.ini; -R as root): a static pool with a status page and
    ping on a unix socket in workdir."""

    def __init__(self, workdir: Path, pool: str = "www", children: int = 2) -> None:
        self.workdir = workdir
        self.pool = pool
        self.children = children
        self.status_path = STATUS_PATH
        self.ping_path = PING_PATH
        self.address = str(workdir / "php-fpm.sock")
        self.log_path = workdir / "php-fpm.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PhpFpm:
        """Write the configuration, start php-fpm, wait until it is ready."""
        binary = php_fpm_binary()
        conf = self.workdir / "php-fpm.conf"
        conf.write_text(PHP_FPM_CONF.format(dir=self.workdir, pool=self.pool, children=self.children,
                                            status_path=self.status_path, ping_path=self.ping_path))
        command = [binary, "-n", "-y", str(conf), "-F"] + (["-R"] if os.geteuid() == 0 else [])
        with open(self.workdir / "php-fpm.out", "wb") as out:
            self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        try:
            wait_until(self._ready, 10, message="php-fpm to be ready")
        except BaseException:
            self.stop()
            raise RuntimeError(f"php-fpm did not start:\n{_tail(self.log_path)}") from None
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"php-fpm exited with status {self.proc.returncode}")
        return "ready to handle connections" in _tail(self.log_path) and os.path.exists(self.address)

    def stop(self) -> None:
        """SIGQUIT (php-fpm's graceful stop), then SIGKILL the group if it lingers."""
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGQUIT, 5)
