"""Host forwarding from a bottle's veth to destinations behind our own veths.

A bottle whose allowlist names a non-loopback address (or no allowlist at
all, as a smolvm machine whose ``allowed_cidrs`` is ``null``) must really
reach that address when the address lives on this machine behind another
veth of the project's own, such as the egress stand-in's
(:mod:`bottle.standin`).  Under smolvm's TSI the host process opens those
connections itself, so an unrestricted guest does reach them; a namespace
only does when the host forwards its packets, which a host may refuse in
two ways:

- IPv4 forwarding is off.  Turning it on for the whole host would route
  every namespace everywhere; instead ``forwarding`` is set on the two veths
  only.  The kernel checks the setting of the device a packet *arrives* on,
  so each direction needs its own device's: measured with
  ``net.ipv4.conf.all.forwarding=0``, a TCP handshake through a router
  namespace completes with both veths at 1 and times out with either alone.
- An iptables ``FORWARD`` chain drops the packets: Docker sets the policy to
  DROP while dockerd runs and leaves it so.  Where that policy or Docker's
  ``DOCKER-USER`` chain is found, two rules are inserted (into
  ``DOCKER-USER``, which Docker evaluates first and never flushes, else into
  ``FORWARD``): new packets from the bottle's veth to each destination out of
  its veth, and replies back to the bottle's veth.  Each carries the comment
  ``bot-bottle-fwd:<label>``.

Nothing is ever forwarded towards an uplink: a destination is refused unless
the host routes it, without a gateway, through a device named like the
project's own veths (``bsh``/``bbh``), and never when it shares a ``/24``
with an address this host depends on (uplink, resolver, package mirrors).
An nftables table ``inet bbfwd_<label>`` of each path also drops anything
the two veths would forward to a device that holds a default route.

:func:`close` removes a path's table and rules (the veths die with their
namespaces); :func:`leftovers` finds the labels of paths still present, so a
reaper can close those whose owner is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bottle.errors import BottleUsageError, CommandFailed

log = logging.getLogger(__name__)

#: Host veths the project creates: the stand-in's and the bottles'.
OWN_DEVICE_PREFIXES = ("bsh", "bbh")
TABLE_PREFIX = "bbfwd_"
COMMENT_PREFIX = "bot-bottle-fwd:"
DOCKER_USER = "DOCKER-USER"
FORWARD = "FORWARD"

_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")


@dataclasses.dataclass(frozen=True)
class ForwardPath:
    """What :func:`open_path` set up; enough for :func:`close`."""

    label: str
    inbound: str
    #: Each destination network and the device it is routed out of.
    routes: tuple[tuple[str, str], ...]
    #: The iptables chain holding the path's rules, or "" when none was needed.
    chain: str


def own_route_device(destination: str) -> str | None:
    """The project's own veth the host routes ``destination`` out of, if any."""
    network = ipaddress.ip_network(destination, strict=False)
    if not isinstance(network, ipaddress.IPv4Network) or network.is_loopback:
        return None
    found = _json(["ip", "-j", "-4", "route", "get", str(network.network_address)])
    if not found or not isinstance(found, list):
        return None
    route = found[0]
    device = str(route.get("dev", ""))
    if route.get("gateway") or not device.startswith(OWN_DEVICE_PREFIXES):
        return None
    if route.get("type", "unicast") != "unicast":
        return None
    # The whole destination, not only its first address, must stay behind the
    # device: a wider network could reach past the veth.
    if network.num_addresses > 1:
        for entry in _json(["ip", "-j", "-4", "route", "show", "dev", device]) or []:
            dst = str(entry.get("dst", ""))
            if dst and dst != "default" and not entry.get("gateway"):
                held = ipaddress.ip_network(dst, strict=False)
                if isinstance(held, ipaddress.IPv4Network) and network.subnet_of(held):
                    return device
        return None
    return device


def own_destinations_within(allowlist: Sequence[str]) -> list[str]:
    """The parts of ``allowlist`` the host routes through the project's own veths.

    A wide allowed network (``198.51.100.0/24``) yields the narrower routes of
    our veths inside it (the stand-in's host routes), and an allowed network
    inside such a route yields itself; loopback and IPv6 yield nothing.
    """
    allowed = [
        network
        for network in map(ipaddress.ip_network, allowlist)
        if isinstance(network, ipaddress.IPv4Network) and not network.is_loopback
    ]
    if not allowed:
        return []
    found: list[ipaddress.IPv4Network] = []
    for route in _json(["ip", "-j", "-4", "route", "show", "table", "main"]) or []:
        dst = str(route.get("dst", ""))
        own = str(route.get("dev", "")).startswith(OWN_DEVICE_PREFIXES)
        if not own or route.get("gateway") or dst in ("", "default"):
            continue
        held = ipaddress.IPv4Network(dst, strict=False)
        for network in allowed:
            if held.subnet_of(network):
                found.append(held)
            elif network.subnet_of(held):
                found.append(network)
    return [
        str(network)
        for network in ipaddress.collapse_addresses(found)
        if own_route_device(str(network)) is not None
    ]


def open_path(label: str, inbound: str, destinations: Sequence[str]) -> ForwardPath:
    """Let the host forward ``inbound``'s packets to ``destinations`` and back.

    ``label`` names the path (letters, digits and dashes); ``inbound`` is the
    host end of the bottle's veth.  Every destination must be routed through
    one of the project's own veths (see :func:`own_route_device`), else
    :class:`BottleUsageError` and nothing is changed.
    """
    if not _LABEL.match(label):
        raise BottleUsageError(
            f"forwarding label {label!r}", "use up to 64 letters, digits and dashes"
        )
    routes = []
    depended = addresses_this_host_depends_on()
    for destination in destinations:
        network = ipaddress.ip_network(destination, strict=False)
        device = own_route_device(destination)
        if device is None or device == inbound:
            raise BottleUsageError(
                f"forwarding destination {destination}",
                "is not routed, without a gateway, through one of bot-bottle's "
                f"own veths ({', '.join(OWN_DEVICE_PREFIXES)}*); only those are "
                "forwarded",
            )
        near = [
            used
            for used in depended
            if network.overlaps(ipaddress.IPv4Network(f"{used}/24", strict=False))
        ]
        if near:
            raise BottleUsageError(
                f"forwarding destination {destination}",
                f"shares a /24 with {near[0]}, which this host depends on",
            )
        routes.append((str(network), device))
    chain = _iptables_chain()
    path = ForwardPath(label, inbound, tuple(routes), chain)
    if not routes:
        return path
    try:
        _load_table(path)
        for device in sorted({inbound, *(device for _, device in routes)}):
            _write_sysctl(f"net/ipv4/conf/{device}/forwarding", "1")
        if chain:
            _insert_rules(path)
    except BaseException:
        close(label)
        raise
    log.debug("forwarding %s from %s to %s", label, inbound, routes)
    return path


def close(label: str) -> None:
    """Remove a path's table and iptables rules, each if it exists.

    The veths' ``forwarding`` settings are left: they belong to veths of the
    project's own, which disappear with their namespaces.
    """
    subprocess.run(
        ["nft", "delete", "table", "inet", table_name(label)],
        capture_output=True,
        check=False,
    )
    for chain, rule in _rules_with_comment(COMMENT_PREFIX + label):
        subprocess.run(
            ["iptables", "-w", "-D", chain, *rule], capture_output=True, check=False
        )


def leftovers() -> set[str]:
    """Labels of every path whose table or rules are still on this host."""
    found = set()
    tables = _json(["nft", "-j", "list", "tables"]) or {}
    for item in tables.get("nftables", []) if isinstance(tables, dict) else []:
        name = str(item.get("table", {}).get("name", ""))
        if item.get("table", {}).get("family") == "inet" and name.startswith(
            TABLE_PREFIX
        ):
            found.add(name.removeprefix(TABLE_PREFIX).replace("_", "-"))
    for _, rule in _rules_with_comment(COMMENT_PREFIX):
        comment = rule[rule.index("--comment") + 1]
        found.add(comment.removeprefix(COMMENT_PREFIX))
    return found


def table_name(label: str) -> str:
    return TABLE_PREFIX + label.replace("-", "_")


# -- the pieces ----------------------------------------------------------------


def _load_table(path: ForwardPath) -> None:
    devices = sorted({path.inbound, *(device for _, device in path.routes)})
    uplinks = _uplinks()
    drops = ""
    if uplinks:
        names = ", ".join(f'"{name}"' for name in uplinks)
        ours = ", ".join(f'"{name}"' for name in devices)
        drops = f"iifname {{ {ours} }} oifname {{ {names} }} drop"
    ruleset = f"""
table inet {table_name(path.label)} {{
    chain forward {{
        type filter hook forward priority filter - 20; policy accept;
        {drops}
    }}
}}
"""
    _run(["nft", "-f", "-"], ruleset)


def _insert_rules(path: ForwardPath) -> None:
    comment = ["-m", "comment", "--comment", COMMENT_PREFIX + path.label]
    for network, device in path.routes:
        _run(
            [
                "iptables",
                "-w",
                "-I",
                path.chain,
                "-i",
                path.inbound,
                "-o",
                device,
                "-d",
                network,
                *comment,
                "-j",
                "ACCEPT",
            ]
        )
    for device in sorted({device for _, device in path.routes}):
        _run(
            [
                "iptables",
                "-w",
                "-I",
                path.chain,
                "-i",
                device,
                "-o",
                path.inbound,
                "-m",
                "conntrack",
                "--ctstate",
                "RELATED,ESTABLISHED",
                *comment,
                "-j",
                "ACCEPT",
            ]
        )


def _iptables_chain() -> str:
    """Where accept rules are needed: DOCKER-USER, FORWARD, or nowhere ("")."""
    if shutil.which("iptables") is None:
        return ""
    listing = subprocess.run(
        ["iptables", "-w", "-S"], capture_output=True, text=True, check=False
    )
    if listing.returncode != 0:
        return ""
    lines = listing.stdout.splitlines()
    if f"-N {DOCKER_USER}" in lines:
        return DOCKER_USER
    if f"-P {FORWARD} DROP" in lines:
        return FORWARD
    return ""


def _rules_with_comment(prefix: str) -> list[tuple[str, list[str]]]:
    """``(chain, rule arguments)`` of every iptables rule whose comment starts so."""
    if shutil.which("iptables") is None:
        return []
    listing = subprocess.run(
        ["iptables", "-w", "-S"], capture_output=True, text=True, check=False
    )
    found = []
    for line in listing.stdout.splitlines():
        parts = _split_rule(line)
        if parts[:1] != ["-A"] or "--comment" not in parts:
            continue
        comment = parts[parts.index("--comment") + 1]
        if comment.startswith(prefix):
            found.append((parts[1], parts[2:]))
    return found


def _split_rule(line: str) -> list[str]:
    with contextlib.suppress(ValueError):
        return shlex.split(line)
    return []


def _uplinks() -> list[str]:
    devices = set()
    for family in ("-4", "-6"):
        for route in (
            _json(["ip", "-j", family, "route", "show", "table", "main"]) or []
        ):
            if route.get("dst") == "default" and route.get("dev"):
                devices.add(str(route["dev"]))
    return sorted(devices)


def addresses_this_host_depends_on() -> set[str]:
    """IPv4 addresses this host needs: gateways, link sources, resolvers, hosts.

    Routes through the project's own veths do not count (another run's
    stand-in is not something the host depends on); loopback never does.
    """
    found: set[str] = set()
    for route in _json(["ip", "-j", "-4", "route", "show", "table", "all"]) or []:
        if str(route.get("dev", "")).startswith(OWN_DEVICE_PREFIXES):
            continue
        for key in ("gateway", "prefsrc"):
            if key in route:
                found.add(str(route[key]))
    for path, keyword in (("/etc/resolv.conf", "nameserver"), ("/etc/hosts", "")):
        with contextlib.suppress(OSError):
            for line in Path(path).read_text(encoding="utf-8").splitlines():
                fields = line.split("#", 1)[0].split()
                if keyword and fields[:1] == [keyword] and len(fields) > 1:
                    found.add(fields[1])
                elif not keyword and fields:
                    found.add(fields[0])
    usable = set()
    for address in found:
        with contextlib.suppress(ValueError):
            parsed = ipaddress.ip_address(address)
            if isinstance(parsed, ipaddress.IPv4Address) and not parsed.is_loopback:
                usable.add(address)
    return usable


def _json(argv: list[str]) -> Any:
    """A command's JSON output, or None when it printed none."""
    completed = subprocess.run(argv, capture_output=True, text=True, check=False)
    try:
        return json.loads(completed.stdout or "null")
    except ValueError:
        return None


def _write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key).write_text(value, encoding="ascii")


def _run(argv: list[str], text: str = "") -> None:
    log.debug("running %s", " ".join(argv))
    completed = subprocess.run(
        argv, input=text, capture_output=True, text=True, check=False, timeout=30
    )
    if completed.returncode != 0:
        raise CommandFailed(argv, completed.returncode, completed.stderr)


__all__ = [
    "ForwardPath",
    "addresses_this_host_depends_on",
    "close",
    "leftovers",
    "open_path",
    "own_destinations_within",
    "own_route_device",
]
