"""Past one machine (issue 11): two fastfpm hosts behind one nginx upstream, one killed, one reloaded;
and the configurations docs/scaling.md shows, checked by the tools that read them.

The hosts listen on 127.0.0.2 and 127.0.0.3, same port, as two machines would; nginx balances them
with the settings docs/scaling.md recommends (tests/fleet.py). The load is a few clients on kept-
alive HTTP connections, half sending GET (idempotent: nginx may pass it to the other host) and half
POST (not: nginx fails it rather than send it twice), each request held 0.3 s in the app so that
requests are surely in flight when the test strikes. Everything asserted is a count or an order
(in which phase of the test a request was sent), never a duration.

As many clients as a host has workers: however nginx spreads them, a host never has more requests
in flight than workers, so "in flight on the dead host" is bounded by its worker count, and the
access log says exactly which requests those were (nginx had sent them bytes, got no answer).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from fastfpm import config
from tests.fcgi_helpers import get
from tests.fleet import SERVER_PARAMS, UPSTREAM_CONF, Fleet, HTTPLoad, Logged, Result, kill_host, start_fleet
from tests.servers import NGINX_TEMP_PATHS, REPO_ROOT, Launcher, nginx_binary, run_cli, wait_until

ROUTER = "tests.apps.router:app"
WORKERS = 4
CLIENTS = WORKERS
HOLD = 0.3  # seconds each request spends in the app
PATH = f"/slow?seconds={HOLD}"
AFTER = 10 * CLIENTS  # requests answered after the event before the test stops the load
KEEPALIVE = pytest.mark.parametrize("keepalive", [False, True], ids=["keepconn-off", "keepconn-on"])


def mixed(client: int, n: int) -> tuple[str, str, bytes | None]:
    """Even clients GET, odd clients POST a small form."""
    if client % 2:
        return "POST", PATH, b"order=42&quantity=1"
    return "GET", PATH, None


def young_requests(address: str) -> list[dict[str, object]]:
    """The host's requests in the app that have at least half their time left (from its status
    page): a kill sent now finds them still running."""
    page = json.loads(get(address, "/status", "json&full").body)
    return [p for p in page["processes"] if p["state"] == "Running"
            and str(p["request uri"]).startswith("/slow") and int(p["request duration"]) < HOLD * 1e6 / 2]


def answered_by(result: Result) -> int:
    """The worker pid in the slow app's answer (`slept S in PID`)."""
    match = re.fullmatch(rb"slept [0-9.]+ in (\d+)\n", result.body)
    assert match, result
    return int(match.group(1))


def logged_by_nginx(fleet: Fleet, results: list[Result]) -> dict[str, Logged]:
    """nginx's access-log entry of every request the load sent, keyed by its id.

    nginx writes a request's line in its log phase, after the response has gone to the client,
    so the last answers can be in before their lines are: wait for every id to show.
    """
    wanted = {r.load_id for r in results}
    entries: dict[str, Logged] = {}

    def all_logged() -> bool:
        entries.clear()
        entries.update((e.load_id, e) for e in fleet.nginx.access_log_entries())
        return wanted <= set(entries)

    wait_until(all_logged, 10, message="nginx to log every request the load sent")
    return entries


def describe(results: list[Result], logged: dict[str, Logged]) -> str:
    """The requests and what nginx did with them, for a failing assertion's message."""
    return "\n".join(f"{r} -> {logged.get(r.load_id)}" for r in results)


@pytest.mark.nginx
@KEEPALIVE
def test_a_host_killed_under_load_fails_only_the_posts_in_flight_on_it(launcher: Launcher,
                                                                       keepalive: bool) -> None:
    fleet = start_fleet(launcher, ROUTER, WORKERS)
    dead, survivor = fleet.hosts
    load = HTTPLoad(fleet.port(keepalive), CLIENTS, mixed).start()
    try:
        load.wait_for(2 * CLIENTS)
        wait_until(lambda: young_requests(dead.address), 10, message="a fresh request on the doomed host")
        load.mark()  # phase 1: the kill is on its way
        assert kill_host(dead) == WORKERS + 1
        gone = load.mark()  # phase 2: not one process of the host is left
        load.wait_for(AFTER, gone)
    finally:
        results = load.stop()
    logged = logged_by_nginx(fleet, results)
    assert set(logged) == {r.load_id for r in results}

    # In flight on the dead host: nginx had sent it the request and got no answer. There were
    # some (the kill found a young request), never more than its workers, all sent before it was gone.
    in_flight = [r for r in results if logged[r.load_id].lost_on(dead.address)]
    assert 1 <= len(in_flight) <= WORKERS, describe(in_flight, logged)
    assert all(r.sent_in < gone for r in in_flight), describe(in_flight, logged)

    # The failures are exactly the POSTs among them (502: nginx does not send a non-idempotent
    # request twice); the GETs among them nginx passed to the survivor, which answered.
    failed = [r for r in results if r.status != 200]
    assert sorted(r.load_id for r in failed) == sorted(r.load_id for r in in_flight if r.method == "POST"), \
        describe(failed + in_flight, logged)
    assert {r.status for r in failed} <= {502}
    for r in in_flight:
        if r.method == "GET":
            assert [a.address for a in logged[r.load_id].attempts] == [dead.address, survivor.address]

    # Once the host is gone every request succeeds, on the survivor.
    later = [r for r in results if r.sent_in >= gone]
    assert len(later) >= AFTER
    assert [r for r in later if r.status != 200] == []
    assert {logged[r.load_id].attempts[-1].address for r in later} == {survivor.address}
    assert {answered_by(r) for r in later} <= set(survivor.worker_pids())


@pytest.mark.nginx
@KEEPALIVE
def test_a_host_reloaded_under_load_fails_nothing(launcher: Launcher, keepalive: bool) -> None:
    fleet = start_fleet(launcher, ROUTER, WORKERS)
    reloaded = fleet.hosts[0]
    old = set(reloaded.settled_workers())
    load = HTTPLoad(fleet.port(keepalive), CLIENTS, mixed).start()
    try:
        load.wait_for(2 * CLIENTS)
        wait_until(lambda: young_requests(reloaded.address), 10, message="a fresh request on the host")
        mark = reloaded.log_size()
        signalled = load.mark()  # phase 1: SIGUSR2 sent, the old generation still serving
        reloaded.signal(signal.SIGUSR2)
        reloaded.wait_for_log("reloaded: generation 2", mark, timeout=20)
        wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in old), 20,
                   message="the old generation to finish and be reaped")
        done = load.mark()  # phase 2: only the new generation left
        new = set(reloaded.settled_workers())
        load.wait_for(AFTER, done)
    finally:
        results = load.stop()
    logged = logged_by_nginx(fleet, results)

    failed = [r for r in results if r.status != 200]
    assert failed == [], describe(failed, logged)
    assert not new & old
    # Under load throughout: the old generation finished requests it had in hand at the signal
    # (the status page showed one young enough), the new one answered those sent once the old had
    # gone, GETs and POSTs alike.
    finished_by_old = {answered_by(r) for r in results if r.sent_in < signalled <= r.answered_in}
    pids_after = {answered_by(r) for r in results if r.sent_in >= done}
    assert finished_by_old & old
    assert pids_after & new
    assert not pids_after & old
    assert {r.method for r in results if r.sent_in >= done and answered_by(r) in new} == {"GET", "POST"}


# --- docs/scaling.md's configurations ------------------------------------------------------------

DOC = REPO_ROOT / "docs" / "scaling.md"

# What `nginx -t` needs around a block of http-level directives, every path in the test's directory.
NGINX_T = """\
pid {prefix}/nginx.pid;
events {{
}}
http {{
    access_log {prefix}/access.log;
""" + NGINX_TEMP_PATHS + """{block}
}}
"""


def doc_blocks(language: str) -> list[str]:
    """The fenced code blocks of docs/scaling.md in language, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```", DOC.read_text(), re.S | re.M)


def doc_pools(tmp_path: Path) -> list[config.Config]:
    """The two pool files the page shows (a host's, the Kubernetes pod's), loaded as serve would."""
    loaded = []
    for i, block in enumerate(doc_blocks("ini")):
        path = tmp_path / f"pool{i}.conf"
        path.write_text(block)
        loaded.append(config.load(path))
    assert len(loaded) == 2
    return loaded


@pytest.mark.nginx
def test_the_documented_nginx_configurations_pass_nginx_t(tmp_path: Path) -> None:
    """Every directive the page shows is one nginx knows, with arguments it accepts."""
    binary = nginx_binary()
    blocks = doc_blocks("nginx")
    assert len(blocks) == 2
    shutil.copy("/etc/nginx/fastcgi_params", tmp_path)  # `include fastcgi_params` is relative to the file
    for i, block in enumerate(blocks):
        conf = tmp_path / f"doc{i}.conf"
        conf.write_text(NGINX_T.format(prefix=tmp_path, block=block))
        checked = subprocess.run([binary, "-t", "-p", str(tmp_path), "-c", str(conf), "-e",
                                  str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, f"block {i}:\n{block}\n{checked.stderr}"
        assert "[warn]" not in checked.stderr, checked.stderr


def test_the_failover_tests_run_the_documented_upstream_settings() -> None:
    """The nginx in front of the tests' hosts (tests/fleet.py) is configured as the page says."""
    block = doc_blocks("nginx")[0]
    # Addresses, ports and the read timeout are the test's own; everything else must match.
    own = ("listen ", "include ", "fastcgi_pass ", "fastcgi_read_timeout ", "upstream ", "server ",
           "location ")
    settings = [line.strip() for line in block.splitlines()
                if line.strip() and line.strip() != "}" and not line.strip().startswith(own)]
    assert "least_conn;" in settings and "fastcgi_keep_conn on;" in settings
    assert [s for s in settings if s not in UPSTREAM_CONF] == []
    params = {line.split(None, 2)[2].rstrip(";") for line in block.splitlines()
              if line.strip().startswith("server 10.")}
    assert params == {SERVER_PARAMS}


def test_the_documented_pool_files_pass_fastfpm_check(tmp_path: Path) -> None:
    doc_pools(tmp_path)
    for path in sorted(tmp_path.glob("pool*.conf")):
        checked = run_cli("check", "-c", str(path), "-R")
        assert checked.returncode == 0, checked.stderr
        assert "WARNING" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr


def test_the_timeouts_on_the_page_nest(tmp_path: Path) -> None:
    """nginx waits longer than fastfpm lets a request run, and a graceful stop longer than that."""
    for pool in doc_pools(tmp_path):
        longest = pool.pools[0].request_terminate_timeout
        assert pool.global_.process_control_timeout > longest > 0
        for block in doc_blocks("nginx"):
            for seconds in re.findall(r"fastcgi_read_timeout (\d+)s;", block):
                assert int(seconds) > longest


def test_the_kubernetes_example_drains_nginx_before_stopping_fastfpm(tmp_path: Path) -> None:
    pool = doc_pools(tmp_path)[1]
    www = pool.pools[0]
    deployment, service = yaml.safe_load_all(doc_blocks("yaml")[0])
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    fpm, web = containers["fastfpm"], containers["nginx"]

    def hook(container: dict) -> str:
        return container["lifecycle"]["preStop"]["exec"]["command"][-1]

    def slept(command: str) -> int:
        return int(re.match(r"sleep (\d+);", command).group(1))

    # nginx stops taking requests after its sleep and finishes what it holds (at most the longest
    # request); fastfpm's graceful stop (SIGQUIT to PID 1, then waiting for it) comes after that,
    # and all of it inside the grace period, fastfpm's own drain included.
    assert "nginx -s quit" in hook(web)
    assert "kill -QUIT 1" in hook(fpm) and "while kill -0 1" in hook(fpm)
    assert slept(hook(fpm)) >= slept(hook(web)) + www.request_terminate_timeout
    assert pod["terminationGracePeriodSeconds"] > slept(hook(fpm)) + pool.global_.process_control_timeout
    assert fpm["command"][-2:] == ["-c", "/etc/fastfpm/fastfpm.conf"]

    # Readiness on the pool's ping: straight to its socket, and through nginx's probe port.
    probe = fpm["readinessProbe"]["exec"]["command"]
    assert probe[:6] == ["python", "-m", "fastfpm", "request", www.listen, www.ping_path]
    ports = {p["name"]: p["containerPort"] for p in web["ports"]}
    assert web["readinessProbe"]["httpGet"] == {"path": www.ping_path, "port": "probes"}
    assert f"listen {ports['probes']};" in doc_blocks("nginx")[1]
    # The Service exposes the application, never the probe port with the status page.
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["selector"] == deployment["spec"]["template"]["metadata"]["labels"]

    scrape = yaml.safe_load(doc_blocks("yaml")[1])["scrape_configs"][0]
    assert scrape["metrics_path"] == www.pm_status_path
    assert "openmetrics" in scrape["params"]
    assert {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "probes",
            "action": "keep"} in scrape["relabel_configs"]
