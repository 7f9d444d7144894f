"""fastfpm.pm: the process manager's decisions, with fabricated snapshots and no processes."""

from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from fastfpm import pm
from fastfpm.config import Config, PoolConfig, check
from fastfpm.pm import (
    EmergencyRestart,
    Kill,
    PmState,
    PoolSnapshot,
    ProcessMaxState,
    SlowlogDump,
    Spawn,
    Terminate,
    Warn,
    WorkerInfo,
    cap_spawns,
    decide,
    initial_spawn,
    on_connection_pending,
    on_worker_exit,
    overdue,
)

NOW = 1000.0


def make_pool(**values) -> PoolConfig:
    """A checked PoolConfig, so the tests use the same objects the master gets."""
    values.setdefault("app", "myapp:application")
    pool = PoolConfig(**values)
    check(Config(pools=[pool]))
    return pool


def dynamic(max_children=10, min_spare=2, max_spare=4, **more) -> PoolConfig:
    return make_pool(pm="dynamic", pm_max_children=max_children, pm_min_spare_servers=min_spare,
                     pm_max_spare_servers=max_spare, **more)


def idle(pid, since=NOW - 1, started=0.0, **more) -> WorkerInfo:
    return WorkerInfo(pid, "idle", started=started, idle_since=since, **more)


def busy(pid, request_started=NOW - 1, stage="running", **more) -> WorkerInfo:
    return WorkerInfo(pid, stage, request_started=request_started, **more)


def starting(pid) -> WorkerInfo:
    return WorkerInfo(pid, "starting")


def snap(*workers: WorkerInfo) -> PoolSnapshot:
    return PoolSnapshot(tuple(workers))


def busies(n, first_pid=100) -> list[WorkerInfo]:
    return [busy(first_pid + i) for i in range(n)]


def spawns(actions) -> int:
    return sum(a.n for a in actions if isinstance(a, Spawn))


def warnings(actions) -> list[Warn]:
    return [a for a in actions if isinstance(a, Warn)]


# ---------------------------------------------------------------------------------------------------
# the snapshot

def test_snapshot_counts():
    s = snap(idle(1), idle(2, stopping=True), busy(3), busy(4, stage="reading_headers"), starting(5),
             WorkerInfo(6, "ending", stopping=True))
    assert (s.total, s.idle, s.busy, s.starting) == (6, 1, 2, 1)


def test_worker_from_slot():
    slot = SimpleNamespace(pid=42, stage=5, requests=7, idle_since_ns=3_000_000_000,
                           request_start_ns=5_500_000_000, method="GET", request_uri="/slow",
                           query_string="a=1", script_filename="")
    worker = pm.worker_from_slot(slot, started=1.0)
    assert worker == WorkerInfo(42, "running", started=1.0, idle_since=3.0, request_started=5.5, requests=7,
                                method="GET", uri="/slow", query_string="a=1")
    assert worker.request == "GET /slow?a=1"
    # REQUEST_URI with the query already in it (nginx's $request_uri): not appended twice
    whole = SimpleNamespace(**{**vars(slot), "request_uri": "/slow?a=1"})
    assert pm.worker_from_slot(whole, started=1.0).request == "GET /slow?a=1"
    idle_slot = SimpleNamespace(pid=43, stage=2, requests=1, idle_since_ns=9_000_000_000,
                                request_start_ns=5_500_000_000, method="GET", request_uri="/",
                                query_string="", script_filename="")
    worker = pm.worker_from_slot(idle_slot, started=2.0, stopping=True)
    assert (worker.stage, worker.request_started) == ("idle", None)
    assert (worker.idle_since, worker.stopping) == (9.0, True)


def test_stage_names_follow_the_scoreboard():
    lib = pytest.importorskip("fastfpm._scoreboard_cffi").lib
    for number, name in enumerate(pm.STAGES):
        assert getattr(lib, f"FFPM_STAGE_{name.upper()}") == number


# ---------------------------------------------------------------------------------------------------
# static

def test_initial_spawn_per_mode():
    assert initial_spawn(make_pool(pm_max_children=6)) == 6
    assert initial_spawn(dynamic(max_children=10, min_spare=2, max_spare=6)) == 4
    assert initial_spawn(dynamic(pm_start_servers=5, max_spare=6)) == 5
    assert initial_spawn(make_pool(pm="ondemand", pm_max_children=6)) == 0


def test_static_keeps_max_children_alive():
    pool = make_pool(pm_max_children=4)
    state = PmState()
    assert decide(snap(), pool, state, NOW) == [Spawn(4)]
    assert decide(snap(idle(1), busy(2)), pool, state, NOW) == [Spawn(2)]
    assert decide(snap(idle(1), busy(2), busy(3), starting(4)), pool, state, NOW) == []
    # a worker on its way out still holds its place until it has exited
    assert decide(snap(idle(1), busy(2), busy(3), busy(4, stopping=True)), pool, state, NOW) == []
    # static never stops idle workers, however many
    assert decide(snap(*(idle(i) for i in range(4))), pool, state, NOW + 3600) == []


# ---------------------------------------------------------------------------------------------------
# dynamic

def test_dynamic_spawn_rate_doubles_each_tick_up_to_max_spawn_rate():
    pool = dynamic(max_children=500, min_spare=200, max_spare=200)
    state = PmState()
    got = [spawns(decide(snap(), pool, state, NOW + tick)) for tick in range(8)]
    assert got == [1, 2, 4, 8, 16, 32, 32, 32]


def test_dynamic_spawn_rate_stops_at_a_limit_that_is_not_a_power_of_two():
    pool = dynamic(max_children=500, min_spare=200, max_spare=200, pm_max_spawn_rate=5)
    state = PmState()
    assert [spawns(decide(snap(), pool, state, NOW + t)) for t in range(5)] == [1, 2, 4, 5, 5]


def test_dynamic_spawns_only_what_min_spare_needs():
    pool = dynamic(max_children=20, min_spare=4, max_spare=8)
    state = PmState(spawn_rate=16)
    assert decide(snap(idle(1), idle(2), idle(3), *busies(5)), pool, state, NOW) == [
        Warn("[pool www] seems busy (you may need to increase pm.start_servers, or "
             "pm.min/max_spare_servers), spawning 1 children, there are 3 idle, and 8 total children"),
        Spawn(1)]


def test_dynamic_spawn_is_capped_by_max_children():
    pool = dynamic(max_children=10, min_spare=5, max_spare=8)
    state = PmState(spawn_rate=8)
    actions = decide(snap(*busies(8)), pool, state, NOW)
    assert spawns(actions) == 2
    assert state.spawn_rate == 16


def test_dynamic_starting_workers_count_toward_min_spare():
    pool = dynamic(max_children=10, min_spare=3, max_spare=5)
    state = PmState(spawn_rate=4)
    assert decide(snap(idle(1), starting(2), starting(3), busy(4)), pool, state, NOW) == []
    assert state.spawn_rate == 1
    assert spawns(decide(snap(idle(1), starting(2), busy(4)), pool, state, NOW + 1)) == 1


def test_dynamic_seems_busy_warning_from_rate_8():
    pool = dynamic(max_children=500, min_spare=200, max_spare=200)
    state = PmState()
    warned = [bool(warnings(decide(snap(), pool, state, NOW + t))) for t in range(6)]
    assert warned == [False, False, False, True, True, True]


def test_dynamic_rate_resets_when_enough_idle():
    pool = dynamic(max_children=50, min_spare=5, max_spare=10)
    state = PmState()
    for t in range(3):
        decide(snap(*busies(10)), pool, state, NOW + t)
    assert state.spawn_rate == 8
    assert decide(snap(*(idle(i) for i in range(6))), pool, state, NOW + 3) == []
    assert state.spawn_rate == 1
    assert spawns(decide(snap(*busies(10)), pool, state, NOW + 4)) == 1


def test_dynamic_kills_one_idle_worker_per_tick_the_one_idle_longest():
    pool = dynamic(max_children=10, min_spare=1, max_spare=3)
    state = PmState(spawn_rate=4)
    workers = [idle(1, since=NOW - 5, started=1.0), idle(2, since=NOW - 50, started=9.0),
               idle(3, since=NOW - 20, started=2.0), idle(4, since=NOW - 1, started=0.5),
               idle(5, since=NOW - 30, started=3.0), busy(6)]
    assert decide(snap(*workers), pool, state, NOW) == [Kill(2, "idle")]
    assert state.spawn_rate == 1
    # next tick: worker 2 is stopping (and no longer idle), the next longest idle goes
    workers[1] = WorkerInfo(2, "idle", idle_since=NOW - 50, stopping=True)
    assert decide(snap(*workers), pool, state, NOW + 1) == [Kill(5, "idle")]
    # idle == max_spare: nothing more to stop
    assert decide(snap(idle(1), idle(3), idle(4), busy(6)), pool, state, NOW + 2) == []


def test_dynamic_never_kills_busy_or_starting_workers():
    pool = dynamic(max_children=10, min_spare=1, max_spare=1)
    state = PmState()
    assert decide(snap(idle(1), starting(2), starting(3), *busies(5)), pool, state, NOW) == []


def test_dynamic_warns_once_per_episode_when_max_children_stops_a_spawn():
    pool = dynamic(max_children=4, min_spare=2, max_spare=3)
    state = PmState()
    full = snap(*busies(4))
    expected = Warn("[pool www] server reached pm.max_children setting (4), consider raising it",
                    counter="max_children_reached")
    assert decide(full, pool, state, NOW) == [expected]
    assert state.max_children_reached == 1
    for t in range(1, 5):
        assert decide(full, pool, state, NOW + t) == []
    assert state.max_children_reached == 1
    # the pool recovers (enough idle workers): the episode is over
    assert decide(snap(idle(1), idle(2), busy(3)), pool, state, NOW + 5) == []
    assert decide(full, pool, state, NOW + 6) == [expected]
    assert state.max_children_reached == 2


def test_dynamic_max_children_warning_rearms_after_a_spawn():
    pool = dynamic(max_children=4, min_spare=2, max_spare=3)
    state = PmState()
    assert warnings(decide(snap(*busies(4)), pool, state, NOW))
    assert decide(snap(*busies(3)), pool, state, NOW + 1) == [Spawn(1)]
    assert warnings(decide(snap(*busies(4)), pool, state, NOW + 2))
    assert state.max_children_reached == 2


def test_dynamic_max_children_resets_the_spawn_rate():
    pool = dynamic(max_children=4, min_spare=2, max_spare=3)
    state = PmState(spawn_rate=8)
    decide(snap(*busies(4)), pool, state, NOW)
    assert state.spawn_rate == 1


# ---------------------------------------------------------------------------------------------------
# ondemand

def ondemand(**more) -> PoolConfig:
    more.setdefault("pm_max_children", 4)
    return make_pool(pm="ondemand", **more)


def test_ondemand_stops_the_longest_idle_worker_after_the_idle_timeout():
    pool = ondemand(pm_process_idle_timeout=10)
    state = PmState()
    workers = [idle(1, since=NOW - 11), idle(2, since=NOW - 30), idle(3, since=NOW - 2), busy(4)]
    assert decide(snap(*workers), pool, state, NOW) == [Kill(2, "idle timeout")]
    workers[1] = WorkerInfo(2, "idle", idle_since=NOW - 30, stopping=True)
    assert decide(snap(*workers), pool, state, NOW + 1) == [Kill(1, "idle timeout")]
    # exactly at the timeout is not past it
    assert decide(snap(idle(3, since=NOW - 10)), pool, state, NOW) == []
    assert decide(snap(busy(4), starting(5)), pool, state, NOW + 3600) == []


def test_ondemand_spawns_when_a_connection_waits_and_nobody_is_idle():
    pool = ondemand()
    state = PmState()
    assert on_connection_pending(snap(), pool, state) == [Spawn(1)]
    assert on_connection_pending(snap(busy(1)), pool, state) == [Spawn(1)]
    assert on_connection_pending(snap(busy(1), idle(2)), pool, state) == []
    assert on_connection_pending(snap(busy(1), starting(2)), pool, state) == []
    assert on_connection_pending(snap(busy(1), idle(2, stopping=True)), pool, state) == [Spawn(1)]


def test_ondemand_burst_spawns_one_per_waiting_connection_up_to_max_children():
    pool = ondemand(pm_max_children=4)
    state = PmState()
    assert on_connection_pending(snap(), pool, state, pending=3) == [Spawn(3)]
    assert on_connection_pending(snap(starting(1)), pool, state, pending=9) == [Spawn(3)]
    assert on_connection_pending(snap(), pool, state, pending=0) == []


def test_ondemand_warns_once_when_max_children_is_reached():
    pool = ondemand(pm_max_children=2)
    state = PmState()
    full = snap(busy(1), busy(2))
    assert on_connection_pending(full, pool, state) == [
        Warn("[pool www] server reached pm.max_children setting (2), consider raising it",
             counter="max_children_reached")]
    assert on_connection_pending(full, pool, state) == []
    assert state.max_children_reached == 1
    # a full pool with an idle worker: the connection will be taken, nothing to count
    assert on_connection_pending(snap(busy(1), idle(2)), pool, state) == []
    decide(snap(busy(1)), pool, state, NOW)  # room again: the episode is over
    assert warnings(on_connection_pending(full, pool, state))
    assert state.max_children_reached == 2


def test_on_connection_pending_is_not_for_static():
    assert on_connection_pending(snap(), make_pool(), PmState()) == []


def test_dynamic_spawns_for_waiting_connections_without_the_tick():
    # issue 12: the last idle worker turned busy and connections wait: fork for them at once,
    # within pm.max_children, and leave spawn_rate (the tick's doubling) alone.
    pool = dynamic(max_children=6)
    state = PmState()
    assert on_connection_pending(snap(busy(1)), pool, state, pending=4) == [Spawn(4)]
    assert on_connection_pending(snap(busy(1), idle(2)), pool, state, pending=1) == []
    assert on_connection_pending(snap(*busies(4)), pool, state, pending=9) == [Spawn(2)]
    assert state.spawn_rate == 1
    assert warnings(on_connection_pending(snap(*busies(6)), pool, state))
    assert state.max_children_reached == 1


# ---------------------------------------------------------------------------------------------------
# replacing workers that exit

def test_on_worker_exit():
    assert on_worker_exit(snap(idle(1)), make_pool(pm_max_children=3), killed_by_pm=False) == [Spawn(2)]
    assert on_worker_exit(snap(idle(1)), dynamic(), killed_by_pm=False) == [Spawn(1)]
    assert on_worker_exit(snap(), ondemand(), killed_by_pm=False) == [Spawn(1)]
    assert on_worker_exit(snap(idle(1)), dynamic(), killed_by_pm=True) == []
    assert on_worker_exit(snap(), ondemand(), killed_by_pm=True) == []
    assert on_worker_exit(snap(*busies(4)), ondemand(pm_max_children=4), killed_by_pm=False) == []


# ---------------------------------------------------------------------------------------------------
# process.max

def test_cap_spawns_without_limit_changes_nothing():
    actions = {"a": [Spawn(5)], "b": [Kill(1, "idle"), Spawn(2)]}
    assert cap_spawns(actions, alive_total=100, process_max=0) == actions


def test_cap_spawns_serves_pools_in_order_and_warns_once_per_episode():
    state = ProcessMaxState()
    actions = {"a": [Spawn(3)], "b": [Warn("x"), Spawn(4)], "c": [Spawn(1)]}
    capped = cap_spawns(actions, alive_total=5, process_max=10, state=state)
    assert capped == {"a": [Spawn(3)], "b": [Warn("x"), Spawn(2), Warn(pm.PROCESS_MAX_MESSAGE)], "c": []}
    assert cap_spawns(actions, alive_total=5, process_max=10, state=state) == {
        "a": [Spawn(3)], "b": [Warn("x"), Spawn(2)], "c": []}
    # a tick that wants no spawn ends nothing: the next cut stays quiet
    assert cap_spawns({"a": [Kill(1, "idle")]}, alive_total=5, process_max=10, state=state) == {
        "a": [Kill(1, "idle")]}
    assert warnings(cap_spawns(actions, alive_total=5, process_max=10, state=state)["b"]) == [Warn("x")]
    # a spawn that goes through uncut ends the episode, the next cut warns again
    assert cap_spawns({"a": [Spawn(1)]}, alive_total=5, process_max=10, state=state) == {"a": [Spawn(1)]}
    assert warnings(cap_spawns(actions, alive_total=5, process_max=10, state=state)["b"])[-1].message \
        == pm.PROCESS_MAX_MESSAGE


def test_cap_spawns_over_the_limit_drops_every_spawn():
    capped = cap_spawns({"a": [Kill(1, "idle"), Spawn(2)]}, alive_total=12, process_max=10)
    assert capped == {"a": [Kill(1, "idle"), Warn(pm.PROCESS_MAX_MESSAGE)]}


# ---------------------------------------------------------------------------------------------------
# request timeouts

def test_terminate_once_per_request_then_sigkill_after_grace():
    pool = make_pool(request_terminate_timeout=30)
    state = PmState()
    worker = busy(7, request_started=NOW - 30, method="GET", uri="/slow", query_string="x=1")
    (action,) = overdue(snap(worker), pool, NOW, state)
    assert action == Terminate(7, 30.0, message="[pool www] child 7, script 'myapp:application' "
                                                "(request: \"GET /slow?x=1\") execution timed out "
                                                "(30.000000 sec), terminating")
    assert overdue(snap(worker), pool, NOW + 0.5, state) == []
    (forced,) = overdue(snap(WorkerInfo(7, "ending", request_started=NOW - 30, stopping=True)), pool,
                        NOW + 1, state)
    assert forced.force and forced.pid == 7
    assert overdue(snap(worker), pool, NOW + 5, state) == []
    # the worker is gone: forgotten
    assert overdue(snap(), pool, NOW + 6, state) == []
    assert state.terminated == {}


def test_terminate_not_before_the_timeout_and_not_for_idle_or_finishing_workers():
    pool = make_pool(request_terminate_timeout=30)
    state = PmState()
    assert overdue(snap(busy(1, request_started=NOW - 29.9)), pool, NOW, state) == []
    assert overdue(snap(idle(2, since=NOW - 100)), pool, NOW, state) == []
    assert overdue(snap(busy(3, request_started=NOW - 100, stage="finishing")), pool, NOW, state) == []
    assert [a.pid for a in overdue(snap(busy(4, request_started=NOW - 31, stage="reading_headers"),
                                        busy(5, request_started=NOW - 31, stage="busy")), pool, NOW, state)] \
        == [4, 5]


def test_a_new_request_on_the_same_worker_is_timed_afresh():
    pool = make_pool(request_terminate_timeout=10)
    state = PmState()
    assert len(overdue(snap(busy(1, request_started=NOW - 10)), pool, NOW, state)) == 1
    # it survived SIGTERM and went back to idle, then took another request
    assert overdue(snap(idle(1)), pool, NOW + 0.2, state) == []
    assert overdue(snap(busy(1, request_started=NOW + 1)), pool, NOW + 5, state) == []
    assert len(overdue(snap(busy(1, request_started=NOW + 1)), pool, NOW + 11, state)) == 1


def test_slowlog_once_per_request_and_counted():
    pool = make_pool(request_slowlog_timeout=5, slowlog="/tmp/slow.log")
    state = PmState()
    worker = busy(3, request_started=NOW - 6, script="/srv/app.py", method="POST", uri="/upload")
    (action,) = overdue(snap(worker), pool, NOW, state)
    assert action == SlowlogDump(3, 6.0, message="[pool www] child 3, script '/srv/app.py' "
                                                 "(request: \"POST /upload\") executing too slow "
                                                 "(6.000000 sec), logging")
    assert state.slow_requests == 1
    assert overdue(snap(worker), pool, NOW + 10, state) == []
    # the next request of the same worker is traced again
    again = busy(3, request_started=NOW + 20)
    assert [type(a) for a in overdue(snap(again), pool, NOW + 26, state)] == [SlowlogDump]
    assert state.slow_requests == 2


def test_timeout_lines_purify_control_characters_and_truncate_to_microseconds():
    # nginx decodes %0A into SCRIPT_FILENAME: the line must stay one line (php-fpm's
    # str_purify_filename), and the time is a timeval's %d.%06d, truncated, not rounded.
    forged = "/srv/app.py\n[22-Nov-2026 10:00:00] WARNING: forged\r\x1b[31m"
    pool = make_pool(request_slowlog_timeout=1, slowlog="/tmp/slow.log", request_terminate_timeout=2)
    state = PmState()
    worker = busy(5, request_started=NOW - 1.0001239, script=forged, method="GET",
                  uri="/a\nb\x85", query_string="q=\x00")
    (slow,) = overdue(snap(worker), pool, NOW, state)
    assert slow.message == ("[pool www] child 5, script '/srv/app.py.[22-Nov-2026 10:00:00] WARNING: "
                            "forged..[31m' (request: \"GET /a.b.?q=.\") executing too slow "
                            "(1.000123 sec), logging")
    (end,) = overdue(snap(worker), pool, NOW + 1.0000009, state)
    assert isinstance(end, Terminate)
    assert end.message.endswith("execution timed out (2.000124 sec), terminating")
    assert "\n" not in end.message and "\r" not in end.message and "\x85" not in end.message
    assert "script '/srv/app.py.[22-Nov-2026" in end.message


def test_timeout_lines_name_the_app_when_there_is_no_script():
    pool = make_pool(request_terminate_timeout=0.2)
    (action,) = overdue(snap(busy(1, request_started=NOW - 0.29)), pool, NOW, PmState())
    # NOW - (NOW - 0.29) is 0.28999... as a float: still 290000 microseconds, as a timeval would hold
    assert action.message == ("[pool www] child 1, script 'myapp:application' (request: \"\") "
                              "execution timed out (0.290000 sec), terminating")


def test_slowlog_only_while_the_app_runs():
    pool = make_pool(request_slowlog_timeout=5, slowlog="/tmp/slow.log")
    state = PmState()
    assert overdue(snap(busy(1, request_started=NOW - 9, stage="reading_headers"),
                        busy(2, request_started=NOW - 9, stage="finishing")), pool, NOW, state) == []


def test_slowlog_first_then_terminate_at_the_next_check():
    pool = make_pool(request_slowlog_timeout=5, slowlog="/tmp/slow.log", request_terminate_timeout=5)
    state = PmState()
    worker = busy(9, request_started=NOW - 5)
    assert [type(a) for a in overdue(snap(worker), pool, NOW, state)] == [SlowlogDump]
    assert [type(a) for a in overdue(snap(worker), pool, NOW + 0.2, state)] == [Terminate]


def test_no_timeouts_no_actions():
    pool = make_pool()
    assert overdue(snap(busy(1, request_started=NOW - 10 ** 6)), pool, NOW, PmState()) == []


def test_check_interval():
    assert pm.check_interval([make_pool()]) is None
    assert pm.check_interval([make_pool(request_terminate_timeout=30),
                              make_pool(name="b", listen="9001", request_slowlog_timeout=6,
                                        slowlog="/tmp/s.log")]) == 2.0
    assert pm.check_interval([make_pool(request_terminate_timeout=0.1)]) == pm.MIN_CHECK_INTERVAL


# ---------------------------------------------------------------------------------------------------
# emergency restart

def test_emergency_restart_threshold_within_interval():
    er = EmergencyRestart(threshold=3, interval=10)
    assert er.enabled
    assert not er.record(0.0, signal.SIGSEGV)
    assert not er.record(1.0, signal.SIGTERM)  # only SIGSEGV and SIGBUS count
    assert not er.record(2.0, None)
    assert not er.record(3.0, signal.SIGBUS)
    assert er.record(9.0, signal.SIGSEGV)
    assert er.message == "failed processes threshold (3 in 10 sec) is reached, initiating reload"
    # spread out over more than the interval: no reload
    assert not er.record(20.0, signal.SIGSEGV)
    assert not er.record(25.0, signal.SIGSEGV)
    assert not er.record(31.0, signal.SIGSEGV)


@pytest.mark.parametrize(("threshold", "interval"), [(0, 10), (3, 0)])
def test_emergency_restart_off(threshold, interval):
    er = EmergencyRestart(threshold, interval)
    assert not er.enabled
    assert not any(er.record(float(t), signal.SIGSEGV) for t in range(10))
