/* udpecho: the UDP application behind the gateway in the mmproxy benchmark.
 *
 *     udpecho LISTEN_IP:PORT [SEEN_FILE]
 *
 * One thread, 64 datagrams per recvmmsg/sendmmsg. Every datagram goes back to where it
 * came from, with its verdict byte set (see udp.h): did it come from the address its
 * sender claims? It also keeps the set of source addresses it saw. On SIGTERM or SIGINT
 * it prints its counters as JSON, writes the sources to SEEN_FILE ("IP:PORT" lines) if
 * given, and exits.
 */
#include "udp.h"

#include <signal.h>

#define BATCH 64
#define SEEN_SLOTS (1u << 16) /* open addressing; beyond 3/4 full, sources are not kept */

static volatile sig_atomic_t stopping;
static uint64_t packets, bytes, verified_ok, verified_addr, verified_bad, short_packets;
static uint64_t send_errors, seen_count, seen_overflow;
static uint64_t seen[SEEN_SLOTS]; /* (ip << 16 | port) + 1; 0 is empty */

static void on_signal(int sig) { (void)sig; stopping = 1; }

static void remember(const struct sockaddr_in *from)
{
    uint64_t key = ((uint64_t)ntohl(from->sin_addr.s_addr) << 16 | ntohs(from->sin_port)) + 1;
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 48) & (SEEN_SLOTS - 1);
    while (seen[i] && seen[i] != key)
        i = (i + 1) & (SEEN_SLOTS - 1);
    if (seen[i])
        return;
    if (seen_count >= SEEN_SLOTS / 4 * 3) {
        seen_overflow++;
        return;
    }
    seen[i] = key;
    seen_count++;
}

/* Compare the claimed address with the sender's; write the verdict into the payload. */
static void judge(char *payload, size_t len, const struct sockaddr_in *from)
{
    packets++;
    bytes += len;
    remember(from);
    if (len < PROBE_LEN) {
        short_packets++;
        return;
    }
    uint32_t ip;
    uint16_t port;
    memcpy(&ip, payload + OFF_CLAIM_IP, 4);
    memcpy(&port, payload + OFF_CLAIM_PORT, 2);
    char verdict = 'N';
    if (ip == from->sin_addr.s_addr)
        verdict = port == from->sin_port ? 'Y' : 'A';
    verdict == 'Y' ? verified_ok++ : verdict == 'A' ? verified_addr++ : verified_bad++;
    payload[OFF_VERDICT] = verdict;
}

static int open_socket(const char *addr)
{
    struct sockaddr_in sa = parse_addr(addr);
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int size = 4 << 20;
    if (fd < 0)
        die("socket");
    /* Capped by net.core.rmem_max; a bigger buffer only helps the bursts of many flows. */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("bind");
    return fd;
}

static void serve(int fd)
{
    static char bufs[BATCH][MAX_PAYLOAD + 64];
    static struct sockaddr_in peers[BATCH];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    while (!stopping) {
        for (int i = 0; i < BATCH; i++) {
            iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = sizeof bufs[i]};
            msgs[i].msg_hdr = (struct msghdr){.msg_name = &peers[i],
                                              .msg_namelen = sizeof peers[i],
                                              .msg_iov = &iov[i],
                                              .msg_iovlen = 1};
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("recvmmsg");
        }
        for (int i = 0; i < n; i++) {
            judge(bufs[i], msgs[i].msg_len, &peers[i]);
            iov[i].iov_len = msgs[i].msg_len;
        }
        for (int done = 0; done < n;) {
            int sent = sendmmsg(fd, msgs + done, (unsigned)(n - done), 0);
            if (sent <= 0) { /* e.g. a flow's socket closed: ICMP, ECONNREFUSED; skip it */
                send_errors++;
                sent = 1;
            }
            done += sent;
        }
    }
}

static void write_seen(const char *path)
{
    FILE *f = fopen(path, "w");
    if (!f)
        die(path);
    for (uint32_t i = 0; i < SEEN_SLOTS; i++) {
        if (!seen[i])
            continue;
        uint64_t key = seen[i] - 1;
        struct in_addr a = {.s_addr = htonl((uint32_t)(key >> 16))};
        char ip[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &a, ip, sizeof ip);
        fprintf(f, "%s:%u\n", ip, (unsigned)(key & 0xffff));
    }
    if (fclose(f) != 0)
        die(path);
}

int main(int argc, char **argv)
{
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: udpecho LISTEN_IP:PORT [SEEN_FILE]\n");
        return 2;
    }
    struct sigaction sa = {.sa_handler = on_signal}; /* no SA_RESTART: recvmmsg returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    serve(open_socket(argv[1]));
    if (argc == 3)
        write_seen(argv[2]);
    printf("{\"packets\": %llu, \"bytes\": %llu, \"verified_ok\": %llu, "
           "\"verified_address_only\": %llu, \"verified_bad\": %llu, \"short\": %llu, "
           "\"send_errors\": %llu, \"sources\": %llu, \"sources_not_kept\": %llu, "
           "\"cpu_s\": %.3f}\n",
           (unsigned long long)packets, (unsigned long long)bytes,
           (unsigned long long)verified_ok, (unsigned long long)verified_addr,
           (unsigned long long)verified_bad, (unsigned long long)short_packets,
           (unsigned long long)send_errors, (unsigned long long)seen_count,
           (unsigned long long)seen_overflow, self_cpu_seconds());
    return 0;
}
