/*
 * What accept_now's O_NONBLOCK toggle costs: F_SETFL on a listening unix socket, set and cleared
 * N times (two calls per accept_now; see fastfpm/_loop.pxi and docs/architecture.md).
 *
 *     cc -O2 -o /tmp/fcntl_cost benchmarks/fcntl_cost.c && /tmp/fcntl_cost 1000000
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    struct sockaddr_un addr = {.sun_family = AF_UNIX, .sun_path = "\0fastfpm-fcntl-cost"};
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 16) < 0) {
        perror("listening socket");
        return 1;
    }
    int flags = fcntl(fd, F_GETFL);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++) {
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
        fcntl(fd, F_SETFL, flags);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);
    printf("%.0f ns per fcntl(F_SETFL), %ld pairs\n", ns / n / 2, n);
    return 0;
}
