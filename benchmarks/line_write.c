/* What the kernel side of one access-log line costs: write() of a 61-byte line to an O_APPEND
 * file, N times (cc -O2 -o /tmp/line_write benchmarks/line_write.c && /tmp/line_write 500000). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    const char *line = "127.0.0.1 -  02/Dec/2026:14:23:43 +0000 \"GET /index.php\" 200\n";
    size_t len = strlen(line);
    int fd = open("/tmp/wr.log", O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0644);
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (int i = 0; i < n; i++) if (write(fd, line, len) != (ssize_t)len) return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.0f ns per write of %zu bytes\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n, len);
    unlink("/tmp/wr.log");
    return 0;
}
