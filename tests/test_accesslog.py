"""The access log: php-fpm's access.format codes, written by real workers for known requests.

Each code group is read off a line a served request wrote (a pool whose format holds every code,
`name=value|...`); the format's checks, suppress_path, forged lines, SIGUSR1's reopen and a line
through nginx with stock fastcgi_params follow.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm import accesslog
from fastfpm.client import FastCGIClient, build_params
from tests.fcgi_helpers import closed_by_peer, truncated_params_request
from tests.servers import ConfiguredServer, Launcher, free_port, http_get, run_cli, wait_until

# Every code, each behind a name: the line parses into a dict.
EVERY_CODE = ("R=%R|u=%u|t=%t|T=%{%Y}T|m=%m|r=%r|Q=%Q|q=%q|s=%s|f=%f|l=%l|n=%n|p=%p|P=%P|"
              "e=%{HTTP_X_TRACE}e|e_missing=%{NOT_THERE}e|o=%{X-Custom}o|o_case=%{x-custom}o|"
              "o_missing=%{X-None}o|d=%d|d_seconds=%{seconds}d|d_milli=%{milli}d|d_mili=%{mili}d|"
              "d_micro=%{microseconds}d|M=%M|M_kilo=%{kilo}M|M_mega=%{megabytes}M|C=%C|C_user=%{user}C|"
              "C_system=%{system}C|pct=%%|iso=%{%Y-%m-%dT%H:%M:%S}t")

POOL = """
[global]
error_log = {dir}/fastfpm.log
[{pool}]
app = tests.apps.router:app
listen = {listen}
pm = static
pm.max_children = 1
access.log = {dir}/access.log
"""


def pool_config(listen: str, format_line: str | None = None, pool: str = "www", extra: str = "") -> str:
    body = POOL.replace("{pool}", pool).replace("{listen}", listen)
    if format_line is not None:
        body += f'access.format = "{format_line}"\n'
    return body + extra


def log_lines(path: Path, count: int, timeout: float = 5.0) -> list[str]:
    """The access log's lines once it holds at least count of them."""
    def enough() -> list[str]:
        if not path.exists():
            return []
        lines = path.read_bytes().decode("latin-1").splitlines()
        return lines if len(lines) >= count else []

    return wait_until(enough, timeout, message=f"{count} access log lines in {path}")


def fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split("|"))


def request(address: str, path: str, query: str = "", method: str = "GET", body: bytes = b"",
            **params: str) -> None:
    env = {"REQUEST_METHOD": method, "REQUEST_URI": path + (f"?{query}" if query else ""),
           "QUERY_STRING": query, "SCRIPT_NAME": path, "SCRIPT_FILENAME": "/srv/app" + path,
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "203.0.113.9", **params}
    if body:
        env["CONTENT_LENGTH"] = str(len(body))
    with FastCGIClient(address, timeout=10) as client:
        client.request(env, stdin=body)


@pytest.fixture(scope="module")
def every_code(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], float, int]]:
    """One request to a TCP pool whose format has every code: its fields, when it was sent, the master pid."""
    workdir = tmp_path_factory.mktemp("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
    server.address = f"127.0.0.1:{free_port()}"
    server.rewrite(pool_config(server.address, EVERY_CODE, pool="codes"))
    server.start()
    try:
        sent = time.time()
        auth = base64.b64encode(b"alice:secret").decode()
        request(server.address, "/headers", "a=1&b=2", method="POST", body=b"hello",
                HTTP_X_TRACE="trace-42", HTTP_AUTHORIZATION=f"Basic {auth}")
        yield fields(log_lines(workdir / "access.log", 1)[0]), sent, server.pid
    finally:
        server.stop()


def test_request_codes(every_code):
    """%m %r %Q %q %f %l %u: the request as the params gave it (%r without its query)."""
    line, _, _ = every_code
    assert (line["m"], line["r"], line["Q"], line["q"]) == ("POST", "/headers", "?", "a=1&b=2")
    assert line["f"] == "/srv/app/headers"
    assert line["l"] == "5"
    assert line["u"] == "alice"  # PHP's PHP_AUTH_USER: the Basic Authorization user


def test_response_codes(every_code):
    """%s the status, %o a response header by its exact name (php-fpm matches case-sensitively)."""
    line, _, _ = every_code
    assert line["s"] == "200"
    assert line["o"] == "custom value"
    assert line["o_case"] == "-" and line["o_missing"] == "-"


def test_environ_codes(every_code):
    """%e: a param of the request by name, "-" when it has none."""
    line, _, _ = every_code
    assert line["e"] == "trace-42"
    assert line["e_missing"] == "-"


def test_process_codes(every_code):
    """%n the pool, %p the worker, %P its parent (the master); %R the FastCGI peer, as php-fpm."""
    line, _, master = every_code
    assert line["n"] == "codes"
    assert line["P"] == str(master)
    assert line["p"].isdigit() and line["p"] != str(master)
    assert line["R"] == "127.0.0.1"


def test_time_codes(every_code):
    """%t the request's start (php-fpm's default strftime, or the {format}), %T the line's time."""
    line, sent, _ = every_code
    started = time.mktime(time.strptime(line["t"], "%d/%b/%Y:%H:%M:%S %z"))
    assert abs(started - sent) < 5
    assert time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)) == line["iso"]
    assert line["T"] == time.strftime("%Y")


def test_duration_codes(every_code):
    """%d: seconds with three decimals by default and {seconds}; {milli}/{mili} ms, {micro} µs."""
    line, _, _ = every_code
    assert re.fullmatch(r"\d+\.\d{3}", line["d"]) and line["d"] == line["d_seconds"]
    assert re.fullmatch(r"\d+\.\d{3}", line["d_milli"]) and re.fullmatch(r"\d+\.\d{3}", line["d_mili"])
    micro = int(line["d_micro"])
    assert 0 < micro < 5_000_000
    assert abs(float(line["d_milli"]) * 1000 - micro) < 100_000  # the same request, taken twice


def test_cpu_and_memory_codes(every_code):
    """%C: the request's CPU time in percent of its duration, "%.2f" ({total}, {user}, {system});
    %M: the worker's peak resident set at the request's end, bytes, {kilo} and {mega} divided."""
    line, _, _ = every_code
    for code in ("C", "C_user", "C_system"):
        assert re.fullmatch(r"\d+\.\d\d", line[code]), line[code]
    assert float(line["C"]) == pytest.approx(float(line["C_user"]) + float(line["C_system"]), abs=0.011)
    memory = int(line["M"])
    assert memory > 1 << 20  # a Python worker holds megabytes
    assert (int(line["M_kilo"]), int(line["M_mega"])) == (memory // 1024, memory // 1024 // 1024)
    assert line["pct"] == "%"


CPU_MEMORY = ("%{total}C %{user}C %{system}C %C %M %{bytes}M %{kilo}M %{kilobytes}M %{mega}M %{megabytes}M "
              "%{micro}d")


@pytest.mark.parametrize(("elapsed", "utime", "stime", "memory", "expected"), [
    (0.5, 200_000, 50_000, (50 << 20) + 1536,
     f"50.00 40.00 10.00 50.00 {(50 << 20) + 1536} {(50 << 20) + 1536} 51201 51201 50 50 500000"),
    (0.0, 10, 10, 0, "0.00 0.00 0.00 0.00 0 0 0 0 0 0 0"),          # no duration: 0, not NaN
    (0.003, 1, 0, 1023, "0.03 0.03 0.00 0.03 1023 1023 0 0 0 0 3000"),  # 1 µs of 3 ms, rounded
])
def test_cpu_and_memory_modifiers(elapsed, utime, stime, memory, expected):
    """php-fpm's arithmetic on given figures, in process: percent of the duration, whole-byte divisions."""
    from fastfpm import _core, protocol

    ops = accesslog.worker_ops(accesslog.compile_format(CPU_MEMORY), pool="www", pid=1, parent_pid=1,
                               remote_known=False)
    log = _core.AccessLog(-1, ops)
    params = protocol.encode_pairs([(b"REQUEST_METHOD", b"GET")])
    line = log.line_for(params, "200 OK", [], elapsed=elapsed, utime_us=utime, stime_us=stime, memory=memory)
    assert line.decode() == expected


def test_the_operation_numbers_match_the_compiled_writer():
    """accesslog.py's OP_* and _accesslog.pxi's enum are the same list, up to the folded ones."""
    source = (Path(accesslog.__file__).parent / "_accesslog.pxi").read_text()
    block = re.search(r"cdef enum:\n((?:    OP_\w+(?: = 0)?\n)+)", source).group(1)
    names = [line.split()[0] for line in block.splitlines()]
    assert names[-1] == "OP_COUNT"
    assert [getattr(accesslog, name) for name in names[:-1]] == list(range(len(names) - 1))
    assert accesslog.OP_POOL == len(names) - 1  # the first of those worker_ops folds into literals


STATUS_AND_LOG = POOL.replace("app = tests.apps.router:app", "app = tests.apps.work:app").replace(
    "pm.max_children = 1", "pm.max_children = 2\npm.status_path = /status")


def test_the_line_and_the_status_page_show_the_same_figures(configured):
    """%C, %M and %{micro}d are the figures the status page shows for the same request (the slot's,
    stored before the line is written, as php-fpm ends a request before logging it)."""
    body = STATUS_AND_LOG.replace("{pool}", "www").replace("{listen}", "{dir}/fpm.sock")
    body += 'access.format = "%p|%r%Q%q|%C|%M|%{micro}d"\n'
    server = configured(body)
    server.address = str(server.workdir / "fpm.sock")
    log = server.workdir / "access.log"
    request(server.address, "/", "do=burn&seconds=0.2")
    burn = [line.split("|") for line in log_lines(log, 1) if "do=burn" in line][0]
    cpu, duration = float(burn[2]), int(burn[4])
    assert cpu * duration / 100 >= 190_000 and 0 < cpu <= 101  # at least 0.2 s of CPU
    assert int(burn[3]) > 1 << 20

    def agreeing() -> bool:
        # The row of the worker that did not serve this page: its last request's line (the last
        # line with its pid) says what the row says.
        with FastCGIClient(server.address, timeout=10) as client:
            page = client.request({"REQUEST_METHOD": "GET", "REQUEST_URI": "/status?json&full",
                                   "QUERY_STRING": "json&full", "SCRIPT_NAME": "/status"})
        rows = [r for r in json.loads(page.body)["processes"] if r["state"] == "Idle" and r["requests"]]
        lines = log.read_text().splitlines()
        for row in rows:
            mine = [line.split("|") for line in lines if line.startswith(f"{row['pid']}|")]
            if len(mine) == row["requests"]:  # its last line is written
                last = mine[-1]
                cpu = f"{row['last request cpu']:.2f}"
                shown = (cpu, row["last request memory"], row["request duration"])
                assert shown == (last[2], int(last[3]), int(last[4])), (row, last)
                return True
        return False

    wait_until(agreeing, 10, message="an idle worker's row and its last line")


def test_default_format_is_php_fpms(configured):
    """Without access.format: `%R - %u %t "%m %r" %s`; %R is "-" on a unix socket, as in php-fpm."""
    server = configured(pool_config("{dir}/fpm.sock"))
    server.address = str(server.workdir / "fpm.sock")
    request(server.address, "/status", "code=404")
    line = log_lines(server.workdir / "access.log", 1)[0]
    assert re.fullmatch(r'- -  \d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4} "GET /status" 404', line), line


def test_suppress_path(configured):
    """A 2xx GET of a suppressed path is not logged; with a query, another method or status, it is."""
    server = configured(pool_config("{dir}/fpm.sock", "%m %r%Q%q %s", extra=(
        "access.suppress_path[] = /ping\naccess.suppress_path[] = /status\n")))
    server.address = str(server.workdir / "fpm.sock")
    request(server.address, "/ping")
    request(server.address, "/status", "code=200")   # a query: logged
    request(server.address, "/ping", method="POST", body=b"x")
    request(server.address, "/headers")
    # One worker (pm.max_children = 1) writes each line before it reads the next request, so a
    # /ping line written by mistake would stand before the later ones: no wait for it is needed.
    assert log_lines(server.workdir / "access.log", 3) == ["GET /status?code=200 200", "POST /ping 200",
                                                           "GET /headers 200"]


def test_a_request_cannot_forge_a_line(configured):
    """Control characters (a raw newline in the URI, %0A decoded into the script name, CR, ESC and
    DEL in a header %e shows) are written as '.', so every request is one line."""
    server = configured(pool_config("{dir}/fpm.sock", "%r|%f|%{HTTP_X_EVIL}e|%s"))
    server.address = str(server.workdir / "fpm.sock")
    forged = '127.0.0.1 - - 01/Jan/2026:00:00:00 +0000 "GET /admin" 200'
    request(server.address, f"/a%0A\n{forged}", SCRIPT_FILENAME=f"/srv/a\n{forged}",
            HTTP_X_EVIL=f"x\r\n{forged}\x1b[31m\x7f\t")
    # A line is one write(): a forged second line would arrive with the first, not after it.
    lines = log_lines(server.workdir / "access.log", 1)
    assert len(lines) == 1
    # REQUEST_URI arrives percent-encoded, so its %0A stays three characters; decoded, it is a '.'.
    assert lines[0] == f"/a%0A.{forged}|/srv/a.{forged}|x..{forged}.[31m..|200"


@pytest.mark.parametrize(("text", "message"), [
    ("%Z", "Invalid token in the access.format (%Z)"),
    ("%{x}d", "only 'seconds', 'milli', 'milliseconds', 'micro' or 'microseconds' are allowed as a modifier "
              "for %d ('x')"),
    ("%{x}M", "only 'bytes', 'kilo', 'kilobytes', 'mega' or 'megabytes' are allowed as a modifier for "
              "%M ('x')"),
    ("%{x}C", "only 'total', 'user' or 'system' are allowed as a modifier for %C ('x')"),
    ("%e", "the name of the environment variable must be set between embraces for %e"),
    ("%o", "the name of the header must be set between embraces for %o"),
    ("%{abc", "missing closing embrace in the access.format"),
    ("%{abc}", "missing closing embrace in the access.format"),
    ("%{x}s", "embrace is not allowed for modifier %s"),
])
def test_invalid_formats_have_php_fpms_messages(text, message):
    with pytest.raises(accesslog.FormatError) as caught:
        accesslog.compile_format(text)
    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["abc%", "%{%Y}t", "%{foo}t%", "%{MILLI}d %{Kilo}M %{USER}C"])
def test_formats_php_fpm_accepts(text):
    """As php-fpm 8.2's `-t` takes them: a trailing %, any strftime text, modifiers in any case."""
    accesslog.compile_format(text)


def test_invalid_format_in_a_file_is_an_error_at_its_line(tmp_path):
    """`check` (and serve) report file:line and start nothing."""
    conf = tmp_path / "fastfpm.conf"
    conf.write_text(pool_config(str(tmp_path / "fpm.sock"), "%R %{bogus}d").replace("{dir}", str(tmp_path)))
    result = run_cli("check", "-c", str(conf))
    assert result.returncode != 0
    assert (f"{conf}:10: invalid value '%R %{{bogus}}d' for 'access.format': only 'seconds', 'milli', "
            f"'milliseconds', 'micro' or 'microseconds' are allowed as a modifier for %d ('bogus')"
            ) in result.stderr
    served = run_cli("serve", "-R", "-c", str(conf), timeout=30)
    assert served.returncode != 0 and not (tmp_path / "fpm.sock").exists()
    assert not (tmp_path / "access.log").exists()


def test_sigusr1_reopens_the_access_log(configured):
    """After logrotate's rename, SIGUSR1: the master opens the file again and restarts the workers
    (php-fpm's way, their inherited descriptor cannot follow); new lines go to the new file."""
    server = configured(pool_config("{dir}/fpm.sock", "%r"))
    server.address = str(server.workdir / "fpm.sock")
    log = server.workdir / "access.log"
    request(server.address, "/before")
    log_lines(log, 1)
    os.rename(log, server.workdir / "access.log.1")
    old_workers = set(server.worker_pids())
    mark = server.log_size()
    server.signal(signal.SIGUSR1)
    server.wait_for_log("access log file re-opened", mark)
    wait_until(lambda: (set(server.worker_pids()) - old_workers) and len(server.worker_pids()) == 1, 10,
               message="a new worker")
    request(server.address, "/after")
    assert log_lines(log, 1) == ["/after"]
    assert (server.workdir / "access.log.1").read_text().splitlines() == ["/before"]
    assert oct(log.stat().st_mode & 0o777) == oct(accesslog.ACCESS_LOG_MODE)


@pytest.mark.nginx
@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_line_through_nginx(tmp_path_factory, transport):
    """nginx with stock fastcgi_params in front: %R is the FastCGI peer (nginx over TCP, "-" on a
    unix socket, as php-fpm), the client's address is %{REMOTE_ADDR}e; %r%Q%q the request URI; a
    %0A decoded into PATH_INFO is written as '.'."""
    workdir = tmp_path_factory.mktemp("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
    if transport == "tcp":
        server.socket_path, server.port = None, free_port()
        server.address = f"127.0.0.1:{server.port}"
    line_format = '%R %{REMOTE_ADDR}e \\"%m %r%Q%q\\" %s %{Content-Type}o|%{PATH_INFO}e'
    server.rewrite(pool_config(server.address, line_format))
    with Launcher(tmp_path_factory.mktemp) as launcher:
        launcher._started.append(server.start())
        web = launcher.nginx(server)
        result = http_get(web.port, "/status?code=201")
        assert result.status == 201
        assert http_get(web.port, "/x%0Ay").status == 200  # decoded into PATH_INFO
        first, second = log_lines(workdir / "access.log", 2)
    peer = "127.0.0.1" if transport == "tcp" else "-"
    assert first.startswith(f'{peer} 127.0.0.1 "GET /status?code=201" 201 text/plain|/status')
    assert second.startswith(f'{peer} 127.0.0.1 "GET /x%0Ay" 200 ') and second.endswith("|/x.y")


def test_access_directives_load_check_and_dump(tmp_path):
    """access.log takes $pool and is made absolute; suppress_path[] collects; -tt's dump loads back."""
    from fastfpm.config import dump, load

    conf = tmp_path / "fastfpm.conf"
    conf.write_text("[www]\napp = myapp:application\nlisten = 9000\naccess.log = $pool.access.log\n"
                    'access.format = "%R %{mili}d"\naccess.suppress_path[] = /ping\n'
                    "access.suppress_path[] = /health\n")
    pool = load(conf).pools[0]
    assert pool.access_log == str(tmp_path / "www.access.log")
    assert (pool.access_format, pool.access_suppress_path) == ("%R %{mili}d", ["/ping", "/health"])
    again = tmp_path / "again.conf"
    again.write_text(dump(load(conf)))
    reloaded = load(again).pools[0]
    assert (reloaded.access_format, reloaded.access_suppress_path) == ("%R %{mili}d", ["/ping", "/health"])


def test_access_format_without_access_log_warns(tmp_path):
    from fastfpm.config import load

    conf = tmp_path / "fastfpm.conf"
    conf.write_text('[www]\napp = myapp:application\nlisten = 9000\naccess.format = "%R"\n')
    config = load(conf)
    assert any("access.format has no effect without access.log" in w for w in config.warnings)


@pytest.mark.parametrize(("listen", "connect", "shown"), [
    ("127.0.0.1:{port}", "127.0.0.1:{port}", "127.0.0.1"),
    ("[::1]:{port}", "[::1]:{port}", "::1"),
    ("{port}", "127.0.0.1:{port}", "127.0.0.1"),  # dual-stack: an IPv4 peer written as IPv4
])
def test_remote_address_forms(configured, listen, connect, shown):
    """%R from the address accept4 gave: IPv4, IPv6, and IPv4-mapped on a dual-stack socket."""
    port = str(free_port())
    server = configured(pool_config(listen.replace("{port}", port), "%R %r"))
    request(connect.replace("{port}", port), "/one")
    request(connect.replace("{port}", port), "/two")
    assert log_lines(server.workdir / "access.log", 2) == [f"{shown} /one", f"{shown} /two"]


@pytest.mark.parametrize("path", ["/raise-before", "/raise-after-start", "/bad-iterable"])
def test_after_fastfpms_own_500_the_line_shows_the_headers_sent(configured, path):
    """The app failed before anything was sent (after setting `X-App: 1` in two of the cases): %s and
    %o are the 500's that went out, not what the app had started; a header the 500 lacks is "-"."""
    server = configured(pool_config("{dir}/fpm.sock", "%r %s %{X-App}o|%{Content-Type}o|%{Content-Length}o"))
    server.address = str(server.workdir / "fpm.sock")
    with FastCGIClient(server.address, timeout=10) as client:
        answer = client.request(build_params("GET", path))
    assert answer.status == 500
    sent = (answer.header("Content-Type"), answer.header("Content-Length"))
    assert log_lines(server.workdir / "access.log", 1) == [f"{path} 500 -|{sent[0]}|{sent[1]}"]
    assert sent == ("text/plain; charset=utf-8", "22")


def test_malformed_params_write_no_line_and_a_throttled_warning(configured):
    """A request whose params are malformed never reaches the app: no access line (php-fpm's
    fcgi_accept_request closes such a connection before any request starts), one WARNING naming
    the peer, and no more than 10 of those a minute from one worker however many arrive."""
    port = free_port()
    server = configured(pool_config(f"127.0.0.1:{port}", "%r %s"))
    address = f"127.0.0.1:{port}"

    def malformed() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(truncated_params_request())
            assert closed_by_peer(sock)

    malformed()
    request(address, "/after")
    for _ in range(14):
        malformed()
    # The 500's traceback goes through the same worker's log pipe after every warning before it:
    # once it is in the error log, so is everything the malformed requests logged.
    request(address, "/raise-before")
    log = server.wait_for_log("the application failed for GET /raise-before")
    assert log_lines(server.workdir / "access.log", 2) == ["/after 200", "/raise-before 500"]
    said = "closing a FastCGI connection from 127.0.0.1: truncated name/value pair in PARAMS"
    lines = [line for line in log.splitlines() if "closing a FastCGI connection" in line]
    assert len(lines) == 10
    assert all("WARNING: [pool www] child " in line and line.endswith(f": {said}") for line in lines)
