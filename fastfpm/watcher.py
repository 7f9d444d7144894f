"""What the master sleeps on: file descriptors, each with the handler that reads it (php-fpm's fpm_events).

The wake-up pipe (signals), the workers' output pipes, the ondemand listen sockets and the status
listeners (fastfpm.statuslisten) register here; so can anything else the master comes to serve (a
template process). The master loop calls wait(), which sleeps until one is readable or the timeout
passes, then calls the handlers of the readable ones. Like fpm_events, it also knows writability
(a status answer the peer has not taken yet) and timers (a connection's deadline): a timer shortens
the sleep, so whoever sets one need not tell the master's next_timeout. Signals reach it through a
SignalPipe (php-fpm's fpm_signals does the same).
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable

Handler = Callable[[], None]
Deadline = Callable[[], float | None]   # the next time.monotonic() a timer is due at, None: none
Expire = Callable[[float], None]        # called with the time once it is due


class Watcher:
    """A registry of file descriptors and the handlers to call when they become readable (or
    writable), and of timers."""

    def __init__(self) -> None:
        self.handlers: dict[int, Handler] = {}
        self.writers: dict[int, Handler] = {}
        self.on_interrupt: set[int] = set()
        self.timers: dict[Deadline, Expire] = {}

    def register(self, fd: int, handler: Handler, *, on_interrupt: bool = False) -> None:
        """Call handler when fd is readable (and, with on_interrupt, when a signal cut the sleep short)."""
        self.handlers[fd] = handler
        if on_interrupt:
            self.on_interrupt.add(fd)

    def unregister(self, fd: int, handler: Handler | None = None) -> None:
        """Stop watching fd (one that is not watched is no error); with handler, only if fd is
        still registered with that one (the fd may have been closed and its number reused)."""
        if handler is not None and self.handlers.get(fd) is not handler:
            return
        self.handlers.pop(fd, None)
        self.on_interrupt.discard(fd)

    def register_writable(self, fd: int, handler: Handler) -> None:
        """Call handler when fd is writable (until unregister_writable)."""
        self.writers[fd] = handler

    def unregister_writable(self, fd: int, handler: Handler | None = None) -> None:
        """Stop watching fd for writability (with handler: only if it is still that one's)."""
        if handler is None or self.writers.get(fd) is handler:
            self.writers.pop(fd, None)

    def add_timer(self, deadline: Deadline, expire: Expire) -> None:
        """After each wait, call expire(now) if deadline() has passed; wait never sleeps past it."""
        self.timers[deadline] = expire

    def remove_timer(self, deadline: Deadline) -> None:
        """Forget a timer (one that is not set is no error)."""
        self.timers.pop(deadline, None)

    def __contains__(self, fd: int) -> bool:
        return fd in self.handlers

    def wait(self, timeout: float) -> None:
        """Sleep until a registered fd is ready, a timer is due or timeout passes; call the handlers
        of the readable fds, then of the writable ones, then the due timers' expire.

        Handlers run in the order their fds were registered, and are the ones registered when the
        sleep began: a handler that unregisters another fd (or registers a new one) changes the next
        wait, not this one, so each handler must cope with being called for an fd it has closed.
        """
        handlers, writers = dict(self.handlers), dict(self.writers)
        due = [d for d in (deadline() for deadline in list(self.timers)) if d is not None]
        if due:
            timeout = max(0.0, min(timeout, min(due) - time.monotonic()))
        try:
            readable, writable, _ = select.select(list(handlers), list(writers), [], timeout)
        except InterruptedError:
            readable, writable = [fd for fd in handlers if fd in self.on_interrupt], []
        for fd in readable:
            handlers[fd]()
        for fd in writable:
            writers[fd]()
        if self.timers:
            now = time.monotonic()
            for deadline, expire in list(self.timers.items()):
                when = deadline() if deadline in self.timers else None  # an earlier expire may drop it
                if when is not None and when <= now:
                    expire(now)


class SignalPipe:
    """Signals as readable bytes (signal.set_wakeup_fd): the handlers do nothing, the loop reads them."""

    def __init__(self) -> None:
        self.fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def install(self, signals: tuple[int, ...]) -> None:
        """Route signals into the pipe; SIGPIPE is ignored (a vanished peer is an error code)."""
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda signum, frame: None)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def read(self) -> list[int]:
        """The signals that arrived since the last read, each once, in order of arrival."""
        try:
            data = os.read(self.fd, 256)
        except BlockingIOError:
            return []
        return list(dict.fromkeys(data))

    def close(self) -> None:
        """Stop routing signals here and close the pipe."""
        signal.set_wakeup_fd(-1)
        for fd in (self.fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
