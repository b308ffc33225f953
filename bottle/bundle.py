"""A bottle's bundle served from the host, bound on the bottle's alias.

Backends whose bundle lives on the host (netns, smolmachines) share this: an
echo service is a nonce listener of this process's :class:`ListenerHub`; a
service with a command is a host process told its address through ``{alias}``
and ``{port}`` in its arguments and ``BOTTLE_ALIAS``/``BOTTLE_PORT`` in its
environment.  Processes are recorded in the bottle's handle by pid and start
time, so that another process can stop them without hitting a reused pid.

The alias guard closes what an IP-only allowlist leaves open.  smolvm's TSI
(and the netns backend, which imitates it) lets the agent reach every port of
its alias, and a host service bound on every address (``0.0.0.0``) answers
there too: a database or dev server the agent must never see.  On Linux an
nftables table of the bottle's own (``bbguard_<id>``) therefore rejects, at
the host's input hook, anything bound for the alias but the bundle's own
ports.  Locally made connections pass that hook as well, so the guard holds
for TSI's host-side sockets as for a namespace's veth.  It needs root and
``nft``; where either is missing the bottle runs unguarded, its facts say so,
and the conformance probe of host services via the alias shows the leak.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping
from typing import Any

import psutil

from bottle.backends.base import (
    Bottle,
    bottles_with_nft_tables,
    delete_nft_tables,
    run_host_command,
)
from bottle.errors import BottleStartError
from bottle.listeners import ListenerHub
from bottle.pool import Owner
from bottle.spec import BundleService

log = logging.getLogger(__name__)

#: How long a bundle command may take to start listening.
SERVICE_START_SECONDS = 10.0
GUARD_TABLE_PREFIX = "bbguard_"
#: ``bottle.facts["alias_guard"]``: the guard is in force, or why not.
GUARD_ON = "on"
GUARD_OFF = "off (negative control)"


def start_host_bundle(
    bottle: Bottle, hub: ListenerHub, bind_address: str | None = None
) -> None:
    """Start every service of ``bottle``'s bundle; record ports and processes.

    Services listen on the bottle's alias unless ``bind_address`` says
    otherwise (a negative control binds every address).  The backend then
    guards the alias (:func:`guard_ruleset`), once the ports are known.
    """
    address = bind_address or bottle.alias
    bottle.handle.setdefault("service_pids", [])
    for service in bottle.spec.bundle:
        if service.is_echo:
            listener = hub.listen(
                address, service.port, label=f"bundle {bottle.name}/{service.name}"
            )
            bottle.bundle_listeners[service.name] = listener
            bottle.bundle_witnesses[service.name] = listener
            bottle.bundle_ports[service.name] = listener.port
        else:
            port = service.port or free_port(bottle.alias)
            process = _start_command(service, bottle.alias, port)
            owner = Owner.of_pid(process.pid)
            bottle.handle["service_pids"].append([owner.pid, owner.started])
            bottle.bundle_ports[service.name] = port
    bottle.handle["bundle_ports"] = dict(bottle.bundle_ports)
    bottle.handle["allowlist"] = list(bottle.spec.allowlist)
    bottle.handle["allowlist_cidrs"] = list(bottle.allowlist)


def stop_host_bundle(bottle: Bottle, hub: ListenerHub | None) -> None:
    """Close the bundle's listeners (if this process serves them) and commands."""
    if hub is not None:
        for listener in bottle.bundle_listeners.values():
            hub.close(listener)
    bottle.bundle_listeners.clear()
    stop_commands(bottle.handle)


def remove_host_bundle(bottle_id: str, handle: Mapping[str, Any]) -> None:
    """Stop the bundle's commands and drop its alias guard, from the id alone."""
    stop_commands(handle)
    if _can_guard() is None:
        delete_nft_tables([guard_table(bottle_id)])


def guard_table(bottle_id: str) -> str:
    return GUARD_TABLE_PREFIX + bottle_id.replace("-", "_")


def guard_ruleset(bottle: Bottle, extra_ports: Iterable[int] = ()) -> str:
    """The nftables table that lets the alias answer on the bundle's ports only.

    ``extra_ports`` answer too (the agent's own published ports, say).  Meant
    for ``nft -f``, alone or with a backend's own tables in one transaction.
    """
    alias = bottle.alias
    ports = {*bottle.bundle_ports.values(), *extra_ports}
    allowed = ", ".join(str(port) for port in sorted(ports))
    accept = (
        f"ip daddr {alias} meta l4proto {{ tcp, udp }} th dport {{ {allowed} }} accept"
        if allowed
        else ""
    )
    # Replies to connections the host itself opened from the alias pass;
    # everything else bound for the alias outside the bundle's ports is
    # rejected at once (a reset for TCP), as a closed port would be.
    return f"""
table inet {guard_table(bottle.bottle_id)} {{
    chain input {{
        type filter hook input priority filter - 5; policy accept;
        ip daddr {alias} ct state established,related accept
        {accept}
        ip daddr {alias} meta l4proto tcp reject with tcp reset
        ip daddr {alias} reject with icmpx type admin-prohibited
    }}
}}
"""


def guard_alias(bottle: Bottle, extra_ports: Iterable[int] = ()) -> None:
    """Load the alias guard where this host can, and say in the bottle's facts
    whether it is on, or what is missing."""
    missing = _can_guard()
    if missing is not None:
        log.warning("alias %s is not guarded: %s", bottle.alias, missing)
        bottle.facts["alias_guard"] = f"unavailable ({missing})"
        return
    run_host_command(
        ["nft", "-f", "-"], timeout=30, input_text=guard_ruleset(bottle, extra_ports)
    )
    bottle.facts["alias_guard"] = GUARD_ON


def guard_leftovers() -> set[str]:
    """Bottle ids whose alias guard table is still on this host."""
    if _can_guard() is not None:
        return set()
    return bottles_with_nft_tables(GUARD_TABLE_PREFIX)


def _can_guard() -> str | None:
    """None when this host can load a guard, else what is missing."""
    if shutil.which("nft") is None:
        return "no `nft` command (Linux nftables)"
    if os.geteuid() != 0:
        return "needs root"
    return None


def stop_commands(handle: Mapping[str, Any]) -> None:
    """Stop the bundle's command processes recorded in ``handle``."""
    for record in handle.get("service_pids", []):
        pid, started = (record, None) if isinstance(record, int) else record
        # A recorded pid may have been reused since; only the very process
        # that was started (same start time) is stopped.
        if started is None or Owner(int(pid), float(started)).is_alive():
            _terminate(int(pid))


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _start_command(
    service: BundleService, alias: str, port: int
) -> subprocess.Popen[bytes]:
    argv = [part.format(alias=alias, port=port) for part in service.command]
    env = dict(os.environ, BOTTLE_ALIAS=alias, BOTTLE_PORT=str(port))
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + SERVICE_START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BottleStartError(
                service.name,
                f"its bundle command exited {process.returncode}: {argv}",
            )
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((alias, port)) == 0:
                return process
        time.sleep(0.05)
    _terminate(process.pid)
    raise BottleStartError(
        service.name,
        f"its bundle command did not listen on {alias}:{port} within "
        f"{SERVICE_START_SECONDS:.0f} s",
    )


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    with contextlib.suppress(psutil.Error):
        psutil.Process(pid).wait(timeout=5)
