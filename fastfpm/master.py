"""The master process: owns the listen sockets and scoreboards, forks workers, handles signals.

It never touches a request. Signal handlers only enqueue (signal.set_wakeup_fd writes the signal
number into a pipe); the loop reads the pipe and calls handle_<signal>, as gunicorn's arbiter does.
Log lines follow php-fpm's wording so existing log watchers keep working.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from fastfpm.address import create_listen_socket, parse_address
from fastfpm.log import ErrorLog
from fastfpm.scoreboard import STAGE_STARTING, Scoreboard
from fastfpm.worker import EXIT_BOOT_ERROR, run_worker

# Signals the master reacts to; everything else keeps its default action.
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
# How often a graceful stop repeats SIGQUIT: a worker that was between its stop check and
# accept() when the first one came would otherwise sleep in accept() until the next connection.
QUIT_REPEAT_SECONDS = 1.0
# Grace between SIGTERM and SIGKILL on a fast stop, when process_control_timeout is not longer.
FAST_STOP_GRACE_SECONDS = 1.0


@dataclass
class Child:
    """What the master knows of one worker it forked."""

    pid: int
    slot: int
    started: float = field(default_factory=time.monotonic)


class Pool:
    """One pool: its config, listen socket, scoreboard and live workers."""

    def __init__(self, config: Any, log: ErrorLog) -> None:
        self.config = config
        self.name: str = config.name
        self.log = log
        self.address = parse_address(config.listen)
        self.socket = create_listen_socket(self.address, backlog=config.listen_backlog,
                                           mode=config.listen_mode)
        self.scoreboard = Scoreboard(config.pm_max_children, config.name)
        self.children: dict[int, Child] = {}

    def wanted(self) -> int:
        """How many workers should be alive (static pool: pm.max_children)."""
        return self.config.pm_max_children

    def close(self) -> None:
        """Close the listen socket and remove a unix socket file (at exit)."""
        self.socket.close()
        if self.address.path:
            try:
                os.unlink(self.address.path)
            except OSError:
                pass


class Master:
    """The arbiter: start pools, keep them at size, stop on signals."""

    def __init__(self, pool_configs: list[Any], log: ErrorLog, *,
                 process_control_timeout: float = 0.0) -> None:
        self.log = log
        self.process_control_timeout = process_control_timeout
        self.pools: list[Pool] = []
        self.stopping: str | None = None  # None, "fast" or "graceful"
        self.stop_deadline: float | None = None
        self.next_quit: float = 0.0
        self.exit_status = 0
        self.ready = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            for config in pool_configs:
                self.pools.append(Pool(config, log))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Start every pool's workers and run until stopped; returns the process exit status."""
        self.install_signals()
        self.log.notice(f"fpm is running, pid {os.getpid()}")
        try:
            for pool in self.pools:
                self.log.debug(f"[pool {pool.name}] listening on {pool.address}")
                self.maintain(pool)
            while True:
                if not self.ready and not self.stopping and self.all_started():
                    self.ready = True
                    self.log.notice("ready to handle connections")
                if self.stopping and not any(pool.children for pool in self.pools):
                    break
                self.wait_for_signal(0.05 if not self.ready else 1.0)
                self.enforce_stop()
        finally:
            self.kill_all(signal.SIGKILL)
            self.close()
        self.log.notice("exiting, bye-bye!")
        return self.exit_status

    def all_started(self) -> bool:
        """True once every worker has imported its app and reached accept()."""
        for pool in self.pools:
            if len(pool.children) < pool.wanted():
                return False
            for child in pool.children.values():
                if pool.scoreboard.read(child.slot).stage == STAGE_STARTING:
                    return False
        return True

    def install_signals(self) -> None:
        """Route signals into the wake-up pipe; the handlers themselves do nothing."""
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def wait_for_signal(self, timeout: float) -> None:
        """Sleep until a signal arrives or timeout passes, then dispatch what arrived."""
        try:
            readable, _, _ = select.select([self.wake_r], [], [], timeout)
        except InterruptedError:
            readable = [self.wake_r]
        if not readable:
            return
        try:
            data = os.read(self.wake_r, 256)
        except BlockingIOError:
            return
        # Several of one signal while we slept are one event to handle.
        for signum in dict.fromkeys(data):
            name = signal.Signals(signum).name
            handler = getattr(self, f"handle_{name.lower()}", None)
            if handler is not None:
                handler()

    # ------------------------------------------------------------------ signal handlers

    def handle_sigchld(self) -> None:
        """Reap every exited worker, log how it ended, and replace it unless stopping."""
        self.reap_workers()
        if not self.stopping:
            for pool in self.pools:
                self.maintain(pool)

    def handle_sigterm(self) -> None:
        """Fast stop: workers are terminated at once, in-flight requests are cut."""
        self.fast_stop("Terminating ...")

    def handle_sigint(self) -> None:
        """Ctrl-C: a fast stop, as SIGTERM."""
        self.fast_stop("Terminating ...")

    def handle_sigquit(self) -> None:
        """Graceful stop: workers finish their current request, then exit."""
        if self.stopping:
            return
        self.log.notice("Finishing ...")
        self.stopping = "graceful"
        if self.process_control_timeout > 0:
            self.stop_deadline = time.monotonic() + self.process_control_timeout
        self.kill_all(signal.SIGQUIT)
        self.next_quit = time.monotonic() + QUIT_REPEAT_SECONDS

    def fast_stop(self, message: str) -> None:
        """Send SIGTERM to every worker; SIGKILL follows after a grace period."""
        if self.stopping == "fast":
            return
        self.log.notice(message)
        self.stopping = "fast"
        self.stop_deadline = time.monotonic() + max(FAST_STOP_GRACE_SECONDS, self.process_control_timeout)
        self.kill_all(signal.SIGTERM)

    def enforce_stop(self) -> None:
        """While stopping: repeat SIGQUIT, and escalate once the deadline has passed."""
        if not self.stopping:
            return
        now = time.monotonic()
        if self.stop_deadline is not None and now >= self.stop_deadline:
            if self.stopping == "graceful":
                self.log.warning("process_control_timeout passed; terminating the workers still busy")
                self.fast_stop("Terminating ...")
            else:
                self.kill_all(signal.SIGKILL)
                self.stop_deadline = None
        elif self.stopping == "graceful" and now >= self.next_quit:
            self.kill_all(signal.SIGQUIT)
            self.next_quit = now + QUIT_REPEAT_SECONDS

    # ------------------------------------------------------------------ workers

    def maintain(self, pool: Pool) -> None:
        """Bring the pool up to the number of workers it should have."""
        while len(pool.children) < pool.wanted() and not self.stopping:
            self.spawn_worker(pool)

    def spawn_worker(self, pool: Pool) -> None:
        """Fork one worker into a free scoreboard slot."""
        slot = pool.scoreboard.free_index()
        if slot is None:
            self.log.error(f"[pool {pool.name}] no free scoreboard slot; not spawning")
            return
        close_in_child = (self.wake_r, self.wake_w, *(p.socket.fileno() for p in self.pools if p is not pool))
        # The slot is claimed before fork: a quick child may write "Idle" before the parent runs
        # again, and claiming afterwards would overwrite that with "Starting" for good.
        pool.scoreboard.claim(slot, 0)
        # Block signals across fork so none reaches the child before it has reset its handlers.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        try:
            pid = os.fork()
            if pid == 0:
                run_worker(pool.config, pool.socket.fileno(), pool.scoreboard.mapping, slot, self.log,
                           close_in_child)
            pool.scoreboard.set_pid(slot, pid)
            pool.children[pid] = Child(pid, slot)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.log.notice(f"[pool {pool.name}] child {pid} started")

    def reap_workers(self) -> None:
        """waitpid() every exited child; log its end as php-fpm does."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pool in self.pools:
                child = pool.children.pop(pid, None)
                if child is not None:
                    pool.scoreboard.release(child.slot)
                    self.log_exit(pool, child, status)
                    break

    def log_exit(self, pool: Pool, child: Child, status: int) -> None:
        """One line per ended worker; a worker that could not load the app stops the master."""
        uptime = time.monotonic() - child.started
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            expected = self.stopping and signum in (signal.SIGTERM, signal.SIGKILL)
            level = "notice" if expected else "warning"
            self.log.log(level, f"[pool {pool.name}] child {child.pid} exited on signal {signum} "
                                f"({signal.Signals(signum).name}) after {uptime:.6f} seconds from start")
            return
        code = os.WEXITSTATUS(status)
        level = "notice" if code == 0 else "warning"
        self.log.log(level, f"[pool {pool.name}] child {child.pid} exited with code {code} "
                            f"after {uptime:.6f} seconds from start")
        if code == EXIT_BOOT_ERROR and not self.stopping:
            self.log.alert(f"[pool {pool.name}] the application could not be loaded (see above); stopping")
            self.exit_status = 1
            self.fast_stop("Terminating ...")

    def kill_all(self, sig: int) -> None:
        """Send sig to every live worker of every pool."""
        for pool in self.pools:
            for pid in list(pool.children):
                try:
                    os.kill(pid, sig)
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise

    def close(self) -> None:
        """Release sockets, scoreboards and the wake-up pipe."""
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        for pool in self.pools:
            pool.close()
