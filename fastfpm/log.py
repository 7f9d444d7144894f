"""The error log, in php-fpm's format: `[22-Nov-2026 10:00:00] NOTICE: message`.

One writer for the master and its workers. php-fpm's levels, from most to least severe, are
alert, error, warning, notice and debug; a line is written when its level is at or above the
configured one. Workers prefix their lines with `[pool NAME] child PID`, as php-fpm does.
"""

from __future__ import annotations

import os
import sys
import syslog
import time
import traceback
from typing import TextIO

LEVELS = {"alert": 1, "error": 2, "warning": 3, "notice": 4, "debug": 5}
SYSLOG_PRIORITIES = {"alert": syslog.LOG_ALERT, "error": syslog.LOG_ERR, "warning": syslog.LOG_WARNING,
                     "notice": syslog.LOG_NOTICE, "debug": syslog.LOG_DEBUG}


class ErrorLog:
    """php-fpm-style log lines to a file (appended) or to stderr."""

    def __init__(self, path: str | None = None, level: str = "notice", limit: int = 1024, *,
                 syslog_ident: str = "fastfpm", syslog_facility: str = "daemon") -> None:
        if level not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}, not {level!r}")
        self.path = path
        self.level = level
        self.threshold = LEVELS[level]
        self.limit = limit
        self.prefix = ""
        self.stream: TextIO = sys.stderr
        self.worker_fd: int | None = None
        self.syslog_ident = syslog_ident
        self.syslog_facility = getattr(syslog, f"LOG_{syslog_facility.upper()}")
        self.open()

    def open(self) -> None:
        """(Re)open the log file: at start and after logrotate renamed it (SIGUSR1)."""
        if self.path is None:
            self.stream = sys.stderr
            return
        if self.path == "syslog":
            # php-fpm's error_log = syslog: one message per line, the level as the priority.
            syslog.openlog(self.syslog_ident, syslog.LOG_PID, self.syslog_facility)
            return
        stream = open(self.path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        if self.stream is not sys.stderr:
            self.stream.close()
        self.stream = stream

    def enabled(self, level: str) -> bool:
        """Whether a line at `level` would be written."""
        return LEVELS[level] <= self.threshold

    def log(self, level: str, message: str) -> None:
        """Write one line (several for a multi-line message, each stamped)."""
        if LEVELS[level] > self.threshold:
            return
        stamp = time.strftime("%d-%b-%Y %H:%M:%S")
        head = f"[{stamp}] {level.upper()}: {self.prefix}"
        text = "".join(f"{head}{line[:self.limit]}\n" for line in message.rstrip("\n").split("\n"))
        if self.path == "syslog" and self.worker_fd is None:
            for line in message.rstrip("\n").split("\n"):
                syslog.syslog(SYSLOG_PRIORITIES[level], f"{level.upper()}: {self.prefix}{line[:self.limit]}")
            return
        if self.worker_fd is not None:
            # A worker's lines go through its log pipe to the master, which writes the file. Lines
            # up to PIPE_BUF bytes arrive whole even while other workers write too.
            try:
                os.write(self.worker_fd, text.encode("utf-8", "backslashreplace"))
            except OSError:
                pass
            return
        self.write_line(text.rstrip("\n"))

    def write_line(self, text: str) -> None:
        """Append one finished line as it is (a worker's, passed through by the master)."""
        if self.path == "syslog":
            # A worker's line arrives stamped "[date] LEVEL: ..."; syslog stamps its own.
            _, _, rest = text.partition("] ")
            level = rest.partition(":")[0].lower()
            syslog.syslog(SYSLOG_PRIORITIES.get(level, syslog.LOG_NOTICE), rest or text)
            return
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a log that cannot be written must not take the server down with it

    def exception(self, message: str) -> None:
        """Log message at error level with the current exception's traceback."""
        self.log("error", f"{message}\n{traceback.format_exc()}")

    def for_worker(self, pool: str, fd: int) -> ErrorLog:
        """Turn this log into a worker's (after fork): lines carry the pool and the pid and go to
        the master through fd."""
        self.prefix = f"[pool {pool}] child {os.getpid()}: "
        self.worker_fd = fd
        if self.path != "syslog" and self.stream is not sys.stderr:
            self.stream.close()  # the master's file: only the master writes it
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


class WsgiErrors:
    """wsgi.errors: a text stream whose lines go to the error log (PEP 3333 asks for write,
    writelines and flush)."""

    def __init__(self, log: ErrorLog, level: str = "warning") -> None:
        self.log = log
        self.level = level
        self.pending = ""

    def write(self, text: str) -> int:
        """Buffer text; every complete line goes to the log."""
        self.pending += text
        if "\n" in self.pending:
            lines, _, self.pending = self.pending.rpartition("\n")
            self.log.log(self.level, lines)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        """Write each string in lines."""
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        """Log a last incomplete line."""
        if self.pending:
            self.log.log(self.level, self.pending)
            self.pending = ""
