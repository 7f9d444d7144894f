# C declarations for the hot loop: the codec (csrc/fcgi.h), the scoreboard (csrc/scoreboard.h)
# and the few system calls the worker makes. Kept apart from _core.pyx, as httptools does.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "fcgi.h" nogil:
    enum:
        FCGI_HEADER_LEN
        FCGI_VERSION_1
        FCGI_MAX_CONTENT
        FCGI_BEGIN_REQUEST
        FCGI_ABORT_REQUEST
        FCGI_END_REQUEST
        FCGI_PARAMS
        FCGI_STDIN
        FCGI_STDOUT
        FCGI_STDERR
        FCGI_DATA
        FCGI_GET_VALUES
        FCGI_GET_VALUES_RESULT
        FCGI_UNKNOWN_TYPE
        FCGI_RESPONDER
        FCGI_AUTHORIZER
        FCGI_FILTER
        FCGI_KEEP_CONN
        FCGI_REQUEST_COMPLETE
        FCGI_CANT_MPX_CONN
        FCGI_OVERLOADED
        FCGI_UNKNOWN_ROLE
        FCGI_NEED_MORE
        FCGI_ERR_VERSION
        FCGI_ERR_TRUNCATED
        FCGI_ERR_LENGTH
        FCGI_ERR_REQUEST_ID

    ctypedef struct fcgi_header:
        uint8_t version
        uint8_t type
        uint16_t request_id
        uint16_t content_length
        uint8_t padding_length

    long fcgi_parse_header(const uint8_t *buf, size_t len, fcgi_header *hdr)
    long fcgi_parse_record(const uint8_t *buf, size_t len, fcgi_header *hdr)
    int fcgi_check_header(const fcgi_header *hdr)
    int fcgi_parse_begin_request(const uint8_t *content, size_t len, int *role, int *flags)
    int fcgi_head_ready(const uint8_t *buf, size_t len)
    long fcgi_parse_pair(const uint8_t *buf, size_t len, size_t *name_off, size_t *name_len,
                         size_t *value_off, size_t *value_len)
    unsigned fcgi_padding(size_t content_length)
    size_t fcgi_write_header(uint8_t *out, int type, int request_id, size_t content_length,
                             unsigned padding)
    size_t fcgi_write_record(uint8_t *out, int type, int request_id, const uint8_t *content, size_t len)
    size_t fcgi_stream_size(size_t len)
    size_t fcgi_write_stream(uint8_t *out, int type, int request_id, const uint8_t *data, size_t len)
    size_t fcgi_write_begin_request(uint8_t *out, int request_id, int role, int flags)
    size_t fcgi_write_end_request(uint8_t *out, int request_id, uint32_t app_status, int protocol_status)
    size_t fcgi_write_unknown_type(uint8_t *out, int record_type)
    size_t fcgi_pair_size(size_t name_len, size_t value_len)
    size_t fcgi_write_pair(uint8_t *out, const uint8_t *name, size_t name_len, const uint8_t *value,
                           size_t value_len)


cdef extern from "scoreboard.h" nogil:
    # By hand, as Cython cannot read the header: tests/test_scoreboard_layout.py fails when this block
    # and csrc/scoreboard.h's layout section differ (a constant, a stage, a field or its type).
    enum:
        FFPM_SB_MAGIC
        FFPM_SB_VERSION
        FFPM_POOL_HEADER_SIZE
        FFPM_DURATION_BUCKETS
        FFPM_STAGE_FREE
        FFPM_STAGE_STARTING
        FFPM_STAGE_IDLE
        FFPM_STAGE_READING_HEADERS
        FFPM_STAGE_INFO
        FFPM_STAGE_RUNNING
        FFPM_STAGE_FINISHING
        FFPM_STAGE_ENDING
        FFPM_METHOD_LEN
        FFPM_URI_LEN
        FFPM_QUERY_LEN
        FFPM_SCRIPT_LEN
        FFPM_USER_LEN
        FFPM_POOL_NAME_LEN

    ctypedef struct ffpm_slot:
        uint32_t seq
        uint32_t stage
        int pid
        uint32_t generation
        uint64_t requests
        uint64_t accepted_conn
        int64_t started_wall
        int64_t request_start_ns
        int64_t request_start_wall_us
        int64_t last_request_ns
        int64_t idle_since_ns
        int64_t content_length
        uint32_t status
        uint32_t keepalive
        char method[FFPM_METHOD_LEN]
        char request_uri[FFPM_URI_LEN]
        char query_string[FFPM_QUERY_LEN]
        char script_filename[FFPM_SCRIPT_LEN]
        int64_t last_request_utime_us
        int64_t last_request_stime_us
        uint64_t last_request_memory
        uint64_t duration_sum_ns
        uint64_t duration_buckets[FFPM_DURATION_BUCKETS]
        char remote_user[FFPM_USER_LEN]

    # The master writes everything here but accept_lock_ns and the deadline log limiter (workers).
    ctypedef struct ffpm_pool_header:
        uint32_t magic
        uint32_t version
        uint32_t nslots
        uint32_t slot_size
        int64_t started_wall
        uint32_t seq
        uint32_t listen_queue_len
        uint64_t listen_queue
        uint64_t listen_queue_max
        uint64_t max_active_processes
        uint64_t max_children_reached
        uint64_t slow_requests
        uint64_t accepted_conn_retired
        uint64_t requests_retired
        char pool_name[FFPM_POOL_NAME_LEN]
        int64_t accept_lock_ns
        uint64_t duration_sum_ns_retired
        uint64_t duration_buckets_retired[FFPM_DURATION_BUCKETS]
        int64_t deadline_log_ns
        uint64_t deadline_log_suppressed
        int idle_workers
        int wake_fd
        uint8_t reserved[224]

    # Read by the master (ffpm_pool_totals); declared here because every struct of the header is.
    ctypedef struct ffpm_totals:
        uint64_t accepted_conn
        uint64_t requests
        uint64_t duration_sum_ns
        uint64_t duration_buckets[FFPM_DURATION_BUCKETS]

    ffpm_slot *ffpm_slots(void *base)
    bint ffpm_accept_lock(ffpm_pool_header *h, int64_t now_ns, int64_t stale_ns)
    void ffpm_accept_unlock(ffpm_pool_header *h)
    void ffpm_idle_enter(ffpm_pool_header *h)
    int ffpm_idle_leave(ffpm_pool_header *h, int wake)
    int64_t ffpm_log_permit(ffpm_pool_header *h, int64_t now_ns, int64_t interval_ns)
    void ffpm_slot_write_begin(ffpm_slot *s)
    void ffpm_slot_write_end(ffpm_slot *s)
    void ffpm_copy_field(char *dst, size_t cap, const char *src, size_t len)
    uint32_t ffpm_duration_bucket(int64_t ns)
    int64_t ffpm_cpu_hundredths(int64_t cpu_us, int64_t duration_ns)


# getrusage(RUSAGE_SELF): a request's CPU time and the worker's peak resident set (SlotWriter).
from posix.resource cimport RUSAGE_SELF, getrusage, rusage
from posix.time cimport timeval


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
        CLOCK_REALTIME
    int clock_gettime(int clk, timespec *ts)


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    enum:
        MSG_NOSIGNAL
        MSG_DONTWAIT
        SOCK_CLOEXEC
        SHUT_WR
    int setsockopt(int fd, int level, int name, const void *value, socklen_t length)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    ssize_t recv(int fd, void *buf, size_t len, int flags)
    ssize_t send(int fd, const void *buf, size_t len, int flags)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    int shutdown(int fd, int how)


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_CORK

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
    int poll(pollfd *fds, unsigned long nfds, int timeout)


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EINTR
        EAGAIN
        ETIMEDOUT
        ECONNABORTED
        EMFILE
        ENFILE
        ENOBUFS
        ENOMEM


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int getppid()


cdef extern from "<fcntl.h>" nogil:
    enum:
        F_GETFL
        F_SETFL
        O_NONBLOCK
    int fcntl(int fd, int cmd, ...)


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLET
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
