"""The request stages a scoreboard slot can be in: one table for every module that names them.

csrc/scoreboard.h numbers them (FFPM_STAGE_*); this table says what each one is called on php-fpm's
status page (fpm_request.c's names), what fastfpm.pm calls it, and whether a worker in it is busy
with a request (php-fpm's "active"). It is plain Python so that fastfpm.pm, which is unit-tested
without the compiled parts, can import it; fastfpm.scoreboard builds its names from it and
tests/test_scoreboard_layout.py checks the numbers against the header.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Stage", "STAGE_TABLE", "BY_NUMBER", "BY_CONSTANT", "PM_NAMES", "STATUS_NAMES", "BUSY_NUMBERS"]


class Stage(NamedTuple):
    """One row of the table."""

    number: int        # the value of `constant` in csrc/scoreboard.h
    constant: str      # FFPM_STAGE_*
    status_name: str   # php-fpm's name for it, as its status page prints it
    pm_name: str       # fastfpm.pm's name (pm.STAGES)
    busy: bool         # serving a request: counted as "active"


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(0, "FFPM_STAGE_FREE", "Free", "free", False),
    Stage(1, "FFPM_STAGE_STARTING", "Starting", "starting", False),
    Stage(2, "FFPM_STAGE_IDLE", "Idle", "idle", False),
    Stage(3, "FFPM_STAGE_READING_HEADERS", "Reading headers", "reading_headers", True),
    Stage(4, "FFPM_STAGE_INFO", "Getting request informations", "info", True),
    Stage(5, "FFPM_STAGE_RUNNING", "Running", "running", True),
    Stage(6, "FFPM_STAGE_FINISHING", "Finishing", "finishing", True),
    Stage(7, "FFPM_STAGE_ENDING", "Ending", "ending", False),
)

BY_NUMBER = {stage.number: stage for stage in STAGE_TABLE}
BY_CONSTANT = {stage.constant: stage for stage in STAGE_TABLE}
# pm.STAGES is indexed by stage number, so the numbers run 0, 1, 2 ... in table order.
PM_NAMES = tuple(stage.pm_name for stage in STAGE_TABLE)
STATUS_NAMES = {stage.number: stage.status_name for stage in STAGE_TABLE}
BUSY_NUMBERS = frozenset(stage.number for stage in STAGE_TABLE if stage.busy)

assert [stage.number for stage in STAGE_TABLE] == list(range(len(STAGE_TABLE)))
