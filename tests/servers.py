"""Real processes for the end-to-end tests: a fastfpm master, an nginx in front of it, an HTTP client.

Everything here starts real subprocesses on unix sockets inside a temporary directory or on
ephemeral 127.0.0.1 ports, so parallel test runs never clash. Processes are started in their own
process group and stopped by pid (never by name). `RUNNING` lists what is alive right now, so the
conftest hook can attach the logs of every running server to a failing test's report.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "NOTICE: ready to handle connections"
NGINX_MISSING = "nginx is not installed (apt-get install nginx); the end-to-end tests need it"

# Servers and nginx instances alive right now (appended on start, removed on stop).
RUNNING: list[FastFPMServer | Nginx] = []


def free_port(*hosts: str) -> int:
    """An ephemeral TCP port that was free a moment ago on every one of hosts (127.0.0.1 by default).

    Several loopback addresses (127.0.0.2, 127.0.0.3: Linux routes all of 127/8 to lo) stand for
    several machines listening on the same port, as a fleet of hosts does.
    """
    hosts = hosts or ("127.0.0.1",)
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((hosts[0], 0))
            port = sock.getsockname()[1]
        if all(_port_free(host, port) for host in hosts[1:]):
            return port


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll predicate until it returns something truthy (returned), or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def child_pids(parent: int) -> list[int]:
    """Pids of the live processes whose parent is `parent`, read from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces or parentheses itself.
        fields = stat[stat.rfind(b")") + 2:].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != b"Z":
            found.append(int(entry))
    return sorted(found)


def process_gone(pid: int) -> bool:
    """True once pid has exited: no such process, or a zombie nobody reaped yet (an orphan's
    new parent in a container may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rfind(b")") + 2:].split()[0] in (b"Z", b"X")


def peak_rss_kib(pid: int) -> int:
    """VmHWM (peak resident set size) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for pid {pid}")


def _tail(path: Path, limit: int = 20000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int | None:
    """Send sig to proc, wait up to timeout, then SIGKILL its whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left of the group (workers of a master that died, say) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    return proc.returncode


class FastFPMServer:
    """`python -m fastfpm serve APP` as a subprocess, listening on a unix socket or a TCP port
    (host:port; an ephemeral port on 127.0.0.1 unless given)."""

    def __init__(self, app: str, workdir: Path, transport: str = "unix", max_children: int = 2,
                 extra_args: Iterable[str] = (), ready_timeout: float = 15.0,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        if transport not in ("unix", "tcp"):
            raise ValueError(f"transport must be 'unix' or 'tcp', not {transport!r}")
        self.app = app
        self.workdir = workdir
        self.transport = transport
        self.max_children = max_children
        self.extra_args = list(extra_args)
        self.ready_timeout = ready_timeout
        self.log_path = workdir / "fastfpm.log"
        if "--error-log" in self.extra_args:  # fastfpm writes its log there; stdout/stderr too
            self.log_path = Path(self.extra_args[self.extra_args.index("--error-log") + 1])
        self.host = host
        if transport == "unix":
            self.socket_path: Path | None = workdir / "fpm.sock"
            self.port: int | None = None
            self.address = str(self.socket_path)
        else:
            self.socket_path = None
            self.port = port or free_port(host)
            self.address = f"{host}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The master's pid."""
        assert self.proc is not None, "the server was not started"
        return self.proc.pid

    @property
    def nginx_pass(self) -> str:
        """The address as nginx's fastcgi_pass (and upstream `server`) spells it."""
        return f"unix:{self.socket_path}" if self.socket_path else self.address

    def command(self) -> list[str]:
        """The command line that starts the server."""
        app = [self.app] if self.app else []  # no app: the built-in demo
        if "-c" in self.extra_args:  # the configuration file sets the addresses and the sizes
            return [sys.executable, "-m", "fastfpm", "serve", *app, "-R", *self.extra_args]
        return [sys.executable, "-m", "fastfpm", "serve", *app, "--listen", self.address,
                "--max-children", str(self.max_children), "-R", *self.extra_args]

    def start(self) -> FastFPMServer:
        """Start the master and wait until its log says every worker is accepting."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONFAULTHANDLER"] = "1"  # a crashing worker leaves its Python stack in the log
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True)
        RUNNING.append(self)
        try:
            wait_until(self._ready, self.ready_timeout, interval=0.02, message=repr(READY_LINE))
        except BaseException as exc:
            self.stop()
            raise RuntimeError(f"fastfpm did not become ready ({exc}); command: {self.command()}\n"
                               f"--- log ---\n{self.log_text()}") from None
        return self

    def _ready(self) -> bool:
        if READY_LINE in self.log_text():
            return True
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"fastfpm exited with status {self.proc.returncode}")
        return False

    def log_text(self) -> str:
        """The whole error log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """Bytes in the error log so far (a mark for log_since)."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, mark: int) -> str:
        """The log written after mark (from log_size())."""
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def wait_for_log(self, needle: str, mark: int = 0, timeout: float = 5.0) -> str:
        """Poll until needle appears in the log after mark; return the log after mark."""
        def found() -> str:
            text = self.log_since(mark)
            return text if needle in text else ""

        return wait_until(found, timeout, message=f"{needle!r} in the fastfpm log")

    def worker_pids(self) -> list[int]:
        """Pids of the master's live children."""
        return child_pids(self.pid)

    def settled_workers(self, timeout: float = 10.0) -> list[int]:
        """Wait until all max_children workers are alive (a respawn may be under way); their pids."""
        def complete() -> list[int]:
            pids = self.worker_pids()
            return pids if len(pids) == self.max_children else []

        return wait_until(complete, timeout, message=f"{self.max_children} workers")

    def signal(self, sig: int) -> None:
        """Send sig to the master."""
        os.kill(self.pid, sig)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A plain socket connected to the listen address (for raw FastCGI records)."""
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = str(self.socket_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (self.host, self.port)
        sock.settimeout(timeout)
        sock.connect(target)
        return sock

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the master, wait, then SIGKILL whatever is left of its process group."""
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc is None:
            return None
        return _stop_process(self.proc, signal.SIGTERM, timeout)

    def describe(self) -> str:
        """A title for failure reports."""
        return f"fastfpm {self.app} on {self.address} ({self.log_path})"

    def report_text(self) -> str:
        """The log for a failure report."""
        return _tail(self.log_path)


class ConfiguredServer(FastFPMServer):
    """`serve -c FILE`, with or without -R (the harness always passes it). The file sets the listen
    address; transport, host and port say which one `{listen}` in the text stands for."""

    def __init__(self, workdir: Path, conf: Path, allow_root: bool = True,
                 extra_args: tuple[str, ...] = (), transport: str = "unix",
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        super().__init__("", workdir, transport, extra_args=["-c", str(conf), *extra_args],
                         host=host, port=port)
        self.conf = conf
        self.allow_root = allow_root

    def command(self) -> list[str]:
        """The harness's command, minus -R when the test wants the refusal."""
        command = super().command()
        if not self.allow_root:
            command.remove("-R")
        return command

    def rewrite(self, body: str) -> None:
        """Replace the configuration file ({dir} is the server's directory, {listen} its address)."""
        self.conf.write_text(body.replace("{dir}", str(self.workdir)).replace("{listen}", self.address))


def server_busy(server) -> bool:
    """True once the only worker is sleeping inside the app (its wchan shows it waiting)."""
    pids = server.worker_pids()
    if not pids:
        return False
    with open(f"/proc/{pids[0]}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Blocked in accept() and blocked in sleep() both show S; the syscall tells them apart.
    with open(f"/proc/{pids[0]}/syscall") as f:
        syscall = f.read().split()[0]
    return fields[0] == "S" and syscall not in ("43", "288")  # not accept(2) / accept4(2)


# --- commands and configuration files ---------------------------------------------------------


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`python -m fastfpm ARGS` to completion."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "fastfpm", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def serve_as_systemd(args: list[str], env: dict[str, str], **popen: object) -> subprocess.Popen[bytes]:
    """fastfpm serve as systemd would start it."""
    return subprocess.Popen([sys.executable, "-m", "fastfpm", "serve", *args, "-R"], cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)  # type: ignore[arg-type]


def serve_socket_activated(conf: Path, listener: socket.socket) -> subprocess.Popen[bytes]:
    """`fastfpm serve -c conf` as systemd starts it for a .socket unit: listener passed as fd 3 with
    LISTEN_PID and LISTEN_FDS=1; stderr (the log) piped for read_until_ready."""
    fd = listener.fileno()

    def as_fd_3() -> None:
        os.dup2(fd, 3)  # systemd passes sockets from fd 3 (SD_LISTEN_FDS_START)

    # LISTEN_PID must be the server's own pid: the shell exports its $$, then exec keeps it.
    command = f"LISTEN_PID=$$ LISTEN_FDS=1 exec {sys.executable} -m fastfpm serve -c {conf} -R"
    return subprocess.Popen(["sh", "-c", command], cwd=REPO_ROOT, preexec_fn=as_fd_3, pass_fds=(fd, 3),
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def read_until_ready(proc: subprocess.Popen[bytes]) -> bytes:
    """The log a master writes to its piped stderr, up to and including READY_LINE."""
    log = b""
    while READY_LINE.encode() not in log:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        assert line, log.decode()
        log += line
    return log


@contextlib.contextmanager
def notified_master(conf: Path, notify_path: Path, env: dict[str, str] | None = None
                    ) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """`fastfpm serve -c conf` as systemd starts it, and the notify socket it reports to (bound at
    notify_path, 10 s receive timeout): (process, socket). A master still running is killed at the end."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(10)
        proc = serve_as_systemd(["-c", str(conf)], {"NOTIFY_SOCKET": str(notify_path), **(env or {})})
        try:
            yield proc, notify
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)


def write_config(path: Path, body: str) -> Path:
    """A config file with the given text (dedented by the caller)."""
    path.write_text(body)
    return path


# --- nginx ------------------------------------------------------------------------------------


# What every nginx.conf the tests write starts with: one foreground nginx, its files in the test's
# directory ({prefix}), and the temporary paths inside http {}, which must not be nginx's defaults
# under /var/lib/nginx (not writable, or another nginx's).
NGINX_MAIN = """\
{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
"""
NGINX_TEMP_PATHS = """\
    client_body_temp_path {prefix}/client_body_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    proxy_temp_path {prefix}/proxy_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
"""

NGINX_CONF = NGINX_MAIN + """
events {{
    worker_connections 512;
}}

http {{
    access_log {prefix}/access.log;
""" + NGINX_TEMP_PATHS + """    client_max_body_size 200m;
    fastcgi_connect_timeout 5s;
    fastcgi_send_timeout 20s;
    fastcgi_read_timeout 20s;

    upstream fastfpm_keepalive {{
        server {backend};
        keepalive 8;
    }}

    # One FastCGI connection per request (nginx's default).
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass {backend};
        }}
    }}

    # Kept-alive FastCGI connections from an upstream pool.
    server {{
        listen 127.0.0.1:{keepalive_port};
        server_name localhost;
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_keep_conn on;
            fastcgi_pass fastfpm_keepalive;
        }}
    }}
}}
"""


def missing_requirement(message: str, *, module_level: bool = False) -> NoReturn:
    """Skip for a tool, library or permission this machine lacks, or fail when CI is set: .ci/run
    installs everything the tests need, so a skip there would hide a broken install step."""
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set, so these tests may not be skipped)", pytrace=False)
    pytest.skip(message, allow_module_level=module_level)


def nginx_binary() -> str:
    """The nginx binary; skip the test if it is missing, or fail when CI is set."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found:
        return found
    missing_requirement(NGINX_MISSING)


class Nginx:
    """An nginx in front of one fastfpm backend, with stock fastcgi_params.

    `port` passes each request over a fresh FastCGI connection; `keepalive_port` goes through an
    upstream pool with `keepalive 8` and `fastcgi_keep_conn on`.
    """

    def __init__(self, binary: str, workdir: Path, backend: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.backend = backend
        self.port = free_port()
        self.keepalive_port = free_port()
        while self.keepalive_port == self.port:
            self.keepalive_port = free_port()
        self.conf_path = workdir / "nginx.conf"
        self.error_log = workdir / "error.log"
        self.access_log = workdir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        """The nginx.conf text."""
        # A root master hands its workers to `nobody`, who could not reach the 0660 socket or
        # the temp directories; these tests run as root, so the workers stay root too.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return NGINX_CONF.format(user=user, prefix=self.workdir, backend=self.backend,
                                 port=self.port, keepalive_port=self.keepalive_port)

    def start(self, timeout: float = 10.0) -> Nginx:
        """Write the config, start nginx and wait until both ports accept connections."""
        self.conf_path.write_text(self.config())
        with open(self.workdir / "nginx.stderr", "wb") as out:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf_path), "-p", str(self.workdir),
                 "-e", str(self.error_log)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        RUNNING.append(self)
        try:
            wait_until(self._listening, timeout, message="nginx to listen")
        except BaseException as exc:
            self.stop()
            raise RuntimeError(f"nginx did not start ({exc})\n--- error log ---\n"
                               f"{_tail(self.error_log)}\n--- stderr ---\n"
                               f"{_tail(self.workdir / 'nginx.stderr')}") from None
        return self

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited with status {self.proc.returncode}")
        for port in (self.port, self.keepalive_port):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
        return True

    def error_log_text(self) -> str:
        """nginx's error log so far."""
        return _tail(self.error_log, limit=10**9)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Fast shutdown (SIGTERM), then SIGKILL of the group if it lingers."""
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc is None:
            return None
        return _stop_process(self.proc, signal.SIGTERM, timeout)

    def describe(self) -> str:
        """A title for failure reports."""
        return f"nginx :{self.port}/:{self.keepalive_port} -> {self.backend} ({self.error_log})"

    def report_text(self) -> str:
        """The error log for a failure report."""
        return _tail(self.error_log)


@dataclass
class Stack:
    """fastfpm with nginx in front of it."""

    fpm: FastFPMServer
    nginx: Nginx

    @property
    def port(self) -> int:
        """nginx's port with one FastCGI connection per request."""
        return self.nginx.port


ServerT = TypeVar("ServerT", bound="FastFPMServer | Nginx")


class Launcher:
    """Starts servers in fresh temporary directories and stops them all in close()."""

    def __init__(self, make_dir: Callable[[str], Path]) -> None:
        self._make_dir = make_dir
        self._started: list[FastFPMServer | Nginx] = []

    def directory(self, name: str) -> Path:
        """A fresh temporary directory for a server of one's own making."""
        return self._make_dir(name)

    def start(self, server: ServerT) -> ServerT:
        """Start a server made by the caller (stopped in close(), nginx first as always)."""
        self._started.append(server)
        server.start()
        return server

    def fastfpm(self, app: str, transport: str = "unix", max_children: int = 2,
                extra_args: Iterable[str] = ()) -> FastFPMServer:
        """Start a fastfpm server (stopped in close())."""
        server = FastFPMServer(app, self._make_dir("fpm"), transport, max_children, extra_args)
        self._started.append(server)
        return server.start()

    def nginx(self, backend: FastFPMServer) -> Nginx:
        """Start an nginx in front of backend (stopped in close()); skip or fail if nginx is missing."""
        server = Nginx(nginx_binary(), self._make_dir("nginx"), backend.nginx_pass)
        self._started.append(server)
        return server.start()

    def stack(self, app: str, transport: str = "unix", max_children: int = 2,
              extra_args: Iterable[str] = ()) -> Stack:
        """nginx in front of a fresh fastfpm."""
        binary = nginx_binary()  # skip before starting anything when nginx is missing
        fpm = self.fastfpm(app, transport, max_children, extra_args)
        web = Nginx(binary, self._make_dir("nginx"), fpm.nginx_pass)
        self._started.append(web)
        return Stack(fpm, web.start())

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything started, nginx first."""
        for server in sorted(reversed(self._started), key=lambda s: not isinstance(s, Nginx)):
            server.stop()
        self._started.clear()


# --- HTTP -------------------------------------------------------------------------------------


@dataclass
class HTTPResult:
    """A complete HTTP response."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        """One header's value (the first, if repeated)."""
        return self.headers.get(name)

    def json(self) -> Any:
        """The body parsed as JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            raise AssertionError(f"not JSON ({self.status} {self.reason}): {self.body[:2000]!r}") from None


def http_connection(port: int, timeout: float = 30.0) -> http.client.HTTPConnection:
    """An HTTP/1.1 connection to nginx on 127.0.0.1:port (kept alive between requests)."""
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def http_request(port: int | http.client.HTTPConnection, method: str, path: str,
                 headers: dict[str, str] | None = None, body: bytes | None = None,
                 timeout: float = 30.0) -> HTTPResult:
    """One request; port may be an open connection to reuse (keep-alive), which stays open."""
    own = not isinstance(port, http.client.HTTPConnection)
    conn = http_connection(port, timeout) if own else port  # type: ignore[arg-type]
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return HTTPResult(resp.status, resp.reason, resp.msg, data)
    finally:
        if own:
            conn.close()


def http_get(port: int | http.client.HTTPConnection, path: str,
             headers: dict[str, str] | None = None) -> HTTPResult:
    """GET path."""
    return http_request(port, "GET", path, headers)


def http_upload(port: int, path: str, chunks: Iterable[bytes], length: int,
                headers: dict[str, str] | None = None, timeout: float = 60.0) -> HTTPResult:
    """POST a body of exactly `length` bytes, sent chunk by chunk as the iterable yields them."""
    conn = http_connection(port, timeout)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Length", str(length))
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        for chunk in chunks:
            conn.send(chunk)
        resp = conn.getresponse()
        return HTTPResult(resp.status, resp.reason, resp.msg, resp.read())
    finally:
        conn.close()


@dataclass
class Download:
    """A streamed response body, counted and hashed rather than kept."""

    status: int
    headers: http.client.HTTPMessage
    size: int
    sha256: str


def http_download(port: int, path: str, chunk_size: int = 1 << 20, timeout: float = 60.0) -> Download:
    """GET path and hash the body as it streams in, never holding more than chunk_size of it."""
    conn = http_connection(port, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        digest = hashlib.sha256()
        size = 0
        while chunk := resp.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
        return Download(resp.status, resp.msg, size, digest.hexdigest())
    finally:
        conn.close()


def random_chunks(total: int, digest: Any, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Random bytes, `total` of them in chunks, fed to digest as they are produced."""
    left = total
    while left > 0:
        chunk = os.urandom(min(chunk_size, left))
        digest.update(chunk)
        left -= len(chunk)
        yield chunk


@contextlib.contextmanager
def forked_slot_worker(socket_path: Path, app: Callable[..., Any], pool: Any,
                       pool_name: str = "test", *, app_for: Callable[[Any, int], Any] | None = None,
                       routes: dict[str, Callable[..., Any]] | None = None,
                       before_fork: Callable[[Any], Any] | None = None) -> Iterator[tuple[Any, str, int]]:
    """A real worker loop forked from the test, serving app on socket_path from slot 1 of a fresh
    scoreboard: (scoreboard, socket path, pid). A `fastfpm serve` master's scoreboard is an
    anonymous mapping only it and its workers see, so tests of the slot's contents read this one.
    app_for(mapping, slot index), when given, makes the app from the scoreboard (a status page);
    before_fork(scoreboard), when given, runs before the fork (what the worker is to inherit)."""
    from fastfpm._core import Worker
    from fastfpm.address import create_listen_socket, parse_address
    from fastfpm.log import ErrorLog
    from fastfpm.scoreboard import Scoreboard
    from fastfpm.worker import environ_template, set_accept_timeout

    board = Scoreboard(2, pool_name)
    listener = create_listen_socket(parse_address(str(socket_path)))
    board.claim(1, 0)
    if app_for is not None:
        app = app_for(board.mapping, 1)
    if before_fork is not None:
        before_fork(board)
    pid = os.fork()
    if pid == 0:  # the worker: serve until killed
        try:
            set_accept_timeout(listener.fileno())
            log = ErrorLog(None, "warning")
            Worker(listener.fileno(), app, environ_template=environ_template(pool), log=log.log,
                   log_exception=log.exception, scoreboard=board.mapping, slot_index=1,
                   routes=routes).serve()
        finally:
            os._exit(0)
    board.set_pid(1, pid)
    try:
        yield board, str(socket_path), pid
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        listener.close()
