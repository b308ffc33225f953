"""Bottles whose agent is a smolvm microVM, filtered by smolvm's TSI allowlist.

The bundle's echo services are host listeners bound on the bottle's alias,
as in the netns backend.  The agent is a smolvm machine created from the
spec's ``agent.source`` (a packed ``.smolmachine``, ``--from``) or
``agent.image``, with networking on and ``--allow-cidr`` for each CIDR of
the bottle's allowlist (by default the alias ``/32``).  Ports listed in the
spec's ``options.ports`` (``"HOST:GUEST"`` strings) are published on the
alias.

smolvm 0.8.0 through 1.7.7 drop ``--allow-cidr`` when ``--from`` is used,
leaving the machine unrestricted.  Between ``machine create`` and ``machine
start`` this backend therefore patches the allowlist into smolvm's state DB
(:mod:`bottle.smolvm_db`); where smolvm stored it itself, the patch is a
no-op and the bottle's facts say "not needed".  The probes, not the DB,
decide whether isolation holds.

Backend options (``--bottle-backend-option KEY=VALUE``):

``smolvm``
    The ``smolvm`` binary (else ``$BOTTLE_SMOLVM``, else ``PATH``).
``smolvm_db``
    smolvm's state DB (else ``$BOTTLE_SMOLVM_DB``, else smolvm's default
    for this platform).
``allowlist_patch``
    ``on`` (default) or ``off``.  ``off`` exists to show the leak.
``source`` / ``image``
    What agents are made from when their spec names neither ``[agent]
    source`` nor ``image``: a packed ``.smolmachine`` (``--from``) or an
    image.  With neither, the test stand-in's agents come from an empty
    placeholder file in the state dir (its guests are namespaces), and a
    real smolvm refuses to start with a line naming these options.
``prober``
    The command, inside the guest, that runs bot-bottle's prober (a shell-
    style string).  The default, this Python running ``bottle/prober.py``
    from this checkout, works with the test stand-in, whose guests are host
    namespaces.  A real guest needs the prober in its image, e.g.
    ``prober=python3 -I -S /opt/bot-bottle/prober.py``.

Machine names are ``bb-<bottle id>``; :meth:`leftovers` lists machines so
named and :meth:`remove` stops and deletes one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from bottle.backends.base import (
    BackendConfig,
    Bottle,
    ExecResult,
    Requirement,
    bottle_from_lease,
    reject_unknown_options,
)
from bottle.bundle import (
    guard_alias,
    guard_leftovers,
    remove_host_bundle,
    start_host_bundle,
    stop_host_bundle,
)
from bottle.errors import (
    BackendUnavailable,
    BottleError,
    BottleStartError,
    BottleUsageError,
)
from bottle.listeners import ListenerHub
from bottle.pool import Lease
from bottle.smolvm import Smolvm, SmolvmCommandError, SmolvmUnusable, SmolvmVersion
from bottle.smolvm_db import SmolvmDb, resolve_db_path
from bottle.spec import AgentSpec, BottleSpec

log = logging.getLogger(__name__)

MACHINE_PREFIX = "bb-"
PROBER_PATH = Path(__file__).resolve().parent.parent / "prober.py"
DEFAULT_PROBER = shlex.join([sys.executable, "-I", "-S", str(PROBER_PATH)])

#: What an unrestricted (``null``) stored allowlist amounts to.
UNRESTRICTED = ["0.0.0.0/0", "::/0"]

PATCH_ON, PATCH_OFF = "on", "off"

OPTIONS = {
    "smolvm": "path of the smolvm binary (default: $BOTTLE_SMOLVM, then PATH)",
    "smolvm_db": (
        "smolvm's state DB (default: $BOTTLE_SMOLVM_DB, then smolvm's own "
        "location for this platform)"
    ),
    "allowlist_patch": (
        "on (default) or off: patch the allowlist into smolvm's DB between "
        "create and start"
    ),
    "prober": (
        "command that runs the prober inside the guest (default: this Python "
        "and bottle/prober.py, right for the test stand-in only)"
    ),
    "source": (
        "packed .smolmachine of agents whose spec names no [agent] source or "
        "image (machine create --from)"
    ),
    "image": "image of agents whose spec names no [agent] source or image",
}

#: What agents of the test stand-in are made from when nothing is named.
STANDIN_SOURCE = "stand-in-agent.smolmachine"

#: Facts recorded under ``bottle.facts["allowlist_patch"]``.
PATCH_APPLIED = "applied"
PATCH_NOT_NEEDED = "not needed"
PATCH_TURNED_OFF = "off"


def machine_name(bottle_id: str) -> str:
    """The smolvm machine of a bottle."""
    return f"{MACHINE_PREFIX}{bottle_id}"


class SmolmachinesBackend:
    """Bottles as smolvm machines with a TSI allowlist of the alias ``/32``."""

    name: ClassVar[str] = "smolmachines"

    def __init__(self, config: BackendConfig) -> None:
        reject_unknown_options(self.name, config.options, OPTIONS)
        self.config = config
        patch = config.options.get("allowlist_patch", PATCH_ON).strip().lower()
        if patch not in (PATCH_ON, PATCH_OFF):
            raise BottleUsageError(
                f"backend option allowlist_patch={patch!r}", "use on or off"
            )
        self.patch = patch == PATCH_ON
        self.prober = shlex.split(config.options.get("prober", DEFAULT_PROBER))
        if not self.prober:
            raise BottleUsageError("backend option prober", "is empty")
        self.db = SmolvmDb(resolve_db_path(config.options.get("smolvm_db")))
        self.source = config.options.get("source", "")
        self.image = config.options.get("image", "")
        if self.source and self.image:
            raise BottleUsageError(
                "backend options source and image", "give one of them, not both"
            )
        self._smolvm: Smolvm | None = None

    # -- what the host needs -------------------------------------------------

    @property
    def smolvm(self) -> Smolvm:
        """The verified smolvm driver; BackendUnavailable when there is none."""
        if self._smolvm is None:
            try:
                self._smolvm = Smolvm.locate(self.config.options.get("smolvm"))
            except SmolvmUnusable as exc:
                raise BackendUnavailable(self.name, str(exc)) from None
        return self._smolvm

    def requirements(self) -> list[Requirement]:
        binary = Requirement("smolvm binary", False, "")
        version = Requirement("smolvm version", False, "not checked: no binary")
        hypervisor = Requirement("hypervisor", False, "not checked: no smolvm")
        try:
            smolvm = Smolvm.locate(self.config.options.get("smolvm"))
        except SmolvmUnusable as exc:
            if exc.what == "binary":
                binary = Requirement("smolvm binary", False, _detail(exc))
            else:
                binary = Requirement("smolvm binary", True, exc.path)
                version = Requirement("smolvm version", False, _detail(exc))
            return [binary, version, hypervisor]
        self._smolvm = smolvm
        found = smolvm.version()
        binary = Requirement("smolvm binary", True, str(smolvm.path))
        version = Requirement("smolvm version", True, str(found))
        return [binary, version, hypervisor_requirement(found)]

    def check(self) -> None:
        # The first missing one: the others were "not checked" because of it.
        for requirement in self.requirements():
            if not requirement.present:
                raise BackendUnavailable(
                    self.name, f"{requirement.what}: {requirement.detail}"
                )

    def version(self) -> str:
        return f"smolvm {self.smolvm.version()}"

    # -- start and stop ------------------------------------------------------

    def start(self, spec: BottleSpec, lease: Lease, hub: ListenerHub) -> Bottle:
        bottle_id = lease.bottle_id
        machine = machine_name(bottle_id)
        allowlist = spec.effective_allowlist(lease.alias)
        source, image = self._agent_source(spec)
        ports = _published_ports(spec)
        smolvm = self.smolvm
        found = smolvm.version()
        handle: dict[str, Any] = {
            "machine": machine,
            "smolvm": str(smolvm.path),
            "smolvm_db": str(self.db.path),
            "service_pids": [],
        }
        bottle = Bottle(
            spec=spec,
            bottle_id=bottle_id,
            alias=lease.alias,
            allowlist=allowlist,
            backend=self.name,
            bundle_ports={},
            handle=handle,
            facts={"smolvm_version": str(found)},
        )
        try:
            self._start_bundle(bottle, hub, published=[host for host, _ in ports])
            smolvm.create(
                machine,
                source=source,
                image=image,
                net=True,
                allow_cidrs=allowlist,
                ports=ports,
                publish_address=lease.alias if ports else "",
            )
            bottle.facts.update(self._patch(machine, allowlist, found))
            smolvm.start(machine)
        except BaseException as exc:
            log.debug("start of %s failed, removing what it made", bottle_id)
            self.stop(bottle, hub)
            if isinstance(exc, BottleUsageError | BackendUnavailable):
                raise
            if isinstance(exc, Exception):
                raise BottleStartError(bottle_id, str(exc)) from exc
            raise
        return bottle

    def stop(self, bottle: Bottle, hub: ListenerHub | None) -> None:
        stop_host_bundle(bottle, hub)
        self.remove(bottle.bottle_id, bottle.handle)

    def remove(self, bottle_id: str, handle: Mapping[str, Any]) -> None:
        machine = str(handle.get("machine") or machine_name(bottle_id))
        smolvm = self._driver_for(handle)
        if smolvm is None:
            log.warning("no usable smolvm: machine %s may be left", machine)
            remove_host_bundle(bottle_id, handle)
            return
        # Each step may fail because an earlier start never got that far.
        for step in (smolvm.stop, smolvm.delete):
            try:
                step(machine)
            except SmolvmCommandError as exc:
                log.debug("%s", exc)
        remove_host_bundle(bottle_id, handle)

    def leftovers(self) -> set[str]:
        try:
            machines = self.smolvm.machines()
        except (BackendUnavailable, SmolvmCommandError) as exc:
            log.debug("cannot list smolvm machines: %s", exc)
            return set()
        return guard_leftovers() | {
            str(item["name"]).removeprefix(MACHINE_PREFIX)
            for item in machines
            if str(item.get("name", "")).startswith(MACHINE_PREFIX)
        }

    def host_side_addresses(self, bottle: Bottle) -> dict[str, str]:
        # Under TSI the guest's sockets are the host's own: there is no
        # gateway between them, so no host-side address to probe.
        return {}

    def agent_loopback(self, bottle: Bottle) -> str:
        # Under TSI a guest connect to 127.0.0.1 that nothing in the guest
        # answers goes to the host, and the stand-in's guests hand all of
        # 127.0.0.0/8 to the host; IPv6 loopback stays the guest's own in both.
        return "::1"

    def attach(self, lease: Lease) -> Bottle:
        return bottle_from_lease(lease, self.name, AgentSpec())

    # -- inside the bottle ---------------------------------------------------

    def exec(
        self, bottle: Bottle, argv: Sequence[str], *, timeout: float = 60.0
    ) -> ExecResult:
        smolvm = self._driver_for(bottle.handle) or self.smolvm
        output = smolvm.exec(_machine_of(bottle), argv, timeout=timeout)
        return ExecResult(list(argv), output.returncode, output.stdout, output.stderr)

    def prober_command(self, bottle: Bottle) -> list[str]:
        return list(self.prober)

    def effective_allowlist(self, bottle: Bottle) -> list[str]:
        db = SmolvmDb(Path(bottle.handle.get("smolvm_db") or self.db.path))
        stored = db.read_allowlist(_machine_of(bottle))
        if stored is None:
            log.warning(
                "smolvm machine %s has allowed_cidrs null: unrestricted egress",
                _machine_of(bottle),
            )
            return list(UNRESTRICTED)
        return stored

    # -- the pieces ------------------------------------------------------------

    def _agent_source(self, spec: BottleSpec) -> tuple[str, str]:
        """``(source, image)`` of the agent: the spec's, else the options'."""
        if spec.agent.source:
            return str(Path(spec.agent.source).expanduser()), ""
        if spec.agent.image:
            return "", spec.agent.image
        if self.source:
            return str(Path(self.source).expanduser()), ""
        if self.image:
            return "", self.image
        if self.smolvm.version().fake:
            # The stand-in's guests are namespaces: any packed file will do,
            # and `--from` is the path the allowlist bug lives on.
            placeholder = self.config.state_dir / "smolmachines" / STANDIN_SOURCE
            placeholder.parent.mkdir(parents=True, exist_ok=True)
            placeholder.touch()
            return str(placeholder), ""
        raise BottleUsageError(
            f"[agent] of bottle {spec.name!r}",
            "the smolmachines backend needs `source` (a packed .smolmachine) or "
            "`image` in the spec, or the backend option source=PATH or image=REF",
        )

    def _patch(
        self, machine: str, allowlist: list[str], found: SmolvmVersion
    ) -> dict[str, Any]:
        if not self.patch:
            facts: dict[str, Any] = {"allowlist_patch": PATCH_TURNED_OFF}
            with contextlib.suppress(BottleError):
                facts["stored_allowlist"] = self.db.read_allowlist(machine)
            log.warning(
                "allowlist patch turned off: machine %s keeps what smolvm %s "
                "stored (%s)",
                machine,
                found,
                facts.get("stored_allowlist", "unread"),
            )
            return facts
        result = self.db.ensure_allowlist(machine, allowlist)
        return {
            "allowlist_patch": PATCH_APPLIED if result.applied else PATCH_NOT_NEEDED,
            "stored_allowlist": result.before,
        }

    def _start_bundle(
        self, bottle: Bottle, hub: ListenerHub, published: list[int]
    ) -> None:
        start_host_bundle(bottle, hub)
        # The agent's own published ports answer on the alias too.
        guard_alias(bottle, extra_ports=published)
        bottle.handle["facts"] = bottle.facts

    def _driver_for(self, handle: Mapping[str, Any]) -> Smolvm | None:
        """The smolvm that made a bottle (from its handle), else this one's."""
        recorded = handle.get("smolvm")
        if recorded and (self._smolvm is None or str(self._smolvm.path) != recorded):
            try:
                return Smolvm.locate(str(recorded))
            except SmolvmUnusable:
                log.debug("recorded smolvm %s is gone", recorded)
        try:
            return self.smolvm
        except BackendUnavailable:
            return None


def hypervisor_requirement(
    version: SmolvmVersion,
    *,
    system: str | None = None,
    kvm: Path = Path("/dev/kvm"),
) -> Requirement:
    """Whether this host can run smolvm's microVMs (the stand-in needs none)."""
    if version.fake:
        return Requirement("hypervisor", True, "not needed: bot-bottle's stand-in")
    system = system or platform.system()
    if system == "Linux":
        if not kvm.exists():
            return Requirement("hypervisor", False, f"{kvm} is missing (enable KVM)")
        if not os.access(kvm, os.R_OK | os.W_OK):
            return Requirement(
                "hypervisor",
                False,
                f"{kvm} is not readable and writable by this user "
                "(add it to the kvm group)",
            )
        return Requirement("hypervisor", True, str(kvm))
    if system == "Darwin":
        support = subprocess.run(
            ["sysctl", "-n", "kern.hv_support"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if support != "1":
            return Requirement(
                "hypervisor",
                False,
                "Hypervisor.framework is not available "
                f"(kern.hv_support={support or 'unset'})",
            )
        return Requirement("hypervisor", True, "Hypervisor.framework")
    return Requirement(
        "hypervisor", False, f"smolvm runs on macOS and Linux, not {system}"
    )


def _detail(exc: SmolvmUnusable) -> str:
    """The problem without its ``smolvm binary: `` lead, which the line adds."""
    lead = f"smolvm {exc.what}: "
    if exc.what in ("binary", "version"):
        return exc.problem.removeprefix(lead)
    return exc.problem


def _machine_of(bottle: Bottle) -> str:
    return str(bottle.handle.get("machine") or machine_name(bottle.bottle_id))


def _published_ports(spec: BottleSpec) -> list[tuple[int, int]]:
    entries = spec.options.get("ports", [])
    if isinstance(entries, str) or not isinstance(entries, Sequence):
        raise BottleUsageError(
            f"options.ports of bottle {spec.name!r}", 'use a list like ["8080:80"]'
        )
    ports = []
    for entry in entries:
        host, _, guest = str(entry).partition(":")
        try:
            pair = (int(host), int(guest))
        except ValueError:
            raise BottleUsageError(
                f"options.ports entry {entry!r} of bottle {spec.name!r}",
                'use "HOST:GUEST" port numbers, e.g. "8080:80"',
            ) from None
        ports.append(pair)
    return ports
