"""The access log, as php-fpm's fpm_log.c: access.format compiled once, one line per request.

The format is compiled here, in plain Python, when the configuration is checked (an invalid one is
a config error at its file:line) and again when a worker starts; the worker formats and writes each
line in compiled code (fastfpm/_accesslog.pxi), after the response is complete, with one write().
The master opens the file (Pool.open_access_log); workers inherit the descriptor, as php-fpm's
children do. SIGUSR1 reopens it in the master and restarts the workers gracefully (php-fpm's
fpm_log_open(1) then SIGQUIT to every child), since a worker's inherited descriptor cannot follow.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["DEFAULT_FORMAT", "ACCESS_LOG_MODE", "FormatError", "compile_format", "worker_ops", "open_log",
           "reopen_log", "printable"]

# php-fpm's access.format when access.log is set and access.format is not (fpm_conf.c).
DEFAULT_FORMAT = '%R - %u %t "%m %r" %s'

# php-fpm opens the access log S_IRUSR | S_IWUSR, as the master's user.
ACCESS_LOG_MODE = 0o600

# Operation codes of a compiled format; _accesslog.pxi has the same numbers up to OP_MEMORY (the
# others are folded into literals by worker_ops). tests/test_accesslog.py holds the two together.
(OP_LITERAL, OP_DURATION, OP_ENV, OP_SCRIPT, OP_CONTENT_LENGTH, OP_METHOD, OP_HEADER, OP_QUERY,
 OP_QUERY_MARK, OP_URI, OP_REMOTE, OP_STATUS, OP_TIME_START, OP_TIME_NOW, OP_USER, OP_CPU, OP_MEMORY,
 OP_POOL, OP_PID, OP_PARENT_PID) = range(20)

# %d's modifiers, as php-fpm 8.2 spells them: the scale of the duration printed.
DURATION_SECONDS, DURATION_MILLI, DURATION_MICRO = 0, 1, 2
_DURATION = {"": DURATION_SECONDS, "seconds": DURATION_SECONDS, "milli": DURATION_MILLI,
             "milliseconds": DURATION_MILLI, "mili": DURATION_MILLI, "miliseconds": DURATION_MILLI,
             "micro": DURATION_MICRO, "microseconds": DURATION_MICRO}
# %M's modifiers: the divisor's power of 1024 (php-fpm divides whole bytes: 1536 bytes is 1 kilo).
MEMORY_BYTES, MEMORY_KILO, MEMORY_MEGA = 0, 1, 2
_MEMORY = {"": MEMORY_BYTES, "bytes": MEMORY_BYTES, "kilo": MEMORY_KILO, "kilobytes": MEMORY_KILO,
           "mega": MEMORY_MEGA, "megabytes": MEMORY_MEGA}
# %C's modifiers: which CPU time, as a percentage of the request's duration.
CPU_TOTAL, CPU_USER, CPU_SYSTEM = 0, 1, 2
_CPU = {"": CPU_TOTAL, "total": CPU_TOTAL, "user": CPU_USER, "system": CPU_SYSTEM}
# Codes that take no modifier, and what each becomes.
_PLAIN = {"f": OP_SCRIPT, "l": OP_CONTENT_LENGTH, "m": OP_METHOD, "n": OP_POOL, "p": OP_PID,
          "P": OP_PARENT_PID, "q": OP_QUERY, "Q": OP_QUERY_MARK, "r": OP_URI, "R": OP_REMOTE,
          "s": OP_STATUS, "u": OP_USER}
DEFAULT_TIME_FORMAT = "%d/%b/%Y:%H:%M:%S %z"
# php-fpm copies a modifier into a 129-byte buffer: longer ones are cut to 127 characters.
_MODIFIER_MAX = 127


class FormatError(ValueError):
    """access.format is invalid; the message is php-fpm's."""


def compile_format(text: str) -> list[tuple[int, int, str]]:
    """access.format as operations (code, number, text), checked as php-fpm checks it.

    Literals come out as OP_LITERAL runs.
    """
    ops: list[tuple[int, int, str]] = []
    literal: list[str] = []

    def emit(code: int, number: int = 0, arg: str = "") -> None:
        if literal:
            ops.append((OP_LITERAL, 0, "".join(literal)))
            literal.clear()
        ops.append((code, number, arg))

    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "%":
            literal.append(ch)
            i += 1
            continue
        i += 1
        modifier = ""
        if i < n and text[i] == "{":
            end = text.find("}", i + 1)
            if end < 0 or end + 1 >= n:
                raise FormatError("missing closing embrace in the access.format")
            modifier = text[i + 1:end][:_MODIFIER_MAX]
            i = end + 1
        if i >= n:
            break  # a lone % at the end prints nothing, as in php-fpm
        code = text[i]
        i += 1
        _compile_code(code, modifier, emit, literal)
    if literal:
        ops.append((OP_LITERAL, 0, "".join(literal)))
    return ops


def _compile_code(code: str, modifier: str, emit: Any, literal: list[str]) -> None:
    """One % code (with its {modifier}) as operations, or FormatError with php-fpm's message."""
    if code == "%":
        _no_modifier(code, modifier)
        literal.append("%")
    elif code == "C":
        if modifier.lower() not in _CPU:
            raise FormatError(f"only 'total', 'user' or 'system' are allowed as a modifier for %C "
                              f"('{modifier}')")
        emit(OP_CPU, _CPU[modifier.lower()])
    elif code == "d":
        if modifier.lower() not in _DURATION:
            raise FormatError("only 'seconds', 'milli', 'milliseconds', 'micro' or 'microseconds' are "
                              f"allowed as a modifier for %d ('{modifier}')")
        emit(OP_DURATION, _DURATION[modifier.lower()])
    elif code == "e":
        if not modifier:
            raise FormatError("the name of the environment variable must be set between embraces for %e")
        emit(OP_ENV, 0, modifier)
    elif code == "M":
        if modifier.lower() not in _MEMORY:
            raise FormatError("only 'bytes', 'kilo', 'kilobytes', 'mega' or 'megabytes' are allowed as a "
                              f"modifier for %M ('{modifier}')")
        emit(OP_MEMORY, _MEMORY[modifier.lower()])
    elif code == "o":
        if not modifier:
            raise FormatError("the name of the header must be set between embraces for %o")
        emit(OP_HEADER, 0, modifier)
    elif code in ("t", "T"):
        emit(OP_TIME_START if code == "t" else OP_TIME_NOW, 0, modifier or DEFAULT_TIME_FORMAT)
    elif code in _PLAIN:
        _no_modifier(code, modifier)
        emit(_PLAIN[code])
    else:
        raise FormatError(f"Invalid token in the access.format (%{code})")


def _no_modifier(code: str, modifier: str) -> None:
    if modifier:
        raise FormatError(f"embrace is not allowed for modifier %{code}")


def printable(text: str) -> str:
    """Control characters (below space, and DEL) as '.', as the slow log writes them; the C
    formatter applies the same rule to every value it copies from a request or response."""
    from fastfpm.slowlog import _printable

    return _printable(text)


def worker_ops(ops: list[tuple[int, int, str]], *, pool: str, pid: int, parent_pid: int,
               remote_known: bool) -> list[tuple[int, int, bytes | str]]:
    """A compiled format as one worker runs it: what is constant for the worker (%n, %p, %P, and %R
    on a unix socket, which php-fpm writes as "-") folded into literals, adjacent literals merged,
    literal and strftime text as bytes; %e and %o names stay str (they are looked up as such)."""
    constant = {OP_POOL: printable(pool) or "-", OP_PID: str(pid), OP_PARENT_PID: str(parent_pid)}
    if not remote_known:
        constant[OP_REMOTE] = "-"
    out: list[tuple[int, int, bytes | str]] = []
    for code, number, arg in ops:
        if code in constant:
            code, arg = OP_LITERAL, constant[code]
        if code == OP_LITERAL and out and out[-1][0] == OP_LITERAL:
            previous = out.pop()[2]
            assert isinstance(previous, bytes)
            out.append((OP_LITERAL, 0, previous + arg.encode("utf-8", "backslashreplace")))
        elif code in (OP_ENV, OP_HEADER):
            out.append((code, number, arg))
        else:
            out.append((code, number, arg.encode("utf-8", "backslashreplace")))
    return out


def open_log(path: str) -> int:
    """The access log's descriptor, opened as php-fpm opens it (append, create 0600)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, ACCESS_LOG_MODE)


def reopen_log(path: str, fd: int) -> None:
    """Open path again onto the same descriptor number (after logrotate renamed the file)."""
    new = open_log(path)
    try:
        os.dup2(new, fd, inheritable=False)
    finally:
        os.close(new)


def for_worker(pool: Any, fd: int) -> Any:
    """The compiled access log a worker of pool writes to fd (inherited from the master), or None
    without access.log."""
    if fd < 0 or not pool.access_log:
        return None
    from fastfpm._core import AccessLog
    from fastfpm.address import parse_address

    ops = worker_ops(compile_format(pool.access_format or DEFAULT_FORMAT), pool=pool.name, pid=os.getpid(),
                     parent_pid=os.getppid(), remote_known=not parse_address(pool.listen).is_unix)
    return AccessLog(fd, ops, pool.access_suppress_path)


def reopen_pools(pools: list[Any], log: Any) -> bool:
    """SIGUSR1: every pool's access.log opened again onto its descriptor; True when one was, so
    the master restarts the workers (a worker's inherited descriptor still points at the old file).
    A file that cannot be opened is logged with php-fpm's lines; the old one stays the log."""
    reopened = False
    for pool in pools:
        try:
            reopened = pool.reopen_access_log() or reopened
        except OSError as exc:
            log.error(f"failed to open access log ({pool.config.access_log}): {exc.strerror or exc} "
                      f"({exc.errno})")
            log.error("unable to re-opened access log file")
            return False
    if reopened:
        log.notice("access log file re-opened")
    return reopened
