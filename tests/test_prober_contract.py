"""The C prober and the Python prober classify the same targets the same way.

Both probers speak one line protocol (see ``bottle/prober.py``); a bottle
runs whichever it has.  Here both probe the same real local targets, an echo
port, a silent port, a closed port, over TCP and UDP, and, in an empty
network namespace, a network that is down, and must agree on the outcome,
the errno and the echo of every one.  Nothing leaves this machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bottle import images
from bottle.listeners import ListenerHub

PYTHON_PROBER = Path(images.__file__).resolve().parent / "prober.py"

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None or not images.static_libc_present(),
    reason="needs gcc and a static C library (Debian: gcc libc6-dev) to build "
    "prober/bottle-probe.c",
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

    (ListenerHub's UDP listeners record datagrams but, on Python 3.11, never
    answer them: asyncio's selector datagram transport is not an
    ``asyncio.DatagramTransport`` there, which its protocol asserts.)
    """

    def __init__(self) -> None:
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
            line = data.split(b"\n", 1)[0]
            self.nonces.append(line.decode())
            self.socket.sendto(line + b"\n", peer)

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
    results = {}
    for line in completed.stdout.splitlines():
        target_id, outcome, code, latency, echoed = line.split()
        assert int(latency) >= 0
        results[target_id] = (outcome, int(code), int(echoed))
    return results


def _both(
    c_prober: Path, targets: list[str], *, prefix: list[str] | None = None
) -> tuple[dict[str, tuple[str, int, int]], dict[str, tuple[str, int, int]]]:
    arguments = ["--timeout-ms", "400", *targets]
    before = prefix or []
    from_c = _run([*before, str(c_prober), *arguments])
    from_python = _run(
        [*before, sys.executable, "-I", "-S", str(PYTHON_PROBER), *arguments]
    )
    return from_c, from_python


def test_both_probers_agree_on_local_targets(c_prober: Path, hub: ListenerHub) -> None:
    tcp_echo = hub.listen("127.0.0.1", 0, label="tcp echo")
    udp_echo = _UdpEcho()
    silent_tcp = socket.socket()
    silent_tcp.bind(("127.0.0.1", 0))
    silent_tcp.listen(8)
    silent_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent_udp.bind(("127.0.0.1", 0))
    try:
        targets = [
            f"echo=tcp:127.0.0.1:{tcp_echo.port}:n1",
            f"closed=tcp:127.0.0.1:{_closed_port(socket.SOCK_STREAM)}:n2",
            f"silent=tcp:127.0.0.1:{silent_tcp.getsockname()[1]}:n3",
            f"uecho=udp:127.0.0.1:{udp_echo.port}:n4",
            f"uclosed=udp:127.0.0.1:{_closed_port(socket.SOCK_DGRAM)}:n5",
            f"usilent=udp:127.0.0.1:{silent_udp.getsockname()[1]}:n6",
        ]
        from_c, from_python = _both(c_prober, targets)
    finally:
        silent_tcp.close()
        silent_udp.close()
        udp_echo.close()

    assert from_c == from_python
    assert from_c == {
        "echo": ("CONNECTED", 0, 1),
        "closed": ("REFUSED", 111, 0),
        "silent": ("CONNECTED", 0, 0),
        "uecho": ("CONNECTED", 0, 1),
        "uclosed": ("REFUSED", 111, 0),
        "usilent": ("TIMEOUT", 0, 0),
    }
    assert [touch.nonce for touch in tcp_echo.touches] == ["n1", "n1"]
    assert udp_echo.nonces == ["n4", "n4"]


def test_both_probers_agree_on_ipv6_loopback(c_prober: Path, hub: ListenerHub) -> None:
    try:
        echo = hub.listen("::1", 0, label="tcp6 echo")
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    from_c, from_python = _both(c_prober, [f"v6=tcp:[::1]:{echo.port}:n7"])
    assert from_c == from_python == {"v6": ("CONNECTED", 0, 1)}


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and `unshare` for an empty network namespace",
)
def test_both_probers_agree_when_the_network_is_down(c_prober: Path) -> None:
    # A new network namespace has only `lo`, and it is down.
    from_c, from_python = _both(
        c_prober,
        ["tcp=tcp:127.0.0.1:9:n8", "udp=udp:127.0.0.1:9:n9"],
        prefix=["unshare", "--net", "--"],
    )
    assert from_c == from_python
    assert from_c["tcp"] == ("UNREACHABLE", 101, 0)


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
