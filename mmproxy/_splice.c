/* mmproxy._splice: the forwarder's hot path in C, where Python's per-call overhead cost
 * more than the system calls themselves: the relay's per-event work (Core), the accept
 * and the upstream socket, the usual PROXY header (a pre-parser that declines anything
 * unusual), the whole TCP hand-shake of clients like those Python has already let
 * through (handshake), and the datagrams of established UDP flows (UdpEngine). What
 * decides anything (the codec's verdicts and messages, who may claim what, the records)
 * stays in Python: C only repeats decisions Python has made, and hands everything else
 * back to it.
 *
 * mmproxy.relay owns the event loop; a Core owns the established connections in it.
 * Core.poll() waits on the relay's epoll set and moves the bytes of every ready
 * connection with splice(2) (socket -> pipe -> socket) without the GIL and without a
 * Python call per event; the events it does not own (listeners, sockets being
 * hand-shaken, the wake-up eventfd) go back to Python, as do the connections that
 * ended, with why. Profiles of the pure-Python relay showed the interpreter's share of
 * a short connection's cost at twice HAProxy's whole user time (docs/performance.md).
 *
 * A connection holds its two sockets and nothing else while idle: a pipe is taken from
 * a small pool only while bytes wait in it, and given back once it is empty.
 * Only the relay thread calls into a Core.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
/* Edge-triggered: a direction is pumped until the kernel says EAGAIN. EPOLLOUT is asked
 * for only once a write has met a full buffer (a fresh socket is writable). EPOLLPRI
 * says TCP urgent data came (see pass_urgent). */
#define EVENTS (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLET)
#define READ_EVENTS (EPOLLIN | EPOLLPRI | EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define END_EVENTS (EPOLLRDHUP | EPOLLHUP | EPOLLERR)
#define WRITE_EVENTS (EPOLLOUT | EPOLLHUP | EPOLLERR)

/* Flow 0 carries client -> target, flow 1 target -> client; a flow's index is also the
 * side its source is (0 client, 1 target). */
enum { INBOUND = 0, OUTBOUND = 1 };
/* Why a connection ended; mmproxy.relay words it. */
enum { END_EOF, END_READ, END_WRITE, END_IDLE, END_HALF_CLOSED, END_CLOSED, END_RELAY };

typedef struct {
    int src, dst;
    int pipe_r, pipe_w; /* -1: no pipe held */
    size_t pending;     /* bytes in the pipe */
    long long nbytes;
    char done, dst_watched;
    char urgent; /* EPOLLPRI seen on src: its urgent mark may stop splice() */
} Flow;

typedef struct {
    Flow flow[2];
    PyObject *handle; /* the caller's object, given back when the connection ends */
    double last_active, half_closed_at;
    int first_eof; /* -1, or the side that closed first */
} Conn;

typedef struct {
    PyObject *handle;
    int kind, side, err;
    long long nin, nout;
} Ended;

typedef struct {
    int kind, side, err;
} Why;

typedef struct {
    PyObject_HEAD
    int epfd;
    size_t pipe_size;
    /* A read from a socket that moved fewer bytes than this emptied its queue: each byte
     * takes at most one of the pipe's page slots. 0 once a pipe could not be sized. */
    size_t short_read;
    int keep;
    int (*pool)[2];
    int npool;
    Conn **by_fd;
    int cap;
    Py_ssize_t count;
    Ended *ended;
    size_t nended, ended_cap;
    struct epoll_event events[MAX_EVENTS];
} Core;

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* --- pipes ----------------------------------------------------------------------- */

static int take_pipe(Core *c, Flow *f)
{
    int p[2];
    if (c->npool) {
        c->npool--;
        f->pipe_r = c->pool[c->npool][0];
        f->pipe_w = c->pool[c->npool][1];
        return 0;
    }
    if (pipe2(p, O_CLOEXEC | O_NONBLOCK) < 0)
        return -1;
    /* Over the per-user pipe budget a smaller pipe still works, only slower. */
    if (fcntl(p[1], F_SETPIPE_SZ, (int)c->pipe_size) < 0)
        c->short_read = 0;
    f->pipe_r = p[0];
    f->pipe_w = p[1];
    return 0;
}

static void give_pipe(Core *c, Flow *f)
{
    if (c->npool < c->keep) {
        c->pool[c->npool][0] = f->pipe_r;
        c->pool[c->npool][1] = f->pipe_w;
        c->npool++;
    } else {
        close(f->pipe_r);
        close(f->pipe_w);
    }
    f->pipe_r = f->pipe_w = -1;
}

static void drop_pipe(Flow *f)
{
    /* Bytes still in it cannot be delivered: the pipe is not reusable. */
    if (f->pipe_r >= 0) {
        close(f->pipe_r);
        close(f->pipe_w);
        f->pipe_r = f->pipe_w = -1;
    }
}

/* --- connections ------------------------------------------------------------------ */

static void finish(Core *c, Conn *conn, Why why, int reset_peer)
{
    static const struct linger reset = {1, 0};
    int i;
    for (i = 0; i < 2; i++) {
        c->by_fd[conn->flow[i].src] = NULL;
        drop_pipe(&conn->flow[i]);
    }
    for (i = 0; i < 2; i++) {
        if (reset_peer)
            setsockopt(conn->flow[i].src, SOL_SOCKET, SO_LINGER, &reset, sizeof reset);
        close(conn->flow[i].src);
    }
    c->count--;
    /* The caller made room: at most one end per event, or per connection swept. */
    Ended *e = &c->ended[c->nended++];
    e->handle = conn->handle; /* the reference moves to the record */
    e->kind = why.kind;
    e->side = why.side;
    e->err = why.err;
    e->nin = conn->flow[INBOUND].nbytes;
    e->nout = conn->flow[OUTBOUND].nbytes;
    free(conn);
}

/* splice() stops at TCP's urgent mark (telnet's and FTP's interrupts send urgent data)
 * and says EAGAIN there for ever, or 0 once a FIN has followed. At the mark the byte is
 * read with recv(), in line (SO_OOBINLINE: else the kernel would skip it, or drop it
 * when a second urgent byte comes), and sent on as urgent, so the application sees
 * what the client sent; when the destination is full it goes in line through the pipe,
 * keeping its place in the stream. Called with the pipe empty. Returns 1 when a byte
 * was moved, 0 when the source is not at a mark, -1 with `why` set. */
static int pass_urgent(Core *c, Flow *f, int i, Why *why)
{
    static const int on = 1;
    int at_mark = 0;
    char byte;
    ssize_t n;
    if (ioctl(f->src, SIOCATMARK, &at_mark) < 0 || !at_mark)
        return 0;
    setsockopt(f->src, SOL_SOCKET, SO_OOBINLINE, &on, sizeof on);
    do
        n = recv(f->src, &byte, 1, MSG_DONTWAIT);
    while (n < 0 && errno == EINTR);
    if (n < 0 && errno != EAGAIN) {
        *why = (Why){END_READ, i, errno};
        return -1;
    }
    if (n != 1)
        return 0;
    f->urgent = 0;
    do
        n = send(f->dst, &byte, 1, MSG_OOB | MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n == 1) {
        f->nbytes++;
        return 1;
    }
    if (errno != EAGAIN) {
        *why = (Why){END_WRITE, 1 - i, errno};
        return -1;
    }
    if ((f->pipe_r < 0 && take_pipe(c, f) < 0) || write(f->pipe_w, &byte, 1) != 1) {
        *why = (Why){END_RELAY, i, errno};
        return -1;
    }
    f->pending = 1;
    return 1;
}

/* Move bytes until the source says EAGAIN or EOF, or the destination is full. With
 * short_read_ends, a read that emptied the socket's queue ends it too, which spares a
 * splice() that would only say EAGAIN. Returns 0, or 1 with `why` set: the connection
 * must end. */
static int pump(Core *c, Conn *conn, int i, int short_read_ends, double now, Why *why)
{
    Flow *f = &conn->flow[i];
    int drained = 0;
    ssize_t n;
    for (;;) {
        if (f->pending) {
            n = splice(f->pipe_r, NULL, f->dst, NULL, f->pending, SPLICE_FLAGS);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN) {
                    *why = (Why){END_WRITE, 1 - i, errno};
                    return 1;
                }
                if (!f->dst_watched) { /* resumes on its EPOLLOUT from now on */
                    struct epoll_event ev = {.events = EVENTS | EPOLLOUT, .data.fd = f->dst};
                    f->dst_watched = 1;
                    if (epoll_ctl(c->epfd, EPOLL_CTL_MOD, f->dst, &ev) < 0) {
                        *why = (Why){END_RELAY, 1 - i, errno};
                        return 1;
                    }
                }
                return 0;
            }
            f->pending -= (size_t)n;
            f->nbytes += n;
            if (drained && !f->pending) {
                give_pipe(c, f);
                return 0;
            }
            continue;
        }
        if (f->pipe_r < 0 && take_pipe(c, f) < 0) {
            *why = (Why){END_RELAY, i, errno};
            return 1;
        }
        n = splice(f->src, NULL, f->pipe_w, NULL, c->pipe_size, SPLICE_FLAGS);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                /* Only after an EPOLLPRI: an ioctl per EAGAIN would cost every event. */
                int moved = f->urgent ? pass_urgent(c, f, i, why) : 0;
                if (moved < 0)
                    return 1;
                if (moved)
                    continue;
                f->urgent = 0;
                give_pipe(c, f);
                return 0;
            }
            *why = (Why){END_READ, i, errno};
            return 1;
        }
        if (n == 0) {
            /* Always checked here (once per direction): a FIN read in the same pump as
             * the urgent byte comes before its EPOLLPRI, and bytes would be lost. */
            int moved = pass_urgent(c, f, i, why);
            if (moved < 0)
                return 1;
            if (moved)
                continue;
            give_pipe(c, f);
            f->done = 1;
            if (conn->first_eof < 0) {
                conn->first_eof = i;
                conn->half_closed_at = now;
            } else if (conn->flow[0].done && conn->flow[1].done) {
                return 0; /* both ways ended: closing the sockets says it */
            }
            /* Pass the half-close on: the peer may still answer the other way. */
            shutdown(f->dst, SHUT_WR);
            return 0;
        }
        f->pending = (size_t)n;
        /* A read that stopped at an urgent mark did not empty the queue. */
        drained = short_read_ends && !f->urgent && (size_t)n < c->short_read;
    }
}

static void on_event(Core *c, Conn *conn, int fd, uint32_t ev, double now)
{
    int r = fd == conn->flow[INBOUND].src ? INBOUND : OUTBOUND;
    int w = 1 - r;
    Why why;
    conn->last_active = now;
    if (ev & EPOLLPRI)
        conn->flow[r].urgent = 1;
    /* A flow blocked on its destination resumes reading when that becomes writable. */
    if ((ev & READ_EVENTS) && !conn->flow[r].pending && !conn->flow[r].done) {
        /* Unless the peer has closed (its EOF is still to be read), a short read may
         * end the pump: data that arrives later is a new edge-triggered event. */
        if (pump(c, conn, r, !(ev & END_EVENTS), now, &why)) {
            finish(c, conn, why, 1);
            return;
        }
    }
    if ((ev & WRITE_EVENTS) && conn->flow[w].pending) {
        if (pump(c, conn, w, 0, now, &why)) {
            finish(c, conn, why, 1);
            return;
        }
    }
    if (conn->flow[0].done && conn->flow[1].done)
        finish(c, conn, (Why){END_EOF, conn->first_eof, 0}, 0);
}

static int reserve_ended(Core *c, size_t more)
{
    size_t need = c->nended + more;
    if (need <= c->ended_cap)
        return 0;
    Ended *grown = realloc(c->ended, need * sizeof *grown);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->ended = grown;
    c->ended_cap = need;
    return 0;
}

/* The records of the connections that ended, as a list of
 * (handle, kind, side, errno, bytes_in, bytes_out); the handles' references move to it. */
static PyObject *take_ended(Core *c)
{
    PyObject *list = PyList_New((Py_ssize_t)c->nended);
    size_t k;
    if (list == NULL)
        return NULL;
    for (k = 0; k < c->nended; k++) {
        Ended *e = &c->ended[k];
        PyObject *t = Py_BuildValue("(NiiiLL)", e->handle, e->kind, e->side, e->err, e->nin,
                                    e->nout);
        if (t == NULL) {
            for (k++; k < c->nended; k++)
                Py_DECREF(c->ended[k].handle);
            c->nended = 0;
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, t);
    }
    c->nended = 0;
    return list;
}

/* --- the Python type ------------------------------------------------------------- */

static int Core_init(Core *c, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epoll_fd", "pipe_size", "keep_pipes", NULL};
    int epfd, keep = 64;
    Py_ssize_t pipe_size = 1 << 20;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|ni", kwlist, &epfd, &pipe_size, &keep))
        return -1;
    if (epfd < 0 || pipe_size < 4096 || keep < 0) {
        PyErr_SetString(PyExc_ValueError, "bad epoll fd, pipe size or pool size");
        return -1;
    }
    if (c->pool != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core is already initialised");
        return -1;
    }
    c->epfd = epfd;
    c->pipe_size = (size_t)pipe_size;
    c->short_read = (size_t)pipe_size / (size_t)sysconf(_SC_PAGESIZE);
    c->keep = keep;
    c->pool = calloc((size_t)keep + 1, sizeof *c->pool);
    c->ended = calloc(MAX_EVENTS, sizeof *c->ended);
    if (c->pool == NULL || c->ended == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    c->ended_cap = MAX_EVENTS;
    return 0;
}

static void close_pool(Core *c)
{
    while (c->npool) {
        c->npool--;
        close(c->pool[c->npool][0]);
        close(c->pool[c->npool][1]);
    }
}

static void Core_dealloc(Core *c)
{
    int fd;
    for (fd = 0; fd < c->cap; fd++) {
        Conn *conn = c->by_fd[fd];
        if (conn != NULL && fd == conn->flow[INBOUND].src) {
            PyObject *handle = conn->handle;
            if (reserve_ended(c, 1) == 0) {
                finish(c, conn, (Why){END_CLOSED, 0, 0}, 0);
                c->nended = 0;
            }
            Py_DECREF(handle);
        }
    }
    close_pool(c);
    free(c->pool);
    free(c->by_fd);
    free(c->ended);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int grow_table(Core *c, int fd)
{
    int cap = c->cap ? c->cap : 1024;
    Conn **grown;
    if (fd >= 1 << 30) { /* above the kernel's fs.nr_open ceiling: not an fd */
        PyErr_SetString(PyExc_ValueError, "file descriptor out of range");
        return -1;
    }
    while (cap <= fd)
        cap *= 2;
    if (cap == c->cap)
        return 0;
    grown = realloc(c->by_fd, (size_t)cap * sizeof *grown);
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(grown + c->cap, 0, (size_t)(cap - c->cap) * sizeof *grown);
    c->by_fd = grown;
    c->cap = cap;
    return 0;
}

PyDoc_STRVAR(add_doc, "add(client_fd, upstream_fd, handle, bytes_in=0)\n--\n\n"
                      "Own an established pair of non-blocking sockets from now on (the core "
                      "closes them). On OSError the caller still owns them. Give them "
                      "SO_OOBINLINE (as accept() from a listener with it, and connect(), "
                      "do): else an urgent byte is lost when the next one comes first.");

/* Own fds[0] (client) and fds[1] (upstream) from now on; -1 with a Python error set (the
 * caller still owns them then). */
static int core_add(Core *c, const int fds[2], PyObject *handle, long long early)
{
    int i;
    if (c->pool == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core is not initialised");
        return -1;
    }
    if (fds[0] < 0 || fds[1] < 0 || fds[0] == fds[1]) {
        PyErr_SetString(PyExc_ValueError, "two distinct open sockets are needed");
        return -1;
    }
    if (grow_table(c, fds[0] > fds[1] ? fds[0] : fds[1]) < 0)
        return -1;
    if (c->by_fd[fds[0]] != NULL || c->by_fd[fds[1]] != NULL) {
        PyErr_SetString(PyExc_ValueError, "socket already relayed");
        return -1;
    }
    for (i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EVENTS, .data.fd = fds[i]};
        if (epoll_ctl(c->epfd, EPOLL_CTL_ADD, fds[i], &ev) < 0) {
            int saved = errno;
            if (i == 1)
                epoll_ctl(c->epfd, EPOLL_CTL_DEL, fds[0], NULL);
            errno = saved;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    Conn *conn = calloc(1, sizeof *conn);
    if (conn == NULL) {
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, fds[0], NULL);
        epoll_ctl(c->epfd, EPOLL_CTL_DEL, fds[1], NULL);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < 2; i++) {
        conn->flow[i].src = fds[i];
        conn->flow[i].dst = fds[1 - i];
        conn->flow[i].pipe_r = conn->flow[i].pipe_w = -1;
    }
    conn->flow[INBOUND].nbytes = early;
    conn->first_eof = -1;
    conn->last_active = monotonic_now();
    Py_INCREF(handle);
    conn->handle = handle;
    c->by_fd[fds[0]] = c->by_fd[fds[1]] = conn;
    c->count++;
    return 0;
}

static PyObject *Core_add(Core *c, PyObject *args)
{
    int fds[2];
    PyObject *handle;
    long long early = 0;
    if (!PyArg_ParseTuple(args, "iiO|L", &fds[0], &fds[1], &handle, &early))
        return NULL;
    if (core_add(c, fds, handle, early) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(poll_doc, "poll(timeout)\n--\n\n"
                       "Wait up to `timeout` s (negative: forever) for events and relay the "
                       "connections' bytes. Returns (other events as (fd, events) pairs, "
                       "ended connections as (handle, kind, side, errno, bytes_in, "
                       "bytes_out)).");

static PyObject *Core_poll(Core *c, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    int ms, n, k, saved = 0;
    PyObject *others, *ended, *result;
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (c->pool == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Core is not initialised");
        return NULL;
    }
    ms = timeout < 0 ? -1 : timeout > 86400.0 ? 86400000 : (int)ceil(timeout * 1000.0);
    Py_BEGIN_ALLOW_THREADS
    n = epoll_wait(c->epfd, c->events, MAX_EVENTS, ms);
    saved = errno;
    if (n > 0) {
        double now = monotonic_now();
        for (k = 0; k < n; k++) {
            int fd = c->events[k].data.fd;
            Conn *conn = fd < c->cap ? c->by_fd[fd] : NULL;
            if (conn != NULL) {
                on_event(c, conn, fd, c->events[k].events, now);
                c->events[k].data.fd = -1; /* handled here */
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (n < 0) {
        if (saved != EINTR) {
            errno = saved;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        n = 0;
    }
    others = PyList_New(0);
    if (others == NULL)
        return NULL;
    for (k = 0; k < n; k++) {
        if (c->events[k].data.fd < 0)
            continue;
        PyObject *pair = Py_BuildValue("(iI)", c->events[k].data.fd, c->events[k].events);
        if (pair == NULL || PyList_Append(others, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(others);
            return NULL;
        }
        Py_DECREF(pair);
    }
    ended = take_ended(c);
    if (ended == NULL) {
        Py_DECREF(others);
        return NULL;
    }
    result = PyTuple_Pack(2, others, ended);
    Py_DECREF(others);
    Py_DECREF(ended);
    return result;
}

PyDoc_STRVAR(sweep_doc, "sweep(idle_timeout, half_close_timeout)\n--\n\n"
                        "End the connections idle, or half-closed, for longer than allowed "
                        "(0: no limit); returns their records, as poll() does.");

static PyObject *Core_sweep(Core *c, PyObject *args)
{
    double idle, half, now = monotonic_now();
    int fd;
    if (!PyArg_ParseTuple(args, "dd", &idle, &half))
        return NULL;
    if (reserve_ended(c, (size_t)c->count) < 0)
        return NULL;
    for (fd = 0; fd < c->cap; fd++) {
        Conn *conn = c->by_fd[fd];
        if (conn == NULL || fd != conn->flow[INBOUND].src)
            continue; /* each connection once */
        if (idle > 0 && now - conn->last_active > idle)
            finish(c, conn, (Why){END_IDLE, 0, 0}, 1);
        else if (half > 0 && conn->first_eof >= 0 && now - conn->half_closed_at > half)
            finish(c, conn, (Why){END_HALF_CLOSED, conn->first_eof, 0}, 1);
    }
    return take_ended(c);
}

PyDoc_STRVAR(close_all_doc, "close_all()\n--\n\n"
                            "End every connection now; returns their records.");

static PyObject *Core_close_all(Core *c, PyObject *Py_UNUSED(ignored))
{
    int fd;
    if (reserve_ended(c, (size_t)c->count) < 0)
        return NULL;
    for (fd = 0; fd < c->cap; fd++) {
        Conn *conn = c->by_fd[fd];
        if (conn != NULL && fd == conn->flow[INBOUND].src)
            finish(c, conn, (Why){END_CLOSED, 0, 0}, 0);
    }
    return take_ended(c);
}

PyDoc_STRVAR(pipes_doc, "pipes()\n--\n\n(pipes held by connections, pipes kept in the pool)");

static PyObject *Core_pipes(Core *c, PyObject *Py_UNUSED(ignored))
{
    int fd, held = 0;
    for (fd = 0; fd < c->cap; fd++) {
        Conn *conn = c->by_fd[fd];
        if (conn != NULL && fd == conn->flow[INBOUND].src)
            held += (conn->flow[0].pipe_r >= 0) + (conn->flow[1].pipe_r >= 0);
    }
    return Py_BuildValue("(ii)", held, c->npool);
}

PyDoc_STRVAR(connections_doc, "connections()\n--\n\n"
                                "Every open connection as (handle, bytes_in, bytes_out) so far.");

static PyObject *Core_connections(Core *c, PyObject *Py_UNUSED(ignored))
{
    int fd;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (fd = 0; fd < c->cap; fd++) {
        Conn *conn = c->by_fd[fd];
        if (conn != NULL && fd == conn->flow[INBOUND].src) {
            PyObject *t = Py_BuildValue("(OLL)", conn->handle, conn->flow[INBOUND].nbytes,
                                        conn->flow[OUTBOUND].nbytes);
            if (t == NULL || PyList_Append(list, t) < 0) {
                Py_XDECREF(t);
                Py_DECREF(list);
                return NULL;
            }
            Py_DECREF(t);
        }
    }
    return list;
}

PyDoc_STRVAR(close_doc, "close()\n--\n\nClose the pooled pipes (the relay is stopping).");

static PyObject *Core_close(Core *c, PyObject *Py_UNUSED(ignored))
{
    close_pool(c);
    Py_RETURN_NONE;
}

static Py_ssize_t Core_len(Core *c)
{
    return c->count;
}

static PyMethodDef Core_methods[] = {
    {"add", (PyCFunction)Core_add, METH_VARARGS, add_doc},
    {"poll", (PyCFunction)Core_poll, METH_O, poll_doc},
    {"sweep", (PyCFunction)Core_sweep, METH_VARARGS, sweep_doc},
    {"close_all", (PyCFunction)Core_close_all, METH_NOARGS, close_all_doc},
    {"pipes", (PyCFunction)Core_pipes, METH_NOARGS, pipes_doc},
    {"connections", (PyCFunction)Core_connections, METH_NOARGS, connections_doc},
    {"close", (PyCFunction)Core_close, METH_NOARGS, close_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Core_as_sequence = {
    .sq_length = (lenfunc)Core_len,
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mmproxy._splice.Core",
    .tp_doc = PyDoc_STR("Core(epoll_fd, pipe_size=1 MiB, keep_pipes=64): the established "
                        "connections of one relay loop."),
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Core_init,
    .tp_dealloc = (destructor)Core_dealloc,
    .tp_methods = Core_methods,
    .tp_as_sequence = &Core_as_sequence,
};

/* --- the peer of an accepted socket --------------------------------------------- */

/* The peer's address as text (an IPv4 peer of a dual-stack listener as IPv4) and port;
 * -1 with errno set when it is not an inet address. */
static int peer_name(const struct sockaddr_storage *ss, char host[INET6_ADDRSTRLEN], int *port)
{
    const void *addr;
    int family;
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        *port = ntohs(sin6->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr)) {
            family = AF_INET;
            addr = &sin6->sin6_addr.s6_addr[12];
        } else {
            family = AF_INET6;
            addr = &sin6->sin6_addr;
        }
    } else if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        *port = ntohs(sin->sin_port);
        family = AF_INET;
        addr = &sin->sin_addr;
    } else {
        errno = EAFNOSUPPORT;
        return -1;
    }
    return inet_ntop(family, addr, host, INET6_ADDRSTRLEN) == NULL ? -1 : 0;
}

/* --- PROXY header pre-parser ---------------------------------------------------------
 * The common, valid headers only: a v1 TCP4 or TCP6 line, a v2 PROXY TCP4/TCP6 header
 * without TLVs, a v2 LOCAL header. It answers None for anything else (incomplete,
 * invalid, TLVs, other families), and mmproxy.proxy_protocol, the codec, decides and
 * words the error: this only spares the common case the interpreter's cost. For every
 * input it accepts, its answer equals the codec's (tests/test_splice_header.py, and the
 * differential fuzz target tests/fuzz/fuzz_header_c.py). */

#define V1_MAX_LENGTH 107
static const char V2_SIG[12] = "\r\n\r\n\0\r\nQUIT\n";

typedef struct {
    int version, proxy, family; /* family: AF_INET, AF_INET6 or AF_UNSPEC (LOCAL) */
    char src[INET6_ADDRSTRLEN], dst[INET6_ADDRSTRLEN];
    int sport, dport;
    size_t length;
} Header;

/* A decimal port with no sign and no leading zero, 0..65535, ending at `stop`. */
static const char *v1_port(const char *p, const char *end, char stop, int *port)
{
    int value = 0, digits = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (digits == 1 && value == 0)
            return NULL; /* a leading zero */
        value = value * 10 + (*p++ - '0');
        if (++digits > 5 || value > 65535)
            return NULL;
    }
    if (digits == 0 || p >= end || *p != stop)
        return NULL;
    *port = value;
    return p + 1;
}

/* A dotted quad with no leading zeros and numbers up to 255, ending at a space. The text
 * is copied as it is: those rules leave one spelling per address. */
static const char *v1_ipv4(const char *p, const char *end, char *out)
{
    const char *start = p;
    for (int part = 0; part < 4; part++) {
        int value = 0, digits = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits == 1 && value == 0)
                return NULL;
            value = value * 10 + (*p++ - '0');
            if (++digits > 3 || value > 255)
                return NULL;
        }
        if (digits == 0 || p >= end || *p != (part < 3 ? '.' : ' '))
            return NULL;
        p++;
    }
    memcpy(out, start, (size_t)(p - 1 - start));
    out[p - 1 - start] = '\0';
    return p;
}

/* Hex groups of 1 to 4 digits and colons, at most one "::", no dotted tail, not starting
 * with a lone ':', up to 39 characters, ending at a space; given in inet_ntop's spelling,
 * as the codec does. */
static const char *v1_ipv6(const char *p, const char *end, char *out)
{
    char text[40];
    struct in6_addr addr;
    const char *start = p;
    int group = 0, doubles = 0;
    size_t n;
    while (p < end && *p != ' ') {
        char ch = *p;
        if (ch == ':') {
            if (p > start && p[-1] == ':') {
                if (++doubles > 1 || (p - start >= 2 && p[-2] == ':'))
                    return NULL;
            }
            group = 0;
        } else if ((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') ||
                   (ch >= 'A' && ch <= 'F')) {
            if (++group > 4)
                return NULL;
        } else {
            return NULL;
        }
        p++;
    }
    n = (size_t)(p - start);
    if (p >= end || n == 0 || n > 39 || (start[0] == ':' && (n < 2 || start[1] != ':')))
        return NULL;
    memcpy(text, start, n);
    text[n] = '\0';
    if (inet_pton(AF_INET6, text, &addr) != 1 ||
        inet_ntop(AF_INET6, &addr, out, INET6_ADDRSTRLEN) == NULL)
        return NULL;
    return p + 1;
}

static int parse_v1(const char *buf, size_t size, Header *h)
{
    const char *end = buf + (size < V1_MAX_LENGTH ? size : V1_MAX_LENGTH), *p = buf + 11;
    const char *(*address)(const char *, const char *, char *);
    if (size < 11 || memcmp(buf, "PROXY TCP", 9) != 0 || buf[10] != ' ')
        return 0;
    if (buf[9] == '4') {
        address = v1_ipv4;
        h->family = AF_INET;
    } else if (buf[9] == '6') {
        address = v1_ipv6;
        h->family = AF_INET6;
    } else {
        return 0;
    }
    if ((p = address(p, end, h->src)) == NULL || (p = address(p, end, h->dst)) == NULL ||
        (p = v1_port(p, end, ' ', &h->sport)) == NULL ||
        (p = v1_port(p, end, '\r', &h->dport)) == NULL || p >= end || *p != '\n')
        return 0;
    h->version = 1;
    h->proxy = 1;
    h->length = (size_t)(p + 1 - buf);
    return 1;
}

static int parse_v2(const unsigned char *buf, size_t size, Header *h)
{
    size_t length, block;
    if (size < 16 || memcmp(buf, V2_SIG, 12) != 0)
        return 0;
    length = 16 + ((size_t)buf[14] << 8 | buf[15]);
    if (size < length)
        return 0;
    h->version = 2;
    h->length = length;
    if (buf[12] == 0x20) { /* LOCAL: the block is ignored, whatever it holds */
        h->proxy = 0;
        h->family = AF_UNSPEC;
        return 1;
    }
    if (buf[12] != 0x21)
        return 0;
    h->proxy = 1;
    if (buf[13] == 0x11) {
        h->family = AF_INET;
        block = 12;
    } else if (buf[13] == 0x21) {
        h->family = AF_INET6;
        block = 36;
    } else {
        return 0;
    }
    if (length != 16 + block) /* TLVs (or a short block): the codec checks them */
        return 0;
    const unsigned char *src = buf + 16, *dst = src + (block - 4) / 2;
    const unsigned char *ports = buf + 16 + block - 4;
    if (inet_ntop(h->family, src, h->src, sizeof h->src) == NULL ||
        inet_ntop(h->family, dst, h->dst, sizeof h->dst) == NULL)
        return 0;
    h->sport = ports[0] << 8 | ports[1];
    h->dport = ports[2] << 8 | ports[3];
    return 1;
}

/* 1 when buf starts with a header the pre-parser takes (into h), else 0. */
static int parse_header_bytes(const char *buf, size_t size, Header *h)
{
    return size > 0 && (buf[0] == 'P' ? parse_v1(buf, size, h)
                                      : parse_v2((const unsigned char *)buf, size, h));
}

/* (version, command, family, source, destination, length), as ProxyHeader's first
 * fields. */
static PyObject *header_tuple(const Header *h)
{
    if (!h->proxy)
        return Py_BuildValue("(issOOn)", 2, "LOCAL", "UNSPEC", Py_None, Py_None,
                             (Py_ssize_t)h->length);
    return Py_BuildValue("(iss(si)(si)n)", h->version, "PROXY",
                         h->family == AF_INET ? "TCP4" : "TCP6", h->src, h->sport, h->dst,
                         h->dport, (Py_ssize_t)h->length);
}

/* header_tuple of the header at the start of buf, or None. */
static PyObject *header_value(const char *buf, size_t size)
{
    Header h;
    if (!parse_header_bytes(buf, size, &h))
        Py_RETURN_NONE;
    return header_tuple(&h);
}

PyDoc_STRVAR(parse_header_doc,
             "parse_header(data)\n--\n\n"
             "The PROXY header at the start of data as (version, command, family, source, "
             "destination, length), for the common valid forms only; None for anything "
             "else, which mmproxy.proxy_protocol.parse then decides.");

static PyObject *splice_parse_header(PyObject *Py_UNUSED(module), PyObject *arg)
{
    Py_buffer view;
    PyObject *result;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    result = header_value(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return result;
}

PyDoc_STRVAR(read_header_doc,
             "read_header(fd, size)\n--\n\n"
             "Read up to size bytes (as os.read) and pre-parse them: (data, header), header "
             "as parse_header gives it.");

static PyObject *splice_read_header(PyObject *Py_UNUSED(module), PyObject *args)
{
    char buf[8192];
    int fd, size;
    ssize_t n;
    PyObject *data, *header, *result;
    if (!PyArg_ParseTuple(args, "ii", &fd, &size))
        return NULL;
    if (size < 0 || size > (int)sizeof buf) {
        PyErr_SetString(PyExc_ValueError, "size out of range");
        return NULL;
    }
    n = read(fd, buf, (size_t)size);
    if (n < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    data = PyBytes_FromStringAndSize(buf, n);
    if (data == NULL)
        return NULL;
    header = header_value(buf, (size_t)n);
    if (header == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    result = PyTuple_Pack(2, data, header);
    Py_DECREF(data);
    Py_DECREF(header);
    return result;
}

/* --- connect ---------------------------------------------------------------------- */

/* Options of connect(); the kernel's numbers where Debian 12's headers lack a name. */
#define CONNECT_KEEP_PORT 1
#define CONNECT_KEEPALIVE 2
#define CONNECT_DEFER_ACK 4
#ifndef IP_TRANSPARENT
#define IP_TRANSPARENT 19
#endif
#ifndef IPV6_TRANSPARENT
#define IPV6_TRANSPARENT 75
#endif
#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* "192.0.2.1" or "2001:db8::1" (optionally "%scope") and a port -> a sockaddr. */
static int make_sockaddr(int family, const char *host, int port, struct sockaddr_storage *ss,
                         socklen_t *len)
{
    memset(ss, 0, sizeof *ss);
    if (port < 0 || port > 65535)
        return -1;
    if (family == AF_INET) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *len = sizeof *sin;
        return inet_pton(AF_INET, host, &sin->sin_addr) == 1 ? 0 : -1;
    }
    if (family == AF_INET6) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        char plain[INET6_ADDRSTRLEN];
        const char *scope = strchr(host, '%');
        size_t n = scope ? (size_t)(scope - host) : strlen(host);
        if (n >= sizeof plain)
            return -1;
        memcpy(plain, host, n);
        plain[n] = '\0';
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        if (scope != NULL) {
            char *end;
            unsigned long id = strtoul(scope + 1, &end, 10);
            sin6->sin6_scope_id = *end == '\0' && end != scope + 1 ? (uint32_t)id
                                                                   : if_nametoindex(scope + 1);
            if (sin6->sin6_scope_id == 0)
                return -1;
        }
        *len = sizeof *sin6;
        return inet_pton(AF_INET6, plain, &sin6->sin6_addr) == 1 ? 0 : -1;
    }
    return -1;
}

static int set_int(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof value);
}

PyDoc_STRVAR(connect_doc,
             "connect(family, source_host, source_port, target_host, target_port, mark, "
             "options)\n--\n\n"
             "Open a non-blocking TCP socket to the target, transparently bound to the "
             "source unless source_host is None, and start its connect. Returns (fd, "
             "step, errno): fd >= 0 when the connect is done or under way, else -1 with "
             "the step that failed (socket, address, transparent, mark, bind, connect) and "
             "its errno; the socket is closed then. options: CONNECT_KEEP_PORT, "
             "CONNECT_KEEPALIVE, CONNECT_DEFER_ACK.");

/* The hand-shake's socket: socket(), the transparent bind to `source` (unless source_len
 * is 0), the options, and a connect that is done or under way. Its fd, or -1 with errno
 * set and *step naming what failed (socket, transparent, mark, bind, connect); the socket
 * is closed then. */
static int open_upstream(int family, const struct sockaddr_storage *source,
                         socklen_t source_len, const struct sockaddr_storage *target,
                         socklen_t target_len, unsigned int mark, int options,
                         const char **step)
{
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    *step = "socket";
    if (fd < 0)
        return -1;
    if (source_len) {
        *step = "transparent";
        if ((family == AF_INET6 ? set_int(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                                : set_int(fd, IPPROTO_IP, IP_TRANSPARENT, 1)) < 0)
            goto failed;
        *step = "mark";
        if (mark && set_int(fd, SOL_SOCKET, SO_MARK, (int)mark) < 0)
            goto failed;
        /* Keeping the client's port: only the full 4-tuple has to be unique (the port may
         * be in TIME_WAIT towards another target). Else connect() picks the port. */
        *step = "bind";
        if ((options & CONNECT_KEEP_PORT ? set_int(fd, SOL_SOCKET, SO_REUSEADDR, 1)
                                         : set_int(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)) < 0 ||
            bind(fd, (const struct sockaddr *)source, source_len) < 0)
            goto failed;
    }
    /* Urgent data in line (the listener's accepted sockets inherit it): the relay passes
     * each urgent byte on in order, and none is dropped when the next one comes. */
    *step = "socket";
    if (set_int(fd, IPPROTO_TCP, TCP_NODELAY, 1) < 0 ||
        set_int(fd, SOL_SOCKET, SO_OOBINLINE, 1) < 0 ||
        ((options & CONNECT_KEEPALIVE) && set_int(fd, SOL_SOCKET, SO_KEEPALIVE, 1) < 0))
        goto failed;
    /* On a connecting socket TCP_DEFER_ACCEPT holds back the hand-shake's last ACK until
     * the first data, which carries it (mmproxy.transparent says when). */
    if ((options & CONNECT_DEFER_ACK) && set_int(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, 1) < 0)
        goto failed;
    *step = "connect";
    if (connect(fd, (const struct sockaddr *)target, target_len) < 0 && errno != EINPROGRESS)
        goto failed;
    return fd;
failed: {
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}
}

static PyObject *splice_connect(PyObject *Py_UNUSED(module), PyObject *args)
{
    /* The hand-shake's socket in one call: socket(), up to six setsockopt(), bind() and
     * connect() cost about as much in Python's per-call overhead as in the kernel. */
    int family, source_port, target_port, options, fd;
    unsigned int mark;
    const char *source_host, *target_host, *step;
    struct sockaddr_storage source, target;
    socklen_t source_len = 0, target_len = 0;
    if (!PyArg_ParseTuple(args, "izisiIi", &family, &source_host, &source_port, &target_host,
                          &target_port, &mark, &options))
        return NULL;
    if (make_sockaddr(family, target_host, target_port, &target, &target_len) < 0 ||
        (source_host != NULL &&
         make_sockaddr(family, source_host, options & CONNECT_KEEP_PORT ? source_port : 0,
                       &source, &source_len) < 0))
        return Py_BuildValue("(isi)", -1, "address", EINVAL);
    fd = open_upstream(family, &source, source_len, &target, target_len, mark, options, &step);
    if (fd < 0)
        return Py_BuildValue("(isi)", -1, step, errno);
    return Py_BuildValue("(isi)", fd, "", 0);
}

PyDoc_STRVAR(socket_error_doc, "socket_error(fd)\n--\n\nThe socket's pending error (SO_ERROR), "
                               "e.g. how its connect failed; 0 if none.");

static PyObject *splice_socket_error(PyObject *Py_UNUSED(module), PyObject *arg)
{
    int value = 0;
    socklen_t len = sizeof value;
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX || getsockopt((int)fd, SOL_SOCKET, SO_ERROR, &value, &len) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(value);
}


/* --- the whole hand-shake, for clients like those seen before -------------------------
 * Python decides; this only repeats decisions it has already made. A balancer address
 * is served here once Python has let it through (`balancers`), and a claimed client
 * once Python's policy has (`claims`: (family, host) -> (target host, port), cleared by
 * Python whenever the config or this host's addresses change). Everything else, and
 * every failure, goes back to Python as it stands, which then decides and words it. */

typedef struct {
    int fd, upstream;
    char host[INET6_ADDRSTRLEN];
    int port;
    ssize_t n;  /* bytes read; -1: nothing read */
    int err;    /* errno of the read */
    Header h;
    int parsed; /* h holds the pre-parser's answer */
    ssize_t sent;
} Client;

/* (fd, host, port, data, header, errno, upstream_fd, sent) for Python to go on with. */
static int hand_back(PyObject *slow, const Client *cl, const char *buf)
{
    PyObject *data, *header, *item;
    int rc;
    if (cl->n < 0) {
        data = Py_None;
        Py_INCREF(data);
    } else if ((data = PyBytes_FromStringAndSize(buf, cl->n)) == NULL) {
        return -1;
    }
    /* What fast_one parsed, not parsed again. */
    header = cl->parsed ? header_tuple(&cl->h) : (Py_INCREF(Py_None), Py_None);
    if (header == NULL) {
        Py_DECREF(data);
        return -1;
    }
    item = Py_BuildValue("(isiNNiin)", cl->fd, cl->host, cl->port, data, header, cl->err,
                         cl->upstream, (Py_ssize_t)cl->sent);
    if (item == NULL)
        return -1;
    rc = PyList_Append(slow, item);
    Py_DECREF(item);
    return rc;
}

/* The upstream socket, connected (or connecting) from the claimed client to the target,
 * as splice_connect makes it with CONNECT_KEEP_PORT and CONNECT_DEFER_ACK; -1 on any
 * failure (Python then does it again and words the failure). */
static int fast_upstream(const Header *h, PyObject *target, unsigned int mark, int keepalive)
{
    struct sockaddr_storage source, dest;
    socklen_t source_len, dest_len;
    const char *target_host, *step;
    int target_port;
    if (!PyArg_ParseTuple(target, "si", &target_host, &target_port)) {
        PyErr_Clear();
        return -1;
    }
    if (make_sockaddr(h->family, target_host, target_port, &dest, &dest_len) < 0 ||
        make_sockaddr(h->family, h->src, h->sport, &source, &source_len) < 0)
        return -1;
    return open_upstream(h->family, &source, source_len, &dest, dest_len, mark,
                         CONNECT_KEEP_PORT | CONNECT_DEFER_ACK | (keepalive ? CONNECT_KEEPALIVE : 0),
                         &step);
}

/* 1: relayed by the core now; 0: handed back to Python; -1: a Python error. */
static int fast_one(Core *core, Client *cl, char *buf, int size, PyObject *balancers,
                    PyObject *claims, unsigned int mark, int keepalive, PyObject *connection,
                    PyObject *slow)
{
    /* host and claimed: made once, for the lookups and then the record's tuple. */
    PyObject *host, *claimed = NULL, *key, *target, *info, *conn;
    size_t early;
    int fds[2], rc = -1;
    if ((host = PyUnicode_FromString(cl->host)) == NULL)
        return -1;
    if (PyDict_GetItemWithError(balancers, host) == NULL) {
        rc = PyErr_Occurred() ? -1 : hand_back(slow, cl, buf); /* not read: Python checks */
        goto done;
    }
    cl->n = read(cl->fd, buf, (size_t)size);
    if (cl->n < 0) {
        cl->err = errno;
        rc = hand_back(slow, cl, buf);
        goto done;
    }
    cl->parsed = parse_header_bytes(buf, (size_t)cl->n, &cl->h);
    if (!cl->parsed || !cl->h.proxy || (size_t)cl->n <= cl->h.length) {
        rc = hand_back(slow, cl, buf); /* LOCAL, no early bytes, or the codec's work */
        goto done;
    }
    early = (size_t)cl->n - cl->h.length;
    if ((claimed = PyUnicode_FromString(cl->h.src)) == NULL ||
        (key = Py_BuildValue("(sO)", cl->h.family == AF_INET ? "TCP4" : "TCP6", claimed)) ==
            NULL)
        goto done;
    /* Borrowed: no Python code runs between here and info, which holds it. */
    target = PyDict_GetItemWithError(claims, key);
    Py_DECREF(key);
    if (target == NULL) {
        rc = PyErr_Occurred() ? -1 : hand_back(slow, cl, buf);
        goto done;
    }
    if ((cl->upstream = fast_upstream(&cl->h, target, mark, keepalive)) < 0) {
        rc = hand_back(slow, cl, buf);
        goto done;
    }
    cl->sent = write(cl->upstream, buf + cl->h.length, early);
    if (cl->sent < 0 && errno != EAGAIN) { /* the connect failed: Python does it again */
        close(cl->upstream);
        cl->upstream = -1;
        cl->sent = 0;
        rc = hand_back(slow, cl, buf);
        goto done;
    }
    if (cl->sent < (ssize_t)early) { /* Python waits until the rest can be sent */
        if (cl->sent < 0)
            cl->sent = 0;
        rc = hand_back(slow, cl, buf);
        goto done;
    }
    info = Py_BuildValue("(OiOiOi)", host, cl->port, claimed, cl->h.sport, target,
                         cl->h.version);
    if (info == NULL)
        goto done;
    conn = PyObject_CallFunction(connection, "iiOn", cl->fd, cl->upstream, info,
                                 (Py_ssize_t)early);
    Py_DECREF(info);
    if (conn == NULL)
        goto done;
    fds[0] = cl->fd;
    fds[1] = cl->upstream;
    rc = core_add(core, fds, conn, (long long)early) < 0 ? -1 : 1;
    Py_DECREF(conn);
done:
    Py_DECREF(host);
    Py_XDECREF(claimed);
    return rc;
}

PyDoc_STRVAR(handshake_doc,
             "handshake(core, listen_fd, limit, size, balancers, claims, mark, keepalive, "
             "connection)\n--\n\n"
             "Accept up to `limit` clients. A client whose balancer is in `balancers`, whose "
             "first read (up to `size` bytes) holds a PROXY header the pre-parser takes and "
             "bytes after it, and whose (family, claimed host) is in `claims` (-> (target "
             "host, port)) is connected to its target from the claimed address and port, "
             "its early bytes sent, and handed to the core as "
             "connection(client_fd, upstream_fd, (balancer host, port, client host, port, "
             "(target host, port), version), early). Returns (relayed, of them v2, "
             "handed back, errno, lost): handed back are (fd, host, port, data, header, errno, "
             "upstream_fd, sent) for Python to go on with: data None when nothing was read "
             "(errno says why, 0: the balancer is not known yet); upstream_fd >= 0 when "
             "`sent` of the early bytes went and the rest wait. errno: of accept, when it "
             "failed for another reason than an empty backlog; lost: clients closed on an "
             "internal error (out of memory).");

static PyObject *splice_handshake(PyObject *Py_UNUSED(module), PyObject *args)
{
    Core *core;
    int lfd, limit, size, keepalive, error = 0;
    unsigned int mark;
    long relayed = 0, v2 = 0, lost = 0;
    PyObject *balancers, *claims, *connection, *slow;
    char buf[8192];
    if (!PyArg_ParseTuple(args, "O!iiiO!O!IpO", &CoreType, &core, &lfd, &limit, &size,
                          &PyDict_Type, &balancers, &PyDict_Type, &claims, &mark, &keepalive,
                          &connection))
        return NULL;
    if (size <= 0 || size > (int)sizeof buf) {
        PyErr_SetString(PyExc_ValueError, "size out of range");
        return NULL;
    }
    if ((slow = PyList_New(0)) == NULL)
        return NULL;
    for (int k = 0; k < limit; k++) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        Client cl = {.upstream = -1, .n = -1};
        int rc;
        cl.fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (cl.fd < 0) {
            if (errno == ECONNABORTED || errno == EPROTO || errno == EPERM)
                continue; /* that client is gone (or a firewall refused it): the next */
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                error = errno;
            break;
        }
        if (peer_name(&ss, cl.host, &cl.port) < 0) {
            close(cl.fd);
            continue;
        }
        rc = fast_one(core, &cl, buf, size, balancers, claims, mark, keepalive, connection,
                      slow);
        if (rc < 0) { /* out of memory, or a bug: this client is lost, counted, not the others */
            PyErr_Clear();
            close(cl.fd);
            if (cl.upstream >= 0)
                close(cl.upstream);
            lost++;
            break;
        }
        if (rc == 1) {
            relayed++;
            v2 += cl.h.version == 2;
        }
    }
    return Py_BuildValue("(llNil)", relayed, v2, slow, error, lost);
}

/* --- UDP -------------------------------------------------------------------------- */

/* UdpEngine: the datagrams of established UDP flows (mmproxy.udp), both ways, without
 * the GIL and without a Python call per datagram. A datagram goes straight to a flow
 * only when Python has already accepted its exact header from that balancer address on
 * that listener (learn), or, for PROXY v2 without a header, when Python has given the
 * flow that balancer port (bind_port). Everything else (a new or changed header, a
 * header alone, a truncated one, a port with no flow, errors) goes back to Python as
 * data: the checks, the policy and the records stay there. Replies all leave through
 * the listener, so they are batched into one sendmmsg(2) per listener. */

#define UDP_BATCH 64            /* datagrams per recvmmsg()/sendmmsg() */
#define UDP_REPLIES_PER_FLOW 8  /* replies read from one flow per wake-up */
#define UDP_SLOT 65536          /* larger than any UDP payload (no jumbograms) */
#define UDP_CMSG 64             /* room for one in_pktinfo or in6_pktinfo message */
#define UDP_SPP_SIZE 38
#define UDP_V2_FIXED 16
#define UDP_PEER_MAX 23
#define UDP_SLOW (-1)
#define UDP_HEADERLESS 0
/* What run() hands back to Python (the first item of each tuple). */
enum { UDP_DATAGRAM, UDP_SEND_ERROR, UDP_RECV_ERROR, UDP_REPLY_ERROR, UDP_LISTEN_ERROR,
       UDP_EVENT };

static const unsigned char UDP_V2_SIG[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D,
                                             0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

/* The size of the header a datagram carries: UDP_HEADERLESS (v2 only: no signature, so
 * the datagram belongs to its balancer port's flow), the size to look up, or UDP_SLOW
 * (too short to say, a header alone, or one longer than the datagram: Python decides).
 * It must agree with mmproxy.udp's reading of the same bytes (tests/test_udp_engine.py). */
static long udp_classify(int spp, const unsigned char *d, size_t len)
{
    size_t size;
    if (spp)
        return len >= UDP_SPP_SIZE ? UDP_SPP_SIZE : UDP_SLOW;
    if (len < sizeof UDP_V2_SIG || memcmp(d, UDP_V2_SIG, sizeof UDP_V2_SIG) != 0)
        return UDP_HEADERLESS;
    if (len < UDP_V2_FIXED)
        return UDP_SLOW;
    size = UDP_V2_FIXED + ((size_t)d[14] << 8 | d[15]);
    return size < len ? (long)size : UDP_SLOW;
}

typedef struct {
    unsigned char b[UDP_PEER_MAX];
    int len;
} PeerKey;

/* A balancer's address as compared: family, port, address (and IPv6 scope). */
static int peer_key(const struct sockaddr_storage *ss, PeerKey *k)
{
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        k->b[0] = 4;
        memcpy(k->b + 1, &sin->sin_port, 2);
        memcpy(k->b + 3, &sin->sin_addr, 4);
        k->len = 7;
        return 0;
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        k->b[0] = 6;
        memcpy(k->b + 1, &sin6->sin6_port, 2);
        memcpy(k->b + 3, &sin6->sin6_addr, 16);
        memcpy(k->b + 19, &sin6->sin6_scope_id, 4);
        k->len = 23;
        return 0;
    }
    return -1;
}

typedef struct UFlow {
    int fd, lfd;
    struct UFlow *next_known, *next_port;
    uint64_t known_hash, port_hash;
    char known, port, dirty;
    PeerKey peer;
    struct sockaddr_storage bal;
    socklen_t bal_len;
    unsigned char *header; /* the accepted header; SPP: also the prefix of every reply */
    size_t header_len;
    unsigned char cmsg[UDP_CMSG]; /* the reply's pktinfo (wildcard listeners) */
    size_t cmsg_len;
    long long pin, bin, pout, bout;
    double last_seen;
} UFlow;

typedef struct {
    int lfd;
    PeerKey peer;
    size_t len;
    socklen_t name_len;
    size_t cmsg_len;
    struct sockaddr_storage name;
    unsigned char cmsg[UDP_CMSG];
    unsigned char *data;
} UdpSlow;

typedef struct {
    int kind, fd, err;
} UdpNote;

typedef struct {
    PyObject_HEAD
    int epfd, spp;
    int held; /* set by hold() from any thread: every datagram goes to Python */
    uint64_t seed;
    int cap;           /* size of the by-fd tables */
    char *listener;    /* by fd: 0, or 1 + wildcard */
    UFlow **flows;     /* by upstream fd */
    Py_ssize_t nflows;
    UFlow **known_tab, **port_tab;
    size_t mask;       /* both tables have mask + 1 buckets */
    /* balancer -> application */
    struct mmsghdr rmsg[UDP_BATCH];
    struct iovec riov[UDP_BATCH];
    struct sockaddr_storage rname[UDP_BATCH];
    unsigned char rcmsg[UDP_BATCH][UDP_CMSG];
    unsigned char *rbuf;
    /* application -> balancer: replies waiting for one sendmmsg() */
    struct mmsghdr smsg[UDP_BATCH];
    struct iovec siov[UDP_BATCH][2];
    UFlow *sflow[UDP_BATCH];
    int nsend, slfd;
    unsigned char *sbuf;
    /* for Python */
    UdpSlow *slow;
    size_t nslow, slow_cap;
    UdpNote *notes;
    size_t nnotes, notes_cap;
    long long lost; /* notes that found no memory */
    int *dirty;
    size_t ndirty, dirty_cap;
    /* Totals relayed here. Only the relay thread writes them, but totals() may read them
     * from any thread, at any time: atomic stores and loads. */
    long long pin, bin, pout, bout;
    struct epoll_event events[MAX_EVENTS];
} UdpEngine;

static uint64_t udp_hash(uint64_t h, const unsigned char *p, size_t n)
{
    /* FNV-1a, seeded per engine: the tables only hold what Python accepted, but the
     * lookups are of anyone's bytes. */
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t port_hash(const UdpEngine *e, int lfd, const PeerKey *k)
{
    uint64_t h = udp_hash(e->seed, (const unsigned char *)&lfd, sizeof lfd);
    return udp_hash(h, k->b, (size_t)k->len);
}

static uint64_t known_hash(const UdpEngine *e, int lfd, const PeerKey *k,
                           const unsigned char *header, size_t n)
{
    return udp_hash(port_hash(e, lfd, k) ^ 0x9e3779b97f4a7c15ULL, header, n);
}

static void unlink_flow(UFlow **tab, size_t mask, UFlow *f, int port)
{
    UFlow **p = &tab[(port ? f->port_hash : f->known_hash) & mask];
    while (*p != NULL) {
        if (*p == f) {
            *p = port ? f->next_port : f->next_known;
            return;
        }
        p = port ? &(*p)->next_port : &(*p)->next_known;
    }
}

static void link_known(UdpEngine *e, UFlow *f)
{
    UFlow **b = &e->known_tab[f->known_hash & e->mask];
    f->next_known = *b;
    *b = f;
    f->known = 1;
}

static void link_port(UdpEngine *e, UFlow *f)
{
    UFlow **b = &e->port_tab[f->port_hash & e->mask];
    f->next_port = *b;
    *b = f;
    f->port = 1;
}

/* The flow whose accepted header (or, size 0, whose balancer port) this datagram is. */
static UFlow *udp_lookup(const UdpEngine *e, int lfd, const PeerKey *k,
                         const unsigned char *d, size_t size)
{
    UFlow *f;
    if (size == UDP_HEADERLESS) {
        uint64_t h = port_hash(e, lfd, k);
        for (f = e->port_tab[h & e->mask]; f != NULL; f = f->next_port)
            if (f->port_hash == h && f->lfd == lfd && f->peer.len == k->len &&
                memcmp(f->peer.b, k->b, (size_t)k->len) == 0)
                return f;
        return NULL;
    }
    uint64_t h = known_hash(e, lfd, k, d, size);
    for (f = e->known_tab[h & e->mask]; f != NULL; f = f->next_known)
        if (f->known_hash == h && f->lfd == lfd && f->header_len == size &&
            f->peer.len == k->len && memcmp(f->peer.b, k->b, (size_t)k->len) == 0 &&
            memcmp(f->header, d, size) == 0)
            return f;
    return NULL;
}

/* The flow a datagram goes to without Python, and where its payload starts. */
static UFlow *udp_match(const UdpEngine *e, int lfd, const struct sockaddr_storage *ss,
                        const unsigned char *d, size_t len, size_t *offset)
{
    PeerKey k;
    long size = udp_classify(e->spp, d, len);
    if (size == UDP_SLOW || peer_key(ss, &k) < 0)
        return NULL;
    *offset = (size_t)size;
    return udp_lookup(e, lfd, &k, d, (size_t)size);
}

static int udp_grow_tables(UdpEngine *e, size_t want)
{
    size_t size = e->mask + 1, i;
    UFlow **known, **port;
    if (want * 2 <= size && e->known_tab != NULL)
        return 0;
    while (size < want * 2)
        size *= 2;
    known = calloc(size, sizeof *known);
    port = calloc(size, sizeof *port);
    if (known == NULL || port == NULL) {
        free(known);
        free(port);
        return -1;
    }
    free(e->known_tab);
    free(e->port_tab);
    e->known_tab = known;
    e->port_tab = port;
    e->mask = size - 1;
    for (i = 0; i < (size_t)e->cap; i++) {
        UFlow *f = e->flows[i];
        if (f == NULL)
            continue;
        if (f->known)
            link_known(e, f);
        if (f->port)
            link_port(e, f);
    }
    return 0;
}

static int udp_grow_fds(UdpEngine *e, int fd)
{
    int cap = e->cap ? e->cap : 64;
    char *listener;
    UFlow **flows;
    while (cap <= fd)
        cap *= 2;
    if (cap == e->cap)
        return 0;
    listener = realloc(e->listener, (size_t)cap);
    if (listener == NULL)
        return -1;
    e->listener = listener;
    flows = realloc(e->flows, (size_t)cap * sizeof *flows);
    if (flows == NULL)
        return -1;
    memset(listener + e->cap, 0, (size_t)(cap - e->cap));
    memset(flows + e->cap, 0, (size_t)(cap - e->cap) * sizeof *flows);
    e->flows = flows;
    e->cap = cap;
    return 0;
}

static void udp_note(UdpEngine *e, int kind, int fd, int err)
{
    if (e->nnotes == e->notes_cap) {
        size_t cap = e->notes_cap ? e->notes_cap * 2 : 64;
        UdpNote *notes = realloc(e->notes, cap * sizeof *notes);
        if (notes == NULL) {
            e->lost++;
            return;
        }
        e->notes = notes;
        e->notes_cap = cap;
    }
    e->notes[e->nnotes++] = (UdpNote){kind, fd, err};
}

static void udp_count(long long *total, long long n)
{
    __atomic_store_n(total, *total + n, __ATOMIC_RELAXED);
}

static void udp_touch(UdpEngine *e, UFlow *f, double now)
{
    f->last_seen = now;
    if (f->dirty)
        return;
    if (e->ndirty == e->dirty_cap) {
        size_t cap = e->dirty_cap ? e->dirty_cap * 2 : 256;
        int *dirty = realloc(e->dirty, cap * sizeof *dirty);
        if (dirty == NULL)
            return; /* tried again at its next datagram */
        e->dirty = dirty;
        e->dirty_cap = cap;
    }
    e->dirty[e->ndirty++] = f->fd;
    f->dirty = 1;
}

/* A datagram for Python, copied out of the receive batch. */
static void udp_keep(UdpEngine *e, int lfd, const struct mmsghdr *m, const unsigned char *d)
{
    UdpSlow *s;
    if (e->nslow == e->slow_cap) {
        size_t cap = e->slow_cap ? e->slow_cap * 2 : 64;
        UdpSlow *slow = realloc(e->slow, cap * sizeof *slow);
        if (slow == NULL) {
            udp_note(e, UDP_LISTEN_ERROR, lfd, ENOMEM);
            return;
        }
        e->slow = slow;
        e->slow_cap = cap;
    }
    s = &e->slow[e->nslow];
    s->data = malloc(m->msg_len ? m->msg_len : 1);
    if (s->data == NULL) {
        udp_note(e, UDP_LISTEN_ERROR, lfd, ENOMEM);
        return;
    }
    memcpy(s->data, d, m->msg_len);
    s->lfd = lfd;
    if (peer_key(m->msg_hdr.msg_name, &s->peer) < 0)
        s->peer.len = 0;
    s->len = m->msg_len;
    s->name_len = m->msg_hdr.msg_namelen;
    memcpy(&s->name, m->msg_hdr.msg_name, sizeof s->name);
    s->cmsg_len = m->msg_hdr.msg_controllen;
    if (s->cmsg_len > UDP_CMSG)
        s->cmsg_len = 0;
    if (s->cmsg_len)
        memcpy(s->cmsg, m->msg_hdr.msg_control, s->cmsg_len);
    e->nslow++;
}

/* Whether a datagram from this balancer port waits for Python already: the ones after it
 * must too, or they could overtake it (e.g. a header that gives its port to a new flow). */
static int udp_waiting(const UdpEngine *e, int lfd, const struct sockaddr_storage *ss)
{
    PeerKey k;
    if (peer_key(ss, &k) < 0)
        return 1;
    for (size_t i = 0; i < e->nslow; i++)
        if (e->slow[i].lfd == lfd && e->slow[i].peer.len == k.len &&
            memcmp(e->slow[i].peer.b, k.b, (size_t)k.len) == 0)
            return 1;
    return 0;
}

static void udp_send_upstream(UdpEngine *e, UFlow *f, const unsigned char *p, size_t n,
                              double now)
{
    ssize_t sent = send(f->fd, p, n, MSG_DONTWAIT);
    if (sent < 0 && errno == ECONNREFUSED)
        /* An earlier datagram's ICMP error, reported now; this one was not sent: one
         * retry tells a target that came back from one still down (as mmproxy.udp). */
        sent = send(f->fd, p, n, MSG_DONTWAIT);
    if (sent < 0) {
        udp_note(e, UDP_SEND_ERROR, f->fd, errno);
        return;
    }
    udp_touch(e, f, now);
    f->pin++;
    f->bin += (long long)n;
    udp_count(&e->pin, 1);
    udp_count(&e->bin, (long long)n);
}

static void udp_from_balancer(UdpEngine *e, int lfd, int wildcard, double now)
{
    int i, n, held = __atomic_load_n(&e->held, __ATOMIC_ACQUIRE);
    for (i = 0; i < UDP_BATCH; i++) {
        struct msghdr *h = &e->rmsg[i].msg_hdr;
        h->msg_name = &e->rname[i];
        h->msg_namelen = sizeof e->rname[i];
        h->msg_iov = &e->riov[i];
        h->msg_iovlen = 1;
        h->msg_control = wildcard ? e->rcmsg[i] : NULL;
        h->msg_controllen = wildcard ? UDP_CMSG : 0;
        h->msg_flags = 0;
        e->riov[i].iov_base = e->rbuf + (size_t)i * UDP_SLOT;
        e->riov[i].iov_len = UDP_SLOT;
    }
    n = recvmmsg(lfd, e->rmsg, UDP_BATCH, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            udp_note(e, UDP_LISTEN_ERROR, lfd, errno);
        return;
    }
    for (i = 0; i < n; i++) {
        const unsigned char *d = e->riov[i].iov_base;
        size_t len = e->rmsg[i].msg_len, offset = 0;
        UFlow *f = NULL;
        if (!held && !(e->rmsg[i].msg_hdr.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
            f = udp_match(e, lfd, &e->rname[i], d, len, &offset);
        if (f != NULL && e->nslow && udp_waiting(e, lfd, &e->rname[i]))
            f = NULL;
        if (f == NULL)
            udp_keep(e, lfd, &e->rmsg[i], d);
        else
            udp_send_upstream(e, f, d + offset, len - offset, now);
    }
}

static void udp_flush(UdpEngine *e)
{
    int off = 0;
    while (off < e->nsend) {
        int r = sendmmsg(e->slfd, e->smsg + off, (unsigned int)(e->nsend - off), MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            udp_note(e, UDP_REPLY_ERROR, e->sflow[off]->fd, errno);
            r = 1; /* that reply is lost; the next may go */
        } else if (r == 0) {
            udp_note(e, UDP_REPLY_ERROR, e->sflow[off]->fd, EIO);
            r = 1; /* never seen: the loop must move on whatever the kernel says */
        } else {
            for (int i = off; i < off + r; i++) {
                UFlow *f = e->sflow[i];
                size_t n = e->siov[i][1].iov_len;
                f->pout++;
                f->bout += (long long)n;
                udp_count(&e->pout, 1);
                udp_count(&e->bout, (long long)n);
            }
        }
        off += r;
    }
    e->nsend = 0;
}

static void udp_from_target(UdpEngine *e, UFlow *f, double now)
{
    struct mmsghdr m[UDP_REPLIES_PER_FLOW];
    struct iovec iov[UDP_REPLIES_PER_FLOW];
    int i, n, want;
    if (e->nsend && (e->slfd != f->lfd || e->nsend > UDP_BATCH - UDP_REPLIES_PER_FLOW))
        udp_flush(e);
    e->slfd = f->lfd;
    want = UDP_REPLIES_PER_FLOW;
    memset(m, 0, sizeof m);
    for (i = 0; i < want; i++) {
        iov[i].iov_base = e->sbuf + (size_t)(e->nsend + i) * UDP_SLOT;
        iov[i].iov_len = UDP_SLOT;
        m[i].msg_hdr.msg_iov = &iov[i];
        m[i].msg_hdr.msg_iovlen = 1;
    }
    n = recvmmsg(f->fd, m, (unsigned int)want, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
            udp_note(e, UDP_RECV_ERROR, f->fd, errno);
        return;
    }
    if (n > 0)
        udp_touch(e, f, now);
    for (i = 0; i < n; i++) {
        int j = e->nsend++;
        struct msghdr *h = &e->smsg[j].msg_hdr;
        int spp = e->spp && f->header_len == UDP_SPP_SIZE;
        e->sflow[j] = f;
        e->siov[j][0].iov_base = f->header;
        e->siov[j][0].iov_len = spp ? UDP_SPP_SIZE : 0;
        e->siov[j][1].iov_base = iov[i].iov_base;
        e->siov[j][1].iov_len = m[i].msg_len;
        memset(h, 0, sizeof *h);
        h->msg_name = &f->bal;
        h->msg_namelen = f->bal_len;
        h->msg_iov = spp ? e->siov[j] : &e->siov[j][1];
        h->msg_iovlen = spp ? 2 : 1;
        h->msg_control = f->cmsg_len ? f->cmsg : NULL;
        h->msg_controllen = f->cmsg_len;
    }
}

static double udp_timeout_ms(double seconds)
{
    if (!(seconds > 0))
        return 0;
    if (seconds > 3600)
        return 3600e3;
    return ceil(seconds * 1e3);
}

/* --- UdpEngine: Python's side -------------------------------------------------------- */

static int UdpEngine_init(UdpEngine *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"epoll_fd", "spp", NULL};
    int epfd, spp = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|p", kwlist, &epfd, &spp))
        return -1;
    if (e->rbuf != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "UdpEngine is set up already");
        return -1;
    }
    e->epfd = epfd;
    e->spp = spp;
    if (getrandom(&e->seed, sizeof e->seed, GRND_NONBLOCK) != sizeof e->seed)
        e->seed = (uint64_t)monotonic_now() ^ ((uint64_t)getpid() << 32);
    e->seed ^= 0xcbf29ce484222325ULL;
    e->rbuf = malloc((size_t)UDP_BATCH * UDP_SLOT);
    e->sbuf = malloc((size_t)UDP_BATCH * UDP_SLOT);
    if (e->rbuf == NULL || e->sbuf == NULL || udp_grow_tables(e, 32) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static void udp_free_slow(UdpEngine *e)
{
    for (size_t i = 0; i < e->nslow; i++)
        free(e->slow[i].data);
    e->nslow = 0;
}

static void UdpEngine_dealloc(UdpEngine *e)
{
    for (int fd = 0; fd < e->cap; fd++)
        if (e->flows[fd] != NULL) {
            free(e->flows[fd]->header);
            free(e->flows[fd]);
        }
    udp_free_slow(e);
    free(e->slow);
    free(e->notes);
    free(e->dirty);
    free(e->listener);
    free(e->flows);
    free(e->known_tab);
    free(e->port_tab);
    free(e->rbuf);
    free(e->sbuf);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

static int udp_fd_arg(UdpEngine *e, int fd)
{
    if (e->rbuf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "UdpEngine is not set up");
        return -1;
    }
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return -1;
    }
    if (udp_grow_fds(e, fd) < 0) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static UFlow *udp_flow_arg(UdpEngine *e, int fd)
{
    if (e->rbuf == NULL || fd < 0 || fd >= e->cap || e->flows[fd] == NULL) {
        PyErr_Format(PyExc_KeyError, "no UDP flow with fd %d", fd);
        return NULL;
    }
    return e->flows[fd];
}

/* A socket module address tuple -> a sockaddr: (host, port) or (host, port, flowinfo,
 * scope_id); the host's family decides. */
static int udp_sockaddr(PyObject *peer, struct sockaddr_storage *ss, socklen_t *len)
{
    const char *host;
    int port;
    unsigned int flowinfo = 0, scope = 0;
    if (!PyTuple_Check(peer) ||
        !PyArg_ParseTuple(peer, "si|II", &host, &port, &flowinfo, &scope)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "a peer is a (host, port, ...) tuple");
        return -1;
    }
    memset(ss, 0, sizeof *ss);
    if (port < 0 || port > 65535)
        goto bad;
    if (strchr(host, ':') == NULL) {
        struct sockaddr_in *sin = (struct sockaddr_in *)ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *len = sizeof *sin;
        if (inet_pton(AF_INET, host, &sin->sin_addr) != 1)
            goto bad;
        return 0;
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_flowinfo = htonl(flowinfo);
        sin6->sin6_scope_id = scope;
        *len = sizeof *sin6;
        if (inet_pton(AF_INET6, host, &sin6->sin6_addr) != 1)
            goto bad;
        return 0;
    }
bad:
    PyErr_Format(PyExc_ValueError, "not an address: %R", peer);
    return -1;
}

/* socket.recvmsg()'s ancillary list [(level, type, data)] -> a control buffer. */
static int udp_cmsg(PyObject *ancillary, unsigned char *buf, size_t *len)
{
    struct msghdr h;
    struct cmsghdr *c;
    Py_ssize_t i, n;
    memset(buf, 0, UDP_CMSG);
    *len = 0;
    if (ancillary == Py_None)
        return 0;
    if (!PyList_Check(ancillary)) {
        PyErr_SetString(PyExc_TypeError, "ancillary data is a list");
        return -1;
    }
    memset(&h, 0, sizeof h);
    h.msg_control = buf;
    h.msg_controllen = UDP_CMSG;
    c = CMSG_FIRSTHDR(&h);
    n = PyList_GET_SIZE(ancillary);
    for (i = 0; i < n; i++) {
        int level, type;
        Py_buffer data;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(ancillary, i), "iiy*", &level, &type, &data))
            return -1;
        if (c == NULL || *len + CMSG_SPACE(data.len) > UDP_CMSG) {
            PyBuffer_Release(&data);
            PyErr_SetString(PyExc_ValueError, "ancillary data too long");
            return -1;
        }
        c->cmsg_level = level;
        c->cmsg_type = type;
        c->cmsg_len = CMSG_LEN(data.len);
        memcpy(CMSG_DATA(c), data.buf, (size_t)data.len);
        *len += CMSG_SPACE(data.len);
        PyBuffer_Release(&data);
        h.msg_controllen = *len;
        c = *len < UDP_CMSG ? (struct cmsghdr *)(buf + *len) : NULL;
    }
    return 0;
}

PyDoc_STRVAR(udp_add_listener_doc, "add_listener(fd, wildcard)\n--\n\n"
             "A listening UDP socket (Python registers it in the epoll set). wildcard: it "
             "is bound to every address and asks for each datagram's pktinfo.");

static PyObject *UdpEngine_add_listener(UdpEngine *e, PyObject *args)
{
    int fd, wildcard;
    if (!PyArg_ParseTuple(args, "ip", &fd, &wildcard) || udp_fd_arg(e, fd) < 0)
        return NULL;
    e->listener[fd] = (char)(1 + wildcard);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_add_flow_doc, "add_flow(fd, listener_fd, balancer, ancillary)\n--\n\n"
             "A flow's upstream socket (Python registers it in the epoll set): its replies "
             "go to balancer (a socket address tuple) from listener_fd, with ancillary "
             "(sendmsg()'s list, e.g. the pktinfo) when not empty.");

static PyObject *UdpEngine_add_flow(UdpEngine *e, PyObject *args)
{
    int fd, lfd;
    PyObject *peer, *ancillary;
    UFlow *f;
    if (!PyArg_ParseTuple(args, "iiOO", &fd, &lfd, &peer, &ancillary) ||
        udp_fd_arg(e, fd) < 0)
        return NULL;
    if (e->flows[fd] != NULL) {
        PyErr_Format(PyExc_ValueError, "fd %d has a flow already", fd);
        return NULL;
    }
    f = calloc(1, sizeof *f);
    if (f == NULL)
        return PyErr_NoMemory();
    if (udp_sockaddr(peer, &f->bal, &f->bal_len) < 0 ||
        udp_cmsg(ancillary, f->cmsg, &f->cmsg_len) < 0 || peer_key(&f->bal, &f->peer) < 0) {
        free(f);
        return NULL;
    }
    if (udp_grow_tables(e, (size_t)e->nflows + 1) < 0) {
        free(f);
        return PyErr_NoMemory();
    }
    f->fd = fd;
    f->lfd = lfd;
    f->last_seen = monotonic_now();
    f->port_hash = port_hash(e, lfd, &f->peer);
    e->flows[fd] = f;
    e->nflows++;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_learn_doc, "learn(fd, header)\n--\n\n"
             "From now on a datagram from the flow's balancer, on its listener, that "
             "starts with exactly these header bytes goes to the flow (its previous header "
             "no longer does). SPP: the header also prefixes the flow's replies.");

static PyObject *UdpEngine_learn(UdpEngine *e, PyObject *args)
{
    int fd;
    Py_buffer header;
    UFlow *f;
    unsigned char *copy;
    if (!PyArg_ParseTuple(args, "iy*", &fd, &header))
        return NULL;
    f = udp_flow_arg(e, fd);
    if (f == NULL || header.len == 0) {
        if (f != NULL)
            PyErr_SetString(PyExc_ValueError, "an empty header");
        PyBuffer_Release(&header);
        return NULL;
    }
    copy = malloc((size_t)header.len);
    if (copy == NULL) {
        PyBuffer_Release(&header);
        return PyErr_NoMemory();
    }
    memcpy(copy, header.buf, (size_t)header.len);
    if (f->known)
        unlink_flow(e->known_tab, e->mask, f, 0);
    free(f->header);
    f->header = copy;
    f->header_len = (size_t)header.len;
    f->known_hash = known_hash(e, f->lfd, &f->peer, copy, f->header_len);
    link_known(e, f);
    PyBuffer_Release(&header);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_hold_doc, "hold()\n--\n\n"
             "Any thread (a reload): from now on every datagram from a balancer goes to "
             "Python, until forget_known().");

static PyObject *UdpEngine_hold(UdpEngine *e, PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&e->held, 1, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_forget_known_doc, "forget_known()\n--\n\n"
             "No header leads to a flow any more (a reload: every header is checked "
             "again), and hold() ends. SPP replies keep their prefix.");

static PyObject *UdpEngine_forget_known(UdpEngine *e, PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&e->held, 0, __ATOMIC_RELEASE);
    for (int fd = 0; fd < e->cap; fd++)
        if (e->flows[fd] != NULL)
            e->flows[fd]->known = 0;
    if (e->known_tab != NULL)
        memset(e->known_tab, 0, (e->mask + 1) * sizeof *e->known_tab);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_bind_port_doc, "bind_port(fd, bound)\n--\n\n"
             "v2: whether datagrams without a header from the flow's balancer port, on its "
             "listener, go to the flow.");

static PyObject *UdpEngine_bind_port(UdpEngine *e, PyObject *args)
{
    int fd, bound;
    UFlow *f;
    if (!PyArg_ParseTuple(args, "ip", &fd, &bound))
        return NULL;
    f = udp_flow_arg(e, fd);
    if (f == NULL)
        return NULL;
    if (f->port && !bound) {
        unlink_flow(e->port_tab, e->mask, f, 1);
        f->port = 0;
    } else if (!f->port && bound) {
        link_port(e, f);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_remove_doc, "remove(fd)\n--\n\n"
             "Forget a flow (Python closes its socket): its counters of datagrams relayed "
             "here, (packets_in, bytes_in, packets_out, bytes_out).");

static PyObject *UdpEngine_remove(UdpEngine *e, PyObject *arg)
{
    long fd = PyLong_AsLong(arg);
    UFlow *f;
    PyObject *counts;
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    f = udp_flow_arg(e, fd > INT_MAX ? -1 : (int)fd);
    if (f == NULL)
        return NULL;
    counts = Py_BuildValue("(LLLL)", f->pin, f->bin, f->pout, f->bout);
    if (counts == NULL)
        return NULL;
    if (f->known)
        unlink_flow(e->known_tab, e->mask, f, 0);
    if (f->port)
        unlink_flow(e->port_tab, e->mask, f, 1);
    e->flows[fd] = NULL;
    e->nflows--;
    free(f->header);
    free(f);
    return counts;
}

PyDoc_STRVAR(udp_set_spp_doc, "set_spp(spp)\n--\n\nThe framing of new datagrams (reload).");

static PyObject *UdpEngine_set_spp(UdpEngine *e, PyObject *arg)
{
    int spp = PyObject_IsTrue(arg);
    if (spp < 0)
        return NULL;
    e->spp = spp;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(udp_touched_doc, "touched()\n--\n\n"
             "[(fd, last_seen)] of the flows that relayed a datagram here since the last "
             "call (time.monotonic()'s clock).");

static PyObject *UdpEngine_touched(UdpEngine *e, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    for (size_t i = 0; i < e->ndirty; i++) {
        int fd = e->dirty[i];
        UFlow *f = fd < e->cap ? e->flows[fd] : NULL;
        PyObject *item;
        if (f == NULL || !f->dirty)
            continue; /* removed since, or a new flow on the same fd listed already */
        f->dirty = 0;
        item = Py_BuildValue("(id)", fd, f->last_seen);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    e->ndirty = 0;
    return list;
}

static PyObject *udp_peer_tuple(const struct sockaddr_storage *ss)
{
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(sin->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(sin6->sin6_port),
                             (unsigned int)ntohl(sin6->sin6_flowinfo),
                             (unsigned int)sin6->sin6_scope_id);
    }
    return Py_BuildValue("(si)", "", 0);
}

static PyObject *udp_ancillary_list(const UdpSlow *s)
{
    struct msghdr h;
    struct cmsghdr *c;
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    memset(&h, 0, sizeof h);
    h.msg_control = (void *)s->cmsg;
    h.msg_controllen = s->cmsg_len;
    for (c = CMSG_FIRSTHDR(&h); c != NULL; c = CMSG_NXTHDR(&h, c)) {
        size_t n = c->cmsg_len - CMSG_LEN(0);
        PyObject *item;
        if (c->cmsg_len < CMSG_LEN(0) ||
            (unsigned char *)CMSG_DATA(c) + n > s->cmsg + s->cmsg_len)
            break;
        item = Py_BuildValue("(iiy#)", c->cmsg_level, c->cmsg_type,
                             (const char *)CMSG_DATA(c), (Py_ssize_t)n);
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
    }
    return list;
}

static PyObject *udp_items(UdpEngine *e)
{
    PyObject *list = PyList_New(0), *item = NULL;
    size_t i;
    if (list == NULL)
        goto fail;
    for (i = 0; i < e->nslow; i++) {
        const UdpSlow *s = &e->slow[i];
        PyObject *anc = udp_ancillary_list(s), *peer = udp_peer_tuple(&s->name);
        if (anc == NULL || peer == NULL) {
            Py_XDECREF(anc);
            Py_XDECREF(peer);
            goto fail;
        }
        item = Py_BuildValue("(iiy#NN)", UDP_DATAGRAM, s->lfd, (const char *)s->data,
                             (Py_ssize_t)s->len, anc, peer);
        if (item == NULL || PyList_Append(list, item) < 0)
            goto fail;
        Py_CLEAR(item);
    }
    for (i = 0; i < e->nnotes; i++) {
        item = Py_BuildValue("(iii)", e->notes[i].kind, e->notes[i].fd, e->notes[i].err);
        if (item == NULL || PyList_Append(list, item) < 0)
            goto fail;
        Py_CLEAR(item);
    }
    udp_free_slow(e);
    e->nnotes = 0;
    return list;
fail:
    Py_XDECREF(item);
    Py_XDECREF(list);
    udp_free_slow(e);
    e->nnotes = 0;
    return NULL;
}

PyDoc_STRVAR(udp_run_doc, "run(timeout)\n--\n\n"
             "Relay what the flows' tables allow, for up to timeout seconds or until "
             "something is for Python, and return that, in order: (DATAGRAM, "
             "listener_fd, data, ancillary, peer), (SEND_ERROR | RECV_ERROR | REPLY_ERROR, flow fd, errno), "
             "(LISTEN_ERROR, listener fd, errno), (EVENT, fd, events) for the fds it does "
             "not know.");

static PyObject *UdpEngine_run(UdpEngine *e, PyObject *arg)
{
    double timeout = PyFloat_AsDouble(arg);
    int n, err = 0;
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (e->rbuf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "UdpEngine is not set up");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    /* Round after round until Python has something to do or the time is up: a return
     * to Python per wake-up would cost about as much as the relay's work. */
    double now = monotonic_now(), deadline = now + (timeout > 0 ? timeout : 0);
    for (;;) {
        n = epoll_wait(e->epfd, e->events, MAX_EVENTS, (int)udp_timeout_ms(deadline - now));
        if (n < 0) {
            err = errno;
            break;
        }
        now = monotonic_now();
        for (int i = 0; i < n; i++) {
            int fd = e->events[i].data.fd;
            if (fd >= 0 && fd < e->cap && e->listener[fd])
                udp_from_balancer(e, fd, e->listener[fd] == 2, now);
            else if (fd >= 0 && fd < e->cap && e->flows[fd] != NULL)
                udp_from_target(e, e->flows[fd], now);
            else
                udp_note(e, UDP_EVENT, fd, (int)e->events[i].events);
        }
        if (e->nsend)
            udp_flush(e);
        if (e->nslow || e->nnotes || now >= deadline)
            break;
    }
    Py_END_ALLOW_THREADS
    if (err != 0 && err != EINTR) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return udp_items(e);
}

PyDoc_STRVAR(udp_match_doc, "match(listener_fd, peer, data)\n--\n\n"
             "For tests and fuzzing: the flow fd that run() would send this datagram to "
             "and the payload's offset, or None (it would go to Python).");

static PyObject *UdpEngine_match(UdpEngine *e, PyObject *args)
{
    int lfd;
    PyObject *peer;
    Py_buffer data;
    struct sockaddr_storage ss;
    socklen_t len;
    size_t offset = 0;
    UFlow *f;
    if (!PyArg_ParseTuple(args, "iOy*", &lfd, &peer, &data))
        return NULL;
    if (e->rbuf == NULL || udp_sockaddr(peer, &ss, &len) < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "UdpEngine is not set up");
        PyBuffer_Release(&data);
        return NULL;
    }
    f = udp_match(e, lfd, &ss, data.buf, (size_t)data.len, &offset);
    PyBuffer_Release(&data);
    if (f == NULL)
        Py_RETURN_NONE;
    return Py_BuildValue("(in)", f->fd, (Py_ssize_t)offset);
}

PyDoc_STRVAR(udp_totals_doc, "totals()\n--\n\n"
             "Any thread: (packets_in, bytes_in, packets_out, bytes_out) relayed here.");

static PyObject *UdpEngine_totals(UdpEngine *e, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("(LLLL)", __atomic_load_n(&e->pin, __ATOMIC_RELAXED),
                         __atomic_load_n(&e->bin, __ATOMIC_RELAXED),
                         __atomic_load_n(&e->pout, __ATOMIC_RELAXED),
                         __atomic_load_n(&e->bout, __ATOMIC_RELAXED));
}

static Py_ssize_t UdpEngine_len(UdpEngine *e)
{
    return e->nflows;
}

static PyMethodDef UdpEngine_methods[] = {
    {"add_listener", (PyCFunction)UdpEngine_add_listener, METH_VARARGS, udp_add_listener_doc},
    {"add_flow", (PyCFunction)UdpEngine_add_flow, METH_VARARGS, udp_add_flow_doc},
    {"learn", (PyCFunction)UdpEngine_learn, METH_VARARGS, udp_learn_doc},
    {"hold", (PyCFunction)UdpEngine_hold, METH_NOARGS, udp_hold_doc},
    {"forget_known", (PyCFunction)UdpEngine_forget_known, METH_NOARGS, udp_forget_known_doc},
    {"bind_port", (PyCFunction)UdpEngine_bind_port, METH_VARARGS, udp_bind_port_doc},
    {"remove", (PyCFunction)UdpEngine_remove, METH_O, udp_remove_doc},
    {"set_spp", (PyCFunction)UdpEngine_set_spp, METH_O, udp_set_spp_doc},
    {"touched", (PyCFunction)UdpEngine_touched, METH_NOARGS, udp_touched_doc},
    {"run", (PyCFunction)UdpEngine_run, METH_O, udp_run_doc},
    {"match", (PyCFunction)UdpEngine_match, METH_VARARGS, udp_match_doc},
    {"totals", (PyCFunction)UdpEngine_totals, METH_NOARGS, udp_totals_doc},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods UdpEngine_as_sequence = {
    .sq_length = (lenfunc)UdpEngine_len,
};

static PyTypeObject UdpEngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "mmproxy._splice.UdpEngine",
    .tp_doc = PyDoc_STR("UdpEngine(epoll_fd, spp=False): the established UDP flows of one "
                        "loop, relayed without Python per datagram."),
    .tp_basicsize = sizeof(UdpEngine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)UdpEngine_init,
    .tp_dealloc = (destructor)UdpEngine_dealloc,
    .tp_methods = UdpEngine_methods,
    .tp_as_sequence = &UdpEngine_as_sequence,
};

PyDoc_STRVAR(udp_classify_doc, "udp_classify(data, spp)\n--\n\n"
             "For tests and fuzzing: the header size UdpEngine reads in a datagram: 0 "
             "(v2, no header: its balancer port's flow), the size, or -1 (Python decides).");

static PyObject *splice_udp_classify(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer data;
    int spp;
    long size;
    if (!PyArg_ParseTuple(args, "y*p", &data, &spp))
        return NULL;
    size = udp_classify(spp, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromLong(size);
}

static PyMethodDef splice_functions[] = {
    {"connect", splice_connect, METH_VARARGS, connect_doc},
    {"socket_error", splice_socket_error, METH_O, socket_error_doc},
    {"parse_header", splice_parse_header, METH_O, parse_header_doc},
    {"read_header", splice_read_header, METH_VARARGS, read_header_doc},
    {"handshake", splice_handshake, METH_VARARGS, handshake_doc},
    {"udp_classify", splice_udp_classify, METH_VARARGS, udp_classify_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef splice_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mmproxy._splice",
    .m_doc = PyDoc_STR("The forwarder's hot path: the relay's splice(2) work, accept, connect."),
    .m_size = -1,
    .m_methods = splice_functions,
};

static int add_udp(PyObject *m)
{
    Py_INCREF(&UdpEngineType);
    if (PyModule_AddObject(m, "UdpEngine", (PyObject *)&UdpEngineType) < 0) {
        Py_DECREF(&UdpEngineType);
        return -1;
    }
    return PyModule_AddIntConstant(m, "UDP_DATAGRAM", UDP_DATAGRAM) < 0 ||
                   PyModule_AddIntConstant(m, "UDP_SEND_ERROR", UDP_SEND_ERROR) < 0 ||
                   PyModule_AddIntConstant(m, "UDP_RECV_ERROR", UDP_RECV_ERROR) < 0 ||
                   PyModule_AddIntConstant(m, "UDP_REPLY_ERROR", UDP_REPLY_ERROR) < 0 ||
                   PyModule_AddIntConstant(m, "UDP_LISTEN_ERROR", UDP_LISTEN_ERROR) < 0 ||
                   PyModule_AddIntConstant(m, "UDP_EVENT", UDP_EVENT) < 0
               ? -1
               : 0;
}

PyMODINIT_FUNC PyInit__splice(void)
{
    PyObject *m;
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&UdpEngineType) < 0)
        return NULL;
    m = PyModule_Create(&splice_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CoreType);
    if (PyModule_AddObject(m, "Core", (PyObject *)&CoreType) < 0 ||
        PyModule_AddIntConstant(m, "END_EOF", END_EOF) < 0 ||
        PyModule_AddIntConstant(m, "END_READ", END_READ) < 0 ||
        PyModule_AddIntConstant(m, "END_WRITE", END_WRITE) < 0 ||
        PyModule_AddIntConstant(m, "END_IDLE", END_IDLE) < 0 ||
        PyModule_AddIntConstant(m, "END_HALF_CLOSED", END_HALF_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "END_CLOSED", END_CLOSED) < 0 ||
        PyModule_AddIntConstant(m, "END_RELAY", END_RELAY) < 0 ||
        PyModule_AddIntConstant(m, "CONNECT_KEEP_PORT", CONNECT_KEEP_PORT) < 0 ||
        PyModule_AddIntConstant(m, "CONNECT_KEEPALIVE", CONNECT_KEEPALIVE) < 0 ||
        PyModule_AddIntConstant(m, "CONNECT_DEFER_ACK", CONNECT_DEFER_ACK) < 0 ||
        add_udp(m) < 0) {
        Py_DECREF(&CoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
