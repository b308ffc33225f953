"""Bottles in Linux network namespaces, filtered by nftables on the host side.

Each bottle gets a network namespace whose only way out is a veth pair to the
host.  Inside, the namespace gives up its own ``127.0.0.0/8`` and routes all
of it through the veth (``route_localnet`` on both ends lets loopback
addresses cross), plus the other IPv4 networks of its allowlist; anything
else fails at once with ENETUNREACH.  On the host an nftables table of the
bottle's own accepts only destinations in the allowlist from that veth
(every port, as smolvm's TSI does) and rejects the rest at once: TCP with a
reset (ECONNREFUSED), the rest with "administratively prohibited"
(EHOSTUNREACH).  TCP gets resets because the kernel rate-limits the ICMP
errors a host sends, and a matrix of many probes would otherwise wait on
timeouts.  The same table lets the host forward the bottle's packets only to
the outside stand-in's veths (:mod:`bottle.standin`), never to an uplink.
Enforcement lives on the host because the agent could rewrite rules inside
its own namespace; it runs there as an unprivileged user with every
capability dropped anyway.

The bundle's echo services are host listeners bound on the bottle's alias.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import platform
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from bottle import forwarding
from bottle.backends.base import (
    BackendConfig,
    Bottle,
    ExecResult,
    Requirement,
    bottle_from_lease,
    bottles_with_nft_tables,
    delete_nft_tables,
    reject_unknown_options,
    run_host_command,
)
from bottle.bundle import (
    GUARD_OFF,
    GUARD_ON,
    guard_leftovers,
    guard_ruleset,
    guard_table,
    start_host_bundle,
    stop_commands,
    stop_host_bundle,
)
from bottle.errors import BackendUnavailable, BottleStartError, BottleUsageError
from bottle.listeners import ListenerHub
from bottle.pool import Lease
from bottle.spec import AgentSpec, BottleSpec

log = logging.getLogger(__name__)

NETNS_PREFIX = "bb-"
TABLE_PREFIX = "bottle_"
HOST_VETH_PREFIX = "bbh"
INNER_VETH = "bb0"
DEFAULT_TRANSFER_NET = "198.18.0.0/15"
#: Host veths of the outside stand-in (:mod:`bottle.standin`), the only place
#: a bottle's traffic is ever forwarded to.
STANDIN_VETH_PREFIX = "bsh"
LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
PROBER_PATH = Path(__file__).resolve().parent.parent / "prober.py"

OPTIONS = {
    "transfer_net": (
        f"IPv4 network the veth pairs are numbered from (default "
        f"{DEFAULT_TRANSFER_NET}); pick one this host does not use"
    ),
    "python": "Python the in-bottle prober runs with (default: this one)",
    # The options below weaken isolation on purpose.  They exist for the
    # negative controls, which prove that each probe can see its leak.
    "bundle_bind": "alias (default) | all: NEGATIVE CONTROL, bundles listen on "
    "every address",
    "udp": "filtered (default) | open: NEGATIVE CONTROL, any UDP is let in",
    "ipv6": "filtered (default) | open: NEGATIVE CONTROL, the bottle gets an "
    "IPv6 route to the host and IPv6 is let in",
    "alias_override": "NEGATIVE CONTROL: every bottle uses this alias instead "
    "of its own lease (bottles sharing one alias)",
    "alias_guard": "on (default) | off: NEGATIVE CONTROL, the alias answers on "
    "every port, so host services bound on every address are reachable",
}

#: The agent user of a spec that names none; netns gives each such agent a
#: uid of its own bottle (:func:`agent_uid`) and this user's group.
DEFAULT_AGENT_USER = "nobody"
#: How long a start waits for the veth of a just-stopped namesake to go.
VETH_GONE_SECONDS = 2.0
#: ULA prefix of the IPv6 veth addresses, used only with ``ipv6=open``.
_LEAKY_IPV6_PREFIX = "fd62:6f74:746c"


@dataclasses.dataclass(frozen=True)
class Leaks:
    """The deliberate weaknesses of a negative-control bottle (none by default)."""

    bundle_on_all_addresses: bool = False
    udp_open: bool = False
    ipv6_open: bool = False
    alias_override: str | None = None
    alias_unguarded: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Leaks:
        def choice(key: str, safe: str, leaky: str) -> bool:
            value = options.get(key, safe)
            if value not in (safe, leaky):
                raise BottleUsageError(
                    f"backend option {key}={value!r}", f"use {safe} or {leaky}"
                )
            return value == leaky

        override = options.get("alias_override")
        if override is not None:
            try:
                if ipaddress.IPv4Address(override) not in LOOPBACK_NET:
                    raise ValueError(override)
            except ValueError:
                raise BottleUsageError(
                    f"backend option alias_override={override!r}",
                    "use a loopback address such as 127.0.0.16",
                ) from None
        leaks = cls(
            bundle_on_all_addresses=choice("bundle_bind", "alias", "all"),
            udp_open=choice("udp", "filtered", "open"),
            ipv6_open=choice("ipv6", "filtered", "open"),
            alias_override=override,
            alias_unguarded=choice("alias_guard", "on", "off"),
        )
        if leaks != cls():
            log.warning("netns bottles are deliberately leaky: %s", leaks)
        return leaks


def netns_name(bottle_id: str) -> str:
    return f"{NETNS_PREFIX}{bottle_id}"


def table_name(bottle_id: str) -> str:
    return TABLE_PREFIX + bottle_id.replace("-", "_")


def host_veth_name(bottle_id: str) -> str:
    digest = hashlib.sha1(bottle_id.encode()).hexdigest()[:10]
    return f"{HOST_VETH_PREFIX}{digest}"


class NetnsBackend:
    """Bottles as network namespaces with a host-side nftables allowlist."""

    name: ClassVar[str] = "netns"

    def __init__(self, config: BackendConfig) -> None:
        reject_unknown_options(
            self.name, config.options, {key: text for key, text in OPTIONS.items()}
        )
        self.config = config
        transfer_text = config.options.get("transfer_net", DEFAULT_TRANSFER_NET)
        try:
            self.transfer_net = ipaddress.IPv4Network(transfer_text)
        except ValueError:
            raise BottleUsageError(
                f"backend option transfer_net={transfer_text!r}",
                "not an IPv4 network; e.g. 198.18.0.0/15",
            ) from None
        self.python = config.options.get("python", sys.executable)
        self.leaks = Leaks.from_options(config.options)

    # -- what the host needs -------------------------------------------------

    def requirements(self) -> list[Requirement]:
        on_linux = platform.system() == "Linux"
        is_root = on_linux and os.geteuid() == 0
        found = []
        for tool, package in (
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("nsenter", "util-linux"),
            ("setpriv", "util-linux"),
        ):
            path = shutil.which(tool)
            found.append(
                Requirement(
                    f"`{tool}` command",
                    path is not None,
                    path or f"install the Debian package {package}",
                )
            )
        return [
            Requirement("Linux", on_linux, platform.system()),
            Requirement(
                "root (CAP_NET_ADMIN)",
                is_root,
                "running as root" if is_root else "run as root",
            ),
            *found,
        ]

    def check(self) -> None:
        missing = [req for req in self.requirements() if not req.present]
        if missing:
            reasons = "; ".join(f"{req.what}: {req.detail}" for req in missing)
            raise BackendUnavailable(self.name, reasons)

    def version(self) -> str:
        nft = run_host_command(["nft", "--version"], check=False).stdout.strip()
        return f"Linux {platform.release()}, {nft}"

    # -- start and stop ------------------------------------------------------

    def start(self, spec: BottleSpec, lease: Lease, hub: ListenerHub) -> Bottle:
        bottle_id = lease.bottle_id
        alias = self.leaks.alias_override or lease.alias
        allowlist = spec.effective_allowlist(alias)
        host_address, inner_address = self._transfer_addresses(lease.alias)
        handle: dict[str, Any] = {
            "netns": netns_name(bottle_id),
            "table": table_name(bottle_id),
            "veth": host_veth_name(bottle_id),
            "inner_address": str(inner_address),
            "agent_user": spec.agent.user,
            "service_pids": [],
            "forwarding": True,  # until known not to be needed
        }
        bottle = Bottle(
            spec=spec,
            bottle_id=bottle_id,
            alias=alias,
            allowlist=allowlist,
            backend=self.name,
            bundle_ports={},
            handle=handle,
        )
        try:
            _agent_ids(spec.agent.user)
            # The bundle first: its ports are what the alias guard lets in,
            # and the guard loads with the bottle's own rules in one go.
            self._start_bundle(bottle, hub)
            self._load_rules(
                bottle_id, handle["veth"], allowlist, also=self._guard(bottle)
            )
            self._make_namespace(bottle_id, host_address, inner_address, allowlist)
            if self.leaks.ipv6_open:
                self._open_ipv6(bottle_id, lease.alias)
            handle["forwarding"] = self._forward_to_own_addresses(
                bottle_id, handle["veth"], allowlist
            )
        except BaseException as exc:
            log.debug("start of %s failed, removing what it made", bottle_id)
            self.stop(bottle, hub)
            if isinstance(exc, BottleUsageError):
                raise
            if isinstance(exc, Exception):
                raise BottleStartError(bottle_id, str(exc)) from exc
            raise
        return bottle

    def stop(self, bottle: Bottle, hub: ListenerHub | None) -> None:
        stop_host_bundle(bottle, hub)
        self.remove(bottle.bottle_id, bottle.handle)

    def remove(self, bottle_id: str, handle: Mapping[str, Any]) -> None:
        # Every process still in the namespace (an agent's background job)
        # is killed first: one that outlived its bottle would keep the
        # namespace, and its veth to the host, alive with no filter left.
        # The veth pair then dies with the namespace (the kernel finishes
        # that in the background); only a start cut short between the two
        # can leave the host end alone, and then it is deleted by name.  The
        # rules go last, so that a removal cut short never leaves a
        # reachable namespace without them.
        _kill_processes_in(netns_name(bottle_id))
        deleted = run_host_command(
            ["ip", "netns", "delete", netns_name(bottle_id)], check=False
        )
        if deleted.returncode != 0:
            run_host_command(
                ["ip", "link", "delete", host_veth_name(bottle_id)], check=False
            )
        delete_nft_tables([table_name(bottle_id), guard_table(bottle_id)])
        stop_commands(handle)
        # Closing a forwarding path lists iptables rules, which is slow; only
        # a bottle that opened one, or one known by its id alone, needs it.
        if handle.get("forwarding", True):
            forwarding.close(bottle_id)

    def leftovers(self) -> set[str]:
        found = set()
        listing = run_host_command(["ip", "netns", "list"], check=False).stdout
        for line in listing.splitlines():
            name = line.split(" ", 1)[0]
            if name.startswith(NETNS_PREFIX):
                found.add(name.removeprefix(NETNS_PREFIX))
        return found | bottles_with_nft_tables(TABLE_PREFIX) | guard_leftovers()

    def host_side_addresses(self, bottle: Bottle) -> dict[str, str]:
        inner = ipaddress.IPv4Address(bottle.handle["inner_address"])
        return {"veth-gateway": str(inner - 1)}

    def agent_loopback(self, bottle: Bottle) -> str:
        # 127.0.0.0/8 is handed to the host, as TSI does with what nothing in
        # the guest answers; IPv6 loopback cannot leave a namespace and stays
        # the agent's own.
        return "::1"

    def attach(self, lease: Lease) -> Bottle:
        agent = AgentSpec(user=str(lease.handle.get("agent_user", "nobody")))
        return bottle_from_lease(lease, self.name, agent)

    # -- inside the bottle ---------------------------------------------------

    def exec(
        self, bottle: Bottle, argv: Sequence[str], *, timeout: float = 60.0
    ) -> ExecResult:
        command = self._agent_command(bottle, argv)
        # A session of its own, so that a timeout ends the command's
        # children too, not only the command.
        with subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        ) as process:
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                out, err = process.communicate()
                return ExecResult(list(argv), 124, _text(out), _text(err))
        return ExecResult(list(argv), process.returncode, _text(out), _text(err))

    def prober_command(self, bottle: Bottle) -> list[str]:
        return [self.python, "-I", "-S", str(PROBER_PATH)]

    def effective_allowlist(self, bottle: Bottle) -> list[str]:
        cidrs = []
        for set_name in ("allow4", "allow6"):
            listing = run_host_command(
                ["nft", "-j", "list", "set", "inet", bottle.handle["table"], set_name],
                check=False,
            )
            if listing.returncode != 0:
                continue
            for item in json.loads(listing.stdout).get("nftables", []):
                for element in item.get("set", {}).get("elem", []):
                    cidrs.append(_element_cidr(element))
        return cidrs

    # -- the pieces ------------------------------------------------------------

    def _agent_command(self, bottle: Bottle, argv: Sequence[str]) -> list[str]:
        user = str(bottle.handle.get("agent_user", DEFAULT_AGENT_USER))
        uid, gid = _agent_ids(user)
        if user == DEFAULT_AGENT_USER:
            # Agents share the host's process table: under one uid, one
            # bottle's agent could trace another's and take its connections
            # (ptrace, pidfd_getfd).  A uid of the bottle's own prevents it.
            uid = agent_uid(bottle.alias)
        return [
            "nsenter",
            f"--net=/run/netns/{bottle.handle['netns']}",
            "--",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            "--clear-groups",
            "--bounding-set=-all",
            "--inh-caps=-all",
            "--no-new-privs",
            "--",
            *argv,
        ]

    def _transfer_addresses(
        self, alias: str
    ) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
        # Each alias owns one /30 of the transfer network, so two live bottles
        # (which never share an alias) never share veth addresses.
        offset = int(ipaddress.IPv4Address(alias)) - int(
            ipaddress.IPv4Address("127.0.0.0")
        )
        slots = self.transfer_net.num_addresses // 4
        if offset >= slots:
            raise BottleUsageError(
                f"alias {alias}",
                f"the netns backend numbers veths from {self.transfer_net}, which "
                f"has room for aliases up to 127.0.0.0 + {slots - 1}; use a lower "
                "pool or a larger transfer_net",
            )
        base = int(self.transfer_net.network_address) + 4 * offset
        return ipaddress.IPv4Address(base + 1), ipaddress.IPv4Address(base + 2)

    def _load_rules(
        self, bottle_id: str, veth: str, allowlist: list[str], also: str = ""
    ) -> None:
        """Load the bottle's table, and ``also`` more rules in the same batch."""
        # Rules match the veth by name, so they are in force before the veth
        # exists: no packet of the bottle ever passes unfiltered.
        v4 = [c for c in allowlist if ipaddress.ip_network(c).version == 4]
        v6 = [c for c in allowlist if ipaddress.ip_network(c).version == 6]
        elements4 = f"elements = {{ {', '.join(v4)} }}" if v4 else ""
        elements6 = f"elements = {{ {', '.join(v6)} }}" if v6 else ""
        table = table_name(bottle_id)
        leaks = ""
        if self.leaks.udp_open:
            leaks += f'iifname "{veth}" meta l4proto udp accept\n'
        if self.leaks.ipv6_open:
            leaks += f'iifname "{veth}" meta nfproto ipv6 accept\n'
        ruleset = f"""
table inet {table} {{
    set allow4 {{ type ipv4_addr; flags interval; auto-merge; {elements4} }}
    set allow6 {{ type ipv6_addr; flags interval; auto-merge; {elements6} }}
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname "{veth}" ct state established,related accept
        iifname "{veth}" ip daddr @allow4 accept
        iifname "{veth}" ip6 daddr @allow6 accept
        {leaks}
        iifname "{veth}" meta l4proto tcp reject with tcp reset
        iifname "{veth}" reject with icmpx type admin-prohibited
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "{veth}" oifname "{STANDIN_VETH_PREFIX}*" ip daddr @allow4 accept
        iifname "{veth}" meta l4proto tcp reject with tcp reset
        iifname "{veth}" reject with icmpx type admin-prohibited
        oifname "{veth}" ct state established,related accept
        oifname "{veth}" reject with icmpx type admin-prohibited
    }}
}}
"""
        _run_with_input(["nft", "-f", "-"], ruleset + also)

    def _guard(self, bottle: Bottle) -> str:
        """The alias guard's rules for this bottle, unless a control turns it off."""
        if self.leaks.alias_unguarded:
            bottle.facts["alias_guard"] = GUARD_OFF
            return ""
        bottle.facts["alias_guard"] = GUARD_ON
        return guard_ruleset(bottle)

    def _make_namespace(
        self,
        bottle_id: str,
        host_address: ipaddress.IPv4Address,
        inner_address: ipaddress.IPv4Address,
        allowlist: list[str],
    ) -> None:
        namespace = netns_name(bottle_id)
        veth = host_veth_name(bottle_id)
        _await_veth_gone(veth)
        _run_with_input(
            ["ip", "-batch", "-"],
            f"netns add {namespace}\n"
            f"link add {veth} type veth peer name {INNER_VETH} netns {namespace}\n"
            f"addr add {host_address}/30 dev {veth}\n"
            f"link set {veth} up\n",
        )
        _write_sysctl(f"net/ipv4/conf/{veth}/route_localnet", "1")
        # The namespace gives up its own 127.0.0.1 so that every loopback
        # address the agent dials goes to the host, as under TSI, where the
        # host-side rules decide.  Beyond loopback it routes only its
        # allowlist: anything else fails at once with ENETUNREACH instead of
        # waiting on a host that drops what it does not forward.
        beyond_loopback = [
            network
            for network in map(ipaddress.ip_network, allowlist)
            if isinstance(network, ipaddress.IPv4Network)
            and not network.subnet_of(LOOPBACK_NET)
        ]
        routes = "".join(
            f"route add {network} via {host_address} src {inner_address}\n"
            for network in [LOOPBACK_NET, *beyond_loopback]
        )
        _run_with_input(
            ["ip", "-n", namespace, "-batch", "-"],
            "link set lo up\n"
            "addr del 127.0.0.1/8 dev lo\n"
            f"addr add {inner_address}/30 dev {INNER_VETH}\n"
            f"link set {INNER_VETH} up\n" + routes,
            before=lambda: _namespace_sysctls(namespace),
        )

    def _forward_to_own_addresses(
        self, bottle_id: str, veth: str, allowlist: list[str]
    ) -> bool:
        # An allowlisted address that lives behind one of the project's own
        # veths (the outside stand-in) must really be reached, as under TSI.
        # Anything else beyond loopback is routed to the host and rejected
        # there: a bottle is never forwarded towards an uplink.
        behind_our_veths = forwarding.own_destinations_within(allowlist)
        return bool(behind_our_veths) and bool(
            forwarding.open_path(bottle_id, veth, behind_our_veths)
        )

    def _open_ipv6(self, bottle_id: str, leased_alias: str) -> None:
        offset = int(ipaddress.IPv4Address(leased_alias)) & 0xFFFF
        prefix = f"{_LEAKY_IPV6_PREFIX}:{offset:x}"
        _run_with_input(
            ["ip", "-batch", "-"],
            f"addr add {prefix}::1/64 dev {host_veth_name(bottle_id)} nodad\n",
        )
        _run_with_input(
            ["ip", "-n", netns_name(bottle_id), "-batch", "-"],
            f"addr add {prefix}::2/64 dev {INNER_VETH} nodad\n"
            f"route add ::/0 via {prefix}::1 dev {INNER_VETH}\n",
        )

    def _start_bundle(self, bottle: Bottle, hub: ListenerHub) -> None:
        every = "0.0.0.0" if self.leaks.bundle_on_all_addresses else None
        start_host_bundle(bottle, hub, bind_address=every)


def _kill_processes_in(namespace: str) -> None:
    """SIGKILL every process whose network namespace is ``namespace``."""
    try:
        found = os.stat(Path("/run/netns", namespace))
    except FileNotFoundError:
        return
    wanted = (found.st_dev, found.st_ino)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            seen = os.stat(entry / "ns" / "net")
            if (seen.st_dev, seen.st_ino) != wanted:
                continue
            os.kill(int(entry.name), signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        log.info("killed process %s left in %s", entry.name, namespace)


def _await_veth_gone(veth: str) -> None:
    """Wait for a veth of the same name to die with its namespace.

    The kernel removes a deleted namespace's veth pair in the background, so
    a bottle started again under the same id right after its stop can find
    the old host end still there; past a bound it is deleted by name.
    """
    deadline = time.monotonic() + VETH_GONE_SECONDS
    while Path("/sys/class/net", veth).exists():
        if time.monotonic() > deadline:
            run_host_command(["ip", "link", "delete", veth], check=False)
            return
        time.sleep(0.005)


def agent_uid(alias: str) -> int:
    """The uid of a default agent: the alias as a number (127.0.0.16 is
    2130706448), unique per bottle and far above the host's own users."""
    return int(ipaddress.IPv4Address(alias))


def _agent_ids(user: str) -> tuple[int, int]:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BottleUsageError(
            f"agent user {user!r}", "no such user on this host; e.g. nobody"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _namespace_sysctls(namespace: str) -> None:
    from bottle.listeners import _in_network_namespace

    with _in_network_namespace(namespace):
        for key in ("all", INNER_VETH):
            _write_sysctl(f"net/ipv4/conf/{key}/route_localnet", "1")


def _write_sysctl(key: str, value: str) -> None:
    Path("/proc/sys", key).write_text(value, encoding="ascii")


def _run_with_input(argv: list[str], text: str, before: Any = None) -> None:
    """Run ``argv`` with ``text`` on its input, after ``before()`` if given."""
    if before is not None:
        before()
    run_host_command(argv, timeout=30, input_text=text)


def _element_cidr(element: Any) -> str:
    if isinstance(element, dict) and "prefix" in element:
        prefix = element["prefix"]
        return str(ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}"))
    if isinstance(element, dict) and "range" in element:
        first, last = element["range"]
        return f"{first}-{last}"
    return str(ipaddress.ip_network(str(element)))


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""
