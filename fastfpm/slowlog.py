"""php-fpm's slow log for Python workers: a stack dump on request, without ptrace.

php-fpm's master attaches to a slow worker with ptrace and reads the PHP call stack out of its
memory. That fails in containers (no CAP_SYS_PTRACE, Yama ptrace_scope) and could not read a
Python stack anyway. fastfpm asks the worker to dump its own stack:

1. The master sees on the scoreboard that a request has run past request_slowlog_timeout, logs
   `slow_request_message(...)` at WARNING (fastfpm.pm.overdue builds it, and
   `terminate_message(...)` for request_terminate_timeout) and sends the worker SLOWLOG_SIGNAL.
2. In the worker, `install()` (called once after fork, after `reset_signals`, before the
   application is imported) has blocked SLOWLOG_SIGNAL in the main thread and started a daemon
   thread that waits for it with `signal.sigwait`. Threads started later inherit the block, so the
   kernel keeps the process-directed signal pending until that thread takes it.
3. The dumper thread takes the main thread's frame from `sys._current_frames()`, formats at most
   trace_depth frames, innermost first, and appends one entry to the slowlog. The request goes on.

Why SIGURG: a web stack never uses it (it announces out-of-band TCP data, which only an
`F_SETOWN` socket owner asks for), its default action is to ignore it, so a stray one sent to a
process that never called `install()` (the master, an old worker, a child process) does nothing,
and it does not clash with SIGQUIT/SIGTERM/SIGUSR1/SIGUSR2, which already mean something to
php-fpm users. Because the signal stays blocked in the main thread and no Python handler is
installed, it never interrupts a system call there: a database driver that handles EINTR badly
blocked in recv() never sees it.

Why a thread and not a signal handler: a Python-level handler runs only in the main thread,
between bytecodes, so it would fire after time.sleep() or a socket read returns, not during it;
`faulthandler.register` writes from the C handler but in its own format, in many write() calls
(entries of concurrent workers interleave), to a file opened once (logrotate loses it), and it
interrupts the main thread's system calls. `signal.sigwait` releases the GIL, so the dumper runs
whenever the main thread has released it: in time.sleep, socket I/O, a DB driver, or every
`sys.getswitchinterval()` (5 ms) of pure-Python code.

Limits:
- The dumper needs the GIL. If the main thread holds it in C code that never releases it (a long
  regular expression match, a C extension looping without Py_BEGIN_ALLOW_THREADS), the entry is
  written when the main thread next releases the GIL, and the stack is the one at that moment.
- Python frames only: a C function (time.sleep, socket.recv) has no frame, so the innermost line is
  the Python function that called it, at the line of the call. Where php-fpm pairs a function with
  the file:line it was called from, fastfpm pairs it with its own file and current line, as a
  Python traceback does (`blocked() /srv/app.py:12` is line 12 of `blocked`).
- SLOWLOG_SIGNAL must stay blocked in every thread but the dumper: a thread that unblocks it (the
  main thread calling `pthread_sigmask(SIG_SETMASK, [])` or `SIG_UNBLOCK` with it, or a thread started
  before `install()`) can be chosen by the kernel to receive it, and then the default action drops
  it silently. Blocking or unblocking other signals is harmless, as are subprocess and
  threading.Thread (they keep the mask). `unblocked_threads()` lists offenders, for debugging.
- Children that the application forks or executes inherit the blocked signal; that is harmless
  (its default action is ignore) unless one of them relies on SIGURG (Go programs unblock it).
- Standard signals do not queue: two SLOWLOG_SIGNALs sent before the dumper wakes give one entry.
  The master sends one per slow request, so this does not arise in practice.
- The worker writes the slowlog itself, so the file must be writable by the pool's user.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

SLOWLOG_SIGNAL = signal.SIGURG
# The slowlog's mode, whether the master creates it at start or a worker after logrotate moved it:
# not world-readable, since tracebacks show request data.
SLOWLOG_MODE = 0o640

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# The dumper running in this process, if any: one per process, two would race for the signal.
_active: StackDumper | None = None


# ---------------------------------------------------------------------------------------------------
# Formatting (pure functions).

def format_time(when: float) -> str:
    """php-fpm's log time stamp, `[22-Nov-2026 10:00:00]`, in local time and English month names
    whatever the locale (time.strftime's %b would follow an application's setlocale)."""
    t = time.localtime(when)
    return (f"[{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}]")


def format_frames(frame: FrameType | None, depth: int) -> list[str]:
    """At most depth lines `[0x<id(frame)>] qualname() file:line`, innermost first."""
    lines: list[str] = []
    while frame is not None and len(lines) < depth:
        code = frame.f_code
        lineno = frame.f_lineno or 0  # None for a frame that has not started or lost its line
        lines.append(f"[0x{id(frame):016x}] {code.co_qualname}() {code.co_filename or 'unknown'}:{lineno}")
        frame = frame.f_back
    return lines


def format_entry(pool: str, pid: int, script: str, frame: FrameType | None, depth: int,
                 when: float | None = None) -> str:
    """One slowlog entry in php-fpm's layout (fpm_php_trace.c), frames innermost first::

        <blank line>
        [22-Nov-2026 10:00:00]  [pool www] pid 1234
        script_filename = /srv/app.py
        [0x00007f3a2c1b2d40] blocked() /srv/app.py:12
        [0x00007f3a2c1b2b80] application() /srv/app.py:30

    The two spaces come from php-fpm's time stamp ending in "] " followed by " [pool". Control
    characters in script become "." so one request cannot forge lines. With no frame at all (the
    thread is gone) the entry ends with php-fpm's "+++ dump failed".
    """
    stamp = format_time(time.time() if when is None else when)
    lines = ["", f"{stamp}  [pool {pool}] pid {pid}", f"script_filename = {_printable(script)}"]
    if frame is None:
        lines.append("+++ dump failed")
    else:
        lines.extend(format_frames(frame, depth))
    return "\n".join(lines) + "\n"


def _printable(text: str) -> str:
    return "".join("." if ord(c) < 0x20 or c == "\x7f" else c for c in text)


def purified(text: str) -> str:
    """php-fpm's str_purify_filename: characters below space or above 0x7f become ".".

    A SCRIPT_FILENAME is percent-decoded by the web server (nginx's $fastcgi_script_name), so a
    %0A in a URL would otherwise start a forged line in the error log.
    """
    return "".join("." if ord(c) < 0x20 or ord(c) > 0x7F else c for c in text)


def seconds_text(elapsed: float) -> str:
    """elapsed as php-fpm prints a timeval, %d.%06d: microseconds truncated, not rounded."""
    # Rounded to the nanosecond first, so float noise (0.29 stored as 0.28999...) does not lose a
    # microsecond that a timeval would have kept.
    micro = max(0, round(elapsed * 1_000_000_000) // 1000)
    return f"{micro // 1_000_000}.{micro % 1_000_000:06d}"


def request_line(method: str, uri: str, query_string: str = "") -> str:
    """`METHOD URI?QUERY` as the master's warnings show a request ("" when no method is known yet).

    php-fpm's slot keeps the script name, so it always appends "?query"; a WSGI worker keeps
    REQUEST_URI, which already carries the query string when the web server sends it whole (nginx).
    """
    if not method:
        return ""
    query = f"?{query_string}" if query_string and "?" not in uri else ""
    return f"{method} {uri}{query}"


def _request_prefix(pool: str, pid: int, script: str, request: str) -> str:
    # php-fpm purifies the script name only and prints the request as it came; any FastCGI client
    # can put control characters in REQUEST_URI too, so fastfpm purifies both.
    return f"[pool {pool}] child {pid}, script '{purified(script)}' (request: \"{purified(request)}\")"


def slow_request_message(pool: str, pid: int, script: str, method: str, uri: str, elapsed: float,
                         query_string: str = "") -> str:
    """The master's WARNING when it asks for a traceback, in php-fpm's words (fpm_request.c)::

        [pool www] child 123, script '/x' (request: "GET /x?a=1") executing too slow (5.010000 sec), logging
    """
    return (f"{_request_prefix(pool, pid, script, request_line(method, uri, query_string))} "
            f"executing too slow ({seconds_text(elapsed)} sec), logging")


def terminate_message(pool: str, pid: int, script: str, method: str, uri: str, elapsed: float,
                      query_string: str = "") -> str:
    """The master's WARNING when request_terminate_timeout ends a request (fpm_request.c)::

        [pool www] child 123, script '/x' (request: "GET /x") execution timed out (30.000210 sec), terminating
    """
    return (f"{_request_prefix(pool, pid, script, request_line(method, uri, query_string))} "
            f"execution timed out ({seconds_text(elapsed)} sec), terminating")


# ---------------------------------------------------------------------------------------------------
# The worker side.

def append_entry(path: str, entry: str) -> None:
    """Append entry to the slowlog in one write() on a descriptor opened for this entry.

    O_APPEND makes each write land at the end of the file even with other workers writing, and one
    write() keeps an entry in one piece; opening per entry follows a file logrotate renamed.
    """
    data = entry.encode("utf-8", "backslashreplace")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, SLOWLOG_MODE)
    try:
        written = os.write(fd, data)
        while written < len(data):  # a short write to a regular file: disk full or a signal
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


class StackDumper:
    """The thread that writes the main thread's stack to the slowlog on SLOWLOG_SIGNAL.

    Made by `install()`; `dumps` counts entries written, `stop()` ends the thread (for tests).
    """

    def __init__(self, pool_name: str, slowlog_path: str, trace_depth: int,
                 describe_request: Callable[[], tuple[str, str]], target_ident: int,
                 on_error: Callable[[str], None] | None = None) -> None:
        if trace_depth < 1:
            raise ValueError(f"trace_depth must be at least 1, not {trace_depth}")
        self.pool_name = pool_name
        self.slowlog_path = slowlog_path
        self.trace_depth = trace_depth
        self.describe_request = describe_request
        self.target_ident = target_ident
        self.on_error = on_error
        self.dumps = 0
        self.was_blocked = False  # whether install found the signal already blocked
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="fastfpm-slowlog", daemon=True)

    def start(self) -> None:
        """Start the dumper thread."""
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the dumper thread is running."""
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            signal.sigwait({SLOWLOG_SIGNAL})
            if self._stopping:
                return
            try:
                self.dump()
            except Exception as exc:  # the worker must live on whatever went wrong here
                self._report(f"cannot write slowlog {self.slowlog_path}: {exc!r}")

    def dump(self) -> None:
        """Append one entry for the target thread's current stack (what a SLOWLOG_SIGNAL does)."""
        try:
            script, _method = self.describe_request()
        except Exception as exc:
            self._report(f"slowlog: cannot describe the current request: {exc!r}")
            script = "???"
        # The method is not part of php-fpm's entry; the master's warning line carries it.
        frame = sys._current_frames().get(self.target_ident)
        entry = format_entry(self.pool_name, os.getpid(), script, frame, self.trace_depth)
        del frame  # a frame reference would keep the request's locals alive
        append_entry(self.slowlog_path, entry)
        self.dumps += 1

    def _report(self, message: str) -> None:
        if self.on_error is not None:
            self.on_error(message)
        else:
            try:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """End the dumper thread. Called from the thread that installed it, this also unblocks
        SLOWLOG_SIGNAL again if install() blocked it."""
        global _active
        if self._thread.is_alive():
            self._stopping = True
            assert self._thread.ident is not None
            signal.pthread_kill(self._thread.ident, SLOWLOG_SIGNAL)
            self._thread.join(timeout)
        if threading.get_ident() == self.target_ident and not self.was_blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {SLOWLOG_SIGNAL})
        if _active is self:
            _active = None


def install(pool_name: str, slowlog_path: str, trace_depth: int,
            describe_request: Callable[[], tuple[str, str]], *,
            on_error: Callable[[str], None] | None = None) -> StackDumper:
    """Make SLOWLOG_SIGNAL append the calling thread's stack to slowlog_path; return the dumper.

    Call once per worker, from its main thread, after fork and after the signal mask was reset,
    before the application is imported (so every thread it starts inherits the block).
    describe_request returns (SCRIPT_FILENAME or the request URI, method) of the request running
    now; it is called from the dumper thread. on_error receives a line when an entry cannot be
    written (default: stderr, which catch_workers_output brings to the error log).
    """
    global _active
    if _active is not None and _active.alive:
        raise RuntimeError("the slowlog stack dumper is already installed in this process")
    dumper = StackDumper(pool_name, slowlog_path, trace_depth, describe_request, threading.get_ident(),
                         on_error)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {SLOWLOG_SIGNAL})
    dumper.was_blocked = SLOWLOG_SIGNAL in previous
    dumper.start()
    _active = dumper
    return dumper


def unblocked_threads() -> list[int]:
    """Native ids of this process's threads that do not block SLOWLOG_SIGNAL (Linux /proc).

    After install() the list should be empty but for the dumper, and the dumper only while it is
    inside sigwait (the kernel lifts the block for the wait). Any other thread may be handed the
    signal and drop it.
    """
    bit = 1 << (SLOWLOG_SIGNAL - 1)
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/status") as status:
                for line in status:
                    if line.startswith("SigBlk:"):
                        if not int(line.split()[1], 16) & bit:
                            found.append(int(tid))
                        break
        except FileNotFoundError:  # the thread ended meanwhile
            continue
    return sorted(found)
