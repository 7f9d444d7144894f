"""The master process: owns the listen sockets and scoreboards, forks workers, handles signals.

It never touches a request. Signal handlers only enqueue (signal.set_wakeup_fd writes the signal
number into a pipe); the loop reads the pipe and calls handle_<signal>, as gunicorn's arbiter does.
The process manager's decisions come from fastfpm.pm as actions; this module only carries them out.
Log lines follow php-fpm's wording so existing log watchers keep working.

What it runs is a Generation (fastfpm.generation): one configuration's pools, which carries out pm
for them. A reload starts the next beside it and retires the old one once the new one is up, or
rolls back to it. fastfpm.children starts workers through a spawner (fastfpm.spawner), reads their
pipes (fastfpm.stdio) and reports their exits; what follows an exit is decided here (bury).
fastfpm.globals holds what [global] sets up: the error log, the pid file, the systemd link. The loop
sleeps on a Watcher (fastfpm.watcher): the signal pipe, the workers' pipes, ondemand listen sockets,
and the pools' pm.status_listen listeners (fastfpm.statuslisten, held by the generations, with
timers of their own on the Watcher, so they add nothing to next_timeout).
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from typing import Any

from fastfpm import accesslog, handover, pm
from fastfpm.children import Children, describe_exit, signal_name  # noqa: F401  (re-exported, as before)
from fastfpm.config import Config
from fastfpm.generation import QUIT_REPEAT_SECONDS, SERVING, Generation
from fastfpm.globals import Globals, close_log_stream
from fastfpm.log import ErrorLog
from fastfpm.pool import Child, Pool
from fastfpm.proctitle import set_master_title
from fastfpm.watcher import SignalPipe, Watcher
from fastfpm.worker import EXIT_BOOT_ERROR

# What a worker's EXIT_BOOT_ERROR means: the worker logged which step failed just before.
BOOT_FAILED = "a worker could not start: its set-up, the application or on_worker_start failed (see above)"

# Signals the master reacts to; everything else keeps its default action.
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2)
# While ondemand workers are starting, how often the master looks at the accept queue again.
ONDEMAND_RECHECK_SECONDS = 0.02
# Grace between SIGTERM and SIGKILL on a fast stop.
FAST_STOP_GRACE_SECONDS = 1.0


class Master:
    """The arbiter: start a generation of pools, keep them sized as pm decides, reload and stop on signals."""

    def __init__(self, config: Config, log: ErrorLog, *, config_path: str | None = None,
                 cli_options: dict[str, Any] | None = None, identities: dict[str, Any] | None = None,
                 inherited_sockets: list[tuple[str, Any]] | None = None, allow_root: bool = False,
                 prefix: str | None = None) -> None:
        self.watcher = Watcher()
        self.signals = SignalPipe()
        self.watcher.register(self.signals.fd, self.dispatch_signals, on_interrupt=True)
        self.children = Children(self.watcher, lambda: self.log, self.generations,
                                 (self.signals.fd, self.signals.write_fd))
        self.process_max_state = pm.ProcessMaxState()
        self.current = self.new_generation(1, config, log)   # the generation that serves
        # The error log, pid file, systemd link, and how a reload reads the configuration again.
        self.globals = Globals(log, lambda: self.current.config, config_path=config_path, prefix=prefix,
                               cli_options=cli_options or {}, allow_root=allow_root)
        self.previous: Generation | None = None     # during a reload: the one that serves meanwhile
        self.draining: list[Generation] = []        # retired or failed, finishing their workers
        self.stopping: str | None = None  # None, "fast" or "graceful"
        self.stop_deadline: float | None = None
        self.next_quit = 0.0
        self.exit_status = 0
        self.on_ready: Any = None        # called once, when first ready (daemonize's parent waits)
        self.reset_emergency()
        self.next_maintenance = 0.0
        self.next_check = 0.0
        self.respawn_due: set[str] = set()   # pools that lost a worker it did not ask to exit
        self.watched_sockets: dict[int, Any] = {}   # ondemand listen sockets registered for this wait
        try:
            self.current.open_pools(identities or {}, inherited_sockets or [])
        except BaseException:
            self.close()
            raise

    @property
    def log(self) -> ErrorLog:
        """The master's error log, which its workers write through (a reload may replace it)."""
        return self.globals.log

    @property
    def config(self) -> Config:
        """The configuration of the generation that serves."""
        return self.current.config

    @property
    def pools(self) -> list[Pool]:
        """The pools of the generation that serves."""
        return self.current.pools

    @property
    def ready(self) -> bool:
        """True once the current generation's initial workers are up."""
        return self.current.state == SERVING

    def generations(self) -> list[Generation]:
        """Every generation with workers or sockets: current, previous (during a reload), draining."""
        return [self.current, *self.draining, *([self.previous] if self.previous is not None else [])]

    def new_generation(self, number: int, config: Config, log: ErrorLog) -> Generation:
        """A generation whose workers this master starts and whose spawns process.max caps."""
        return Generation(number, config, log, spawn_worker=self.children.spawn_worker,
                          process_max_state=self.process_max_state, watcher=self.watcher)

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Start every pool's workers and run until stopped; returns the process exit status."""
        set_master_title(self.globals.config_path, self.config)
        self.signals.install(HANDLED_SIGNALS)
        self.globals.write_pid_file()
        self.log.notice(f"fpm is running, pid {os.getpid()}")
        self.current.log_pools()
        try:
            self.current.spawn_initial()
            while True:
                self.check_ready()
                if self.stopping and not self.alive():
                    break
                self.wait(self.next_timeout())
                self.respawn()
                now = time.monotonic()
                if not self.stopping and now >= self.next_maintenance:
                    self.next_maintenance = now + pm.MAINTENANCE_INTERVAL
                    self.current.maintain_pools(now)
                if not self.stopping and now >= self.next_check:
                    self.check_timeouts(now)
                self.globals.beat(now, self.pools)
                self.enforce_stop()
        finally:
            self.children.kill_all(signal.SIGKILL)
            self.reap_workers()
            self.close()
            self.globals.remove_pid_file()
        self.log.notice("exiting, bye-bye!")
        return self.exit_status

    def check_ready(self) -> None:
        """Once the current generation's initial workers are up: it serves, the previous one retires."""
        if self.ready or self.stopping or not self.current.all_started():
            return
        self.current.serve()
        self.retire_previous()
        self.log.notice("ready to handle connections")
        self.globals.notify("ready")
        if self.on_ready is not None:
            self.on_ready()
            self.on_ready = None

    def alive(self) -> bool:
        """Any worker of any generation still running."""
        return any(g.alive() for g in self.generations())

    def next_timeout(self) -> float:
        """How long the loop may sleep: until the next maintenance tick or timeout check."""
        if not self.ready:
            return 0.05
        now = time.monotonic()
        wake = self.next_maintenance
        if pm.check_interval(p.config for p in self.pools) is not None:
            wake = min(wake, self.next_check)
        if self.stopping:
            wake = min(wake, now + 0.2)
        beat = self.globals.heartbeat.timeout(now)
        if beat is not None:
            wake = min(wake, now + beat)
        return max(0.0, min(wake - now, 1.0))

    # ------------------------------------------------------------------ waiting

    def wait(self, timeout: float) -> None:
        """Sleep until a signal, worker output or (ondemand) a connection arrives, then handle it."""
        recheck = self.watch_ondemand_sockets()
        if recheck:
            # Workers are starting: a connection they will take keeps the socket readable, so it is
            # not watched (select would spin); the queue is looked at again shortly instead, so a
            # burst larger than the workers starting gets more without waiting for the next second.
            timeout = min(timeout, ONDEMAND_RECHECK_SECONDS)
        self.watcher.wait(timeout)
        for pool in recheck:
            if pool in self.pools and not self.stopping:
                self.current.spawn_for_pending(pool)

    def watch_ondemand_sockets(self) -> list[Pool]:
        """Register the ondemand sockets a connection could fork a worker for (spawn_could_follow);
        return the pools whose queue is to be rechecked instead. Registered anew before each wait,
        after the worker pipes, so their handlers run last."""
        for fd, handler in self.watched_sockets.items():
            self.watcher.unregister(fd, handler)
        self.watched_sockets = {}
        watch, recheck = self.current.ondemand_sockets() if not self.stopping else ([], [])
        for pool in watch:
            handler = partial(self.spawn_for_pending, pool)
            self.watcher.register(pool.socket.fileno(), handler)
            self.watched_sockets[pool.socket.fileno()] = handler
        return recheck

    def spawn_for_pending(self, pool: Pool) -> None:
        """ondemand: a connection arrived on pool's socket (see Generation.spawn_for_pending)."""
        self.current.spawn_for_pending(pool)

    def dispatch_signals(self) -> None:
        """Call handle_<signal> for each signal that arrived (several of one count once)."""
        for signum in self.signals.read():
            handler = getattr(self, f"handle_{signal.Signals(signum).name.lower()}", None)
            if handler is not None:
                handler()

    # ------------------------------------------------------------------ signal handlers

    def handle_sigchld(self) -> None:
        """Reap every exited worker, log how it ended, and replace it as pm says."""
        self.reap_workers()

    def handle_sigterm(self) -> None:
        """Fast stop: workers are terminated at once, in-flight requests are cut."""
        self.fast_stop()

    def handle_sigint(self) -> None:
        """Ctrl-C: a fast stop, as SIGTERM."""
        self.fast_stop()

    def handle_sigquit(self) -> None:
        """Graceful stop: workers finish their current request, then exit."""
        if self.stopping:
            return
        self.log.notice("Finishing ...")
        self.globals.notify("stopping")
        self.stopping = "graceful"
        # As php-fpm: SIGTERM follows after process_control_timeout (0: at once, php-fpm's default).
        handover.drain_queues(self.pools, self.log)  # listen.reuseport: nothing queued is reset
        self.stop_deadline = time.monotonic() + self.config.global_.process_control_timeout
        self.children.kill_all(signal.SIGQUIT)
        self.next_quit = time.monotonic() + QUIT_REPEAT_SECONDS

    def handle_sigusr1(self) -> None:
        """Reopen the error log and the access logs (after logrotate moved them).

        As php-fpm: a file that cannot be opened (its directory is gone, say) is logged, to the old
        file, which stays the log; the server carries on. The lines are php-fpm's, its grammar too.
        """
        try:
            self.log.open()
        except OSError as exc:
            self.log.error(f"failed to open error_log ({self.log.path}): {exc.strerror or exc} "
                           f"({exc.errno})")
            self.log.error("unable to re-opened error log file")
        else:
            self.log.notice("error log file re-opened")
        # php-fpm's fpm_log_open(1): the access logs too, then every worker restarts gracefully
        # to inherit the new descriptor (see fastfpm.accesslog).
        if accesslog.reopen_pools([pool for g in self.generations() for pool in g.pools], self.log):
            self.children.kill_all(signal.SIGQUIT)

    def handle_sigusr2(self) -> None:
        """Reload: re-read the configuration and replace every worker with a new generation."""
        if self.stopping:
            return
        self.log.notice("Reloading in progress ...")
        self.globals.notify("reloading")
        self.reload()

    # ------------------------------------------------------------------ stopping

    def fast_stop(self) -> None:
        """Send SIGTERM to every worker; SIGKILL follows after a grace period."""
        if self.stopping == "fast":
            return
        self.log.notice("Terminating ...")
        self.globals.notify("stopping")
        self.stopping = "fast"
        self.stop_deadline = time.monotonic() + FAST_STOP_GRACE_SECONDS
        self.children.kill_all(signal.SIGTERM)

    def enforce_stop(self) -> None:
        """While stopping: repeat SIGQUIT, and escalate once the deadline has passed."""
        now = time.monotonic()
        self.drain_old_generations(now)
        if not self.stopping:
            return
        if self.stop_deadline is not None and now >= self.stop_deadline:
            if self.stopping == "graceful":
                self.log.warning("process_control_timeout passed; terminating the workers still busy")
                self.fast_stop()
            else:
                self.children.kill_all(signal.SIGKILL)
                self.stop_deadline = None
        elif self.stopping == "graceful" and now >= self.next_quit:
            self.children.kill_all(signal.SIGQUIT)
            self.next_quit = now + QUIT_REPEAT_SECONDS

    # ------------------------------------------------------------------ reload

    def reload(self) -> None:
        """Load the config again; on success the old workers finish and a new generation serves.

        A config with errors is logged and ignored: the running generation keeps serving. The same
        goes for what the start refuses too (workers that would run as root without -R, unknown
        users) and for an error_log that cannot be opened. Sockets whose address is unchanged are
        handed to the new generation, so no connection is refused. [global] changes: apply_globals.
        """
        if self.previous is not None:
            self.log.warning("reload ignored: the previous reload's workers are still starting")
            return
        loaded = self.globals.load_next()
        if loaded is None:
            return
        new_config, identities, new_log = loaded
        new = self.new_generation(self.current.number + 1, new_config, new_log)
        try:
            new.open_pools_after(self.current, identities)
        except (OSError, ValueError) as exc:
            self.log.error(f"reload aborted: {exc}")
            self.globals.notify("ready")
            new.share_sockets_with(self.current)
            new.close(keep_shared=True)
            self.globals.discard_log(new_log)
            return
        # The old generation serves on, beside the new one, until every new worker has loaded the
        # application (retire_previous); if the application cannot be loaded it stays (roll_back).
        # Either way no request meets a pool without workers.
        self.current.share_sockets_with(new)
        old_global = self.config.global_
        self.previous, self.current = self.current, new
        # Before the new workers fork: they inherit the log (and its level) from the master. The
        # old log stays open until the new generation is up, in case the reload is rolled back.
        self.globals.apply_globals(old_global, new_log, close_retired=False)
        self.reset_emergency()
        self.current.log_pools()
        self.current.spawn_initial()
        self.log.notice(f"reloading: generation {self.current.number} starting, generation "
                        f"{self.current.number - 1} serves until it is up")

    def retire_previous(self) -> None:
        """The new generation is up: the previous one finishes its requests and exits."""
        previous, self.previous = self.previous, None
        if previous is None:
            return
        if previous.log is not self.log:
            close_log_stream(previous.log)
        previous.retire(max(self.config.global_.process_control_timeout, FAST_STOP_GRACE_SECONDS))
        self.draining.append(previous)
        self.log.notice(f"reloaded: generation {self.current.number}")

    def roll_back(self, reason: str) -> None:
        """A new generation that cannot start gives way: the previous one, still serving, stays."""
        previous, failed = self.previous, self.current
        assert previous is not None
        self.log.error(f"reload failed: {reason}; generation {previous.number} keeps serving")
        failed.share_sockets_with(previous)
        failed.fail(FAST_STOP_GRACE_SECONDS)
        self.draining.append(failed)
        self.current, self.previous = previous, None
        self.current.serve()
        self.globals.apply_globals(failed.config.global_, previous.log)
        self.reset_emergency()
        self.globals.notify("ready")

    def drain_old_generations(self, now: float) -> None:
        """Move the generations going away along (SIGQUIT repeats, SIGKILL after their deadline);
        forget those whose pools are all closed."""
        for old in list(self.draining):
            old.move_along(now)
            if old.gone():
                self.draining.remove(old)
        # A generation still serving during a reload (self.previous) is not moved along here: a stop
        # treats its workers as it treats the current ones (kill_all reaches every generation), so
        # a graceful stop lets their requests finish within process_control_timeout.

    def reset_emergency(self) -> None:
        """emergency_restart_* as the configuration now in force says, counting from zero."""
        self.emergency = pm.EmergencyRestart(self.config.global_.emergency_restart_threshold,
                                             self.config.global_.emergency_restart_interval)

    # ------------------------------------------------------------------ process management

    def execute(self, pool: Pool, actions: list[Any]) -> None:
        """Carry out pm's actions for one pool of the current generation."""
        self.current.execute(pool, actions)

    def check_timeouts(self, now: float) -> None:
        """request_terminate_timeout and request_slowlog_timeout, at php-fpm's heartbeat."""
        interval = pm.check_interval(p.config for p in self.pools)
        if interval is None:
            self.next_check = now + 3600
            return
        self.next_check = now + interval
        for pool in self.pools:
            self.execute(pool, pm.overdue(pool.snapshot(), pool.config, now, pool.state))

    def reap_workers(self) -> None:
        """Bury every worker that has exited; replace it as pm says."""
        for generation, child, status in self.children.exited():
            self.bury(generation, child, status)

    def bury(self, generation: Generation, child: Child, status: int) -> None:
        """Everything that follows a worker's exit (its last output is read): the log line, a replacement."""
        pool = child.pool
        self.children.log_exit(child, status, bool(self.stopping))
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if self.emergency.record(time.monotonic(), signum) and not self.stopping:
            self.log.warning(self.emergency.message)
            self.reload()
            return
        if self.stopping or generation is not self.current:
            return
        if not os.WIFSIGNALED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR:
            failed = f"[pool {pool.name}] {BOOT_FAILED}"
            if self.previous is not None:
                self.roll_back(failed)
                return
            self.log.alert(f"{failed}; stopping")
            self.exit_status = 1
            self.fast_stop()
            return
        if not child.killed_by_pm:
            self.respawn_due.add(pool.name)

    def respawn(self) -> None:
        """Replace the workers that exited unasked, once signals that came with them are handled.

        A SIGTERM sent to the whole process group (Ctrl-\\, `timeout`, a supervisor) kills the
        workers too, and their SIGCHLD may be read before the master's own SIGTERM: a moment's
        wait for more signals keeps the master from forking workers it is about to stop.
        """
        if not self.respawn_due:
            return
        self.wait(0.02)
        due, self.respawn_due = self.respawn_due, set()
        if self.stopping:
            return
        self.current.respawn(due)

    def close(self) -> None:
        """Release sockets, scoreboards, pipes and the wake-up pipe."""
        self.watcher.unregister(self.signals.fd)
        self.signals.close()
        self.children.close()
        for generation in self.generations():
            generation.close()
        self.previous, self.draining = None, []
