"""The master's parts below the loop: the fd registry, the signal pipe, the direct spawner's
reaping, and a Generation's states, with real processes where signals are involved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm import pm
from fastfpm.config import from_cli
from fastfpm.generation import DRAINING, FAILED, SERVING, STARTING, Generation
from fastfpm.log import ErrorLog
from fastfpm.pool import Child
from fastfpm.watcher import SignalPipe, Watcher

# A worker stand-in that ignores SIGQUIT, so only the drain's SIGKILL ends it.
STUBBORN = ("import signal, sys, time; signal.signal(signal.SIGQUIT, signal.SIG_IGN); "
            "print('up', flush=True); time.sleep(60)")


# ------------------------------------------------------------------ Watcher


@pytest.fixture
def pipes() -> Iterator[list[tuple[int, int]]]:
    made: list[tuple[int, int]] = []
    yield made
    for r, w in made:
        for fd in (r, w):
            try:
                os.close(fd)
            except OSError:
                pass


def new_pipe(pipes: list[tuple[int, int]]) -> tuple[int, int]:
    pipe = os.pipe()
    pipes.append(pipe)
    return pipe


def test_watcher_calls_the_handlers_of_readable_fds_in_registration_order(pipes) -> None:
    watcher = Watcher()
    called: list[str] = []
    (a, a_w), (b, b_w), (c, _) = new_pipe(pipes), new_pipe(pipes), new_pipe(pipes)
    watcher.register(b, lambda: called.append("b"))
    watcher.register(a, lambda: called.append("a"))
    watcher.register(c, lambda: called.append("c"))
    os.write(a_w, b"x")
    os.write(b_w, b"x")
    watcher.wait(1.0)
    assert called == ["b", "a"]  # c has nothing to read


def test_watcher_wait_times_out_when_nothing_is_readable(pipes) -> None:
    watcher = Watcher()
    r, _ = new_pipe(pipes)
    watcher.register(r, lambda: pytest.fail("not readable"))
    started = time.monotonic()
    watcher.wait(0.05)
    assert time.monotonic() - started >= 0.04


def test_watcher_handlers_are_those_registered_when_the_wait_began(pipes) -> None:
    """A handler that unregisters another fd changes the next wait, not this one (the master's
    worker-output handler copes with a call for a pipe it has closed)."""
    watcher = Watcher()
    called: list[str] = []
    (a, a_w), (b, b_w) = new_pipe(pipes), new_pipe(pipes)
    watcher.register(a, lambda: (called.append("a"), watcher.unregister(b)))
    watcher.register(b, lambda: called.append("b"))
    os.write(a_w, b"x")
    os.write(b_w, b"x")
    watcher.wait(1.0)
    assert called == ["a", "b"]
    called.clear()
    watcher.wait(0.0)
    assert called == ["a"] and b not in watcher


def test_watcher_unregister_with_a_handler_leaves_a_newer_registration_alone(pipes) -> None:
    watcher = Watcher()
    r, _ = new_pipe(pipes)

    def first() -> None:
        pass

    def second() -> None:
        pass

    watcher.register(r, first)
    watcher.register(r, second)  # the fd number taken again, by something else
    watcher.unregister(r, first)
    assert watcher.handlers[r] is second
    watcher.unregister(r)
    assert r not in watcher
    watcher.unregister(r)  # not watched: no error


def test_watcher_calls_writable_handlers_until_unregistered(pipes) -> None:
    watcher = Watcher()
    called: list[str] = []
    r, w = new_pipe(pipes)
    watcher.register_writable(w, lambda: called.append("w"))
    watcher.register(r, lambda: called.append("r"))
    watcher.wait(1.0)
    assert called == ["w"]   # an empty pipe takes writes; nothing to read
    os.write(w, b"x")
    watcher.wait(1.0)
    assert called == ["w", "r", "w"]  # readers first, then writers
    watcher.unregister_writable(w, lambda: None)  # another handler's: left alone
    watcher.unregister_writable(w)
    watcher.unregister(r)
    watcher.wait(0.0)
    assert called == ["w", "r", "w"]


def test_watcher_timers_shorten_the_wait_and_expire_once_due() -> None:
    watcher = Watcher()
    due = [time.monotonic() + 0.05]
    expired: list[float] = []

    def deadline() -> float | None:
        return due[0] if due else None

    def expire(now: float) -> None:
        expired.append(now)
        due.clear()  # what a listener does: the connection past its deadline is closed

    when = due[0]
    watcher.add_timer(deadline, expire)
    watcher.wait(30.0)           # would sleep 30 s without the timer
    assert len(expired) == 1 and expired[0] >= when
    watcher.wait(0.0)
    assert len(expired) == 1     # nothing due any more
    due.append(time.monotonic() - 1)
    watcher.remove_timer(deadline)
    watcher.wait(0.0)
    assert len(expired) == 1     # removed: never called again
    watcher.remove_timer(deadline)  # not set: no error


# ------------------------------------------------------------------ SignalPipe


def test_signal_pipe_reads_each_signal_once() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGPIPE)}
    signals = SignalPipe()
    try:
        signals.install((signal.SIGUSR1, signal.SIGUSR2))
        assert signals.read() == []
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert signals.read() == [signal.SIGUSR2, signal.SIGUSR1]
        assert signals.read() == []
        watcher = Watcher()
        seen: list[list[int]] = []
        watcher.register(signals.fd, lambda: seen.append(signals.read()))
        os.kill(os.getpid(), signal.SIGUSR1)
        watcher.wait(1.0)
        assert seen == [[signal.SIGUSR1]]
    finally:
        signals.close()
        for sig, handler in before.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ DirectSpawner reaping

REAPER = """
import os, sys, time
from fastfpm.spawner import DirectSpawner
spawner = DirectSpawner(lambda keep: None)
pids = {}
for code in (3, 5):
    pid = os.fork()
    if pid == 0:
        os._exit(code)
    pids[pid] = code
reported = {}
deadline = time.monotonic() + 10
while len(reported) < 2 and time.monotonic() < deadline:
    for pid, status in spawner.exited():
        reported[pid] = os.WEXITSTATUS(status)
    time.sleep(0.01)
print(reported == pids, list(spawner.exited()))
"""


def test_direct_spawner_reports_each_exited_child_and_then_nothing() -> None:
    # In a process of its own: waitpid(-1) would also reap whatever else the test run started.
    result = subprocess.run([sys.executable, "-c", REAPER], capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.split() == ["True", "[]"], result.stderr


# ------------------------------------------------------------------ Generation


@pytest.fixture
def generation(tmp_path: Path) -> Iterator[Generation]:
    config = from_cli(None, listen=str(tmp_path / "gen.sock"), max_children=2)
    log = ErrorLog(str(tmp_path / "error.log"))
    spawned: list[str] = []
    made = Generation(1, config, log, spawn_worker=lambda pool: bool(spawned.append(pool.name)),
                      process_max_state=pm.ProcessMaxState())
    made.open_pools({}, [])
    yield made
    made.close()


def start_stand_in(generation: Generation, code: str = "import time; time.sleep(60)") -> subprocess.Popen:
    """A real process entered as a worker of the generation's pool."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    if code is STUBBORN:
        assert proc.stdout is not None and proc.stdout.readline() == "up\n"  # SIGQUIT ignored by now
    pool = generation.pools[0]
    pool.children[proc.pid] = Child(proc.pid, 0, pool)
    return proc


def test_a_generation_starts_then_serves(generation: Generation) -> None:
    assert generation.state == STARTING
    assert generation.number == 1 and [p.name for p in generation.pools] == ["www"]
    generation.serve()
    assert generation.state == SERVING


def test_retiring_asks_every_worker_to_finish_with_sigquit(generation: Generation) -> None:
    proc = start_stand_in(generation)
    generation.retire(grace=10)
    assert generation.state == DRAINING
    assert proc.wait(10) == -signal.SIGQUIT
    child = generation.pop_child(proc.pid)
    assert child is not None and child.stopping and not child.killed_by_pm
    assert not generation.alive()


def test_a_failed_generation_terminates_its_workers_and_none_is_replaced(generation: Generation) -> None:
    proc = start_stand_in(generation)
    generation.fail(grace=10)
    assert generation.state == FAILED
    assert proc.wait(10) == -signal.SIGTERM
    child = generation.pop_child(proc.pid)
    assert child is not None and child.killed_by_pm and child.stopping


def test_draining_kills_whoever_is_still_busy_after_the_deadline(generation: Generation) -> None:
    proc = start_stand_in(generation, STUBBORN)
    generation.retire(grace=0.2)
    generation.move_along(time.monotonic())  # before the deadline: SIGQUIT (ignored) at most
    time.sleep(0.3)
    assert proc.poll() is None
    generation.move_along(time.monotonic())
    assert proc.wait(10) == -signal.SIGKILL


def test_a_drained_pool_closes_and_removes_its_socket_file(generation: Generation, tmp_path: Path) -> None:
    generation.retire(grace=10)
    assert (tmp_path / "gen.sock").exists()
    generation.move_along(time.monotonic())
    assert generation.gone() and not (tmp_path / "gen.sock").exists()


def test_a_drained_pool_leaves_a_socket_the_next_generation_serves_on(generation: Generation,
                                                                       tmp_path: Path) -> None:
    successor = Generation(2, generation.config, generation.log, spawn_worker=lambda pool: False,
                           process_max_state=pm.ProcessMaxState())
    successor.open_pools_after(generation, {"www": None})
    try:
        assert successor.pools[0].socket is generation.pools[0].socket
        generation.share_sockets_with(successor)
        generation.retire(grace=10)
        generation.move_along(time.monotonic())
        assert generation.gone()
        assert (tmp_path / "gen.sock").exists() and successor.pools[0].socket.fileno() >= 0
    finally:
        successor.close()
