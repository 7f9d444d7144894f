"""preload = yes: a template process per pool and generation imports the application once, then forks
the pool's workers when the master asks (copy-on-write), as gunicorn's preload_app does, but anew at
each reload so new code is loaded.

The master must still reap every worker and know its pid. The template therefore creates each worker
with clone(CLONE_PARENT | SIGCHLD): the worker is the master's child, not the template's, so the
master's waitpid(-1) reaps it as it reaps a directly forked one, its getppid() is the master's (what
the worker's loop and PR_SET_PDEATHSIG watch), and the template only sends its pid back. (The
alternative, PR_SET_CHILD_SUBREAPER and a double fork, costs a second fork per worker and leaves a
moment in which the worker is nobody's child that the master knows of.) The worker's pipes to the
master are made by the master, as for a direct fork, and their write ends passed with the request
(SCM_RIGHTS), so fastfpm.stdio reads them unchanged.

The template is the master's child too, so its exit also comes through waitpid(-1): PreloadSpawner
takes it out of what it reports. A template that dies is logged as an error and the next spawn starts
a new one; one that cannot get ready (its app import fails, it hangs) leaves the pool to direct forks
for the rest of its generation, whose workers then fail to import the app the usual way (the master
stops, a reload rolls back: fastfpm.master bury).
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from fastfpm.log import ErrorLog
from fastfpm.pool import Child, Pool
from fastfpm.process import watch_master
from fastfpm.proctitle import PREFIX, set_title
from fastfpm.spawner import PIPE_KINDS, DirectSpawner
from fastfpm.stdio import WorkerOutput
from fastfpm.worker import (
    load_or_exit,
    prepare_or_exit,
    redirect_output,
    reset_signals,
    run_worker,
    set_accept_timeout,
)

# How long the master waits for a new template to import the application (it waits blocked: the
# running workers serve on meanwhile, the master's own loop pauses), and for a worker's pid.
TEMPLATE_READY_TIMEOUT = 30.0
FORK_REPLY_TIMEOUT = 5.0
READY = b"ready"

CLONE_PARENT = 0x00008000
SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())  # asm/unistd.h

# PyDLL keeps the GIL across the call, as os.fork() does: nothing else runs between the hooks.
_libc = ctypes.PyDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_py = ctypes.pythonapi


def clone_parent() -> int:
    """fork(), but the child's parent is this process's parent: 0 in the child, its pid here.

    A raw clone() system call, with Python's own fork hooks around it (PyOS_BeforeFork and
    PyOS_AfterFork_*, which run os.register_at_fork callbacks and reset the interpreter's locks in
    the child). The child's exit signal is this process's own (the kernel copies the group leader's
    exit_signal under CLONE_PARENT): SIGCHLD to the master. glibc's fork handlers do not run;
    the template is single-threaded, so there is no lock another thread could hold.
    """
    if SYS_CLONE is None:
        raise OSError(f"clone(CLONE_PARENT) is not wired for {platform.machine()}")
    _py.PyOS_BeforeFork()
    pid = _syscall(ctypes.c_long(SYS_CLONE), ctypes.c_ulong(CLONE_PARENT | signal.SIGCHLD),
                   ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_void_p(0), ctypes.c_ulong(0))
    if pid == 0:
        _py.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _py.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"clone(CLONE_PARENT): {os.strerror(err)}")
    return pid


def template_title(pool_name: str, generation: int) -> str:
    """The template's process title."""
    suffix = f" (generation {generation})" if generation > 1 else ""
    return f"{PREFIX}pool {pool_name} template{suffix}"


def run_template(pool: Pool, control: socket.socket, log: ErrorLog, *, log_fd: int, stdout_fd: int,
                 stderr_fd: int, master_pid: int) -> NoReturn:
    """The template's life: set up as a worker would be (user, rlimits, chdir, env), import the app
    and hooks, say "ready", then fork a worker per request until the master closes the socket."""
    config = pool.config
    # SIGQUIT is a worker's graceful stop, SIGTERM its fast one: the template has neither. A stop
    # sent to the whole process group is the master's to act on (it ends the template with SIGKILL);
    # each worker sets its own handlers again after the fork.
    reset_signals(signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    set_title(template_title(pool.name, pool.generation))
    log.for_worker(pool.name, log_fd)
    log.prefix = f"[pool {pool.name}] template {os.getpid()}: "
    redirect_output(config, stdout_fd, stderr_fd)
    prepare_or_exit(config, pool.identity, log)
    if not watch_master(master_pid, signal.SIGKILL):
        os._exit(0)
    app, hooks = load_or_exit(config, log)
    set_accept_timeout(pool.socket.fileno())  # on the socket itself: every worker has it
    # What the workers share stays shared only if nothing writes to it: the collector's passes write
    # into every tracked object's header, so the objects imported so far are moved out of its sight.
    gc.collect()
    gc.freeze()
    control.sendall(READY)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 64, len(PIPE_KINDS) + 1)
        except InterruptedError:
            continue
        if not message:
            os._exit(0)  # the master closed its end: this generation's pool is gone
        slot = int(message)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        try:
            pid = clone_parent()
        except OSError as exc:  # EAGAIN (RLIMIT_NPROC, pid_max), ENOMEM: the master forks directly
            log.error(f"cannot fork a worker: {exc}")
            pid = -1
        if pid == 0:
            control.close()
            os.close(log_fd)
            if len(fds) > len(PIPE_KINDS):
                # The master's access.log as it is now: SIGUSR1 reopens it onto the master's
                # descriptor, which the template's copy (inherited at its fork) does not follow.
                received = fds.pop()
                os.dup2(received, pool.access_log_fd, inheritable=False)
                os.close(received)
            run_worker(config, pool.socket.fileno(), pool.scoreboard.mapping, slot, log,
                       log_fd=fds[0], stdout_fd=fds[1], stderr_fd=fds[2], identity=pool.identity,
                       access_log_fd=pool.access_log_fd, master_pid=master_pid, preloaded=(app, hooks))
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        for fd in fds:
            os.close(fd)
        control.sendall(str(pid).encode() if pid > 0 else b"error")


class Template:
    """The master's side of one pool's template: its pid, control socket, and what it logs."""

    def __init__(self, pool: Pool, child: Child, control: socket.socket) -> None:
        self.pool = pool
        self.child = child      # for its log pipes (fastfpm.stdio); never in pool.children
        self.control = control
        self.ready = False

    @property
    def pid(self) -> int:
        return self.child.pid

    def receive(self, timeout: float) -> bytes:
        """One reply; b"" when the template is gone or does not answer in time."""
        self.control.settimeout(timeout)
        try:
            return self.control.recv(64)
        except (TimeoutError, OSError):
            return b""

    def fork(self, slot: int, pipes: list[tuple[int, int]]) -> int | None:
        """Ask for a worker in slot, with the write ends of its pipes (and the pool's access log);
        its pid, or None."""
        fds = [w for _, w in pipes]
        if self.pool.access_log_fd >= 0:
            fds.append(self.pool.access_log_fd)
        try:
            socket.send_fds(self.control, [str(slot).encode()], fds)
        except OSError:
            return None
        reply = self.receive(FORK_REPLY_TIMEOUT)
        return int(reply) if reply.isdigit() else None

    def close(self, kill: bool = True) -> None:
        """End the template: closing the socket ends its loop; SIGKILL in case it is not in it
        (kill=False once it is reaped: its pid may be another process's by then)."""
        self.control.close()
        if kill:
            self.child.signal(signal.SIGKILL)


class PreloadSpawner:
    """DirectSpawner's verbs (start, exited), with a template per preload pool of the current
    generation; pools without preload are forked directly, as before."""

    def __init__(self, close_in_child: Callable[[set[int]], None], output: WorkerOutput,
                 generations: Callable[[], list[Any]]) -> None:
        self.master_close_in_child = close_in_child
        self.direct = DirectSpawner(self.close_in_child)
        self.output = output
        self.generations = generations   # the master's, the current one first
        self.templates: dict[int, Template] = {}    # id(pool) -> its live template
        self.by_pid: dict[int, Template] = {}       # every template not yet reaped
        self.direct_only: dict[int, Pool] = {}      # id(pool) -> pool whose template failed (held,
        # so that its id is not reused by a new pool while the entry lives)

    def close_in_child(self, keep: set[int]) -> None:
        """In a new child of the master: the templates' sockets go too."""
        for template in self.templates.values():
            if template.control.fileno() not in keep:
                template.control.close()
        self.master_close_in_child(keep)

    def start(self, pool: Pool, slot: int, log: ErrorLog) -> tuple[int, dict[int, str]]:
        """A worker for pool's slot: from the pool's template with preload (started if need be), else
        (or when the template cannot answer) forked directly. Its pid and pipes' read ends."""
        self.prune(log)
        if not pool.config.preload or id(pool) in self.direct_only:
            return self.direct.start(pool, slot, log)
        template = self.templates.get(id(pool)) or self.start_template(pool, log)
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in PIPE_KINDS]
        pid = template.fork(slot, pipes) if template is not None else None
        if pid is None:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            if template is not None:
                log.error(f"[pool {pool.name}] template {template.pid} did not fork a worker; "
                          "starting a new template for the next one")
                self.forget(template)
            return self.direct.start(pool, slot, log)
        return pid, self.read_ends(pipes)

    @staticmethod
    def read_ends(pipes: list[tuple[int, int]]) -> dict[int, str]:
        """Close the write ends (the worker's now); the read ends, non-blocking, by kind."""
        read_ends = {}
        for (read_fd, write_fd), kind in zip(pipes, PIPE_KINDS, strict=True):
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            read_ends[read_fd] = kind
        return read_ends

    def start_template(self, pool: Pool, log: ErrorLog) -> Template | None:
        """Fork pool's template and wait until it has imported the app; None (and direct forks for
        this pool from now on) if it cannot."""
        master_end, template_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pipes = [os.pipe2(os.O_CLOEXEC) for _ in PIPE_KINDS]
        keep = {pool.socket.fileno(), pool.access_log_fd, template_end.fileno(), *(w for _, w in pipes)}
        if pool.wake is not None:
            keep.add(pool.wake.write_fd)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals))
        master_pid = os.getpid()
        started = time.monotonic()
        try:
            pid = os.fork()
            if pid == 0:
                master_end.close()
                for read_fd, _ in pipes:  # the master's ends: its workers would inherit them
                    os.close(read_fd)
                self.close_in_child(keep)
                run_template(pool, template_end, log, log_fd=pipes[0][1], stdout_fd=pipes[1][1],
                             stderr_fd=pipes[2][1], master_pid=master_pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        template_end.close()
        child = Child(pid, -1, pool)
        self.output.add(child, self.read_ends(pipes))
        template = Template(pool, child, master_end)
        self.by_pid[pid] = template
        if template.receive(TEMPLATE_READY_TIMEOUT) != READY:
            log.error(f"[pool {pool.name}] template {pid} could not load the application; "
                      "its workers are forked directly, without preload, until the next reload")
            template.close()
            self.direct_only[id(pool)] = pool
            return None
        template.ready = True
        self.templates[id(pool)] = template
        log.notice(f"[pool {pool.name}] template {pid} loaded the application in "
                   f"{time.monotonic() - started:.3f} seconds")
        return template

    def forget(self, template: Template, kill: bool = True) -> None:
        """No more workers from this template (ended now unless kill is False: it is reaped)."""
        if self.templates.get(id(template.pool)) is template:
            del self.templates[id(template.pool)]
        template.close(kill)

    def prune(self, log: ErrorLog) -> None:
        """End the templates whose generation is gone: an older generation's pool without workers
        (or closed). A previous generation still serving during a reload keeps its template, so a
        reload rolled back respawns from the code it runs, not from what is on disk now."""
        generations = self.generations()
        current = {id(pool) for pool in generations[0].pools} if generations else set()
        live = {id(pool) for g in generations[1:] for pool in g.pools if pool.children}
        for key, template in list(self.templates.items()):
            if key not in current and key not in live:
                log.notice(f"[pool {template.pool.name}] template {template.pid} of generation "
                           f"{template.pool.generation} ends: its generation no longer starts workers")
                self.forget(template)
        self.direct_only = {key: pool for key, pool in self.direct_only.items() if key in current | live}

    def exited(self, log: ErrorLog) -> Iterator[tuple[int, int]]:
        """The workers' exits, as DirectSpawner reports them; a template's own exit is logged here."""
        for pid, status in self.direct.exited():
            template = self.by_pid.pop(pid, None)
            if template is None:
                yield pid, status
                continue
            from fastfpm.children import describe_exit  # children imports this module

            self.output.read_last(template.child)
            if self.templates.get(id(template.pool)) is template:
                log.error(f"[pool {template.pool.name}] template {pid} {describe_exit(status)}; "
                          "the next worker starts a new one")
                self.forget(template, kill=False)
            else:
                log.notice(f"[pool {template.pool.name}] template {pid} {describe_exit(status)}")
        self.prune(log)

    def close(self) -> None:
        """The master is exiting: end every template and reap it."""
        for template in list(self.by_pid.values()):
            template.close()
        for pid in list(self.by_pid):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            self.output.read_last(self.by_pid.pop(pid).child)
        self.templates.clear()
