"""The process manager's decisions: pure functions of a pool snapshot, the pool's config and the time.

php-fpm's fpm_process_ctl.c is the model: once a second the master looks at each pool's scoreboard
and decides whom to spawn and whom to stop (fpm_pctl_perform_idle_server_maintenance), an ondemand
pool spawns when a connection waits and nobody is idle (fpm_pctl_on_socket_accept), and on a
shorter heartbeat requests that run too long are traced or ended (fpm_request_check_timed_out).
Here those decisions return Actions and the master carries them out; nothing in this module forks,
signals, logs or reads a clock, so every rule is tested with fabricated snapshots.

What the master calls:

    initial_spawn(pool) -> int                                   workers to start with
    decide(snapshot, pool, state, now) -> [Action]               once per MAINTENANCE_INTERVAL
    on_connection_pending(snapshot, pool, state, pending=1)      ondemand/dynamic: a connection waits
    on_worker_exit(snapshot, pool, killed_by_pm=...) -> [Action] after reaping a worker
    cap_spawns(actions_by_pool, alive_total, process_max, state) process.max over all pools
    overdue(snapshot, pool, now, state) -> [Action]              every check_interval(pools) seconds
    EmergencyRestart(threshold, interval).record(now, signum)    emergency_restart_threshold

Actions: Spawn(n), Kill(pid, reason) (a graceful stop, SIGQUIT, and no respawn), Warn(message),
Terminate(pid, force) (SIGTERM, or SIGKILL when force) and SlowlogDump(pid). Warn and the timeout
actions carry the log line in php-fpm's words, ready for the error log at WARNING.

All times are seconds on the monotonic clock (time.monotonic(), the scoreboard's CLOCK_MONOTONIC).
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastfpm.slowlog import request_line, slow_request_message, terminate_message
from fastfpm.stages import BY_CONSTANT, PM_NAMES, STAGE_TABLE

__all__ = [
    "STAGES", "IDLE", "STARTING", "BUSY_STAGES", "MAINTENANCE_INTERVAL", "MIN_CHECK_INTERVAL",
    "TERMINATE_GRACE", "WorkerInfo", "PoolSnapshot", "Counters", "PmState", "ProcessMaxState",
    "Spawn", "Kill", "Warn", "Terminate", "SlowlogDump", "Action",
    "initial_spawn", "decide", "on_connection_pending", "on_worker_exit", "cap_spawns", "overdue",
    "check_interval", "worker_from_slot", "EmergencyRestart",
]

# php-fpm runs the idle-server maintenance every second (FPM_IDLE_SERVER_MAINTENANCE_HEARTBEAT) and
# the spawn rate doubles once per run, so decide() must be called at this interval, not more often.
MAINTENANCE_INTERVAL = 1.0
# The request-timeout heartbeat is a third of the shortest timeout, never below 130 ms
# (FPM_PCTL_MIN_HEARTBEAT); see check_interval().
MIN_CHECK_INTERVAL = 0.13
# SIGTERM for an overdue request, then SIGKILL if the worker is still there this much later.
TERMINATE_GRACE = 1.0
# php-fpm warns "seems busy" once the spawn rate has doubled up to this.
BUSY_WARNING_RATE = 8

# The scoreboard's stages (csrc/scoreboard.h FFPM_STAGE_*), by number, from fastfpm.stages' table.
STAGES = PM_NAMES
IDLE = BY_CONSTANT["FFPM_STAGE_IDLE"].pm_name
STARTING = BY_CONSTANT["FFPM_STAGE_STARTING"].pm_name
# Serving a request (php-fpm's "active"); "busy" is accepted for snapshots made without a scoreboard.
BUSY_STAGES = frozenset({stage.pm_name for stage in STAGE_TABLE if stage.busy} | {"busy"})
# Where request_terminate_timeout applies: php-fpm checks from accept until the script ends
# (READING_HEADERS .. EXECUTING), not while the response is being finished.
_TIMED_STAGES = frozenset({"reading_headers", "info", "running", "busy"})
# Where the slow log applies: php-fpm traces only while the script executes.
_SLOWLOG_STAGES = frozenset({"running", "busy"})

PROCESS_MAX_MESSAGE = ("The maximum number of processes has been reached. Please review your configuration "
                       "and consider raising 'process.max'")


# ---------------------------------------------------------------------------------------------------
# What the decisions look at.

@dataclass(frozen=True)
class WorkerInfo:
    """One live worker as the master sees it: its scoreboard slot plus what the master knows."""

    pid: int
    stage: str                           # one of STAGES (or "busy")
    started: float = 0.0                 # when it was forked
    idle_since: float | None = None      # when it last became idle (php-fpm's last activity)
    request_started: float | None = None  # start of the request it is serving, None when not serving
    requests: int = 0                    # requests served so far
    stopping: bool = False               # the master already asked it to exit (Kill, Terminate)
    method: str = ""                     # the request's REQUEST_METHOD, URI and QUERY_STRING, as the
    uri: str = ""                        # scoreboard has them (raw: the log lines purify them)
    query_string: str = ""
    script: str = ""                     # SCRIPT_FILENAME or the app, for log lines

    @property
    def request(self) -> str:
        """`METHOD URI?QUERY` of the request being served ("" when the method is not known yet)."""
        return request_line(self.method, self.uri, self.query_string)

    @property
    def is_idle(self) -> bool:
        """Waiting for a connection, and not on its way out."""
        return self.stage == IDLE and not self.stopping

    @property
    def is_starting(self) -> bool:
        """Forked but not accepting yet (importing the app)."""
        return self.stage == STARTING and not self.stopping

    @property
    def is_busy(self) -> bool:
        """Serving a request (php-fpm's "active")."""
        return self.stage in BUSY_STAGES


@dataclass(frozen=True)
class PoolSnapshot:
    """Every live worker of one pool at one moment (workers that exited are not in it)."""

    workers: tuple[WorkerInfo, ...] = ()

    @property
    def total(self) -> int:
        """Live workers, stopping ones included: php-fpm's running_children."""
        return len(self.workers)

    @property
    def idle(self) -> int:
        """Workers waiting for a connection."""
        return sum(1 for w in self.workers if w.is_idle)

    @property
    def starting(self) -> int:
        """Workers forked but not accepting yet."""
        return sum(1 for w in self.workers if w.is_starting)

    @property
    def busy(self) -> int:
        """Workers serving a request."""
        return sum(1 for w in self.workers if w.is_busy)


@dataclass
class _Termination:
    request_started: float
    sent: float
    forced: bool = False


@dataclass
class Counters:
    """The two status counters pm's decisions count, where no scoreboard is (unit tests, tools).

    In the master PmState.counters is the pool's scoreboard header instead (anything with these two
    integer attributes will do), so a decision writes the counter where a status page reads it.
    """

    max_children_reached: int = 0
    slow_requests: int = 0


@dataclass
class PmState:
    """What php-fpm keeps per pool between ticks; one per pool, owned by the master, updated in place.

    The status page's counters pm decides (max_children_reached, slow_requests) are not kept here but
    counted in `counters` when decided: in the master, the pool's scoreboard header.
    """

    spawn_rate: int = 1                  # php-fpm's idle_spawn_rate
    warned_max_children: bool = False    # the max_children warning was given in this episode
    slowlogged: dict[int, float] = field(default_factory=dict)  # pid -> request_started traced
    terminated: dict[int, _Termination] = field(default_factory=dict)
    counters: Any = field(default_factory=Counters)

    @property
    def max_children_reached(self) -> int:
        """Times pm.max_children stopped a spawn (read from counters)."""
        return int(self.counters.max_children_reached)

    @property
    def slow_requests(self) -> int:
        """Requests that ran past request_slowlog_timeout (read from counters)."""
        return int(self.counters.slow_requests)


@dataclass
class ProcessMaxState:
    """Whether cap_spawns already warned about process.max in the current episode."""

    warned: bool = False


# ---------------------------------------------------------------------------------------------------
# What the decisions return.

@dataclass(frozen=True)
class Spawn:
    """Fork n more workers for the pool."""

    n: int


@dataclass(frozen=True)
class Kill:
    """Stop an idle worker the process manager no longer needs: SIGQUIT, and do not replace it."""

    pid: int
    reason: str  # "idle" (above pm.max_spare_servers) or "idle timeout" (ondemand)


@dataclass(frozen=True)
class Warn:
    """A line for the error log at WARNING; counter names the status counter it went with, if any."""

    message: str
    counter: str | None = None


@dataclass(frozen=True)
class Terminate:
    """End a worker whose request overran request_terminate_timeout: SIGTERM, or SIGKILL when force."""

    pid: int
    elapsed: float
    force: bool = False
    message: str = ""


@dataclass(frozen=True)
class SlowlogDump:
    """Have the worker append its traceback to the slowlog; the request keeps running."""

    pid: int
    elapsed: float
    message: str = ""


Action = Spawn | Kill | Warn | Terminate | SlowlogDump


# ---------------------------------------------------------------------------------------------------
# Idle-server maintenance.

def initial_spawn(pool: Any) -> int:
    """Workers to fork when the pool starts: php-fpm's fpm_children_create_initial."""
    if pool.pm == "static":
        return pool.pm_max_children
    if pool.pm == "dynamic":
        return pool.pm_start_servers
    return 0  # ondemand: nothing until a connection arrives


def decide(snapshot: PoolSnapshot, pool: Any, state: PmState, now: float) -> list[Action]:
    """One maintenance tick for one pool; call once per MAINTENANCE_INTERVAL (state changes in place).

    static keeps pm.max_children alive. dynamic stops the longest-idle worker while more than
    pm.max_spare_servers are idle, and spawns while fewer than pm.min_spare_servers are, at a rate
    doubling each tick up to pm.max_spawn_rate and never past pm.max_children. ondemand stops the
    longest-idle worker once it has been idle past pm.process_idle_timeout. One stop per tick.
    """
    if pool.pm == "static":
        missing = pool.pm_max_children - snapshot.total
        return [Spawn(missing)] if missing > 0 else []
    if pool.pm == "ondemand":
        return _ondemand_tick(snapshot, pool, state, now)
    return _dynamic_tick(snapshot, pool, state)


def _longest_idle(workers: Iterable[WorkerInfo]) -> WorkerInfo | None:
    # php-fpm stops the idle child that was forked first; fastfpm stops the one idle the longest, which
    # is the one least likely to be needed (and the same worker whenever the two agree).
    idle = [w for w in workers if w.is_idle]
    if not idle:
        return None
    return min(idle, key=lambda w: (w.idle_since if w.idle_since is not None else w.started, w.started))


def _max_children_reached(pool: Any, state: PmState) -> list[Action]:
    """Warn and count once per episode, as php-fpm does with warn_max_children."""
    if state.warned_max_children:
        return []
    state.warned_max_children = True
    state.counters.max_children_reached += 1
    return [Warn(f"[pool {pool.name}] server reached pm.max_children setting ({pool.pm_max_children}), "
                 f"consider raising it", counter="max_children_reached")]


def _dynamic_tick(snapshot: PoolSnapshot, pool: Any, state: PmState) -> list[Action]:
    idle = snapshot.idle
    # Workers still importing the app count as idle-to-be for spawning (php-fpm counts them as
    # active, which forks more every second while a slow app imports); they are never stopped.
    ready_soon = idle + snapshot.starting
    total = snapshot.total

    if idle > pool.pm_max_spare_servers:
        victim = _longest_idle(snapshot.workers)
        if victim is not None:
            state.spawn_rate = 1
            state.warned_max_children = False
            return [Kill(victim.pid, "idle")]

    if ready_soon < pool.pm_min_spare_servers:
        if total >= pool.pm_max_children:
            state.spawn_rate = 1
            return _max_children_reached(pool, state)
        n = min(state.spawn_rate, pool.pm_min_spare_servers - ready_soon, pool.pm_max_children - total)
        actions: list[Action] = []
        if state.spawn_rate >= BUSY_WARNING_RATE:
            # php-fpm prints its spawn rate here; fastfpm prints how many it actually spawns.
            actions.append(Warn(
                f"[pool {pool.name}] seems busy (you may need to increase pm.start_servers, or "
                f"pm.min/max_spare_servers), spawning {n} children, there are {idle} idle, and {total} "
                f"total children"))
        actions.append(Spawn(n))
        state.warned_max_children = False
        # php-fpm doubles while below the limit and so can overshoot one that is not a power of two
        # (1, 2, 4, 8 with pm.max_spawn_rate = 5); fastfpm stops at the limit.
        state.spawn_rate = min(state.spawn_rate * 2, pool.pm_max_spawn_rate)
        return actions

    # Enough idle workers: the busy episode is over. (php-fpm only re-arms the max_children warning
    # when it spawns again; fastfpm re-arms it as soon as the pool is no longer short.)
    state.spawn_rate = 1
    state.warned_max_children = False
    return []


def _ondemand_tick(snapshot: PoolSnapshot, pool: Any, state: PmState, now: float) -> list[Action]:
    if snapshot.total < pool.pm_max_children:
        state.warned_max_children = False  # room again: a later full pool is a new episode
    victim = _longest_idle(snapshot.workers)
    if victim is None:
        return []
    idle_since = victim.idle_since if victim.idle_since is not None else victim.started
    if now - idle_since > pool.pm_process_idle_timeout:
        return [Kill(victim.pid, "idle timeout")]
    return []


def on_connection_pending(snapshot: PoolSnapshot, pool: Any, state: PmState,
                          pending: int = 1) -> list[Action]:
    """ondemand or dynamic: connections wait on the listen socket; spawn for those nobody will take.

    pending is the accept-queue length when the master knows it (TCP_INFO on a listening socket),
    else 1 per readiness event. Idle and starting workers count as takers, so a burst forks one
    worker per waiting connection, up to pm.max_children, and no more. php-fpm warns "max_children
    reached" even when an idle worker will take the connection; fastfpm warns only when a
    connection really has to wait. static: no action.

    dynamic (issue 12): php-fpm's dynamic pool only grows at the once-a-second tick (1, 2, 4 ...
    per tick), so a burst that takes the last idle worker waits seconds for workers of its own;
    here the master watches the socket as for ondemand once nobody is idle, and forks at once.
    The tick still keeps pm.min_spare_servers and owns spawn_rate, which this does not touch.
    """
    if pool.pm not in ("ondemand", "dynamic") or pending <= 0:
        return []
    need = pending - (snapshot.idle + snapshot.starting)
    if need <= 0:
        return []
    room = pool.pm_max_children - snapshot.total
    if room <= 0:
        return _max_children_reached(pool, state)
    state.warned_max_children = False
    return [Spawn(min(need, room))]


def on_worker_exit(snapshot: PoolSnapshot, pool: Any, *, killed_by_pm: bool) -> list[Action]:
    """After reaping a worker (snapshot without it): replace it unless the pm stopped it on purpose.

    As php-fpm's fpm_children_bury: a worker that exited for any other reason (pm.max_requests, a
    crash, a request timeout) is replaced at once in every pm mode; static refills to pm.max_children.
    Do not call while stopping or reloading.
    """
    if killed_by_pm:
        return []
    if pool.pm == "static":
        missing = pool.pm_max_children - snapshot.total
        return [Spawn(missing)] if missing > 0 else []
    return [Spawn(1)] if snapshot.total < pool.pm_max_children else []


def cap_spawns(actions_by_pool: Mapping[str, Sequence[Action]], alive_total: int, process_max: int,
               state: ProcessMaxState | None = None) -> dict[str, list[Action]]:
    """Trim Spawn actions so all pools together stay within process.max (0: no limit).

    Pools are served in order, as php-fpm forks them, so the first pools get the room first. When a
    spawn is cut, php-fpm's process.max warning is added to the first pool cut, once per episode
    when state is given. An episode ends when a spawn goes through uncut, as php-fpm clears its
    warned flag only when it forks a child: a tick that wants no spawn at all ends nothing, so a
    pool whose load comes and goes at the cap does not warn every other second.
    """
    result = {name: list(actions) for name, actions in actions_by_pool.items()}
    if process_max <= 0:
        return result
    room = max(0, process_max - alive_total)
    first_cut = None
    wanted_spawn = False
    for name, actions in result.items():
        trimmed: list[Action] = []
        for action in actions:
            if isinstance(action, Spawn):
                wanted_spawn = True
                n = min(action.n, room)
                room -= n
                if n < action.n and first_cut is None:
                    first_cut = name
                if n > 0:
                    trimmed.append(Spawn(n))
            else:
                trimmed.append(action)
        result[name] = trimmed
    if first_cut is None:
        if state is not None and wanted_spawn:
            state.warned = False
    elif state is None or not state.warned:
        result[first_cut].append(Warn(PROCESS_MAX_MESSAGE))
        if state is not None:
            state.warned = True
    return result


# ---------------------------------------------------------------------------------------------------
# Request timeouts.

def check_interval(pools: Iterable[Any]) -> float | None:
    """How often to call overdue(): a third of the shortest request timeout, at least 130 ms.

    None when no pool has request_terminate_timeout or request_slowlog_timeout (php-fpm's heartbeat).
    """
    timeouts = [t for pool in pools
                for t in (pool.request_terminate_timeout, pool.request_slowlog_timeout) if t]
    if not timeouts:
        return None
    return max(MIN_CHECK_INTERVAL, min(timeouts) / 3)


def _timeout_message(kind: Callable[..., str], worker: WorkerInfo, pool: Any, elapsed: float) -> str:
    # One implementation of php-fpm's two lines (fastfpm.slowlog): the script and the request are
    # purified, as php-fpm's str_purify_filename, so a %0A that nginx decoded into SCRIPT_FILENAME
    # cannot start a forged log line, and the time is truncated to microseconds.
    script = worker.script or getattr(pool, "app", "") or "-"
    return kind(pool.name, worker.pid, script, worker.method, worker.uri, elapsed, worker.query_string)


def overdue(snapshot: PoolSnapshot, pool: Any, now: float, state: PmState, *,
            grace: float = TERMINATE_GRACE) -> list[Action]:
    """Requests that ran past request_slowlog_timeout or request_terminate_timeout (0: off).

    SlowlogDump once per request (keyed by the request's start) while the app runs, and the pool's
    slow request counter goes up; Terminate once per request, then Terminate(force=True) if the
    worker is still there grace seconds later. As php-fpm, a request traced in this check is
    terminated at the next one at the earliest, so the traceback is written before SIGTERM lands.
    """
    terminate_after = pool.request_terminate_timeout
    slowlog_after = pool.request_slowlog_timeout
    live = {w.pid: w for w in snapshot.workers}
    # Forget requests that are over: the worker exited, or went back to idle, or serves another one.
    for pid, started in list(state.slowlogged.items()):
        worker = live.get(pid)
        if worker is None or worker.request_started != started:
            del state.slowlogged[pid]
    for pid, termination in list(state.terminated.items()):
        worker = live.get(pid)
        moved_on = worker is not None and worker.request_started not in (None, termination.request_started)
        if worker is None or worker.stage == IDLE or moved_on:
            del state.terminated[pid]

    actions: list[Action] = []
    for worker in snapshot.workers:
        termination = state.terminated.get(worker.pid)
        if termination is not None:
            # SIGTERM went out for this request: SIGKILL once the grace is over, whatever the stage.
            if not termination.forced and now - termination.sent >= grace:
                termination.forced = True
                actions.append(Terminate(worker.pid, now - termination.request_started, force=True,
                                         message=f"[pool {pool.name}] child {worker.pid} still running "
                                                 f"{grace:g}s after SIGTERM, sending SIGKILL"))
            continue
        if worker.request_started is None or worker.stage not in _TIMED_STAGES:
            continue
        elapsed = now - worker.request_started
        if (slowlog_after and worker.stage in _SLOWLOG_STAGES and elapsed >= slowlog_after
                and state.slowlogged.get(worker.pid) != worker.request_started):
            state.slowlogged[worker.pid] = worker.request_started
            state.counters.slow_requests += 1
            message = _timeout_message(slow_request_message, worker, pool, elapsed)
            actions.append(SlowlogDump(worker.pid, elapsed, message=message))
            continue
        if terminate_after and elapsed >= terminate_after:
            state.terminated[worker.pid] = _Termination(worker.request_started, now)
            message = _timeout_message(terminate_message, worker, pool, elapsed)
            actions.append(Terminate(worker.pid, elapsed, message=message))
    return actions


# ---------------------------------------------------------------------------------------------------
# Helpers for the master.

def worker_from_slot(slot: Any, *, started: float, stopping: bool = False) -> WorkerInfo:
    """A WorkerInfo from a scoreboard slot copy (fastfpm.scoreboard.SlotSnapshot or alike).

    started and stopping are what the master knows about the process; the slot gives the rest.
    """
    stage = STAGES[slot.stage] if isinstance(slot.stage, int) and 0 <= slot.stage < len(STAGES) else str(
        slot.stage)
    busy = stage in BUSY_STAGES
    return WorkerInfo(
        pid=slot.pid, stage=stage, started=started,
        idle_since=slot.idle_since_ns / 1e9 if slot.idle_since_ns else None,
        request_started=slot.request_start_ns / 1e9 if busy and slot.request_start_ns else None,
        requests=slot.requests, stopping=stopping,
        method=getattr(slot, "method", "") or "", uri=getattr(slot, "request_uri", "") or "",
        query_string=getattr(slot, "query_string", "") or "",
        script=getattr(slot, "script_filename", "") or "",
    )


class EmergencyRestart:
    """php-fpm's emergency_restart_threshold / emergency_restart_interval.

    record() each worker death; it answers True (reload now) when `threshold` workers died of
    SIGSEGV or SIGBUS within `interval` seconds. Off while either setting is 0.
    """

    FAULT_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS})

    def __init__(self, threshold: int, interval: float) -> None:
        self.threshold = threshold
        self.interval = interval
        self.faults: deque[float] = deque(maxlen=max(threshold, 1))

    @property
    def enabled(self) -> bool:
        """Both settings are non-zero."""
        return self.threshold > 0 and self.interval > 0

    @property
    def message(self) -> str:
        """php-fpm's log line for the reload."""
        return (f"failed processes threshold ({self.threshold} in {self.interval:g} sec) is reached, "
                f"initiating reload")

    def record(self, now: float, signum: int | None) -> bool:
        """Note a worker that died of signum (None: exited normally); True when it is time to reload."""
        if not self.enabled or signum not in self.FAULT_SIGNALS:
            return False
        self.faults.append(now)
        if len(self.faults) == self.threshold and now - self.faults[0] <= self.interval:
            self.faults.clear()
            return True
        return False
