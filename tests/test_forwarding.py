"""bottle.forwarding, measured in a scratch "host" namespace of its own.

The host here is a namespace with IPv4 forwarding off and an iptables FORWARD
policy of DROP (as dockerd leaves it), so nothing on the real host changes:
a client namespace behind a ``bbh`` veth, a server behind a ``bsh`` veth
owning 198.51.100.53, and a veth "uplink" holding the default route.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

needs_root_iptables = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("nft", "iptables")),
    reason="needs root, nftables (`nft`) and `iptables` for a scratch namespace",
)

pytestmark = needs_root_iptables

REPO = Path(__file__).resolve().parents[1]
SERVER = "198.51.100.53"


class Scratch:
    """Three namespaces: host (router), client and server."""

    def __init__(self, docker_user: bool) -> None:
        tag = uuid.uuid4().hex[:6]
        self.host, self.client, self.server = (f"bbt{n}-{tag}" for n in "hcs")
        self.docker_user = docker_user

    def make(self) -> None:
        for namespace in (self.host, self.client, self.server):
            sh(f"ip netns add {namespace}")
        h, c, s = self.host, self.client, self.server
        sh(f"ip -n {h} link add bbhtest type veth peer name c0 netns {c}")
        sh(f"ip -n {h} link add bshtest type veth peer name s0 netns {s}")
        sh(f"ip -n {h} link add up0 type veth peer name up1")
        batch(
            h,
            "link set lo up\nlink set bbhtest up\nlink set bshtest up\n"
            "link set up0 up\nlink set up1 up\naddr add 198.18.7.1/30 dev bbhtest\n"
            "addr add 198.51.100.54/32 dev bshtest\n"
            f"route add {SERVER}/32 dev bshtest src 198.51.100.54\n"
            "addr add 100.64.9.2/24 dev up0\nroute add default via 100.64.9.1\n",
        )
        batch(
            c,
            "link set lo up\naddr add 198.18.7.2/30 dev c0\nlink set c0 up\n"
            "route add 198.51.100.0/24 via 198.18.7.1\n"
            "route add 100.64.9.0/24 via 198.18.7.1\n",
        )
        batch(
            s,
            f"link set lo up\naddr add {SERVER}/32 dev s0\nlink set s0 up\n"
            "route add 198.51.100.54/32 dev s0\n"
            "route add default via 198.51.100.54\n",
        )
        in_ns(h, "sysctl -qw net.ipv4.conf.all.forwarding=0")
        in_ns(h, "sysctl -qw net.ipv4.conf.default.forwarding=0")
        in_ns(h, "sysctl -qw net.ipv4.conf.bbhtest.forwarding=0")
        in_ns(h, "sysctl -qw net.ipv4.conf.bshtest.forwarding=0")
        in_ns(h, "iptables -w -P FORWARD DROP")
        if self.docker_user:
            in_ns(h, "iptables -w -N DOCKER-USER")
            in_ns(h, "iptables -w -A DOCKER-USER -j RETURN")
            in_ns(h, "iptables -w -I FORWARD -j DOCKER-USER")

    def remove(self) -> None:
        for namespace in (self.host, self.client, self.server):
            subprocess.run(["ip", "netns", "delete", namespace], check=False)

    def forwarding(self, code: str) -> str:
        """Run ``code`` with ``bottle.forwarding`` as ``f`` in the host namespace."""
        script = f"import json\nfrom bottle import forwarding as f\n{code}"
        completed = subprocess.run(
            ["ip", "netns", "exec", self.host, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        return completed.stdout.strip() + completed.stderr.strip()

    def connects(self, address: str = SERVER) -> bool:
        code = (
            "import socket\ns = socket.socket(); s.settimeout(1)\n"
            f"print(s.connect_ex(({address!r}, 9)) == 0)"
        )
        completed = subprocess.run(
            ["ip", "netns", "exec", self.client, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=False,
        )
        return completed.stdout.strip() == "True"

    def rules(self) -> str:
        return in_ns(self.host, "iptables -w -S")


def sh(command: str) -> str:
    return subprocess.run(
        command.split(), capture_output=True, text=True, check=True
    ).stdout


def in_ns(namespace: str, command: str) -> str:
    return sh(f"ip netns exec {namespace} {command}")


def batch(namespace: str, text: str) -> None:
    subprocess.run(
        ["ip", "-n", namespace, "-batch", "-"], input=text, text=True, check=True
    )


@pytest.fixture(params=[False, True], ids=["forward-drop", "docker-user"])
def scratch(request: pytest.FixtureRequest) -> Iterator[Scratch]:
    made = Scratch(docker_user=request.param)
    try:
        made.make()
        server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                made.server,
                sys.executable,
                "-c",
                "import socket\ns = socket.socket()\n"
                f"s.bind(({SERVER!r}, 9)); s.listen(64)\n"
                "while True: s.accept()[0].close()",
            ]
        )
        try:
            yield made
        finally:
            server.kill()
            server.wait()
    finally:
        made.remove()


def test_a_path_opens_exactly_what_it_names_and_closes(scratch: Scratch) -> None:
    assert not scratch.connects()

    out = scratch.forwarding(
        f"p = f.open_path('bbfake-t1', 'bbhtest', ['{SERVER}/32'])\n"
        "print(json.dumps([p.chain, p.routes, sorted(f.leftovers())]))"
    )
    chain, routes, labels = json.loads(out)
    assert chain == ("DOCKER-USER" if scratch.docker_user else "FORWARD")
    assert routes == [[f"{SERVER}/32", "bshtest"]]
    assert labels == ["bbfake-t1"]
    assert scratch.connects()
    ours = [line for line in scratch.rules().splitlines() if "bot-bottle-fwd" in line]
    assert len(ours) == 2
    assert all(f"-A {chain} " in line for line in ours)
    # Per-device forwarding only: the host as a whole still forwards nothing.
    assert in_ns(scratch.host, "sysctl -n net.ipv4.conf.all.forwarding") == "0\n"
    assert in_ns(scratch.host, "sysctl -n net.ipv4.conf.up0.forwarding") == "0\n"
    table = in_ns(scratch.host, "nft list table inet bbfwd_bbfake_t1")
    assert '"up0" drop' in table.replace("}", "").replace("{ ", "")

    assert scratch.forwarding("f.close('bbfake-t1'); print(sorted(f.leftovers()))") == (
        "[]"
    )
    assert "bot-bottle-fwd" not in scratch.rules()
    assert not scratch.connects()


@pytest.mark.parametrize(
    "destination",
    [
        "203.0.113.9/32",
        "100.64.9.0/24",
        "198.51.100.0/24",
        "198.18.7.2/32",
        "127.0.0.1",
    ],
)
def test_a_destination_not_behind_our_own_veth_is_refused(
    scratch: Scratch, destination: str
) -> None:
    """The uplink, a wider network than the stand-in's route, the bottle itself."""
    out = scratch.forwarding(
        "try:\n"
        f"    f.open_path('bbfake-t2', 'bbhtest', [{destination!r}])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "print(sorted(f.leftovers()))"
    )
    assert out.startswith("BottleUsageError forwarding destination"), out
    assert out.endswith("[]")
    assert "bot-bottle-fwd" not in scratch.rules()


def test_a_wide_allowlist_is_narrowed_to_the_routes_behind_our_veths(
    scratch: Scratch,
) -> None:
    """A bottle allowed 198.51.100.0/24 is forwarded to the stand-in's /32 only."""
    out = scratch.forwarding(
        "print(json.dumps([\n"
        "    f.own_destinations_within(['198.51.100.0/24', '127.0.0.16/32']),\n"
        f"    f.own_destinations_within(['{SERVER}/32']),\n"
        "    f.own_destinations_within(['100.64.9.0/24', '203.0.113.9/32', '::/0']),\n"
        "]))"
    )
    wide, exact, uplink = json.loads(out)
    assert wide == [f"{SERVER}/32"]
    assert exact == [f"{SERVER}/32"]
    assert uplink == []

    scratch.forwarding(f"f.open_path('bbfake-t3', 'bbhtest', {wide!r})")
    try:
        assert scratch.connects()
    finally:
        scratch.forwarding("f.close('bbfake-t3')")
