"""Which process owns each run label, for every process on the host.

Everything a run creates is named after its run label.  Leases say who owns a
bottle, but leases live in a state directory that each user, test or tool may
choose; the run registry lives in one host-wide runtime directory
(``/run/bot-bottle`` for root), so a reaper can tell a dead run's leftovers
from a live run that keeps its leases elsewhere.  A leftover whose run is
registered to a dead owner is removed; one whose run is unknown is left
alone, since it may belong to a run this host cannot account for.

The runtime directory is a tmpfs cleared at boot, like the namespaces and
nftables tables it accounts for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from bottle.pool import Owner

log = logging.getLogger(__name__)


def default_runtime_dir() -> Path:
    """``$BOTTLE_RUNTIME_DIR``, else ``/run/bot-bottle`` (root) or XDG's."""
    explicit = os.environ.get("BOTTLE_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/run/bot-bottle")
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/bot-bottle-{os.geteuid()}"
    return Path(xdg) / "bot-bottle"


class RunRegistry:
    """``<runtime dir>/runs/<label>.json`` holds the owner of each live run."""

    def __init__(self, runtime_dir: Path | None = None) -> None:
        self.directory = (runtime_dir or default_runtime_dir()) / "runs"

    def register(self, run: str, owner: Owner) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"pid": owner.pid, "started": owner.started}
        temporary = self.directory / f".{run}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(record), encoding="utf-8")
        os.replace(temporary, self.directory / f"{run}.json")

    def unregister(self, run: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.directory / f"{run}.json").unlink()

    def owner_is_dead(self, run: str) -> bool:
        """True only when ``run`` is registered to an owner that is dead."""
        try:
            record = json.loads((self.directory / f"{run}.json").read_text("utf-8"))
            owner = Owner(int(record["pid"]), float(record["started"]))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("run record of %s is unreadable; treating the run as dead", run)
            return True
        return not owner.is_alive()

    def forget_dead(self) -> None:
        """Drop the records of dead runs (after their leftovers were reaped)."""
        for record in self.directory.glob("*.json"):
            if self.owner_is_dead(record.stem):
                with contextlib.suppress(FileNotFoundError):
                    record.unlink()


def run_of(bottle_id: str) -> str:
    """The run label a bottle id starts with (``<run>-<name>``)."""
    return bottle_id.split("-", 1)[0]
