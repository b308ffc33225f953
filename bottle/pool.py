"""Loopback alias leases shared by every process on the host.

Each live bottle leases one loopback alias (by default ``127.0.0.16`` ..
``127.0.0.31``).  Leases live in a JSON file in a state directory guarded by a
file lock, so pytest-xdist workers, two terminals and detached ``bottle up``
keepers all see the same leases.  A lease names its owner by pid *and* process
start time: a dead owner's lease is reclaimed on the next acquire even when its
pid has been reused by an unrelated process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import filelock
import psutil

from bottle import loopback
from bottle.errors import BottleUsageError, LeaseStoreError, PoolExhausted

log = logging.getLogger(__name__)

DEFAULT_POOL = "127.0.0.16-127.0.0.31"
LOOPBACK_NET = ipaddress.IPv4Network("127.0.0.0/8")
LOCALHOST = ipaddress.IPv4Address("127.0.0.1")
#: The loopback broadcast address: a TCP connect to it fails (ENETUNREACH on
#: Linux), so a bottle leasing it could not reach its own bundle.
LOOPBACK_BROADCAST = ipaddress.IPv4Address("127.255.255.255")

#: How long a process waits for another one to finish with the lease file.
LOCK_TIMEOUT_SECONDS = 30.0

#: How often a process waiting for another one's file lock tries again.
_LOCK_POLL_SECONDS = 0.005

_THREAD_LOCKS: dict[str, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def _thread_lock_for(path: str) -> threading.RLock:
    with _THREAD_LOCKS_GUARD:
        return _THREAD_LOCKS.setdefault(path, threading.RLock())


#: Process start times are compared to this many decimals (psutil's
#: ``create_time`` is derived from clock ticks and is stable to 10 ms).
_START_TIME_DECIMALS = 2


@dataclasses.dataclass(frozen=True)
class AliasRange:
    """An inclusive range of loopback addresses that bottles may lease."""

    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    @classmethod
    def parse(cls, text: str) -> AliasRange:
        """Read ``127.0.0.16/28`` or ``127.0.0.16-127.0.0.31``.

        Raises :class:`BottleUsageError` for a range that is empty, leaves
        ``127.0.0.0/8`` or contains ``127.0.0.1`` or ``127.255.255.255``.
        """
        what = f"alias pool {text!r}"
        valid = (
            "a CIDR or first-last range inside 127.0.0.0/8 without 127.0.0.1 "
            "or 127.255.255.255"
        )
        try:
            if "/" in text:
                network = ipaddress.IPv4Network(text.strip(), strict=False)
                first, last = network[0], network[-1]
            elif "-" in text:
                first_text, last_text = text.split("-", 1)
                first = ipaddress.IPv4Address(first_text.strip())
                last = ipaddress.IPv4Address(last_text.strip())
            else:
                first = last = ipaddress.IPv4Address(text.strip())
        except ValueError as exc:
            raise BottleUsageError(
                what, f"not an address range ({exc}); {valid}"
            ) from None

        if first > last:
            raise BottleUsageError(what, f"the range is empty; {valid}")
        if first not in LOOPBACK_NET or last not in LOOPBACK_NET:
            raise BottleUsageError(what, f"leaves 127.0.0.0/8; {valid}")
        if first <= LOCALHOST <= last:
            raise BottleUsageError(what, f"contains 127.0.0.1; {valid}")
        if last == LOOPBACK_BROADCAST:
            raise BottleUsageError(
                what, f"contains the broadcast address 127.255.255.255; {valid}"
            )
        return cls(first, last)

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    def __contains__(self, address: object) -> bool:
        try:
            candidate = ipaddress.IPv4Address(str(address))
        except ValueError:
            return False
        return self.first <= candidate <= self.last

    def __len__(self) -> int:
        return int(self.last) - int(self.first) + 1

    def addresses(self) -> Iterator[ipaddress.IPv4Address]:
        """Every address of the range, lowest first."""
        for value in range(int(self.first), int(self.last) + 1):
            yield ipaddress.IPv4Address(value)


def pool_from_environment(explicit: str | None = None) -> AliasRange:
    """The pool named explicitly, else by ``BOTTLE_POOL``, else the default."""
    return AliasRange.parse(explicit or os.environ.get("BOTTLE_POOL") or DEFAULT_POOL)


@dataclasses.dataclass(frozen=True)
class Owner:
    """A process identified by pid and start time, so a reused pid differs."""

    pid: int
    started: float

    @classmethod
    def of_pid(cls, pid: int) -> Owner:
        started = psutil.Process(pid).create_time()
        return cls(pid, round(started, _START_TIME_DECIMALS))

    @classmethod
    def current(cls) -> Owner:
        return cls.of_pid(os.getpid())

    def is_alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            started = round(process.create_time(), _START_TIME_DECIMALS)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return started == self.started

    def __str__(self) -> str:
        return f"pid {self.pid}"


@dataclasses.dataclass(frozen=True)
class Lease:
    """One alias leased to one bottle.

    ``handle`` holds what the bottle's backend needs to find the bottle's
    resources again from another process (``bottle exec``, ``bottle down``,
    the reaper).
    """

    alias: str
    bottle_id: str
    owner: Owner
    taken_at: float
    backend: str = ""
    run: str = ""
    handle: dict[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.alias} by bottle {self.bottle_id} ({self.owner})"

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["owner"] = {"pid": self.owner.pid, "started": self.owner.started}
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Lease:
        owner = Owner(int(record["owner"]["pid"]), float(record["owner"]["started"]))
        return cls(
            alias=str(record["alias"]),
            bottle_id=str(record["bottle_id"]),
            owner=owner,
            taken_at=float(record["taken_at"]),
            backend=str(record.get("backend", "")),
            run=str(record.get("run", "")),
            handle=dict(record.get("handle") or {}),
        )


def default_state_dir() -> Path:
    """``$BOTTLE_STATE_DIR``, else ``$XDG_STATE_HOME/bot-bottle``."""
    explicit = os.environ.get("BOTTLE_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "bot-bottle"


#: Called under the lock for each lease of a dead owner before it is dropped;
#: it removes what the dead bottle left.  Raising keeps the lease in place.
Reclaimer = Callable[[Lease], None]


class AliasPool:
    """Leases of one alias range, kept in ``state_dir/leases.json``."""

    def __init__(
        self,
        alias_range: AliasRange | None = None,
        state_dir: Path | None = None,
        *,
        alias_is_configured: Callable[[str], bool] = loopback.alias_is_configured,
    ) -> None:
        self.range = alias_range or pool_from_environment()
        self.state_dir = Path(state_dir or default_state_dir())
        self.path = self.state_dir / "leases.json"
        self._lock = filelock.FileLock(
            str(self.state_dir / "leases.lock"), timeout=LOCK_TIMEOUT_SECONDS
        )
        self._alias_is_configured = alias_is_configured

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict[str, Lease]]:
        """Hold the lock and yield the leases by alias; changes are saved."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            # Threads of this process queue on a plain lock first, so the file
            # lock is only contended between processes.
            with (
                _thread_lock_for(self._lock.lock_file),
                self._lock.acquire(poll_interval=_LOCK_POLL_SECONDS),
            ):
                leases = self._read()
                before = dict(leases)
                yield leases
                if leases != before:
                    self._write(leases)
        except filelock.Timeout as exc:
            raise LeaseStoreError(
                str(self.path),
                f"its lock {self._lock.lock_file} was held for over "
                f"{LOCK_TIMEOUT_SECONDS:.0f} s by another process",
            ) from exc

    def leases(self) -> list[Lease]:
        """Every lease in the store, live or not, ordered by alias."""
        with self.locked() as leases:
            return _sorted(leases.values())

    def acquire(
        self,
        bottle_id: str,
        *,
        owner: Owner | None = None,
        backend: str = "",
        run: str = "",
        reclaim: Reclaimer | None = None,
        wait_seconds: float = 0.0,
    ) -> Lease:
        """Lease the lowest free alias to ``bottle_id``.

        Leases of dead owners are reclaimed first.  When every alias is held by
        a live owner, waits up to ``wait_seconds`` for one to be released, then
        raises :class:`PoolExhausted` listing the holders.
        """
        owner = owner or Owner.current()
        deadline = time.monotonic() + wait_seconds
        while True:
            with self.locked() as leases:
                if any(lease.bottle_id == bottle_id for lease in leases.values()):
                    raise BottleUsageError(
                        f"bottle id {bottle_id!r}", "already holds a lease"
                    )
                self._reclaim_dead(leases, reclaim)
                alias = self._first_free(leases)
                if alias is not None:
                    lease = Lease(
                        alias, bottle_id, owner, time.time(), backend, run, {}
                    )
                    leases[alias] = lease
                    log.debug("leased %s to %s", alias, bottle_id)
                    return lease
                holders = [lease.describe() for lease in _sorted(leases.values())]
            if time.monotonic() >= deadline:
                raise PoolExhausted(str(self.range), holders)
            time.sleep(0.05)

    def release(self, bottle_id: str) -> Lease | None:
        """Drop the lease of ``bottle_id``; returns it, or None if none."""
        with self.locked() as leases:
            for alias, lease in list(leases.items()):
                if lease.bottle_id == bottle_id:
                    del leases[alias]
                    log.debug("released %s from %s", alias, bottle_id)
                    return lease
        return None

    def update(
        self,
        bottle_id: str,
        *,
        owner: Owner | None = None,
        handle: dict[str, Any] | None = None,
    ) -> Lease:
        """Change a lease's owner or backend handle, keeping the alias."""
        with self.locked() as leases:
            for alias, lease in leases.items():
                if lease.bottle_id == bottle_id:
                    changes: dict[str, Any] = {}
                    if owner is not None:
                        changes["owner"] = owner
                    if handle is not None:
                        changes["handle"] = handle
                    leases[alias] = dataclasses.replace(lease, **changes)
                    return leases[alias]
        raise LeaseStoreError(str(self.path), f"no lease for bottle {bottle_id!r}")

    def reclaim(self, reclaim: Reclaimer | None = None) -> list[Lease]:
        """Drop the leases of dead owners now; returns what was dropped."""
        with self.locked() as leases:
            return self._reclaim_dead(leases, reclaim)

    def _reclaim_dead(
        self, leases: dict[str, Lease], reclaim: Reclaimer | None
    ) -> list[Lease]:
        dropped = []
        for alias, lease in list(leases.items()):
            if lease.owner.is_alive():
                continue
            if reclaim is not None:
                try:
                    reclaim(lease)
                except Exception:
                    log.exception("could not clean up after %s", lease.describe())
                    continue
            log.info("reclaimed %s from dead owner", lease.describe())
            del leases[alias]
            dropped.append(lease)
        return dropped

    def _first_free(self, leases: dict[str, Lease]) -> str | None:
        for address in self.range.addresses():
            alias = str(address)
            if alias in leases:
                continue
            if not self._alias_is_configured(alias):
                raise BottleUsageError(
                    f"alias {alias}",
                    "is not configured on the loopback interface; run "
                    "`bottle setup` once to add the pool's aliases",
                )
            return alias
        return None

    def _read(self) -> dict[str, Lease]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        kept = (
            "it is kept as it is, since live bottles may hold aliases: check "
            "them, then remove the file"
        )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LeaseStoreError(
                str(self.path), f"is not UTF-8 text ({exc}); {kept}"
            ) from exc
        if not text.strip():
            raise LeaseStoreError(
                str(self.path),
                "is empty (a write was cut short?); it is kept as it is, since "
                "live bottles may hold aliases: check `ip netns list` and "
                "`docker ps`, then remove the file",
            )
        try:
            records = json.loads(text)
            if not isinstance(records, list):
                raise TypeError("the top level is not a list")
            leases = [Lease.from_json(record) for record in records]
            for lease in leases:
                ipaddress.IPv4Address(lease.alias)
        except (ValueError, TypeError, KeyError) as exc:
            raise LeaseStoreError(
                str(self.path), f"cannot be read ({exc}); {kept}"
            ) from exc

        # A duplicate would be dropped silently by the next write; two bottles
        # sharing an alias is exactly what the store exists to prevent.
        by_alias = {lease.alias: lease for lease in leases}
        bottle_ids = {lease.bottle_id for lease in leases}
        if len(by_alias) != len(leases) or len(bottle_ids) != len(leases):
            raise LeaseStoreError(
                str(self.path), f"leases the same alias or bottle twice; {kept}"
            )
        return by_alias

    def _write(self, leases: dict[str, Lease]) -> None:
        records = [lease.to_json() for lease in _sorted(leases.values())]
        descriptor, temporary = tempfile.mkstemp(
            dir=self.state_dir, prefix=".leases.", suffix=".tmp"
        )
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
                json.dump(records, stream, indent=1)
            # Atomic replacement is what readers rely on.  No fsync: a lease
            # names a live process, and none survives the power loss that
            # fsync would guard against.
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


def _sorted(leases: Any) -> list[Lease]:
    return sorted(leases, key=lambda lease: ipaddress.IPv4Address(lease.alias))
