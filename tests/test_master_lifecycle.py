"""The master's life beyond the first start: ondemand waiting, SIGUSR1, SIGUSR2 reloads, exit lines.

Real masters and workers, as in test_pools.py; the configuration file is rewritten between signals.
"""

from __future__ import annotations

import ast
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

from fastfpm import master
from tests.fcgi_helpers import get
from tests.servers import REPO_ROOT, ConfiguredServer, FastFPMServer, Launcher, server_busy, wait_until

ROUTER = "tests.apps.router:app"
ROOT = os.geteuid() == 0
# A master spinning on a waiting connection used 0.5 to 1.2 s of CPU in these windows (on a shared
# 2-core machine); one that sleeps uses next to nothing. A bound against a spin, not a timing.
SPIN_BOUND_SECONDS = 0.2


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def master_cpu_over(server: FastFPMServer, seconds: float) -> float:
    """CPU the master used during the next `seconds` of wall time."""
    before = cpu_seconds(server.pid)
    time.sleep(seconds)
    return cpu_seconds(server.pid) - before


def reload_and_wait(server: FastFPMServer, old: set[int], count: int = 1) -> set[int]:
    """SIGUSR2, then wait until `count` workers run and none of `old` is left; the new pids."""
    server.signal(signal.SIGUSR2)
    return wait_until(lambda: (pids := set(server.worker_pids())) and len(pids) == count
                      and not pids & old and pids, 10, message="a new generation only")


# ------------------------------------------------------------------ ondemand: no busy loop


def test_ondemand_master_sleeps_while_a_connection_waits_for_a_busy_full_pool(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--pm", "ondemand"])
    thread = threading.Thread(target=get, args=(server.address, "/slow", "seconds=4"))
    thread.start()
    waiting = None
    try:
        wait_until(lambda: server_busy(server), 5, message="the slow request to start")
        waiting = server.connect()  # queued behind the only worker pm.max_children allows
        mark = server.log_size()
        used = master_cpu_over(server, 1.5)
        assert used < SPIN_BOUND_SECONDS, f"the master used {used:.2f}s of CPU in 1.5s"
        # The full pool is still noticed (at the once-a-second maintenance), once.
        log = server.wait_for_log("reached pm.max_children setting (1)", mark, timeout=3)
        assert log.count("reached pm.max_children") == 1
    finally:
        if waiting is not None:
            waiting.close()
        thread.join(10)


def test_ondemand_master_sleeps_while_the_worker_for_a_connection_starts(launcher: Launcher) -> None:
    server = launcher.fastfpm("tests.apps.lifecycle_slow_start:app", max_children=2,
                              extra_args=["--pm", "ondemand"])
    waiting = server.connect()
    try:
        wait_until(lambda: server.worker_pids(), 5, message="a worker forked for the connection")
        used = master_cpu_over(server, 1.2)  # the worker imports for 2 s
        assert used < SPIN_BOUND_SECONDS, f"the master used {used:.2f}s of CPU in 1.2s"
        assert len(server.worker_pids()) == 1  # one connection, one worker
    finally:
        waiting.close()
    assert get(server.address, "/").status == 200


# ------------------------------------------------------------------ SIGUSR1


def test_failed_log_reopen_keeps_serving_and_logs_the_error(launcher: Launcher, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    server = launcher.fastfpm(ROUTER, max_children=1, extra_args=["--error-log", str(logs / "error.log")])
    gone = tmp_path / "logs.gone"
    logs.rename(gone)  # the directory went away: reopening must fail
    server.signal(signal.SIGUSR1)
    old_file = gone / "error.log"
    wait_until(lambda: "unable to re-opened error log file" in old_file.read_text(), 5,
               message="the reopen error in the old file")
    text = old_file.read_text()
    assert f"ERROR: failed to open error_log ({logs / 'error.log'}): No such file or directory" in text
    assert server.proc is not None and server.proc.poll() is None
    assert get(server.address, "/env").status == 200
    # The old file is still the log, and a later reopen that can succeed does.
    get(server.address, "/raise-before", "marker=still-in-old-file")
    wait_until(lambda: "still-in-old-file" in old_file.read_text(), 5,
               message="the traceback in the old file")
    logs.mkdir()
    server.signal(signal.SIGUSR1)
    wait_until(lambda: (logs / "error.log").exists()
               and "NOTICE: error log file re-opened" in (logs / "error.log").read_text(), 5,
               message="php-fpm's success line in the new file")


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
        # The old worker still finishing is over process.max for a moment: one per generation.
        assert len(server.worker_pids()) == 3
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


# ------------------------------------------------------------------ exit lines


@pytest.mark.parametrize(("status", "expected"), [
    (0, "exited with code 0"),
    (3 << 8, "exited with code 3"),
    (signal.SIGKILL, "exited on signal 9 (SIGKILL)"),
    (signal.SIGSEGV | 0x80, "exited on signal 11 (SIGSEGV - core dumped)"),  # WCOREDUMP's bit
    (40, "exited on signal 40 (SIGRTMIN+6)"),
])
def test_describe_exit(status: int, expected: str) -> None:
    assert master.describe_exit(status) == expected


def core_dumps_land_in_the_cwd() -> bool:
    """Whether a crashing worker's core goes to a file in its directory (not to a crash collector)."""
    try:
        with open("/proc/sys/kernel/core_pattern") as f:
            pattern = f.read().strip()
    except OSError:
        return False
    import resource

    return not pattern.startswith("|") and "/" not in pattern and \
        resource.getrlimit(resource.RLIMIT_CORE)[1] != 0


@pytest.mark.skipif(not core_dumps_land_in_the_cwd(), reason="core dumps do not go to the worker's cwd here")
def test_a_worker_that_dumps_core_is_logged_as_such(configured: Callable[..., ConfiguredServer]) -> None:
    server = configured("""
[www]
listen = {dir}/fpm.sock
app = tests.apps.crash:app
chdir = {dir}
rlimit_core = unlimited
pm = static
pm.max_children = 1
""")
    worker = server.worker_pids()[0]
    mark = server.log_size()
    try:
        with pytest.raises(Exception):  # noqa: B017 - the worker dies mid-request: any client error
            get(server.address, "/crash")
        log = server.wait_for_log(f"child {worker} exited", mark)
        assert f"child {worker} exited on signal 11 (SIGSEGV - core dumped) after" in log
    finally:
        for core in server.workdir.glob("core*"):
            core.unlink()  # some megabytes each


def test_workers_stop_when_the_master_is_killed(launcher: Launcher) -> None:
    # SIGKILL leaves the master no chance to stop its workers: they must notice on their own
    # (gunicorn's workers do the same) rather than serve on with nobody to supervise them.
    server = launcher.fastfpm("tests.apps.router:app", max_children=2)
    workers = server.worker_pids()
    assert len(workers) == 2
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(timeout=10)

    def all_gone() -> bool:
        alive = []
        for pid in workers:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                        alive.append(pid)
            except FileNotFoundError:
                pass
        return not alive

    wait_until(all_gone, 10, message="workers exiting after their master was killed")


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
    assert "the application could not be loaded" in log and "generation 1 keeps serving" in log
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
