"""The process that keeps a ``bottle up`` bottle alive.

``bottle up`` returns as soon as the bottle runs, but the bottle's bundle
listeners and its lease need a live owner.  This detached process is that
owner: it starts the bottle, reports the result on a pipe to ``bottle up``,
then waits for SIGTERM (``bottle down``) and stops the bottle.  If it dies
without stopping it, its lease has a dead owner and the next reaper cleans up.

Run as ``python -m bottle.keeper REQUEST.json STATUS_FD``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bottle.backends import BackendConfig, load_backend
from bottle.errors import BottleError, BottleUsageError
from bottle.launcher import Launcher, new_run_label
from bottle.pool import AliasPool, AliasRange
from bottle.spec import spec_from_mapping

log = logging.getLogger("bottle.keeper")

#: The owner kind a keeper records with its lease; ``bottle down`` signals
#: only owners of this kind, never a pytest session that holds bottles.
KEEPER_OWNER_KIND = "keeper"


def keep(request: dict[str, Any], status_fd: int) -> int:
    """Start the requested bottle, report on ``status_fd``, wait, stop it."""
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop_requested.set())

    pool = AliasPool(AliasRange.parse(request["pool"]), Path(request["state_dir"]))
    backend = load_backend(
        request["backend"], BackendConfig(pool.state_dir, request["options"])
    )
    spec = spec_from_mapping(request["spec"])
    try:
        backend.check()
        # No host-wide reap here: it would take bottles of other lease stores
        # (another BOTTLE_STATE_DIR) for leftovers.  Dead owners' bottles of
        # this store are removed when the launcher acquires its lease.
        launcher = Launcher(
            backend, pool, run=new_run_label(), owner_kind=KEEPER_OWNER_KIND
        )
        bottle = launcher.start(spec)
    except BottleError as exc:
        _report(status_fd, {"ok": False, "error": str(exc), "usage": _is_usage(exc)})
        return 1
    _report(
        status_fd,
        {
            "ok": True,
            "id": bottle.bottle_id,
            "alias": bottle.alias,
            "ports": bottle.bundle_ports,
            "allowlist": bottle.allowlist,
        },
    )
    stop_requested.wait()
    log.info("stopping %s", bottle.bottle_id)
    launcher.stop_all()
    return 0


def _is_usage(exc: BottleError) -> bool:
    return isinstance(exc, BottleUsageError)


def _report(status_fd: int, message: dict[str, Any]) -> None:
    with os.fdopen(status_fd, "w", encoding="utf-8") as stream:
        json.dump(message, stream)


def main(argv: list[str]) -> int:
    request_path, status_fd = Path(argv[0]), int(argv[1])
    request = json.loads(request_path.read_text(encoding="utf-8"))
    request_path.unlink()
    logging.basicConfig(
        filename=request["log_file"],
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return keep(request, status_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
