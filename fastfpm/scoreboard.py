"""The master's side of the scoreboard (csrc/scoreboard.h): create the shared mapping, read slots.

One anonymous shared mapping per pool, made before any fork so every worker inherits it. Workers
write their own slot from the Cython loop; the master reads consistent copies through cffi (the
seqlock reader in scoreboard.h) and never writes a slot while its worker is alive, except to claim
and free it around the worker's life.
"""

from __future__ import annotations

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

    @property
    def stage_name(self) -> str:
        """php-fpm's name for the stage ("Idle", "Running" ...)."""
        return STAGE_NAMES.get(self.stage, f"stage {self.stage}")

    @property
    def busy(self) -> bool:
        """True while the worker is inside a request."""
        return self.stage in BUSY_STAGES


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
    )


def read_slot(mapping: Any, index: int) -> SlotSnapshot:
    """A consistent copy of slot `index` of an existing mapping (a worker reading its own slot)."""
    copy = ffi.new("ffpm_slot *")
    lib.ffpm_slot_read(ffi.addressof(lib.ffpm_slots(ffi.from_buffer(mapping))[index]), copy)
    return _decode(index, copy)


class Scoreboard:
    """One pool's shared mapping: a header and `nslots` worker slots."""

    def __init__(self, nslots: int, pool_name: str) -> None:
        self.nslots = nslots
        self.mapping = mmap.mmap(-1, lib.ffpm_scoreboard_size(nslots),
                                 flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._base = ffi.from_buffer(self.mapping)
        self.header = ffi.cast("ffpm_pool_header *", self._base)
        self.header.magic = lib.FFPM_SB_MAGIC
        self.header.version = lib.FFPM_SB_VERSION
        self.header.nslots = nslots
        self.header.slot_size = ffi.sizeof("ffpm_slot")
        self.header.started_wall = int(time.time())
        name = pool_name.encode()[: ffi.sizeof(self.header.pool_name) - 1]
        ffi.memmove(self.header.pool_name, name, len(name))
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
        """Mark slot `index` free once its worker has been reaped."""
        slot = self._slots[index]
        slot.pid = 0
        slot.stage = lib.FFPM_STAGE_FREE

    def free_index(self) -> int | None:
        """The first free slot, or None when every slot is taken."""
        for index in range(self.nslots):
            if self._slots[index].stage == lib.FFPM_STAGE_FREE:
                return index
        return None

    def read(self, index: int) -> SlotSnapshot:
        """A consistent copy of one slot (seqlock read, no lock taken)."""
        copy = ffi.new("ffpm_slot *")
        lib.ffpm_slot_read(ffi.addressof(self._slots[index]), copy)
        return _decode(index, copy)

    def snapshot(self) -> list[SlotSnapshot]:
        """Copies of every slot that has a worker."""
        return [self.read(i) for i in range(self.nslots) if self._slots[i].pid]

    @property
    def pool_name(self) -> str:
        """The pool this scoreboard belongs to."""
        return _text(self.header.pool_name)

    def close(self) -> None:
        """Unmap (the master at exit); workers keep their own inherited mapping."""
        del self._slots, self.header, self._base
        self.mapping.close()
