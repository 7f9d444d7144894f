"""Process titles, as php-fpm sets them, so `ps` and `top` say what each process is.

    fastfpm: master process (/etc/fastfpm.conf)      the master, with its configuration file
    fastfpm: master process (myapp:application)      the master started without a file: its app
    fastfpm: pool www                                a worker of the first generation
    fastfpm: pool www (generation 2)                 a worker started by a reload

The generation is shown from the second on: while a reload overlaps two generations, the old
workers and the new ones can be told apart (after the first reload, the older ones are the plain
`pool www`; after later ones, the lower number). A title is set once, when the process starts, and
never rewritten (a worker keeps the generation it was forked for).

setproctitle does the rewriting: it moves the environment out of the way of argv so a long title
fits, and sets the kernel's command name (prctl PR_SET_NAME, what `top` and `ps -o comm` show) too.
Without it (not installed), titles stay as they were: nothing else depends on them.
"""

from __future__ import annotations

import os
from typing import Any

try:
    from setproctitle import setproctitle as _set_title
except ImportError:  # pragma: no cover - a declared dependency; titles are a convenience only
    _set_title = None

PREFIX = "fastfpm: "


def master_title(config_path: str | None, config: Any) -> str:
    """The master's title: its configuration file (absolute), or the application it serves."""
    if config_path is not None:
        what = os.path.abspath(config_path)
    else:
        what = config.pools[0].app if config.pools else "no pools"
    return f"{PREFIX}master process ({what})"


def worker_title(pool_name: str, generation: int) -> str:
    """A worker's title: its pool, and its generation when a reload made it."""
    suffix = f" (generation {generation})" if generation > 1 else ""
    return f"{PREFIX}pool {pool_name}{suffix}"


def set_title(title: str) -> None:
    """Set this process's title (a no-op without setproctitle)."""
    if _set_title is not None:
        _set_title(title)


def set_master_title(config_path: str | None, config: Any) -> None:
    """Title the master (from Master.run)."""
    set_title(master_title(config_path, config))


def set_worker_title(pool_name: str, scoreboard: Any, slot_index: int) -> None:
    """Title a worker just forked (from run_worker): its generation is the one its slot was claimed for."""
    from fastfpm.scoreboard import read_slot

    set_title(worker_title(pool_name, read_slot(scoreboard, slot_index).generation))
