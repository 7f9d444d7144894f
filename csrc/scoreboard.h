/*
 * scoreboard.h - the shared-memory scoreboard: one pool header, then one slot per worker.
 *
 * The master maps it (anonymous, shared) before forking and reads it through cffi
 * (fastfpm/scoreboard.py); each worker writes only its own slot from the Cython hot loop.
 * A slot is guarded by a sequence counter (a seqlock): the writer makes it odd, stores, makes it
 * even again; a reader retries while it is odd or changed under it. A slot write takes no lock and
 * makes no system call (the request's CPU and memory figures are taken before its window opens).
 *
 * The mapping holds room for every worker that can be alive at once, old and new generations
 * together during a reload, so the slot's generation field says which one a worker belongs to.
 */
#ifndef FASTFPM_SCOREBOARD_H
#define FASTFPM_SCOREBOARD_H

#include <stdint.h>
#include <string.h>
#include <unistd.h>

/*
 * The layout, declared once. The lines between the two markers below are also the master's cffi
 * declaration: fastfpm/_scoreboard_build.py copies them, with every #define value and array length
 * turned into "..." so that the C compiler lays the structs out, and adds the prototypes of the
 * functions below. Cython cannot read a header, so fastfpm/_core.pxd declares the same by hand and
 * fastfpm/stages.py names the stages; tests/test_scoreboard_layout.py fails when either differs from
 * this. Keep the section to integer #defines, one enum and typedef'd structs.
 */
/* ---- cffi cdef begin ---- */

#define FFPM_SB_MAGIC 0x4d504646u /* "FFPM" */
#define FFPM_SB_VERSION 3u
#define FFPM_POOL_HEADER_SIZE 512 /* the slots start here: a multiple of 64 keeps them cache-aligned */
/* Request durations are counted in this many buckets: Prometheus' default bounds (.005 .01 .025 .05
 * .1 .25 .5 1 2.5 5 10 seconds, ffpm_duration_bound_ns below), then +Inf. */
#define FFPM_DURATION_BUCKETS 12

/* Request stages, php-fpm's names (fpm_request.h) plus the slot's life around them. */
enum {
    FFPM_STAGE_FREE = 0,            /* slot unused */
    FFPM_STAGE_STARTING = 1,        /* forked, importing the application */
    FFPM_STAGE_IDLE = 2,            /* waiting for a connection ("Idle") */
    FFPM_STAGE_READING_HEADERS = 3, /* connection accepted, reading BEGIN_REQUEST and PARAMS */
    FFPM_STAGE_INFO = 4,            /* building the environ ("Getting request informations") */
    FFPM_STAGE_RUNNING = 5,         /* the application runs ("Running") */
    FFPM_STAGE_FINISHING = 6,       /* response sent, closing or draining ("Finishing") */
    FFPM_STAGE_ENDING = 7           /* the worker is exiting ("Ending") */
};

#define FFPM_METHOD_LEN 16
#define FFPM_URI_LEN 256
#define FFPM_QUERY_LEN 256
#define FFPM_SCRIPT_LEN 256
#define FFPM_USER_LEN 64
#define FFPM_POOL_NAME_LEN 64

typedef struct {
    uint32_t seq;        /* odd while the worker writes the slot */
    uint32_t stage;      /* FFPM_STAGE_* */
    int32_t pid;         /* written by the master at spawn */
    uint32_t generation; /* which configuration generation the worker serves */
    uint64_t requests;   /* requests served since the worker started */
    uint64_t accepted_conn;
    int64_t started_wall;      /* process start, unix seconds (master) */
    int64_t request_start_ns;  /* monotonic ns: start of the current or last request */
    int64_t request_start_wall_us; /* wall clock, microseconds, same moment */
    int64_t last_request_ns;   /* duration of the last finished request */
    int64_t idle_since_ns;     /* monotonic ns when the worker last became idle */
    int64_t content_length;    /* of the current or last request, -1 when unknown */
    uint32_t status;           /* HTTP status of the current or last response, 0 before headers */
    uint32_t keepalive;        /* 1 while the connection was opened with FCGI_KEEP_CONN */
    char method[FFPM_METHOD_LEN];
    char request_uri[FFPM_URI_LEN];
    char query_string[FFPM_QUERY_LEN];
    char script_filename[FFPM_SCRIPT_LEN];
    /* The last finished request's CPU and memory, php-fpm's "last request cpu" / "last request
     * memory": getrusage(RUSAGE_SELF) at its start ("Reading headers") and at its end ("Finishing":
     * the application done, END_REQUEST not yet sent; else when the request ends). */
    int64_t last_request_utime_us;  /* user CPU time, microseconds */
    int64_t last_request_stime_us;  /* system CPU time, microseconds */
    uint64_t last_request_memory;   /* the worker's peak resident set at that end (ru_maxrss), bytes */
    /* Every request the worker finished, by duration (request_start_ns to its end): bucket i counts
     * durations above bound i-1 and at most bound i (not cumulative; the last is +Inf). */
    uint64_t duration_sum_ns;
    uint64_t duration_buckets[FFPM_DURATION_BUCKETS];
    char remote_user[FFPM_USER_LEN]; /* REMOTE_USER of the current or last request, "" when none */
} ffpm_slot;

/* The pool header is also the home of every pool counter php-fpm's status page shows that is not a
 * count of slots by stage (idle, active and total processes are counted from the slots when read).
 * The master writes them, each where it changes; nothing here is on a worker's request path (a
 * worker touches only the accept lock and, when it closes a slow client, the log limiter). */
typedef struct {
    uint32_t magic;
    uint32_t version;
    uint32_t nslots;
    uint32_t slot_size;        /* sizeof(ffpm_slot), checked by readers */
    int64_t started_wall;      /* pool start, unix seconds */
    uint32_t seq;              /* master: odd while it folds a freed slot into the *_retired totals */
    uint32_t listen_queue_len; /* the listen socket's backlog limit, as the kernel reports it */
    uint64_t listen_queue;     /* connections waiting to be accepted, sampled once a second */
    uint64_t listen_queue_max; /* the deepest listen queue sampled */
    uint64_t max_active_processes; /* the most workers seen busy at once (sampled once a second) */
    uint64_t max_children_reached; /* times pm.max_children stopped a spawn the pm wanted */
    uint64_t slow_requests;    /* requests that ran past request_slowlog_timeout */
    uint64_t accepted_conn_retired; /* accepted_conn of the workers whose slots were freed */
    uint64_t requests_retired; /* requests of the workers whose slots were freed */
    char pool_name[FFPM_POOL_NAME_LEN];
    /* Workers: held (CLOCK_MONOTONIC ns of taking it, 0 when free) by the one worker making the
     * shared listen socket non-blocking for a moment (see ffpm_accept_lock). */
    int64_t accept_lock_ns;
    /* The duration histogram of the workers whose slots were freed (folded in as requests_retired). */
    uint64_t duration_sum_ns_retired;
    uint64_t duration_buckets_retired[FFPM_DURATION_BUCKETS];
    /* Workers: the pool's limiter for lines about connections closed on a deadline (slow or silent
     * clients), so that an attack cannot flood the log (see ffpm_log_permit). */
    int64_t deadline_log_ns;        /* CLOCK_MONOTONIC ns of the last such line, 0: none yet */
    uint64_t deadline_log_suppressed; /* such closes not logged since that line */
    /* Workers (atomic inc/dec, see ffpm_idle_enter/ffpm_idle_leave): how many are idle; the one that
     * takes it to 0 writes a byte to wake_fd so the master can fork at once (issue 12). */
    int32_t idle_workers;
    int32_t wake_fd;           /* master: its wake pipe's write end + 1, inherited by fork; 0: none */
    uint8_t reserved[(FFPM_POOL_HEADER_SIZE - 4 * 4 - 8 - 2 * 4 - 7 * 8 - FFPM_POOL_NAME_LEN - 8 - 8
                      - 8 * FFPM_DURATION_BUCKETS - 2 * 8 - 2 * 4)];
} ffpm_pool_header;

/* A pool's totals since it started (ffpm_pool_totals): the retired ones plus every live slot's. */
typedef struct {
    uint64_t accepted_conn;
    uint64_t requests;
    uint64_t duration_sum_ns;
    uint64_t duration_buckets[FFPM_DURATION_BUCKETS];
} ffpm_totals;

/* ---- cffi cdef end ---- */

_Static_assert(sizeof(ffpm_pool_header) == FFPM_POOL_HEADER_SIZE,
               "the pool header is FFPM_POOL_HEADER_SIZE bytes: shrink reserved");

/* The upper bounds of the duration buckets but the last (+Inf), nanoseconds. Prometheus' default
 * buckets (client_golang's DefBuckets), so a pool's histogram sums with other services' defaults. */
static const int64_t ffpm_duration_bounds_ns[FFPM_DURATION_BUCKETS - 1] = {
    5000000, 10000000, 25000000, 50000000, 100000000, 250000000, 500000000,
    1000000000, 2500000000, 5000000000, 10000000000,
};

/* The upper bound of bucket i in nanoseconds; INT64_MAX for the last (+Inf). */
static inline int64_t ffpm_duration_bound_ns(uint32_t i)
{
    return i < FFPM_DURATION_BUCKETS - 1 ? ffpm_duration_bounds_ns[i] : INT64_MAX;
}

/* The bucket a request of duration ns is counted in: the first whose bound it does not exceed
 * (a bucket counts durations <= its bound, Prometheus' `le`). Most requests stop at the first. */
static inline uint32_t ffpm_duration_bucket(int64_t ns)
{
    uint32_t i = 0;
    while (i < FFPM_DURATION_BUCKETS - 1 && ns > ffpm_duration_bounds_ns[i])
        i++;
    return i;
}

/* CPU time as a percentage of a duration, in hundredths of a percent rounded half up: php-fpm's
 * "last request cpu" and %C (cpu / duration * 100, printed "%.2f"); 0 for an empty duration. One
 * definition for the access log (Cython) and the status page (cffi), so both print the same digits,
 * and an integer, so the log writes them without snprintf. 128-bit: cpu_us * 10^7 passes 2^63
 * after ten days of CPU. */
static inline int64_t ffpm_cpu_hundredths(int64_t cpu_us, int64_t duration_ns)
{
    if (duration_ns <= 0 || cpu_us <= 0)
        return 0;
    unsigned __int128 twice = (unsigned __int128)cpu_us * 20000000u + (unsigned __int128)duration_ns;
    return (int64_t)(twice / (2 * (unsigned __int128)duration_ns));
}

/*
 * A worker holding kept-alive connections must not sleep in accept(), so it makes the listen
 * socket non-blocking around one accept() call. O_NONBLOCK belongs to the socket every worker
 * shares: two workers doing this at once could leave it blocking under the second's accept().
 * This lock lets one do it at a time; a holder that died is ignored after stale_ns.
 */
static inline int ffpm_accept_lock(ffpm_pool_header *h, int64_t now_ns, int64_t stale_ns)
{
    int64_t seen = __atomic_load_n(&h->accept_lock_ns, __ATOMIC_RELAXED);
    if (seen != 0 && now_ns - seen < stale_ns)
        return 0;
    return __atomic_compare_exchange_n(&h->accept_lock_ns, &seen, now_ns, 0, __ATOMIC_ACQUIRE,
                                       __ATOMIC_RELAXED);
}

/*
 * A worker closed a connection on a deadline: may it log a line about it now? At most one line per
 * interval_ns for the whole pool (every worker shares the header). Returns how many such closes
 * were not logged since the last line (the line says so), or -1: not now, this one is counted.
 */
static inline int64_t ffpm_log_permit(ffpm_pool_header *h, int64_t now_ns, int64_t interval_ns)
{
    int64_t last = __atomic_load_n(&h->deadline_log_ns, __ATOMIC_RELAXED);
    if ((last != 0 && now_ns - last < interval_ns)
        || !__atomic_compare_exchange_n(&h->deadline_log_ns, &last, now_ns, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_RELAXED)) {
        __atomic_add_fetch(&h->deadline_log_suppressed, 1, __ATOMIC_RELAXED);
        return -1;
    }
    return (int64_t)__atomic_exchange_n(&h->deadline_log_suppressed, 0, __ATOMIC_ACQ_REL);
}

static inline void ffpm_accept_unlock(ffpm_pool_header *h) { __atomic_store_n(&h->accept_lock_ns, 0, __ATOMIC_RELEASE); }

/* Worker: its slot turned idle (call on the transition only). One atomic add, no system call. */
static inline void ffpm_idle_enter(ffpm_pool_header *h) { __atomic_add_fetch(&h->idle_workers, 1, __ATOMIC_RELAXED); }

/* Worker (or the master for a reaped slot): an idle slot stops being idle. When wake is set and
 * no idle worker is left, one byte goes to the master's wake pipe (non-blocking: a full pipe,
 * EAGAIN, already means "wake up"), so the only system call is on that transition. */
static inline int ffpm_idle_leave(ffpm_pool_header *h, int wake)
{
    int32_t left = __atomic_sub_fetch(&h->idle_workers, 1, __ATOMIC_RELAXED);
    int32_t fd = __atomic_load_n(&h->wake_fd, __ATOMIC_RELAXED);
    if (wake && left <= 0 && fd > 0) {
        ssize_t ignored = write(fd - 1, "!", 1);
        (void)ignored;
    }
    return left;
}

static inline ffpm_slot *ffpm_slots(void *base) { return (ffpm_slot *)((char *)base + sizeof(ffpm_pool_header)); }

static inline size_t ffpm_scoreboard_size(uint32_t nslots)
{
    return sizeof(ffpm_pool_header) + (size_t)nslots * sizeof(ffpm_slot);
}

/* Writer side (the worker). The release fences keep the compiler and CPU from moving the stores
 * outside the odd window; the plain stores in between are ordinary memory writes. */
static inline void ffpm_slot_write_begin(ffpm_slot *s)
{
    __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void ffpm_slot_write_end(ffpm_slot *s) { __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELEASE); }

/* Copy src (len bytes, not NUL-terminated) into a fixed field, truncated and NUL-terminated. */
static inline void ffpm_copy_field(char *dst, size_t cap, const char *src, size_t len)
{
    if (len >= cap)
        len = cap - 1;
    memcpy(dst, src, len);
    dst[len] = 0;
}

/* Reader side (the master): a consistent copy of one slot; returns 0, or -1 if the writer kept it
 * busy for every try (the caller then uses the last copy, which may mix two moments). */
static inline int ffpm_slot_read(const ffpm_slot *s, ffpm_slot *out)
{
    for (int tries = 0; tries < 1000; tries++) {
        uint32_t before = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if (before & 1)
            continue;
        memcpy(out, (const void *)s, sizeof *out);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) == before)
            return 0;
    }
    memcpy(out, (const void *)s, sizeof *out);
    return -1;
}

/* Master side: the worker of slot s was reaped; free its slot and move what it counted into the
 * pool's *_retired totals, in one step that ffpm_pool_totals never sees half done (the header's own
 * sequence counter), so accepted conn, requests and the duration histogram never go back when a
 * worker is replaced. */
static inline void ffpm_slot_release(ffpm_pool_header *h, ffpm_slot *s)
{
    __atomic_store_n(&h->seq, h->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    h->accepted_conn_retired += __atomic_load_n(&s->accepted_conn, __ATOMIC_RELAXED);
    h->requests_retired += __atomic_load_n(&s->requests, __ATOMIC_RELAXED);
    h->duration_sum_ns_retired += __atomic_load_n(&s->duration_sum_ns, __ATOMIC_RELAXED);
    for (uint32_t b = 0; b < FFPM_DURATION_BUCKETS; b++)
        h->duration_buckets_retired[b] += __atomic_load_n(&s->duration_buckets[b], __ATOMIC_RELAXED);
    s->pid = 0;
    if (__atomic_load_n(&s->stage, __ATOMIC_RELAXED) == FFPM_STAGE_IDLE)
        ffpm_idle_leave(h, 0);  /* died idle (SIGKILL, a crash): no longer counted */
    __atomic_store_n(&s->stage, FFPM_STAGE_FREE, __ATOMIC_RELAXED);
    __atomic_store_n(&h->seq, h->seq + 1, __ATOMIC_RELEASE);
}

/* Add what one live slot counted to t, read under the slot's sequence counter so that its requests
 * and its histogram are of one moment (after 1000 busy tries, as they are). */
static inline void ffpm_totals_add_slot(ffpm_totals *t, const ffpm_slot *s)
{
    ffpm_totals one;
    for (int tries = 0;; tries++) {
        uint32_t before = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        one.accepted_conn = s->accepted_conn;
        one.requests = s->requests;
        one.duration_sum_ns = s->duration_sum_ns;
        memcpy(one.duration_buckets, (const void *)s->duration_buckets, sizeof one.duration_buckets);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if ((!(before & 1) && __atomic_load_n(&s->seq, __ATOMIC_RELAXED) == before) || tries >= 1000)
            break;
    }
    t->accepted_conn += one.accepted_conn;
    t->requests += one.requests;
    t->duration_sum_ns += one.duration_sum_ns;
    for (uint32_t b = 0; b < FFPM_DURATION_BUCKETS; b++)
        t->duration_buckets[b] += one.duration_buckets[b];
}

/* Reader side (master or worker): accepted connections, requests and the duration histogram of the
 * pool since it started, the retired totals plus every live slot's own counts. Returns 0, or -1 if
 * the master kept the header busy for every try (the figures may then count one worker twice or
 * not at all). */
static inline int ffpm_pool_totals(const ffpm_pool_header *h, ffpm_totals *out)
{
    const ffpm_slot *slots = (const ffpm_slot *)((const char *)h + sizeof(ffpm_pool_header));
    uint32_t n = h->nslots;
    for (int tries = 0;; tries++) {
        uint32_t before = __atomic_load_n(&h->seq, __ATOMIC_ACQUIRE);
        ffpm_totals t;
        t.accepted_conn = h->accepted_conn_retired;
        t.requests = h->requests_retired;
        t.duration_sum_ns = h->duration_sum_ns_retired;
        memcpy(t.duration_buckets, (const void *)h->duration_buckets_retired, sizeof t.duration_buckets);
        for (uint32_t i = 0; i < n; i++) {
            if (__atomic_load_n(&slots[i].pid, __ATOMIC_RELAXED) != 0)
                ffpm_totals_add_slot(&t, &slots[i]);
        }
        *out = t;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (!(before & 1) && __atomic_load_n(&h->seq, __ATOMIC_RELAXED) == before)
            return 0;
        if (tries >= 1000)
            return -1;
    }
}

#endif
