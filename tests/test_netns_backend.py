"""The netns backend for real: namespaces, veths and host-side nftables."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bottle import AliasPool, AliasRange, BottleSpec, Launcher, PoolExhausted
from bottle.backends import BackendConfig
from bottle.backends.netns import NetnsBackend, agent_uid, netns_name, table_name
from bottle.errors import BottleStartError, BottleUsageError
from bottle.probe import BLOCKED_OUTCOMES, Outcome, Target, TargetKind, run_probes
from bottle.spec import AgentSpec, BundleService
from bottle.standin import start_standin, stop_standin
from tests.conftest import needs_root_netns

pytestmark = needs_root_netns

POOL = "127.0.0.64-127.0.0.79"


@pytest.fixture
def backend(private_state_dir: Path) -> NetnsBackend:
    return NetnsBackend(BackendConfig(private_state_dir))


@pytest.fixture
def launcher(backend: NetnsBackend, private_state_dir: Path) -> Iterator[Launcher]:
    pool = AliasPool(AliasRange.parse(POOL), private_state_dir)
    launcher = Launcher(backend, pool)
    try:
        yield launcher
    finally:
        launcher.stop_all()


def names_on_host() -> str:
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    return namespaces + tables


def probe_one(
    launcher: Launcher, bottle_name: str, host: str, port: int, proto: str = "tcp"
) -> Outcome:
    bottle = next(b for b in launcher.bottles.values() if b.name == bottle_name)
    target = Target("t", TargetKind.SENTINEL, host, port, proto=proto)
    (result,) = run_probes(launcher.backend, bottle, [target], timeout=1.0)
    return result.outcome


def test_stop_removes_namespace_table_and_lease(launcher: Launcher) -> None:
    bottle = launcher.start(BottleSpec("one"))
    assert netns_name(bottle.bottle_id) in names_on_host()
    assert table_name(bottle.bottle_id) in names_on_host()

    launcher.stop(bottle)

    assert netns_name(bottle.bottle_id) not in names_on_host()
    assert table_name(bottle.bottle_id) not in names_on_host()
    assert launcher.pool.leases() == []


def test_blocked_loopback_is_rejected_at_once_not_dropped(launcher: Launcher) -> None:
    hub = launcher.hub
    sentinel = hub.listen("127.0.0.1", 0, label="sentinel")
    launcher.start(BottleSpec("one"))

    udp_sentinel = hub.listen("127.0.0.1", 0, proto="udp", label="sentinel")
    launcher.start(BottleSpec("two"))

    # A listener is there, so a reset can only come from the host's rules.
    assert probe_one(launcher, "one", "127.0.0.1", sentinel.port) is Outcome.REFUSED
    assert (
        probe_one(launcher, "two", "127.0.0.1", udp_sentinel.port, "udp")
        is Outcome.UNREACHABLE
    )
    assert sentinel.touches == []
    assert udp_sentinel.touches == []


def test_allowlist_is_a_parameter_reproducing_the_v1_widening(
    launcher: Launcher,
) -> None:
    sentinel = launcher.hub.listen("127.0.0.1", 0, label="sentinel")
    launcher.start(BottleSpec("wide", allowlist=("alias", "127.0.0.1/32")))

    assert probe_one(launcher, "wide", "127.0.0.1", sentinel.port) is Outcome.CONNECTED
    assert len(sentinel.touches) == 1


def test_effective_allowlist_is_read_back_from_nftables(launcher: Launcher) -> None:
    bottle = launcher.start(BottleSpec("one", allowlist=("alias", "10.9.8.0/24")))

    assert launcher.backend.effective_allowlist(bottle) == [
        "10.9.8.0/24",
        f"{bottle.alias}/32",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["ip", "route", "add", "127.0.0.1/32", "dev", "bb0"],
        ["ip", "route", "add", "default", "dev", "bb0"],
        ["nft", "flush", "ruleset"],
        ["ip", "link", "set", "bb0", "down"],
    ],
)
def test_agent_cannot_change_its_network(launcher: Launcher, argv: list[str]) -> None:
    bottle = launcher.start(BottleSpec("one"))

    result = launcher.backend.exec(bottle, argv)

    assert result.returncode != 0
    assert "not permitted" in result.stderr.lower() or "denied" in result.stderr.lower()


def test_agent_runs_unprivileged(launcher: Launcher) -> None:
    bottle = launcher.start(BottleSpec("one"))

    result = launcher.backend.exec(
        bottle, ["sh", "-c", "id -u; grep CapEff /proc/self/status"]
    )

    uid, caps = result.stdout.split("\n", 1)
    assert uid == str(agent_uid(bottle.alias))
    assert caps.split()[-1] == "0000000000000000"


def test_one_agent_cannot_inspect_or_trace_another(launcher: Launcher) -> None:
    """Agents share the host's process table; under one uid, one could trace
    another (ptrace, pidfd_getfd) and use its connections to its bundle."""
    first, second = launcher.start_many([BottleSpec("one"), BottleSpec("two")])
    marker = f"bottle-victim-{first.bottle_id}"
    job = launcher.backend.exec(
        first, ["bash", "-c", f"(exec -a {marker} sleep 300) >/dev/null 2>&1 &"]
    )
    assert job.returncode == 0, job.stderr
    victim = subprocess.run(
        ["pgrep", "-f", marker], capture_output=True, text=True, check=True
    ).stdout.split()[0]

    peek = launcher.backend.exec(second, ["ls", f"/proc/{victim}/fd"])
    own = launcher.backend.exec(first, ["ls", f"/proc/{victim}/fd"])

    assert peek.returncode != 0
    assert "Permission denied" in peek.stderr
    assert own.returncode == 0, own.stderr


def test_rules_are_on_the_host_side_even_if_the_namespace_routes_everything(
    launcher: Launcher, private_state_dir: Path
) -> None:
    """An agent that got CAP_NET_ADMIN could route anything out of its
    namespace; the host side must still stop it."""
    standin = start_standin(
        [("198.51.100.53", 53)], launcher.hub, launcher.pool, launcher.run
    )
    try:
        bottle = launcher.start(BottleSpec("one"))
        gateway = launcher.backend.host_side_addresses(bottle)["veth-gateway"]
        subprocess.run(
            [
                "ip",
                "-n",
                bottle.handle["netns"],
                "route",
                "add",
                "default",
                "via",
                gateway,
            ],
            check=True,
        )

        outcome = probe_one(launcher, "one", "198.51.100.53", 53)

        assert outcome in BLOCKED_OUTCOMES
        assert standin.listeners[0].touches == []
    finally:
        stop_standin(standin, launcher.hub)


def test_failed_start_leaves_nothing(launcher: Launcher) -> None:
    bad_user = BottleSpec("baduser", agent=AgentSpec(user="no-such-user"))
    with pytest.raises(BottleUsageError, match="no-such-user"):
        launcher.start(bad_user)

    crashing = BottleSpec("crash", bundle=(BundleService("svc", 0, ("false",)),))
    with pytest.raises(BottleStartError, match="bundle command exited"):
        launcher.start(crashing)

    assert f"bb-{launcher.run}-" not in names_on_host()
    assert f"bottle_{launcher.run}_" not in names_on_host()
    assert launcher.pool.leases() == []


def test_sixteen_bottles_hold_sixteen_aliases_and_the_seventeenth_is_refused(
    launcher: Launcher,
) -> None:
    bottles = launcher.start_many([BottleSpec(f"b{i}") for i in range(16)])

    aliases = {bottle.alias for bottle in bottles}
    assert len(aliases) == 16
    assert aliases == {str(a) for a in AliasRange.parse(POOL).addresses()}
    with pytest.raises(PoolExhausted) as refused:
        launcher.start(BottleSpec("b16"))
    assert len(refused.value.holders) == 16
    for bottle in bottles:
        assert bottle.bottle_id in str(refused.value)


def test_standin_owns_its_address_and_logs_what_reaches_it(
    launcher: Launcher,
) -> None:
    """The egress stand-in answers from its namespace, reached by a /32 route."""
    standin = start_standin(
        [("198.51.100.53", 53)], launcher.hub, launcher.pool, launcher.run
    )
    try:
        with socket.create_connection(("198.51.100.53", 53), timeout=2) as sock:
            sock.sendall(b"nonce-from-host\n")
            assert sock.makefile().readline() == "nonce-from-host\n"
        assert standin.witness.saw_nonce("nonce-from-host")
        assert not standin.witness.saw_nonce("another")
    finally:
        stop_standin(standin, launcher.hub)
    assert f"bs-{launcher.run}" not in names_on_host()
