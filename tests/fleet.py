"""Several fastfpm hosts behind one nginx upstream, and an HTTP load through it (issue 11).

A "host" is a fastfpm master on a loopback address of its own (127.0.0.2, 127.0.0.3: Linux routes
all of 127/8 to lo), every host on the same port, as a fleet of machines would listen. nginx in
front balances them with the upstream settings docs/scaling.md recommends, and logs for every
request which hosts it tried, with what result and how many bytes it had sent to each, so a test
can tell a request that was in flight on a host that died from one nginx merely tried to connect to.

`benchmarks/failover.py` drives the same fleet with wrk; the processes are the tests' harness
(tests/servers.py), so there is one definition of a host and of its nginx.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import (
    NGINX_MAIN,
    NGINX_TEMP_PATHS,
    ConfiguredServer,
    Launcher,
    Nginx,
    free_port,
    nginx_binary,
    wait_until,
)

HOSTS = ("127.0.0.2", "127.0.0.3")

# One host's configuration file: a static pool with the status page and ping an operator (and a
# load balancer's health checks) reads. {app}, {workers} are filled here, {listen} by the harness.
HOST_CONF = """\
[global]
process_control_timeout = 20s

[www]
app = {app}
listen = {{listen}}
pm = static
pm.max_children = {workers}
pm.status_path = /status
ping.path = /ping
"""

# The parameters of each upstream `server` line, as docs/scaling.md gives them.
SERVER_PARAMS = "max_fails=3 fail_timeout=10s"

# The settings docs/scaling.md recommends in front of several fastfpm hosts, plus what the tests
# read: the access log says, per request, each host tried, its status and the bytes sent to it.
UPSTREAM_CONF = NGINX_MAIN + """\

events {{
    worker_connections 1024;
}}

http {{
    log_format upstreams '$http_x_load_id $request_method $status '
                         '"$upstream_addr" "$upstream_status" "$upstream_bytes_sent"';
    access_log {prefix}/access.log upstreams;
""" + NGINX_TEMP_PATHS + """    keepalive_requests 1000000;

    fastcgi_connect_timeout 1s;
    fastcgi_next_upstream error timeout;
    fastcgi_next_upstream_tries 2;
    fastcgi_send_timeout 20s;
    fastcgi_read_timeout 20s;

    upstream fastfpm_hosts {{
        least_conn;
{servers}
        keepalive 16;
        keepalive_timeout 4s;
    }}

    # A fresh FastCGI connection per request.
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_pass fastfpm_hosts;
        }}
    }}

    # Kept-alive FastCGI connections (docs/scaling.md's choice).
    server {{
        listen 127.0.0.1:{keepalive_port};
        location / {{
            include /etc/nginx/fastcgi_params;
            fastcgi_keep_conn on;
            fastcgi_pass fastfpm_hosts;
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Attempt:
    """One host nginx tried for a request: its address, the status nginx got (502 when the
    connection failed or was closed without an answer, "-" when the client went away first) and
    the bytes nginx had sent it (0: the request never reached it)."""

    address: str
    status: str
    bytes_sent: int


@dataclass(frozen=True)
class Logged:
    """One line of the fleet's access log."""

    load_id: str
    method: str
    status: int
    attempts: tuple[Attempt, ...]

    def lost_on(self, address: str) -> bool:
        """True when the request reached address and got no answer there: it was in flight on a
        host that died (nginx then passed it on, or failed it)."""
        return any(a.address == address and a.bytes_sent > 0 and a.status in ("502", "504")
                   for a in self.attempts)


def parse_access_line(line: str) -> Logged:
    """A line of UPSTREAM_CONF's `upstreams` log format."""
    parts = line.split('"')  # head "addrs" "statuses" "bytes": the quoted fields are 1, 3 and 5
    load_id, method, status = parts[0].split()
    if parts[1] == "-":  # answered by nginx itself, no host tried
        return Logged(load_id, method, int(status), ())
    fields = [parts[i].split(", ") for i in (1, 3, 5)]
    attempts = tuple(Attempt(a, s, int(b) if b.isdigit() else 0) for a, s, b in zip(*fields, strict=True))
    return Logged(load_id, method, int(status), attempts)


class UpstreamNginx(Nginx):
    """nginx in front of several fastfpm hosts through one upstream group (UPSTREAM_CONF).

    `port` gives each request a fresh FastCGI connection; `keepalive_port` keeps them alive.
    """

    def __init__(self, binary: str, workdir: Path, servers: Sequence[str],
                 server_params: str = SERVER_PARAMS) -> None:
        super().__init__(binary, workdir, ", ".join(servers))
        self.servers = list(servers)
        self.server_params = server_params

    def config(self) -> str:
        """The nginx.conf text."""
        user = "user root;\n" if os.geteuid() == 0 else ""
        servers = "\n".join(f"        server {s} {self.server_params};" for s in self.servers)
        return UPSTREAM_CONF.format(user=user, prefix=self.workdir, servers=servers,
                                    port=self.port, keepalive_port=self.keepalive_port)

    def access_log_entries(self) -> list[Logged]:
        """Every request logged so far (nginx writes a line once the request is over)."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [parse_access_line(line) for line in text.splitlines() if line.strip()]


@dataclass
class Fleet:
    """fastfpm hosts (same port, one loopback address each) and the nginx in front of them."""

    hosts: list[ConfiguredServer]
    nginx: UpstreamNginx

    def port(self, keepalive: bool) -> int:
        """nginx's port with kept-alive FastCGI connections, or with a fresh one per request."""
        return self.nginx.keepalive_port if keepalive else self.nginx.port


def start_fleet(launcher: Launcher, app: str, workers: int = 4, addresses: Sequence[str] = HOSTS) -> Fleet:
    """Start one fastfpm host per address, all on one port, and an nginx upstream over them."""
    binary = nginx_binary()  # skip (or fail under CI) before starting anything without nginx
    port = free_port(*addresses)
    hosts = []
    for address in addresses:
        workdir = launcher.directory("host")
        host = ConfiguredServer(workdir, workdir / "fastfpm.conf", transport="tcp", host=address, port=port)
        host.max_children = workers  # what settled_workers() waits for
        host.rewrite(HOST_CONF.format(app=app, workers=workers))
        hosts.append(launcher.start(host))
    web = UpstreamNginx(binary, launcher.directory("nginx"), [h.address for h in hosts])
    return Fleet(hosts, launcher.start(web))


def process_group(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group pgid, from /proc/*/stat."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            found.append(int(entry))
    return found


def kill_host(host: ConfiguredServer, timeout: float = 10.0) -> int:
    """The host dies as a machine does: SIGKILL to its master and every worker at once (the
    process group the harness started it in). Returns once none is left, so its sockets are
    closed; the number of processes killed."""
    members = process_group(host.pid)
    os.killpg(host.pid, signal.SIGKILL)
    wait_until(lambda: not process_group(host.pid), timeout, message=f"{host.address}'s processes to die")
    assert host.proc is not None
    host.proc.wait(timeout)  # the master was the harness's child: reap it
    return len(members)


# --- load -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One request of the load: which client sent it, its status (0: no HTTP answer from nginx),
    its body, and the load's phase when it was sent and when its answer came (see HTTPLoad.mark)."""

    load_id: str
    method: str
    status: int
    body: bytes
    sent_in: int
    answered_in: int


Request = Callable[[int, int], tuple[str, str, bytes | None]]


@dataclass
class HTTPLoad:
    """`clients` threads, each on a kept-alive HTTP connection to nginx on 127.0.0.1:port, sending
    request(client, n) -> (method, path, body) in a loop until stop(). Every request carries
    `X-Load-Id: client-n`, which the fleet's access log records, so a result can be joined to the
    hosts nginx tried for it. The test advances the phase (mark()) at the events it causes; each
    result says in which phase it was sent and answered, an order, not a time."""

    port: int
    clients: int
    request: Request
    results: list[Result] = field(default_factory=list)
    phase: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> HTTPLoad:
        """Start the clients."""
        for client in range(self.clients):
            thread = threading.Thread(target=self._run, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def mark(self) -> int:
        """Begin the next phase (an event the test caused just happened); its number."""
        with self._lock:
            self.phase += 1
            return self.phase

    def answered_since(self, phase: int) -> list[Result]:
        """The results of requests sent in phase or later."""
        with self._lock:
            return [r for r in self.results if r.sent_in >= phase]

    def wait_for(self, count: int, phase: int = 0, timeout: float = 30.0) -> None:
        """Wait until `count` requests sent in phase or later have been answered."""
        wait_until(lambda: len(self.answered_since(phase)) >= count, timeout,
                   message=f"{count} answers to requests sent in phase {phase} or later")

    def stop(self) -> list[Result]:
        """Stop the clients (each finishes its request in hand); every result."""
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
        assert not any(t.is_alive() for t in self._threads), "a load client is stuck"
        return list(self.results)

    def _run(self, client: int) -> None:
        conn: http.client.HTTPConnection | None = None
        n = 0
        while not self._stop.is_set():
            n += 1
            method, path, body = self.request(client, n)
            load_id = f"{client}-{n}"
            sent_in = self.phase
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            try:
                conn.request(method, path, body=body, headers={"X-Load-Id": load_id})
                response = conn.getresponse()
                status, data = response.status, response.read()
            except (OSError, http.client.HTTPException):
                status, data = 0, b""
                with contextlib.suppress(OSError):
                    conn.close()
                conn = None
            with self._lock:
                self.results.append(Result(load_id, method, status, data, sent_in, self.phase))
        if conn is not None:
            conn.close()
