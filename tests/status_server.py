"""The server whose status page `status` and `top` are tested against, behind one swappable fixture.

SERVER UNDER TEST: the real php-fpm 8.2 (Debian's php8.2-fpm, which .ci/run installs), whose
`?json&full` page fastfpm's own status page matches field for field. Once fastfpm serves
pm.status_path itself, `status_target` below should start a fastfpm pool instead (its docstring
says how); the tests only use what StatusTarget offers, so nothing else changes.
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
from tests.servers import _stop_process, _tail, missing_requirement, wait_until

PHP_FPM = "php-fpm8.2"
STATUS_PATH = "/status"

PHP_FPM_CONF = """\
[global]
error_log = {dir}/php-fpm.log
pid = {dir}/php-fpm.pid

[{pool}]
listen = {dir}/php-fpm.sock
pm = static
pm.max_children = {children}
pm.status_path = {status_path}
"""
# Sleeps ?ms=N milliseconds: a request that keeps a worker Running as long as a test needs.
SLEEP_PHP = '<?php usleep(intval($_GET["ms"] ?? 0) * 1000); echo "slept\\n";\n'


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


def php_fpm_binary() -> str:
    """php-fpm 8.2's binary; skip the test when it is missing (fail when CI is set)."""
    found = shutil.which(PHP_FPM) or next(
        (p for p in (f"/usr/sbin/{PHP_FPM}", f"/usr/local/sbin/{PHP_FPM}") if os.access(p, os.X_OK)), None)
    if found:
        return found
    missing_requirement(f"{PHP_FPM} is not installed (apt-get install php8.2-fpm); the status tests need it")


class PhpFpm:
    """`php-fpm8.2 -n -y CONF -R -F`: a static pool with a status page, on a unix socket in workdir."""

    def __init__(self, workdir: Path, pool: str = "www", children: int = 2) -> None:
        self.workdir = workdir
        self.pool = pool
        self.children = children
        self.status_path = STATUS_PATH
        self.address = str(workdir / "php-fpm.sock")
        self.log_path = workdir / "php-fpm.log"
        self.script = workdir / "sleep.php"
        self.busy_path = "/sleep.php"
        self.missing_path = "/missing.php"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PhpFpm:
        """Write the configuration and the script, start php-fpm, wait until it is ready."""
        binary = php_fpm_binary()
        conf = self.workdir / "php-fpm.conf"
        conf.write_text(PHP_FPM_CONF.format(dir=self.workdir, pool=self.pool, children=self.children,
                                            status_path=self.status_path))
        self.script.write_text(SLEEP_PHP)
        with open(self.workdir / "php-fpm.out", "wb") as out:
            self.proc = subprocess.Popen([binary, "-n", "-y", str(conf), "-R", "-F"],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
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

    def busy(self, seconds: float) -> threading.Thread:
        """GET /sleep.php?ms=... in a thread: one worker is Running it for about `seconds`."""
        params = build_params("GET", self.busy_path, f"ms={int(seconds * 1000)}",
                              extra={"SCRIPT_FILENAME": str(self.script)})

        def run() -> None:
            # A test that failed early may stop the server under it: that is not this thread's news.
            with contextlib.suppress(OSError, FastCGIError), \
                    FastCGIClient(self.address, timeout=seconds + 10) as client:
                client.request(params)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """SIGQUIT (php-fpm's graceful stop), then SIGKILL the group if it lingers."""
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGQUIT, 5)


@contextlib.contextmanager
def status_target(make_dir: Callable[[str], Path], children: int = 2) -> Iterator[StatusTarget]:
    """The server under test, started in a fresh directory and stopped afterwards.

    SERVER UNDER TEST: php-fpm 8.2 for now. To re-point the tests at fastfpm, yield instead a
    ConfiguredServer whose file sets `pm.status_path = /status` and `app = tests.apps.router:app`,
    given the attributes StatusTarget lists: pool "www", busy_path "/slow" with busy() sending
    GET /slow?seconds=S, and a missing_path the app answers with a 404 (a small route to add).
    """
    server = PhpFpm(make_dir("php-fpm"), children=children)
    try:
        yield server.start()
    finally:
        server.stop()
