/*
 * cpu_clocks.c - what each way of reading a process's CPU time (and peak memory) costs per call.
 *
 * The worker reads its CPU time at a request's start and end (issue 10); none of these is a vDSO
 * call, so each is a real system call, and callgrind, which counts user-space instructions only,
 * does not see what they cost. Times N calls of each, three rounds:
 *
 *     cc -O2 -o /tmp/cpu_clocks benchmarks/cpu_clocks.c && /tmp/cpu_clocks 1000000
 *
 * getrusage(RUSAGE_SELF)              user and system time apart, and ru_maxrss: what fastfpm uses
 * clock_gettime(PROCESS_CPUTIME_ID)   the total only; peak memory would need getrusage as well
 * getrusage(RUSAGE_THREAD)            this thread only (misses an app's other threads)
 * times()                             php-fpm's: clock ticks (10 ms here), too coarse for most requests
 * write("5") to /proc/self/clear_refs resets the peak RSS (would make it per request; one more call)
 * clock_gettime(CLOCK_MONOTONIC)      the vDSO clock the slot already reads, for scale
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/times.h>
#include <time.h>
#include <unistd.h>

static long long mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    volatile long sink = 0;
    int clear_refs = open("/proc/self/clear_refs", O_WRONLY);
    for (int round = 0; round < 3; round++) {
        long long t[7];
        t[0] = mono_ns();
        for (long i = 0; i < n; i++) { struct rusage r; getrusage(RUSAGE_SELF, &r); sink += r.ru_utime.tv_usec; }
        t[1] = mono_ns();
        for (long i = 0; i < n; i++) { struct timespec c; clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &c); sink += c.tv_nsec; }
        t[2] = mono_ns();
        for (long i = 0; i < n; i++) { struct rusage r; getrusage(RUSAGE_THREAD, &r); sink += r.ru_utime.tv_usec; }
        t[3] = mono_ns();
        for (long i = 0; i < n; i++) { struct tms c; sink += times(&c); }
        t[4] = mono_ns();
        for (long i = 0; i < n && clear_refs >= 0; i++)
            sink += write(clear_refs, "5", 1);
        t[5] = mono_ns();
        for (long i = 0; i < n; i++) { struct timespec c; clock_gettime(CLOCK_MONOTONIC, &c); sink += c.tv_nsec; }
        t[6] = mono_ns();
        printf("ns per call: getrusage(SELF) %.0f, clock_gettime(PROCESS_CPUTIME_ID) %.0f, "
               "getrusage(THREAD) %.0f, times %.0f, clear_refs %s%.0f, CLOCK_MONOTONIC %.0f\n",
               (t[1] - t[0]) / (double)n, (t[2] - t[1]) / (double)n, (t[3] - t[2]) / (double)n,
               (t[4] - t[3]) / (double)n, clear_refs >= 0 ? "" : "(not writable) ",
               (t[5] - t[4]) / (double)n, (t[6] - t[5]) / (double)n);
    }
    return 0;
}
