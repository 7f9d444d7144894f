/*
 * raw_hello.c: the floor for any FastCGI backend behind nginx.
 *
 * The parent opens the listen socket and forks WORKERS children. Each child loops: accept, read
 * records until the empty FCGI_STDIN record, write a prebuilt FCGI_STDOUT + empty FCGI_STDOUT +
 * FCGI_END_REQUEST in one write, and close (or, when nginx set FCGI_KEEP_CONN, read the next
 * request on the same connection). No environ, no parsing of params: only what the protocol
 * forces every backend to do.
 *
 *   usage: raw_hello ADDRESS WORKERS [hello|json4k|upload1m|io10ms]
 *   ADDRESS: /path/to.sock or 127.0.0.1:PORT
 *
 * Built by benchmarks/run.py at run time: cc -O2 -o raw_hello raw_hello.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FCGI_BEGIN_REQUEST 1
#define FCGI_END_REQUEST 3
#define FCGI_STDIN 5
#define FCGI_STDOUT 6
#define FCGI_KEEP_CONN 1
#define MAX_WORKERS 256

enum mode { MODE_HELLO, MODE_JSON4K, MODE_UPLOAD, MODE_SLEEP };

static enum mode mode = MODE_HELLO;
static unsigned char *prebuilt; /* the whole response for request id 1 */
static size_t prebuilt_len;
static pid_t children[MAX_WORKERS];
static int nchildren;
static volatile sig_atomic_t stopping;

static void put_header(unsigned char *p, int type, unsigned id, unsigned clen, unsigned plen)
{
    p[0] = 1;
    p[1] = (unsigned char)type;
    p[2] = (unsigned char)(id >> 8);
    p[3] = (unsigned char)id;
    p[4] = (unsigned char)(clen >> 8);
    p[5] = (unsigned char)clen;
    p[6] = (unsigned char)plen;
    p[7] = 0;
}

/* STDOUT(head+body) + empty STDOUT + END_REQUEST into out; returns the length. */
static size_t build_response(unsigned char *out, unsigned id, const char *ctype, const char *body,
                             size_t body_len)
{
    char head[256];
    int hlen = snprintf(head, sizeof head, "Content-Type: %s\r\nContent-Length: %zu\r\n\r\n", ctype, body_len);
    size_t clen = (size_t)hlen + body_len; /* callers keep this under 65535 */
    unsigned plen = (unsigned)((8 - clen % 8) % 8);
    unsigned char *p = out;
    put_header(p, FCGI_STDOUT, id, (unsigned)clen, plen);
    p += 8;
    memcpy(p, head, (size_t)hlen);
    p += hlen;
    memcpy(p, body, body_len);
    p += body_len;
    memset(p, 0, plen);
    p += plen;
    put_header(p, FCGI_STDOUT, id, 0, 0);
    p += 8;
    put_header(p, FCGI_END_REQUEST, id, 8, 0);
    p += 8;
    memset(p, 0, 8); /* appStatus 0, FCGI_REQUEST_COMPLETE */
    p += 8;
    return (size_t)(p - out);
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

static int write_all(int fd, const unsigned char *p, size_t len)
{
    while (len > 0) {
        ssize_t w = send(fd, p, len, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

static int respond(int fd, unsigned id, size_t stdin_bytes)
{
    if (mode == MODE_SLEEP) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
            ;
    }
    if (mode == MODE_UPLOAD) {
        unsigned char out[512];
        char body[32];
        int blen = snprintf(body, sizeof body, "%zu", stdin_bytes);
        size_t len = build_response(out, id, "text/plain", body, (size_t)blen);
        return write_all(fd, out, len);
    }
    if (id != 1) { /* nginx always uses request id 1; patch the ids for anyone else */
        unsigned char *copy = malloc(prebuilt_len);
        memcpy(copy, prebuilt, prebuilt_len);
        size_t off = 0;
        while (off < prebuilt_len) {
            copy[off + 2] = (unsigned char)(id >> 8);
            copy[off + 3] = (unsigned char)id;
            off += 8 + (size_t)((copy[off + 4] << 8) | copy[off + 5]) + copy[off + 6];
        }
        int rc = write_all(fd, copy, prebuilt_len);
        free(copy);
        return rc;
    }
    return write_all(fd, prebuilt, prebuilt_len);
}

/* Serve one connection until it is closed (or, without FCGI_KEEP_CONN, until one response is sent). */
static void serve(int fd)
{
    static unsigned char buf[65536 + 8 + 256 + 4096];
    size_t len = 0, stdin_bytes = 0;
    unsigned id = 1;
    int keep = 0;
    for (;;) {
        ssize_t n = read(fd, buf + len, sizeof buf - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        len += (size_t)n;
        size_t off = 0;
        while (len - off >= 8) {
            const unsigned char *h = buf + off;
            size_t clen = ((size_t)h[4] << 8) | h[5];
            size_t total = 8 + clen + h[6];
            if (len - off < total)
                break;
            if (h[1] == FCGI_BEGIN_REQUEST && clen >= 8) {
                id = ((unsigned)h[2] << 8) | h[3];
                keep = h[8 + 2] & FCGI_KEEP_CONN;
                stdin_bytes = 0;
            } else if (h[1] == FCGI_STDIN) {
                if (clen == 0) {
                    if (respond(fd, id, stdin_bytes) < 0 || !keep)
                        return;
                } else {
                    stdin_bytes += clen;
                }
            }
            off += total;
        }
        if (off > 0) {
            memmove(buf, buf + off, len - off);
            len -= off;
        }
    }
}

static int open_listener(const char *address)
{
    int fd;
    if (address[0] == '/') {
        struct sockaddr_un sun;
        memset(&sun, 0, sizeof sun);
        sun.sun_family = AF_UNIX;
        strncpy(sun.sun_path, address, sizeof sun.sun_path - 1);
        unlink(address);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0)
            return -1;
        chmod(address, 0666);
    } else {
        char host[64];
        const char *colon = strrchr(address, ':');
        if (!colon || (size_t)(colon - address) >= sizeof host)
            return -1;
        memcpy(host, address, (size_t)(colon - address));
        host[colon - address] = '\0';
        struct sockaddr_in sin;
        memset(&sin, 0, sizeof sin);
        sin.sin_family = AF_INET;
        sin.sin_port = htons((unsigned short)atoi(colon + 1));
        if (inet_pton(AF_INET, host[0] ? host : "0.0.0.0", &sin.sin_addr) != 1)
            return -1;
        fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0)
            return -1;
    }
    if (listen(fd, 1024) < 0)
        return -1;
    return fd;
}

static void on_stop(int sig)
{
    (void)sig;
    stopping = 1;
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
    const char *m = argc > 3 ? argv[3] : "hello";
    if (!strcmp(m, "json4k"))
        mode = MODE_JSON4K;
    else if (!strcmp(m, "upload1m"))
        mode = MODE_UPLOAD;
    else if (!strcmp(m, "io10ms"))
        mode = MODE_SLEEP;

    size_t body_len;
    char *body;
    const char *ctype = "text/plain";
    if (mode == MODE_JSON4K) {
        body = json4k_body(&body_len);
        ctype = "application/json";
    } else {
        body = "Hello, world!";
        body_len = strlen(body);
    }
    prebuilt = malloc(body_len + 512);
    prebuilt_len = build_response(prebuilt, 1, ctype, body, body_len);

    int lfd = open_listener(argv[1]);
    if (lfd < 0) {
        perror("listen");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < workers; i++) {
        pid_t pid = fork();
        if (pid == 0) {
            signal(SIGTERM, SIG_DFL);
            signal(SIGINT, SIG_DFL);
            for (;;) {
                int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (cfd < 0)
                    continue;
                serve(cfd);
                close(cfd);
            }
        }
        children[nchildren++] = pid;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    fprintf(stderr, "raw_hello: %d workers on %s (%s)\n", workers, argv[1], m);
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
