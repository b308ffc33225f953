#!/usr/bin/env python3
"""The in-bottle prober: one connection attempt per target, all at once.

This file runs *inside* a bottle, under whatever Python the bottle has, so it
uses the standard library only and imports nothing from bot-bottle.  It speaks
a line protocol that a prober in another language can speak too.

Arguments::

    prober.py --timeout-ms 1500 ID=PROTO:HOST:PORT:NONCE ...

``PROTO`` is one of

- ``tcp``: connect, send ``NONCE\\n``, wait for the same line back;
- ``udp``: send ``NONCE\\n`` as one datagram, wait for it back;
- ``dns``: send a DNS query for ``NONCE.bottle-probe.test`` and wait for any
  answer with the query's id (a resolver that forwards it leaks the nonce);
- ``self``: listen on ``HOST:PORT`` inside the bottle, then connect to it,
  send ``NONCE\\n`` and expect the answer ``NONCE MARKER`` that only this
  very prober's listener gives (``--marker``):
  two bottles listening on one port must each reach their own.

An IPv6 ``HOST`` is written in brackets.  Output, one line per target in the
order given::

    ID OUTCOME ERRNO LATENCY_US ECHOED

``OUTCOME`` is CONNECTED, DENIED, REFUSED, UNREACHABLE, TIMEOUT, UNSUPPORTED
(the bottle has no such address family or address) or ERROR; ``ECHOED`` is 1
when the far side sent the nonce back.
"""

from __future__ import annotations

import errno
import socket
import sys
import threading
import time

_DENIED = {errno.EACCES, errno.EPERM}
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}
_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH}
_UNSUPPORTED = {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT}
_SELF_LISTEN_SECONDS = 0.4


def _classify(code: int) -> str:
    if code in _DENIED:
        return "DENIED"
    if code in _REFUSED:
        return "REFUSED"
    if code in _UNREACHABLE:
        return "UNREACHABLE"
    if code == errno.ETIMEDOUT:
        return "TIMEOUT"
    if code in _UNSUPPORTED:
        return "UNSUPPORTED"
    return "ERROR"


def _parse_target(text: str) -> tuple[str, str, str, int, str]:
    target_id, _, rest = text.partition("=")
    proto, _, rest = rest.partition(":")
    if rest.startswith("["):
        host, _, rest = rest[1:].partition("]:")
    else:
        host, _, rest = rest.partition(":")
    port, _, nonce = rest.partition(":")
    return target_id, proto, host, int(port), nonce


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    received = b""
    while b"\n" not in received and len(received) < 256:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        sock.settimeout(remaining)
        chunk = sock.recv(256)
        if not chunk:
            break
        received += chunk
    return received.split(b"\n", 1)[0]


def dns_query(nonce: str) -> bytes:
    """A DNS query (id 0x6262, recursion desired) for NONCE.bottle-probe.test."""
    header = bytes.fromhex("626201000001000000000000")
    labels = b"".join(
        bytes([len(part)]) + part.encode() for part in (nonce, "bottle-probe", "test")
    )
    return header + labels + b"\x00\x00\x01\x00\x01"


def _exchange(
    sock: socket.socket, proto: str, nonce: str, expected: str, deadline: float
) -> bool:
    if proto == "dns":
        sock.sendall(dns_query(nonce))
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        return sock.recv(512)[:2] == b"\x62\x62"
    sock.sendall(nonce.encode() + b"\n")
    return _read_line(sock, deadline) == expected.encode()


def probe(
    proto: str, host: str, port: int, nonce: str, timeout: float, marker: str = ""
) -> str:
    """Probe one target; returns ``OUTCOME ERRNO LATENCY_US ECHOED``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto in ("tcp", "self") else socket.SOCK_DGRAM
    started = time.monotonic()
    deadline = started + timeout
    connected, echoed, code = False, False, 0
    outcome = "TIMEOUT"
    listener = None
    expected = nonce
    try:
        if proto == "self":
            listener = _listen_and_answer(family, host, port, marker, deadline)
            time.sleep(_SELF_LISTEN_SECONDS)
            # Only this prober's own listener adds the marker: a plain echo
            # server on the port cannot pass for it.
            expected = f"{nonce} {marker}"
        with socket.socket(family, kind) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            connected = kind == socket.SOCK_STREAM
            echoed = _exchange(sock, proto, nonce, expected, deadline)
    except TimeoutError:
        pass
    except OSError as exc:
        code = exc.errno or 0
        outcome = _classify(code)
    finally:
        if listener is not None:
            listener.close()
    if connected or echoed:
        # A completed TCP handshake is a reach even when nothing echoes; a
        # datagram proves nothing until the far side answers.
        outcome = "CONNECTED"
    latency_us = int((time.monotonic() - started) * 1_000_000)
    return f"{outcome} {code} {latency_us} {int(echoed)}"


def _listen_and_answer(
    family: int, host: str, port: int, marker: str, deadline: float
) -> socket.socket:
    """Listen on host:port and answer each line with ``LINE MARKER``."""
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(8)

    def answer() -> None:
        while time.monotonic() < deadline:
            try:
                server.settimeout(max(deadline - time.monotonic(), 0.001))
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                line = _read_line(conn, deadline).split(b" ", 1)[0]
                conn.sendall(line + b" " + marker.encode() + b"\n")

    threading.Thread(target=answer, daemon=True).start()
    return server


def main(argv: list[str]) -> int:
    timeout, marker = 1.5, "-"
    while len(argv) >= 2 and argv[0] in ("--timeout-ms", "--marker"):
        if argv[0] == "--timeout-ms":
            timeout = int(argv[1]) / 1000
        else:
            marker = argv[1]
        argv = argv[2:]
    targets = [_parse_target(text) for text in argv]
    results = [""] * len(targets)

    def run(index: int) -> None:
        _, proto, host, port, nonce = targets[index]
        results[index] = probe(proto, host, port, nonce, timeout, marker)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (target_id, *_), result in zip(targets, results, strict=True):
        sys.stdout.write(f"{target_id} {result}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
