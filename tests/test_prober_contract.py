"""The C prober and the Python prober classify the same targets the same way.

Both probers speak one line protocol (see ``bottle/prober.py``); a bottle
runs whichever it has.  Here both probe the same real local targets and must
agree on the outcome, the errno and the echo of every one: an echo port, a
silent port and a closed port over TCP, UDP and DNS; ``self`` listeners of
two probers on one port at once, a port already taken, an address the host
does not have and, in a network namespace of its own, a listener swapped for
an impostor by NAT; and, in empty namespaces, a network that is down and one
without IPv6 (UNSUPPORTED).  Nothing leaves this machine: the one address
that is not local is only ever bound, which fails before any packet.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bottle import images, prober
from bottle.listeners import ListenerHub

PYTHON_PROBER = Path(images.__file__).resolve().parent / "prober.py"

#: TEST-NET-2: never an address of this host, so binding it fails at once.
NOT_LOCAL = "198.51.100.1"

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and `unshare` for a network namespace of its own",
)

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not images.static_libc_present(),
    reason="needs gcc and a static C library (Debian: gcc libc6-dev) to build "
    "bottle/bottle-probe.c",
)


@pytest.fixture(scope="module")
def c_prober(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.build_prober(tmp_path_factory.mktemp("prober") / "bottle-probe")


@pytest.fixture
def hub() -> Iterator[ListenerHub]:
    hub = ListenerHub()
    yield hub
    hub.shutdown()


class _UdpEcho:
    """A UDP nonce echo on a thread of its own.

    It sends back each datagram's first line; ``reply`` replaces that, e.g.
    to answer DNS queries whole or with another id.  (ListenerHub's UDP
    listeners record datagrams but, on Python 3.11, never answer them:
    asyncio's selector datagram transport is not an
    ``asyncio.DatagramTransport`` there, which its protocol asserts.)
    """

    def __init__(self, reply: Callable[[bytes], bytes] | None = None) -> None:
        self.reply = reply
        self.datagrams: list[bytes] = []
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.settimeout(0.1)
        self.port: int = self.socket.getsockname()[1]
        self.nonces: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.socket.recvfrom(512)
            except TimeoutError:
                continue
            self.datagrams.append(data)
            line = data.split(b"\n", 1)[0]
            self.nonces.append(line.decode(errors="replace"))
            answer = self.reply(data) if self.reply else line + b"\n"
            self.socket.sendto(answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.socket.close()


def _closed_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _run(argv: list[str]) -> dict[str, tuple[str, int, int]]:
    completed = subprocess.run(
        argv, capture_output=True, text=True, timeout=30, check=True
    )
    return _parse(completed.stdout)


def _parse(output: str) -> dict[str, tuple[str, int, int]]:
    results = {}
    for line in output.splitlines():
        target_id, outcome, code, latency, echoed = line.split()
        assert int(latency) >= 0
        results[target_id] = (outcome, int(code), int(echoed))
    return results


def _argv(prober_path: Path) -> list[str]:
    if prober_path == PYTHON_PROBER:
        return [sys.executable, "-I", "-S", str(PYTHON_PROBER)]
    return [str(prober_path)]


def _both(
    c_prober: Path, targets: list[str], *, prefix: list[str] | None = None
) -> tuple[dict[str, tuple[str, int, int]], dict[str, tuple[str, int, int]]]:
    # The options come in either order; each prober gets both orders.
    before = prefix or []
    from_c = _run(
        [*before, str(c_prober), "--marker", "m", "--timeout-ms", "400", *targets]
    )
    from_python = _run(
        [
            *before,
            *_argv(PYTHON_PROBER),
            "--timeout-ms",
            "400",
            "--marker",
            "m",
            *targets,
        ]
    )
    return from_c, from_python


def _qname(query: bytes) -> str:
    """The name asked for in a DNS query, dotted."""
    labels, at = [], 12
    while query[at]:
        labels.append(query[at + 1 : at + 1 + query[at]].decode())
        at += 1 + query[at]
    return ".".join(labels)


def test_both_probers_agree_on_local_targets(c_prober: Path, hub: ListenerHub) -> None:
    tcp_echo = hub.listen("127.0.0.1", 0, label="tcp echo")
    udp_echo = _UdpEcho()
    silent_tcp = socket.socket()
    silent_tcp.bind(("127.0.0.1", 0))
    silent_tcp.listen(8)
    silent_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent_udp.bind(("127.0.0.1", 0))
    resolver = _UdpEcho(reply=lambda query: query)
    stranger = _UdpEcho(reply=lambda query: b"\x00\x01" + query[2:])
    try:
        targets = [
            f"echo=tcp:127.0.0.1:{tcp_echo.port}:n1",
            f"closed=tcp:127.0.0.1:{_closed_port(socket.SOCK_STREAM)}:n2",
            f"silent=tcp:127.0.0.1:{silent_tcp.getsockname()[1]}:n3",
            f"uecho=udp:127.0.0.1:{udp_echo.port}:n4",
            f"uclosed=udp:127.0.0.1:{_closed_port(socket.SOCK_DGRAM)}:n5",
            f"usilent=udp:127.0.0.1:{silent_udp.getsockname()[1]}:n6",
            f"dns=dns:127.0.0.1:{resolver.port}:d1",
            f"dother=dns:127.0.0.1:{stranger.port}:d2",
            f"dclosed=dns:127.0.0.1:{_closed_port(socket.SOCK_DGRAM)}:d3",
            f"dsilent=dns:127.0.0.1:{silent_udp.getsockname()[1]}:d4",
        ]
        from_c, from_python = _both(c_prober, targets)
    finally:
        silent_tcp.close()
        silent_udp.close()
        udp_echo.close()
        resolver.close()
        stranger.close()

    assert from_c == from_python
    assert from_c == {
        "echo": ("CONNECTED", 0, 1),
        "closed": ("REFUSED", 111, 0),
        "silent": ("CONNECTED", 0, 0),
        "uecho": ("CONNECTED", 0, 1),
        "uclosed": ("REFUSED", 111, 0),
        "usilent": ("TIMEOUT", 0, 0),
        "dns": ("CONNECTED", 0, 1),
        # One reply decides, and a reply with another id is no answer.
        "dother": ("TIMEOUT", 0, 0),
        "dclosed": ("REFUSED", 111, 0),
        "dsilent": ("TIMEOUT", 0, 0),
    }
    assert [touch.nonce for touch in tcp_echo.touches] == ["n1", "n1"]
    assert udp_echo.nonces == ["n4", "n4"]
    assert resolver.datagrams[0] == resolver.datagrams[1] == prober.dns_query("d1")
    assert [_qname(query) for query in stranger.datagrams] == [
        "d2.bottle-probe.test"
    ] * 2


def test_both_probers_agree_on_ipv6_loopback(c_prober: Path, hub: ListenerHub) -> None:
    try:
        echo = hub.listen("::1", 0, label="tcp6 echo")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    from_c, from_python = _both(c_prober, [f"v6=tcp:[::1]:{echo.port}:n7"])
    assert from_c == from_python == {"v6": ("CONNECTED", 0, 1)}


@needs_netns
def test_both_probers_agree_when_the_network_is_down(c_prober: Path) -> None:
    # A new network namespace has only `lo`, and it is down.
    from_c, from_python = _both(
        c_prober,
        [
            "tcp=tcp:127.0.0.1:9:n8",
            "udp=udp:127.0.0.1:9:n9",
            "dns=dns:127.0.0.1:53:n10",
            "self=self:127.0.0.1:4000:n11",
        ],
        prefix=["unshare", "--net", "--"],
    )
    assert from_c == from_python
    assert from_c["tcp"] == from_c["self"] == ("UNREACHABLE", 101, 0)


@needs_netns
@pytest.mark.skipif(not socket.has_ipv6, reason="this Python has no IPv6 support")
def test_both_probers_call_a_missing_address_family_unsupported(
    c_prober: Path,
) -> None:
    # With IPv6 disabled, the namespace has no IPv6 address at all: every
    # IPv6 socket fails with EADDRNOTAVAIL.  (EAFNOSUPPORT needs a kernel
    # without IPv6 and EPROTONOSUPPORT a missing protocol; neither can be
    # made here, so the classification test below covers them.)
    setup = (
        "set -e; ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
        "net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.lo.disable_ipv6=1; "
        'exec "$@"'
    )
    from_c, from_python = _both(
        c_prober,
        [
            "tcp=tcp:[::1]:9:v1",
            "udp=udp:[::1]:9:v2",
            "dns=dns:[::1]:53:v3",
            "self=self:[::1]:4000:v4",
            "v4=tcp:127.0.0.1:9:v5",
        ],
        prefix=["unshare", "--net", "--", "sh", "-c", setup, "sh"],
    )
    assert from_c == from_python
    unsupported = ("UNSUPPORTED", errno.EADDRNOTAVAIL, 0)
    assert from_c == {
        "tcp": unsupported,
        "udp": unsupported,
        "dns": unsupported,
        "self": unsupported,
        "v4": ("REFUSED", errno.ECONNREFUSED, 0),
    }


def test_the_outcome_classes_of_the_python_prober() -> None:
    """The table both probers share, for the errnos no local target produces."""
    expected = {
        errno.EACCES: "DENIED",
        errno.EPERM: "DENIED",
        errno.ECONNREFUSED: "REFUSED",
        errno.ECONNRESET: "REFUSED",
        errno.ENETUNREACH: "UNREACHABLE",
        errno.EHOSTUNREACH: "UNREACHABLE",
        errno.ETIMEDOUT: "TIMEOUT",
        errno.EAFNOSUPPORT: "UNSUPPORTED",
        errno.EADDRNOTAVAIL: "UNSUPPORTED",
        errno.EPROTONOSUPPORT: "UNSUPPORTED",
        errno.EADDRINUSE: "ERROR",
        errno.EINVAL: "ERROR",
    }
    assert {code: prober._classify(code) for code in expected} == expected


def _run_together(runs: list[list[str]]) -> list[dict[str, tuple[str, int, int]]]:
    """Start every prober run at once; their results, in order."""
    processes = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for argv in runs
    ]
    results = []
    for process, argv in zip(processes, runs, strict=True):
        output, _ = process.communicate(timeout=30)
        if process.returncode != 0:
            raise subprocess.CalledProcessError(process.returncode, argv, output)
        results.append(_parse(output))
    return results


def test_two_probers_on_one_port_each_reach_their_own(c_prober: Path) -> None:
    """The C and the Python prober listen on one port at once, each on its own
    loopback address, then swap addresses; a port already taken fails to
    listen (ERROR), and an address the host lacks is UNSUPPORTED."""
    port = _closed_port(socket.SOCK_STREAM)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(8)
    taken_port = taken.getsockname()[1]
    try:
        for c_host, python_host in (
            ("127.0.0.2", "127.0.0.3"),
            ("127.0.0.3", "127.0.0.2"),
        ):
            runs = [
                [
                    *_argv(path),
                    *("--timeout-ms", "1500", "--marker", marker),
                    f"own=self:{host}:{port}:{marker}-nonce",
                    f"taken=self:127.0.0.1:{taken_port}:t",
                    f"elsewhere=self:{NOT_LOCAL}:{port}:e",
                ]
                for path, marker, host in (
                    (c_prober, "c", c_host),
                    (PYTHON_PROBER, "python", python_host),
                )
            ]
            from_c, from_python = _run_together(runs)
            assert (
                from_c
                == from_python
                == {
                    "own": ("CONNECTED", 0, 1),
                    "taken": ("ERROR", errno.EADDRINUSE, 0),
                    "elsewhere": ("UNSUPPORTED", errno.EADDRNOTAVAIL, 0),
                }
            )
    finally:
        taken.close()


_IMPOSTOR = """
import pathlib, socket, sys
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.4", int(sys.argv[1])))
server.listen(8)
server.settimeout(10)
pathlib.Path(sys.argv[2]).touch()
while True:
    conn, _ = server.accept()
    with conn:
        word = conn.recv(256).split(b"\\n")[0].split(b" ")[0]
        conn.sendall(word + b" impostor\\n")
"""


@needs_netns
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs `nft` for the NAT")
def test_both_probers_tell_their_own_listener_from_an_impostor(
    c_prober: Path, tmp_path: Path
) -> None:
    """What a collision looks like: the kernel hands the connection to another
    listener on the same port (libkrun's host-side forwarding did), here by a
    NAT rule from 127.0.0.3 to an impostor on 127.0.0.4."""
    port = 4100
    impostor = tmp_path / "impostor.py"
    impostor.write_text(_IMPOSTOR, encoding="utf-8")
    rules = tmp_path / "collide.nft"
    rules.write_text(
        "table ip collide {\n  chain out {\n"
        "    type nat hook output priority -100; policy accept;\n"
        f"    ip daddr 127.0.0.3 tcp dport {port} dnat to 127.0.0.4\n  }}\n}}\n",
        encoding="utf-8",
    )
    results = []
    for name in ("c", "python"):
        ready = tmp_path / f"ready-{name}"
        setup = (
            f"set -e; ip link set lo up; nft -f {rules}; "
            f"timeout 10 {sys.executable} {impostor} {port} {ready} & "
            f'until [ -e {ready} ]; do sleep 0.02; done; exec "$@"'
        )
        path = c_prober if name == "c" else PYTHON_PROBER
        argv = ["unshare", "--net", "--", "sh", "-c", setup, "sh", *_argv(path)]
        results.append(
            _run(
                [
                    *argv,
                    "--marker",
                    name,
                    f"swapped=self:127.0.0.3:{port}:n1",
                    f"own=self:127.0.0.5:{port}:n2",
                ]
            )
        )
    assert (
        results[0]
        == results[1]
        == {
            "swapped": ("CONNECTED", 0, 0),
            "own": ("CONNECTED", 0, 1),
        }
    )


def test_the_echo_server_logs_then_answers(c_prober: Path) -> None:
    port = _closed_port(socket.SOCK_STREAM)
    server = subprocess.Popen(
        [str(c_prober), "--serve", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        assert "serving" in server.stderr.readline()
        from_c, from_python = _both(
            c_prober,
            [f"t=tcp:127.0.0.1:{port}:s1", f"u=udp:127.0.0.1:{port}:s2"],
        )
        assert (
            from_c
            == from_python
            == {"t": ("CONNECTED", 0, 1), "u": ("CONNECTED", 0, 1)}
        )
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=10)
    nonces = sorted(line.split()[0] for line in output.splitlines())
    assert nonces == ["s1", "s1", "s2", "s2"]
    assert all(line.split()[1].startswith("127.0.0.1:") for line in output.splitlines())


def test_a_bad_target_is_a_usage_error(c_prober: Path) -> None:
    completed = subprocess.run(
        [str(c_prober), "not-a-target"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 2
    assert "bad target" in completed.stderr
    started = time.monotonic()
    assert _run([str(c_prober), "--timeout-ms", "100"]) == {}
    assert time.monotonic() - started < 5
