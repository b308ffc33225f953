"""Targets, outcome classes, and running the prober inside a bottle."""

from __future__ import annotations

import dataclasses
import enum
import logging
import secrets
from collections.abc import Sequence

from bottle.backends import Backend, Bottle
from bottle.errors import BottleError

log = logging.getLogger(__name__)

#: How long one probe waits for an answer before calling it TIMEOUT.
DEFAULT_PROBE_TIMEOUT_SECONDS = 1.5


class Outcome(enum.StrEnum):
    """What the prober saw (see DESIGN's table of outcome classes)."""

    CONNECTED = "CONNECTED"
    DENIED = "DENIED"
    REFUSED = "REFUSED"
    UNREACHABLE = "UNREACHABLE"
    TIMEOUT = "TIMEOUT"
    #: The bottle has no such address family or address (e.g. no IPv6): the
    #: target cannot be reached, and the cell says why instead of passing
    #: as an ordinary block.
    UNSUPPORTED = "UNSUPPORTED"
    ERROR = "ERROR"
    INCONCLUSIVE = "INCONCLUSIVE"


#: Every outcome that counts as "the connection did not happen".
BLOCKED_OUTCOMES = frozenset(
    {
        Outcome.DENIED,
        Outcome.REFUSED,
        Outcome.UNREACHABLE,
        Outcome.TIMEOUT,
        Outcome.UNSUPPORTED,
    }
)


class TargetKind(enum.StrEnum):
    OWN_BUNDLE = "own-bundle"
    BUNDLE = "bundle"
    SENTINEL = "sentinel"
    EGRESS = "egress"
    OWN_LOOPBACK = "own-loopback"


@dataclasses.dataclass(frozen=True)
class Target:
    """One address a bottle's prober dials, and whether it should get through.

    ``key`` names the column of the matrix, the same for every bottle.
    """

    key: str
    kind: TargetKind
    host: str
    port: int
    proto: str = "tcp"
    must_reach: bool = False

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """What the prober reported for one target."""

    target: Target
    nonce: str
    outcome: Outcome
    errno: int
    latency_ms: float
    echoed: bool


class ProberFailed(BottleError):
    """The prober did not run, or printed something it should not have."""

    def __init__(self, bottle_id: str, returncode: int, output: str) -> None:
        super().__init__(bottle_id, returncode, output)
        self.bottle_id = bottle_id
        self.returncode = returncode
        self.output = output

    def __str__(self) -> str:
        tail = self.output.strip().splitlines()[-3:]
        return f"the prober in bottle {self.bottle_id} exited {self.returncode}: " + (
            " | ".join(tail) or "no output"
        )


def new_nonce() -> str:
    return secrets.token_hex(8)


def run_probes(
    backend: Backend,
    bottle: Bottle,
    targets: Sequence[Target],
    *,
    timeout: float = DEFAULT_PROBE_TIMEOUT_SECONDS,
) -> list[ProbeResult]:
    """Probe every target from inside ``bottle`` at once."""
    nonces = [new_nonce() for _ in targets]
    arguments = [
        f"t{index}={target.proto}:{target.address}:{nonce}"
        for index, (target, nonce) in enumerate(zip(targets, nonces, strict=True))
    ]
    argv = [
        *backend.prober_command(bottle),
        "--timeout-ms",
        str(int(timeout * 1000)),
        "--marker",
        bottle.name,
        *arguments,
    ]
    result = backend.exec(bottle, argv, timeout=timeout + 30)
    if result.returncode != 0:
        raise ProberFailed(bottle.bottle_id, result.returncode, result.stderr)
    return parse_prober_output(bottle.bottle_id, result.stdout, targets, nonces)


def parse_prober_output(
    bottle_id: str, output: str, targets: Sequence[Target], nonces: Sequence[str]
) -> list[ProbeResult]:
    """Read the prober's ``ID OUTCOME ERRNO LATENCY_US ECHOED`` lines."""
    by_id: dict[str, ProbeResult] = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) != 5 or not fields[0].startswith("t"):
            raise ProberFailed(bottle_id, 0, f"unexpected prober line: {line!r}")
        index = int(fields[0][1:])
        by_id[fields[0]] = ProbeResult(
            target=targets[index],
            nonce=nonces[index],
            outcome=Outcome(fields[1]),
            errno=int(fields[2]),
            latency_ms=int(fields[3]) / 1000,
            echoed=fields[4] == "1",
        )
    missing = [f"t{i}" for i in range(len(targets)) if f"t{i}" not in by_id]
    if missing:
        raise ProberFailed(bottle_id, 0, f"no result for {', '.join(missing)}")
    return [by_id[f"t{i}"] for i in range(len(targets))]
