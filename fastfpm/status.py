"""php-fpm 8.2's status page and ping, rendered from a pool's scoreboard.

One moment of a pool (a StatusView: the pool counters, the slots, the clocks) becomes one of
php-fpm's formats: text (the default), ?json, ?xml, ?html, ?openmetrics, each with ?full for the
per-process section. Field names, their order, value types, the Content-Type and the no-cache
headers are php-fpm 8.2's; fastfpm's own fields come after php-fpm's in each block, never instead.

The renderers are plain functions of a StatusView, so the page a worker serves (status_app over
worker_view, routed by fastfpm.worker) and the one the master serves on pm.status_listen share
them. The status request is not counted in the figures it reports: the worker rendering the page
counts itself idle in the pool counters (php-fpm counts it active); its own row under ?full shows
its slot as it is, Running the status request.

Differences from php-fpm, each on purpose: no X-Powered-By header; OpenMetrics counters carry
the `_total` suffix on their samples (php-fpm's output fails a strict OpenMetrics parser); a HEAD
request gets the Content-Type its GET would (php-fpm sends PHP's default text/html); control
characters in request URIs and scripts are shown as "." outside JSON, so a request cannot forge a
line or break the XML. `user` is the request's REMOTE_USER param (nginx's $remote_user, set by
auth_basic or auth_request), "-" without one; php-fpm shows the user PHP parsed from a Basic
Authorization header, which is the same user behind nginx's auth_basic.

`last request cpu` and `last request memory` are shown, as php-fpm shows them, for a worker between
requests (0 while it is inside one). The CPU is php-fpm's: user + system time of the request
(getrusage at its start and end) in percent of its duration, "%.2f" (child processes the request
waited for are not counted; php-fpm's times() counts them). The memory differs: php-fpm reports
the Zend engine's peak allocation of the request, and Python has no per-request allocator, so
fastfpm reports the worker's peak resident set (ru_maxrss, bytes) when the request ended: a high-water
mark of the worker's life, which a later, smaller request does not lower.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastfpm.stages import STAGE_TABLE

__all__ = ["StatusView", "choose_format", "render", "status_app", "ping_app", "worker_view", "pool_view",
           "NO_CACHE_HEADERS", "CONTENT_TYPES", "FORMATS", "ERROR_BODY"]

# The headers php-fpm sends with every status and ping answer.
NO_CACHE_HEADERS = [("Expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
                    ("Cache-Control", "no-cache, no-store, must-revalidate, max-age=0")]
# php-fpm's Content-Type per format, spelled as it sends them: PHP rewrites a text/* type it is
# given into "Content-type: TYPE;charset=UTF-8" and leaves the others as set.
CONTENT_TYPES = {
    "text": ("Content-type", "text/plain;charset=UTF-8"),
    "html": ("Content-type", "text/html;charset=UTF-8"),
    "xml": ("Content-type", "text/xml;charset=UTF-8"),
    "json": ("Content-Type", "application/json"),
    "openmetrics": ("Content-Type", "application/openmetrics-text; version=1.0.0; charset=utf-8"),
}
# The query keys that choose a format, in php-fpm's order of precedence (?json&xml is XML).
FORMATS = ("html", "xml", "json", "openmetrics")
ERROR_BODY = b"Internal error. Please review log file for errors."

_TIME_TEXT = "%d/%b/%Y:%H:%M:%S %z"  # text and html; json and xml give unix seconds


@dataclass(frozen=True)
class StatusView:
    """One moment of a pool, as a status page shows it."""

    counters: Any                 # fastfpm.scoreboard.PoolCounters
    slots: Sequence[Any]          # fastfpm.scoreboard.SlotSnapshot, every slot with a worker
    process_manager: str          # static | dynamic | ondemand
    now: float                    # wall clock, seconds
    now_ns: int                   # CLOCK_MONOTONIC ns, the slots' clock
    generation: int = 1           # the configuration generation (1 + the reloads before it)
    memory: Mapping[int, int] = field(default_factory=dict)  # pid -> resident bytes
    serving: int | None = None    # the slot rendering this page (counted idle), None in the master


# A field: (name as json and html write it, kind, value); kind is str, int, float or time.
Field = tuple[str, str, Any]


def query_keys(query: str) -> set[str]:
    """The names PHP's $_GET would hold for query: key=value pairs split on '&', the key
    percent-decoded, an array key (json[]) by the name before '['. Values are never decoded."""
    keys = set()
    for part in query.split("&"):
        name = part.split("=", 1)[0]
        if not name:
            continue
        if "%" in name or "+" in name:
            name = urllib.parse.unquote_plus(name)
        keys.add(name.split("[", 1)[0] if "[" in name[1:] else name)
    return keys


def choose_format(query: str) -> tuple[str, bool]:
    """(format, full) for a query string, as php-fpm chooses: the first of FORMATS present, else
    text (an unknown ?foo is text, as php-fpm answers it); full when ?full is present at all."""
    keys = query_keys(query) if query else set()
    fmt = next((name for name in FORMATS if name in keys), "text")
    return fmt, "full" in keys


def pool_fields(view: StatusView) -> list[Field]:
    """php-fpm's pool fields in its order, then fastfpm's."""
    c = view.counters
    since = max(0, int(view.now) - c.start_time)
    fields: list[Field] = [
        ("pool", "str", c.pool), ("process manager", "str", view.process_manager),
        ("start time", "time", c.start_time), ("start since", "int", since),
        ("accepted conn", "int", c.accepted_conn), ("listen queue", "int", c.listen_queue),
        ("max listen queue", "int", c.max_listen_queue), ("listen queue len", "int", c.listen_queue_len),
        ("idle processes", "int", c.idle_processes), ("active processes", "int", c.active_processes),
        ("total processes", "int", c.total_processes),
        ("max active processes", "int", c.max_active_processes),
        ("max children reached", "int", c.max_children_reached), ("slow requests", "int", c.slow_requests),
    ]
    fields += [
        ("requests", "int", c.requests),
        ("requests per second", "float", c.requests / since if since else 0.0),
        ("reloads", "int", max(0, view.generation - 1)),
        ("resident memory", "int", sum(view.memory.values())),
    ]
    return fields


def process_fields(view: StatusView, slot: Any) -> list[Field]:
    """php-fpm's per-process fields in its order, then fastfpm's, for one slot."""
    if slot.busy:
        duration_us = max(0, view.now_ns - slot.request_start_ns) // 1000
    else:
        duration_us = max(0, slot.last_request_ns) // 1000
    uri = slot.request_uri
    if slot.query_string and "?" not in uri:
        uri += "?" + slot.query_string
    return [
        ("pid", "int", slot.pid), ("state", "str", slot.stage_name),
        ("start time", "time", slot.started_wall),
        ("start since", "int", max(0, int(view.now) - slot.started_wall)),
        ("requests", "int", slot.requests), ("request duration", "int", duration_us),
        ("request method", "str", slot.method or "-"), ("request uri", "str", uri or "-"),
        ("content length", "int", max(0, slot.content_length)), ("user", "str", slot.remote_user or "-"),
        ("script", "str", slot.script_filename or "-"),
        # php-fpm shows the last request's figures only between requests (0 while in one)
        ("last request cpu", "float", 0.0 if slot.busy else slot.last_request_cpu),
        ("last request memory", "int", 0 if slot.busy else slot.last_request_memory),
        ("resident memory", "int", view.memory.get(slot.pid, 0)),
    ]


def _printable(text: str) -> str:
    return "".join("." if ord(c) < 0x20 or c == "\x7f" else c for c in text)


def _plain(kind: str, value: Any, for_markup: bool) -> str:
    """A value as text, html and xml write it."""
    if kind == "time":
        return time.strftime(_TIME_TEXT, time.localtime(value)) if not for_markup else str(value)
    if kind == "float":
        return f"{value:.2f}"
    if kind == "int":
        return str(value)
    return _printable(value)


def _text_block(fields: Iterable[Field]) -> str:
    lines = []
    for name, kind, value in fields:
        label = "request URI" if name == "request uri" else name
        lines.append(f"{label + ':':<21} {_plain(kind, value, False)}\n")
    return "".join(lines)


def render_text(view: StatusView, full: bool) -> str:
    """The default format: `name: value` lines, then under ?full a block per process."""
    out = [_text_block(pool_fields(view))]
    if full:
        for slot in view.slots:
            out.append("\n************************\n" + _text_block(process_fields(view, slot)))
    return "".join(out)


def _json_value(kind: str, value: Any) -> str:
    if kind == "float":
        return f"{value:.2f}"
    if kind in ("int", "time"):
        return str(int(value))
    return json.dumps(value).replace("/", "\\/")  # php-fpm escapes '/' as PHP's json_encode does


def _json_object(fields: Iterable[Field]) -> str:
    return ",".join(f'"{name}":{_json_value(kind, value)}' for name, kind, value in fields)


def render_json(view: StatusView, full: bool) -> str:
    """?json: one object; under ?full a "processes" array after the pool fields."""
    head = "{" + _json_object(pool_fields(view))
    if not full:
        return head + "}"
    rows = ",".join("{" + _json_object(process_fields(view, slot)) + "}" for slot in view.slots)
    return head + ', "processes":[' + rows + "]}"


def _markup(kind: str, value: Any, xml: bool) -> str:
    return html.escape(_plain(kind, value, xml), quote=False)


def render_xml(view: StatusView, full: bool) -> str:
    """?xml: a <status> element, one child per field; under ?full a <processes> list."""
    def elements(fields: Iterable[Field], sep: str) -> str:
        return sep.join(f"<{n.replace(' ', '-')}>{_markup(k, v, True)}</{n.replace(' ', '-')}>"
                        for n, k, v in fields)

    out = ['<?xml version="1.0" ?>\n<status>\n', elements(pool_fields(view), "\n"), "\n"]
    if not full:
        out.append("</status>")
        return "".join(out)
    out.append("<processes>\n")
    for slot in view.slots:
        out.append("<process>" + elements(process_fields(view, slot), "") + "</process>\n")
    out.append("</processes>\n</status>")
    return "".join(out)


_HTML_HEAD = ('<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" '
              '"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">\n'
              '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
              "<head><title>PHP-FPM Status Page</title></head>\n<body>\n<table>\n")


def render_html(view: StatusView, full: bool) -> str:
    """?html: a table of the pool fields; under ?full a second table, one row per process."""
    out = [_HTML_HEAD]
    for name, kind, value in pool_fields(view):
        out.append(f"<tr><th>{name}</th><td>{_markup(kind, value, False)}</td></tr>\n")
    out.append("</table>\n")
    if not full:
        out.append("</body></html>")
        return "".join(out)
    rows = [process_fields(view, slot) for slot in view.slots]
    names = [name for name, _, _ in (rows[0] if rows else process_fields(view, _NO_SLOT))]
    out.append('<table border="1">\n<tr>' + "".join(f"<th>{n}</th>" for n in names) + "</tr>\n")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{_markup(k, v, False)}</td>" for _, k, v in row) + "</tr>\n")
    out.append("</table></body></html>")
    return "".join(out)


@dataclass(frozen=True)
class _EmptySlot:
    """Stands in for a slot when a pool has none, so the column names can still be listed."""

    index: int = -1
    pid: int = 0
    stage_name: str = "-"
    busy: bool = False
    started_wall: int = 0
    requests: int = 0
    request_start_ns: int = 0
    last_request_ns: int = 0
    method: str = ""
    request_uri: str = ""
    query_string: str = ""
    content_length: int = 0
    script_filename: str = ""
    last_request_cpu: float = 0.0
    last_request_memory: int = 0
    remote_user: str = ""


_NO_SLOT = _EmptySlot()

# php-fpm's OpenMetrics families, in its order: (name, type, help, the pool field it reports).
_PHPFPM_FAMILIES = (
    ("phpfpm_start_since", "counter", "The number of seconds since FPM has started.", "start since"),
    ("phpfpm_accepted_connections", "counter", "The number of requests accepted by the pool.",
     "accepted conn"),
    ("phpfpm_listen_queue", "gauge", "The number of requests in the queue of pending connections.",
     "listen queue"),
    ("phpfpm_max_listen_queue", "counter",
     "The maximum number of requests in the queue of pending connections since FPM has started.",
     "max listen queue"),
    ("phpfpm_listen_queue_length", "gauge", "The size of the socket queue of pending connections.",
     "listen queue len"),
    ("phpfpm_idle_processes", "gauge", "The number of idle processes.", "idle processes"),
    ("phpfpm_active_processes", "gauge", "The number of active processes.", "active processes"),
    ("phpfpm_total_processes", "gauge", "The number of idle + active processes.", "total processes"),
    ("phpfpm_max_active_processes", "counter",
     "The maximum number of active processes since FPM has started.", "max active processes"),
    ("phpfpm_max_children_reached", "counter",
     "The number of times, the process limit has been reached, when pm tries to start more children "
     "(works only for pm 'dynamic' and 'ondemand').", "max children reached"),
    ("phpfpm_slow_requests", "counter",
     "The number of requests that exceeded your 'request_slowlog_timeout' value.", "slow requests"),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, Any]]) -> list[str]:
    """One metric family; samples are (labels text, value); a counter's samples end in _total."""
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    sample = name + "_total" if kind == "counter" else name
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
            *(f"{sample}{labels} {value}" for labels, value in samples)]


def render_openmetrics(view: StatusView, full: bool = False) -> str:
    """?openmetrics: php-fpm's families (unlabelled, as php-fpm's), then fastfpm's with a pool
    label. ?full adds nothing, as with php-fpm. Valid for a strict OpenMetrics parser."""
    values = {name: value for name, _, value in pool_fields(view)}
    pool = view.counters.pool
    lines = _family("phpfpm_up", "gauge",
                    f"Could pool {_printable(pool)} using a {view.process_manager} PM on fastfpm be "
                    f"reached?", [("", 1)])
    for name, kind, help_text, key in _PHPFPM_FAMILIES:
        lines += _family(name, kind, help_text, [("", values[key])])
    by_pool = f'{{pool="{_label(pool)}"}}'
    lines += _family("fastfpm_start_time_seconds", "gauge", "When the pool started, in unix seconds.",
                     [(by_pool, view.counters.start_time)])
    lines += _family("fastfpm_requests", "counter",
                     "Requests the pool has served (several per connection when kept alive).",
                     [(by_pool, values["requests"])])
    lines += _family("fastfpm_reloads", "counter",
                     "Configuration reloads before this pool's generation started.",
                     [(by_pool, values["reloads"])])
    states = {stage.status_name: 0 for stage in STAGE_TABLE if stage.number}
    for slot in view.slots:
        state = "Idle" if slot.index == view.serving else slot.stage_name  # as the pool counters
        states[state] = states.get(state, 0) + 1
    lines += _family("fastfpm_processes", "gauge", "Worker processes by state.",
                     [(f'{{pool="{_label(pool)}",state="{state}"}}', n) for state, n in states.items()])
    lines += _family("fastfpm_resident_memory_bytes", "gauge",
                     "Resident memory of the pool's workers together (shared pages counted per worker).",
                     [(by_pool, values["resident memory"])])
    lines += _family("fastfpm_worker_peak_memory_bytes", "gauge",
                     "The largest peak resident set among the pool's workers, as of their last request.",
                     [(by_pool, max((slot.last_request_memory for slot in view.slots), default=0))])
    lines += _duration_histogram(view.counters, pool)
    return "\n".join(lines) + "\n# EOF\n"


def _le(bound: float) -> str:
    """A bucket bound as OpenMetrics writes numbers (canonical: 1.0, not 1; +Inf)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _duration_histogram(counters: Any, pool: str) -> list[str]:
    """fastfpm_request_duration_seconds: every request the pool finished, by duration (the slots'
    bucket counts plus those of exited workers), cumulative as OpenMetrics wants; _count is the
    +Inf bucket, so it equals the pool's requests."""
    name = "fastfpm_request_duration_seconds"
    label = _label(pool)
    lines = [f"# HELP {name} Requests by duration, from their first bytes to their end.",
             f"# TYPE {name} histogram"]
    total = 0
    buckets = counters.duration_buckets or ((math.inf, 0),)
    for bound, count in buckets:
        total += count
        lines.append(f'{name}_bucket{{pool="{label}",le="{_le(bound)}"}} {total}')
    lines.append(f'{name}_count{{pool="{label}"}} {total}')
    lines.append(f'{name}_sum{{pool="{label}"}} {counters.duration_sum_ns / 1e9!r}')
    return lines


RENDERERS: dict[str, Callable[[StatusView, bool], str]] = {
    "text": render_text, "json": render_json, "xml": render_xml, "html": render_html,
    "openmetrics": render_openmetrics,
}


def render(fmt: str, view: StatusView, full: bool = False) -> bytes:
    """The page in one of CONTENT_TYPES' formats, as bytes. The slots' strings hold the request's
    own bytes (decoded latin-1), so latin-1 gives them back unchanged."""
    return RENDERERS[fmt](view, full).encode("latin-1", "replace")


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def status_app(source: Callable[[], StatusView]) -> WSGIApp:
    """A WSGI application answering the status page from source(), read at each request."""
    def status(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        fmt, full = choose_format(environ.get("QUERY_STRING", ""))
        try:
            body = render(fmt, source(), full)
        except Exception as exc:  # the scoreboard is unreadable: php-fpm's answer, and a log line
            errors = environ.get("wsgi.errors")
            if errors is not None:
                errors.write(f"status: cannot read the scoreboard: {exc!r}\n")
            start_response("500 Internal Server Error", [CONTENT_TYPES["text"], *NO_CACHE_HEADERS])
            return [ERROR_BODY]
        headers = [*NO_CACHE_HEADERS, CONTENT_TYPES[fmt]]
        if environ.get("REQUEST_METHOD") == "HEAD":
            start_response("200 OK", headers)
            return []
        start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return status


def ping_app(response: str = "pong") -> WSGIApp:
    """A WSGI application answering ping.path: 200, text/plain, php-fpm's headers, no body on HEAD."""
    body = response.encode()
    headers = [CONTENT_TYPES["text"], *NO_CACHE_HEADERS]

    def ping(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "HEAD":
            start_response("200 OK", headers)
            return []
        start_response("200 OK", [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return ping


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def resident_memory(pids: Iterable[int]) -> dict[int, int]:
    """Resident bytes of each pid that can be read (/proc/PID/statm); gone processes are left out."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                found[pid] = int(f.read().split()[1]) * _PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return found


def worker_view(mapping: Any, slot_index: int, process_manager: str) -> Callable[[], StatusView]:
    """The StatusView source of a worker serving the page from its inherited scoreboard mapping;
    slot_index is its own slot, counted idle in the pool counters."""
    from fastfpm.scoreboard import read_pool_counters, read_slots

    def view() -> StatusView:
        counters = read_pool_counters(mapping, serving=slot_index)
        slots = read_slots(mapping)
        generation = next((s.generation for s in slots if s.index == slot_index), 1)
        return StatusView(counters, slots, process_manager, time.time(), time.monotonic_ns(),
                          generation or 1, resident_memory(s.pid for s in slots), slot_index)

    return view


def pool_view(pool: Any) -> StatusView:
    """A pool's StatusView as the master reads it (fastfpm.statuslisten): its scoreboard's counters
    and slots, no worker rendering the page (serving=None), the pool's generation."""
    slots = pool.scoreboard.snapshot()
    return StatusView(pool.scoreboard.counters(), slots, pool.config.pm, time.time(), time.monotonic_ns(),
                      pool.generation, resident_memory(s.pid for s in slots), None)


def routes(pool: Any, mapping: Any, slot_index: int) -> dict[str, WSGIApp]:
    """The request paths a worker of pool answers itself: pm.status_path and ping.path."""
    table: dict[str, WSGIApp] = {}
    if pool.pm_status_path:
        table[pool.pm_status_path] = status_app(worker_view(mapping, slot_index, pool.pm))
    if pool.ping_path:
        table[pool.ping_path] = ping_app(pool.ping_response)
    return table
