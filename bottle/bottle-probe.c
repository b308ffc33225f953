/*
 * bottle-probe: the in-bottle prober of bot-bottle, as a small static binary.
 *
 * It speaks exactly the line protocol of bottle/prober.py, so a bottle whose
 * image has no Python can still be probed:
 *
 *     bottle-probe [--timeout-ms N] [--marker NAME] ID=PROTO:HOST:PORT:NONCE ...
 *
 * The two options come in any order before the targets.  PROTO is
 *
 *   tcp   connect, send "NONCE\n", wait for the same line back;
 *   udp   send "NONCE\n" as one datagram, wait for it back;
 *   dns   send a DNS query (id 0x6262, recursion desired, type A, class IN)
 *         for NONCE.bottle-probe.test and wait for one reply; it counts as
 *         answered when its first two bytes are the query's id;
 *   self  listen on HOST:PORT, wait 0.4 s, then connect there, send
 *         "NONCE\n" and expect "NONCE MARKER" back: the listener
 *         answers each line's first word followed by " MARKER", so two
 *         bottles listening on one port each see whether they reach their
 *         own listener.
 *
 * An IPv6 HOST is written in brackets; HOST must be a numeric address (the
 * image has no resolver).  Every target is probed at once, with non-blocking
 * sockets and one poll() loop.  Output, one line per target in the order
 * given:
 *
 *     ID OUTCOME ERRNO LATENCY_US ECHOED
 *
 * OUTCOME is CONNECTED, DENIED, REFUSED, UNREACHABLE, TIMEOUT, UNSUPPORTED
 * (the bottle has no such address family or address) or ERROR; ECHOED is 1
 * when the far side sent the nonce back.  A completed TCP handshake counts as
 * CONNECTED even when nothing echoes; a datagram probe is CONNECTED only when
 * it is answered.  A connect may take the whole timeout, counted from when it
 * starts; the answer must come within the timeout counted from the start.
 *
 *     bottle-probe --serve PORT
 *
 * runs a nonce echo server on PORT (TCP and UDP, every address): it reads one
 * line per connection or datagram, writes "NONCE PEER" to stdout (flushed at
 * once, before the echo), and sends the line back.  In a container, its log
 * is the far side's evidence of which probes arrived.  A connection that
 * sends no line is logged with "-" as its nonce.
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_LINE 256
#define MAX_MARKER 64
#define MAX_TARGETS 4096
#define MAX_CLIENTS 512
#define MAX_ANSWERS 64
#define CLIENT_TIMEOUT_MS 10000
#define SELF_LISTEN_US 400000LL
#define DNS_ID 0x62

enum proto { TCP, UDP, DNS, SELF };
enum state { WAITING, CONNECTING, SENDING, READING, DONE };

struct probe {
    const char *id;
    enum proto proto;
    char host[64];
    int port;
    const char *nonce;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int fd, listen_fd;
    enum state state;
    int connected;
    int echoed;
    int code;
    const char *outcome;
    char sendbuf[MAX_LINE + MAX_MARKER + 64];
    size_t sendlen, sent;
    char expect[MAX_LINE + MAX_MARKER + 2];
    char recvbuf[MAX_LINE + 1];
    size_t recvlen;
    long long started_us, connect_at_us, deadline_us, ended_us;
};

/* A connection to a self probe's listener, answered with " MARKER". */
struct answer {
    int fd;
    char buf[MAX_LINE + 1];
    size_t len;
};

static const char *marker = "-";
static long long timeout_us = 1500000LL;
static struct answer answers[MAX_ANSWERS];

static long long now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static const char *classify(int code)
{
    switch (code) {
    case EACCES:
    case EPERM:
        return "DENIED";
    case ECONNREFUSED:
    case ECONNRESET:
        return "REFUSED";
    case ENETUNREACH:
    case EHOSTUNREACH:
        return "UNREACHABLE";
    case ETIMEDOUT:
        return "TIMEOUT";
    case EAFNOSUPPORT:
    case EADDRNOTAVAIL:
    case EPROTONOSUPPORT:
        return "UNSUPPORTED";
    default:
        return "ERROR";
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bottle-probe [--timeout-ms N] [--marker NAME] "
            "ID=PROTO:HOST:PORT:NONCE ...\n"
            "       bottle-probe --serve PORT\n");
    exit(2);
}

static int parse_proto(const char *text, enum proto *proto)
{
    static const char *const names[] = {"tcp", "udp", "dns", "self"};
    for (int i = 0; i < 4; i++)
        if (strcmp(text, names[i]) == 0) {
            *proto = (enum proto)i;
            return 0;
        }
    return -1;
}

/* ID=PROTO:HOST:PORT:NONCE, HOST possibly in brackets; 0 on success. */
static int parse_target(char *text, struct probe *p)
{
    char *eq = strchr(text, '=');
    if (eq == NULL)
        return -1;
    *eq = '\0';
    p->id = text;
    char *rest = eq + 1;
    char *colon = strchr(rest, ':');
    if (colon == NULL)
        return -1;
    *colon = '\0';
    if (parse_proto(rest, &p->proto) != 0)
        return -1;
    rest = colon + 1;
    char *host_end;
    if (*rest == '[') {
        rest++;
        host_end = strstr(rest, "]:");
        if (host_end == NULL)
            return -1;
        *host_end = '\0';
        host_end += 1;
    } else {
        host_end = strchr(rest, ':');
        if (host_end == NULL)
            return -1;
        *host_end = '\0';
    }
    if (strlen(rest) >= sizeof p->host)
        return -1;
    strcpy(p->host, rest);
    rest = host_end + 1;
    colon = strchr(rest, ':');
    if (colon == NULL)
        return -1;
    *colon = '\0';
    char *end;
    long port = strtol(rest, &end, 10);
    if (*rest == '\0' || *end != '\0' || port < 0 || port > 65535)
        return -1;
    p->port = (int)port;
    p->nonce = colon + 1;
    /* A DNS label's length is one byte. */
    if (strlen(p->nonce) > (p->proto == DNS ? 255 : MAX_LINE))
        return -1;
    return 0;
}

static void finish(struct probe *p, int code)
{
    if (p->fd >= 0)
        close(p->fd);
    if (p->listen_fd >= 0)
        close(p->listen_fd);
    p->fd = p->listen_fd = -1;
    p->state = DONE;
    p->ended_us = now_us();
    /* Python reports a timed-out socket as TimeoutError, without an errno. */
    p->code = code == ETIMEDOUT ? 0 : code;
    if (p->connected || p->echoed)
        p->outcome = "CONNECTED";
    else if (p->code != 0)
        p->outcome = classify(p->code);
    else
        p->outcome = "TIMEOUT";
}

/* Whether the received bytes hold a whole first line (or all there will be). */
static int line_complete(const char *buf, size_t len)
{
    return memchr(buf, '\n', len) != NULL || len >= MAX_LINE;
}

static size_t first_line(const char *buf, size_t len)
{
    const char *newline = memchr(buf, '\n', len);
    return newline ? (size_t)(newline - buf) : len;
}

static void check_echo(struct probe *p)
{
    size_t len = first_line(p->recvbuf, p->recvlen);
    p->echoed = len == strlen(p->expect) && memcmp(p->recvbuf, p->expect, len) == 0;
}

/* Fills p->addr; the address family, or -1 when HOST is not numeric. */
static int parse_address(struct probe *p)
{
    memset(&p->addr, 0, sizeof p->addr);
    if (strchr(p->host, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&p->addr;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((unsigned short)p->port);
        p->addrlen = sizeof *sin6;
        return inet_pton(AF_INET6, p->host, &sin6->sin6_addr) == 1 ? AF_INET6 : -1;
    }
    struct sockaddr_in *sin = (struct sockaddr_in *)&p->addr;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((unsigned short)p->port);
    p->addrlen = sizeof *sin;
    return inet_pton(AF_INET, p->host, &sin->sin_addr) == 1 ? AF_INET : -1;
}

/* The query of bottle/prober.py's dns_query(), into p->sendbuf. */
static void build_dns_query(struct probe *p)
{
    static const unsigned char header[12] = {DNS_ID, DNS_ID, 1, 0, 0, 1};
    const char *labels[] = {p->nonce, "bottle-probe", "test"};
    unsigned char *out = (unsigned char *)p->sendbuf;
    size_t n = sizeof header;

    memcpy(out, header, n);
    for (int i = 0; i < 3; i++) {
        size_t len = strlen(labels[i]);
        out[n++] = (unsigned char)len;
        memcpy(out + n, labels[i], len);
        n += len;
    }
    static const unsigned char tail[5] = {0, 0, 1, 0, 1}; /* root, A, IN */
    memcpy(out + n, tail, sizeof tail);
    p->sendlen = n + sizeof tail;
}

static void begin_connect(struct probe *p)
{
    int kind = p->proto == UDP || p->proto == DNS ? SOCK_DGRAM : SOCK_STREAM;
    p->fd = socket(p->addr.ss_family, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p->fd < 0) {
        finish(p, errno);
        return;
    }
    p->deadline_us = now_us() + timeout_us;
    if (connect(p->fd, (struct sockaddr *)&p->addr, p->addrlen) == 0) {
        p->connected = kind == SOCK_STREAM;
        p->deadline_us = p->started_us + timeout_us;
        p->state = SENDING;
    } else if (errno == EINPROGRESS) {
        p->state = CONNECTING;
    } else {
        finish(p, errno);
    }
}

static int open_listener(struct probe *p)
{
    int one = 1;
    int kind = SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC;
    p->listen_fd = socket(p->addr.ss_family, kind, 0);
    if (p->listen_fd < 0)
        return errno;
    setsockopt(p->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(p->listen_fd, (struct sockaddr *)&p->addr, p->addrlen) != 0 ||
        listen(p->listen_fd, 8) != 0)
        return errno;
    return 0;
}

static void start_probe(struct probe *p)
{
    p->fd = p->listen_fd = -1;
    p->started_us = now_us();
    if (parse_address(p) < 0) {
        finish(p, EINVAL);
        return;
    }
    if (p->proto == DNS) {
        build_dns_query(p);
    } else if (p->proto == SELF) {
        snprintf(p->expect, sizeof p->expect, "%s %s", p->nonce, marker);
    } else {
        snprintf(p->expect, sizeof p->expect, "%s", p->nonce);
    }
    /* Only the nonce goes out: a self probe's own listener adds the marker,
       so a plain echo server on the port cannot pass for it. */
    if (p->proto != DNS)
        p->sendlen = (size_t)snprintf(p->sendbuf, sizeof p->sendbuf, "%s\n", p->nonce);
    if (p->proto == SELF) {
        int error = open_listener(p);
        if (error != 0) {
            finish(p, error);
            return;
        }
        p->state = WAITING;
        p->connect_at_us = p->started_us + SELF_LISTEN_US;
        return;
    }
    begin_connect(p);
}

static void send_request(struct probe *p)
{
    while (p->sent < p->sendlen) {
        ssize_t n = send(p->fd, p->sendbuf + p->sent, p->sendlen - p->sent,
                         MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            finish(p, errno);
            return;
        }
        p->sent += (size_t)n;
    }
    p->state = READING;
}

static void receive(struct probe *p)
{
    for (;;) {
        ssize_t n = recv(p->fd, p->recvbuf + p->recvlen, MAX_LINE - p->recvlen, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EINTR)
                continue;
            finish(p, errno);
            return;
        }
        p->recvlen += (size_t)n;
        if (p->proto == DNS) {
            /* One reply decides, as in bottle/prober.py. */
            p->echoed = n >= 2 && (unsigned char)p->recvbuf[0] == DNS_ID &&
                        (unsigned char)p->recvbuf[1] == DNS_ID;
            finish(p, 0);
            return;
        }
        if (n == 0 || line_complete(p->recvbuf, p->recvlen)) {
            check_echo(p);
            finish(p, 0);
            return;
        }
    }
}

static void accept_answer(int listen_fd)
{
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    for (int i = 0; i < MAX_ANSWERS; i++)
        if (answers[i].fd < 0) {
            answers[i].fd = fd;
            answers[i].len = 0;
            return;
        }
    close(fd);
}

/* Answer the first word of the line read with " MARKER\n". */
static void read_answer(struct answer *a)
{
    ssize_t got = recv(a->fd, a->buf + a->len, MAX_LINE - a->len, 0);
    if (got < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (got > 0) {
        a->len += (size_t)got;
        if (!line_complete(a->buf, a->len))
            return;
    }
    if (got >= 0) {
        char reply[MAX_LINE + MAX_MARKER + 2];
        size_t word = first_line(a->buf, a->len);
        const char *space = memchr(a->buf, ' ', word);
        if (space != NULL)
            word = (size_t)(space - a->buf);
        int len = snprintf(reply, sizeof reply, "%.*s %s\n", (int)word, a->buf, marker);
        send(a->fd, reply, (size_t)len, MSG_NOSIGNAL);
    }
    close(a->fd);
    a->fd = -1;
}

enum watched { PROBE, LISTENER, ANSWER };

static int run_probes(struct probe *probes, int count)
{
    size_t slots = 2 * (size_t)count + MAX_ANSWERS + 1;
    struct pollfd *fds = calloc(slots, sizeof *fds);
    int *index = calloc(slots, sizeof *index);
    enum watched *what = calloc(slots, sizeof *what);
    if (fds == NULL || index == NULL || what == NULL) {
        perror("bottle-probe: calloc");
        return 1;
    }
    for (int i = 0; i < MAX_ANSWERS; i++)
        answers[i].fd = -1;
    for (int i = 0; i < count; i++)
        start_probe(&probes[i]);

    for (;;) {
        long long now = now_us(), next = LLONG_MAX;
        int watched = 0;
        for (int i = 0; i < count; i++) {
            struct probe *p = &probes[i];
            if (p->state == WAITING && now >= p->connect_at_us)
                begin_connect(p);
            if (p->state == SENDING)
                send_request(p);
            if (p->state != WAITING && p->state != DONE && now >= p->deadline_us)
                finish(p, 0); /* ran out of time */
            if (p->state == DONE)
                continue;
            long long due = p->state == WAITING ? p->connect_at_us : p->deadline_us;
            next = due < next ? due : next;
            if (p->listen_fd >= 0) {
                fds[watched] = (struct pollfd){p->listen_fd, POLLIN, 0};
                what[watched] = LISTENER;
                index[watched++] = i;
            }
            if (p->state != WAITING) {
                short events = p->state == READING ? POLLIN : POLLOUT;
                fds[watched] = (struct pollfd){p->fd, events, 0};
                what[watched] = PROBE;
                index[watched++] = i;
            }
        }
        if (next == LLONG_MAX)
            break;
        for (int i = 0; i < MAX_ANSWERS; i++)
            if (answers[i].fd >= 0) {
                fds[watched] = (struct pollfd){answers[i].fd, POLLIN, 0};
                what[watched] = ANSWER;
                index[watched++] = i;
            }
        long long left = next > now ? next - now : 0;
        int ready = poll(fds, (nfds_t)watched, (int)((left + 999) / 1000));
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("bottle-probe: poll");
            return 1;
        }
        for (int k = 0; k < watched; k++) {
            if (fds[k].revents == 0)
                continue;
            if (what[k] == ANSWER) {
                read_answer(&answers[index[k]]);
                continue;
            }
            struct probe *p = &probes[index[k]];
            if (what[k] == LISTENER) {
                if (p->listen_fd >= 0)
                    accept_answer(p->listen_fd);
                continue;
            }
            if (p->state == CONNECTING) {
                int error = 0;
                socklen_t size = sizeof error;
                getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &error, &size);
                if (error != 0) {
                    finish(p, error);
                    continue;
                }
                p->connected = p->proto == TCP || p->proto == SELF;
                p->deadline_us = p->started_us + timeout_us;
                p->state = SENDING;
            }
            if (p->state == SENDING)
                send_request(p);
            else if (p->state == READING)
                receive(p);
        }
    }

    for (int i = 0; i < MAX_ANSWERS; i++)
        if (answers[i].fd >= 0)
            close(answers[i].fd);
    free(fds);
    free(index);
    free(what);
    return 0;
}

/* ---- the echo server ------------------------------------------------- */

struct client {
    int fd;
    char peer[80];
    char buf[MAX_LINE + 1];
    size_t len;
    long long deadline_us;
};

static volatile sig_atomic_t stopping;

static void on_signal(int signo)
{
    (void)signo;
    stopping = 1;
}

static void format_peer(const struct sockaddr_storage *addr, char *out, size_t size)
{
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (addr->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof host);
        port = ntohs(sin6->sin6_port);
        if (strncmp(host, "::ffff:", 7) == 0 && strchr(host + 7, '.') != NULL) {
            snprintf(out, size, "%s:%d", host + 7, port);
            return;
        }
        snprintf(out, size, "[%s]:%d", host, port);
        return;
    }
    const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;
    inet_ntop(AF_INET, &sin->sin_addr, host, sizeof host);
    port = ntohs(sin->sin_port);
    snprintf(out, size, "%s:%d", host, port);
}

/* The first line of buf, printable, or "-" when there is none. */
static void log_line(const char *buf, size_t len, const char *peer)
{
    char nonce[MAX_LINE + 1];
    size_t n = 0;
    for (size_t i = 0; i < len && buf[i] != '\n' && buf[i] != '\r'; i++)
        nonce[n++] = (buf[i] > ' ' && buf[i] < 127) ? buf[i] : '?';
    nonce[n] = '\0';
    printf("%s %s\n", n ? nonce : "-", peer);
    fflush(stdout);
}

/* A dual-stack socket on PORT, else an IPv4 one (no IPv6 in the container). */
static int bind_any(int kind, int port)
{
    int one = 1, zero = 0;
    int fd = socket(AF_INET6, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        struct sockaddr_in6 sin6;
        memset(&sin6, 0, sizeof sin6);
        sin6.sin6_family = AF_INET6;
        sin6.sin6_port = htons((unsigned short)port);
        sin6.sin6_addr = in6addr_any;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
        if (bind(fd, (struct sockaddr *)&sin6, sizeof sin6) == 0)
            return fd;
        close(fd);
    }
    fd = socket(AF_INET, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sin;
    memset(&sin, 0, sizeof sin);
    sin.sin_family = AF_INET;
    sin.sin_port = htons((unsigned short)port);
    sin.sin_addr.s_addr = htonl(INADDR_ANY);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void close_client(struct client *c)
{
    close(c->fd);
    c->fd = -1;
}

static int serve(int port)
{
    static struct client clients[MAX_CLIENTS];
    static struct pollfd fds[MAX_CLIENTS + 2];
    static int slot_of[MAX_CLIENTS + 2];

    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    int tcp = bind_any(SOCK_STREAM, port);
    if (tcp < 0 || listen(tcp, 128) != 0) {
        fprintf(stderr, "bottle-probe: cannot listen on TCP port %d: %s\n", port,
                strerror(errno));
        return 1;
    }
    int udp = bind_any(SOCK_DGRAM, port);
    if (udp < 0) {
        fprintf(stderr, "bottle-probe: cannot bind UDP port %d: %s\n", port,
                strerror(errno));
        return 1;
    }
    for (int i = 0; i < MAX_CLIENTS; i++)
        clients[i].fd = -1;
    fprintf(stderr, "bottle-probe: serving tcp+udp on port %d\n", port);
    fflush(stderr);

    while (!stopping) {
        int n = 0;
        fds[n].fd = tcp;
        fds[n].events = POLLIN;
        slot_of[n++] = -1;
        fds[n].fd = udp;
        fds[n].events = POLLIN;
        slot_of[n++] = -2;
        long long now = now_us();
        long long next = now + 1000000LL;
        for (int i = 0; i < MAX_CLIENTS; i++) {
            if (clients[i].fd < 0)
                continue;
            if (clients[i].deadline_us <= now) {
                log_line(clients[i].buf, clients[i].len, clients[i].peer);
                close_client(&clients[i]);
                continue;
            }
            if (clients[i].deadline_us < next)
                next = clients[i].deadline_us;
            fds[n].fd = clients[i].fd;
            fds[n].events = POLLIN;
            slot_of[n++] = i;
        }
        int ready = poll(fds, (nfds_t)n, (int)((next - now + 999) / 1000));
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("bottle-probe: poll");
            return 1;
        }
        for (int k = 0; k < n; k++) {
            if (fds[k].revents == 0)
                continue;
            if (slot_of[k] == -1) {
                struct sockaddr_storage peer;
                socklen_t size = sizeof peer;
                int fd = accept4(tcp, (struct sockaddr *)&peer, &size,
                                 SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0)
                    continue;
                int free_slot = -1;
                for (int i = 0; i < MAX_CLIENTS && free_slot < 0; i++)
                    if (clients[i].fd < 0)
                        free_slot = i;
                if (free_slot < 0) {
                    close(fd);
                    continue;
                }
                struct client *c = &clients[free_slot];
                c->fd = fd;
                c->len = 0;
                c->deadline_us = now_us() + CLIENT_TIMEOUT_MS * 1000LL;
                format_peer(&peer, c->peer, sizeof c->peer);
            } else if (slot_of[k] == -2) {
                char buf[MAX_LINE + 1];
                struct sockaddr_storage peer;
                socklen_t size = sizeof peer;
                ssize_t got = recvfrom(udp, buf, MAX_LINE, 0,
                                       (struct sockaddr *)&peer, &size);
                if (got < 0)
                    continue;
                char peer_text[80];
                format_peer(&peer, peer_text, sizeof peer_text);
                log_line(buf, (size_t)got, peer_text);
                char *newline = memchr(buf, '\n', (size_t)got);
                size_t len = newline ? (size_t)(newline - buf) : (size_t)got;
                buf[len] = '\n';
                sendto(udp, buf, len + 1, 0, (struct sockaddr *)&peer, size);
            } else {
                struct client *c = &clients[slot_of[k]];
                ssize_t got = recv(c->fd, c->buf + c->len, MAX_LINE - c->len, 0);
                if (got < 0 && (errno == EAGAIN || errno == EINTR))
                    continue;
                if (got > 0)
                    c->len += (size_t)got;
                char *newline = memchr(c->buf, '\n', c->len);
                if (got <= 0 || newline != NULL || c->len >= MAX_LINE) {
                    log_line(c->buf, c->len, c->peer);
                    if (newline != NULL || c->len >= MAX_LINE) {
                        size_t len = newline ? (size_t)(newline - c->buf) : c->len;
                        c->buf[len] = '\n';
                        send(c->fd, c->buf, len + 1, MSG_NOSIGNAL);
                    }
                    close_client(c);
                }
            }
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    int first = 1;

    if (argc == 3 && strcmp(argv[1], "--serve") == 0) {
        char *end;
        long port = strtol(argv[2], &end, 10);
        if (*argv[2] == '\0' || *end != '\0' || port < 1 || port > 65535)
            usage();
        return serve((int)port);
    }
    while (argc - first >= 2) {
        if (strcmp(argv[first], "--timeout-ms") == 0) {
            char *end;
            long value = strtol(argv[first + 1], &end, 10);
            if (*argv[first + 1] == '\0' || *end != '\0' || value < 0 ||
                value > 3600000)
                usage();
            timeout_us = value * 1000LL;
        } else if (strcmp(argv[first], "--marker") == 0) {
            marker = argv[first + 1];
            if (strlen(marker) > MAX_MARKER)
                usage();
        } else {
            break;
        }
        first += 2;
    }
    int count = argc - first;
    if (count > MAX_TARGETS)
        usage();
    struct probe *probes = calloc(count > 0 ? (size_t)count : 1, sizeof *probes);
    if (probes == NULL) {
        perror("bottle-probe: calloc");
        return 1;
    }
    for (int i = 0; i < count; i++) {
        if (parse_target(argv[first + i], &probes[i]) != 0) {
            fprintf(stderr, "bottle-probe: bad target %s\n", argv[first + i]);
            usage();
        }
    }
    signal(SIGPIPE, SIG_IGN);
    if (run_probes(probes, count) != 0)
        return 1;
    for (int i = 0; i < count; i++) {
        struct probe *p = &probes[i];
        printf("%s %s %d %lld %d\n", p->id, p->outcome, p->code,
               p->ended_us - p->started_us, p->echoed);
    }
    free(probes);
    return fflush(stdout) == 0 ? 0 : 1;
}
