#!/usr/bin/env python3
"""The in-bottle prober: one connection attempt per target, all at once.

This file runs *inside* a bottle, under whatever Python the bottle has, so it
uses the standard library only and imports nothing from bot-bottle.  It speaks
a line protocol that a prober in another language can speak too.

Arguments::

    prober.py --timeout-ms 1500 ID=PROTO:HOST:PORT:NONCE ...

``PROTO`` is ``tcp`` or ``udp``; an IPv6 ``HOST`` is written in brackets.
Output, one line per target in the order given::

    ID OUTCOME ERRNO LATENCY_US ECHOED

``OUTCOME`` is CONNECTED, DENIED, REFUSED, UNREACHABLE, TIMEOUT or ERROR;
``ECHOED`` is 1 when the far side sent the nonce back.  Once connected the
prober sends ``NONCE\\n`` and waits for the same line back.
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


def _classify(code: int) -> str:
    if code in _DENIED:
        return "DENIED"
    if code in _REFUSED:
        return "REFUSED"
    if code in _UNREACHABLE:
        return "UNREACHABLE"
    if code == errno.ETIMEDOUT:
        return "TIMEOUT"
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


def probe(proto: str, host: str, port: int, nonce: str, timeout: float) -> str:
    """Probe one target; returns ``OUTCOME ERRNO LATENCY_US ECHOED``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    started = time.monotonic()
    deadline = started + timeout
    connected, echoed, code = False, False, 0
    outcome = "TIMEOUT"
    try:
        with socket.socket(family, kind) as sock:
            sock.settimeout(timeout)
            sock.connect((host, port))
            connected = proto == "tcp"
            sock.sendall(nonce.encode() + b"\n")
            echoed = _read_line(sock, deadline) == nonce.encode()
    except TimeoutError:
        pass
    except OSError as exc:
        code = exc.errno or 0
        outcome = _classify(code)
    if connected or echoed:
        # A completed TCP handshake is a reach even when nothing echoes; a UDP
        # send proves nothing until the far side answers.
        outcome = "CONNECTED"
    latency_us = int((time.monotonic() - started) * 1_000_000)
    return f"{outcome} {code} {latency_us} {int(echoed)}"


def main(argv: list[str]) -> int:
    timeout = 1.5
    if len(argv) >= 2 and argv[0] == "--timeout-ms":
        timeout = int(argv[1]) / 1000
        argv = argv[2:]
    targets = [_parse_target(text) for text in argv]
    results = [""] * len(targets)

    def run(index: int) -> None:
        _, proto, host, port, nonce = targets[index]
        results[index] = probe(proto, host, port, nonce, timeout)

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
