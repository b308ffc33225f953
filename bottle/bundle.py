"""A bottle's bundle served from the host, bound on the bottle's alias.

Backends whose bundle lives on the host (netns, smolmachines) share this: an
echo service is a nonce listener of this process's :class:`ListenerHub`; a
service with a command is a host process told its address through ``{alias}``
and ``{port}`` in its arguments and ``BOTTLE_ALIAS``/``BOTTLE_PORT`` in its
environment.  Processes are recorded in the bottle's handle by pid and start
time, so that another process can stop them without hitting a reused pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import psutil

from bottle.backends.base import Bottle
from bottle.errors import BottleStartError
from bottle.listeners import ListenerHub
from bottle.pool import Owner
from bottle.spec import BundleService

#: How long a bundle command may take to start listening.
SERVICE_START_SECONDS = 10.0


def start_host_bundle(
    bottle: Bottle, hub: ListenerHub, bind_address: str | None = None
) -> None:
    """Start every service of ``bottle``'s bundle; record ports and processes.

    Services listen on the bottle's alias unless ``bind_address`` says
    otherwise (a negative control binds every address).
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
