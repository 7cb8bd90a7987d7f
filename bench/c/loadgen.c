/* loadgen: the client side of the mmproxy benchmark (one process; the harness runs
 * several for the rate test).
 *
 *   loadgen --mode rate|hold|up|down|header --target IP:PORT [--proxy none|v1|v2]
 *           [--sources IP,IP,...] [--conc N] [--duration S] [--count N] [--size BYTES]
 *           [--tuple-base N] [--tuple-step N] [--tuple-index N] [--lat-file PATH]
 *
 * Every connection claims a client address: with a PROXY header, a fake one from
 * 203.0.113.0/24 and 192.0.2.0/24 (tuple number t -> address t % 508, port 1024 + t / 508
 * % 64000, so that no 4-tuple is used twice in a run of the benchmark), or with an IPv6
 * target from 2001:db8:f00::/64 (address 2001:db8:f00::(t % 508 + 1), the same port);
 * without one (the direct case), its own. The target's family is the whole run's: the
 * sources, the header (TCP4 or TCP6) and the fake clients follow it. The backend answers OK only if it saw the claimed address.
 * Results are printed as one JSON object; `hold` prints "held N failed M" first, then
 * waits for a line on stdin before it proves every held connection alive.
 */
#include "common.h"

#include <getopt.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/sendfile.h>

#define MAX_SOURCES 64
#define FAKE_ADDRS 508
#define FAKE_PORTS 64000

enum mode { RATE, HOLD, UP, DOWN, HEADER };
enum state { FREE, CONNECTING, WAIT_REPLY, HELD, PINGING, ALIVE, DEAD };

struct opts {
    enum mode mode;
    union sockaddr_inet target;
    int proxy; /* 0: none (direct), 1: v1, 2: v2 */
    union sockaddr_inet sources[MAX_SOURCES];
    int nsources;
    int conc;
    double duration, timeout;
    long count;
    unsigned long long size;
    uint64_t tuple_base, tuple_step, tuple_index;
    const char *lat_file;
};

struct slot {
    int fd;
    uint8_t state, got;
    uint64_t t0;
    union sockaddr_inet claim; /* the claimed client address and port */
    char reply[MSG_LEN];
};

struct counts {
    uint64_t started, completed, verified, port_match, errors, timeouts;
};

static struct opts o = {.proxy = 1, .conc = 16, .duration = 10, .timeout = 10, .count = 1000};
static struct counts k;
static int epfd;
static uint64_t next_tuple; /* how many tuples this process has used */
static unsigned next_source;
static long nstate[DEAD + 1]; /* slots in each state (FREE not counted) */
static long peak_held;        /* most connections held at once */
static uint32_t *lat;
static size_t nlat, cap_lat;

/* --- addresses and the hello (PROXY header + request) ------------------------------ */

static void fake_client(uint64_t t, union sockaddr_inet *claim)
{
    unsigned idx = (unsigned)(t % FAKE_ADDRS);
    uint16_t port = htons((uint16_t)(1024 + (t / FAKE_ADDRS) % FAKE_PORTS));
    memset(claim, 0, sizeof *claim);
    if (o.target.sa.sa_family == AF_INET6) {
        static const uint8_t prefix[8] = {0x20, 0x01, 0x0d, 0xb8, 0x0f, 0x00, 0, 0};
        claim->v6.sin6_family = AF_INET6;
        memcpy(claim->v6.sin6_addr.s6_addr, prefix, sizeof prefix);
        claim->v6.sin6_addr.s6_addr[14] = (uint8_t)((idx + 1) >> 8);
        claim->v6.sin6_addr.s6_addr[15] = (uint8_t)(idx + 1);
        claim->v6.sin6_port = port;
        return;
    }
    uint32_t a = idx < 254 ? (203u << 24 | 113u << 8 | (idx + 1))
                           : (192u << 24 | 2u << 8 | (idx - 254 + 1));
    claim->v4.sin_family = AF_INET;
    claim->v4.sin_addr.s_addr = htonl(a);
    claim->v4.sin_port = port;
}

static void take_fake_client(struct slot *s)
{
    uint64_t t = o.tuple_base + o.tuple_index + o.tuple_step * next_tuple++;
    fake_client(t, &s->claim);
}

/* v2's address block: source and destination addresses, then their ports. */
static size_t v2_addresses(char *out, const union sockaddr_inet *src,
                           const union sockaddr_inet *dst)
{
    if (dst->sa.sa_family == AF_INET6) {
        memcpy(out, &src->v6.sin6_addr, 16);
        memcpy(out + 16, &dst->v6.sin6_addr, 16);
        memcpy(out + 32, &src->v6.sin6_port, 2);
        memcpy(out + 34, &dst->v6.sin6_port, 2);
        return 36;
    }
    memcpy(out, &src->v4.sin_addr, 4);
    memcpy(out + 4, &dst->v4.sin_addr, 4);
    memcpy(out + 8, &src->v4.sin_port, 2);
    memcpy(out + 10, &dst->v4.sin_port, 2);
    return 12;
}

static size_t proxy_header(char *out, const struct slot *s)
{
    const union sockaddr_inet *dst = &o.target;
    int six = dst->sa.sa_family == AF_INET6;
    if (o.proxy == 1) {
        char src_ip[INET6_ADDRSTRLEN], dst_ip[INET6_ADDRSTRLEN];
        unsigned sport = inet_text(&s->claim, src_ip, sizeof src_ip);
        unsigned dport = inet_text(dst, dst_ip, sizeof dst_ip);
        return (size_t)sprintf(out, "PROXY TCP%c %s %s %u %u\r\n", six ? '6' : '4', src_ip,
                               dst_ip, sport, dport);
    }
    static const char sig[12] = "\r\n\r\n\0\r\nQUIT\n";
    memcpy(out, sig, 12);
    out[12] = 0x21;              /* version 2, PROXY */
    out[13] = six ? 0x21 : 0x11; /* TCP over IPv6 or IPv4 */
    uint16_t len = htons((uint16_t)v2_addresses(out + 16, &s->claim, dst));
    memcpy(out + 14, &len, 2);
    return 16 + ntohs(len);
}

/* Header (if any) and the 64-byte request, in one buffer: one send(). */
static size_t build_hello(char *out, struct slot *s, char mode, unsigned long long size)
{
    size_t n = 0;
    if (o.proxy) {
        n = proxy_header(out, s);
    } else { /* direct: claim our own address */
        socklen_t len = sizeof s->claim;
        getsockname(s->fd, &s->claim.sa, &len);
    }
    char ip[INET6_ADDRSTRLEN], text[MSG_LEN];
    unsigned port = inet_text(&s->claim, ip, sizeof ip);
    snprintf(text, sizeof text, "%c %s %u %llu", mode, ip, port, size);
    pad_msg(out + n, text);
    return n + MSG_LEN;
}

/* Did the backend see the claimed address? Counts verified and port-preserved replies. */
static int check_reply(const struct slot *s)
{
    char ip[INET6_ADDRSTRLEN + 1], claim[INET6_ADDRSTRLEN];
    unsigned port;
    if (strncmp(s->reply, "OK ", 3) != 0 || sscanf(s->reply + 3, "%46s %u", ip, &port) != 2)
        return 0;
    unsigned claim_port = inet_text(&s->claim, claim, sizeof claim);
    if (strcmp(ip, claim) != 0)
        return 0;
    k.verified++;
    if (port == claim_port)
        k.port_match++;
    return 1;
}

static void set_state(struct slot *s, int state)
{
    if (s->state != FREE)
        nstate[s->state]--;
    if (state != FREE)
        nstate[state]++;
    if (state == HELD && nstate[HELD] > peak_held)
        peak_held = nstate[HELD];
    s->state = (uint8_t)state;
}

/* --- sockets ---------------------------------------------------------------------- */

static int open_socket(int nonblock)
{
    int fd = socket(o.target.sa.sa_family, SOCK_STREAM | SOCK_CLOEXEC | (nonblock ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    if (o.nsources) {
        const union sockaddr_inet *src =
            &o.sources[(o.tuple_index + next_source++) % (unsigned)o.nsources];
        if (bind(fd, &src->sa, inet_len(src)) < 0) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

static void watch(int fd, uint32_t events, uint32_t slot, int op)
{
    struct epoll_event ev = {.events = events, .data.u32 = slot};
    epoll_ctl(epfd, op, fd, &ev);
}

/* Start a non-blocking connect in slot i; on an immediate failure the slot stays FREE. */
static void start(struct slot *slots, uint32_t i)
{
    struct slot *s = &slots[i];
    s->got = 0;
    s->t0 = now_us();
    k.started++;
    if (o.proxy)
        take_fake_client(s);
    s->fd = open_socket(1);
    if (s->fd < 0) {
        k.errors++;
        return;
    }
    if (connect(s->fd, &o.target.sa, inet_len(&o.target)) < 0 &&
        errno != EINPROGRESS) {
        close(s->fd);
        k.errors++;
        return;
    }
    set_state(s, CONNECTING);
    watch(s->fd, EPOLLOUT, i, EPOLL_CTL_ADD);
}

static void fail(struct slot *s)
{
    close(s->fd);
    set_state(s, o.mode == RATE ? FREE : DEAD);
    k.errors++;
}

static void connected(struct slot *slots, uint32_t i, char mode)
{
    struct slot *s = &slots[i];
    int err = 0;
    socklen_t len = sizeof err;
    char hello[200];
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        fail(s);
        return;
    }
    size_t n = build_hello(hello, s, mode, 0);
    if (send(s->fd, hello, n, MSG_NOSIGNAL) != (ssize_t)n) {
        fail(s);
        return;
    }
    set_state(s, WAIT_REPLY);
    watch(s->fd, EPOLLIN, i, EPOLL_CTL_MOD);
}

/* Read the reply; 1 when all 64 bytes are in, 0 for more to come, -1 on failure. */
static int read_reply(struct slot *s)
{
    ssize_t n = recv(s->fd, s->reply + s->got, MSG_LEN - s->got, 0);
    if (n < 0 && errno == EAGAIN)
        return 0;
    if (n <= 0)
        return -1;
    s->got += (uint8_t)n;
    return s->got == MSG_LEN;
}

static void record_latency(uint64_t us)
{
    if (nlat == cap_lat) {
        cap_lat = cap_lat ? cap_lat * 2 : 65536;
        lat = realloc(lat, cap_lat * sizeof *lat);
        if (!lat)
            die("realloc");
    }
    lat[nlat++] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

/* Slots stuck longer than the timeout are closed and counted. */
static void expire(struct slot *slots, int n, uint64_t now)
{
    uint64_t limit = (uint64_t)(o.timeout * 1e6);
    for (int i = 0; i < n; i++) {
        struct slot *s = &slots[i];
        if ((s->state == CONNECTING || s->state == WAIT_REPLY) && now > s->t0 + limit) {
            fail(s);
            k.errors--;
            k.timeouts++;
        }
    }
}

/* --- rate: connect, hello, reply, close, again -------------------------------------- */

static void rate_event(struct slot *slots, uint32_t i, uint32_t events)
{
    struct slot *s = &slots[i];
    if (s->state == CONNECTING) {
        connected(slots, i, 'R');
        return;
    }
    if (s->state != WAIT_REPLY)
        return;
    int rc = read_reply(s);
    if (rc < 0 || (rc == 0 && events & (EPOLLERR | EPOLLHUP))) {
        fail(s);
    } else if (rc == 1) {
        check_reply(s);
        close(s->fd);
        set_state(s, FREE);
        k.completed++;
        record_latency(now_us() - s->t0);
    }
}

static void write_latencies(void)
{
    if (!o.lat_file)
        return;
    FILE *f = fopen(o.lat_file, "wb");
    if (!f || fwrite(lat, sizeof *lat, nlat, f) != nlat || fclose(f) != 0)
        die(o.lat_file);
}

static int run_rate(void)
{
    struct slot *slots = calloc((size_t)o.conc, sizeof *slots);
    struct epoll_event events[512];
    uint64_t t_start = now_us(), deadline = t_start + (uint64_t)(o.duration * 1e6), t_end;
    uint64_t last_expire = t_start;
    int busy;
    do {
        uint64_t now = now_us();
        busy = 0;
        for (int i = 0; i < o.conc; i++) {
            if (slots[i].state == FREE && now < deadline)
                start(slots, (uint32_t)i);
            busy += slots[i].state != FREE;
        }
        int n = epoll_wait(epfd, events, 512, 50);
        for (int j = 0; j < n; j++)
            rate_event(slots, events[j].data.u32, events[j].events);
        if (now - last_expire > 100000) {
            expire(slots, o.conc, now);
            last_expire = now;
        }
    } while (busy || now_us() < deadline);
    t_end = now_us();
    write_latencies();
    printf("{\"started\": %llu, \"completed\": %llu, \"verified\": %llu, \"port_match\": %llu, "
           "\"errors\": %llu, \"timeouts\": %llu, \"seconds\": %.4f, \"tuples\": %llu, "
           "\"cpu_s\": %.3f}\n",
           (unsigned long long)k.started, (unsigned long long)k.completed,
           (unsigned long long)k.verified, (unsigned long long)k.port_match,
           (unsigned long long)k.errors, (unsigned long long)k.timeouts,
           (double)(t_end - t_start) / 1e6, (unsigned long long)next_tuple, self_cpu_seconds());
    return 0;
}

/* --- hold: open `count` connections, keep them, then prove each alive -------------- */

static void hold_event(struct slot *slots, uint32_t i, uint32_t events)
{
    struct slot *s = &slots[i];
    char byte;
    switch (s->state) {
    case CONNECTING: connected(slots, i, 'H'); return;
    case WAIT_REPLY: {
        int rc = read_reply(s);
        if (rc < 0 || (rc == 0 && events & (EPOLLERR | EPOLLHUP)))
            fail(s);
        else if (rc == 1)
            set_state(s, check_reply(s) ? HELD : DEAD);
        return;
    }
    case HELD: /* nothing may arrive while held: EOF or a reset means it was lost */
        close(s->fd);
        set_state(s, DEAD);
        return;
    case PINGING:
        if (recv(s->fd, &byte, 1, 0) == 1 && byte == 'p') {
            set_state(s, ALIVE);
        } else {
            close(s->fd);
            set_state(s, DEAD);
        }
        return;
    default: return;
    }
}

/* Run the event loop until `pending` (a state) is gone from every slot or time is up. */
static void hold_loop(struct slot *slots, long *opened, int pending, double limit_s)
{
    struct epoll_event events[512];
    uint64_t deadline = now_us() + (uint64_t)(limit_s * 1e6), last_expire = now_us();
    while (now_us() < deadline) {
        while (opened && *opened < o.count && nstate[CONNECTING] + nstate[WAIT_REPLY] < o.conc)
            start(slots, (uint32_t)(*opened)++);
        if (nstate[pending] == 0 && nstate[CONNECTING] + nstate[WAIT_REPLY] == 0 &&
            (!opened || *opened == o.count))
            return;
        int n = epoll_wait(epfd, events, 512, 50);
        for (int j = 0; j < n; j++)
            hold_event(slots, events[j].data.u32, events[j].events);
        if (now_us() - last_expire > 100000) {
            expire(slots, (int)o.count, now_us());
            last_expire = now_us();
        }
    }
}

static int run_hold(void)
{
    struct slot *slots = calloc((size_t)o.count, sizeof *slots);
    long opened = 0;
    uint64_t t0 = now_us();
    hold_loop(slots, &opened, CONNECTING, 120);
    double setup_s = (double)(now_us() - t0) / 1e6;
    long held = nstate[HELD];
    printf("held %ld failed %ld\n", held, o.count - held);
    fflush(stdout);
    /* The harness measures the gateway now, then says go. Held sockets stay watched. */
    struct pollfd in = {.fd = 0, .events = POLLIN};
    struct epoll_event events[512];
    while (poll(&in, 1, 0) == 0) {
        int n = epoll_wait(epfd, events, 512, 50);
        for (int j = 0; j < n; j++)
            hold_event(slots, events[j].data.u32, events[j].events);
    }
    long still_held = nstate[HELD];
    t0 = now_us();
    for (long i = 0; i < o.count; i++) {
        struct slot *s = &slots[i];
        if (s->state != HELD)
            continue;
        set_state(s, send(s->fd, "p", 1, MSG_NOSIGNAL) == 1 ? PINGING : DEAD);
    }
    hold_loop(slots, NULL, PINGING, 30);
    long alive = nstate[ALIVE];
    printf("{\"attempted\": %ld, \"held\": %ld, \"peak_held\": %ld, \"still_held\": %ld, "
           "\"alive\": %ld, "
           "\"verified\": %llu, \"errors\": %llu, \"timeouts\": %llu, \"setup_seconds\": %.3f, "
           "\"ping_seconds\": %.3f, \"tuples\": %llu, \"cpu_s\": %.3f}\n",
           opened, held, peak_held, still_held, alive, (unsigned long long)k.verified,
           (unsigned long long)k.errors, (unsigned long long)k.timeouts, setup_s,
           (double)(now_us() - t0) / 1e6, (unsigned long long)next_tuple, self_cpu_seconds());
    return 0;
}

/* --- bulk: one blocking connection, `size` bytes one way ------------------------- */

static int bulk_connect(struct slot *s, char mode)
{
    char hello[200];
    struct timeval tv = {.tv_sec = 120};
    if (o.proxy)
        take_fake_client(s);
    s->fd = open_socket(0);
    if (s->fd < 0 || connect(s->fd, &o.target.sa, inet_len(&o.target)) < 0)
        die("connect");
    setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    size_t n = build_hello(hello, s, mode, o.size);
    if (send(s->fd, hello, n, MSG_NOSIGNAL) != (ssize_t)n)
        die("send");
    return s->fd;
}

static int recv_reply(struct slot *s)
{
    while (s->got < MSG_LEN) {
        ssize_t n = recv(s->fd, s->reply + s->got, MSG_LEN - s->got, 0);
        if (n <= 0)
            return -1;
        s->got += (uint8_t)n;
    }
    return check_reply(s) ? 0 : -1;
}

static int run_bulk(void)
{
    struct slot s = {0};
    unsigned long long moved = 0;
    uint64_t t0 = now_us();
    int fd = bulk_connect(&s, o.mode == UP ? 'U' : 'D');
    int ok;
    if (o.mode == UP) {
        int fill = make_fill();
        t0 = now_us();
        while (moved < o.size) {
            off_t off = 0;
            size_t want = o.size - moved < FILL_SIZE ? o.size - moved : FILL_SIZE;
            ssize_t n = sendfile(fd, fill, &off, want);
            if (n <= 0)
                die("sendfile");
            moved += (unsigned long long)n;
        }
        ok = recv_reply(&s) == 0;
    } else {
        static char scratch[1];
        ok = recv_reply(&s) == 0;
        for (;;) {
            ssize_t n = recv(fd, scratch, 1u << 30, MSG_TRUNC);
            if (n <= 0)
                break;
            moved += (unsigned long long)n;
        }
    }
    double secs = (double)(now_us() - t0) / 1e6;
    close(fd);
    printf("{\"bytes\": %llu, \"seconds\": %.4f, \"verified\": %llu, \"port_match\": %llu, "
           "\"complete\": %s, \"tuples\": %llu, \"cpu_s\": %.3f}\n",
           moved, secs, (unsigned long long)k.verified, (unsigned long long)k.port_match,
           ok && moved == o.size ? "true" : "false", (unsigned long long)next_tuple,
           self_cpu_seconds());
    return ok && moved == o.size ? 0 : 1;
}

/* --- the header alone, for the harness's check against mmproxy's own encoder -------- */

static int run_header(void)
{
    struct slot s = {0};
    char out[200];
    take_fake_client(&s);
    size_t n = proxy_header(out, &s);
    fwrite(out, 1, n, stdout);
    return 0;
}

/* --- options --------------------------------------------------------------------- */

static void parse_sources(char *list)
{
    for (char *tok = strtok(list, ","); tok && o.nsources < MAX_SOURCES; tok = strtok(NULL, ","))
        if (!parse_host(tok, &o.sources[o.nsources++])) {
            fprintf(stderr, "bad source %s\n", tok);
            exit(2);
        }
}

static enum mode parse_mode(const char *m)
{
    static const char *names[] = {"rate", "hold", "up", "down", "header"};
    for (int i = 0; i < 5; i++)
        if (strcmp(m, names[i]) == 0)
            return (enum mode)i;
    fprintf(stderr, "unknown mode %s\n", m);
    exit(2);
}

static void parse_options(int argc, char **argv)
{
    static const struct option longs[] = {
        {"mode", 1, 0, 'm'},       {"target", 1, 0, 't'},      {"proxy", 1, 0, 'p'},
        {"sources", 1, 0, 's'},    {"conc", 1, 0, 'c'},        {"duration", 1, 0, 'd'},
        {"count", 1, 0, 'n'},      {"size", 1, 0, 'z'},        {"tuple-base", 1, 0, 'b'},
        {"tuple-step", 1, 0, 'S'}, {"tuple-index", 1, 0, 'i'}, {"lat-file", 1, 0, 'l'},
        {"timeout", 1, 0, 'T'},    {0, 0, 0, 0}};
    int c, have_target = 0;
    o.tuple_step = 1;
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 'm': o.mode = parse_mode(optarg); break;
        case 't': o.target = parse_inet(optarg); have_target = 1; break;
        case 'p': o.proxy = strcmp(optarg, "none") == 0 ? 0 : strcmp(optarg, "v2") == 0 ? 2 : 1;
                  break;
        case 's': parse_sources(optarg); break;
        case 'c': o.conc = atoi(optarg); break;
        case 'd': o.duration = atof(optarg); break;
        case 'n': o.count = atol(optarg); break;
        case 'z': o.size = strtoull(optarg, NULL, 10); break;
        case 'b': o.tuple_base = strtoull(optarg, NULL, 10); break;
        case 'S': o.tuple_step = strtoull(optarg, NULL, 10); break;
        case 'i': o.tuple_index = strtoull(optarg, NULL, 10); break;
        case 'l': o.lat_file = optarg; break;
        case 'T': o.timeout = atof(optarg); break;
        default: exit(2);
        }
    }
    if (!have_target || o.conc < 1 || o.count < 1) {
        fprintf(stderr, "usage: see the comment at the top of loadgen.c\n");
        exit(2);
    }
}

int main(int argc, char **argv)
{
    parse_options(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    switch (o.mode) {
    case RATE: return run_rate();
    case HOLD: return run_hold();
    case HEADER: return run_header();
    default: return run_bulk();
    }
}
