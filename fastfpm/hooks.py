"""A pool's worker lifecycle hooks: on_worker_start and on_worker_exit (MODULE:CALLABLE each).

They run in the worker process, so an app can open what must not cross a fork (database and HTTP
connection pools, threads) after it, and close it cleanly before the worker exits. php-fpm has no
such hooks; gunicorn's post_worker_init and worker_exit are the model. Each is called with one
argument, the pool's name (one module may serve several pools).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastfpm.app import load_callable
from fastfpm.log import ErrorLog

Hook = Callable[[str], Any]


@dataclass(frozen=True)
class WorkerHooks:
    """The hooks one worker runs; None where the pool sets none."""

    pool_name: str
    on_start: Hook | None = None
    on_exit: Hook | None = None
    start_spec: str = ""
    exit_spec: str = ""

    @classmethod
    def load(cls, pool: Any, python_path: Iterable[str]) -> WorkerHooks:
        """Import the pool's hooks (after its app, with the same sys.path); AppLoadError if one is
        missing, so a misspelt hook fails the worker as a misspelt app does."""
        path = list(python_path)
        start_spec = pool.on_worker_start or ""
        exit_spec = pool.on_worker_exit or ""
        return cls(
            pool.name,
            load_callable(start_spec, path, what="on_worker_start") if start_spec else None,
            load_callable(exit_spec, path, what="on_worker_exit") if exit_spec else None,
            start_spec, exit_spec)

    def run_start(self, log: ErrorLog) -> bool:
        """Call on_worker_start before the first request; False (logged with its traceback) if it
        raised: a worker that could not initialise must not serve (gunicorn: WORKER_BOOT_ERROR)."""
        if self.on_start is None:
            return True
        try:
            self.on_start(self.pool_name)
        except BaseException:  # SystemExit too: the worker's own exit status says what happened
            log.exception(f"on_worker_start {self.start_spec!r} raised: this worker will not serve")
            return False
        return True

    def run_exit(self, log: ErrorLog) -> None:
        """Call on_worker_exit once the loop has ended; an exception is logged, and the worker still
        exits cleanly (it has served its requests; the app's clean-up is its own business)."""
        if self.on_exit is None:
            return
        try:
            self.on_exit(self.pool_name)
        except BaseException:
            log.exception(f"on_worker_exit {self.exit_spec!r} raised")
