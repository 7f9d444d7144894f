"""Past one machine (issue 11): two fastfpm hosts behind one nginx upstream, one killed, one reloaded.

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
import signal

import pytest

from tests.fcgi_helpers import get
from tests.fleet import HTTPLoad, Logged, Result, kill_host, start_fleet
from tests.servers import Launcher, wait_until

pytestmark = pytest.mark.nginx

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


def describe(results: list[Result], logged: dict[str, Logged]) -> str:
    """The requests and what nginx did with them, for a failing assertion's message."""
    return "\n".join(f"{r} -> {logged.get(r.load_id)}" for r in results)


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
    logged = {entry.load_id: entry for entry in fleet.nginx.access_log_entries()}
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
    logged = {entry.load_id: entry for entry in fleet.nginx.access_log_entries()}

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
