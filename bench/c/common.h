/* Shared by loadgen.c and backend.c: the benchmark's little wire protocol and helpers.
 *
 * After the PROXY header (none in the direct case) the client sends a 64-byte request:
 *     "<mode> <claimed-ip> <claimed-port> <size>"  padded with spaces, '\n' last
 * mode: R (rate: reply, then wait for EOF), H (hold: reply, then echo), U (upload: size
 * bytes follow, reply after the last), D (download: reply, then size bytes, then close).
 * The backend answers with 64 bytes "OK <seen-ip> <seen-port>" (or "BAD ...") where
 * OK means the address it accepted the connection from is the claimed one.
 */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MSG_LEN 64
#define FILL_SIZE (8u << 20) /* the memfd that sendfile() streams from */

static inline uint64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static inline void die(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, strerror(errno));
    exit(2);
}

/* "1.2.3.4:80" -> sockaddr_in; exits on a malformed address. */
static inline struct sockaddr_in parse_addr(const char *text)
{
    struct sockaddr_in sa = {.sin_family = AF_INET};
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) {
        fprintf(stderr, "bad address %s (want IPv4:port)\n", text);
        exit(2);
    }
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = '\0';
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        exit(2);
    }
    sa.sin_port = htons((uint16_t)atoi(colon + 1));
    return sa;
}

/* An IPv4 or IPv6 socket address. */
union sockaddr_inet {
    struct sockaddr sa;
    struct sockaddr_in v4;
    struct sockaddr_in6 v6;
};

static inline socklen_t inet_len(const union sockaddr_inet *a)
{
    return a->sa.sa_family == AF_INET6 ? sizeof a->v6 : sizeof a->v4;
}

/* "1.2.3.4" or "2001:db8::1" (no port) -> the address with port 0; 0 when malformed. */
static inline int parse_host(const char *host, union sockaddr_inet *out)
{
    memset(out, 0, sizeof *out);
    if (inet_pton(AF_INET, host, &out->v4.sin_addr) == 1) {
        out->v4.sin_family = AF_INET;
        return 1;
    }
    if (inet_pton(AF_INET6, host, &out->v6.sin6_addr) == 1) {
        out->v6.sin6_family = AF_INET6;
        return 1;
    }
    return 0;
}

/* "1.2.3.4:80" or "[2001:db8::1]:80" -> the socket address; exits on a malformed one. */
static inline union sockaddr_inet parse_inet(const char *text)
{
    union sockaddr_inet a;
    char host[64];
    const char *colon = strrchr(text, ':');
    const char *start = text[0] == '[' ? text + 1 : text;
    const char *end = text[0] == '[' ? colon - 1 : colon;
    if (!colon || end < start || (size_t)(end - start) >= sizeof host ||
        (text[0] == '[' && *end != ']')) {
        fprintf(stderr, "bad address %s (want IPv4:port or [IPv6]:port)\n", text);
        exit(2);
    }
    memcpy(host, start, (size_t)(end - start));
    host[end - start] = '\0';
    if (!parse_host(host, &a)) {
        fprintf(stderr, "bad address %s\n", host);
        exit(2);
    }
    uint16_t port = htons((uint16_t)atoi(colon + 1));
    if (a.sa.sa_family == AF_INET)
        a.v4.sin_port = port;
    else
        a.v6.sin6_port = port;
    return a;
}

/* The address as text (no port) and the port of an IPv4 or IPv6 socket address. */
static inline uint16_t inet_text(const union sockaddr_inet *a, char *out, size_t size)
{
    if (a->sa.sa_family == AF_INET6) {
        inet_ntop(AF_INET6, &a->v6.sin6_addr, out, (socklen_t)size);
        return ntohs(a->v6.sin6_port);
    }
    inet_ntop(AF_INET, &a->v4.sin_addr, out, (socklen_t)size);
    return ntohs(a->v4.sin_port);
}

/* Fill `out` (MSG_LEN bytes) with `text` padded with spaces and a final newline. */
static inline void pad_msg(char *out, const char *text)
{
    size_t n = strlen(text);
    if (n > MSG_LEN - 1)
        n = MSG_LEN - 1;
    memset(out, ' ', MSG_LEN);
    memcpy(out, text, n);
    out[MSG_LEN - 1] = '\n';
}

/* A memfd of FILL_SIZE bytes to sendfile() from: no user-space copy on the sender. */
static inline int make_fill(void)
{
    int fd = memfd_create("bench-fill", MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, FILL_SIZE) < 0)
        die("memfd");
    char *map = mmap(NULL, FILL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        die("mmap");
    for (size_t i = 0; i < FILL_SIZE; i++)
        map[i] = (char)('a' + i % 26);
    munmap(map, FILL_SIZE);
    return fd;
}

/* This process's own CPU seconds (user + system). */
static inline double self_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

#endif
