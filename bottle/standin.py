"""A stand-in for an outside address, so that no probe ever leaves the host.

The conformance suite probes an egress target (``8.8.8.8:53`` by default) from
inside bottles that must block it.  If isolation is broken, that packet
leaves.  On machines where nothing may leave (CI, this project's own tests)
the target is a test address such as ``198.51.100.53`` owned by a network
namespace of our own: the host reaches it by one ``/32`` route through a veth,
and a nonce listener inside logs every probe that arrives, so a leak is seen
from the far side instead of escaping.

The stand-in's log is a file, so processes other than the one that made the
stand-in (pytest-xdist workers) can read the evidence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bottle.errors import BottleUsageError, CommandFailed
from bottle.forwarding import addresses_this_host_depends_on
from bottle.listeners import Listener, ListenerHub
from bottle.pool import AliasPool
from bottle.runs import RunRegistry

log = logging.getLogger(__name__)

STANDIN_PREFIX = "bs-"
_STANDIN_VETH_PREFIX = "bsh"
_INNER_VETH = "bs0"


def standin_netns(run: str) -> str:
    return f"{STANDIN_PREFIX}{run}"


def _standin_veth(run: str) -> str:
    return _STANDIN_VETH_PREFIX + hashlib.sha1(run.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class FileWitness:
    """Reads a nonce log written by a listener, possibly in another process."""

    path: Path

    def saw_nonce(self, nonce: str) -> bool:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return False
        return any(nonce in line.split(" ", 1)[0] for line in text.splitlines())

    def refresh(self) -> None:
        """Nothing to do: the log file is read on every question."""


@dataclasses.dataclass
class StandIn:
    """A namespace that owns the outside targets and logs every nonce sent."""

    run: str
    targets: list[tuple[str, int]]
    log_path: Path
    listeners: list[Listener] = dataclasses.field(default_factory=list)

    @property
    def witness(self) -> FileWitness:
        return FileWitness(self.log_path)


def start_standin(
    targets: Sequence[tuple[str, int]], hub: ListenerHub, pool: AliasPool, run: str
) -> StandIn:
    """Create one stand-in namespace owning every ``(address, port)`` target.

    The host gets a ``/32`` route to each address and nothing else; the
    stand-in answers on TCP and UDP at each target.  Refuses an address in a
    ``/24`` this host uses for its uplink, resolver or package mirrors, so a
    stand-in can never take over the path to them.
    """
    targets = list(dict.fromkeys(targets))
    addresses = list(dict.fromkeys(address for address, _ in targets))
    for address in addresses:
        target = ipaddress.ip_address(address)
        if not isinstance(target, ipaddress.IPv4Address) or target.is_loopback:
            raise BottleUsageError(
                f"outside stand-in address {address}",
                "must be a non-loopback IPv4 address such as 198.51.100.53",
            )
        _refuse_used_address(address)

    namespace = standin_netns(run)
    veth = _standin_veth(run)
    host_side = _host_side_address(
        [ipaddress.IPv4Address(address) for address in addresses]
    )
    log_dir = pool.state_dir / "standins"
    log_dir.mkdir(parents=True, exist_ok=True)
    standin = StandIn(run, targets, log_dir / f"{run}.nonces")
    try:
        _run(
            ["ip", "-batch", "-"],
            f"netns add {namespace}\n"
            f"link add {veth} type veth peer name {_INNER_VETH} netns {namespace}\n"
            f"addr add {host_side}/32 dev {veth}\n"
            f"link set {veth} up\n"
            + "".join(
                f"route add {address}/32 dev {veth} src {host_side}\n"
                for address in addresses
            ),
            what=f"owning {', '.join(addresses)} (another run's stand-in may own "
            "them: `ip route` shows which bsh* device)",
        )
        _run(
            ["ip", "-n", namespace, "-batch", "-"],
            "link set lo up\n"
            + "".join(f"addr add {a}/32 dev {_INNER_VETH}\n" for a in addresses)
            + f"link set {_INNER_VETH} up\n"
            f"route add {host_side}/32 dev {_INNER_VETH}\n"
            f"route add default via {host_side} dev {_INNER_VETH}\n",
        )
        for address, port in targets:
            for proto in ("tcp", "udp"):
                listener = hub.listen(
                    address,
                    port,
                    proto=proto,
                    label=f"outside stand-in {proto}",
                    netns=namespace,
                    log_path=standin.log_path,
                )
                standin.listeners.append(listener)
    except BaseException:
        stop_standin(standin, hub)
        raise
    log.info("outside stand-in for %s in namespace %s", targets, namespace)
    return standin


def stop_standin(standin: StandIn, hub: ListenerHub | None) -> None:
    """Remove the stand-in's listeners, namespace, route and records."""
    if hub is not None:
        for listener in standin.listeners:
            hub.close(listener)
    standin.listeners.clear()
    _remove(standin.run)
    with contextlib.suppress(FileNotFoundError):
        standin.log_path.unlink()


def reap_standins(pool: AliasPool, registry: RunRegistry | None = None) -> list[str]:
    """Remove stand-ins whose run's owner is dead; returns their runs.

    ``run`` must be registered in the run registry by whoever starts the
    stand-in (the launcher of the same run does it).
    """
    registry = registry or RunRegistry()
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    removed = []
    with pool.locked():
        for line in listing.splitlines():
            name = line.split(" ", 1)[0]
            if not name.startswith(STANDIN_PREFIX):
                continue
            run = name.removeprefix(STANDIN_PREFIX)
            if registry.owner_is_dead(run):
                _remove(run)
                removed.append(f"stand-in {run}")
    return removed


def _remove(run: str) -> None:
    for argv in (
        ["ip", "netns", "delete", standin_netns(run)],
        ["ip", "link", "delete", _standin_veth(run)],
    ):
        subprocess.run(argv, capture_output=True, check=False)


def _host_side_address(
    targets: list[ipaddress.IPv4Address],
) -> ipaddress.IPv4Address:
    # The host end of the veth needs an address for the stand-in to answer
    # to; take a neighbour of the first target, as unused as the targets are.
    for candidate in (targets[0] + 1, targets[0] - 1, targets[0] + 2):
        if candidate not in targets:
            return candidate
    raise BottleUsageError("outside stand-in", f"no free neighbour of {targets[0]}")


def _refuse_used_address(address: str) -> None:
    target = ipaddress.IPv4Address(address)
    for used in addresses_this_host_depends_on():
        if target in ipaddress.IPv4Network(f"{used}/24", strict=False):
            raise BottleUsageError(
                f"egress stand-in address {address}",
                f"is in the /24 of {used}, which this host uses (uplink, "
                "resolver or package mirror); use a test address such as "
                "198.51.100.53",
            )
    if os.geteuid() != 0:
        raise BottleUsageError(
            "egress stand-in", "needs root to create a network namespace"
        )


def _run(argv: list[str], text: str, what: str = "") -> None:
    completed = subprocess.run(
        argv, input=text, capture_output=True, text=True, check=False, timeout=30
    )
    if completed.returncode != 0:
        stderr = f"{completed.stderr.strip()} ({what})" if what else completed.stderr
        raise CommandFailed(argv, completed.returncode, stderr)
