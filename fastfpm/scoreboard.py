"""The master's side of the scoreboard (csrc/scoreboard.h): create the shared mapping, read slots.

One anonymous shared mapping per pool, made before any fork so every worker inherits it. Workers
write their own slot from the Cython loop; the master reads consistent copies through cffi (the
seqlock reader in scoreboard.h) and never writes a slot while its worker is alive, except to claim
and free it around the worker's life.
"""

from __future__ import annotations

import math
import mmap
import time
from dataclasses import dataclass
from typing import Any

from fastfpm import not_built
from fastfpm.stages import STAGE_TABLE

try:
    from fastfpm._scoreboard_cffi import ffi, lib
except ModuleNotFoundError as exc:
    raise not_built(exc) from None

# The stages: numbers from the header (through cffi), names from fastfpm.stages' table, which
# tests/test_scoreboard_layout.py holds to the header.
STAGE_FREE = lib.FFPM_STAGE_FREE
STAGE_STARTING = lib.FFPM_STAGE_STARTING
STAGE_IDLE = lib.FFPM_STAGE_IDLE
STAGE_ENDING = lib.FFPM_STAGE_ENDING
# php-fpm's names for the stages, as its status page prints them.
STAGE_NAMES = {getattr(lib, stage.constant): stage.status_name for stage in STAGE_TABLE}
# Stages in which a worker is busy with a request (php-fpm's "active").
BUSY_STAGES = frozenset(getattr(lib, stage.constant) for stage in STAGE_TABLE if stage.busy)
# The request duration histogram's upper bounds in seconds, from the header's (the last is +Inf).
DURATION_BOUNDS = tuple(lib.ffpm_duration_bound_ns(i) / 1e9 for i in range(lib.FFPM_DURATION_BUCKETS - 1)
                        ) + (math.inf,)


@dataclass(frozen=True, slots=True)
class SlotSnapshot:
    """A consistent copy of one worker's slot, decoded into Python values."""

    index: int
    pid: int
    generation: int
    stage: int
    requests: int
    accepted_conn: int
    started_wall: int
    request_start_ns: int
    request_start_wall_us: int
    last_request_ns: int
    idle_since_ns: int
    content_length: int
    status: int
    keepalive: bool
    method: str
    request_uri: str
    query_string: str
    script_filename: str
    last_request_utime_us: int = 0   # the last finished request's user CPU time
    last_request_stime_us: int = 0   # and its system CPU time
    last_request_memory: int = 0     # the worker's peak resident bytes at that request's end
    remote_user: str = ""            # REMOTE_USER of the current or last request, "" when none

    @property
    def last_request_cpu(self) -> float:
        """php-fpm's "last request cpu": the last request's CPU time in percent of its duration,
        rounded to the hundredth as the access log's %C writes it."""
        cpu_us = self.last_request_utime_us + self.last_request_stime_us
        return lib.ffpm_cpu_hundredths(cpu_us, self.last_request_ns) / 100

    @property
    def stage_name(self) -> str:
        """php-fpm's name for the stage ("Idle", "Running" ...)."""
        return STAGE_NAMES.get(self.stage, f"stage {self.stage}")

    @property
    def busy(self) -> bool:
        """True while the worker is inside a request."""
        return self.stage in BUSY_STAGES


@dataclass(frozen=True, slots=True)
class PoolCounters:
    """A pool's figures for a status page, php-fpm 8.2's pool fields, read from its scoreboard.

    Each has one home: the header for the counters (written by the master where they change),
    the slots for the processes by stage. accepted_conn and requests count since the pool started,
    workers that exited included (what their slots counted is folded into the header when freed).
    The listen queue figures are the master's once-a-second sample, as php-fpm's; they stay 0 where
    the kernel does not report the accept queue.
    """

    pool: str
    start_time: int              # unix seconds
    accepted_conn: int
    requests: int
    listen_queue: int
    max_listen_queue: int
    listen_queue_len: int
    idle_processes: int
    active_processes: int
    total_processes: int
    max_active_processes: int
    max_children_reached: int
    slow_requests: int
    # Every finished request by duration: (upper bound in seconds, requests in that bucket alone),
    # DURATION_BOUNDS' order, +Inf last; and their durations summed, in nanoseconds.
    duration_buckets: tuple[tuple[float, int], ...] = ()
    duration_sum_ns: int = 0


def _text(field: object) -> str:
    return ffi.string(field).decode("latin-1")


def _decode(index: int, copy: Any) -> SlotSnapshot:
    return SlotSnapshot(
        index=index, pid=copy.pid, generation=copy.generation, stage=copy.stage,
        requests=copy.requests, accepted_conn=copy.accepted_conn, started_wall=copy.started_wall,
        request_start_ns=copy.request_start_ns, request_start_wall_us=copy.request_start_wall_us,
        last_request_ns=copy.last_request_ns, idle_since_ns=copy.idle_since_ns,
        content_length=copy.content_length, status=copy.status, keepalive=bool(copy.keepalive),
        method=_text(copy.method), request_uri=_text(copy.request_uri),
        query_string=_text(copy.query_string), script_filename=_text(copy.script_filename),
        last_request_utime_us=copy.last_request_utime_us, last_request_stime_us=copy.last_request_stime_us,
        last_request_memory=copy.last_request_memory, remote_user=_text(copy.remote_user),
    )


def _pool_counters(header: Any, slots: Any, serving: int | None = None) -> PoolCounters:
    idle = active = total = 0
    for index in range(header.nslots):
        slot = slots[index]
        if not slot.pid:
            continue
        total += 1
        stage = slot.stage
        if stage == STAGE_IDLE or (index == serving and stage in BUSY_STAGES):
            idle += 1
        elif stage in BUSY_STAGES:
            active += 1
    totals = ffi.new("ffpm_totals *")
    lib.ffpm_pool_totals(header, totals)
    return PoolCounters(
        pool=_text(header.pool_name), start_time=header.started_wall,
        accepted_conn=totals.accepted_conn, requests=totals.requests,
        listen_queue=header.listen_queue, max_listen_queue=header.listen_queue_max,
        listen_queue_len=header.listen_queue_len,
        idle_processes=idle, active_processes=active, total_processes=total,
        # The sample is once a second; a status page must not show fewer than it counts now.
        max_active_processes=max(header.max_active_processes, active),
        max_children_reached=header.max_children_reached, slow_requests=header.slow_requests,
        duration_buckets=tuple(zip(DURATION_BOUNDS, totals.duration_buckets, strict=True)),
        duration_sum_ns=totals.duration_sum_ns,
    )


def _checked_header(mapping: Any) -> tuple[Any, Any]:
    base = ffi.from_buffer(mapping)
    header = ffi.cast("ffpm_pool_header *", base)
    if header.magic != lib.FFPM_SB_MAGIC or header.version != lib.FFPM_SB_VERSION:
        raise ValueError("not a scoreboard of this version of fastfpm")
    return header, lib.ffpm_slots(base)


def read_pool_counters(mapping: Any, serving: int | None = None) -> PoolCounters:
    """The pool's counters from an existing mapping (a worker that serves the status page).

    serving is the slot of the worker rendering a status page: it counts as idle, not active, so a
    status request does not report itself (php-fpm counts its own status request as active).
    """
    header, slots = _checked_header(mapping)
    return _pool_counters(header, slots, serving)


def _read_consistent(slot: Any, index: int) -> SlotSnapshot:
    """A consistent copy of one slot. ffpm_slot_read gives up (-1) when the writer stayed mid-write
    for every try (descheduled, on a busy machine): give it the CPU and read again rather than
    return a torn copy."""
    copy = ffi.new("ffpm_slot *")
    for _ in range(100):
        if lib.ffpm_slot_read(ffi.addressof(slot), copy) == 0:
            break
        time.sleep(0)
    return _decode(index, copy)


def read_slots(mapping: Any) -> list[SlotSnapshot]:
    """Consistent copies of every slot of an existing mapping that has a worker (Scoreboard.snapshot
    for a process that holds only the mapping, such as a worker serving the status page)."""
    header, slots = _checked_header(mapping)
    return [_read_consistent(slots[index], index) for index in range(header.nslots) if slots[index].pid]


def read_slot(mapping: Any, index: int) -> SlotSnapshot:
    """A consistent copy of slot `index` of an existing mapping (a worker reading its own slot)."""
    return _read_consistent(lib.ffpm_slots(ffi.from_buffer(mapping))[index], index)


class HeaderView:
    """A scoreboard's header fields by name, read and written in the shared mapping.

    What code outside this module holds (the master gives it to pm.PmState as its counters) instead
    of the cffi pointer, which would outlive the mapping: once the scoreboard is closed every access
    raises AttributeError rather than touching unmapped memory.
    """

    __slots__ = ("_board",)

    def __init__(self, board: Scoreboard) -> None:
        object.__setattr__(self, "_board", board)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._board._header, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._board._header, name, value)


class Scoreboard:
    """One pool's shared mapping: a header and `nslots` worker slots."""

    def __init__(self, nslots: int, pool_name: str) -> None:
        self.nslots = nslots
        self.mapping = mmap.mmap(-1, lib.ffpm_scoreboard_size(nslots),
                                 flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._base = ffi.from_buffer(self.mapping)
        self._header = header = ffi.cast("ffpm_pool_header *", self._base)
        self.header = HeaderView(self)
        header.magic = lib.FFPM_SB_MAGIC
        header.version = lib.FFPM_SB_VERSION
        header.nslots = nslots
        header.slot_size = ffi.sizeof("ffpm_slot")
        header.started_wall = int(time.time())
        name = pool_name.encode()[: ffi.sizeof(header.pool_name) - 1]
        ffi.memmove(header.pool_name, name, len(name))
        self._slots = lib.ffpm_slots(self._base)

    def claim(self, index: int, pid: int, generation: int = 0) -> None:
        """Give slot `index` to a new worker (called by the master before fork)."""
        slot = self._slots[index]
        ffi.memmove(ffi.addressof(slot), b"\0" * ffi.sizeof("ffpm_slot"), ffi.sizeof("ffpm_slot"))
        slot.pid = pid
        slot.generation = generation
        slot.stage = lib.FFPM_STAGE_STARTING
        slot.started_wall = int(time.time())
        slot.content_length = -1

    def set_pid(self, index: int, pid: int) -> None:
        """Record the pid of the worker forked into a claimed slot (only the master writes it)."""
        self._slots[index].pid = pid

    def release(self, index: int) -> None:
        """Mark slot `index` free once its worker has been reaped.

        What the worker counted (accepted_conn, requests, its request durations) moves into the
        header's retired totals in the same step, so the pool's totals never go back when a worker
        is replaced.
        """
        lib.ffpm_slot_release(self._header, ffi.addressof(self._slots[index]))

    def sample(self, listen_queue: tuple[int, int] | None) -> None:
        """The master's once-a-second sample: the accept queue, and how many workers are busy.

        listen_queue is (waiting, limit) as fastfpm.address.listen_queue reports it, None where the
        kernel does not say (the queue then reads 0 and its length stays as last reported).
        """
        header = self._header
        if listen_queue is not None:
            waiting, limit = listen_queue
            header.listen_queue = waiting
            header.listen_queue_len = limit
            if waiting > header.listen_queue_max:
                header.listen_queue_max = waiting
        else:
            header.listen_queue = 0
        slots = self._slots
        active = sum(1 for i in range(self.nslots) if slots[i].pid and slots[i].stage in BUSY_STAGES)
        if active > header.max_active_processes:
            header.max_active_processes = active

    def counters(self) -> PoolCounters:
        """The pool's status counters (php-fpm's pool fields) as they are now."""
        return _pool_counters(self._header, self._slots)

    def free_index(self) -> int | None:
        """The first free slot, or None when every slot is taken."""
        for index in range(self.nslots):
            if self._slots[index].stage == lib.FFPM_STAGE_FREE:
                return index
        return None

    def read(self, index: int) -> SlotSnapshot:
        """A consistent copy of one slot (seqlock read, no lock taken)."""
        return _read_consistent(self._slots[index], index)

    def snapshot(self) -> list[SlotSnapshot]:
        """Copies of every slot that has a worker."""
        return [self.read(i) for i in range(self.nslots) if self._slots[i].pid]

    @property
    def pool_name(self) -> str:
        """The pool this scoreboard belongs to."""
        return _text(self._header.pool_name)

    def close(self) -> None:
        """Unmap (the master at exit); workers keep their own inherited mapping."""
        del self._slots, self._header, self._base
        self.mapping.close()
