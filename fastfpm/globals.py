"""What [global] sets up in the running master, and what a reload does to it (php-fpm's fpm_conf
global part, with fpm_systemd): the error log, the pid file, systemd's notifications and heartbeat,
and reading the configuration file again.

php-fpm re-executes itself on SIGUSR2, so every [global] directive applies there; here a reload
carries over what the running master can change (apply_globals) and names what needs a restart.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from fastfpm import systemd
from fastfpm.config import Config, ConfigError
from fastfpm.log import ErrorLog
from fastfpm.pool import Pool

# [global] directives a reload cannot apply to the running master (php-fpm re-executes itself on
# SIGUSR2, so there they apply): (directive, GlobalConfig attribute). A change is logged as a NOTICE.
RESTART_ONLY_DIRECTIVES = (("rlimit_files", "rlimit_files"), ("rlimit_core", "rlimit_core"),
                           ("process.priority", "process_priority"), ("daemonize", "daemonize"))


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


class Globals:
    """The master's error log, pid file and systemd link, and where a reload reads its config."""

    def __init__(self, log: ErrorLog, running: Callable[[], Config], *, config_path: str | None,
                 prefix: str | None, cli_options: dict[str, Any], allow_root: bool) -> None:
        self.log = log
        self.running = running           # the configuration in force (the current generation's)
        self.config_path = config_path
        self.prefix = prefix             # -p, for reading the file again on reload
        self.cli_options = cli_options
        # -R: workers may run as root. Kept for reloads, which apply php-fpm's root rules again.
        self.allow_root = allow_root
        self.pid_path: str | None = None  # the pid file written, removed at exit
        # systemd: READY/RELOADING/STOPPING, STATUS= lines every systemd_interval, watchdog pings.
        self.notifier = systemd.Notifier.from_environ(unset=True)
        self.watchdog = systemd.watchdog_interval(unset=True) if self.notifier else None
        self.heartbeat = systemd.Heartbeat(self.config.global_.systemd_interval if self.notifier else 0,
                                           self.watchdog, time.monotonic())

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.running()

    # ------------------------------------------------------------------ systemd

    def notify(self, what: str) -> None:
        """Tell systemd (when it started us with NOTIFY_SOCKET) that we are ready, reloading or stopping."""
        if self.notifier is None:
            return
        sent = getattr(self.notifier, what)()
        if not sent:
            self.log.warning(f"could not notify systemd ({what}): {self.notifier.last_error}")

    def beat(self, now: float, pools: list[Pool]) -> None:
        """systemd_interval status lines and watchdog pings, when due."""
        if self.notifier is None or not self.heartbeat.enabled:
            return
        # The status page's counters: requests include those of recycled workers, so the rate
        # systemd shows does not dip each time pm.max_requests replaces one.
        counters = [p.scoreboard.counters() for p in pools]
        due = self.heartbeat.beat(now, active=sum(c.active_processes for c in counters),
                                  idle=sum(c.idle_processes for c in counters),
                                  requests=sum(c.requests for c in counters),
                                  slow=sum(c.slow_requests for c in counters))
        if due and not self.notifier.notify(*due):
            self.log.warning(f"could not notify systemd: {self.notifier.last_error}")

    # ------------------------------------------------------------------ reload

    def load_next(self) -> tuple[Config, dict[str, Any], ErrorLog] | None:
        """For a reload: the configuration (read again when it came from a file), the pools' users and
        the error log it asks for; None when the reload is aborted (the reasons are logged)."""
        new_config = self.reread_config() if self.config_path is not None else self.config
        if new_config is None:
            return None
        identities = self.check_identities(new_config)
        if identities is None:
            return None
        new_log = self.open_log(new_config.global_)
        if new_log is None:
            return None
        return new_config, identities, new_log

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

    def abort_reload(self, problems: list[str]) -> None:
        """Log why a reload cannot go ahead; the running generation keeps serving."""
        for problem in problems:
            self.log.error(problem)
        self.log.error("reload aborted: the configuration has errors; still serving the old one")
        self.notify("ready")

    def open_log(self, new: Any) -> ErrorLog | None:
        """The error log a reloaded [global] asks for: the running one when nothing about it changed.

        A new destination is opened before anything else changes, so one that cannot be opened
        aborts the reload (None) and the old log stays.
        """
        old = self.config.global_
        if all(getattr(old, name) == getattr(new, name) for name in ErrorLog.GLOBAL_SETTINGS):
            return self.log
        try:
            return ErrorLog.from_global(new)
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

    # ------------------------------------------------------------------ pid file

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
