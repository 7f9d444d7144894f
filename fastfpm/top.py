"""`python -m fastfpm top`: a live view of a pool from its status page, as uwsgitop is for uWSGI.

The pool's counters on top, then a row per worker: busy workers first, the longest request on top
(php-fpm's "request duration" is the current request's for a busy worker and the last one's for an
idle worker, so idle ones follow, also longest first). CPU and memory are php-fpm's "last request"
figures: those of the worker's previous request.

Everything from the page's JSON (`?json&full`) to the lines on the screen is pure functions
(parse_view, sort_workers, screen_lines), tested without a terminal; run_top is the curses shell.
"""

from __future__ import annotations

import curses
import re
import sys
import time
from dataclasses import dataclass
from typing import Any

from fastfpm.statuscli import StatusError, fetch_document

IDLE = "Idle"
COLUMNS = (("PID", 8), ("STATE", 12), ("REQS", 8), ("DURATION", 10), ("LAST CPU", 9), ("LAST MEM", 9),
           ("METHOD", 7))
QUIT_KEYS = (ord("q"), ord("Q"))
# What a request's URI or method may carry that would move the cursor or garble the screen.
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One process of the page's `processes` list."""

    pid: int
    state: str
    requests: int
    duration_us: int
    method: str
    uri: str
    cpu: float | None          # percent, the last request's
    memory: int | None         # bytes, the last request's peak

    @property
    def busy(self) -> bool:
        return self.state != IDLE


@dataclass(frozen=True, slots=True)
class PoolView:
    """The pool's figures from one fetch of the page."""

    pool: str
    manager: str
    start_since: int
    accepted: int
    listen_queue: int
    max_listen_queue: int
    listen_queue_len: int
    idle: int
    active: int
    total: int
    max_active: int
    max_children_reached: int
    slow_requests: int
    workers: tuple[WorkerRow, ...]


def _field(fields: dict[str, Any], name: str, default: Any = None) -> Any:
    """A field by php-fpm's name, whatever its case (the text format's "request URI" is "request uri"
    in json)."""
    if name in fields:
        return fields[name]
    lowered = name.lower()
    return next((v for k, v in fields.items() if k.lower() == lowered), default)


def _int(fields: dict[str, Any], name: str) -> int:
    value = _field(fields, name, 0)
    return int(value) if isinstance(value, int | float) else 0


def _number(fields: dict[str, Any], name: str, kind: type) -> Any:
    value = _field(fields, name)
    return kind(value) if isinstance(value, int | float) else None


def parse_worker(fields: dict[str, Any]) -> WorkerRow:
    """A row from one entry of `processes`."""
    return WorkerRow(
        pid=_int(fields, "pid"), state=str(_field(fields, "state", "?")), requests=_int(fields, "requests"),
        duration_us=_int(fields, "request duration"), method=str(_field(fields, "request method", "-")),
        uri=str(_field(fields, "request uri", "-")), cpu=_number(fields, "last request cpu", float),
        memory=_number(fields, "last request memory", int))


def parse_view(document: dict[str, Any]) -> PoolView:
    """The view of a `?json&full` document (php-fpm 8.2's field names)."""
    processes = _field(document, "processes") or []
    return PoolView(
        pool=str(_field(document, "pool", "?")), manager=str(_field(document, "process manager", "?")),
        start_since=_int(document, "start since"), accepted=_int(document, "accepted conn"),
        listen_queue=_int(document, "listen queue"), max_listen_queue=_int(document, "max listen queue"),
        listen_queue_len=_int(document, "listen queue len"), idle=_int(document, "idle processes"),
        active=_int(document, "active processes"), total=_int(document, "total processes"),
        max_active=_int(document, "max active processes"),
        max_children_reached=_int(document, "max children reached"),
        slow_requests=_int(document, "slow requests"),
        workers=tuple(parse_worker(p) for p in processes if isinstance(p, dict)))


def sort_workers(workers: tuple[WorkerRow, ...] | list[WorkerRow]) -> list[WorkerRow]:
    """Busy workers first, each group by request duration, longest first (then by pid)."""
    return sorted(workers, key=lambda w: (not w.busy, -w.duration_us, w.pid))


def format_duration(us: int) -> str:
    """Microseconds, as a person reads them: 350us, 12.5ms, 4.20s, 3m05s, 2h07m."""
    if us < 1000:
        return f"{us}us"
    if us < 1_000_000:
        return f"{us / 1000:.1f}ms"
    seconds = us / 1_000_000
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def format_bytes(size: int | None) -> str:
    """Bytes in binary units: 512, 2.0K, 3.5M, 1.2G; '-' when the page does not give them."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{int(value)}" if not unit else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"  # pragma: no cover - the loop returns at G


def request_rate(previous: tuple[float, int] | None, current: tuple[float, int]) -> float | None:
    """Accepted connections per second between two (monotonic time, accepted conn) samples."""
    if previous is None or current[0] <= previous[0] or current[1] < previous[1]:
        return None  # the first sample, or the pool restarted (its counter went back)
    return (current[1] - previous[1]) / (current[0] - previous[0])


def header_lines(view: PoolView, address: str, rate: float | None) -> list[str]:
    """The pool's counters, three lines."""
    per_second = f"{rate:.1f} req/s" if rate is not None else "- req/s"
    return [
        # The address last: a narrow window cuts it rather than the figures.
        f"pool {view.pool} ({view.manager}), up {format_duration(view.start_since * 1_000_000)}, "
        f"accepted {view.accepted}, {per_second}, at {address}",
        f"processes: {view.active} active, {view.idle} idle, {view.total} total; max active "
        f"{view.max_active}, max children reached {view.max_children_reached}, "
        f"slow requests {view.slow_requests}",
        f"listen queue: {view.listen_queue} (max {view.max_listen_queue}, len {view.listen_queue_len})",
    ]


def table_head() -> str:
    """The column titles."""
    return "".join(f"{name:<{width}}" for name, width in COLUMNS) + "URI"


def worker_line(row: WorkerRow) -> str:
    """One worker, in the columns of table_head."""
    cpu = f"{row.cpu:.2f}%" if row.cpu is not None else "-"
    cells = (str(row.pid), row.state, str(row.requests), format_duration(row.duration_us), cpu,
             format_bytes(row.memory), row.method)
    line = "".join(f"{cell[:width - 1]:<{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))
    return CONTROL.sub("?", line + row.uri)


def screen_lines(view: PoolView, address: str, width: int, height: int, rate: float | None = None,
                 error: str | None = None) -> list[str]:
    """What the screen shows, at most height lines of at most width - 1 characters."""
    lines = header_lines(view, address, rate)
    lines.append(f"! {error}" if error else "")
    lines.append(table_head())
    lines.extend(worker_line(row) for row in sort_workers(view.workers))
    if len(lines) > height and height > 0:
        hidden = len(lines) - height + 1
        lines = lines[:height - 1] + [f"... {hidden} more workers (enlarge the window)"]
    return [line[:max(width - 1, 0)] for line in lines[:max(height, 0)]]


# ------------------------------------------------------------------ the terminal


class TopScreen:
    """The curses side: fetch every interval, draw, and quit on q or Ctrl-C."""

    HEAD_ROW = 4  # screen_lines' row of column titles, drawn in reverse video

    def __init__(self, address: str, path: str, interval: float, timeout: float,
                 first: dict[str, Any]) -> None:
        self.address, self.path, self.interval, self.timeout = address, path, interval, timeout
        self.view = parse_view(first)
        self.sample = (time.monotonic(), self.view.accepted)
        self.rate: float | None = None
        self.error: str | None = None

    def refresh_view(self) -> None:
        """Fetch the page again; on failure keep the last view and say why."""
        try:
            document = fetch_document(self.address, self.path, self.timeout)
        except StatusError as exc:
            self.error = str(exc)
            return
        self.error = None
        self.view = parse_view(document)
        sample = (time.monotonic(), self.view.accepted)
        self.rate = request_rate(self.sample, sample)
        self.sample = sample

    def draw(self, screen: Any) -> None:
        height, width = screen.getmaxyx()
        screen.erase()
        lines = screen_lines(self.view, self.address, width, height, self.rate, self.error)
        for row, line in enumerate(lines):
            try:
                screen.addstr(row, 0, line, curses.A_REVERSE if row == self.HEAD_ROW else curses.A_NORMAL)
            except curses.error:  # a window too small for even that much
                break
        screen.refresh()

    def loop(self, screen: Any) -> None:
        curses.curs_set(0)
        screen.timeout(100)  # getch waits at most 0.1 s, so q is answered at once
        next_fetch = time.monotonic() + self.interval
        self.draw(screen)
        while True:
            key = screen.getch()
            if key in QUIT_KEYS:
                return
            now = time.monotonic()
            if now >= next_fetch:
                self.refresh_view()
                next_fetch = now + self.interval
                self.draw(screen)
            elif key == curses.KEY_RESIZE:
                self.draw(screen)


def run_top(address: str, path: str, interval: float = 1.0, timeout: float = 10.0) -> int:
    """The `top` command: 0 on q or Ctrl-C; 1 when the page cannot be read to begin with."""
    try:
        first = fetch_document(address, path, timeout)
        curses.wrapper(TopScreen(address, path, max(interval, 0.1), timeout, first).loop)
    except StatusError as exc:
        print(f"fastfpm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # curses.wrapper has restored the terminal
        pass
    return 0
