"""`python -m fastfpm top`: the page-to-screen functions with fabricated pages, then the real command
driven in a terminal (tmux: new-session, send-keys, capture-pane) against a real server.

The server under test is tests.status_server's status_target: a fastfpm pool whose workers serve
pm.status_path themselves.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm.top import (
    format_bytes,
    format_duration,
    parse_view,
    request_rate,
    screen_lines,
    sort_workers,
)
from tests.servers import REPO_ROOT, missing_requirement, run_cli, wait_until
from tests.status_server import StatusTarget, status_target


def process(pid: int, state: str, duration: int, uri: str = "-", method: str = "-", requests: int = 1,
            cpu: float = 0.0, memory: int = 0) -> dict:
    """One entry of php-fpm 8.2's `processes`, as its json format spells it."""
    return {"pid": pid, "state": state, "start time": 1796197726, "start since": 60, "requests": requests,
            "request duration": duration, "request method": method, "request uri": uri,
            "content length": 0, "user": "-", "script": "-", "last request cpu": cpu,
            "last request memory": memory}


def page(*processes: dict, accepted: int = 42) -> dict:
    return {"pool": "www", "process manager": "dynamic", "start time": 1796197726, "start since": 3725,
            "accepted conn": accepted, "listen queue": 1, "max listen queue": 3, "listen queue len": 511,
            "idle processes": 1, "active processes": 2, "total processes": 3, "max active processes": 3,
            "max children reached": 1, "slow requests": 4, "processes": list(processes)}


PAGE = page(process(101, "Idle", 9_000_000, "/old", "GET", cpu=12.5, memory=2 * 1024 * 1024),
            process(102, "Running", 1_500, "/fast?x=1", "POST"),
            process(103, "Running", 2_500_000, "/slow", "GET", requests=7))


# ------------------------------------------------------------------ pure: page -> rows -> lines


def test_busy_workers_come_first_longest_request_on_top() -> None:
    view = parse_view(PAGE)
    assert [w.pid for w in sort_workers(view.workers)] == [103, 102, 101]
    assert view.workers[0].cpu == 12.5 and view.workers[0].memory == 2 * 1024 * 1024


def test_screen_shows_counters_and_a_row_per_worker() -> None:
    lines = screen_lines(parse_view(PAGE), "/run/www.sock", 120, 40, rate=2.5)
    assert lines[0] == "pool www (dynamic), up 1h02m, accepted 42, 2.5 req/s, at /run/www.sock"
    assert lines[1] == ("processes: 2 active, 1 idle, 3 total; max active 3, max children reached 1, "
                        "slow requests 4")
    assert lines[2] == "listen queue: 1 (max 3, len 511)"
    assert lines[4].split() == ["PID", "STATE", "REQS", "DURATION", "LAST", "CPU", "LAST", "MEM", "METHOD",
                                "URI"]
    assert lines[5].split() == ["103", "Running", "7", "2.50s", "0.00%", "0", "GET", "/slow"]
    assert lines[6].split() == ["102", "Running", "1", "1.5ms", "0.00%", "0", "POST", "/fast?x=1"]
    assert lines[7].split() == ["101", "Idle", "1", "9.00s", "12.50%", "2.0M", "GET", "/old"]
    assert len(lines) == 8


def test_screen_fits_the_window() -> None:
    many = page(*(process(200 + i, "Idle", i) for i in range(30)))
    lines = screen_lines(parse_view(many), "x", 40, 12)
    assert len(lines) == 12
    assert lines[-1].startswith("... 24 more workers")
    assert all(len(line) <= 39 for line in lines)


def test_an_error_is_shown_above_the_table_and_control_characters_are_not_drawn() -> None:
    view = parse_view(page(process(1, "Running", 5, "/a\x1b[2J\nb", "GET")))
    lines = screen_lines(view, "x", 200, 20, error="cannot reach x: Connection refused")
    assert lines[3] == "! cannot reach x: Connection refused"
    assert lines[5].endswith("/a?[2J?b")


def test_missing_fields_and_the_text_formats_capitals_are_tolerated() -> None:
    view = parse_view({"pool": "p", "processes": [{"pid": 5, "state": "Idle", "request URI": "/u"}]})
    [worker] = view.workers
    assert (worker.uri, worker.cpu, worker.memory, view.accepted) == ("/u", None, None, 0)
    assert "-" in screen_lines(view, "x", 100, 10)[5].split()


@pytest.mark.parametrize(("us", "text"), [(0, "0us"), (999, "999us"), (12_345, "12.3ms"),
                                          (4_200_000, "4.20s"), (185_000_000, "3m05s"),
                                          (7_620_000_000, "2h07m")])
def test_durations_read_as_a_person_reads_them(us: int, text: str) -> None:
    assert format_duration(us) == text


def test_sizes_and_rates() -> None:
    assert [format_bytes(n) for n in (None, 512, 2048, 3 * 1024**3)] == ["-", "512", "2.0K", "3.0G"]
    assert request_rate(None, (1.0, 10)) is None
    assert request_rate((1.0, 10), (3.0, 30)) == 10.0
    assert request_rate((1.0, 10), (2.0, 3)) is None  # the counter went back: a restart


# ------------------------------------------------------------------ the command in a terminal


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StatusTarget]:
    with status_target(tmp_path_factory.mktemp) as server:
        yield server


class Tmux:
    """A private tmux server (its own socket) running one command in a 150x30 window."""

    def __init__(self, workdir: Path) -> None:
        self.socket = workdir / "tmux.sock"
        self.exit_file = workdir / "exit-status"

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True, text=True,
                              check=check, timeout=10)

    def start(self, *command: str) -> None:
        """Run command in a detached session; its exit status lands in exit_file."""
        line = (f"cd {shlex.quote(str(REPO_ROOT))} && PYTHONPATH=. {shlex.join(command)}; "
                f"echo $? > {shlex.quote(str(self.exit_file))}")
        self.tmux("-f", "/dev/null", "new-session", "-d", "-x", "150", "-y", "30", "-s", "top", line)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top", check=False).stdout

    def send(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def wait_screen(self, predicate, message: str) -> str:
        return wait_until(lambda: (text := self.screen()) and predicate(text) and text, 10, 0.1, message)

    def exit_status(self) -> int:
        text = wait_until(lambda: self.exit_file.exists() and self.exit_file.read_text().strip(), 10,
                          message="the command to exit")
        return int(text)

    def close(self) -> None:
        self.tmux("kill-server", check=False)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        missing_requirement("tmux is not installed (apt-get install tmux); the top tests drive it")
    term = Tmux(tmp_path)
    yield term
    term.close()


def top_command(target: StatusTarget, interval: str = "0.3") -> list[str]:
    return [sys.executable, "-m", "fastfpm", "top", target.address, "--path", target.status_path,
            "--interval", interval]


def worker_rows(screen: str) -> list[str]:
    """The worker rows under the column titles (none before the first screen is drawn)."""
    lines = screen.splitlines()
    head = next((i for i, line in enumerate(lines) if line.startswith("PID")), len(lines))
    return [line for line in lines[head + 1:] if line.strip()]


def seconds_into(screen: str, path: str) -> bool:
    """Whether the row of the request for path shows a duration of a second or more."""
    row = next((row for row in worker_rows(screen) if path in row), None)
    return row is not None and row.split()[3].endswith("s") and not row.split()[3].endswith(("ms", "us"))


def test_top_shows_the_busy_worker_on_top_and_quits_on_q(target: StatusTarget, terminal: Tmux) -> None:
    request = target.busy(6)
    terminal.start(*top_command(target))
    screen = terminal.wait_screen(lambda s: seconds_into(s, target.busy_path),
                                  "the busy request, a second into it, on the screen")
    assert screen.startswith(f"pool {target.pool} (static), up ")
    rows = worker_rows(screen)
    assert len(rows) == 2
    assert rows[0].split()[1] == "Running" and target.busy_path in rows[0]  # the longest request on top
    # It refreshes: the duration of the request in flight grows from one screen to the next.
    first = rows[0].split()[3]
    later = terminal.wait_screen(lambda s: (rows := worker_rows(s)) and rows[0].split()[3] != first,
                                 "the duration to move on")
    assert target.busy_path in worker_rows(later)[0]
    terminal.send("q")
    assert terminal.exit_status() == 0
    request.join(10)


def test_top_quits_on_ctrl_c(target: StatusTarget, terminal: Tmux) -> None:
    terminal.start(*top_command(target, interval="1"))
    terminal.wait_screen(lambda s: "PID" in s and "listen queue:" in s, "the first screen")
    terminal.send("C-c")
    assert terminal.exit_status() == 0


def test_top_counts_the_requests_it_sees(target: StatusTarget, terminal: Tmux) -> None:
    terminal.start(*top_command(target))

    def accepted(screen: str) -> int:
        return int(screen.split("accepted ", 1)[1].split(",", 1)[0])

    first = accepted(terminal.wait_screen(lambda s: "accepted " in s, "the pool line"))
    # Each refresh is a request to the pool: the counter climbs and a rate appears.
    later = terminal.wait_screen(lambda s: accepted(s) >= first + 2 and "- req/s" not in s, "fresh counters")
    assert " req/s" in later.splitlines()[0]
    terminal.send("q")
    assert terminal.exit_status() == 0


def test_top_without_a_status_page_exits_1(tmp_path: Path) -> None:
    result = run_cli("top", str(tmp_path / "nobody.sock"))
    assert result.returncode == 1
    assert "cannot reach" in result.stderr and "No such file or directory" in result.stderr
