/*
 * libfcgi_hello.c: a minimal responder on libfcgi (Debian's libfcgi-dev), the C reference point.
 *
 * FCGX_Init, FCGX_OpenSocket, then WORKERS forked processes each running an FCGX_Accept_r loop on
 * the shared listen socket. Each request drains FCGI_STDIN (as any real responder must) and writes
 * the response through FCGX_PutStr.
 *
 *   usage: libfcgi_hello ADDRESS WORKERS [hello|json4k|upload1m|io10ms]
 *   ADDRESS: /path/to.sock or 127.0.0.1:PORT
 *
 * Built by benchmarks/run.py at run time: cc -O2 -o libfcgi_hello libfcgi_hello.c -lfcgi
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcgiapp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 256

static pid_t children[MAX_WORKERS];
static int nchildren;
static volatile sig_atomic_t stopping;

static void on_stop(int sig)
{
    (void)sig;
    stopping = 1;
}

static char *json4k_body(size_t *len)
{
    /* The same document benchmarks/apps.py and php/json4k.php produce (62 items, 4124 bytes). */
    size_t cap = 8192, n = 0;
    char *s = malloc(cap);
    n += (size_t)snprintf(s + n, cap - n, "{\"items\":[");
    for (int i = 0; i < 62; i++)
        n += (size_t)snprintf(s + n, cap - n,
                              "%s{\"id\":%d,\"name\":\"item-%03d\",\"active\":%s,\"tags\":[\"alpha\",\"beta\"]}",
                              i ? "," : "", i, i, i % 2 == 0 ? "true" : "false");
    n += (size_t)snprintf(s + n, cap - n, "]}");
    *len = n;
    return s;
}

static void worker(int lfd, const char *mode)
{
    FCGX_Request req;
    static char drain[65536];
    char head[128];
    size_t json_len = 0;
    char *json = json4k_body(&json_len);
    int upload = !strcmp(mode, "upload1m"), sleeps = !strcmp(mode, "io10ms"), is_json = !strcmp(mode, "json4k");

    FCGX_InitRequest(&req, lfd, 0);
    while (FCGX_Accept_r(&req) >= 0) {
        size_t got = 0;
        int n;
        while ((n = FCGX_GetStr(drain, sizeof drain, req.in)) > 0)
            got += (size_t)n;
        if (sleeps) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
        }
        if (upload) {
            char body[32];
            int blen = snprintf(body, sizeof body, "%zu", got);
            int hlen = snprintf(head, sizeof head, "Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n", blen);
            FCGX_PutStr(head, hlen, req.out);
            FCGX_PutStr(body, blen, req.out);
        } else if (is_json) {
            int hlen = snprintf(head, sizeof head, "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n",
                                json_len);
            FCGX_PutStr(head, hlen, req.out);
            FCGX_PutStr(json, (int)json_len, req.out);
        } else {
            static const char hello[] = "Content-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";
            FCGX_PutStr(hello, (int)sizeof hello - 1, req.out);
        }
        FCGX_Finish_r(&req);
    }
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s ADDRESS WORKERS [hello|json4k|upload1m|io10ms]\n", argv[0]);
        return 2;
    }
    int workers = atoi(argv[2]);
    if (workers < 1 || workers > MAX_WORKERS)
        workers = 4;
    const char *mode = argc > 3 ? argv[3] : "hello";

    if (FCGX_Init() != 0) {
        fprintf(stderr, "FCGX_Init failed\n");
        return 1;
    }
    int lfd = FCGX_OpenSocket(argv[1], 1024);
    if (lfd < 0) {
        fprintf(stderr, "FCGX_OpenSocket(%s) failed\n", argv[1]);
        return 1;
    }
    if (argv[1][0] == '/')
        chmod(argv[1], 0666);
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < workers; i++) {
        pid_t pid = fork();
        if (pid == 0)
            worker(lfd, mode);
        children[nchildren++] = pid;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    fprintf(stderr, "libfcgi_hello: %d workers on %s (%s)\n", workers, argv[1], mode);
    while (!stopping) {
        pid_t pid = wait(NULL);
        if (pid < 0 && errno == ECHILD)
            break;
    }
    for (int i = 0; i < nchildren; i++)
        kill(children[i], SIGTERM);
    while (wait(NULL) > 0 || errno == EINTR)
        ;
    if (argv[1][0] == '/')
        unlink(argv[1]);
    return 0;
}
