# The connection loop: accept on the shared listen socket, hold kept-alive connections idle in an
# epoll set, and hand the worker the next connection with something to read. Knows sockets, not
# protocols: the connections it makes are of the type it is given. Included by _core.pyx.

cdef enum:
    MAX_KEPT = 64           # idle kept-alive connections one worker holds at most


@cython.final
cdef class ConnectionLoop:
    """Where a worker waits: in accept() when it holds no waiting connection, else in its epoll set.

    A connection with no request on it does not pin the worker while others wait: a kept-alive one
    between requests (php-fpm's workers stay stuck on theirs until the web server sends something or
    closes), and also a new one that has sent nothing yet, or not all of its request's head (a
    silent or trickling client), which waits here until its first-byte or head deadline.
    """
    cdef int listen_fd
    cdef object connection_type      # the Connection subclass made for accepted sockets
    cdef Limits limits
    cdef ffpm_pool_header *header    # the pool's scoreboard header: the accept lock
    cdef object client_filter        # None, or client_filter(fd) -> bool (listen.allowed_clients)
    cdef int parent_pid              # the master; 0: not checked
    cdef bint orphaned               # the master is gone: the worker stops
    cdef Connection spare            # a closed connection whose buffers the next accept reuses
    cdef list kept                   # connections waiting for a request (head), oldest first
    cdef int fresh_kept              # how many of them have not sent a whole request yet since accept
    cdef int epfd                    # epoll set: the listen socket and the kept connections
    cdef bint listen_pending         # accepted after an edge: the accept queue may hold more
    cdef int listen_flags            # the listen socket's file status flags, blocking (-1: not read yet)

    def __cinit__(self):
        self.epfd = -1
        self.listen_flags = -1
        self.kept = []

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)

    cdef Connection connection(self):
        """A connection object for a new socket: the spare one, or a new one."""
        cdef Connection conn = self.spare
        if conn is None:
            conn = <Connection>self.connection_type()
            conn.limits = self.limits
        self.spare = None
        return conn

    cdef void discard(self, Connection conn) noexcept:
        """Close a connection and keep its buffers for the next one."""
        conn.close_socket()
        self.spare = conn

    cdef void discard_kept(self) noexcept:
        """Close every waiting connection (the worker is stopping)."""
        while self.kept:
            self.discard(self.kept.pop())
        self.fresh_kept = 0

    cdef Connection take_kept(self, Py_ssize_t i):
        """Remove kept[i] from the waiting connections and return it."""
        cdef Connection conn = self.kept.pop(i)
        if conn.fresh:
            self.fresh_kept -= 1
        return conn

    cdef Connection pending_kept(self):
        """A kept connection with bytes already waiting on it (a request, or the peer's close),
        taken out of the idle set; None when none has any. Never waits: for a worker on its way
        out, which serves what was sent to it before it closes the rest (Worker.serve)."""
        cdef Connection conn
        cdef Py_ssize_t i
        cdef pollfd p
        for i in range(len(self.kept)):
            conn = self.kept[i]
            p.fd = conn.fd
            p.events = POLLIN
            p.revents = 0
            if poll(&p, 1, 0) > 0:
                self.take_kept(i)
                conn.fresh = False
                return conn
        return None

    cdef int close_idle_since(self, int64_t quiet_before) except -1:
        """Close the kept connections idle since before quiet_before, as their idle deadlines
        (idle_timeout from when kept) say: for a worker lingering on its way out (Worker.serve_waiting),
        whose web server, reusing its most recent connection first, has let go of these."""
        cdef Py_ssize_t i = len(self.kept) - 1
        while i >= 0:
            if (<Connection>self.kept[i]).idle_deadline_ns <= quiet_before:
                self.discard(self.take_kept(i))
            i -= 1
        return 0

    cdef int keep(self, Connection conn) except -1:
        """Hold a connection until its next request (or the rest of its head) arrives, or its deadline.

        The deadline: request_header_timeout from the head's first bytes for a head begun, else
        idle_timeout from now (a new connection's first byte, or a kept-alive one's next request).
        """
        if not conn.watched:
            self.watch(conn.fd, EPOLLIN)
            conn.watched = True
        if conn.head_deadline_ns:
            conn.idle_deadline_ns = conn.head_deadline_ns
        else:
            conn.idle_deadline_ns = mono_ns() + <int64_t>self.limits.idle_timeout_ms * 1000000
        if len(self.kept) >= MAX_KEPT:
            self.evict_one()
        self.kept.append(conn)
        if conn.fresh:
            self.fresh_kept += 1
        return 0

    cdef int evict_one(self) except -1:
        """Make room in a full set: close the oldest connection that never sent a whole request (a
        silent or slow client), else the longest idle kept-alive one (the web server's pool is larger
        than we hold)."""
        cdef Py_ssize_t i, victim = 0
        cdef Connection conn
        if self.fresh_kept:
            for i in range(len(self.kept)):
                if (<Connection>self.kept[i]).fresh:
                    victim = i
                    break
        conn = self.take_kept(victim)
        if conn.fresh:
            self.limits.limited_log(f"{MAX_KEPT} connections wait on this worker; the oldest that has "
                                    f"not sent a whole request yet is let go")
        self.discard(conn)
        return 0

    cdef Connection accept_one(self):
        """accept() once: a new connection, or None.

        The listen socket is blocking, with a receive timeout (SO_RCVTIMEO, set by
        fastfpm.worker) that bounds the wait: a blocking accept() wakes exactly one waiting
        worker per connection, where a readiness wait would wake several to race for it.
        """
        cdef int fd, err
        cdef Connection conn
        cdef sockaddr_storage peer
        cdef socklen_t peer_len = sizeof(peer)
        with nogil:
            fd = accept4(self.listen_fd, <sockaddr *>&peer, &peer_len, SOCK_CLOEXEC)
        if fd >= 0 and self.client_filter is not None and not self.client_filter(fd):
            close(fd)
            return None
        if fd >= 0:
            conn = self.connection()
            conn.reset(fd)
            conn.fresh = True
            memcpy(&conn.peer, &peer, peer_len if peer_len <= sizeof(peer) else sizeof(peer))
            conn.peer_len = peer_len  # kept for the access log's %R: no getpeername() later
            return conn
        err = errno
        if err == EINTR:
            PyErr_CheckSignals()
        elif err == EAGAIN or err == ECONNABORTED:
            # The receive timeout ran out, another worker was quicker, or the peer left. A signal
            # that landed just before accept() did not interrupt it: run its handler now.
            PyErr_CheckSignals()
        elif err == EMFILE or err == ENFILE or err == ENOBUFS or err == ENOMEM:
            # Out of descriptors or memory: say so and back off, as nginx does, rather than
            # spinning on a listen socket that stays readable.
            self.limits.log("error", f"accept() failed: {OSError(err, '').strerror}; pausing 100 ms")
            with nogil:
                poll(NULL, 0, 100)
        else:
            raise OSError(err, "accept() failed")
        return None

    cdef Connection accept_now(self):
        """accept() without waiting, for a worker whose kept connections must not wait on it.

        epoll may wake several workers for one connection; the ones that lose the race must get
        EAGAIN, not sleep in accept() while their kept connections' requests queue up. The listen
        socket's O_NONBLOCK is shared with every worker, so it is set just around this call: a
        worker that enters accept() in that instant gets EAGAIN and simply waits again.
        """
        cdef int flags
        cdef Connection conn
        # One worker at a time (see ffpm_accept_lock): otherwise a second one could accept()
        # after the first had made the socket blocking again, and sleep there. Whoever is busy
        # with the lock, or an idle worker in accept(), takes the connection instead.
        if not ffpm_accept_lock(self.header, mono_ns(), 50000000):
            return None  # the holder accepts, and keeps accepting while more are queued
        try:
            if self.listen_flags < 0:
                # Read once: only this toggle changes the flags, and it always puts them back.
                flags = fcntl(self.listen_fd, F_GETFL)
                if flags < 0:
                    raise OSError(errno, "fcntl() on the listen socket failed")
                self.listen_flags = flags & ~O_NONBLOCK
            flags = self.listen_flags
            if fcntl(self.listen_fd, F_SETFL, flags | O_NONBLOCK) < 0:
                raise OSError(errno, "fcntl() on the listen socket failed")
            try:
                conn = self.accept_one()
            finally:
                fcntl(self.listen_fd, F_SETFL, flags)
        finally:
            ffpm_accept_unlock(self.header)
        return conn

    cdef inline void check_parent(self) noexcept:
        """Note when the master is gone (reparented): the worker stops, as gunicorn's do.

        A master killed with SIGKILL cannot stop its workers; without this they would go on
        accepting on the inherited socket with nobody to respawn, time out or reap them. The kernel
        tells a busy worker at once (PR_SET_PDEATHSIG, see fastfpm.process.watch_master); this is the
        fallback where that cannot be set. Called only when a wait times out, never per request.
        """
        if self.parent_pid and getppid() != self.parent_pid:
            self.orphaned = True

    cdef int watch(self, int fd, uint32_t events) except -1:
        """Add fd to this worker's epoll set (a closed fd leaves the set by itself)."""
        cdef epoll_event ev
        ev.events = events
        ev.data.fd = fd
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl() failed")
        return 0

    cdef int open_epoll(self) except -1:
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1() failed")
        # Not EPOLLEXCLUSIVE: an exclusive wake-up is spent on the first exclusive waiter
        # in the socket's queue, and an epoll registration stays there while its worker is
        # busy serving, so an idle worker blocked in accept() was left asleep for its whole
        # receive timeout (100 ms tails in the keep-alive benchmark). Workers holding kept
        # connections all wake for a new one; those that lose the race get EAGAIN.
        # Edge-triggered: a worker that lost the race or the accept lock is not woken again
        # and again for the same queued connection; the one that accepted keeps accepting
        # (listen_pending) until the queue is empty.
        return self.watch(self.listen_fd, EPOLLIN | EPOLLET)

    cdef Connection next_ready(self):
        """The next connection with something to read: a new one, or a kept one whose next request
        has arrived. None when a signal, a timeout or a lost accept() race woke us up instead.

        A worker holding kept connections waits in its own epoll set with them and the listen
        socket; after a wake-up it accepts without blocking (accept_now), so losing the race for
        a new connection costs an EAGAIN, not a wait.
        """
        cdef Connection conn
        cdef epoll_event events[MAX_KEPT + 1]
        cdef int rc, timeout_ms
        if self.epfd < 0:
            self.open_epoll()
        if not self.kept:
            # Nothing kept: wait in accept() itself (see accept_one).
            conn = self.accept_one()
            if conn is None:
                self.check_parent()  # the wait ran out (or a race was lost): is the master still there?
            return conn
        if self.listen_pending and not self.fresh_kept:
            conn = self.accept_now()
            if conn is not None:
                return conn
            self.listen_pending = False
        # Bounded by the kept connections' deadlines also after a drained accept queue: waiting
        # without a timeout there left idle connections open past idle_timeout, and a dead master
        # unnoticed, until the next event. With the accept queue not yet drained (and a new
        # connection waiting for its request, which must not starve behind it) only a look.
        timeout_ms = self.kept_timeout_ms()
        if self.listen_pending:
            timeout_ms = 0
        with nogil:
            rc = epoll_wait(self.epfd, events, MAX_KEPT + 1, timeout_ms)
        if rc < 0:
            if errno != EINTR:
                raise OSError(errno, "epoll_wait() failed")
            PyErr_CheckSignals()
            return None
        conn = self.ready_among(events, rc)
        if conn is not None:
            return conn
        PyErr_CheckSignals()  # as in accept_one: a signal may have come between two waits
        if rc == 0 and timeout_ms != 0:
            self.check_parent()
        return None

    cdef int kept_timeout_ms(self) except? -2:
        """How long epoll may wait: until the first kept connection's deadline. Those past theirs are
        closed first, also while the accept queue keeps the worker from waiting at all."""
        cdef Connection conn
        cdef int64_t now = mono_ns(), earliest = 0
        for conn in self.kept:
            if earliest == 0 or conn.idle_deadline_ns < earliest:
                earliest = conn.idle_deadline_ns
        if earliest == 0:
            return -1
        if earliest <= now:
            self.close_expired(now)
            # None left: only a look, then back to the bounded wait in accept() (see next_ready).
            return self.kept_timeout_ms() if self.kept else 0
        return <int>((earliest - now) // 1000000 + 1)

    cdef Connection ready_among(self, epoll_event *events, int count):
        """The connection epoll found ready: one accepted before and only now speaking first, then a
        new one, else a kept one with a request."""
        cdef Connection conn
        cdef Py_ssize_t i, fresh = -1
        cdef int j
        cdef bint listen_ready = self.listen_pending
        for j in range(count):
            if events[j].data.fd == self.listen_fd:
                listen_ready = True
            elif self.fresh_kept and fresh < 0:
                # A connection accepted before its request arrived (a web server that connects and
                # writes a moment later) has waited longest of all.
                i = self.kept_index(events[j].data.fd)
                if i >= 0 and (<Connection>self.kept[i]).fresh:
                    fresh = i
        if fresh >= 0:
            # The listen socket's edge is spent: remember to look at the accept queue next time.
            self.listen_pending = listen_ready
            return self.take_kept(fresh)
        # A new connection next: its request has usually waited in the accept queue longer than
        # any on a kept connection, and a worker that always finds a kept request ready would
        # otherwise leave new connections queued (the benchmark saw 80 ms tails from that).
        if listen_ready:
            conn = self.accept_now()
            if conn is not None:
                self.listen_pending = True  # more may be queued behind it
                return conn
            self.listen_pending = False
        for j in range(count):
            i = self.kept_index(events[j].data.fd)
            if i >= 0:
                return self.take_kept(i)
        return None

    cdef Py_ssize_t kept_index(self, int fd) noexcept:
        """Where the connection on fd is in kept, or -1."""
        cdef Py_ssize_t i
        for i in range(len(self.kept)):
            if (<Connection>self.kept[i]).fd == fd:
                return i
        return -1

    cdef int close_expired(self, int64_t now) except -1:
        """Close the waiting connections past their deadline: a kept-alive one quietly (nginx lets
        go of idle ones too), a silent or slow new one with a (rate-limited) line."""
        cdef Connection conn
        cdef Py_ssize_t i
        for i in range(len(self.kept) - 1, -1, -1):
            conn = self.kept[i]
            if conn.idle_deadline_ns <= now:
                self.take_kept(i)
                if conn.head_deadline_ns:
                    conn.head_timed_out()
                elif conn.fresh:
                    self.limits.limited_log(f"nothing arrived within idle_timeout "
                                            f"({self.limits.idle_timeout_ms / 1000:g}s) of accepting it")
                self.discard(conn)
        return 0
