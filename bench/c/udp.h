/* Shared by udpgen.c and udpecho.c: what every benchmark datagram's payload starts with.
 *
 *   offset 0  claimed client IPv4 address (network order)
 *          4  claimed client port (network order)
 *          6  verdict, written by udpecho: 'Y' the datagram came from the claimed address
 *             and port, 'A' from the claimed address only, 'N' from another address
 *          7  zero
 *          8  slot (uint32) and 12 sequence number (uint64) of udpgen's window: what a
 *             reply answers
 *         20  zeros up to PROBE_LEN, then filler up to the payload size
 *
 * udpgen puts a header before it when it talks to a gateway (PROXY v2 UDP4 on every
 * datagram, or on the first datagram of a flow only, alone, as Cloudflare Spectrum does;
 * or a 38-byte SPP header on every datagram, which also comes back on every reply); the
 * gateway removes the header, and udpecho sends the payload back with the verdict filled
 * in.
 */
#ifndef BENCH_UDP_H
#define BENCH_UDP_H

#include "common.h"

#define PROBE_LEN 24
#define OFF_CLAIM_IP 0
#define OFF_CLAIM_PORT 4
#define OFF_VERDICT 6
#define OFF_SLOT 8
#define OFF_SEQ 12
#define MAX_PAYLOAD 1472 /* one Ethernet-sized IPv4 datagram */
#define V2_UDP4_LEN 28   /* 16-byte v2 preamble + 12 bytes of IPv4 addresses and ports */
#define SPP_LEN 38       /* magic, two 16-byte addresses, two ports */
#define MAX_HEAD SPP_LEN

#endif
