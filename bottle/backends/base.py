"""The one protocol every backend implements, and the bottle it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from bottle.errors import BottleUsageError, CommandFailed
from bottle.listeners import Listener, ListenerHub
from bottle.pool import Lease
from bottle.spec import ALIAS_ENTRY, AgentSpec, BottleSpec, BundleService

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BackendConfig:
    """What every backend is given when it is made.

    ``options`` are backend-specific ``KEY=VALUE`` settings from the command
    line or ini file (``--bottle-backend-option``); each backend documents its
    own and rejects unknown keys.
    """

    state_dir: Path
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Requirement:
    """One thing a backend needs on this host, and whether it is there."""

    what: str
    present: bool
    detail: str = ""


class NonceWitness(Protocol):
    """The far side of a target: it can tell whether a probe's nonce arrived."""

    def saw_nonce(self, nonce: str) -> bool: ...

    def refresh(self) -> None:
        """Take in everything logged so far; called once after a round of
        probes, so that judging many cells reads the far side once."""
        ...


@dataclasses.dataclass
class Bottle:
    """A started bottle: where its bundle listens and how to reach its agent."""

    spec: BottleSpec
    bottle_id: str
    alias: str
    allowlist: list[str]
    backend: str
    bundle_ports: dict[str, int]
    handle: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Where the agent dials its bundle (the alias unless the backend puts the
    #: bundle elsewhere, e.g. a container address on the bottle's network).
    bundle_host: str = ""
    #: Listeners this process serves for the bundle (echo services).
    bundle_listeners: dict[str, Listener] = dataclasses.field(default_factory=dict)
    #: The far-side evidence for each bundle service, by service name.
    bundle_witnesses: dict[str, NonceWitness] = dataclasses.field(default_factory=dict)
    #: Backend facts worth reporting, e.g. whether a workaround was applied.
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.bundle_host:
            self.bundle_host = self.alias

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What a command run inside a bottle returned."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


@runtime_checkable
class Backend(Protocol):
    """A way to run bottles.  One module per backend implements this."""

    #: The name users pass to ``--bottle-backend``.
    name: ClassVar[str]

    def requirements(self) -> list[Requirement]:
        """What this backend needs here and whether each is present."""
        ...

    def check(self) -> None:
        """Raise :class:`BackendUnavailable` naming what is missing."""
        ...

    def version(self) -> str:
        """The version of the runtime under the backend (kernel, engine...)."""
        ...

    def start(self, spec: BottleSpec, lease: Lease, hub: ListenerHub) -> Bottle:
        """Start a bottle on the leased alias.

        On failure, remove everything created so far before raising.
        """
        ...

    def stop(self, bottle: Bottle, hub: ListenerHub | None) -> None:
        """Remove everything the bottle created."""
        ...

    def remove(self, bottle_id: str, handle: Mapping[str, Any]) -> None:
        """Remove what a bottle left, from its id and recorded handle.

        The reaper calls this for bottles of dead owners, where ``handle`` may
        be empty (a start cut short), so resource names derive from the id.
        """
        ...

    def leftovers(self) -> set[str]:
        """Ids of bottles that still have resources of this backend here."""
        ...

    def exec(
        self,
        bottle: Bottle,
        argv: Sequence[str],
        *,
        timeout: float = 60.0,
    ) -> ExecResult:
        """Run ``argv`` as the agent, inside the bottle."""
        ...

    def prober_command(self, bottle: Bottle) -> list[str]:
        """The command, inside the bottle, that runs the prober."""
        ...

    def effective_allowlist(self, bottle: Bottle) -> list[str]:
        """The allowlist as the enforcing layer holds it, read back."""
        ...

    def host_side_addresses(self, bottle: Bottle) -> dict[str, str]:
        """Addresses at which the bottle sees the host (gateways), by label.

        The suite probes a sentinel bound on every host interface at each of
        them: container networks have let bottles reach host services there.
        """
        ...

    def agent_loopback(self, bottle: Bottle) -> str:
        """The loopback address the agent has to itself inside the bottle.

        Two agents listening on one port there must each reach their own.
        """
        ...

    def attach(self, lease: Lease) -> Bottle:
        """Rebuild a bottle handle from its lease (another process's bottle)."""
        ...


def bottle_from_lease(lease: Lease, backend: str, agent: AgentSpec) -> Bottle:
    """Rebuild a bottle of a host-served bundle from what its lease recorded."""
    handle = dict(lease.handle)
    ports = {str(k): int(v) for k, v in handle.get("bundle_ports", {}).items()}
    spec = BottleSpec(
        name=lease.bottle_id.split("-", 1)[-1],
        bundle=tuple(BundleService(name, port) for name, port in ports.items()),
        allowlist=tuple(handle.get("allowlist", [ALIAS_ENTRY])),
        agent=agent,
        backend=backend,
    )
    return Bottle(
        spec=spec,
        bottle_id=lease.bottle_id,
        alias=lease.alias,
        allowlist=list(handle.get("allowlist_cidrs", [])),
        backend=backend,
        bundle_ports=ports,
        handle=handle,
        facts=dict(handle.get("facts", {})),
    )


def run_host_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host command, logging it; raise :class:`CommandFailed` if asked."""
    log.debug("running %s", " ".join(argv))
    try:
        completed = subprocess.run(
            list(argv),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, 124, f"timed out after {timeout} s") from exc
    if check and completed.returncode != 0:
        raise CommandFailed(argv, completed.returncode, completed.stderr)
    return completed


def bottles_with_nft_tables(prefix: str) -> set[str]:
    """Bottle ids of the ``inet`` tables named ``<prefix><id>`` on this host
    (dashes of the id spelled as underscores); none where ``nft`` is missing."""
    if shutil.which("nft") is None:
        return set()
    listing = run_host_command(["nft", "-j", "list", "tables"], check=False)
    found = set()
    with contextlib.suppress(ValueError):
        for item in json.loads(listing.stdout or "{}").get("nftables", []):
            table = item.get("table", {})
            name = str(table.get("name", ""))
            if table.get("family") == "inet" and name.startswith(prefix):
                found.add(name.removeprefix(prefix).replace("_", "-"))
    return found


def delete_nft_tables(tables: Iterable[str], family: str = "inet") -> None:
    """Delete these nftables tables, those that exist, in one transaction.

    Removing a table with base chains waits for the kernel to quiesce (tens
    of milliseconds), once per transaction: a bottle's tables go together.
    Adding a table that exists changes nothing, so ``add`` then ``delete``
    removes it whether or not it was there.
    """
    names = list(tables)
    if not names:
        return
    batch = "".join(
        f"add table {family} {table}\ndelete table {family} {table}\n"
        for table in names
    )
    completed = run_host_command(["nft", "-f", "-"], check=False, input_text=batch)
    if completed.returncode != 0:
        log.warning(
            "nft could not delete tables %s: %s", names, completed.stderr.strip()
        )


def reject_unknown_options(
    backend: str, options: Mapping[str, str], known: Mapping[str, str]
) -> None:
    """Refuse backend options this backend does not know, listing the valid."""
    for key in options:
        if key not in known:
            valid = ", ".join(f"{name} ({meaning})" for name, meaning in known.items())
            raise BottleUsageError(
                f"backend option {key!r}",
                f"unknown to backend {backend!r}; valid: {valid or 'none'}",
            )
