"""Start and stop bottles on one backend, with leases and a reaper.

The :class:`Launcher` ties a backend to the alias pool: it leases an alias,
asks the backend to start the bottle there, records the backend's handle in
the lease (so ``bottle exec`` and ``bottle down`` find the bottle from another
process), and gives the alias back when the bottle stops.  Its reaper removes
what crashed runs left behind.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import secrets
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from bottle.backends import Backend, Bottle
from bottle.errors import BottleError
from bottle.listeners import ListenerHub
from bottle.pool import AliasPool, Lease, Owner
from bottle.runs import RunRegistry, run_of
from bottle.spec import BottleSpec

log = logging.getLogger(__name__)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then deliver them.

    A teardown cut short half-way can leave a namespace whose rules are
    already gone: an unfiltered bottle.  Stopping takes milliseconds per
    bottle, so the user's Ctrl-C waits for it and then acts as usual.
    Only the main thread can handle signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d received: finishing the teardown first", signum)
        received.append(signum)

    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, hold) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])


def new_run_label() -> str:
    """A short random label that names everything one run creates."""
    return secrets.token_hex(3)


class Launcher:
    """Starts bottles of one backend for one run of this process."""

    def __init__(
        self,
        backend: Backend,
        pool: AliasPool,
        *,
        run: str | None = None,
        hub: ListenerHub | None = None,
        owner: Owner | None = None,
        pool_wait_seconds: float = 0.0,
        registry: RunRegistry | None = None,
        owner_kind: str = "process",
    ) -> None:
        self.backend = backend
        self.pool = pool
        self.run = run or new_run_label()
        self.registry = registry or RunRegistry()
        #: Recorded with each lease: ``bottle down`` signals only keepers.
        self.owner_kind = owner_kind
        self.hub = hub or ListenerHub()
        self._owns_hub = hub is None
        self.owner = owner or Owner.current()
        self.pool_wait_seconds = pool_wait_seconds
        self.bottles: dict[str, Bottle] = {}
        # Registered before anything is created, so that whatever this run
        # leaves if it is killed can be traced to a dead owner.
        self.registry.register(self.run, self.owner)

    def bottle_id(self, name: str) -> str:
        return f"{self.run}-{name}"

    def start(self, spec: BottleSpec) -> Bottle:
        """Lease an alias and start ``spec``; nothing survives a failure."""
        bottle_id = self.bottle_id(spec.name)
        lease = self.pool.acquire(
            bottle_id,
            owner=self.owner,
            backend=self.backend.name,
            run=self.run,
            reclaim=self._remove_leftovers_of,
            wait_seconds=self.pool_wait_seconds,
        )
        try:
            bottle = self.backend.start(spec, lease, self.hub)
        except BaseException:
            self.pool.release(bottle_id)
            raise
        bottle.handle["owner_kind"] = self.owner_kind
        try:
            self.pool.update(bottle_id, handle=bottle.handle)
        except BaseException:
            self.backend.stop(bottle, self.hub)
            self.pool.release(bottle_id)
            raise
        self.bottles[bottle_id] = bottle
        log.info("started bottle %s on %s (%s)", bottle_id, lease.alias, spec.name)
        return bottle

    def start_many(self, specs: Sequence[BottleSpec]) -> list[Bottle]:
        """Start several bottles at once; if one fails, stop the others."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
            futures = [executor.submit(self.start, spec) for spec in specs]
            concurrent.futures.wait(futures)
        failures = [f.exception() for f in futures if f.exception() is not None]
        if failures:
            for future in futures:
                if future.exception() is None:
                    self.stop(future.result())
            first = failures[0]
            assert first is not None
            raise first
        return [future.result() for future in futures]

    def stop(self, bottle: Bottle) -> None:
        """Stop a bottle this launcher started and give its alias back.

        The alias is given back only once the backend has removed everything:
        a bottle whose removal failed keeps its lease, so that the reaper
        finishes the job once this process is gone.
        """
        with interrupts_deferred():
            self.backend.stop(bottle, self.hub)
            self.pool.release(bottle.bottle_id)
            self.bottles.pop(bottle.bottle_id, None)
        log.info("stopped bottle %s", bottle.bottle_id)

    def stop_all(self) -> None:
        """Stop every bottle this launcher started, even if some fail.

        The run leaves the host-wide registry only when nothing of it is
        left; otherwise the reaper needs the record to find the leftovers.
        """
        errors: list[BaseException] = []
        with interrupts_deferred():
            bottles = list(self.bottles.values())
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
                for future in [executor.submit(self.stop, b) for b in bottles]:
                    error = future.exception()
                    if error is not None:
                        errors.append(error)
            if self._owns_hub:
                self.hub.shutdown()
            if not errors and not self.bottles:
                self.registry.unregister(self.run)
        if errors:
            raise errors[0]

    def _remove_leftovers_of(self, lease: Lease) -> None:
        if lease.backend == self.backend.name:
            self.backend.remove(lease.bottle_id, lease.handle)


def reap(
    backend: Backend, pool: AliasPool, registry: RunRegistry | None = None
) -> list[str]:
    """Remove what dead runs left on ``backend``; returns the bottle ids.

    A lease in ``pool`` whose owner is dead has its resources removed, then
    is dropped.  Resources with no lease in ``pool`` are removed only when the
    host-wide run registry says their run's owner is dead: their lease may
    live in another state directory, held by a live process.  Both happen
    under the pool's lock, so a bottle that another process is starting right
    now, whose lease is always taken first, is never touched.
    """
    registry = registry or RunRegistry()
    removed: list[str] = []
    with pool.locked() as leases:
        for alias, lease in list(leases.items()):
            if lease.backend != backend.name or lease.owner.is_alive():
                continue
            try:
                backend.remove(lease.bottle_id, lease.handle)
            except BottleError:
                log.exception("could not remove %s", lease.bottle_id)
                continue
            del leases[alias]
            removed.append(lease.bottle_id)
        leased = {lease.bottle_id for lease in leases.values()}
        for bottle_id in sorted(backend.leftovers() - leased):
            if registry.owner_is_dead(run_of(bottle_id)):
                backend.remove(bottle_id, {})
                removed.append(bottle_id)
    if removed:
        log.info("reaped %d leftover bottle(s): %s", len(removed), ", ".join(removed))
    return removed
