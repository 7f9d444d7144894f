# Connections: an accepted socket with its receive buffer (Connection, protocol-neutral), and the
# FastCGI connection built on it (FcgiConnection): the record rules in one table-like dispatcher
# (FcgiConnection.rule) that every read path asks, the request head, the streamed body, refusals and
# management records. Included by _core.pyx.


cdef enum:
    RBUF_SIZE = 131072      # holds the largest record (8 + 65535 + 255 bytes) twice over
    REFUSED_KEPT = 8        # refused request ids a connection remembers
    # Of a body over client_max_body_size that came without CONTENT_LENGTH, the most read and
    # dropped after the answer to keep the connection; past it the connection closes instead.
    DRAIN_OVER_LIMIT = 1048576
    FILL_AGAIN = -3         # fill_now(): nothing to read yet

# What reading a request's head comes to (FcgiConnection.read_request_head), besides 0 (close
# quietly) and -1 (close, logged).
cdef enum:
    HEAD_READY = 1          # the params are in: serve the request
    HEAD_WAIT = 2           # nothing, or not all of the head, has arrived: wait in the loop's epoll set

# At most one log line per pool per this many seconds about connections closed on a deadline.
DEADLINE_LOG_INTERVAL_S = 10


cdef extern from "<sys/socket.h>" nogil:
    struct sockaddr_storage:
        unsigned short ss_family
    enum:
        AF_INET
        AF_INET6


cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        pass
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in:
        in_addr sin_addr
    struct sockaddr_in6:
        in6_addr sin6_addr


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)


@cython.final
cdef class Limits:
    """What the pool's configuration says about connections, shared by all of one worker's."""
    cdef int idle_timeout_ms         # waiting for the start of a request
    cdef int first_byte_grace_ms     # waiting for a new connection's first bytes before it joins the others
    cdef int header_timeout_ms       # request_header_timeout: the whole head, from its first bytes
    cdef int body_timeout_ms         # request_body_timeout: each wait for more of the body
    cdef int read_timeout_ms         # each wait for the web server to take more of the response
    cdef int64_t max_body_size       # client_max_body_size: the largest body an app reads; 0: none
    cdef object log                  # log(level: str, message: str), error paths only
    cdef object protocol_log         # the same, for the line of a connection closed on bad input
    cdef dict get_values             # FCGI_GET_VALUES answers
    cdef ffpm_pool_header *header    # the pool's header: the deadline log limiter lives there

    cdef void limited_log(self, str why) noexcept:
        """Log a connection closed for a slow or silent client (a deadline passed), at most one line
        per pool per DEADLINE_LOG_INTERVAL_S: one such client costs a line, an attack of thousands
        a line every few seconds that counts the rest."""
        cdef int64_t suppressed = ffpm_log_permit(self.header, mono_ns(),
                                                  <int64_t>DEADLINE_LOG_INTERVAL_S * 1000000000)
        if suppressed < 0:
            return
        try:
            if suppressed:
                why += (f"; {suppressed} more connection{'s' if suppressed > 1 else ''} of this pool "
                        f"closed for slow or silent clients since the last such line (at most one "
                        f"every {DEADLINE_LOG_INTERVAL_S}s)")
            self.log("warning", f"closing a FastCGI connection: {why}")
        except BaseException:
            pass


cdef class Connection:
    """An accepted socket and its receive buffer: reading with a deadline, sending it all, closing.

    What every protocol's connection has; the protocol's own subclass reads requests from the
    buffer and implements the body_next/check_abort/drain_body trio that wsgi.input and the
    worker's loop use.
    """
    cdef int fd
    cdef uint8_t *rbuf
    cdef size_t rstart, rend
    cdef Limits limits
    cdef bint keep_conn       # serve another request on it after this one
    cdef bint broken          # malformed input or I/O error: close without further ado
    cdef bint logged          # the reason for closing is already in the log
    cdef bint fresh           # accepted, no request begun yet (its first counts in accepted_conn)
    cdef bint watched         # in the worker's epoll set
    cdef bint aborted         # the web server gave up on the current request (no 500 then)
    cdef bint over_limit      # the current request's body passed max_body_size (a 413, not a 500)
    cdef bint half_closed     # our side is shut down for writing: reading on until the peer closes
    cdef int64_t idle_deadline_ns  # while kept idle: when it is closed
    cdef int64_t head_deadline_ns  # the current request's head must be in by then; 0: not started
    cdef uint64_t request_serial   # changes when a request ends: its wsgi.input reads no more
    cdef int64_t content_length    # the current request's CONTENT_LENGTH, -1 when unknown
    cdef sockaddr_storage peer     # the peer's address, as accept4 gave it (the access log's %R)
    cdef socklen_t peer_len        # 0: unknown

    def __cinit__(self):
        self.rbuf = <uint8_t *>malloc(RBUF_SIZE)
        if self.rbuf == NULL:
            raise MemoryError()
        self.fd = -1

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)
        free(self.rbuf)

    cdef void reset(self, int fd) noexcept:
        """Take a new socket (or -1 for I/O-less use), forgetting the last one's state."""
        self.fd = fd
        self.rstart = self.rend = 0
        self.keep_conn = False
        self.broken = False
        self.watched = False
        self.logged = False
        self.peer_len = 0
        self.fresh = False
        self.aborted = False
        self.half_closed = False
        self.head_deadline_ns = 0

    cdef void hold_output(self) noexcept:
        """Hold back what is sent from here on until end_output() (TCP_CORK). A unix socket has
        no such option: the call fails there and changes nothing."""
        cdef int one = 1
        setsockopt(self.fd, IPPROTO_TCP, TCP_CORK, &one, sizeof(one))

    cdef void end_output(self) noexcept:
        """Send the FIN now: on TCP in one segment with what hold_output() held back."""
        self.half_close()

    cdef void close_socket(self) noexcept:
        if self.fd >= 0:
            close(self.fd)
            self.fd = -1

    cdef void half_close(self) noexcept:
        """Shut our side for writing but read on (a lingering close): the peer sees the end of the
        response at once, and closing later cannot reset one still in flight. Nothing is sent after."""
        if not self.half_closed and self.fd >= 0:
            shutdown(self.fd, SHUT_WR)
            self.half_closed = True

    cdef int wait_fd(self, short events, int timeout_ms) except -2:
        """poll() the socket: 1 ready, 0 timed out. Signal handlers run on EINTR."""
        cdef pollfd p
        cdef int rc
        p.fd = self.fd
        p.events = events
        p.revents = 0
        while True:
            with nogil:
                rc = poll(&p, 1, timeout_ms)
            if rc >= 0:
                return rc
            if errno != EINTR:
                raise OSError(errno, "poll() failed")
            PyErr_CheckSignals()

    cdef int fill_now(self) except -2:
        """Receive what has arrived, without waiting: >0 read, 0 the peer closed, FILL_AGAIN nothing
        yet, -1 failed or the buffer is full."""
        cdef ssize_t n
        cdef int err
        if self.rstart == self.rend:
            self.rstart = self.rend = 0
        elif self.rstart > 0 and RBUF_SIZE - self.rend < 8192 + FCGI_HEADER_LEN + 65535 + 255:
            memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
            self.rend -= self.rstart
            self.rstart = 0
        if self.rend >= RBUF_SIZE:
            return -1
        while True:
            # MSG_DONTWAIT never blocks, so the GIL stays held: releasing and retaking it costs
            # more than the call. Waiting happens in poll(), without the GIL.
            n = recv(self.fd, self.rbuf + self.rend, RBUF_SIZE - self.rend, MSG_DONTWAIT)
            if n > 0:
                self.rend += n
                return <int>n
            if n == 0:
                return 0
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
            elif err == EAGAIN:  # EWOULDBLOCK is the same value on Linux
                return FILL_AGAIN
            else:
                return -1

    cdef int fill(self, int timeout_ms) except -2:
        """Receive more bytes into the buffer: >0 read, 0 the peer closed, -1 timed out or failed."""
        cdef int got
        while True:
            got = self.fill_now()
            if got != FILL_AGAIN:
                return got
            if self.wait_fd(POLLIN, timeout_ms) == 0:
                return -1

    cdef int send_all(self, const uint8_t *data, size_t n) except -1:
        """Send every byte or raise ConnectionLost. MSG_NOSIGNAL: a vanished peer is an error code."""
        cdef ssize_t sent
        cdef int err
        while n:
            sent = send(self.fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT)
            if sent >= 0:
                data += sent
                n -= sent
                continue
            err = errno
            if err == EINTR:
                PyErr_CheckSignals()
                continue
            if err == EAGAIN:
                # The web server reads slower than we write: wait, but not forever, so a peer that
                # stopped reading cannot hold the worker.
                if self.wait_fd(POLLOUT, self.limits.read_timeout_ms) == 0:
                    self.broken = True
                    raise ConnectionLost(ETIMEDOUT, "timed out sending the response")
                continue
            self.broken = True
            raise ConnectionLost(err, f"sending the response failed: {OSError(err, '').strerror}")
        return 0

    cdef int send_bytes(self, bytes data) except -1:
        return self.send_all(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))

    cdef size_t peer_ip(self, const uint8_t **addr, int *family) noexcept:
        """The peer's IP address as accept4 gave it: its length (4 or 16 bytes at *addr, *family
        AF_INET or AF_INET6), 0 on a unix socket. An IPv4 client of a dual-stack socket is IPv4."""
        if self.peer_len == 0:
            return 0
        if self.peer.ss_family == AF_INET:
            addr[0] = <const uint8_t *>&(<sockaddr_in *>&self.peer).sin_addr
            family[0] = AF_INET
            return 4
        if self.peer.ss_family != AF_INET6:
            return 0
        addr[0] = (<sockaddr_in6 *>&self.peer).sin6_addr.s6_addr
        if memcmp(addr[0], b"\0\0\0\0\0\0\0\0\0\0\xff\xff", 12) == 0:
            addr[0] += 12
            family[0] = AF_INET
            return 4
        family[0] = AF_INET6
        return 16

    cdef str peer_text(self):
        """The peer's IP address for a log line, "" on a unix socket."""
        cdef const uint8_t *a
        cdef int family
        cdef char text[48]
        if self.peer_ip(&a, &family) == 0 or inet_ntop(family, a, text, sizeof(text)) == NULL:
            return ""
        return text.decode("ascii")

    cdef void malformed(self, str why) noexcept:
        """Close after this: the peer broke the protocol. One line says why (and, over TCP, who), through
        the pool's protocol_log, which lets a worker log only so many a minute (fastfpm.log.Throttle)."""
        self.broken = True
        self.logged = True
        try:
            peer = self.peer_text()
            self.limits.protocol_log("warning", f"closing a FastCGI connection{' from ' if peer else ''}"
                                                f"{peer}: {why}")
        except BaseException:
            pass

    cdef bint start_head_deadline(self) noexcept:
        """The request's head has begun: its request_header_timeout runs from now (True), unless it
        already runs (False)."""
        if self.head_deadline_ns:
            return False
        self.head_deadline_ns = mono_ns() + <int64_t>self.limits.header_timeout_ms * 1000000
        return True

    cdef int fill_head(self) except -2:
        """fill() for the rest of a request's head, waiting no later than its deadline: >0 read,
        0 the peer closed, -1 the deadline passed (or receiving failed)."""
        cdef int64_t left_ns
        self.start_head_deadline()
        left_ns = self.head_deadline_ns - mono_ns()
        return self.fill(<int>(left_ns // 1000000) + 1 if left_ns > 0 else 0)

    cdef void head_timed_out(self) noexcept:
        """Close after this: the request's head was not in by request_header_timeout (logged, limited)."""
        self.broken = True
        self.logged = True
        self.limits.limited_log(f"the request head did not arrive within request_header_timeout "
                                f"({self.limits.header_timeout_ms / 1000:g}s)")

    cdef void body_timed_out(self) noexcept:
        """Close after this: no more of the body for request_body_timeout (logged, limited)."""
        self.broken = True
        self.logged = True
        self.limits.limited_log(f"no more of the request body within request_body_timeout "
                                f"({self.limits.body_timeout_ms / 1000:g}s)")

    cdef void begin_body(self) noexcept:
        """A request's body is about to be read (the protocol resets its body state)."""

    cdef Py_ssize_t body_next(self, Py_ssize_t want, const uint8_t **ptr, bint to_newline) except -1:
        """Up to want body bytes, *ptr pointing at them in the buffer; 0 at the end of the body."""
        raise NotImplementedError

    cdef int check_abort(self) except -1:
        """Between streamed response chunks: raise RequestAborted if the peer gave up."""
        return 0

    cdef int drain_body(self) except -1:
        """Drop what the app left of the body, so the next request starts at a clean boundary."""
        return 0


# What the records of a FastCGI connection may be, by where the connection is in its request.
cdef enum RecordPhase:
    PHASE_IDLE = 0    # between requests: no BEGIN_REQUEST yet
    PHASE_PARAMS      # begun, reading PARAMS
    PHASE_BODY        # PARAMS done, the app reads STDIN
    PHASE_AFTER       # the request ended and the connection closes: queued requests are refused

# What a record means there (FcgiConnection.rule); the BAD_* ones close the connection.
cdef enum RecordAction:
    DO_MANAGEMENT = 1  # request id 0: GET_VALUES, or UNKNOWN_TYPE for anything else
    DO_BEGIN           # a new request (a role other than RESPONDER is refused)
    DO_PARAMS          # the current request's params; an empty record ends them
    DO_STDIN           # the current request's body
    DO_ABORT           # the web server gives up on the current request
    DO_REFUSE_MPX      # a BEGIN_REQUEST for a second request: FCGI_CANT_MPX_CONN (FCGI_MPXS_CONNS=0)
    DO_SKIP            # a refused request's records; an ABORT that crossed our END_REQUEST
    BAD_HEADER         # breaks a rule that needs no state (fcgi_check_header)
    BAD_SECOND_BEGIN   # a second BEGIN_REQUEST for the request in progress
    BAD_UNKNOWN_ID     # a record for a request id never begun (nor refused)
    BAD_OUT_OF_PLACE   # the current request's record of a type not allowed in this phase


cdef str rule_error(int action, const fcgi_header *hdr, int phase):
    """The log line's reason for a BAD_* action of FcgiConnection.rule."""
    if action == BAD_HEADER:
        if fcgi_check_header(hdr) == FCGI_ERR_LENGTH:
            return (f"record type {hdr.type} for request id {hdr.request_id} with a "
                    f"{hdr.content_length}-byte body")
        return f"management record type {hdr.type} with request id {hdr.request_id}"
    if action == BAD_SECOND_BEGIN:
        return f"a second BEGIN_REQUEST for request id {hdr.request_id}"
    if action == BAD_UNKNOWN_ID:
        return f"record type {hdr.type} for unknown request id {hdr.request_id}"
    if phase == PHASE_PARAMS:
        return f"record type {hdr.type} before the end of PARAMS"
    return f"record type {hdr.type} for request id {hdr.request_id} in the body"


# Requests refused on a connection (CANT_MPX_CONN, UNKNOWN_ROLE) whose PARAMS and STDIN may still be
# on their way: dropped unread rather than taken for a protocol error. A ring of the last few ids;
# 0 is a free entry (request id 0 is for management records, never refused).
cdef struct RefusedIds:
    uint16_t ids[REFUSED_KEPT]
    unsigned next


cdef inline bint refused_has(const RefusedIds *r, int request_id) noexcept:
    cdef int i
    for i in range(REFUSED_KEPT):
        if r.ids[i] == request_id:
            return True
    return False


cdef inline void refused_forget(RefusedIds *r, int request_id) noexcept:
    """A new BEGIN_REQUEST reuses the id: its records are a new request's from here on."""
    cdef int i
    for i in range(REFUSED_KEPT):
        if r.ids[i] == request_id:
            r.ids[i] = 0


cdef inline void refused_add(RefusedIds *r, int request_id) noexcept:
    refused_forget(r, request_id)
    r.ids[r.next % REFUSED_KEPT] = <uint16_t>request_id
    r.next += 1


@cython.final
cdef class FcgiConnection(Connection):
    """A FastCGI connection: one request at a time (FCGI_MPXS_CONNS=0), read by the record rules."""
    cdef int request_id
    # request body (FCGI_STDIN) streaming state
    cdef size_t stdin_left    # content bytes left in the current STDIN record
    cdef size_t stdin_pad     # padding bytes left after it
    cdef bint stdin_done      # the empty STDIN record has been read
    cdef int64_t stdin_total  # content bytes of the STDIN records whose headers were read
    cdef bint draining        # the response is out: the rest of the body is being dropped
    cdef RefusedIds refused   # requests refused here whose records may still arrive

    cdef void reset(self, int fd) noexcept:
        Connection.reset(self, fd)
        self.request_id = 0
        memset(&self.refused, 0, sizeof(self.refused))

    # ------------------------------------------------------------------ the record rules

    cdef inline int rule(self, const fcgi_header *hdr, int phase) noexcept:
        """What a record is, given the phase: the one place the FastCGI record rules live.

        The order is the rules' precedence: management records first; then the stateless header
        checks; a BEGIN_REQUEST starts a request or is refused; a refused request's records and a
        late ABORT are dropped; anything else must belong to the current request and its phase.
        """
        cdef bint current = phase != PHASE_IDLE and hdr.request_id == self.request_id
        if hdr.request_id == 0:
            return DO_MANAGEMENT
        if phase != PHASE_AFTER and fcgi_check_header(hdr) < 0:
            return BAD_HEADER
        if hdr.type == FCGI_BEGIN_REQUEST:
            if phase == PHASE_IDLE:
                return DO_BEGIN
            return BAD_SECOND_BEGIN if current else DO_REFUSE_MPX
        if not current and refused_has(&self.refused, hdr.request_id):
            return DO_SKIP
        if hdr.type == FCGI_ABORT_REQUEST:
            if phase == PHASE_IDLE:
                # The web server gave up on a request we had already finished: the two crossed on
                # the wire, which is no protocol error. Nothing is left to end.
                return DO_SKIP
            if current:
                return DO_ABORT
        if not current:
            return BAD_UNKNOWN_ID
        if hdr.type == FCGI_PARAMS and phase == PHASE_PARAMS:
            return DO_PARAMS
        if hdr.type == FCGI_STDIN and phase == PHASE_BODY:
            return DO_STDIN
        return BAD_OUT_OF_PLACE

    cdef int refuse(self, int request_id, int protocol_status) except -1:
        """End a request we will not serve (END_REQUEST with protocol_status) and drop its records."""
        cdef uint8_t reply[16]
        fcgi_write_end_request(reply, request_id, 0, protocol_status)
        self.send_all(reply, 16)
        refused_add(&self.refused, request_id)
        return 0

    cdef int refuse_queued(self) except -1:
        """Before closing: refuse the requests queued behind the one just served.

        A client that multiplexes sends the next BEGIN_REQUEST without waiting; without
        FCGI_KEEP_CONN the connection closes after this request, and those requests must hear
        FCGI_CANT_MPX_CONN rather than see the connection vanish.
        """
        cdef fcgi_header hdr
        cdef long rc
        while self.rend > self.rstart and not self.broken:
            rc = fcgi_parse_record(self.rbuf + self.rstart, self.rend - self.rstart, &hdr)
            if rc <= 0:
                return 0
            self.rstart += rc
            if (self.rule(&hdr, PHASE_AFTER) == DO_REFUSE_MPX
                    and not refused_has(&self.refused, hdr.request_id)):
                self.refuse(hdr.request_id, FCGI_CANT_MPX_CONN)
        return 0

    cdef int management_record(self, const fcgi_header *hdr, const uint8_t *content) except -2:
        """Answer a record with request id 0: GET_VALUES, or UNKNOWN_TYPE for anything else."""
        cdef size_t pos = 0, noff, nlen, voff, vlen
        cdef long rc
        cdef uint8_t reply[16]
        if hdr.type != FCGI_GET_VALUES:
            fcgi_write_unknown_type(reply, hdr.type)
            self.send_all(reply, 16)
            return 0
        answer = []
        while pos < hdr.content_length:
            rc = fcgi_parse_pair(content + pos, hdr.content_length - pos, &noff, &nlen, &voff, &vlen)
            if rc < 0:
                self.malformed("truncated name/value pair in GET_VALUES")
                return -1
            name = PyBytes_FromStringAndSize(<char *>content + pos + noff, nlen)
            value = self.limits.get_values.get(name)
            if value is not None:
                answer.append((name, value))
            pos += rc
        self.send_bytes(encode_get_values_result(answer))
        return 0

    # ------------------------------------------------------------------ the request head

    cdef int gather_head(self) except -2:
        """Between requests: receive until the head is in (fcgi_head_ready), without waiting.
        HEAD_READY, HEAD_WAIT (the rest has not arrived: the worker waits for it among its other
        connections, so a slow or silent client never holds it), 0 closed quietly, -1 closed (logged).

        The head's deadline (request_header_timeout) runs from the first time it is seen
        incomplete; a head that arrives in one piece, the normal case, never reads the clock.
        """
        cdef int got
        while not fcgi_head_ready(self.rbuf + self.rstart, self.rend - self.rstart):
            got = self.fill_now()
            if got > 0:
                continue
            if got == FILL_AGAIN:
                if self.rend == self.rstart:
                    if self.fresh and not self.watched and self.wait_fd(POLLIN, self.limits.first_byte_grace_ms):
                        continue  # accepted a moment before its first bytes
                    return HEAD_WAIT  # silent so far: idle_timeout (the loop) bounds the wait
                if not self.start_head_deadline() and mono_ns() >= self.head_deadline_ns:
                    self.head_timed_out()
                    return -1
                return HEAD_WAIT
            if got == 0:
                if self.rend > self.rstart:
                    self.malformed("the web server closed mid-request")
                    return -1
                return 0
            if self.rend >= RBUF_SIZE:
                return HEAD_READY  # larger than the buffer: read it as it comes, still by the deadline
            if self.rend == self.rstart:
                self.broken = True
                return 0
            self.malformed("receiving the request failed")
            return -1
        return HEAD_READY

    cdef int read_request_head(self, EnvironBuilder params, SlotWriter slot) except -2:
        """Read records up to the end of PARAMS into params: HEAD_READY a request is ready, HEAD_WAIT
        wait for this connection in the loop's epoll set (its head is not all here), 0 close quietly,
        -1 close (logged). The slot turns "Reading headers" once the head is in the buffer."""
        cdef fcgi_header hdr
        cdef long rc
        cdef int got, action, phase = PHASE_IDLE
        cdef bint started = False
        cdef const uint8_t *content
        params.clear_params()
        while True:
            if phase == PHASE_IDLE:
                # Nothing of a request consumed yet: wait for the whole head before taking any of it.
                got = self.gather_head()
                if got != HEAD_READY:
                    return got
                if not started:
                    started = True
                    slot.reading(self.fresh)
                    self.fresh = False
            rc = fcgi_parse_record(self.rbuf + self.rstart, self.rend - self.rstart, &hdr)
            if rc == FCGI_NEED_MORE:
                # Mid-PARAMS: a head larger than the buffer, or one begun after a management record.
                got = self.fill_head()
                if got > 0:
                    continue
                if got == 0:
                    self.malformed("the web server closed or stalled mid-request")
                else:
                    self.head_timed_out()
                return -1
            if rc == FCGI_ERR_VERSION:
                self.malformed(f"bad FastCGI version {self.rbuf[self.rstart]}")
                return -1
            content = self.rbuf + self.rstart + FCGI_HEADER_LEN
            self.rstart += rc
            action = self.rule(&hdr, phase)
            if action == DO_PARAMS:
                if hdr.content_length == 0:
                    self.head_deadline_ns = 0
                    slot.info()
                    return HEAD_READY
                if not params.add_params(content, hdr.content_length):
                    self.malformed(f"request params over the {params.max_params_size}-byte limit")
                    return -1
            elif action == DO_BEGIN:
                if self.begin_request(&hdr, content):
                    phase = PHASE_PARAMS
                elif not self.keep_conn:
                    return 0
            elif action == DO_ABORT:
                # Aborted before it started: end it, as the spec asks, and carry on.
                self.end_unstarted(hdr.request_id)
                if not self.keep_conn:
                    return 0
                phase = PHASE_IDLE
                params.clear_params()
            elif action == DO_MANAGEMENT:
                if self.management_record(&hdr, content) < 0:
                    return -1
            elif action == DO_REFUSE_MPX:
                self.refuse(hdr.request_id, FCGI_CANT_MPX_CONN)
            elif action != DO_SKIP:
                self.malformed(rule_error(action, &hdr, phase))
                return -1

    cdef bint begin_request(self, const fcgi_header *hdr, const uint8_t *content) except -1:
        """A BEGIN_REQUEST: True when it starts a request; a role other than RESPONDER is refused."""
        cdef int role, flags
        refused_forget(&self.refused, hdr.request_id)
        fcgi_parse_begin_request(content, hdr.content_length, &role, &flags)
        self.keep_conn = (flags & FCGI_KEEP_CONN) != 0
        if role != FCGI_RESPONDER:
            self.refuse(hdr.request_id, FCGI_UNKNOWN_ROLE)
            return False
        self.request_id = hdr.request_id
        return True

    cdef int end_unstarted(self, int request_id) except -1:
        """END_REQUEST for a request aborted before its params were complete."""
        cdef uint8_t reply[16]
        fcgi_write_end_request(reply, request_id, 0, FCGI_REQUEST_COMPLETE)
        return self.send_all(reply, 16)

    # ------------------------------------------------------------------ the request body

    cdef void begin_body(self) noexcept:
        self.stdin_left = self.stdin_pad = 0
        self.stdin_done = False
        self.stdin_total = 0
        self.aborted = False
        self.over_limit = False
        self.draining = False

    cdef Py_ssize_t body_next(self, Py_ssize_t want, const uint8_t **ptr, bint to_newline) except -1:
        """Consume up to want body bytes already received (reading more when none are): returns how
        many, pointing *ptr at them inside the buffer; 0 at the end of the body."""
        cdef long rc
        cdef size_t avail, n
        cdef const uint8_t *nl
        while True:
            if self.broken:
                raise RequestAborted("the connection to the web server is closed")
            avail = self.rend - self.rstart
            if self.stdin_left or self.stdin_pad or not self.stdin_done:
                if avail == 0 or (not self.stdin_left and not self.stdin_pad and avail < FCGI_HEADER_LEN):
                    if self.draining and not self.keep_conn:
                        # Say the connection ends before waiting for a body nobody reads: nginx
                        # stops sending once it has the response, then waits for this (as php-fpm).
                        self.half_close()
                    rc = self.fill(self.limits.body_timeout_ms)
                    if rc == 0 and self.draining:
                        # After END_REQUEST the web server may close instead of sending the rest
                        # of a body (nginx does when it had not sent it all): no error.
                        self.broken = True
                        raise RequestAborted("the web server closed the connection")
                    if rc <= 0:
                        if rc == 0:
                            self.malformed("the web server closed while sending the body")
                        else:
                            self.body_timed_out()
                        raise RequestAborted("the request body did not arrive")
                    continue
            if self.stdin_left:
                n = self.stdin_left if self.stdin_left < avail else avail
                if <size_t>want < n:
                    n = want
                ptr[0] = self.rbuf + self.rstart
                if to_newline:
                    nl = <const uint8_t *>memchr(ptr[0], c'\n', n)
                    if nl != NULL:
                        n = nl - ptr[0] + 1
                self.rstart += n
                self.stdin_left -= n
                return n
            if self.stdin_pad:
                n = self.stdin_pad if self.stdin_pad < avail else avail
                self.rstart += n
                self.stdin_pad -= n
                continue
            if self.stdin_done:
                return 0
            self.next_body_record(avail)

    cdef int next_body_record(self, size_t avail) except -1:
        """Take the record at the buffer's start while the body streams, by the record rules.

        A STDIN record's header is enough (its content streams to the app); any other record must
        be complete before it can be handled.
        """
        cdef fcgi_header hdr
        cdef long rc
        cdef int action
        rc = fcgi_parse_header(self.rbuf + self.rstart, avail, &hdr)
        if rc == FCGI_ERR_VERSION:
            self.malformed(f"bad FastCGI version {self.rbuf[self.rstart]}")
            raise RequestAborted("malformed record from the web server")
        action = self.rule(&hdr, PHASE_BODY)
        if action == DO_STDIN:
            if (self.limits.max_body_size and not self.draining
                    and self.stdin_total + hdr.content_length > self.limits.max_body_size):
                # Without CONTENT_LENGTH only (Worker refuses one over the limit). The record
                # stays unread: every read from here on raises.
                self.over_limit = True
                raise RequestBodyTooLarge(f"request body over the {self.limits.max_body_size}-byte "
                                          f"limit (client_max_body_size)")
            self.rstart += FCGI_HEADER_LEN
            self.stdin_left = hdr.content_length
            self.stdin_pad = hdr.padding_length
            if hdr.content_length == 0:
                self.stdin_done = True
                return 0
            self.stdin_total += hdr.content_length
            if self.content_length >= 0 and self.stdin_total > self.content_length:
                self.malformed(f"request body longer than CONTENT_LENGTH ({self.content_length})")
                raise RequestAborted("request body longer than CONTENT_LENGTH")
            return 0
        rc = fcgi_parse_record(self.rbuf + self.rstart, avail, &hdr)
        if rc == FCGI_NEED_MORE:
            rc = self.fill(self.limits.body_timeout_ms)
            if rc <= 0:
                if rc == 0:
                    self.malformed("the web server closed mid-record")
                else:
                    self.body_timed_out()
                raise RequestAborted("the request body did not arrive")
            return 0
        self.rstart += rc
        if action == DO_MANAGEMENT:
            self.management_record(&hdr, self.rbuf + self.rstart - rc + FCGI_HEADER_LEN)
        elif action == DO_ABORT:
            self.stdin_done = True
            self.aborted = True
            raise RequestAborted("the web server aborted the request")
        elif action == DO_REFUSE_MPX:
            self.refuse(hdr.request_id, FCGI_CANT_MPX_CONN)
        elif action != DO_SKIP:
            self.malformed(rule_error(action, &hdr, PHASE_BODY))
            raise RequestAborted("malformed record from the web server")
        return 0

    cdef int check_abort(self) except -1:
        """Between streamed chunks: notice an ABORT_REQUEST or a closed connection without waiting.

        Records after the body the app has not read yet are scanned without being consumed, so
        an app that streams its response without reading the body can still be stopped.
        """
        cdef ssize_t n
        cdef fcgi_header hdr
        cdef long rc
        cdef size_t pos
        if self.rstart > 0 and self.rend - self.rstart < RBUF_SIZE // 2:
            memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
            self.rend -= self.rstart
            self.rstart = 0
        if self.rend < RBUF_SIZE:
            n = recv(self.fd, self.rbuf + self.rend, RBUF_SIZE - self.rend, MSG_DONTWAIT)
            if n == 0:
                self.broken = True
                raise RequestAborted("the web server closed the connection")
            if n > 0:
                self.rend += n
        pos = self.rstart + self.stdin_left + self.stdin_pad
        while pos < self.rend:
            rc = fcgi_parse_record(self.rbuf + pos, self.rend - pos, &hdr)
            if rc <= 0:
                break
            if self.rule(&hdr, PHASE_BODY) == DO_ABORT:
                self.aborted = True
                raise RequestAborted("the web server aborted the request")
            pos += rc
        return 0

    cdef int drain_body(self) except -1:
        """Read and drop what is left of the body the app did not read, so the next request on a kept
        connection starts at a record boundary and closing does not reset the peer.

        A body over max_body_size too, when CONTENT_LENGTH bounds it (nginx still sending it takes
        a close for a 502); without one, DRAIN_OVER_LIMIT bytes, then the connection is given up
        (half-closed), DRAIN_OVER_LIMIT more, then closed. docs/operations.md says why.
        """
        cdef const uint8_t *ptr
        cdef int64_t limit = self.limits.max_body_size
        cdef int64_t stop = self.stdin_total + DRAIN_OVER_LIMIT
        self.draining = True
        try:
            while self.body_next(1 << 30, &ptr, False):
                if limit and not self.over_limit and self.stdin_total > limit:
                    self.over_limit = True  # an unread body without CONTENT_LENGTH, past the limit
                    stop = self.stdin_total + DRAIN_OVER_LIMIT
                if self.over_limit and self.content_length < 0 and self.stdin_total > stop:
                    if not self.keep_conn:
                        self.broken = True
                        return 0
                    self.keep_conn = False  # the next wait half-closes
                    stop = self.stdin_total + DRAIN_OVER_LIMIT
        except (RequestAborted, ConnectionLost):
            # ConnectionLost: a record that needs an answer (a refusal) arrived after the peer left.
            self.broken = True
        finally:
            self.draining = False
            if self.half_closed:
                self.broken = True  # nothing more can be sent: no refusals, no next request
        return 0


cdef class InputStream:
    """wsgi.input: streams the body from the connection as the app reads, never holding it whole."""
    cdef Connection conn
    cdef uint64_t serial             # the request it belongs to (Connection.request_serial)

    def read(self, size=-1):
        """Read up to size bytes (all that is left when size is negative or None)."""
        cdef Py_ssize_t want, got = 0, n
        cdef const uint8_t *ptr
        if self.serial != self.conn.request_serial:
            return b""
        if size is None or size < 0:
            chunks = []
            while True:
                n = self.conn.body_next(65536, &ptr, False)
                if n == 0:
                    break
                chunks.append(PyBytes_FromStringAndSize(<char *>ptr, n))
            return b"".join(chunks)
        want = size
        if want <= 65536:
            out = PyBytes_FromStringAndSize(NULL, want)
            while got < want:
                n = self.conn.body_next(want - got, &ptr, False)
                if n == 0:
                    break
                memcpy(PyBytes_AS_STRING(out) + got, ptr, n)
                got += n
            return out if got == want else out[:got]
        # A large n (read(2**31) meaning "everything") must not allocate n bytes up front.
        chunks = []
        while got < want:
            n = self.conn.body_next(min(want - got, 65536), &ptr, False)
            if n == 0:
                break
            chunks.append(PyBytes_FromStringAndSize(<char *>ptr, n))
            got += n
        return b"".join(chunks)

    def readline(self, size=-1):
        """Read one line, up to size bytes."""
        cdef Py_ssize_t n, limit
        cdef const uint8_t *ptr
        if self.serial != self.conn.request_serial:
            return b""
        chunks = []
        limit = -1 if size is None or size < 0 else size
        while limit != 0:
            n = self.conn.body_next(65536 if limit < 0 else limit, &ptr, True)
            if n == 0:
                break
            chunks.append(PyBytes_FromStringAndSize(<char *>ptr, n))
            if limit > 0:
                limit -= n
            if ptr[n - 1] == c'\n':
                break
        return b"".join(chunks)

    def readlines(self, hint=-1):
        """Read lines until EOF, or until about hint bytes were read."""
        lines = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self):
        line = self.readline()
        if not line:
            raise StopIteration
        return line
