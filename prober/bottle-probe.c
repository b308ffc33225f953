/*
 * bottle-probe: the in-bottle prober of bot-bottle, as a small static binary.
 *
 * It speaks exactly the line protocol of bottle/prober.py, so a bottle whose
 * image has no Python can still be probed:
 *
 *     bottle-probe [--timeout-ms N] ID=PROTO:HOST:PORT:NONCE ...
 *
 * PROTO is tcp or udp; an IPv6 HOST is written in brackets; HOST must be a
 * numeric address (the image has no resolver).  Every target is probed at
 * once, with non-blocking sockets and one poll() loop.  Output, one line per
 * target in the order given:
 *
 *     ID OUTCOME ERRNO LATENCY_US ECHOED
 *
 * OUTCOME is CONNECTED, DENIED, REFUSED, UNREACHABLE, TIMEOUT or ERROR;
 * ECHOED is 1 when the far side sent the nonce back.  Once connected the
 * prober sends "NONCE\n" and waits for the same line back.  A completed TCP
 * handshake counts as CONNECTED even when nothing echoes; a UDP probe is
 * CONNECTED only when the nonce comes back.
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
#define MAX_TARGETS 4096
#define MAX_CLIENTS 512
#define CLIENT_TIMEOUT_MS 10000

enum state { CONNECTING, SENDING, READING, DONE };

struct probe {
    const char *id;
    int udp;
    char host[64];
    int port;
    const char *nonce;
    int fd;
    enum state state;
    int connected;
    int echoed;
    int code;
    const char *outcome;
    char sendbuf[MAX_LINE + 2];
    size_t sendlen, sent;
    char recvbuf[MAX_LINE + 1];
    size_t recvlen;
    long long started_us, ended_us;
};

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
    default:
        return "ERROR";
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bottle-probe [--timeout-ms N] ID=PROTO:HOST:PORT:NONCE ...\n"
            "       bottle-probe --serve PORT\n");
    exit(2);
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
    if (strcmp(rest, "tcp") == 0)
        p->udp = 0;
    else if (strcmp(rest, "udp") == 0)
        p->udp = 1;
    else
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
    if (strlen(p->nonce) > MAX_LINE)
        return -1;
    return 0;
}

static void finish(struct probe *p, int code)
{
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    p->state = DONE;
    p->ended_us = now_us();
    p->code = code;
    if (p->connected || p->echoed)
        p->outcome = "CONNECTED";
    else if (code != 0)
        p->outcome = classify(code);
    else
        p->outcome = "TIMEOUT";
}

/* Whether the received bytes hold a whole first line (or all there will be). */
static int line_complete(struct probe *p)
{
    return memchr(p->recvbuf, '\n', p->recvlen) != NULL || p->recvlen >= MAX_LINE;
}

static void check_echo(struct probe *p)
{
    char *newline = memchr(p->recvbuf, '\n', p->recvlen);
    size_t len = newline ? (size_t)(newline - p->recvbuf) : p->recvlen;
    p->echoed = len == strlen(p->nonce) && memcmp(p->recvbuf, p->nonce, len) == 0;
}

static void start_probe(struct probe *p)
{
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int family;

    memset(&addr, 0, sizeof addr);
    p->fd = -1;
    p->started_us = now_us();
    if (strchr(p->host, ':') != NULL) {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&addr;
        family = AF_INET6;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((unsigned short)p->port);
        if (inet_pton(AF_INET6, p->host, &sin6->sin6_addr) != 1) {
            finish(p, EINVAL);
            return;
        }
        addrlen = sizeof *sin6;
    } else {
        struct sockaddr_in *sin = (struct sockaddr_in *)&addr;
        family = AF_INET;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((unsigned short)p->port);
        if (inet_pton(AF_INET, p->host, &sin->sin_addr) != 1) {
            finish(p, EINVAL);
            return;
        }
        addrlen = sizeof *sin;
    }

    int kind = p->udp ? SOCK_DGRAM : SOCK_STREAM;
    p->fd = socket(family, kind | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (p->fd < 0) {
        finish(p, errno);
        return;
    }
    int len = snprintf(p->sendbuf, sizeof p->sendbuf, "%s\n", p->nonce);
    p->sendlen = (size_t)len;
    p->sent = 0;
    if (connect(p->fd, (struct sockaddr *)&addr, addrlen) == 0) {
        p->connected = !p->udp;
        p->state = SENDING;
    } else if (errno == EINPROGRESS) {
        p->state = CONNECTING;
    } else {
        finish(p, errno);
    }
}

static void send_nonce(struct probe *p)
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
            check_echo(p);
            finish(p, errno);
            return;
        }
        if (n == 0) {
            check_echo(p);
            finish(p, 0);
            return;
        }
        p->recvlen += (size_t)n;
        if (line_complete(p)) {
            check_echo(p);
            finish(p, 0);
            return;
        }
    }
}

static int run_probes(struct probe *probes, int count, int timeout_ms)
{
    size_t slots = count > 0 ? (size_t)count : 1;
    struct pollfd *fds = calloc(slots, sizeof *fds);
    int *index = calloc(slots, sizeof *index);
    if (fds == NULL || index == NULL) {
        perror("bottle-probe: calloc");
        return 1;
    }
    long long deadline = now_us() + (long long)timeout_ms * 1000LL;

    for (int i = 0; i < count; i++)
        start_probe(&probes[i]);
    for (int i = 0; i < count; i++)
        if (probes[i].state == SENDING)
            send_nonce(&probes[i]);

    for (;;) {
        int watched = 0;
        for (int i = 0; i < count; i++) {
            struct probe *p = &probes[i];
            if (p->state == DONE)
                continue;
            fds[watched].fd = p->fd;
            fds[watched].events = p->state == READING ? POLLIN : POLLOUT;
            fds[watched].revents = 0;
            index[watched++] = i;
        }
        if (watched == 0)
            break;
        long long left = deadline - now_us();
        if (left <= 0)
            break;
        int ready = poll(fds, (nfds_t)watched, (int)((left + 999) / 1000));
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("bottle-probe: poll");
            return 1;
        }
        for (int k = 0; k < watched; k++) {
            struct probe *p = &probes[index[k]];
            if (fds[k].revents == 0)
                continue;
            if (p->state == CONNECTING) {
                int error = 0;
                socklen_t size = sizeof error;
                getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &error, &size);
                if (error != 0) {
                    finish(p, error);
                    continue;
                }
                p->connected = !p->udp;
                p->state = SENDING;
            }
            if (p->state == SENDING)
                send_nonce(p);
            else if (p->state == READING)
                receive(p);
        }
    }

    /* Whatever is still open ran out of time. */
    for (int i = 0; i < count; i++)
        if (probes[i].state != DONE) {
            check_echo(&probes[i]);
            finish(&probes[i], 0);
        }
    free(fds);
    free(index);
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
    int timeout_ms = 1500;
    int first = 1;

    if (argc == 3 && strcmp(argv[1], "--serve") == 0) {
        char *end;
        long port = strtol(argv[2], &end, 10);
        if (*argv[2] == '\0' || *end != '\0' || port < 1 || port > 65535)
            usage();
        return serve((int)port);
    }
    if (argc >= 3 && strcmp(argv[1], "--timeout-ms") == 0) {
        char *end;
        long value = strtol(argv[2], &end, 10);
        if (*argv[2] == '\0' || *end != '\0' || value < 0 || value > 3600000)
            usage();
        timeout_ms = (int)value;
        first = 3;
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
    if (run_probes(probes, count, timeout_ms) != 0)
        return 1;
    for (int i = 0; i < count; i++) {
        struct probe *p = &probes[i];
        printf("%s %s %d %lld %d\n", p->id, p->outcome, p->code,
               p->ended_us - p->started_us, p->echoed);
    }
    free(probes);
    return fflush(stdout) == 0 ? 0 : 1;
}
