"""One conformance run: start bottles and sentinels, probe, build the matrix.

Used by the pytest plugin's conformance suite and by ``bottle check``, so
the same run is available with and without pytest.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import ipaddress
import logging
from collections.abc import Mapping, Sequence

import psutil

from bottle.backends import Backend, Bottle
from bottle.backends.base import NonceWitness
from bottle.errors import BottleUsageError
from bottle.listeners import Listener, ListenerHub
from bottle.matrix import Matrix, judge, plan_targets
from bottle.probe import DEFAULT_PROBE_TIMEOUT_SECONDS, Target, TargetKind, run_probes

log = logging.getLogger(__name__)

DEFAULT_EGRESS_TARGET = "8.8.8.8:53"
LOOPBACK_SENTINEL_KEY = "sentinel:127.0.0.1"

#: Interfaces the project creates itself; their host ends are covered by each
#: backend's own host-side addresses instead.
_OWN_INTERFACE_PREFIXES = ("bbh", "bsh", "br-", "veth")


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


def host_addresses() -> dict[str, str]:
    """This host's own non-loopback IPv4 addresses, by interface name."""
    found = {}
    for interface, addresses in sorted(psutil.net_if_addrs().items()):
        if interface.startswith(_OWN_INTERFACE_PREFIXES) or interface == "lo":
            continue
        for address in addresses:
            if address.family.name == "AF_INET":
                found[f"host:{interface}"] = address.address
                break
    return found


@dataclasses.dataclass
class Sentinels:
    """The host listeners every bottle must never reach.

    ``loopback`` listens on ``127.0.0.1``; ``everywhere`` on every host
    interface (``0.0.0.0``), and is probed at each address the host owns and
    at each address where a bottle sees the host (its gateways).
    """

    loopback: Listener
    everywhere: Listener

    @classmethod
    def start(cls, hub: ListenerHub) -> Sentinels:
        loopback = hub.listen("127.0.0.1", 0, label="sentinel 127.0.0.1")
        everywhere = hub.listen("0.0.0.0", 0, label="sentinel 0.0.0.0")
        return cls(loopback, everywhere)

    def close(self, hub: ListenerHub) -> None:
        hub.close(self.loopback)
        hub.close(self.everywhere)


def targets_for(
    source: Bottle,
    bottles: Sequence[Bottle],
    backend: Backend,
    sentinels: Sentinels,
    egress: tuple[str, int] | None,
) -> list[Target]:
    """Everything ``source`` probes, in the matrix's column order."""
    targets = plan_targets(
        source, bottles, {LOOPBACK_SENTINEL_KEY: sentinels.loopback}, egress
    )
    port = sentinels.everywhere.port
    for label, address in backend.host_side_addresses(source).items():
        targets.append(Target(f"gateway:{label}", TargetKind.SENTINEL, address, port))
    for key, address in host_addresses().items():
        targets.append(Target(key, TargetKind.SENTINEL, address, port))
    return targets


def witnesses_for(
    bottles: Sequence[Bottle],
    sentinels: Sentinels,
    targets: Sequence[Target],
    egress_witness: NonceWitness | None,
) -> dict[str, NonceWitness]:
    """The far-side evidence for each column."""
    witnesses: dict[str, NonceWitness] = {}
    for bottle in bottles:
        witness = next(iter(bottle.bundle_witnesses.values()), None)
        if witness is not None:
            witnesses[f"bundle:{bottle.name}"] = witness
    witnesses[LOOPBACK_SENTINEL_KEY] = sentinels.loopback
    for target in targets:
        if target.key.startswith(("gateway:", "host:")):
            witnesses[target.key] = sentinels.everywhere
    if egress_witness is not None:
        witnesses["egress"] = egress_witness
    return witnesses


def probe_all(
    backend: Backend,
    bottles: Sequence[Bottle],
    sentinels: Sentinels,
    egress: tuple[str, int] | None,
    egress_witness: NonceWitness | None = None,
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
) -> Matrix:
    """Probe every target from every bottle at once and judge the cells."""
    matrix = Matrix(backend.name)
    plans = {
        bottle.bottle_id: targets_for(bottle, bottles, backend, sentinels, egress)
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
    for bottle in bottles:
        targets = plans[bottle.bottle_id]
        witnesses: Mapping[str, NonceWitness] = witnesses_for(
            bottles, sentinels, targets, egress_witness
        )
        matrix.add(judge(bottle.name, results[bottle.bottle_id], witnesses))
    return matrix
