"""preload = yes through real masters, templates and workers (fastfpm.template).

The app is written into each server's own directory, so a test can change its code before a reload
or break its import; its import leaves a line (the importing pid) in imports.log, its start hook
one in hooks.log, and each response says `VERSION PID PPID STARTED`.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fcgi_helpers import get
from tests.servers import (
    ConfiguredServer,
    Launcher,
    Nginx,
    http_get,
    nginx_binary,
    peak_rss_kib,
    run_cli,
    wait_until,
    write_config,
)

APP = '''
import os
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "imports.log"), "a") as f:
    f.write(f"{{os.getpid()}}\\n")
if os.path.exists(os.path.join(HERE, "broken")):
    raise RuntimeError("the app is broken at import")
if os.path.exists(os.path.join(HERE, "spike")):
    # A peak at import that is gone before the fork: 64 MB touched, then freed (munmap).
    spike = bytearray(b"x" * (64 << 20))
    del spike
VERSION = "{version}"
started_in = None


def on_start(pool):
    global started_in
    started_in = os.getpid()
    with open(os.path.join(HERE, "hooks.log"), "a") as f:
        f.write(f"start {{os.getpid()}}\\n")


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    if environ["PATH_INFO"] == "/rss":
        import resource
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
        return [f"{{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}} {{resident}}".encode()]
    return [f"{{VERSION}} {{os.getpid()}} {{os.getppid()}} {{started_in == os.getpid()}}".encode()]
'''

POOL = """
[www]
listen = {{dir}}/fpm.sock
app = preload_app:app
python_path = {appdir}
on_worker_start = preload_app:on_start
preload = {preload}
pm = static
pm.max_children = {children}
"""


def write_app(directory: Path, version: str) -> None:
    """The app's module, answering with version (versions differ in length: a stale .pyc of the
    same size and second would otherwise be taken for the new source)."""
    (directory / "preload_app.py").write_text(APP.format(version=version))


@pytest.fixture
def preloaded(configured: Callable[..., ConfiguredServer], tmp_path_factory: pytest.TempPathFactory
              ) -> Callable[..., ConfiguredServer]:
    """Start a server on the app (version "one"); its module and the files it writes are in the
    server's `appdir`."""
    def make(children: int = 2, preload: str = "yes") -> ConfiguredServer:
        appdir = tmp_path_factory.mktemp("app")
        write_app(appdir, "one")
        server = configured(POOL.format(preload=preload, children=children, appdir=appdir))
        server.appdir = appdir  # type: ignore[attr-defined]
        return server
    return make


def templates(server: ConfiguredServer) -> list[int]:
    """The master's children that are templates: the pids its log says loaded the app. (Not by
    process title: a worker just cloned carries the template's until it sets its own.)"""
    loaded = {int(pid) for pid in re.findall(r"template (\d+) loaded the application", server.log_text())}
    return [pid for pid in server.worker_pids() if pid in loaded]


def workers(server: ConfiguredServer) -> list[int]:
    """The master's children that are workers."""
    loaded = {int(pid) for pid in re.findall(r"template (\d+) loaded the application", server.log_text())}
    return [pid for pid in server.worker_pids() if pid not in loaded]


def answer(server: ConfiguredServer) -> tuple[str, int, int, bool]:
    """One request: (version, pid, ppid, on_worker_start ran in this process)."""
    response = get(server.address, "/")
    assert response.status == 200, response.body
    version, pid, ppid, started = response.body.decode().split()
    return version, int(pid), int(ppid), started == "True"


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_workers_are_forked_from_one_template_that_imported_the_app_once(
        preloaded: Callable[..., ConfiguredServer]) -> None:
    server = preloaded(children=3)
    (template,) = templates(server)
    pids = workers(server)
    assert len(pids) == 3
    # The import ran once, in the template; none of the workers imported the app again.
    assert lines(server.appdir / "imports.log") == [str(template)]
    for _ in range(6):
        version, pid, ppid, started = answer(server)
        # CLONE_PARENT: the worker is the master's child, not the template's.
        assert (version, ppid, started) == ("one", server.pid, True)
        assert pid in pids
    # on_worker_start ran in every worker, never in the template.
    assert sorted(int(p) for p in lines(server.appdir / "hooks.log")[1::2]) == sorted(pids)
    assert str(template) not in lines(server.appdir / "hooks.log")
    assert f"template {template} loaded the application" in server.log_text()


def test_without_preload_each_worker_imports_the_app(preloaded: Callable[..., ConfiguredServer]) -> None:
    server = preloaded(children=2, preload="no")
    assert templates(server) == []
    assert sorted(int(p) for p in lines(server.appdir / "imports.log")) == sorted(workers(server))


def test_a_killed_worker_is_replaced_from_the_template(preloaded: Callable[..., ConfiguredServer]) -> None:
    server = preloaded(children=2)
    (template,) = templates(server)
    pids = workers(server)
    victim = pids[0]
    mark = server.log_size()
    os.kill(victim, signal.SIGKILL)
    server.wait_for_log(f"child {victim} exited on signal 9", mark, timeout=10)
    new = wait_until(lambda: len(w := workers(server)) == 2 and victim not in w and w, 10,
                     message="a replacement worker")
    assert templates(server) == [template]
    assert lines(server.appdir / "imports.log") == [str(template)]
    (replacement,) = set(new) - set(pids)
    wait_until(lambda: f"start {replacement}" in (server.appdir / "hooks.log").read_text(), 10,
               message="the replacement's start hook")
    assert answer(server)[2] == server.pid


def test_a_reload_starts_a_new_template_with_the_new_code_and_ends_the_old_one(
        preloaded: Callable[..., ConfiguredServer]) -> None:
    server = preloaded(children=2)
    (old_template,) = templates(server)
    old_workers = set(workers(server))
    write_app(server.appdir, "version-two")
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    server.wait_for_log("reloaded: generation 2", mark, timeout=15)
    (new_template,) = wait_until(lambda: (t := templates(server)) and old_template not in t and t, 10,
                                 message="the old template gone, the new one alone")
    wait_until(lambda: not set(workers(server)) & old_workers and len(workers(server)) == 2, 10,
               message="only new workers")
    assert {answer(server)[0] for _ in range(4)} == {"version-two"}
    assert lines(server.appdir / "imports.log") == [str(old_template), str(new_template)]
    assert f"template {old_template} of generation 1 ends" in server.log_since(mark)


def test_a_killed_template_is_logged_and_the_next_worker_comes_from_a_new_one(
        preloaded: Callable[..., ConfiguredServer]) -> None:
    server = preloaded(children=2)
    (template,) = templates(server)
    first = workers(server)
    mark = server.log_size()
    os.kill(template, signal.SIGKILL)
    log = server.wait_for_log(f"template {template} exited on signal 9", mark, timeout=10)
    assert f"ERROR: [pool www] template {template} exited on signal 9" in log
    # The workers it forked serve on: they are the master's, not the template's.
    assert {answer(server)[1] for _ in range(4)} <= set(first)
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    (new_template,) = wait_until(lambda: templates(server), 15, message="a new template")
    assert new_template != template
    wait_until(lambda: len(workers(server)) == 2 and victim not in workers(server), 10,
               message="a replacement")
    assert lines(server.appdir / "imports.log") == [str(template), str(new_template)]
    version, pid, ppid, started = answer(server)
    assert ppid == server.pid and started


def test_a_workers_peak_rss_counts_what_it_shares_but_not_the_templates_own_peak(
        configured: Callable[..., ConfiguredServer], tmp_path_factory: pytest.TempPathFactory) -> None:
    """pm.max_memory's figure (ru_maxrss) means with preload what it means without: the worker's
    resident set, shared pages included, from its fork on."""
    appdir = tmp_path_factory.mktemp("app")
    write_app(appdir, "one")
    (appdir / "spike").touch()
    server = configured(POOL.format(preload="yes", children=1, appdir=appdir))
    (template,) = templates(server)
    template_peak = peak_rss_kib(template)
    assert template_peak > 128 << 10  # the spike: b"x" * 64M and its bytearray copy
    response = get(server.address, "/rss")
    peak, resident = (int(x) for x in response.body.split())
    # The pages it shares with the template count (the interpreter and the app: megabytes); the
    # kernel's per-CPU RSS counters lag by a few pages, so the peak may read a little below statm's.
    assert resident > 8 << 10 and peak > 0.9 * resident
    # ... but the template's peak at import, gone before the fork, is not inherited.
    assert peak < template_peak - (64 << 10)


def test_an_app_that_cannot_be_imported_starts_nothing(tmp_path: Path) -> None:
    write_app(tmp_path, "one")
    (tmp_path / "broken").touch()
    conf = write_config(tmp_path / "fpm.conf", POOL.format(preload="yes", children=2, appdir=tmp_path)
                        .replace("{dir}", str(tmp_path)))
    result = run_cli("serve", "-c", str(conf), "-R")
    assert result.returncode == 1
    log = result.stderr
    assert "RuntimeError: the app is broken at import" in log
    assert "could not load the application" in log      # the template's failure, logged by the master
    assert "exited with code 3" in log and "; stopping" in log  # the master's alert (any wording)
    assert "ready to handle connections" not in log
    assert not (tmp_path / "hooks.log").exists()          # no worker ever started serving


def test_a_reload_whose_app_cannot_be_imported_keeps_the_running_generation(
        preloaded: Callable[..., ConfiguredServer]) -> None:
    server = preloaded(children=2)
    (template,) = templates(server)
    running = set(workers(server))
    (server.appdir / "broken").touch()
    write_app(server.appdir, "version-two")
    mark = server.log_size()
    server.signal(signal.SIGUSR2)
    log = server.wait_for_log("generation 1 keeps serving", mark, timeout=15)
    assert "RuntimeError: the app is broken at import" in log
    assert "could not load the application" in log
    assert {answer(server)[0] for _ in range(4)} == {"one"}
    assert set(workers(server)) == running and templates(server) == [template]
    # The old generation's template is still the one that replaces its workers.
    (server.appdir / "broken").unlink()
    victim = sorted(running)[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(workers(server)) == 2 and victim not in workers(server), 10,
               message="a replacement")
    assert {answer(server)[0] for _ in range(4)} == {"one"}
    assert templates(server) == [template]


@pytest.mark.nginx
def test_nginx_in_front_of_a_preload_pool(preloaded: Callable[..., ConfiguredServer],
                                          launcher: Launcher) -> None:
    server = preloaded(children=2)
    web = launcher.start(Nginx(nginx_binary(), launcher.directory("nginx"), server.nginx_pass))
    replies = [http_get(web.port, "/") for _ in range(8)]
    assert all(reply.status == 200 for reply in replies)
    assert {reply.body.decode().split()[0] for reply in replies} == {"one"}
    assert {int(reply.body.decode().split()[2]) for reply in replies} == {server.pid}


def test_a_preload_value_that_does_not_parse_is_a_file_line_error(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "fpm.conf", POOL.format(preload="maybe", children=1, appdir=tmp_path)
                        .replace("{dir}", str(tmp_path)))
    result = run_cli("check", "-c", str(conf))
    assert result.returncode == 1
    line = conf.read_text().splitlines().index("preload = maybe") + 1
    assert f"{conf}:{line}: invalid value 'maybe' for 'preload'" in result.stderr + result.stdout


def test_sigusr1_reopens_the_access_log_for_workers_forked_from_the_template(
        configured: Callable[..., ConfiguredServer], tmp_path_factory: pytest.TempPathFactory) -> None:
    """The template's access log descriptor dates from its fork: each worker gets the master's."""
    appdir = tmp_path_factory.mktemp("app")
    write_app(appdir, "one")
    server = configured(POOL.format(preload="yes", children=1, appdir=appdir)
                        + "access.log = {dir}/access.log\naccess.format = %r\n")
    log = server.workdir / "access.log"
    assert get(server.address, "/before").status == 200
    wait_until(lambda: log.exists() and log.read_text() == "/before\n", 5, message="the first line")
    os.rename(log, server.workdir / "access.log.1")
    (old,) = workers(server)
    mark = server.log_size()
    server.signal(signal.SIGUSR1)
    server.wait_for_log("access log file re-opened", mark)
    wait_until(lambda: (w := workers(server)) and old not in w, 10, message="a new worker")
    assert get(server.address, "/after").status == 200
    wait_until(lambda: log.exists() and log.read_text() == "/after\n", 5, message="the line in the new file")
    assert (server.workdir / "access.log.1").read_text() == "/before\n"


def test_an_ondemand_pool_starts_its_template_with_its_first_worker(
        configured: Callable[..., ConfiguredServer], tmp_path_factory: pytest.TempPathFactory) -> None:
    appdir = tmp_path_factory.mktemp("app")
    write_app(appdir, "one")
    server = configured(POOL.format(preload="yes", children=2, appdir=appdir)
                        .replace("pm = static", "pm = ondemand"))
    assert server.worker_pids() == []  # no worker, so no template either: nothing imported yet
    assert lines(appdir / "imports.log") == []
    version, pid, ppid, started = answer(server)
    (template,) = templates(server)
    assert (version, ppid, started) == ("one", server.pid, True)
    assert lines(appdir / "imports.log") == [str(template)]
