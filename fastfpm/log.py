"""The error log, in php-fpm's format: `[22-Nov-2026 10:00:00] NOTICE: message`.

One writer for the master and its workers. php-fpm's levels, from most to least severe, are
alert, error, warning, notice and debug; a line is written when its level is at or above the
configured one. Workers prefix their lines with `[pool NAME] child PID`, as php-fpm does.

log_limit, as php-fpm's zlog.c applies it: no line, its newline included, is longer than the
limit. A message line that is longer is cut and ends in "..." (`truncate`); a line of a worker's
stdout or stderr (catch_workers_output) is split over as many lines as it takes, each with the
decoration again (`wrap`, php-fpm's fpm_stdio wrapping), so nothing the application printed is lost.
php-fpm counts bytes; fastfpm counts characters, so a UTF-8 character is never cut in two.
"""

from __future__ import annotations

import os
import sys
import syslog
import time
import traceback
from collections.abc import Callable
from typing import Any, TextIO

LEVELS = {"alert": 1, "error": 2, "warning": 3, "notice": 4, "debug": 5}
SYSLOG_PRIORITIES = {"alert": syslog.LOG_ALERT, "error": syslog.LOG_ERR, "warning": syslog.LOG_WARNING,
                     "notice": syslog.LOG_NOTICE, "debug": syslog.LOG_DEBUG}
# What php-fpm puts at the end of a line it cut.
CUT_MARK = "..."


def truncate(line: str, limit: int) -> str:
    """line cut so that it and its newline fit in limit characters, ending in "..." when cut (zlog)."""
    if len(line) < limit:
        return line
    return line[:max(limit - 1 - len(CUT_MARK), 0)] + CUT_MARK


def wrap(text: str, limit: int, head: str = "", tail: str = "") -> list[str]:
    """text split into head + piece + tail lines that each fit in limit characters with the newline.

    php-fpm's worker output wrapping (zlog_stream with wrap on): a long line of output becomes
    several log lines, each decorated and quoted again, and nothing is dropped.
    """
    # At least one character per line, so a decoration longer than the limit cannot loop forever
    # (php-fpm refuses log_limit below 512 for this; the config does too).
    room = max(limit - 1 - len(head) - len(tail), 1)
    pieces = [text[i:i + room] for i in range(0, len(text), room)] or [""]
    return [f"{head}{piece}{tail}" for piece in pieces]


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

    # The [global] settings (GlobalConfig attributes) the error log is built from: a reload that
    # changes one of them opens a new log.
    GLOBAL_SETTINGS = ("error_log", "log_level", "log_limit", "syslog_ident", "syslog_facility")

    @classmethod
    def from_global(cls, global_config: Any) -> ErrorLog:
        """The error log a [global] section asks for (GLOBAL_SETTINGS). Opens it, so OSError says
        when the file cannot be opened."""
        g = global_config
        return cls(g.error_log, g.log_level, g.log_limit, syslog_ident=g.syslog_ident,
                   syslog_facility=g.syslog_facility)

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
        """Write one line (several for a multi-line message, each stamped), each cut at log_limit."""
        if LEVELS[level] > self.threshold:
            return
        lines = message.rstrip("\n").split("\n")
        if self.path == "syslog" and self.worker_fd is None:
            for line in lines:
                syslog.syslog(SYSLOG_PRIORITIES[level], truncate(f"{level.upper()}: {self.prefix}{line}",
                                                                 self.limit))
            return
        # The limit counts the whole line, time stamp and prefix included, as php-fpm's does. (php-fpm
        # formats its own messages into a 2048-byte buffer and only cuts past that, so its master's
        # lines between log_limit and 2048 bytes get through whole; fastfpm holds every line to it.)
        head = f"[{self._stamp()}] {level.upper()}: {self.prefix}"
        text = "".join(truncate(head + line, self.limit) + "\n" for line in lines)
        if self.worker_fd is not None:
            # A worker's lines go through its log pipe to the master, which writes the file. Lines
            # up to PIPE_BUF bytes arrive whole even while other workers write too.
            try:
                os.write(self.worker_fd, text.encode("utf-8", "backslashreplace"))
            except OSError:
                pass
            return
        self._write(text)

    def write_line(self, text: str) -> None:
        """Append one finished line as it is (a worker's, passed through by the master), split over
        several lines where it is longer than log_limit (undecorated worker output, as php-fpm)."""
        lines = [piece for line in text.split("\n") for piece in wrap(line, self.limit)]
        if self.path == "syslog":
            for line in lines:
                # A worker's line arrives stamped "[date] LEVEL: ..."; syslog stamps its own.
                _, _, rest = line.partition("] ")
                level = rest.partition(":")[0].lower()
                syslog.syslog(SYSLOG_PRIORITIES.get(level, syslog.LOG_NOTICE), rest or line)
            return
        self._write("".join(line + "\n" for line in lines))

    def child_said(self, pool: str, pid: int, stream: str, text: str) -> None:
        """One line of a worker's stdout or stderr, decorated (catch_workers_output with
        decorate_workers_output), at WARNING and split over several lines past log_limit.

        php-fpm's fpm_stdio_child_said: `[pool www] child 12 said into stderr: "text"`, with every
        piece of a long line decorated and quoted again.
        """
        if not self.enabled("warning"):
            return
        said = f"[pool {pool}] child {pid} said into {stream}: \""
        if self.path == "syslog":
            for line in wrap(text, self.limit, f"WARNING: {said}", '"'):
                syslog.syslog(syslog.LOG_WARNING, line)
            return
        lines = wrap(text, self.limit, f"[{self._stamp()}] WARNING: {said}", '"')
        self._write("".join(line + "\n" for line in lines))

    @staticmethod
    def _stamp() -> str:
        return time.strftime("%d-%b-%Y %H:%M:%S")

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
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


class Throttle:
    """A log callable that lets at most `burst` lines through per `window` seconds and counts the
    rest; the count is logged before the first line of a later window (the kernel's printk
    ratelimit). For lines a peer can cause at will: a worker's connections closed on malformed
    FastCGI input, which php-fpm closes without a word, must show in the log but not flood it."""

    def __init__(self, log: Callable[[str, str], None], what: str, burst: int = 10, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.what = what          # names the lines held back: "N more {what} were not logged"
        self.burst = burst
        self.window = window
        self.clock = clock
        self.started = -float("inf")
        self.passed = 0
        self.held = 0

    def __call__(self, level: str, message: str) -> None:
        """Log message at level, unless this window's burst is spent (then it is counted)."""
        now = self.clock()
        if now - self.started >= self.window:
            if self.held:
                self.log(level, f"{self.held} more {self.what} were not logged (at most {self.burst} "
                                f"per {self.window:g} s)")
            self.started, self.passed, self.held = now, 0, 0
        if self.passed < self.burst:
            self.passed += 1
            self.log(level, message)
        else:
            self.held += 1
