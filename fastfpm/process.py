"""What a worker does to its own process right after fork, and what the master does to itself at start.

php-fpm's fpm_unix.c and fpm_env.c: who the workers run as, their resource limits, nice value, working
directory and environment. (listen.allowed_clients, php-fpm's fcgi_is_allowed, is in fastfpm.address.)

The public API:

    resolve_identity(pool) -> Identity | None        master, at config time: user/group to uid/gid/groups
    check_root(pool, identity, allow_root) -> [Notice]  master, at config time: php-fpm's root rules
    prepare_master(global_) -> [Notice]              master, at start: rlimits and process.priority
    prepare_worker(pool, identity) -> [Notice]       worker, right after fork, before importing the app
    watch_master(master_pid) -> bool                 worker, after prepare_worker: stop when the master dies

A Notice is (level, message) with a level fastfpm.log knows ("error", "warning", "notice"); what the
caller does with it is the caller's business (log it; an "error" from check_root means: do not start).
Failures that must stop the process raise SetupError, with the message to log.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = [
    "Notice", "SetupError", "Identity", "resolve_identity", "check_root", "prepare_master",
    "prepare_worker", "worker_environ", "watch_master",
]


class Notice(NamedTuple):
    """Something to log: level is a fastfpm.log level name, message the line (with its [pool x])."""

    level: str
    message: str


class SetupError(Exception):
    """Setting up the process failed in a way php-fpm treats as fatal; str() is the message to log."""


@dataclass(frozen=True)
class Identity:
    """Who a pool's workers run as, resolved in the master (no user database lookups after fork).

    user and home are the account's name and home directory when the user database knows the uid
    (they become USER and HOME in the workers' environment), else None.
    """

    uid: int
    gid: int
    groups: tuple[int, ...]  # the supplementary groups: the user's memberships, plus gid
    user: str | None = None
    home: str | None = None

    @property
    def is_root(self) -> bool:
        """Whether workers with this identity would have root's uid or gid (what php-fpm refuses)."""
        return self.uid == 0 or self.gid == 0


# ---------------------------------------------------------------------------------------------------
# In the master, at config time

def _euid(euid: int | None) -> int:
    return os.geteuid() if euid is None else euid


def resolve_identity(pool: Any, *, euid: int | None = None) -> Identity | None:
    """The uid, gid and supplementary groups pool's `user` and `group` name, looked up now.

    Returns None when the workers keep the master's identity: neither user nor group is set, or the
    master does not run as root (euid, default os.geteuid(), is not 0), where php-fpm ignores both
    (check_root says so). As php-fpm, user and group are names or numeric ids, and the group defaults
    to the user's primary group; the supplementary groups are the user's memberships (initgroups).
    With a group and no user, the workers stay root with that group (refused unless allow_root).

    Raises ValueError with a `[pool NAME] ...` message for a user or group this machine does not know.
    Where php-fpm differs: a numeric user the user database knows gets its name, home and primary group
    (php-fpm uses the bare uid with gid 0 and refuses it); an unknown numeric uid needs a group.
    """
    user_text, group_text = pool.user or "", pool.group or ""
    if _euid(euid) != 0 or not (user_text or group_text):
        return None
    label = f"[pool {pool.name}]"
    entry: pwd.struct_passwd | None
    if user_text.isdigit():
        uid = int(user_text)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
            if not group_text:
                raise ValueError(f"{label} user {uid} has no entry in the user database, so it has no "
                                 f"primary group: set 'group' as well") from None
    elif user_text:
        try:
            entry = pwd.getpwnam(user_text)
        except KeyError:
            raise ValueError(f"{label} cannot get uid for user '{user_text}': no such user") from None
        uid = entry.pw_uid
    else:  # a group alone: the workers stay the master's user (root), with that group
        uid = 0
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
    gid = entry.pw_gid if entry is not None else -1
    if group_text.isdigit():
        gid = int(group_text)
    elif group_text:
        try:
            gid = grp.getgrnam(group_text).gr_gid
        except KeyError:
            raise ValueError(f"{label} cannot get gid for group '{group_text}': no such group") from None
    if entry is not None:
        groups = tuple(os.getgrouplist(entry.pw_name, gid))
        return Identity(uid, gid, groups, entry.pw_name, entry.pw_dir)
    return Identity(uid, gid, (gid,))


def check_root(pool: Any, identity: Identity | None, allow_root: bool, *,
               euid: int | None = None) -> list[Notice]:
    """php-fpm's rules for who workers may run as (fpm_unix_conf_wp), as notices.

    Master running as root (euid, default os.geteuid(), is 0): workers that would keep uid or gid 0
    (no user set, or user or group root) are refused with an "error" notice, php-fpm's
    "[pool NAME] please specify user and group other than root", unless allow_root (php-fpm's -R,
    fastfpm's --allow-to-run-as-root). Master not root: user, group and process.priority cannot be
    applied; each one set gets php-fpm's "... directive is ignored ..." at level "notice".
    An empty list means nothing to say.
    """
    label = f"[pool {pool.name}]"
    if _euid(euid) == 0:
        if not allow_root and (identity is None or identity.is_root):
            return [Notice("error", f"{label} please specify user and group other than root")]
        return []
    notices = []
    for directive, value in (("user", pool.user), ("group", pool.group),
                             ("process.priority", pool.process_priority)):
        if value not in (None, ""):
            notices.append(Notice("notice", f"{label} '{directive}' directive is ignored when fastfpm is "
                                            f"not running as root"))
    return notices


def resolve_identities(pools: Iterable[Any], allow_root: bool) -> tuple[dict[str, Identity | None],
                                                                          list[str], list[Notice]]:
    """Every pool's worker identity, what stops the workers from starting, and notices besides.

    resolve_identity and check_root over all pools, as serve, its configuration test and a reload
    all need them: problems (an unknown user, workers as root without -R) are messages that stop
    the start or the reload; notices ("user is ignored when not root") are only for the log.
    """
    identities: dict[str, Identity | None] = {}
    problems: list[str] = []
    notices: list[Notice] = []
    for pool in pools:
        try:
            identities[pool.name] = resolve_identity(pool)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        for notice in check_root(pool, identities[pool.name], allow_root):
            if notice.level == "error":
                problems.append(f"{notice.message}, or pass --allow-to-run-as-root (-R) to run the "
                                f"workers as root")
            else:
                notices.append(notice)
    return identities, problems, notices


# ---------------------------------------------------------------------------------------------------
# Resource limits and the nice value

def _limit(value: int) -> int:
    return resource.RLIM_INFINITY if value == -1 else value


def _set_rlimit(which: int, value: int) -> str | None:
    """Set the soft and hard limit to value (-1: unlimited), as php-fpm does; the error text, or None."""
    try:
        resource.setrlimit(which, (_limit(value), _limit(value)))
    except (ValueError, OSError) as exc:
        return str(exc)
    return None


def _rlimits(target: Any) -> list[tuple[str, int, int]]:
    """(directive, resource, value) for the rlimits target sets."""
    wanted = [("rlimit_files", resource.RLIMIT_NOFILE, target.rlimit_files),
              ("rlimit_core", resource.RLIMIT_CORE, target.rlimit_core)]
    return [(name, which, value) for name, which, value in wanted if value is not None]


def _shown(value: int) -> str:
    return "unlimited" if value == -1 else str(value)


def prepare_master(global_: Any, *, euid: int | None = None) -> list[Notice]:
    """Apply [global] rlimit_files, rlimit_core and process.priority to the calling (master) process.

    As php-fpm (fpm_unix_init_main): both limits set soft and hard; a limit that cannot be set stops the
    start (SetupError). process.priority is applied when running as root (failure: SetupError), and
    ignored with a notice otherwise. Workers inherit all three unless their pool sets its own.
    Where fastfpm differs: rlimit_core = 0 is applied (no core files); php-fpm treats 0 as unset.
    """
    for name, which, value in _rlimits(global_):
        problem = _set_rlimit(which, value)
        if problem:
            raise SetupError(f"failed to set {name} = {_shown(value)} for the master: {problem}. Check "
                             f"the system limits (ulimit -H, fs.nr_open) or lower {name}")
    notices = []
    if global_.process_priority is not None:
        if _euid(euid) != 0:
            notices.append(Notice("notice", "'process.priority' directive is ignored when fastfpm is not "
                                            "running as root"))
        else:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, global_.process_priority)
            except OSError as exc:
                raise SetupError(f"unable to set priority {global_.process_priority} for the master "
                                 f"process: {exc.strerror}") from None
    return notices


# ---------------------------------------------------------------------------------------------------
# In a worker, right after fork

def worker_environ(pool: Any, identity: Identity | None, master_environ: Mapping[str, str], *,
                   euid: int | None = None) -> dict[str, str]:
    """The environment pool's workers get (fpm_env_init_child).

    clear_env = yes: only env[...]; no: master_environ with env[...] over it. Then, as php-fpm, USER and
    HOME name the account the workers run as, unless env[USER] / env[HOME] set them: the pool's user
    (identity), or, when the master is not root, the master's own account. A root master without a
    pool user (allow_root) sets neither. `env[X] = $Y` was already taken from the master's environment
    when the configuration was read (fastfpm.config), as php-fpm does at start.
    """
    environ = {} if pool.clear_env else dict(master_environ)
    environ.update(pool.env)
    user = home = None
    if identity is not None:
        user, home = identity.user, identity.home
    elif _euid(euid) != 0:
        try:
            entry = pwd.getpwuid(os.getuid())
        except KeyError:
            pass
        else:
            user, home = entry.pw_name, entry.pw_dir
    if user is not None and "USER" not in pool.env:
        environ["USER"] = user
    if home is not None and "HOME" not in pool.env:
        environ["HOME"] = home
    return environ


def _find_libc() -> Any:
    """The C library through ctypes (errno kept), loaded once in the master: after a worker drops
    privileges it may no longer be able to read the interpreter's files to import ctypes."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


_libc = _find_libc()
_clearenv = getattr(_libc, "clearenv", None)  # without it, os.environ.clear() is all
_prctl = getattr(_libc, "prctl", None)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _clear_c_environ() -> None:
    """Empty the C library's environment, including entries os.environ never saw.

    Libraries may setenv() behind Python's back (ncurses puts LINES and COLUMNS there, for one), and
    subprocesses would inherit those; clearenv() removes them all.
    """
    if _clearenv is not None:
        _clearenv()


def _replace_environ(target: Mapping[str, str]) -> None:
    """Make os.environ and the C environment (which child processes inherit) exactly target."""
    target = dict(target)  # target may be os.environ itself
    os.environ.clear()
    _clear_c_environ()
    os.environ.update(target)


def _drop_privileges(label: str, identity: Identity) -> None:
    """Supplementary groups, then gid, then uid; and make sure root cannot be taken back."""
    steps: list[tuple[str, Callable[[], None]]] = [
        (f"setgroups({list(identity.groups)})", lambda: os.setgroups(list(identity.groups))),
        (f"setgid({identity.gid})", lambda: os.setgid(identity.gid)),
        (f"setuid({identity.uid})", lambda: os.setuid(identity.uid)),
    ]
    for what, step in steps:
        try:
            step()
        except OSError as exc:
            raise SetupError(f"{label} failed to {what}: {exc.strerror}") from None
    if identity.uid != 0:
        # setuid() as root sets the real, effective and saved uid, so there is no way back; check it,
        # since a worker that could become root again must not run the application.
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise SetupError(f"{label} could switch back to root after setuid({identity.uid}); refusing "
                             f"to run the application")


def prepare_worker(pool: Any, identity: Identity | None, *,
                   master_environ: Mapping[str, str] = os.environ, euid: int | None = None) -> list[Notice]:
    """Set up a freshly forked worker of pool, before the app is imported (fpm_unix_init_child).

    In php-fpm's order: rlimit_files and rlimit_core (soft and hard; -1 is unlimited; a failure is a
    "warning" notice and the worker goes on, as php-fpm), chdir (failure: SetupError), and when running
    as root (euid, default os.geteuid()): process.priority, then the identity from resolve_identity:
    setgroups, setgid, setuid, checked to be irreversible (failure: SetupError). Last, os.environ is
    replaced in place by worker_environ(), so the app and its subprocesses see it.
    Returns the notices to log. Where fastfpm differs: rlimit_core = 0 is applied (php-fpm: unset);
    the supplementary groups are set even when only a group is configured.
    """
    label = f"[pool {pool.name}]"
    root = _euid(euid) == 0
    notices = []
    for name, which, value in _rlimits(pool):
        problem = _set_rlimit(which, value)
        if problem:
            notices.append(Notice("warning", f"{label} failed to set {name} = {_shown(value)}: {problem}. "
                                             f"Check the system limits or lower {name}"))
    if pool.chdir:
        try:
            os.chdir(pool.chdir)
        except OSError as exc:
            raise SetupError(f"{label} failed to chdir({pool.chdir}): {exc.strerror}") from None
    if root and pool.process_priority is not None:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, pool.process_priority)
        except OSError as exc:
            raise SetupError(f"{label} unable to set priority {pool.process_priority} for this new "
                             f"process: {exc.strerror}") from None
    if identity is not None:
        _drop_privileges(label, identity)
    _replace_environ(worker_environ(pool, identity, master_environ, euid=euid))
    return notices


def watch_master(master_pid: int, sig: int = signal.SIGQUIT) -> bool:
    """Have the kernel send this worker sig the moment the master dies (PR_SET_PDEATHSIG); False when
    the master is gone already.

    SIGQUIT is the worker's graceful stop: the request in hand is finished, then it exits, instead
    of serving on with nobody to respawn, time out or reload it (a worker looking for its parent
    only when idle served 9,000 more requests under load). Call it after prepare_worker: a change
    of uid or gid clears the setting. The signal comes when the thread that forked the worker ends,
    which is the master's only thread. Checking getppid() after it closes the race of a master
    that died before: no signal would come then. Without prctl (not Linux) only the loop's own
    getppid() checks when idle remain.
    """
    if _prctl is not None and _prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        import ctypes  # loaded by _find_libc already

        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == master_pid
