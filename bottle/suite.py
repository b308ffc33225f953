"""One conformance run: sentinels, outside targets, probes, and the matrix.

Used by the pytest plugin's conformance suite, by ``bottle check`` and by the
benchmarks, so the same run is available with and without pytest.  Which
columns a matrix has, and why, is listed in :mod:`bottle.catalogue`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import logging
import random
import socket
from collections.abc import Iterable, Mapping, Sequence

import psutil

from bottle.backends import Backend, Bottle
from bottle.backends.base import NonceWitness
from bottle.errors import BottleUsageError
from bottle.listeners import Listener, ListenerHub
from bottle.matrix import Matrix, bundle_key, judge
from bottle.probe import (
    DEFAULT_PROBE_TIMEOUT_SECONDS,
    Target,
    TargetKind,
    run_probes,
)

log = logging.getLogger(__name__)

DEFAULT_EGRESS_TARGET = "8.8.8.8:53"
DEFAULT_METADATA_TARGET = "169.254.169.254:80"
DEFAULT_PUBLIC_TARGET = "1.1.1.1:443"

#: Where the outside targets point when a stand-in owns them: test
#: addresses (TEST-NET-2) that no network routes.
STANDIN_DEFAULTS = {
    "egress": "198.51.100.53:53",
    "dns": "198.51.100.53:53",
    "metadata": "198.51.100.254:80",
    "public": "198.51.100.77:443",
}

LOOPBACK_SENTINEL_KEY = "sentinel:127.0.0.1"
#: The sentinel bound on every host address, dialled where the bottle's own
#: bundle listens: an IP-only allowlist lets it through to such a service.
HOST_VIA_OWN_ALIAS_KEY = "host-via-own-alias"

#: Interfaces the project creates itself; their host ends are covered by each
#: backend's own host-side addresses instead.
_OWN_INTERFACE_PREFIXES = ("bbh", "bsh", "bdi", "bdp", "br-", "veth", "bench")


def parse_host_port(text: str, what: str = "egress target") -> tuple[str, int]:
    """Read ``HOST:PORT`` or ``[V6]:PORT``; one clear error otherwise."""
    valid = "use HOST:PORT with an IP address, e.g. 8.8.8.8:53 or [2001:db8::1]:53"
    host, sep, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise BottleUsageError(f"{what} {text!r}", f"not HOST:PORT; {valid}") from None
    if not sep or not 1 <= port <= 65535:
        raise BottleUsageError(f"{what} {text!r}", f"bad port; {valid}")
    return host, port


def resolver_of_this_host() -> str:
    """The first nameserver of ``/etc/resolv.conf`` as ``HOST:53``."""
    try:
        with open("/etc/resolv.conf", encoding="utf-8") as stream:
            for line in stream:
                fields = line.split()
                if fields[:1] == ["nameserver"] and len(fields) > 1:
                    host = fields[1]
                    return f"[{host}]:53" if ":" in host else f"{host}:53"
    except OSError:
        pass
    return DEFAULT_EGRESS_TARGET


def host_addresses() -> dict[str, str]:
    """This host's own non-loopback addresses, by ``host:IF`` / ``host6:IF``."""
    found: dict[str, str] = {}
    for interface, addresses in sorted(psutil.net_if_addrs().items()):
        if interface.startswith(_OWN_INTERFACE_PREFIXES) or interface == "lo":
            continue
        for address in addresses:
            if address.family == socket.AF_INET:
                found.setdefault(f"host:{interface}", address.address)
            elif (
                address.family == socket.AF_INET6
                and "%" not in address.address
                and not ipaddress.IPv6Address(address.address).is_link_local
            ):
                found.setdefault(f"host6:{interface}", address.address)
    return found


@dataclasses.dataclass(frozen=True)
class OutsideTarget:
    """An address outside the host that no bottle may reach."""

    key: str
    host: str
    port: int
    proto: str = "tcp"


def outside_targets(
    egress: tuple[str, int],
    dns: tuple[str, int],
    metadata: tuple[str, int],
    public: tuple[str, int],
) -> list[OutsideTarget]:
    """The outside columns: egress over TCP and UDP, DNS, metadata, public."""
    return [
        OutsideTarget("egress", *egress),
        OutsideTarget("egress/udp", *egress, proto="udp"),
        OutsideTarget("dns", *dns, proto="dns"),
        OutsideTarget("metadata", *metadata),
        OutsideTarget("public", *public),
    ]


@dataclasses.dataclass
class Sentinels:
    """The host listeners every bottle must never reach.

    ``loopback`` listens on ``127.0.0.1`` (TCP) and ``loopback_udp`` on the
    same address over UDP; ``loopback6`` on ``[::1]``.  ``everywhere`` and
    ``everywhere6`` listen on every host interface, and are probed at every
    address the host owns, at the bottle's gateways and at the pool's other
    aliases.
    """

    loopback: Listener
    loopback_udp: Listener
    loopback6: Listener | None
    everywhere: Listener
    everywhere6: Listener | None

    @classmethod
    def start(cls, hub: ListenerHub) -> Sentinels:
        loopback = hub.listen("127.0.0.1", 0, label="sentinel 127.0.0.1")
        loopback_udp = hub.listen(
            "127.0.0.1", 0, proto="udp", label="sentinel 127.0.0.1/udp"
        )
        everywhere = hub.listen("0.0.0.0", 0, label="sentinel 0.0.0.0")
        loopback6 = everywhere6 = None
        if socket.has_ipv6:
            try:
                loopback6 = hub.listen("::1", 0, label="sentinel [::1]")
                everywhere6 = hub.listen("::", 0, label="sentinel [::]")
            except OSError as exc:
                log.warning("this host has no IPv6 loopback: %s", exc)
        return cls(loopback, loopback_udp, loopback6, everywhere, everywhere6)

    def all(self) -> list[Listener]:
        return [
            listener
            for listener in (
                self.loopback,
                self.loopback_udp,
                self.loopback6,
                self.everywhere,
                self.everywhere6,
            )
            if listener is not None
        ]

    def close(self, hub: ListenerHub) -> None:
        for listener in self.all():
            hub.close(listener)


@dataclasses.dataclass
class Plan:
    """What one run probes, beyond the bottles themselves."""

    sentinels: Sentinels
    outside: list[OutsideTarget]
    outside_witness: NonceWitness | None = None
    #: Every alias of the pool; each bottle probes all but its own.
    pool_aliases: list[str] = dataclasses.field(default_factory=list)
    #: The port both agents listen on for the loopback collision probe.
    collision_port: int = dataclasses.field(
        default_factory=lambda: random.randint(40000, 59999)
    )


def targets_for(
    source: Bottle, bottles: Sequence[Bottle], backend: Backend, plan: Plan
) -> list[Target]:
    """Every target ``source`` probes, in the matrix's column order."""
    sentinels = plan.sentinels
    targets = []
    for bottle in bottles:
        own = bottle.bottle_id == source.bottle_id
        port = next(iter(bottle.bundle_ports.values()))
        targets.append(
            Target(
                bundle_key(bottle.name),
                TargetKind.OWN_BUNDLE if own else TargetKind.BUNDLE,
                bottle.bundle_host,
                port,
                must_reach=own,
            )
        )
    # Where the agent dials its own bundle (its alias, or a container of its
    # own), at ports that belong to others: an IP-only filter lets these
    # through, and only what listens there decides.
    own_port = next(iter(source.bundle_ports.values()))
    for bottle in bottles:
        port = next(iter(bottle.bundle_ports.values()))
        if bottle.bottle_id != source.bottle_id and port != own_port:
            targets.append(
                Target(
                    f"via-own-alias:{bottle.name}",
                    TargetKind.BUNDLE,
                    source.bundle_host,
                    port,
                )
            )
    targets.append(
        Target(
            HOST_VIA_OWN_ALIAS_KEY,
            TargetKind.SENTINEL,
            source.bundle_host,
            sentinels.everywhere.port,
        )
    )

    loopback_port = sentinels.loopback.port
    targets.append(
        Target(LOOPBACK_SENTINEL_KEY, TargetKind.SENTINEL, "127.0.0.1", loopback_port)
    )
    targets.append(
        Target(
            "sentinel:127.0.0.1/udp",
            TargetKind.SENTINEL,
            "127.0.0.1",
            sentinels.loopback_udp.port,
            proto="udp",
        )
    )
    if sentinels.loopback6 is not None:
        targets.append(
            Target(
                "sentinel:[::1]", TargetKind.SENTINEL, "::1", sentinels.loopback6.port
            )
        )
    targets.append(
        Target(
            "sentinel:[::ffff:127.0.0.1]",
            TargetKind.SENTINEL,
            "::ffff:127.0.0.1",
            loopback_port,
        )
    )

    everywhere_port = sentinels.everywhere.port
    taken = {bottle.alias for bottle in bottles}
    for alias in plan.pool_aliases:
        if alias != source.alias and alias not in taken:
            targets.append(
                Target(f"alias:{alias}", TargetKind.SENTINEL, alias, everywhere_port)
            )
    for label, address in backend.host_side_addresses(source).items():
        targets.append(
            Target(f"gateway:{label}", TargetKind.SENTINEL, address, everywhere_port)
        )
    for key, address in host_addresses().items():
        if key.startswith("host6:"):
            if sentinels.everywhere6 is None:
                continue
            port = sentinels.everywhere6.port
        else:
            port = everywhere_port
        targets.append(Target(key, TargetKind.SENTINEL, address, port))

    for outside in plan.outside:
        targets.append(
            Target(
                outside.key,
                TargetKind.EGRESS,
                outside.host,
                outside.port,
                proto=outside.proto,
            )
        )
    targets.append(
        Target(
            "loopback:self",
            TargetKind.OWN_LOOPBACK,
            backend.agent_loopback(source),
            plan.collision_port,
            proto="self",
            must_reach=True,
        )
    )
    return targets


def witnesses_for(
    bottles: Sequence[Bottle], targets: Sequence[Target], plan: Plan
) -> dict[str, NonceWitness]:
    """The far-side evidence for each column that has a listener here."""
    sentinels = plan.sentinels
    witnesses: dict[str, NonceWitness] = {}
    for bottle in bottles:
        witness = next(iter(bottle.bundle_witnesses.values()), None)
        if witness is not None:
            witnesses[bundle_key(bottle.name)] = witness
            witnesses[f"via-own-alias:{bottle.name}"] = witness
    witnesses[LOOPBACK_SENTINEL_KEY] = sentinels.loopback
    witnesses["sentinel:[::ffff:127.0.0.1]"] = sentinels.loopback
    witnesses["sentinel:127.0.0.1/udp"] = sentinels.loopback_udp
    if sentinels.loopback6 is not None:
        witnesses["sentinel:[::1]"] = sentinels.loopback6
    for target in targets:
        if target.key.startswith(("alias:", "gateway:", "host:")) or (
            target.key == HOST_VIA_OWN_ALIAS_KEY
        ):
            witnesses[target.key] = sentinels.everywhere
        elif target.key.startswith("host6:") and sentinels.everywhere6 is not None:
            witnesses[target.key] = sentinels.everywhere6
    if plan.outside_witness is not None:
        for outside in plan.outside:
            witnesses[outside.key] = plan.outside_witness
    return witnesses


def probe_all(
    backend: Backend,
    bottles: Sequence[Bottle],
    plan: Plan,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
) -> Matrix:
    """Probe every target from every bottle at once and judge the cells."""
    matrix = Matrix(backend.name)
    plans = {
        bottle.bottle_id: targets_for(bottle, bottles, backend, plan)
        for bottle in bottles
    }
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
        futures = {
            bottle.bottle_id: executor.submit(
                run_probes, backend, bottle, plans[bottle.bottle_id], timeout=timeout
            )
            for bottle in bottles
        }
        results = {bottle_id: future.result() for bottle_id, future in futures.items()}
    witnesses = {
        bottle.bottle_id: witnesses_for(bottles, plans[bottle.bottle_id], plan)
        for bottle in bottles
    }
    _refresh_all(witnesses.values())
    for bottle in bottles:
        matrix.add(
            judge(bottle.name, results[bottle.bottle_id], witnesses[bottle.bottle_id])
        )
    return matrix


def _refresh_all(tables: Iterable[Mapping[str, NonceWitness]]) -> None:
    """Let every far side take in what it logged, each once, all at once."""
    unique = {id(w): w for table in tables for w in table.values()}
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as executor:
        list(executor.map(lambda witness: witness.refresh(), unique.values()))
