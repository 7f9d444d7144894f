"""The status page and ping (fastfpm.status): php-fpm 8.2's formats, rendered from a scoreboard.

The renderers and the WSGI apps are tested with fabricated views and environs; then a real worker
serves them from a real scoreboard, side by side with Debian's php-fpm 8.2 (tests.status_server's
PhpFpm: no php.ini, a unix socket in a temporary directory), and every format's keys, their order
and their value types are compared; and nginx with its stock fastcgi_params is put in front.
"""

from __future__ import annotations

import io
import json
import re
import signal
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any

import pytest

from fastfpm import status
from fastfpm.client import FastCGIClient, FastCGIError, build_params
from fastfpm.config import from_cli
from fastfpm.scoreboard import PoolCounters, SlotSnapshot
from tests.servers import Nginx, forked_slot_worker, http_request, nginx_binary, wait_until
from tests.status_server import PhpFpm

PHPFPM_POOL_FIELDS = ["pool", "process manager", "start time", "start since", "accepted conn",
                      "listen queue", "max listen queue", "listen queue len", "idle processes",
                      "active processes", "total processes", "max active processes",
                      "max children reached", "slow requests"]
FASTFPM_POOL_FIELDS = ["requests", "requests per second", "reloads", "resident memory"]


# --- fabricated views ----------------------------------------------------------------------------


def counters(**more: Any) -> PoolCounters:
    values = dict(pool="www", start_time=1_700_000_000, accepted_conn=12, requests=20, listen_queue=1,
                  max_listen_queue=3, listen_queue_len=511, idle_processes=1, active_processes=1,
                  total_processes=2, max_active_processes=2, max_children_reached=4, slow_requests=5)
    values.update(more)
    return PoolCounters(**values)


def slot(index: int, stage: int = 2, **more: Any) -> SlotSnapshot:
    values = dict(index=index, pid=1000 + index, generation=3, stage=stage, requests=7, accepted_conn=5,
                  started_wall=1_700_000_010, request_start_ns=9_000_000_000, request_start_wall_us=0,
                  last_request_ns=2_500_000, idle_since_ns=0, content_length=-1, status=200,
                  keepalive=False, method="GET", request_uri="/x?a=1&b=<2>", query_string="a=1&b=<2>",
                  script_filename="/srv/app", last_request_utime_us=300, last_request_stime_us=9,
                  last_request_memory=48 << 20)
    values.update(more)
    return SlotSnapshot(**values)


def view(**more: Any) -> status.StatusView:
    values = dict(counters=counters(), slots=[slot(0), slot(1, stage=5)], process_manager="dynamic",
                  now=1_700_000_100.0, now_ns=10_000_000_000, generation=3, memory={1000: 4096, 1001: 8192},
                  serving=None)
    values.update(more)
    return status.StatusView(**values)


@pytest.mark.parametrize(("query", "expected"), [
    # what php-fpm 8.2 answers, seen by querying it
    ("", ("text", False)), ("full", ("text", True)), ("foo", ("text", False)), ("JSON", ("text", False)),
    ("json", ("json", False)), ("json=0", ("json", False)), ("json[]", ("json", False)),
    ("a=1&json", ("json", False)), ("full=0&json", ("json", True)), ("json&xml", ("xml", False)),
    ("xml&json", ("xml", False)), ("html&json", ("html", False)), ("openmetrics&json", ("json", False)),
    ("openmetrics&full", ("openmetrics", True)), ("%6Aso%6E", ("json", False)),
])
def test_the_format_is_chosen_as_php_fpm_chooses_it(query, expected):
    assert status.choose_format(query) == expected


def test_text_has_php_fpm_fields_in_its_order_then_fastfpm_fields():
    text = status.render("text", view(), full=False).decode()
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == PHPFPM_POOL_FIELDS + FASTFPM_POOL_FIELDS
    assert lines[0] == "pool:                 www"
    assert lines[1] == "process manager:      dynamic"
    assert lines[3] == "start since:          100"
    assert lines[11] == "max active processes: 2"
    assert lines[15] == "requests per second:  0.20"
    assert lines[16] == "reloads:              2"
    assert lines[17] == "resident memory:      12288"
    assert text.endswith("\n")


def test_full_text_has_a_block_per_process_with_durations_as_php_fpm_measures_them():
    text = status.render("text", view(), full=True).decode()
    blocks = text.split("\n************************\n")
    assert len(blocks) == 3
    idle, running = (dict(line.split(":", 1) for line in block.splitlines()) for block in blocks[1:])
    assert idle["state"].strip() == "Idle"
    assert idle["request duration"].strip() == "2500"          # the last request's, in µs
    assert running["state"].strip() == "Running"
    assert running["request duration"].strip() == "1000000"   # now - its start, in µs
    assert running["request URI"].strip() == "/x?a=1&b=<2>"
    assert running["content length"].strip() == "0"
    assert running["user"].strip() == "-"
    assert running["last request cpu"].strip() == "0.00"       # php-fpm: 0 inside a request
    assert running["last request memory"].strip() == "0"
    assert running["resident memory"].strip() == "8192"
    assert idle["last request cpu"].strip() == "12.36"         # 309 µs of CPU in 2500 µs
    assert idle["last request memory"].strip() == str(48 << 20)


def test_control_characters_cannot_forge_lines_or_break_markup():
    evil = view(slots=[slot(0, request_uri="/a\nslow requests: 0\r\x00", query_string="",
                            script_filename="/s\x1b")])
    text = status.render("text", evil, full=True).decode()
    assert "request URI:          /a.slow requests: 0.." in text
    forged = [line for line in text.splitlines() if line.startswith("slow requests:")]
    assert forged == ["slow requests:        5"]
    ET.fromstring(status.render("xml", evil, full=True))  # well-formed: no raw control characters
    row = json.loads(status.render("json", evil, full=True))["processes"][0]
    assert row["request uri"] == "/a\nslow requests: 0\r\x00"  # JSON escapes them itself


def test_json_keeps_php_fpm_spelling_types_and_escapes():
    body = status.render("json", view(), full=True)
    assert b'"request uri":"\\/x?a=1&b=<2>"' in body      # '/' escaped, as php-fpm's
    assert b'"slow requests":5,"requests":20,' in body     # fastfpm's fields after php-fpm's
    assert b', "processes":[{"pid":1000,' in body
    assert b'"last request cpu":0.00,' in body                      # the Running one
    assert b'"last request cpu":12.36,"last request memory":50331648,' in body  # the Idle one
    page = json.loads(body)
    assert list(page)[:14] == PHPFPM_POOL_FIELDS
    assert page["start time"] == 1_700_000_000
    assert page["processes"][1]["state"] == "Running"


def test_xml_and_html_escape_values():
    xml = status.render("xml", view(), full=True).decode()
    assert "<request-uri>/x?a=1&amp;b=&lt;2&gt;</request-uri>" in xml
    root = ET.fromstring(xml)
    assert [child.tag for child in root][:3] == ["pool", "process-manager", "start-time"]
    assert root.find("processes/process/script").text == "/srv/app"
    page = status.render("html", view(), full=True).decode()
    assert "<td>/x?a=1&amp;b=&lt;2&gt;</td>" in page
    assert page.endswith("</table></body></html>")
    assert status.render("html", view(), full=False).decode().endswith("</table>\n</body></html>")


def test_html_full_of_a_pool_without_workers_still_names_its_columns():
    page = status.render("html", view(slots=[]), full=True).decode()
    assert "<th>pid</th><th>state</th>" in page and "<td>" not in page.split('<table border="1">')[1]


def test_openmetrics_is_valid_and_keeps_php_fpm_family_names():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    body = status.render("openmetrics", view(), full=True).decode()
    families = {family.name: family for family in text_string_to_metric_families(body)}
    assert list(families)[:12] == [
        "phpfpm_up", "phpfpm_start_since", "phpfpm_accepted_connections", "phpfpm_listen_queue",
        "phpfpm_max_listen_queue", "phpfpm_listen_queue_length", "phpfpm_idle_processes",
        "phpfpm_active_processes", "phpfpm_total_processes", "phpfpm_max_active_processes",
        "phpfpm_max_children_reached", "phpfpm_slow_requests"]
    accepted = families["phpfpm_accepted_connections"]
    assert accepted.type == "counter"
    samples = [(s.name, s.labels, s.value) for s in accepted.samples]
    assert samples == [("phpfpm_accepted_connections_total", {}, 12)]
    assert families["fastfpm_requests"].samples[0].labels == {"pool": "www"}
    by_state = {s.labels["state"]: s.value for s in families["fastfpm_processes"].samples}
    assert (by_state["Idle"], by_state["Running"]) == (1, 1)


def test_openmetrics_has_the_duration_histogram_and_the_workers_peak_memory():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    buckets = tuple(zip((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf")),
                        (7, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1), strict=True))
    page = view(counters=counters(requests=11, duration_buckets=buckets, duration_sum_ns=31_500_000_000),
                slots=[slot(0, last_request_memory=30 << 20), slot(1, stage=5, last_request_memory=40 << 20)])
    body = status.render("openmetrics", page).decode()
    assert 'fastfpm_request_duration_seconds_bucket{pool="www",le="1.0"} 10\n' in body  # canonical 1.0
    families = {family.name: family for family in text_string_to_metric_families(body)}  # strict
    histogram = families["fastfpm_request_duration_seconds"]
    assert histogram.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.samples}
    assert all(s.labels["pool"] == "www" for s in histogram.samples)
    # cumulative, as OpenMetrics buckets are; _count is the +Inf bucket, the pool's requests
    bucket = "fastfpm_request_duration_seconds_bucket"
    assert [samples[bucket, le] for le in ("0.005", "0.01", "0.5", "+Inf")] == [7, 8, 10, 11]
    assert samples["fastfpm_request_duration_seconds_count", None] == 11
    assert samples["fastfpm_request_duration_seconds_sum", None] == 31.5
    peak = families["fastfpm_worker_peak_memory_bytes"]
    assert (peak.type, peak.samples[0].labels, peak.samples[0].value) == ("gauge", {"pool": "www"}, 40 << 20)


def test_openmetrics_counts_the_serving_worker_idle():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    body = status.render("openmetrics", view(serving=1)).decode()
    family = next(f for f in text_string_to_metric_families(body) if f.name == "fastfpm_processes")
    by_state = {s.labels["state"]: s.value for s in family.samples}
    assert (by_state["Idle"], by_state["Running"]) == (2, 0)


def test_openmetrics_escapes_a_pool_name_in_labels():
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    body = status.render("openmetrics", view(counters=counters(pool='a"b\\c'))).decode()
    family = next(f for f in text_string_to_metric_families(body) if f.name == "fastfpm_requests")
    assert family.samples[0].labels == {"pool": 'a"b\\c'}


# --- the WSGI applications ----------------------------------------------------------------------


def call(app: Any, method: str = "GET", query: str = "") -> tuple[str, list[tuple[str, str]], bytes, str]:
    seen: dict[str, Any] = {}
    errors = io.StringIO()

    def start_response(status_line: str, headers: list[tuple[str, str]]) -> None:
        seen.update(status=status_line, headers=headers)

    body = b"".join(app({"REQUEST_METHOD": method, "QUERY_STRING": query, "wsgi.errors": errors},
                        start_response))
    return seen["status"], seen["headers"], body, errors.getvalue()


@pytest.mark.parametrize(("query", "content_type"), [
    ("", "text/plain;charset=UTF-8"), ("json", "application/json"), ("xml", "text/xml;charset=UTF-8"),
    ("html", "text/html;charset=UTF-8"), ("foo", "text/plain;charset=UTF-8"),
    ("openmetrics", "application/openmetrics-text; version=1.0.0; charset=utf-8"),
])
def test_status_app_sends_php_fpm_headers(query, content_type):
    line, headers, body, _ = call(status.status_app(view), query=query)
    assert line == "200 OK"
    assert headers[:3] == [*status.NO_CACHE_HEADERS, (headers[2][0], content_type)]
    assert dict(headers)["Content-Length"] == str(len(body)) and body


def test_status_app_head_has_the_get_headers_and_no_body():
    line, headers, body, _ = call(status.status_app(view), "HEAD", "json")
    assert (line, body) == ("200 OK", b"")
    assert ("Content-Type", "application/json") in headers


def test_status_app_answers_500_when_the_scoreboard_cannot_be_read():
    def broken() -> status.StatusView:
        raise ValueError("not a scoreboard of this version of fastfpm")

    line, headers, body, errors = call(status.status_app(broken))
    assert (line, body) == ("500 Internal Server Error", status.ERROR_BODY)
    assert "cannot read the scoreboard" in errors


def test_status_app_takes_a_megabyte_query_string_quickly():
    started = time.monotonic()
    line, headers, body, _ = call(status.status_app(view), query="json&" + "a" * (1 << 20))
    assert line == "200 OK" and json.loads(body)["pool"] == "www"
    line, _, body, _ = call(status.status_app(view), query="&".join(["x=1"] * 250_000))
    assert line == "200 OK" and body.startswith(b"pool:")
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_ping_app(method):
    line, headers, body, _ = call(status.ping_app("alive"), method)
    assert line == "200 OK"
    assert headers[:3] == [("Content-type", "text/plain;charset=UTF-8"), *status.NO_CACHE_HEADERS]
    assert body == (b"" if method == "HEAD" else b"alive")


def test_routes_follow_the_pool_config():
    pool = from_cli(pm_status_path="/st", ping_path="/p").pools[0]
    table = status.routes(pool, mapping=None, slot_index=0)
    assert sorted(table) == ["/p", "/st"]
    assert call(table["/p"])[2] == b"pong"
    assert status.routes(from_cli().pools[0], None, 0) == {}


# --- a real worker, a real scoreboard ------------------------------------------------------------


def dispatch(table: dict[str, Any]) -> Any:
    """The route table the worker loop applies, for a worker started without one."""
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("REQUEST_URI", "").split("?", 1)[0]
        return table[path](environ, start_response)

    return app


@pytest.fixture
def fastfpm_status(tmp_path_factory) -> Iterator[str]:
    """A forked worker answering /status and /ping from its scoreboard; its socket path."""
    pool = from_cli(pm_status_path="/status", ping_path="/ping").pools[0]
    directory = tmp_path_factory.mktemp("fastfpm")
    with forked_slot_worker(directory / "fpm.sock", None, pool, "www",
                            app_for=lambda mapping, index: dispatch(status.routes(pool, mapping, index))
                            ) as (_, path, _pid):
        yield path


@pytest.fixture
def php_fpm(tmp_path_factory) -> Iterator[str]:
    """Debian's php-fpm 8.2, no php.ini, one static pool of 2 on a unix socket; its socket path."""
    server = PhpFpm(tmp_path_factory.mktemp("php-fpm"))
    try:
        yield server.start().address
    finally:
        server.stop()


def fetch(address: str, path: str, query: str = "", method: str = "GET") -> Any:
    with FastCGIClient(address, timeout=10) as client:
        return client.request(build_params(method, path, query, {}, None, {}))


def kind(text: str) -> str:
    if re.fullmatch(r"-?[0-9]+", text):
        return "int"
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", text):
        return "float"
    return "str"


def text_shape(body: str) -> list[list[tuple[str, str]]]:
    blocks = body.split("\n************************\n")
    return [[(k, kind(v.strip())) for k, v in (line.split(":", 1) for line in block.splitlines() if line)]
            for block in blocks]


def json_shape(body: str) -> list[list[tuple[str, str]]]:
    page = json.loads(body, object_pairs_hook=list)
    names = {int: "int", float: "float", str: "str"}
    pool = [(k, names[type(v)]) for k, v in page if k != "processes"]
    rows = next((v for k, v in page if k == "processes"), [])
    return [pool] + [[(k, names[type(v)]) for k, v in row] for row in rows]


def xml_shape(body: str) -> list[list[tuple[str, str]]]:
    root = ET.fromstring(body)
    pool = [(child.tag, kind(child.text or "")) for child in root if child.tag != "processes"]
    rows = root.findall("processes/process")
    return [pool] + [[(child.tag, kind(child.text or "")) for child in row] for row in rows]


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("th", "td"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def html_shape(body: str) -> list[list[tuple[str, str]]]:
    parser = _Tables()
    parser.feed(body)
    pool = [(name, kind(value)) for name, value in parser.tables[0]]
    if len(parser.tables) == 1:
        return [pool]
    head, *rows = parser.tables[1]
    return [pool] + [[(name, kind(value)) for name, value in zip(head, row, strict=True)] for row in rows]


SHAPES = {"text": text_shape, "json": json_shape, "xml": xml_shape, "html": html_shape}


def assert_php_fpm_prefix(ours: list[tuple[str, str]], theirs: list[tuple[str, str]]) -> None:
    """php-fpm's keys, order and types first; anything after them is fastfpm's own."""
    assert ours[:len(theirs)] == theirs
    assert not {key for key, _ in ours[len(theirs):]} & {key for key, _ in theirs}


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("fmt", ["text", "json", "xml", "html"])
def test_every_format_matches_php_fpm(php_fpm, fastfpm_status, fmt, full):
    query = "&".join(part for part in ("" if fmt == "text" else fmt, "full" if full else "") if part)
    theirs, ours = fetch(php_fpm, "/status", query), fetch(fastfpm_status, "/status", query)
    assert (ours.status, theirs.status) == (200, 200)
    for name in ("Content-Type", "Expires", "Cache-Control"):
        assert ours.header(name) == theirs.header(name), name
    their_shape, our_shape = SHAPES[fmt](theirs.text), SHAPES[fmt](ours.text)
    assert len(their_shape) == (3 if full else 1)   # php-fpm's two workers
    assert len(our_shape) == (2 if full else 1)     # the forked worker
    assert_php_fpm_prefix(our_shape[0], their_shape[0])
    extras = [f.replace(" ", "-") if fmt == "xml" else f for f in FASTFPM_POOL_FIELDS]
    assert [key for key, _ in our_shape[0][len(their_shape[0]):]] == extras
    for row in our_shape[1:]:
        assert_php_fpm_prefix(row, their_shape[1])


def test_php_fpm_counts_its_status_request_active_and_fastfpm_does_not(php_fpm, fastfpm_status):
    theirs = json.loads(fetch(php_fpm, "/status", "json&full").body)
    ours = json.loads(fetch(fastfpm_status, "/status", "json&full").body)
    assert theirs["active processes"] == 1
    assert (ours["active processes"], ours["idle processes"], ours["max active processes"]) == (0, 1, 0)
    assert ours["processes"][0]["state"] == "Running"  # its own row shows its slot as it is
    assert ours["processes"][0]["request uri"] == "/status?json&full"


def test_openmetrics_matches_php_fpm_families_and_is_valid(php_fpm, fastfpm_status):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    theirs, ours = fetch(php_fpm, "/status", "openmetrics"), fetch(fastfpm_status, "/status", "openmetrics")
    assert ours.header("Content-Type") == theirs.header("Content-Type")
    their_families = re.findall(r"^# TYPE (\S+) (\S+)$", theirs.text, re.M)
    with pytest.raises(ValueError):  # php-fpm's own output: counters without _total
        list(text_string_to_metric_families(theirs.text))
    our_families = [(f.name, f.type) for f in text_string_to_metric_families(ours.text)]
    assert_php_fpm_prefix(our_families, their_families)
    assert all(name.startswith("fastfpm_") for name, _ in our_families[len(their_families):])
    # ?full changes nothing, as with php-fpm
    with_full = fetch(fastfpm_status, "/status", "openmetrics&full").text
    assert len(with_full.splitlines()) == len(ours.text.splitlines())


@pytest.mark.parametrize(("path", "query", "method"), [
    ("/status", "foo", "GET"), ("/status", "full&foo", "GET"), ("/ping", "", "GET"), ("/ping", "x=1", "GET"),
    ("/ping", "", "HEAD"), ("/status", "", "HEAD"),
])
def test_unknown_formats_ping_and_head_answer_as_php_fpm(php_fpm, fastfpm_status, path, query, method):
    theirs, ours = fetch(php_fpm, path, query, method), fetch(fastfpm_status, path, query, method)
    assert (ours.status, theirs.status) == (200, 200)
    assert ours.header("Cache-Control") == theirs.header("Cache-Control")
    assert ours.header("Expires") == theirs.header("Expires")
    if path == "/ping":
        assert ours.body == theirs.body
        assert ours.header("Content-Type") == theirs.header("Content-Type")
    elif method == "HEAD":
        assert ours.body == theirs.body == b""
    else:
        assert [k for k, _ in text_shape(ours.text)[0]][:14] == [k for k, _ in text_shape(theirs.text)[0]]


def test_a_megabyte_query_string_is_refused_and_the_worker_serves_on(fastfpm_status):
    # Over max_params_size (64K by default) the worker closes the connection and logs it, as
    # php-fpm closes it; the next request is answered.
    with pytest.raises(FastCGIError):
        fetch(fastfpm_status, "/status", "json&" + "a" * (1 << 20))
    assert json.loads(fetch(fastfpm_status, "/status", "json").body)["pool"] == "www"


@pytest.mark.nginx
@pytest.mark.parametrize("query", ["", "json", "json&full"])
def test_status_through_nginx_with_stock_fastcgi_params(fastfpm_status, tmp_path, query):
    binary = nginx_binary()
    web = Nginx(binary, tmp_path, f"unix:{fastfpm_status}").start()
    try:
        result = http_request(web.port, "GET", "/status" + ("?" + query if query else ""))
        ping = http_request(web.port, "GET", "/ping")
    finally:
        web.stop()
    assert result.status == 200
    assert result.header("Cache-Control") == "no-cache, no-store, must-revalidate, max-age=0"
    assert result.header("Expires") == "Thu, 01 Jan 1970 00:00:00 GMT"
    if query:
        page = result.json()
        assert list(page)[:14] == PHPFPM_POOL_FIELDS
        assert result.header("Content-Type") == "application/json"
        assert ("processes" in page) == ("full" in query)
    else:
        assert result.header("Content-Type") == "text/plain;charset=UTF-8"
        assert result.body.decode().splitlines()[0] == "pool:                 www"
    assert (ping.status, ping.body) == (200, b"pong")


# --- through `fastfpm serve`: the worker's route table -------------------------------------------


STATUS_POOL = """
[www]
listen = {dir}/fpm.sock
app = tests.apps.gate_app:app
pm = static
pm.max_children = 2
pm.status_path = /status
ping.path = /ping
ping.response = alive
"""


def test_a_pool_answers_status_and_ping_and_its_app_the_rest(configured):
    server = configured(STATUS_POOL)
    server.settled_workers()
    assert fetch(server.address, "/ping").body == b"alive"
    assert fetch(server.address, "/ping", method="HEAD").body == b""
    assert fetch(server.address, "/").body.startswith(b"done in")          # the app
    assert fetch(server.address, "/status/more").body.startswith(b"done in")  # only the exact path
    page = fetch(server.address, "/status", "json")
    assert page.header("Content-Type") == "application/json"
    assert json.loads(page.body)["pool"] == "www"


def test_the_status_page_counts_a_busy_worker_and_not_itself(configured):
    server = configured(STATUS_POOL)
    server.settled_workers()
    gate = server.workdir / "gate"
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(fetch(server.address, "/", f"gate={gate}")),
                              daemon=True)
    thread.start()
    try:
        def held() -> Any:
            page = json.loads(fetch(server.address, "/status", "json&full").body)
            return page if page["active processes"] == 1 else None

        page = wait_until(held, 10, message="one worker held in the app")
        assert (page["idle processes"], page["total processes"]) == (1, 2)
        uris = sorted(row["request uri"] for row in page["processes"])
        assert uris == sorted([f"\\/?gate={gate}".replace("\\/", "/"), "/status?json&full"])
        assert {row["state"] for row in page["processes"]} == {"Running"}
    finally:
        gate.touch()
        thread.join(10)
    assert results and results[0].body.startswith(b"done in")


def test_reloads_are_counted_on_the_status_page(configured):
    server = configured(STATUS_POOL)
    old = set(server.settled_workers())
    assert json.loads(fetch(server.address, "/status", "json").body)["reloads"] == 0
    server.signal(signal.SIGUSR2)
    wait_until(lambda: (pids := set(server.worker_pids())) and len(pids) == 2 and not pids & old,
               15, message="a new generation only")
    assert json.loads(fetch(server.address, "/status", "json").body)["reloads"] == 1


WORK_POOL = """
[www]
listen = {dir}/fpm.sock
app = tests.apps.work:app
pm = static
pm.max_children = 2
pm.status_path = /status
"""


def last_request_row(address: str, query: str) -> Any:
    """The ?json&full row of a worker whose last request was GET /?query, and Idle since.

    Both workers serve that request at once (the second connection goes to the worker the first
    left idle), then one status request is served by either: the other's row shows the figures
    (a worker's own row is Running, its figures 0, as php-fpm's). Tried again while that worker
    is still Finishing, which it may be when its answer has already arrived.
    """
    def attempt() -> Any:
        pids: list[bytes] = []
        threads = [threading.Thread(target=lambda: pids.append(fetch(address, "/", query).body))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(set(pids)) == 2, pids  # one each
        page = json.loads(fetch(address, "/status", "json&full").body)
        rows = [r for r in page["processes"] if r["state"] == "Idle" and r["request uri"] == "/?" + query]
        return rows and rows[0]

    return wait_until(attempt, 30, message=f"a worker idle after GET /?{query}")


def test_last_request_cpu_and_memory_on_the_status_page(configured):
    server = configured(WORK_POOL)
    server.settled_workers()
    burn = last_request_row(server.address, "do=burn&seconds=0.2")
    assert type(burn["last request cpu"]) is float and type(burn["last request memory"]) is int
    # 0.2 s of CPU at least: percent x duration (µs) says so, whatever the load did to the duration
    assert burn["last request cpu"] * burn["request duration"] / 100 >= 190_000
    assert 0 < burn["last request cpu"] <= 101
    sleep = last_request_row(server.address, "do=sleep&seconds=0.3")
    assert sleep["request duration"] >= 300_000
    assert sleep["last request cpu"] < 15
    alloc = last_request_row(server.address, "do=alloc&mb=50")
    # The peak grew by the 50 MB (compared with the worker's size, not with a fixed figure: under
    # AddressSanitizer a worker starts at about 60 MB).
    assert alloc["last request memory"] >= sleep["last request memory"] + (45 << 20)
    # The text format shows the same figures, in the block of a worker that is Idle (the one answering
    # reads Running with its figures 0, as php-fpm's; one still Finishing its last answer reads so too).
    def idle_block() -> str | None:
        blocks = fetch(server.address, "/status", "full").text.split("\n************************\n")
        return next((b for b in blocks[1:] if re.search(r"^state:\s+Idle$", b, re.M)), None)

    block = wait_until(idle_block, 30, message="an Idle worker's block on the text page")
    assert re.search(r"^last request cpu:     \d+\.\d\d$", block, re.M)
    assert re.search(r"^last request memory:  [1-9]\d*$", block, re.M)


def test_user_is_the_requests_remote_user(configured):
    """php-fpm's per-process "user": the REMOTE_USER nginx passes ($remote_user), "-" without one."""
    server = configured(WORK_POOL)
    server.settled_workers()

    def both_workers(extra: dict[str, str]) -> None:
        def one() -> None:
            with FastCGIClient(server.address, timeout=10) as client:
                client.request(build_params("GET", "/", "do=sleep&seconds=0.3", {}, None, extra))
        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

    def users() -> list[str]:
        page = json.loads(fetch(server.address, "/status", "json&full").body)
        return sorted(process["user"] for process in page["processes"])

    # Both workers serve alice at once; then the one rendering the page shows its own request
    # (no user) and the other the last request it served.
    both_workers({"REMOTE_USER": "alice"})
    wait_until(lambda: users() == ["-", "alice"], 10, message="one worker's row to show alice")
    both_workers({})
    wait_until(lambda: users() == ["-", "-"], 10, message="no user once both served a request without one")


def test_the_duration_histogram_on_the_openmetrics_page(configured):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    server = configured(WORK_POOL)
    server.settled_workers()
    for query in ("", "do=sleep&seconds=0.3", "", "do=sleep&seconds=0.3", ""):
        fetch(server.address, "/", query)

    def page() -> dict[str, Any]:
        body = fetch(server.address, "/status", "openmetrics").text
        return {f.name: f for f in text_string_to_metric_families(body)}  # the strict parser

    families = page()
    histogram = families["fastfpm_request_duration_seconds"]
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.samples}
    requests = families["fastfpm_requests"].samples[0].value
    count = samples["fastfpm_request_duration_seconds_count", None]
    # Every finished request is counted once (this page's own is not finished yet): the five
    # above, and the status requests settled_workers() and nothing else made (all fast).
    assert count == requests >= 5
    assert samples["fastfpm_request_duration_seconds_bucket", "+Inf"] == count
    # the two sleeps, and only they, took more than 0.25 s
    assert count - samples["fastfpm_request_duration_seconds_bucket", "0.25"] == 2
    assert samples["fastfpm_request_duration_seconds_bucket", "1.0"] == count
    assert samples["fastfpm_request_duration_seconds_sum", None] >= 0.6
    # The next page counts the one before it.
    again = page()
    assert again["fastfpm_requests"].samples[0].value == requests + 1
