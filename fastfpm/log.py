"""The error log, in php-fpm's format: `[22-Nov-2026 10:00:00] NOTICE: message`.

One writer for the master and its workers. php-fpm's levels, from most to least severe, are
alert, error, warning, notice and debug; a line is written when its level is at or above the
configured one. Workers prefix their lines with `[pool NAME] child PID`, as php-fpm does.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import TextIO

LEVELS = {"alert": 1, "error": 2, "warning": 3, "notice": 4, "debug": 5}


class ErrorLog:
    """php-fpm-style log lines to a file (appended) or to stderr."""

    def __init__(self, path: str | None = None, level: str = "notice") -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.path = path
        self.level = level
        self.threshold = LEVELS[level]
        self.prefix = ""
        self.stream: TextIO = sys.stderr
        self.open()

    def open(self) -> None:
        """(Re)open the log file: at start and after logrotate renamed it (SIGUSR1)."""
        if self.path is None:
            self.stream = sys.stderr
            return
        stream = open(self.path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        if self.stream is not sys.stderr:
            self.stream.close()
        self.stream = stream

    def fileno(self) -> int:
        """The descriptor workers get as their stderr, so wsgi.errors and tracebacks land here too."""
        return self.stream.fileno()

    def enabled(self, level: str) -> bool:
        """Whether a line at `level` would be written."""
        return LEVELS[level] <= self.threshold

    def log(self, level: str, message: str) -> None:
        """Write one line (several for a multi-line message, each stamped)."""
        if LEVELS[level] > self.threshold:
            return
        stamp = time.strftime("%d-%b-%Y %H:%M:%S")
        head = f"[{stamp}] {level.upper()}: {self.prefix}"
        text = "".join(f"{head}{line}\n" for line in message.rstrip("\n").split("\n"))
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a log that cannot be written must not take the server down with it

    def exception(self, message: str) -> None:
        """Log message at error level with the current exception's traceback."""
        self.log("error", f"{message}\n{traceback.format_exc()}")

    def for_worker(self, pool: str) -> ErrorLog:
        """Turn this log into a worker's (after fork): lines carry the pool and the pid."""
        self.prefix = f"[pool {pool}] child {os.getpid()}: "
        return self

    def alert(self, message: str) -> None:
        """Log at alert level."""
        self.log("alert", message)

    def error(self, message: str) -> None:
        """Log at error level."""
        self.log("error", message)

    def warning(self, message: str) -> None:
        """Log at warning level."""
        self.log("warning", message)

    def notice(self, message: str) -> None:
        """Log at notice level."""
        self.log("notice", message)

    def debug(self, message: str) -> None:
        """Log at debug level."""
        self.log("debug", message)
