/* udpgen: the UDP client of the mmproxy benchmark, standing in for a balancer (one
 * process; the harness runs several).
 *
 *   udpgen --target IP:PORT [--proxy none|v2|v2first|spp] [--flows K] [--window W]
 *          [--size BYTES]
 *          [--duration S] [--timeout-ms MS] [--tuple-base N] [--tuple-step N]
 *          [--tuple-index N] [--lat-file PATH] [--header]
 *
 * K flows, each its own connected UDP socket, each with at most W datagrams outstanding:
 * a reply (or, after the timeout, its loss) frees a place for the next datagram, so that
 * the load stays below what the kernel's socket buffers hold instead of measuring drops.
 * With --proxy v2 every datagram starts with a PROXY v2 header claiming the flow's fake
 * client (the rule of loadgen.c: tuple t -> 203.0.113.0/24 or 192.0.2.0/24, port
 * 1024 + t / 508 % 64000); v2first sends that header once, alone, when the flow opens, and
 * then payloads without one (Cloudflare Spectrum's framing); spp puts a Simple Proxy
 * Protocol header on every datagram and expects it back on every reply. Without one
 * (none: direct) the flow claims its own address.
 * udpecho answers with the verdict byte set (udp.h); the reply must be exactly the
 * payload sent. After the duration nothing more is sent; outstanding datagrams get the
 * timeout to come back, then count as lost. The result is one JSON object; --lat-file
 * gets a histogram of round-trip times (uint32 counts, 1 us buckets). --header prints
 * the header of the first flow (v2 or spp) and exits (checked against mmproxy's codecs).
 */
#include "udp.h"

#include <getopt.h>
#include <sys/epoll.h>

#define FAKE_ADDRS 508
#define FAKE_PORTS 64000
#define MAX_WINDOW 64
#define LAT_BUCKETS 200000 /* 1 us each; slower round trips land in the last one */

struct pending {
    uint64_t seq; /* 0: free */
    uint64_t t0;
};

struct flow {
    int fd;
    struct in_addr claim;
    uint16_t claim_port;
    uint32_t inflight;
    uint64_t next_seq;
    size_t head; /* header length in every datagram: the payload starts there */
    struct pending slot[MAX_WINDOW];
    char (*buf)[MAX_HEAD + MAX_PAYLOAD]; /* one datagram per slot */
};

enum framing { NONE, V2, V2_FIRST, SPP };

struct opts {
    struct sockaddr_in target;
    enum framing proxy;
    int flows, window, size, print_header;
    double duration, timeout_ms;
    uint64_t tuple_base, tuple_step, tuple_index;
    const char *lat_file;
};

struct counts {
    uint64_t sent, replies, in_window, verified, port_match, lost, late, bad_reply, errors;
};

static struct opts o = {.proxy = V2, .flows = 16, .window = 4, .size = 64, .duration = 5,
                        .timeout_ms = 200, .tuple_step = 1};
static struct counts k;
static struct flow *flows;
static uint32_t *lat;
static int epfd;

/* --- the datagram ------------------------------------------------------------------- */

static void fake_client(uint64_t t, struct in_addr *ip, uint16_t *port)
{
    unsigned idx = (unsigned)(t % FAKE_ADDRS);
    uint32_t a = idx < 254 ? (203u << 24 | 113u << 8 | (idx + 1))
                           : (192u << 24 | 2u << 8 | (idx - 254 + 1));
    ip->s_addr = htonl(a);
    *port = (uint16_t)(1024 + (t / FAKE_ADDRS) % FAKE_PORTS);
}

static size_t v2_header(char *out, const struct flow *f)
{
    static const char sig[12] = "\r\n\r\n\0\r\nQUIT\n";
    uint16_t len = htons(12), sport = htons(f->claim_port);
    memcpy(out, sig, 12);
    out[12] = 0x21; /* version 2, PROXY */
    out[13] = 0x12; /* UDP over IPv4 */
    memcpy(out + 14, &len, 2);
    memcpy(out + 16, &f->claim, 4);
    memcpy(out + 20, &o.target.sin_addr, 4);
    memcpy(out + 24, &sport, 2);
    memcpy(out + 26, &o.target.sin_port, 2);
    return V2_UDP4_LEN;
}

/* The SPP header: IPv4 addresses written IPv4-mapped (::ffff:a.b.c.d). */
static size_t spp_header(char *out, const struct flow *f)
{
    static const char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (char)0xff, (char)0xff};
    uint16_t sport = htons(f->claim_port);
    out[0] = 0x56;
    out[1] = (char)0xec;
    memcpy(out + 2, mapped, 12);
    memcpy(out + 14, &f->claim, 4);
    memcpy(out + 18, mapped, 12);
    memcpy(out + 30, &o.target.sin_addr, 4);
    memcpy(out + 34, &sport, 2);
    memcpy(out + 36, &o.target.sin_port, 2);
    return SPP_LEN;
}

/* Every slot's buffer: header, probe (claim filled in), filler; slot and seq vary. */
static void fill_template(struct flow *f)
{
    uint16_t port = htons(f->claim_port);
    for (int s = 0; s < o.window; s++) {
        char *d = f->buf[s];
        f->head = o.proxy == V2 ? v2_header(d, f) : o.proxy == SPP ? spp_header(d, f) : 0;
        char *p = d + f->head;
        memset(p, 0, PROBE_LEN);
        memcpy(p + OFF_CLAIM_IP, &f->claim, 4);
        memcpy(p + OFF_CLAIM_PORT, &port, 2);
        for (int i = PROBE_LEN; i < o.size; i++)
            p[i] = (char)('a' + i % 26);
    }
}

/* --- flows -------------------------------------------------------------------------- */

static void open_flow(struct flow *f, uint32_t index)
{
    f->fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (f->fd < 0 || connect(f->fd, (struct sockaddr *)&o.target, sizeof o.target) < 0)
        die("socket/connect");
    if (o.proxy != NONE) {
        fake_client(o.tuple_base + o.tuple_index + o.tuple_step * index, &f->claim,
                    &f->claim_port);
    } else { /* direct: claim our own address */
        struct sockaddr_in me;
        socklen_t len = sizeof me;
        getsockname(f->fd, (struct sockaddr *)&me, &len);
        f->claim = me.sin_addr;
        f->claim_port = ntohs(me.sin_port);
    }
    f->buf = calloc((size_t)o.window, sizeof *f->buf);
    if (!f->buf)
        die("calloc");
    f->next_seq = 1;
    fill_template(f);
    if (o.proxy == V2_FIRST) { /* the header alone; the gateway answers nothing to it */
        char header[V2_UDP4_LEN];
        if (send(f->fd, header, v2_header(header, f), 0) < 0)
            die("send (header)");
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = index};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, f->fd, &ev) < 0)
        die("epoll_ctl");
}

/* Fill the flow's free slots, all in one sendmmsg. */
static void refill(struct flow *f, uint64_t now)
{
    struct mmsghdr msgs[MAX_WINDOW];
    struct iovec iov[MAX_WINDOW];
    int used[MAX_WINDOW], n = 0;
    for (int s = 0; s < o.window && f->inflight + (uint32_t)n < (uint32_t)o.window; s++) {
        if (f->slot[s].seq)
            continue;
        char *p = f->buf[s] + f->head;
        uint32_t slot = (uint32_t)s;
        uint64_t seq = f->next_seq++;
        memcpy(p + OFF_SLOT, &slot, 4);
        memcpy(p + OFF_SEQ, &seq, 8);
        f->slot[s] = (struct pending){.seq = seq, .t0 = now};
        iov[n] = (struct iovec){.iov_base = f->buf[s], .iov_len = f->head + (size_t)o.size};
        msgs[n].msg_hdr = (struct msghdr){.msg_iov = &iov[n], .msg_iovlen = 1};
        used[n++] = s;
    }
    int sent = n ? sendmmsg(f->fd, msgs, (unsigned)n, MSG_DONTWAIT) : 0;
    if (sent < 0) {
        k.errors++; /* e.g. ECONNREFUSED from an earlier ICMP, or a full buffer */
        sent = 0;
    }
    for (int i = sent; i < n; i++) /* not sent: free again */
        f->slot[used[i]].seq = 0;
    f->inflight += (uint32_t)sent;
    k.sent += (uint64_t)sent;
}

static void record_latency(uint64_t us)
{
    lat[us < LAT_BUCKETS ? us : LAT_BUCKETS - 1]++;
}

/* One reply: must be the payload of an outstanding datagram of this flow. */
static void on_reply(struct flow *f, const char *p, size_t len, uint64_t now, uint64_t deadline)
{
    uint32_t slot;
    uint64_t seq;
    if (len != (size_t)o.size) {
        k.bad_reply++;
        return;
    }
    memcpy(&slot, p + OFF_SLOT, 4);
    memcpy(&seq, p + OFF_SEQ, 8);
    if (slot >= (uint32_t)o.window || f->slot[slot].seq != seq) {
        k.late++; /* already counted lost */
        return;
    }
    k.replies++;
    k.in_window += now <= deadline;
    if (p[OFF_VERDICT] == 'Y' || p[OFF_VERDICT] == 'A') {
        k.verified++;
        k.port_match += p[OFF_VERDICT] == 'Y';
    }
    record_latency(now - f->slot[slot].t0);
    f->slot[slot].seq = 0;
    f->inflight--;
}

static void receive(struct flow *f, uint64_t deadline)
{
    static char bufs[MAX_WINDOW][MAX_PAYLOAD + 64];
    struct mmsghdr msgs[MAX_WINDOW];
    struct iovec iov[MAX_WINDOW];
    for (;;) {
        for (int i = 0; i < MAX_WINDOW; i++) {
            iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = sizeof bufs[i]};
            msgs[i].msg_hdr = (struct msghdr){.msg_iov = &iov[i], .msg_iovlen = 1};
        }
        int n = recvmmsg(f->fd, msgs, MAX_WINDOW, MSG_DONTWAIT, NULL);
        if (n <= 0) {
            if (n < 0 && errno != EAGAIN)
                k.errors++;
            return;
        }
        uint64_t now = now_us();
        for (int i = 0; i < n; i++) {
            if (o.proxy != SPP) {
                on_reply(f, bufs[i], msgs[i].msg_len, now, deadline);
            } else if (msgs[i].msg_len < SPP_LEN || memcmp(bufs[i], f->buf[0], SPP_LEN)) {
                k.bad_reply++; /* an SPP reply must carry the flow's header back */
            } else {
                on_reply(f, bufs[i] + SPP_LEN, msgs[i].msg_len - SPP_LEN, now, deadline);
            }
        }
        if (n < MAX_WINDOW)
            return;
    }
}

/* Outstanding datagrams older than the timeout are lost. */
static void expire(uint64_t now)
{
    uint64_t limit = (uint64_t)(o.timeout_ms * 1000);
    for (int i = 0; i < o.flows; i++) {
        struct flow *f = &flows[i];
        for (int s = 0; s < o.window; s++) {
            if (f->slot[s].seq && now > f->slot[s].t0 + limit) {
                f->slot[s].seq = 0;
                f->inflight--;
                k.lost++;
            }
        }
    }
}

static uint64_t outstanding(void)
{
    uint64_t n = 0;
    for (int i = 0; i < o.flows; i++)
        n += flows[i].inflight;
    return n;
}

static void write_latencies(void)
{
    if (!o.lat_file)
        return;
    FILE *f = fopen(o.lat_file, "wb");
    if (!f || fwrite(lat, sizeof *lat, LAT_BUCKETS, f) != LAT_BUCKETS || fclose(f) != 0)
        die(o.lat_file);
}

static int run(void)
{
    struct epoll_event events[256];
    flows = calloc((size_t)o.flows, sizeof *flows);
    lat = calloc(LAT_BUCKETS, sizeof *lat);
    if (!flows || !lat)
        die("calloc");
    for (int i = 0; i < o.flows; i++)
        open_flow(&flows[i], (uint32_t)i);
    uint64_t start = now_us(), deadline = start + (uint64_t)(o.duration * 1e6);
    uint64_t drain_end = deadline + (uint64_t)(o.timeout_ms * 1000), last_expire = start;
    for (int i = 0; i < o.flows; i++)
        refill(&flows[i], start);
    for (;;) {
        uint64_t now = now_us();
        if (now >= deadline && (outstanding() == 0 || now > drain_end))
            break;
        int n = epoll_wait(epfd, events, 256, 5);
        now = now_us();
        for (int j = 0; j < n; j++) {
            struct flow *f = &flows[events[j].data.u32];
            receive(f, deadline);
            if (now < deadline)
                refill(f, now);
        }
        if (now - last_expire >= 5000) {
            expire(now);
            last_expire = now;
            for (int i = 0; now < deadline && i < o.flows; i++)
                if (flows[i].inflight < (uint32_t)o.window)
                    refill(&flows[i], now);
        }
    }
    k.lost += outstanding(); /* never came back */
    write_latencies();
    printf("{\"flows\": %d, \"window\": %d, \"size\": %d, \"seconds\": %.4f, \"sent\": %llu, "
           "\"replies\": %llu, \"replies_in_time\": %llu, \"verified\": %llu, "
           "\"port_match\": %llu, \"lost\": %llu, \"late\": %llu, \"bad_reply\": %llu, "
           "\"errors\": %llu, \"tuples\": %d, \"cpu_s\": %.3f}\n",
           o.flows, o.window, o.size, (double)(deadline - start) / 1e6,
           (unsigned long long)k.sent, (unsigned long long)k.replies,
           (unsigned long long)k.in_window, (unsigned long long)k.verified,
           (unsigned long long)k.port_match, (unsigned long long)k.lost,
           (unsigned long long)k.late, (unsigned long long)k.bad_reply,
           (unsigned long long)k.errors, o.flows, self_cpu_seconds());
    return 0;
}

static int print_header(void)
{
    struct flow f = {0};
    char out[MAX_HEAD];
    fake_client(o.tuple_base + o.tuple_index, &f.claim, &f.claim_port);
    fwrite(out, 1, o.proxy == SPP ? spp_header(out, &f) : v2_header(out, &f), stdout);
    return 0;
}

static enum framing parse_framing(const char *text)
{
    static const char *names[] = {"none", "v2", "v2first", "spp"};
    for (int i = 0; i < 4; i++)
        if (strcmp(text, names[i]) == 0)
            return (enum framing)i;
    fprintf(stderr, "--proxy: none, v2, v2first or spp, not %s\n", text);
    exit(2);
}

/* --- options ------------------------------------------------------------------------ */

static void parse_options(int argc, char **argv)
{
    static const struct option longs[] = {
        {"target", 1, 0, 't'},      {"proxy", 1, 0, 'p'},       {"flows", 1, 0, 'f'},
        {"window", 1, 0, 'w'},      {"size", 1, 0, 'z'},        {"duration", 1, 0, 'd'},
        {"timeout-ms", 1, 0, 'T'},  {"tuple-base", 1, 0, 'b'},  {"tuple-step", 1, 0, 'S'},
        {"tuple-index", 1, 0, 'i'}, {"lat-file", 1, 0, 'l'},    {"header", 0, 0, 'H'},
        {0, 0, 0, 0}};
    int c, have_target = 0;
    while ((c = getopt_long(argc, argv, "", longs, NULL)) != -1) {
        switch (c) {
        case 't': o.target = parse_addr(optarg); have_target = 1; break;
        case 'p': o.proxy = parse_framing(optarg); break;
        case 'f': o.flows = atoi(optarg); break;
        case 'w': o.window = atoi(optarg); break;
        case 'z': o.size = atoi(optarg); break;
        case 'd': o.duration = atof(optarg); break;
        case 'T': o.timeout_ms = atof(optarg); break;
        case 'b': o.tuple_base = strtoull(optarg, NULL, 10); break;
        case 'S': o.tuple_step = strtoull(optarg, NULL, 10); break;
        case 'i': o.tuple_index = strtoull(optarg, NULL, 10); break;
        case 'l': o.lat_file = optarg; break;
        case 'H': o.print_header = 1; break;
        default: exit(2);
        }
    }
    if (!have_target || o.flows < 1 || o.window < 1 || o.window > MAX_WINDOW ||
        o.size < PROBE_LEN || o.size > MAX_PAYLOAD) {
        fprintf(stderr, "usage: see the comment at the top of udpgen.c (window 1-%d, size "
                        "%d-%d)\n", MAX_WINDOW, PROBE_LEN, MAX_PAYLOAD);
        exit(2);
    }
}

int main(int argc, char **argv)
{
    parse_options(argc, argv);
    if (o.print_header)
        return print_header();
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1");
    return run();
}
