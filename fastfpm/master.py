"""The master process: owns the listen sockets and scoreboards, forks workers, handles signals.

It never touches a request. Signal handlers only enqueue (signal.set_wakeup_fd writes the signal
number into a pipe); the loop reads the pipe and calls handle_<signal>, as gunicorn's arbiter does.
The process manager's decisions come from fastfpm.pm as actions; this module only carries them out.
Log lines follow php-fpm's wording so existing log watchers keep working.

Each worker gets three pipes to the master: its own log lines (already formatted, written whole),
and its stdout and stderr (logged line by line when catch_workers_output is on, else dropped, as
php-fpm does). Only the master writes the error log, so SIGUSR1 (logrotate) reopens one file.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from fastfpm import pm, systemd
from fastfpm.address import parse_address
from fastfpm.config import Config, ConfigError
from fastfpm.log import ErrorLog
from fastfpm.pool import Child, Pool, pending_connections
from fastfpm.slowlog import SLOWLOG_SIGNAL
from fastfpm.worker import EXIT_BOOT_ERROR, run_worker

# Signals the master reacts to; everything else keeps its default action.
HANDLED_SIGNALS = (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1,
                   signal.SIGUSR2)
# How often a graceful stop repeats SIGQUIT: a worker that was between its stop check and its
# wait when the first one came would otherwise sleep until its next connection.
QUIT_REPEAT_SECONDS = 1.0
# While ondemand workers are starting, how often the master looks at the accept queue again.
ONDEMAND_RECHECK_SECONDS = 0.02
# Grace between SIGTERM and SIGKILL on a fast stop.
FAST_STOP_GRACE_SECONDS = 1.0
# [global] directives a reload cannot apply to the running master (php-fpm re-executes itself on
# SIGUSR2, so there they apply): (directive, GlobalConfig attribute). A change is logged as a NOTICE.
RESTART_ONLY_DIRECTIVES = (("rlimit_files", "rlimit_files"), ("rlimit_core", "rlimit_core"),
                           ("process.priority", "process_priority"), ("daemonize", "daemonize"))
# The [global] directives the error log is built from; a reload that changes one opens a new log.
LOG_DIRECTIVES = ("error_log", "log_level", "log_limit", "syslog_ident", "syslog_facility")


def signal_name(signum: int) -> str:
    """SIGSEGV for 11; SIGRTMIN+N for real-time signals, which have no name of their own."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"


def describe_exit(status: int) -> str:
    """How a worker ended, from its waitpid() status, in php-fpm's words (fpm_children_bury)."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        core = " - core dumped" if os.WCOREDUMP(status) else ""
        return f"exited on signal {signum} ({signal_name(signum)}{core})"
    return f"exited with code {os.WEXITSTATUS(status)}"


@dataclass
class Previous:
    """The generation a reload replaces, kept serving until the new one is up (or rolled back to)."""

    pools: list[Pool]
    config: Config
    log: ErrorLog
    generation: int


def close_log_stream(log: ErrorLog) -> None:
    """Close the file an ErrorLog writes to (standard error and syslog stay open)."""
    if log.stream is not sys.stderr:
        try:
            log.stream.close()
        except OSError:
            pass


def shown(value: Any) -> str:
    """A directive's value as the config file would spell it, for log lines."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "unlimited" if value == -1 else str(value)


class Master:
    """The arbiter: start pools, keep them sized as pm decides, reload and stop on signals."""

    def __init__(self, config: Config, log: ErrorLog, *, config_path: str | None = None,
                 cli_options: dict[str, Any] | None = None, identities: dict[str, Any] | None = None,
                 inherited_sockets: list[tuple[str, Any]] | None = None, allow_root: bool = False,
                 prefix: str | None = None) -> None:
        self.config = config
        self.log = log
        self.config_path = config_path
        self.prefix = prefix             # -p, for reading the file again on reload
        self.cli_options = cli_options or {}
        # -R: workers may run as root. Kept for reloads, which apply php-fpm's root rules again.
        self.allow_root = allow_root
        self.pid_path: str | None = None  # the pid file written, removed at exit
        self.generation = 1
        self.pools: list[Pool] = []
        self.draining: list[Pool] = []   # pools of an older generation, finishing their requests
        self.previous: Previous | None = None  # during a reload: the generation that serves meanwhile
        self.stopping: str | None = None  # None, "fast" or "graceful"
        self.stop_deadline: float | None = None
        self.next_quit = 0.0
        self.exit_status = 0
        self.ready = False
        self.on_ready: Any = None        # called once, when first ready (daemonize's parent waits)
        self.process_max_state = pm.ProcessMaxState()
        self.emergency = pm.EmergencyRestart(config.global_.emergency_restart_threshold,
                                             config.global_.emergency_restart_interval)
        self.next_maintenance = 0.0
        self.next_check = 0.0
        self.pipes: dict[int, Child] = {}
        self.respawn_due: set[str] = set()   # pools that lost a worker it did not ask to exit
        # systemd: READY/RELOADING/STOPPING, STATUS= lines every systemd_interval, watchdog pings.
        self.notifier = systemd.Notifier.from_environ(unset=True)
        self.watchdog = systemd.watchdog_interval(unset=True) if self.notifier else None
        self.heartbeat = systemd.Heartbeat(config.global_.systemd_interval if self.notifier else 0,
                                           self.watchdog, time.monotonic())
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            inherited = [sock for _, sock in inherited_sockets or []]
            for pool_config in config.pools:
                sock = systemd.match_socket(inherited, pool_config.listen) if inherited else None
                if sock is not None:
                    inherited.remove(sock)
                    log.notice(f"[pool {pool_config.name}] using the socket systemd passed for "
                               f"{pool_config.listen}")
                self.pools.append(Pool(pool_config, log, self.generation, sock=sock,
                                       identity=(identities or {}).get(pool_config.name),
                                       inherited=sock is not None))
            for sock in inherited:
                log.warning(f"no pool listens on the socket systemd passed as fd {sock.fileno()}; closing it")
                sock.close()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ life cycle

    def run(self) -> int:
        """Start every pool's workers and run until stopped; returns the process exit status."""
        self.install_signals()
        self.write_pid_file()
        self.log.notice(f"fpm is running, pid {os.getpid()}")
        self.log_pools()
        try:
            self.spawn_initial(self.pools)
            while True:
                if not self.ready and not self.stopping and all(p.all_started() for p in self.pools):
                    self.ready = True
                    self.retire_previous()
                    self.log.notice("ready to handle connections")
                    self.notify("ready")
                    if self.on_ready is not None:
                        self.on_ready()
                        self.on_ready = None
                if self.stopping and not self.alive():
                    break
                self.wait(self.next_timeout())
                self.respawn()
                now = time.monotonic()
                if not self.stopping and now >= self.next_maintenance:
                    self.next_maintenance = now + pm.MAINTENANCE_INTERVAL
                    self.maintain_pools(now)
                if not self.stopping and now >= self.next_check:
                    self.check_timeouts(now)
                self.beat(now)
                self.enforce_stop()
        finally:
            self.kill_all(signal.SIGKILL)
            self.reap_workers()
            self.close()
            self.remove_pid_file()
        self.log.notice("exiting, bye-bye!")
        return self.exit_status

    def log_pools(self) -> None:
        """At debug level, what each pool listens on and how it is managed (at start and reload)."""
        for pool in self.pools:
            self.log.debug(f"[pool {pool.name}] listening on {pool.address}, pm {pool.config.pm}, "
                           f"pm.max_children {pool.config.pm_max_children}")

    def alive(self) -> bool:
        """Any worker of any generation still running."""
        return any(p.children for p in self.pools + self.draining)

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
        beat = self.heartbeat.timeout(now)
        if beat is not None:
            wake = min(wake, now + beat)
        return max(0.0, min(wake - now, 1.0))

    def notify(self, what: str) -> None:
        """Tell systemd (when it started us with NOTIFY_SOCKET) that we are ready, reloading or stopping."""
        if self.notifier is None:
            return
        sent = getattr(self.notifier, what)()
        if not sent:
            self.log.warning(f"could not notify systemd ({what}): {self.notifier.last_error}")

    def beat(self, now: float) -> None:
        """systemd_interval status lines and watchdog pings, when due."""
        if self.notifier is None or not self.heartbeat.enabled:
            return
        slots = [p.scoreboard.read(c.slot) for p in self.pools for c in p.children.values()]
        due = self.heartbeat.beat(now, active=sum(1 for s in slots if s.busy),
                                  idle=sum(1 for s in slots if s.stage_name == "Idle"),
                                  requests=sum(s.requests for s in slots),
                                  slow=sum(p.state.slow_requests for p in self.pools))
        if due and not self.notifier.notify(*due):
            self.log.warning(f"could not notify systemd: {self.notifier.last_error}")

    def install_signals(self) -> None:
        """Route signals into the wake-up pipe; the handlers themselves do nothing."""
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def wait(self, timeout: float) -> None:
        """Sleep until a signal, worker output or (ondemand) a connection arrives, then handle it."""
        watched_pools: dict[int, Pool] = {}
        recheck: list[Pool] = []
        for pool in self.pools:
            could = self.spawn_could_follow(pool)
            if could == "watch":
                watched_pools[pool.socket.fileno()] = pool
            elif could == "recheck":
                recheck.append(pool)
        if recheck:
            # Workers are starting: a connection they will take keeps the socket readable, so it is
            # not watched (select would spin); the queue is looked at again shortly instead, so a
            # burst larger than the workers starting gets more without waiting for the next second.
            timeout = min(timeout, ONDEMAND_RECHECK_SECONDS)
        watched = [self.wake_r, *self.pipes, *watched_pools]
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            readable = [self.wake_r]
        for fd in readable:
            if fd == self.wake_r:
                self.dispatch_signals()
            elif fd in self.pipes:
                self.read_worker_output(fd)
            elif fd in watched_pools:
                self.spawn_for_pending(watched_pools[fd])
        for pool in recheck:
            if pool in self.pools and not self.stopping:
                self.spawn_for_pending(pool)

    def spawn_for_pending(self, pool: Pool) -> None:
        """ondemand: fork for the connections in the accept queue that no idle or starting worker takes.

        php-fpm forks one child per readiness event, so a burst of connections is served one new
        child at a time; the queue's length lets fastfpm fork for the whole burst at once.
        """
        pending = pending_connections(pool.socket)
        if pending:
            actions = pm.on_connection_pending(pool.snapshot(), pool.config, pool.state, pending)
            self.execute(pool, self.cap({pool.name: actions})[pool.name])

    def spawn_could_follow(self, pool: Pool) -> str | None:
        """Whether a connection waiting on this ondemand pool's socket could fork a worker now.

        "watch": no worker idle or starting and room to spawn, so the socket is watched. select() is
        level-triggered: a connection left waiting for a busy full pool would wake the loop again at
        once, forever (php-fpm registers the socket edge-triggered instead). "recheck": workers are
        starting and there is room; the queue is checked every ONDEMAND_RECHECK_SECONDS meanwhile.
        None: nothing to do. Nobody waits on a full pool unseen: maintain_pools looks at its socket
        once a second for the max_children warning.
        """
        if pool.config.pm != "ondemand" or self.stopping:
            return None
        snapshot = pool.snapshot()
        if snapshot.idle or snapshot.total >= pool.config.pm_max_children:
            return None
        process_max = self.config.global_.process_max
        if process_max > 0 and self.total_workers() >= process_max:
            return None
        return "recheck" if snapshot.starting else "watch"

    def dispatch_signals(self) -> None:
        """Call handle_<signal> for each signal that arrived (several of one count once)."""
        try:
            data = os.read(self.wake_r, 256)
        except BlockingIOError:
            return
        for signum in dict.fromkeys(data):
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
        self.notify("stopping")
        self.stopping = "graceful"
        # As php-fpm: SIGTERM follows after process_control_timeout (0: at once, php-fpm's default).
        self.stop_deadline = time.monotonic() + self.config.global_.process_control_timeout
        self.kill_all(signal.SIGQUIT)
        self.next_quit = time.monotonic() + QUIT_REPEAT_SECONDS

    def handle_sigusr1(self) -> None:
        """Reopen the error log (after logrotate moved it); workers write through the master.

        As php-fpm: a file that cannot be opened (its directory is gone, say) is logged, to the old
        file, which stays the log; the server carries on. The lines are php-fpm's, its grammar too.
        """
        try:
            self.log.open()
        except OSError as exc:
            self.log.error(f"failed to open error_log ({self.log.path}): {exc.strerror or exc} "
                           f"({exc.errno})")
            self.log.error("unable to re-opened error log file")
            return
        self.log.notice("error log file re-opened")

    def handle_sigusr2(self) -> None:
        """Reload: re-read the configuration and replace every worker with a new generation."""
        if self.stopping:
            return
        self.log.notice("Reloading in progress ...")
        self.notify("reloading")
        self.reload()

    # ------------------------------------------------------------------ stopping

    def fast_stop(self) -> None:
        """Send SIGTERM to every worker; SIGKILL follows after a grace period."""
        if self.stopping == "fast":
            return
        self.log.notice("Terminating ...")
        self.notify("stopping")
        self.stopping = "fast"
        self.stop_deadline = time.monotonic() + FAST_STOP_GRACE_SECONDS
        self.kill_all(signal.SIGTERM)

    def enforce_stop(self) -> None:
        """While stopping: repeat SIGQUIT, and escalate once the deadline has passed."""
        now = time.monotonic()
        for pool in self.draining:
            self.drain(pool, now)
        if not self.stopping:
            return
        if self.stop_deadline is not None and now >= self.stop_deadline:
            if self.stopping == "graceful":
                self.log.warning("process_control_timeout passed; terminating the workers still busy")
                self.fast_stop()
            else:
                self.kill_all(signal.SIGKILL)
                self.stop_deadline = None
        elif self.stopping == "graceful" and now >= self.next_quit:
            self.kill_all(signal.SIGQUIT)
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
        new_config = self.reread_config() if self.config_path is not None else self.config
        if new_config is None:
            return
        identities = self.check_identities(new_config)
        if identities is None:
            return
        new_log = self.open_log(new_config.global_)
        if new_log is None:
            return
        self.generation += 1
        sockets = {str(p.address): p for p in self.pools}
        new_pools = []
        try:
            for pool_config in new_config.pools:
                old = sockets.pop(str(parse_address(pool_config.listen)), None)
                new_pools.append(Pool(pool_config, new_log, self.generation,
                                      sock=old.socket if old is not None else None,
                                      identity=identities[pool_config.name],
                                      inherited=old is not None and old.inherited))
        except (OSError, ValueError) as exc:
            self.log.error(f"reload aborted: {exc}")
            self.notify("ready")
            for pool in new_pools:
                pool.close(keep_socket=pool.socket in [p.socket for p in self.pools])
            self.generation -= 1
            self.discard_log(new_log)
            return
        reused = {id(p.socket) for p in new_pools}
        for pool in self.pools:
            # The old generation serves on, beside the new one, until every new worker has
            # loaded the application (retire_previous); if the application cannot be loaded it
            # stays (roll_back). Either way no request meets a pool without workers.
            pool.keep_socket = id(pool.socket) in reused
            self.draining.append(pool)
        self.previous = Previous(self.pools, self.config, self.log, self.generation - 1)
        old_global = self.config.global_
        self.config = new_config
        self.pools = new_pools
        # Before the new workers fork: they inherit the log (and its level) from the master. The
        # old log stays open until the new generation is up, in case the reload is rolled back.
        self.apply_globals(old_global, new_log, close_retired=False)
        self.emergency = pm.EmergencyRestart(new_config.global_.emergency_restart_threshold,
                                             new_config.global_.emergency_restart_interval)
        self.ready = False   # "ready" again once this generation's initial workers are up
        self.log_pools()
        self.spawn_initial(self.pools)
        self.log.notice(f"reloading: generation {self.generation} starting, generation "
                        f"{self.generation - 1} serves until it is up")

    def retire_previous(self) -> None:
        """The new generation is up: the previous one finishes its requests and exits."""
        previous, self.previous = self.previous, None
        if previous is None:
            return
        if previous.log is not self.log:
            close_log_stream(previous.log)
        grace = max(self.config.global_.process_control_timeout, FAST_STOP_GRACE_SECONDS)
        for pool in previous.pools:
            self.start_draining(pool, signal.SIGQUIT, grace)
        self.log.notice(f"reloaded: generation {self.generation}")

    def start_draining(self, pool: Pool, sig: int, grace: float) -> None:
        """Tell a pool of the generation going away to stop (sig), SIGKILL whoever is left after grace."""
        now = time.monotonic()
        for child in pool.children.values():
            child.stopping = True
            self.signal_child(child, sig)
        pool.drain_deadline = now + grace
        pool.next_quit = now + QUIT_REPEAT_SECONDS

    def roll_back(self, reason: str) -> None:
        """A new generation that cannot start gives way: the previous one, still serving, stays."""
        previous, self.previous = self.previous, None
        assert previous is not None
        failed_pools, failed_config = self.pools, self.config
        self.log.error(f"reload failed: {reason}; generation {previous.generation} keeps serving")
        kept = {id(p.socket) for p in previous.pools}
        for pool in previous.pools:
            self.draining.remove(pool)
        for pool in failed_pools:
            pool.keep_socket = id(pool.socket) in kept
            for child in pool.children.values():
                child.killed_by_pm = True
            self.start_draining(pool, signal.SIGTERM, FAST_STOP_GRACE_SECONDS)
            self.draining.append(pool)
        self.pools = previous.pools
        self.config = previous.config
        self.generation = previous.generation
        self.apply_globals(failed_config.global_, previous.log)
        self.emergency = pm.EmergencyRestart(self.config.global_.emergency_restart_threshold,
                                             self.config.global_.emergency_restart_interval)
        self.ready = True
        self.notify("ready")

    def abort_reload(self, problems: list[str]) -> None:
        """Log why a reload cannot go ahead; the running generation keeps serving."""
        for problem in problems:
            self.log.error(problem)
        self.log.error("reload aborted: the configuration has errors; still serving the old one")
        self.notify("ready")

    def reread_config(self) -> Config | None:
        """The configuration file as it is now, with the command line's flags on top; None on errors."""
        from fastfpm import config as config_module

        assert self.config_path is not None
        try:
            new_config = config_module.load(self.config_path, prefix=self.prefix)
            if self.cli_options:
                config_module.check(config_module.apply_options(new_config, self.cli_options))
        except (ConfigError, OSError) as exc:
            self.abort_reload(exc.errors if isinstance(exc, ConfigError) else [str(exc)])
            return None
        for warning in new_config.warnings:
            self.log.warning(warning)
        return new_config

    def check_identities(self, config: Config) -> dict[str, Any] | None:
        """Each pool's user and group looked up, and php-fpm's root rules applied, as at start.

        None (the reload aborted) when a user is unknown or workers would run as root without -R.
        """
        from fastfpm.process import resolve_identities

        identities, problems, notices = resolve_identities(config.pools, self.allow_root)
        for level, message in notices:
            self.log.log(level, message)
        if problems:
            self.abort_reload(problems)
            return None
        return identities

    def open_log(self, new: Any) -> ErrorLog | None:
        """The error log a reloaded [global] asks for: the running one when nothing about it changed.

        A new destination is opened before anything else changes, so one that cannot be opened
        aborts the reload (None) and the old log stays.
        """
        old = self.config.global_
        if all(getattr(old, name) == getattr(new, name) for name in LOG_DIRECTIVES):
            return self.log
        try:
            return ErrorLog(new.error_log, new.log_level, new.log_limit, syslog_ident=new.syslog_ident,
                            syslog_facility=new.syslog_facility)
        except OSError as exc:
            self.abort_reload([f"failed to open error_log ({new.error_log}): {exc.strerror or exc}"])
            return None

    def discard_log(self, log: ErrorLog) -> None:
        """Close a log opened for a reload that did not happen."""
        if log is self.log:
            return
        close_log_stream(log)
        if self.log.path == "syslog":
            self.log.open()  # the new log's openlog() replaced the running one's ident and facility

    def apply_globals(self, old: Any, new_log: ErrorLog, close_retired: bool = True) -> None:
        """Carry a reload's [global] changes over to the running master.

        php-fpm re-executes itself on SIGUSR2, so every directive applies there. Here the log
        (error_log, log_level, log_limit, syslog.*), pid, systemd_interval and what the master
        reads as it goes (process.max, process_control_timeout, emergency_restart_*) apply; those
        set once for the process (RESTART_ONLY_DIRECTIVES) need a restart, and a change is logged.
        """
        g = self.config.global_
        if new_log is not self.log:
            retired, self.log = self.log, new_log
            if close_retired:
                close_log_stream(retired)
            if retired.path == "syslog" and new_log.path != "syslog":
                import syslog

                syslog.closelog()
        if g.pid or old.pid:
            self.move_pid_file(g.pid)
        if self.notifier is not None and g.systemd_interval != old.systemd_interval:
            previous = self.heartbeat
            self.heartbeat = systemd.Heartbeat(g.systemd_interval, self.watchdog, time.monotonic())
            # WatchdogSec= is systemd's, not the config's: its schedule goes on as it was.
            self.heartbeat.next_watchdog = previous.next_watchdog
        for directive, attr in RESTART_ONLY_DIRECTIVES:
            before, after = getattr(old, attr), getattr(g, attr)
            if before != after:
                self.log.notice(f"'{directive}' changed ({shown(before)} -> {shown(after)}); a reload "
                                f"does not apply it, restart fastfpm for that")

    def drain(self, pool: Pool, now: float) -> None:
        """Move an old generation along: SIGQUIT again each second, SIGKILL after the timeout."""
        if self.previous is not None and pool in self.previous.pools and not self.stopping:
            return  # still serving: the new generation is not up yet
        if not pool.children:
            self.draining.remove(pool)
            pool.close(keep_socket=pool.keep_socket)
            return
        if now >= pool.drain_deadline:
            for child in pool.children.values():
                self.signal_child(child, signal.SIGKILL)
        elif now >= pool.next_quit:
            pool.next_quit = now + QUIT_REPEAT_SECONDS
            for child in pool.children.values():
                self.signal_child(child, signal.SIGQUIT)

    # ------------------------------------------------------------------ process management

    def spawn_initial(self, pools: list[Pool]) -> None:
        """Start each pool's initial workers (pm.start_servers, max_children, or none)."""
        wanted = {p.name: [pm.Spawn(p.initial)] if p.initial else [] for p in pools}
        capped = self.cap(wanted)
        for pool in pools:
            actions = capped.get(pool.name, [])
            # What process.max left is what "ready" waits for.
            pool.initial = sum(a.n for a in actions if isinstance(a, pm.Spawn))
            self.execute(pool, actions)

    def total_workers(self) -> int:
        """Workers alive in every pool of the current generation (what process.max caps).

        An older generation still finishing its requests after a reload is not counted: the
        scoreboards have room for two generations, and counting it would leave the new one without
        workers until the old requests end. So during a drain the total may briefly reach twice
        process.max (php-fpm never has two generations: it waits for the old one, then re-executes).
        """
        return sum(len(p.children) for p in self.pools)

    def cap(self, actions: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """pm's actions with the spawns process.max leaves no room for cut (and warned about once)."""
        return pm.cap_spawns(actions, self.total_workers(), self.config.global_.process_max,
                             self.process_max_state)

    def maintain_pools(self, now: float) -> None:
        """The once-a-second idle-server maintenance of every pool."""
        actions = {p.name: pm.decide(p.snapshot(), p.config, p.state, now) for p in self.pools}
        for pool in self.pools:
            # An ondemand pool whose socket wait() leaves alone (see spawn_could_follow) may have
            # connections waiting: pm says whether that means a warning (or, with room again, a spawn).
            if pool.config.pm == "ondemand" and not self.spawn_could_follow(pool):
                pending = pending_connections(pool.socket)
                if pending:
                    actions[pool.name] += pm.on_connection_pending(pool.snapshot(), pool.config, pool.state,
                                                                   pending)
        capped = self.cap(actions)
        for pool in self.pools:
            self.execute(pool, capped.get(pool.name, []))
            pool.scoreboard.header.max_children_reached = pool.state.max_children_reached

    def check_timeouts(self, now: float) -> None:
        """request_terminate_timeout and request_slowlog_timeout, at php-fpm's heartbeat."""
        interval = pm.check_interval(p.config for p in self.pools)
        if interval is None:
            self.next_check = now + 3600
            return
        self.next_check = now + interval
        for pool in self.pools:
            self.execute(pool, pm.overdue(pool.snapshot(), pool.config, now, pool.state))
            pool.scoreboard.header.slow_requests = pool.state.slow_requests

    def execute(self, pool: Pool, actions: list[Any]) -> None:
        """Carry out pm's actions for one pool."""
        for action in actions:
            if isinstance(action, pm.Spawn):
                for _ in range(action.n):
                    if not self.spawn_worker(pool):
                        break
            elif isinstance(action, pm.Kill):
                child = self.find_child(pool, action.pid)
                if child is not None:
                    child.stopping = child.killed_by_pm = True
                    self.signal_child(child, signal.SIGQUIT)
            elif isinstance(action, pm.Warn):
                self.log.warning(action.message)
            elif isinstance(action, pm.Terminate):
                child = self.find_child(pool, action.pid)
                if child is not None:
                    self.log.warning(action.message)
                    child.stopping = True
                    self.signal_child(child, signal.SIGKILL if action.force else signal.SIGTERM)
            elif isinstance(action, pm.SlowlogDump):
                child = self.find_child(pool, action.pid)
                if child is not None:
                    self.log.warning(action.message)
                    self.signal_child(child, SLOWLOG_SIGNAL)

    @staticmethod
    def find_child(pool: Pool, pid: int) -> Child | None:
        """The pool's child with this pid, if still alive."""
        return pool.children.get(pid)

    def spawn_worker(self, pool: Pool) -> bool:
        """Fork one worker into a free scoreboard slot, with its log and output pipes."""
        slot = pool.scoreboard.free_index()
        if slot is None:
            self.log.error(f"[pool {pool.name}] no free scoreboard slot; not spawning")
            return False
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in range(3)]  # log, stdout, stderr
        # The slot is claimed before fork: a quick child may write "Idle" before the parent runs
        # again, and claiming afterwards would overwrite that with "Starting" for good.
        pool.scoreboard.claim(slot, 0, pool.generation)
        keep_in_child = {pool.socket.fileno(), *(w for _, w in pipes)}
        # Block signals across fork so none reaches the child before it has reset its handlers.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        try:
            pid = os.fork()
            if pid == 0:
                self.close_in_child(keep_in_child)
                run_worker(pool.config, pool.socket.fileno(), pool.scoreboard.mapping, slot,
                           self.log, log_fd=pipes[0][1], stdout_fd=pipes[1][1], stderr_fd=pipes[2][1],
                           identity=pool.identity)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        pool.scoreboard.set_pid(slot, pid)
        child = Child(pid, slot, pool)
        for (read_fd, write_fd), kind in zip(pipes, ("log", "stdout", "stderr"), strict=True):
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            child.pipes[read_fd] = kind
            self.pipes[read_fd] = child
        pool.children[pid] = child
        self.log.notice(f"[pool {pool.name}] child {pid} started")
        return True

    def close_in_child(self, keep: set[int]) -> None:
        """In a new child: close the master's descriptors the worker must not hold."""
        for fd in (self.wake_r, self.wake_w, *self.pipes):
            os.close(fd)
        for pool in self.pools + self.draining:
            if pool.socket.fileno() not in keep:
                pool.socket.close()

    def reap_workers(self) -> None:
        """waitpid() every exited child; log its end as php-fpm does; replace it as pm says."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for pool in self.pools + self.draining:
                child = pool.children.pop(pid, None)
                if child is not None:
                    self.bury(pool, child, status)
                    break

    def bury(self, pool: Pool, child: Child, status: int) -> None:
        """Everything that follows a worker's exit: its last output, the log line, a replacement."""
        for fd in list(child.pipes):
            self.read_worker_output(fd, final=True)
        pool.scoreboard.release(child.slot)
        self.log_exit(pool, child, status)
        signum = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        if self.emergency.record(time.monotonic(), signum) and not self.stopping:
            self.log.warning(self.emergency.message)
            self.reload()
            return
        if self.stopping or pool in self.draining:
            return
        if not os.WIFSIGNALED(status) and os.WEXITSTATUS(status) == EXIT_BOOT_ERROR:
            if self.previous is not None:
                self.roll_back(f"[pool {pool.name}] the application could not be loaded (see above)")
                return
            self.log.alert(f"[pool {pool.name}] the application could not be loaded (see above); stopping")
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
        for pool in self.pools:
            if pool.name in due:
                actions = pm.on_worker_exit(pool.snapshot(), pool.config, killed_by_pm=False)
                self.execute(pool, self.cap({pool.name: actions})[pool.name])

    def log_exit(self, pool: Pool, child: Child, status: int) -> None:
        """One line per ended worker, as php-fpm's fpm_children_bury writes it."""
        uptime = time.monotonic() - child.started
        if os.WIFSIGNALED(status):
            expected = (self.stopping or child.stopping) and os.WTERMSIG(status) in (signal.SIGTERM,
                                                                                     signal.SIGKILL)
        else:
            expected = os.WEXITSTATUS(status) == 0
        self.log.log("notice" if expected else "warning",
                     f"[pool {pool.name}] child {child.pid} {describe_exit(status)} "
                     f"after {uptime:.6f} seconds from start")

    def read_worker_output(self, fd: int, final: bool = False) -> None:
        """Pass a worker's log lines through, and its stdout/stderr lines as catch_workers_output says."""
        child = self.pipes.get(fd)
        if child is None:
            return
        kind = child.pipes[fd]
        chunks = [child.partial.pop(fd, b"")]
        eof = False
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not data:
                eof = True
                break
            chunks.append(data)
            if not final:
                break
        data = b"".join(chunks)
        lines = data.split(b"\n")
        rest = lines.pop()
        # A partial line waits for its end up to log_limit; longer, it is logged in pieces.
        if rest and not (eof or final) and len(rest) < self.log.limit:
            child.partial[fd] = rest
        elif rest:
            lines.append(rest)
        pool = child.pool
        for line in lines:
            text = line.decode("utf-8", "backslashreplace")
            if kind == "log":
                self.log.write_line(text)
            elif pool.config.catch_workers_output:
                if pool.config.decorate_workers_output:
                    self.log.child_said(pool.name, child.pid, kind, text)
                else:
                    self.log.write_line(text)
        if eof or final:
            del self.pipes[fd]
            del child.pipes[fd]
            os.close(fd)

    def signal_child(self, child: Child, sig: int) -> None:
        """kill() one worker; one that is already gone is no error."""
        try:
            os.kill(child.pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def kill_all(self, sig: int) -> None:
        """Send sig to every live worker of every pool and generation."""
        for pool in self.pools + self.draining:
            for child in pool.children.values():
                self.signal_child(child, sig)

    # ------------------------------------------------------------------ files

    def write_pid_file(self) -> None:
        """php-fpm's pid directive: the master's pid, for init scripts and logrotate."""
        path = self.config.global_.pid
        if path:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.pid_path = path

    def move_pid_file(self, path: str | None) -> None:
        """After a reload: write the pid file the new config names, then remove the old one.

        A new file that cannot be written is an error in the log; the old one stays (it still names
        the right process) and is the one removed at exit.
        """
        if path:
            try:
                with open(path, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                self.log.error(f"unable to write the pid file ({path}): {exc.strerror or exc}; "
                               f"keeping {self.pid_path or 'none'}")
                return
        if self.pid_path and self.pid_path != path:
            self.remove_pid_file()
        self.pid_path = path

    def remove_pid_file(self) -> None:
        """Remove the pid file (at exit, or when a reload moved it)."""
        if self.pid_path:
            try:
                os.unlink(self.pid_path)
            except OSError:
                pass
            self.pid_path = None

    def close(self) -> None:
        """Release sockets, scoreboards, pipes and the wake-up pipe."""
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w, *self.pipes):
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipes.clear()
        for pool in self.pools + self.draining:
            pool.close()
        self.pools, self.draining = [], []
