/* backend: the application behind the gateway in the mmproxy benchmark.
 *
 *     backend LISTEN_IP:PORT [[LISTEN_IPV6]:PORT ...]
 *
 * One epoll thread. For every connection it compares the address it accepted the
 * connection from with the address the client claims in its request (see common.h) and
 * answers OK or BAD. On SIGTERM or SIGINT it prints its counters as JSON and exits.
 */
#include "common.h"

#include <signal.h>
#include <sys/epoll.h>
#include <sys/sendfile.h>

#define MAX_FD 65536

enum state { READ_REQ, WAIT_EOF, ECHO, SINK, SEND_DATA };

struct conn {
    uint8_t state;
    uint8_t got;         /* request bytes read so far */
    uint8_t ok;          /* the claimed address is the one seen */
    char req[MSG_LEN];
    char seen[INET6_ADDRSTRLEN];
    uint16_t seen_port;
    uint64_t remaining;  /* upload bytes still to read, or download bytes to send */
    off_t off;           /* position in the fill memfd */
};

static struct conn conns[MAX_FD];
static volatile sig_atomic_t stopping;
static int epfd, fill_fd;
static uint64_t accepted, verified_ok, verified_bad, protocol_errors, bytes_in, bytes_out;
static uint64_t open_now, open_max;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static void watch(int fd, uint32_t events, int op)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epfd, op, fd, &ev) < 0)
        die("epoll_ctl");
}

static void drop(int fd)
{
    close(fd); /* also removes it from the epoll set */
    open_now--;
}

static int listen_on(const char *addr)
{
    union sockaddr_inet sa = parse_inet(addr);
    int fd = socket(sa.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0)
        die("socket");
    /* [::] beside 0.0.0.0 on the same port: IPv6 only, so that IPv4 peers keep their
       own address text (not ::ffff:a.b.c.d) */
    if (sa.sa.sa_family == AF_INET6 &&
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) < 0)
        die("IPV6_V6ONLY");
    if (bind(fd, &sa.sa, inet_len(&sa)) < 0 || listen(fd, 4096) < 0)
        die("bind/listen");
    return fd;
}

static void accept_all(int lfd)
{
    for (;;) {
        union sockaddr_inet peer;
        socklen_t len = sizeof peer;
        int fd = accept4(lfd, &peer.sa, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return; /* EAGAIN, or out of fds for now: the backlog keeps them */
        if (fd >= MAX_FD) {
            close(fd);
            continue;
        }
        struct conn *c = &conns[fd];
        memset(c, 0, sizeof *c);
        c->seen_port = inet_text(&peer, c->seen, sizeof c->seen);
        accepted++;
        if (++open_now > open_max)
            open_max = open_now;
        watch(fd, EPOLLIN, EPOLL_CTL_ADD);
    }
}

static int send_verdict(int fd, const struct conn *c)
{
    char reply[MSG_LEN], text[MSG_LEN];
    snprintf(text, sizeof text, "%s %s %u", c->ok ? "OK" : "BAD", c->seen, c->seen_port);
    pad_msg(reply, text);
    if (send(fd, reply, MSG_LEN, MSG_NOSIGNAL) != MSG_LEN)
        return -1;
    bytes_out += MSG_LEN;
    return 0;
}

static int sink(int fd, struct conn *c);

/* Parse the request, verify the claimed address, send the 64-byte answer. */
static int answer(int fd, struct conn *c)
{
    char mode, ip[INET6_ADDRSTRLEN + 1];
    unsigned port;
    unsigned long long size;
    if (sscanf(c->req, "%c %46s %u %llu", &mode, ip, &port, &size) != 4)
        return -1;
    c->ok = strcmp(ip, c->seen) == 0;
    c->ok ? verified_ok++ : verified_bad++;
    c->remaining = size;
    switch (mode) {
    case 'R': c->state = WAIT_EOF; break;
    case 'H': c->state = ECHO; break;
    case 'U': c->state = SINK; return sink(fd, c); /* answers after the last byte */
    case 'D': c->state = SEND_DATA; break;
    default: return -1;
    }
    if (send_verdict(fd, c) < 0)
        return -1;
    if (c->state == SEND_DATA)
        watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
    return 0;
}

static int read_request(int fd, struct conn *c)
{
    ssize_t n = recv(fd, c->req + c->got, MSG_LEN - c->got, 0);
    if (n <= 0)
        return n < 0 && errno == EAGAIN ? 0 : -1;
    c->got += (uint8_t)n;
    bytes_in += (uint64_t)n;
    return c->got == MSG_LEN ? answer(fd, c) : 0;
}

/* Upload: discard the bytes in the kernel (MSG_TRUNC), answer after the last one. */
static int sink(int fd, struct conn *c)
{
    static char scratch[1];
    while (c->remaining) {
        size_t want = c->remaining > (1u << 30) ? (1u << 30) : c->remaining;
        ssize_t n = recv(fd, scratch, want, MSG_TRUNC | MSG_DONTWAIT);
        if (n <= 0)
            return n < 0 && errno == EAGAIN ? 0 : -1;
        c->remaining -= (uint64_t)n;
        bytes_in += (uint64_t)n;
    }
    c->state = WAIT_EOF;
    return send_verdict(fd, c);
}

/* Download: sendfile() from the fill memfd until the socket is full; close when done. */
static int send_data(int fd, struct conn *c)
{
    while (c->remaining) {
        size_t want = FILL_SIZE - (size_t)c->off;
        if (want > c->remaining)
            want = c->remaining;
        ssize_t n = sendfile(fd, fill_fd, &c->off, want);
        if (n <= 0)
            return n < 0 && errno == EAGAIN ? 0 : -1;
        c->remaining -= (uint64_t)n;
        bytes_out += (uint64_t)n;
        if ((size_t)c->off == FILL_SIZE)
            c->off = 0;
    }
    return -1; /* all sent: close, the client reads until EOF */
}

/* Hold: echo whatever arrives (the liveness ping); EOF ends it. */
static int echo(int fd)
{
    char buf[4096];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n <= 0)
        return n < 0 && errno == EAGAIN ? 0 : -1;
    bytes_in += (uint64_t)n;
    if (send(fd, buf, (size_t)n, MSG_NOSIGNAL) != n)
        return -1;
    bytes_out += (uint64_t)n;
    return 0;
}

static int wait_eof(int fd)
{
    char buf[256];
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n < 0 && errno == EAGAIN)
        return 0;
    if (n > 0)
        protocol_errors++; /* nothing may follow the request */
    return -1;
}

static void on_event(int fd)
{
    struct conn *c = &conns[fd];
    int rc;
    switch (c->state) {
    case READ_REQ: rc = read_request(fd, c); break;
    case SINK: rc = sink(fd, c); break;
    case SEND_DATA: rc = send_data(fd, c); break;
    case ECHO: rc = echo(fd); break;
    default: rc = wait_eof(fd); break;
    }
    if (rc < 0)
        drop(fd);
}

static void print_stats(void)
{
    printf("{\"accepted\": %llu, \"verified_ok\": %llu, \"verified_bad\": %llu, "
           "\"protocol_errors\": %llu, \"bytes_in\": %llu, \"bytes_out\": %llu, "
           "\"open_max\": %llu, \"cpu_s\": %.3f}\n",
           (unsigned long long)accepted, (unsigned long long)verified_ok,
           (unsigned long long)verified_bad, (unsigned long long)protocol_errors,
           (unsigned long long)bytes_in, (unsigned long long)bytes_out,
           (unsigned long long)open_max, self_cpu_seconds());
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 5) {
        fprintf(stderr, "usage: backend LISTEN_IP:PORT [[LISTEN_IPV6]:PORT ...]\n");
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: epoll_wait returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    fill_fd = make_fill();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    int lfds[4], nl = argc - 1;
    for (int i = 0; i < nl; i++) {
        lfds[i] = listen_on(argv[i + 1]);
        watch(lfds[i], EPOLLIN, EPOLL_CTL_ADD);
    }
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(epfd, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd, listener = 0;
            for (int j = 0; j < nl; j++)
                listener |= fd == lfds[j];
            if (listener)
                accept_all(fd);
            else
                on_event(fd);
        }
    }
    print_stats();
    return 0;
}
