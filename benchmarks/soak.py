"""Start, probe and stop netns bottles many times; nothing may leak.

    .venv/bin/python benchmarks/soak.py [--cycles 200]

After every cycle it checks that no namespace, nftables table, lease or open
file descriptor is left over, and stops at the first leak with its cycle.
Nothing leaves the host: the probes target the bottle's own bundle and a
sentinel on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bottle import AliasPool, AliasRange, BottleSpec, Launcher
from bottle.backends import BackendConfig, load_backend
from bottle.probe import Outcome, Target, TargetKind, run_probes

POOL = "127.0.0.112-127.0.0.119"


class Leak(Exception):
    """Something a cycle created outlived it."""


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def names_of(run: str) -> list[str]:
    listing = (
        subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
        + subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True, check=True
        ).stdout
    )
    return [line for line in listing.splitlines() if run in line]


def soak(cycles: int, state_dir: Path) -> dict[str, float]:
    """Run ``cycles`` start/probe/stop cycles; raise :class:`Leak` on a leak."""
    backend = load_backend("netns", BackendConfig(state_dir))
    pool = AliasPool(AliasRange.parse(POOL), state_dir)
    launcher = Launcher(backend, pool)
    sentinel = launcher.hub.listen("127.0.0.1", 0, label="soak sentinel")
    descriptors = open_descriptors()
    started = time.perf_counter()
    try:
        for cycle in range(1, cycles + 1):
            bottle = launcher.start(BottleSpec("soak"))
            targets = [
                Target(
                    "own",
                    TargetKind.OWN_BUNDLE,
                    bottle.alias,
                    bottle.bundle_ports["echo"],
                    must_reach=True,
                ),
                Target("sentinel", TargetKind.SENTINEL, "127.0.0.1", sentinel.port),
            ]
            own, blocked = run_probes(backend, bottle, targets)
            launcher.stop(bottle)
            if (
                own.outcome is not Outcome.CONNECTED
                or blocked.outcome is Outcome.CONNECTED
            ):
                raise Leak(
                    f"cycle {cycle}: probes saw {own.outcome}, {blocked.outcome}"
                )
            left = names_of(launcher.run)
            if left:
                raise Leak(f"cycle {cycle}: left {left}")
            if pool.leases():
                raise Leak(f"cycle {cycle}: left leases {pool.leases()}")
            if open_descriptors() > descriptors:
                raise Leak(
                    f"cycle {cycle}: {open_descriptors() - descriptors} more open "
                    "file descriptors than before the first cycle"
                )
    finally:
        launcher.stop_all()
    elapsed = time.perf_counter() - started
    return {
        "cycles": cycles,
        "seconds": elapsed,
        "per_cycle_ms": elapsed / cycles * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bottle-soak.") as state:
        try:
            figures = soak(args.cycles, Path(state))
        except Leak as leak:
            print(f"soak: LEAK: {leak}")
            return 1
    print(
        f"soak: {figures['cycles']:.0f} cycles in {figures['seconds']:.1f} s "
        f"({figures['per_cycle_ms']:.0f} ms each); nothing leaked"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
