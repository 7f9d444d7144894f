# The worker's scoreboard slot (csrc/scoreboard.h): one writer per php-fpm request stage, each a
# seqlock-guarded run of plain stores, no lock and no system call inside it. Included by _core.pyx;
# knows nothing of FastCGI, so a second protocol writes the same stages.


cdef inline int64_t timeval_us(timeval t) noexcept nogil:
    return <int64_t>t.tv_sec * 1000000 + t.tv_usec


@cython.final
cdef class SlotWriter:
    """This worker's slot and its pool's header, written at each stage of a request.

    Without a scoreboard (tests, tools) the writes go to a private slot nobody reads.
    """
    cdef ffpm_slot *slot
    cdef ffpm_pool_header *header    # the pool's header: the accept lock lives there
    cdef object mapping              # keeps the shared mapping alive
    cdef ffpm_slot dummy_slot
    cdef ffpm_pool_header dummy_header
    cdef int64_t utime_start_us      # the worker's CPU times when the current request started
    cdef int64_t stime_start_us
    cdef int64_t utime_end_us        # ... and when its application was done (measure_end)
    cdef int64_t stime_end_us
    cdef public uint64_t peak_memory  # the worker's peak resident set then (ru_maxrss), bytes
    cdef bint measured               # measure_end ran for the current request

    def __cinit__(self):
        memset(&self.dummy_slot, 0, sizeof(self.dummy_slot))
        memset(&self.dummy_header, 0, sizeof(self.dummy_header))
        self.slot = &self.dummy_slot
        self.header = &self.dummy_header

    cdef int attach(self, object scoreboard, Py_ssize_t index) except -1:
        """Write to slot index of a scoreboard mapping (any object exporting a writable buffer)."""
        cdef Py_buffer view
        self.mapping = memoryview(scoreboard)
        PyObject_GetBuffer(scoreboard, &view, PyBUF_SIMPLE)
        try:
            self.slot = ffpm_slots(view.buf) + index
            self.header = <ffpm_pool_header *>view.buf
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef inline void idle(self) noexcept:
        cdef ffpm_slot *s = self.slot
        if s.stage == FFPM_STAGE_IDLE:
            return  # still idle (a wait timed out): idle_since stays when it began
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_IDLE
        s.idle_since_ns = mono_ns()
        ffpm_slot_write_end(s)
        ffpm_idle_enter(self.header)

    cdef inline void reading(self, bint new_connection) noexcept:
        """A request's first bytes arrived: php-fpm's "Reading headers", the request's clocks start."""
        cdef ffpm_slot *s = self.slot
        cdef rusage usage
        # CPU so far, as php-fpm's times() at fpm_request_reading_headers. getrusage rather than
        # clock_gettime(CLOCK_PROCESS_CPUTIME_ID): neither is a vDSO call, and the latter, some 30 ns
        # cheaper, gives neither the user/system split %C has nor the peak RSS, so the request's end
        # would need a getrusage anyway (BENCHMARKS.md has the figures).
        getrusage(RUSAGE_SELF, &usage)
        self.utime_start_us = timeval_us(usage.ru_utime)
        self.stime_start_us = timeval_us(usage.ru_stime)
        self.measured = False
        cdef bint was_idle = s.stage == FFPM_STAGE_IDLE
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_READING_HEADERS
        if new_connection:
            # Counted when the connection brings its first bytes: php-fpm's "accepted conn"
            # counts requests taken in, and a connect-then-close is not one.
            s.accepted_conn += 1
        s.request_start_ns = mono_ns()
        s.request_start_wall_us = wall_us()
        s.status = 0
        s.content_length = -1
        s.method[0] = 0
        s.request_uri[0] = 0
        s.query_string[0] = 0
        s.script_filename[0] = 0
        s.remote_user[0] = 0
        ffpm_slot_write_end(s)
        if was_idle:
            # The last idle worker turning busy wakes the master (issue 12); no syscall otherwise.
            # After the slot's write, so the master it wakes no longer reads this slot as idle.
            ffpm_idle_leave(self.header, 1)

    cdef inline void info(self) noexcept:
        """php-fpm's "Getting request informations": the params are in, the environ is being built."""
        cdef ffpm_slot *s = self.slot
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_INFO
        ffpm_slot_write_end(s)

    cdef inline void running(self, EnvironBuilder request, int64_t content_length, bint keepalive) noexcept:
        """The application runs; the request's method, URI, query and script are shown from here."""
        cdef ffpm_slot *s = self.slot
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_RUNNING
        s.content_length = content_length
        s.keepalive = keepalive
        request.copy_param(K_REQUEST_METHOD, s.method, FFPM_METHOD_LEN)
        request.copy_param(K_REQUEST_URI, s.request_uri, FFPM_URI_LEN)
        request.copy_param(K_QUERY_STRING, s.query_string, FFPM_QUERY_LEN)
        request.copy_param(K_SCRIPT_FILENAME, s.script_filename, FFPM_SCRIPT_LEN)
        request.copy_param(K_REMOTE_USER, s.remote_user, FFPM_USER_LEN)
        ffpm_slot_write_end(s)

    cdef inline void measure_end(self) noexcept:
        """The request's CPU and the worker's peak memory, once per request: at "Finishing", when
        the application is done but the answer's end (END_REQUEST) not yet sent, so that
        pm.max_memory can still make it the last answer on its connection (as php-fpm's
        fpm_request_end comes before the request's shutdown); at request_done otherwise."""
        cdef rusage usage
        getrusage(RUSAGE_SELF, &usage)
        self.utime_end_us = timeval_us(usage.ru_utime)
        self.stime_end_us = timeval_us(usage.ru_stime)
        self.peak_memory = <uint64_t>usage.ru_maxrss * 1024  # Linux gives kilobytes
        self.measured = True

    cdef inline void finishing(self, int status) noexcept:
        cdef ffpm_slot *s = self.slot
        self.measure_end()
        ffpm_slot_write_begin(s)
        s.stage = FFPM_STAGE_FINISHING
        s.status = status
        ffpm_slot_write_end(s)

    cdef inline void request_done(self) noexcept:
        """The request ended (php-fpm's fpm_request_end): counted, timed, its CPU and the worker's
        peak memory stored, its duration counted in the pool's histogram (this slot's share)."""
        cdef ffpm_slot *s = self.slot
        if not self.measured:
            self.measure_end()  # no "Finishing" (malformed params, a broken connection)
        self.measured = False
        cdef int64_t duration = mono_ns() - s.request_start_ns
        ffpm_slot_write_begin(s)
        s.requests += 1
        s.last_request_ns = duration
        s.last_request_utime_us = self.utime_end_us - self.utime_start_us
        s.last_request_stime_us = self.stime_end_us - self.stime_start_us
        s.last_request_memory = self.peak_memory
        s.duration_sum_ns += <uint64_t>duration
        s.duration_buckets[ffpm_duration_bucket(duration)] += 1
        ffpm_slot_write_end(s)

    cdef void ending(self) noexcept:
        """The worker is on its way out."""
        if self.slot.stage == FFPM_STAGE_IDLE:
            ffpm_idle_leave(self.header, 0)  # a stopping worker wakes nobody
        ffpm_slot_write_begin(self.slot)
        self.slot.stage = FFPM_STAGE_ENDING
        ffpm_slot_write_end(self.slot)

    def bench(self, Py_ssize_t rounds):
        """Write a request's stages rounds times (reading, info, finishing, request_done, idle; not
        running, which needs a request's params), without Python between: the micro-benchmark's loop
        and the instruction count of benchmarks/callgrind_request.py --stages. Returns requests."""
        cdef Py_ssize_t i
        for i in range(rounds):
            self.reading(True)
            self.info()
            self.finishing(200)
            self.request_done()
            self.idle()
        return self.slot.requests
