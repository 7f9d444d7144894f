"""Reloads through real processes: SIGUSR2 (and the emergency restart's), one generation after another.

What a reload applies, refuses, rolls back, and how the old generation hands over to the new one.
The configuration file is rewritten between signals.
"""

from __future__ import annotations

import ast
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fastfpm import protocol as p
from fastfpm.client import build_params
from tests.fcgi_helpers import closed_by_peer, get, read_records, request_bytes
from tests.servers import (
    REPO_ROOT,
    ConfiguredServer,
    FastFPMServer,
    Launcher,
    server_busy,
    wait_until,
    write_config,
)

ROUTER = "tests.apps.router:app"
ROOT = os.geteuid() == 0


def reload_and_wait(server: FastFPMServer, old: set[int], count: int = 1) -> set[int]:
    """SIGUSR2, then wait until `count` workers run and none of `old` is left; the new pids."""
    server.signal(signal.SIGUSR2)
    return wait_until(lambda: (pids := set(server.worker_pids())) and len(pids) == count
                      and not pids & old and pids, 10, message="a new generation only")


# ------------------------------------------------------------------ SIGUSR2: a new generation


def test_sigusr2_reloads_with_a_new_generation_and_leaves_no_old_worker(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=2)
    old = set(server.worker_pids())
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloaded: generation 2", mark)
    new = wait_until(lambda: (pids := set(server.worker_pids())) and not pids & old and len(pids) == 2
                     and pids, 10, message="only new workers")
    # ...and reaped: an old worker that has just exited is a zombie until the master's SIGCHLD.
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in old), 5,
               message="the old workers to be reaped")
    assert len(new) == 2
    assert get(server.address, "/env").status == 200


def test_reload_lets_a_request_in_flight_finish(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1)
    results = []
    thread = threading.Thread(target=lambda: results.append(get(server.address, "/slow", "seconds=1.5")))
    thread.start()
    wait_until(lambda: server_busy(server), 5, message="the slow request to start")
    server.signal(signal.SIGUSR2)
    thread.join(10)
    assert results and results[0].status == 200
    assert get(server.address, "/env").status == 200


def sleeping_in_the_app(pid: int) -> bool:
    """True while the process sleeps in time.sleep() (clock_nanosleep, nanosleep or select on
    x86-64), not in accept() or epoll_wait() as an idle worker does."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] in ("230", "35", "23")
    except FileNotFoundError:  # gone
        return False


@pytest.mark.parametrize("ending", ["reload", "graceful stop", "max_requests"])
def test_a_worker_on_its_way_out_serves_the_request_waiting_on_its_kept_connection(
        launcher: Launcher, ending: str) -> None:
    # nginx sends a request on any idle kept connection it holds, and a kept connection belongs to
    # the worker that accepted it: while that worker serves another request, the new one waits in
    # the connection's buffer. A worker told to go (its generation replaced, a graceful stop, its
    # max_requests reached) must serve it before closing the connection: closed unread, the
    # connection is reset, and nginx fails a POST sent on it rather than send it twice.
    extra = ["--max-requests", "2"] if ending == "max_requests" else []
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=extra)
    (worker,) = server.worker_pids()
    post = build_params("POST", "/env", "", {"Content-Type": "text/plain"}, 5, {})
    with server.connect() as kept, server.connect() as busy:
        kept.sendall(request_bytes(1, build_params("GET", "/env", "", {}, None, {}), flags=p.KEEP_CONN))
        assert read_records(kept)[-1].type == p.END_REQUEST  # request 1; kept is now idle, held
        busy.sendall(request_bytes(1, build_params("GET", "/slow", "seconds=3", {}, None, {})))
        wait_until(lambda: sleeping_in_the_app(worker), 5, message="the slow request to run")
        kept.sendall(request_bytes(2, post, b"hello", flags=p.KEEP_CONN))  # waits: the worker is busy
        mark = server.log_size()
        if ending == "reload":
            server.signal(signal.SIGUSR2)
            server.wait_for_log("reloaded: generation 2", mark, timeout=10)
        elif ending == "graceful stop":
            server.signal(signal.SIGQUIT)
        # Still in the slow request (read again: a signal interrupts the sleep for a moment).
        wait_until(lambda: sleeping_in_the_app(worker), 1, message="the slow request, still running")
        assert read_records(busy)[-1].type == p.END_REQUEST
        records = read_records(kept)
        assert records and records[-1].type == p.END_REQUEST, records
        assert p.parse_end_request(records[-1].content) == (0, p.REQUEST_COMPLETE)
        head, _, body = b"".join(r.content for r in records if r.type == p.STDOUT).partition(b"\r\n\r\n")
        assert b"Status: 200 OK" in head
        assert json.loads(body)["body_length"] == 5
        assert closed_by_peer(kept)  # and then the worker lets go of it
    wait_until(lambda: not os.path.exists(f"/proc/{worker}"), 10, message="the worker to exit")


def test_the_last_answer_on_a_kept_connection_comes_with_the_end_of_the_connection(
        launcher: Launcher) -> None:
    # A worker that closes a kept connection after its last request (here max_requests = 1)
    # sends the FIN in the same segment as END_REQUEST: the web server sees the connection end
    # with the answer, and nginx does not put it back in its pool, where its next request (a
    # POST, which it does not resend) would find it closed.
    server = launcher.fastfpm(ROUTER, transport="tcp", max_children=1, extra_args=["--max-requests", "1"])
    with server.connect() as sock:
        sock.sendall(request_bytes(1, build_params("GET", "/env", "", {}, None, {}), flags=p.KEEP_CONN))
        assert read_records(sock)[-1].type == p.END_REQUEST
        sock.setblocking(False)
        assert sock.recv(1) == b""  # already at its end: no BlockingIOError


def test_reload_with_a_broken_config_keeps_serving(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "fastfpm.conf", f"[www]\nlisten = {tmp_path}/r.sock\napp = {ROUTER}\n"
                        "pm = static\npm.max_children = 1\n")
    server = launcher.fastfpm("", max_children=1, extra_args=["-c", str(conf)])
    server.address = str(tmp_path / "r.sock")  # from the file, not the harness's default
    pids = server.worker_pids()
    conf.write_text(conf.read_text() + "pm.max_children = lots\n")
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    log = server.wait_for_log("reload aborted", mark)
    assert f"{conf}:6:" in log and "pm.max_children" in log
    assert server.worker_pids() == pids
    assert get(server.address, "/env").status == 200


# ------------------------------------------------------------------ emergency restart


def test_emergency_restart_reloads_after_repeated_crashes(launcher: Launcher, tmp_path: Path) -> None:
    conf = write_config(tmp_path / "e.conf", f"""
[global]
emergency_restart_threshold = 2
emergency_restart_interval = 1m

[www]
listen = {tmp_path}/e.sock
app = tests.apps.crash:app
pm.max_children = 2
""")
    server = launcher.fastfpm("", extra_args=["-c", str(conf)])
    address = str(tmp_path / "e.sock")
    for _ in range(2):
        try:
            get(address, "/crash")
        except Exception:
            pass  # the worker died mid-request: that is the point
    log = server.wait_for_log("initiating reload")
    assert "failed processes threshold (2 in 60 sec) is reached" in log
    assert log.count("exited on signal 11 (SIGSEGV)") == 2
    server.wait_for_log("reloaded: generation 2")
    assert get(address, "/").status == 200


# ------------------------------------------------------------------ SIGUSR2: root refusal

NOBODY_POOL = """
[www]
user = nobody
listen = {dir}/fpm.sock
listen.owner = nobody
app = tests.apps.whoami:app
chdir = /tmp
pm = static
pm.max_children = 1
"""
ROOT_POOL = NOBODY_POOL.replace("user = nobody\n", "")


def whoami(server: FastFPMServer) -> dict[str, object]:
    """The worker's uid and gid, as tests.apps.whoami reports them."""
    return ast.literal_eval(get(server.address, "/").body.decode())


@pytest.mark.skipif(not ROOT, reason="the refusal applies only when the master runs as root")
def test_reload_refuses_root_workers_without_R(configured: Callable[..., ConfiguredServer]) -> None:
    nobody = pwd.getpwnam("nobody")
    server = configured(NOBODY_POOL, allow_root=False)
    assert whoami(server)["uid"] == nobody.pw_uid
    before = server.worker_pids()
    server.rewrite(ROOT_POOL)
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    log = server.wait_for_log("reload aborted", mark)
    assert "ERROR: [pool www] please specify user and group other than root" in log
    assert "--allow-to-run-as-root" in log
    time.sleep(0.3)
    assert server.worker_pids() == before  # the running generation keeps serving
    assert whoami(server)["uid"] == nobody.pw_uid


@pytest.mark.skipif(not ROOT, reason="the refusal applies only when the master runs as root")
def test_reload_with_R_may_switch_workers_to_root(configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(NOBODY_POOL, allow_root=True)
    old = set(server.worker_pids())
    server.rewrite(ROOT_POOL)
    mark = server.log_size()
    reload_and_wait(server, old)
    assert whoami(server)["uid"] == 0
    assert "please specify user" not in server.log_since(mark)


# ------------------------------------------------------------------ SIGUSR2: process.max


def test_reload_with_process_max_starts_the_new_generation_at_once(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(f"""
[global]
process.max = 2

[www]
listen = {{dir}}/fpm.sock
app = {ROUTER}
pm = static
pm.max_children = 2
""")
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(get(server.address, "/slow", "seconds=3")))
    thread.start()
    try:
        wait_until(lambda: any(busy_worker(pid) for pid in server.worker_pids()), 5,
                   message="the slow request to start")
        mark = server.log_size()
        server.signal(signal.SIGUSR2)
        log = server.wait_for_log("ready to handle connections", mark, timeout=5)
        before_ready = log[:log.index("ready to handle connections")]
        assert before_ready.count("started") == 2  # the new generation, before "ready"
        # The old worker still finishing is over process.max for a moment: one per generation. (The
        # old idle worker's exit after its SIGQUIT may take a moment on a loaded machine.)
        wait_until(lambda: len(server.worker_pids()) == 3, 2,
                   message="two new workers and the old one still finishing")
        assert result == []  # still finishing: three workers while its request is in flight
    finally:
        thread.join(10)
    assert result and getattr(result[0], "status", None) == 200
    assert "maximum number of processes" not in server.log_since(mark)
    wait_until(lambda: len(server.worker_pids()) == 2, 5, message="the old worker to leave")


def busy_worker(pid: int) -> bool:
    """True when the worker is inside the app (sleeping, not blocked in accept)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            syscall = f.read().split()[0]
    except OSError:
        return False
    return syscall not in ("43", "288", "running")


# ------------------------------------------------------------------ SIGUSR2: [global] directives

GLOBALS_POOL = f"""
[www]
listen = {{dir}}/fpm.sock
app = {ROUTER}
pm = static
pm.max_children = 1
"""


def test_reload_applies_log_level_and_error_log(configured: Callable[..., ConfiguredServer]) -> None:
    server = configured("[global]\nlog_level = notice\n" + GLOBALS_POOL)
    new_log = server.workdir / "new.log"
    old = set(server.worker_pids())
    server.rewrite(f"[global]\nlog_level = debug\nerror_log = {new_log}\n" + GLOBALS_POOL)
    server.signal(signal.SIGUSR2)
    wait_until(lambda: new_log.exists() and "ready to handle connections" in new_log.read_text(), 10,
               message="the reloaded master logging to the new error_log")
    text = new_log.read_text()
    assert "NOTICE: reloaded: generation 2" in text
    assert "DEBUG: [pool www] listening on" in text  # log_level = debug took effect
    assert "reloaded: generation 2" not in server.log_text()  # nothing more on the old destination
    get(server.address, "/raise-before", "marker=worker-line-in-new-log")
    wait_until(lambda: "worker-line-in-new-log" in new_log.read_text(), 5, message="a worker's line")

    # log_level = warning: NOTICE lines stop, errors still come.
    old = set(server.worker_pids())
    server.rewrite(f"[global]\nlog_level = warning\nerror_log = {new_log}\n" + GLOBALS_POOL)
    mark = new_log.stat().st_size
    reload_and_wait(server, old)
    get(server.address, "/raise-before", "marker=at-warning-level")
    wait_until(lambda: "at-warning-level" in new_log.read_text(), 5, message="the error line")
    after = new_log.read_bytes()[mark:].decode()
    # "Reloading in progress ..." comes before the new configuration is read, at the old level.
    after = after.replace("NOTICE: Reloading in progress ...", "")
    assert "NOTICE:" not in after and "DEBUG:" not in after
    assert "ERROR:" in after


def test_reload_moves_the_pid_file(configured: Callable[..., ConfiguredServer]) -> None:
    server = configured("[global]\npid = {dir}/a.pid\n" + GLOBALS_POOL)
    first, second = server.workdir / "a.pid", server.workdir / "b.pid"
    assert first.read_text().strip() == str(server.pid)
    server.rewrite("[global]\npid = {dir}/b.pid\n" + GLOBALS_POOL)
    reload_and_wait(server, set(server.worker_pids()))
    wait_until(second.exists, 5, message="the new pid file")
    assert second.read_text().strip() == str(server.pid)
    assert not first.exists()
    server.stop()
    assert not second.exists()


def test_reload_reads_the_file_with_the_same_prefix(configured: Callable[..., ConfiguredServer],
                                                   tmp_path: Path) -> None:
    # -p: relative paths are taken from the prefix, not from the file's directory, on reload too.
    server = configured("[global]\npid = fpm.pid\n" + GLOBALS_POOL, extra_args=("-p", str(tmp_path)))
    assert (tmp_path / "fpm.pid").read_text().strip() == str(server.pid)
    mark = server.log_size()
    reload_and_wait(server, set(server.worker_pids()))
    server.wait_for_log("reloaded: generation 2", mark)
    assert (tmp_path / "fpm.pid").read_text().strip() == str(server.pid)
    assert not (server.workdir / "fpm.pid").exists()


def test_reload_names_global_directives_that_need_a_restart(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured("[global]\nrlimit_files = 4096\nlog_limit = 2048\n" + GLOBALS_POOL)
    server.rewrite("[global]\nrlimit_files = 8192\nlog_limit = 4096\ndaemonize = no\n" + GLOBALS_POOL)
    mark = server.log_size()
    reload_and_wait(server, set(server.worker_pids()))
    log = server.wait_for_log("reloaded: generation 2", mark)
    assert "NOTICE: 'rlimit_files' changed (4096 -> 8192)" in log and "restart" in log
    assert "'log_limit'" not in log  # applied on reload, nothing to say
    assert "'daemonize'" not in log  # written, but to the value it had


def test_reload_applies_systemd_interval(tmp_path: Path) -> None:
    conf = tmp_path / "n.conf"
    body = "[global]\nsystemd_interval = {interval}\n" + GLOBALS_POOL.replace("{dir}", str(tmp_path))
    conf.write_text(body.format(interval="0"))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            open(tmp_path / "fastfpm.log", "wb") as output:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(10)
        proc = subprocess.Popen([sys.executable, "-m", "fastfpm", "serve", "-c", str(conf), "-R"],
                                cwd=REPO_ROOT, stdout=output, stderr=output, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO_ROOT),
                                     "NOTIFY_SOCKET": str(tmp_path / "notify")})
        try:
            assert "READY=1" in notify.recv(4096).decode()
            conf.write_text(body.format(interval="1s"))
            proc.send_signal(signal.SIGUSR2)
            messages = [notify.recv(4096).decode()]
            assert "RELOADING=1" in messages[0]
            # systemd_interval = 0 sent no status line; after the reload, one comes every second.
            while not any(m.startswith("STATUS=Processes active: ") for m in messages):
                messages.append(notify.recv(4096).decode())
            assert any("READY=1" in m for m in messages)
        finally:
            proc.terminate()
            proc.wait(10)


# ------------------------------------------------------------------ SIGUSR2: overlapping generations

BROKEN_APP = "def app(environ, start_response):\n    return [b'never'\n"  # a syntax error


def pids_answering(address: str, count: int) -> set[int]:
    """The worker pids that answered `count` /env requests in a row."""
    import json

    return {json.loads(get(address, "/env").body)["pid"] for _ in range(count)}


def test_a_reload_to_an_app_that_cannot_load_keeps_the_old_generation(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(f"""
[www]
listen = {{dir}}/fpm.sock
app = {ROUTER}
pm = static
pm.max_children = 2
""")
    old = set(server.worker_pids())
    (server.workdir / "reload_broken_app.py").write_text(BROKEN_APP)
    server.rewrite("""
[www]
listen = {dir}/fpm.sock
app = reload_broken_app:app
chdir = {dir}
pm = static
pm.max_children = 2
""")
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    log = server.wait_for_log("reload failed", mark, timeout=10)
    assert "a worker could not start" in log and "generation 1 keeps serving" in log
    assert "SyntaxError" in log
    # The site stays up, on the very workers it had.
    assert server.proc.poll() is None
    assert pids_answering(server.address, 6) <= old
    wait_until(lambda: set(server.worker_pids()) == old, 5, message="only the old generation left")
    # Fixed: the next reload goes through.
    (server.workdir / "reload_broken_app.py").write_text(
        "from tests.apps.router import app  # noqa: F401\n")
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloaded: generation 2", mark, timeout=10)
    wait_until(lambda: not set(server.worker_pids()) & old and len(server.worker_pids()) == 2, 10,
               message="the new generation only")
    assert not pids_answering(server.address, 4) & old


def test_the_old_generation_serves_while_the_new_one_imports(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured(GLOBALS_POOL)
    old = set(server.worker_pids())
    server.rewrite("""
[www]
listen = {dir}/fpm.sock
app = tests.apps.lifecycle_slow_start:app
pm = static
pm.max_children = 1
""")
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloading: generation 2 starting", mark, timeout=5)
    # The new worker needs two seconds to import its app; meanwhile the old one answers (had it
    # been told to quit at the reload, these requests would wait for, and reach, the new one).
    assert pids_answering(server.address, 3) == old
    log = server.wait_for_log("reloaded: generation 2", mark, timeout=10)
    assert log.index("ready to handle connections") > log.index("reloading: generation 2 starting")
    wait_until(lambda: not set(server.worker_pids()) & old, 10, message="the old worker to leave")
    response = get(server.address, "/")
    assert int(response.body) not in old


def test_a_graceful_stop_during_a_reload_lets_the_old_generation_finish(
        configured: Callable[..., ConfiguredServer]) -> None:
    server = configured("[global]\nprocess_control_timeout = 20\n" + GLOBALS_POOL)
    results = []
    thread = threading.Thread(target=lambda: results.append(get(server.address, "/slow", "seconds=2")))
    thread.start()
    wait_until(lambda: server_busy(server), 5, message="the slow request to start")
    server.rewrite("[global]\nprocess_control_timeout = 20\n" + GLOBALS_POOL.replace(
        ROUTER, "tests.apps.lifecycle_slow_start:app"))
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloading: generation 2 starting", mark, timeout=5)
    # SIGQUIT while generation 1 still serves (generation 2 imports for two seconds): the request
    # in flight on generation 1 finishes, as it would without the reload.
    server.signal(signal.SIGQUIT)
    thread.join(15)
    assert results and results[0].status == 200
    assert "SIGKILL" not in server.log_since(mark)
