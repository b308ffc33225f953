"""The conformance matrix: which targets each bottle probes, and the verdicts.

Rows are bottles, columns are targets.  A column's key is the same for every
row (``bundle:a`` is bottle a's bundle, which row a must reach and every other
row must not), so a matrix reads like a table of who reaches whom.

A cell that must be blocked passes only when the prober failed *and* the
target's listener logged no nonce from that probe.  A blocked cell counts only
when the same bottle reached its own bundle (the positive control): a bottle
with no network at all proves nothing, so its other cells are INCONCLUSIVE.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bottle.backends import Bottle
from bottle.backends.base import NonceWitness
from bottle.listeners import Listener
from bottle.probe import BLOCKED_OUTCOMES, Outcome, ProbeResult, Target, TargetKind

EXPECT_CONNECTED = "CONNECTED"
EXPECT_BLOCKED = "BLOCKED"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One bottle against one target: expected, actual, and the evidence."""

    source: str
    target: Target
    expected: str
    actual: Outcome
    errno: int
    latency_ms: float
    echoed: bool
    #: Whether the target's own listener logged this probe's nonce; None when
    #: nothing on this host listens there (a real outside address).
    listener_saw_nonce: bool | None
    passed: bool
    reason: str

    @property
    def column(self) -> str:
        return self.target.key

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": {
                "key": self.target.key,
                "kind": str(self.target.kind),
                "host": self.target.host,
                "port": self.target.port,
                "proto": self.target.proto,
            },
            "expected": self.expected,
            "actual": str(self.actual),
            "errno": self.errno,
            "latency_ms": round(self.latency_ms, 3),
            "echoed": self.echoed,
            "listener_saw_nonce": self.listener_saw_nonce,
            "passed": self.passed,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> Cell:
        target = record["target"]
        return cls(
            source=str(record["source"]),
            target=Target(
                key=str(target["key"]),
                kind=TargetKind(target["kind"]),
                host=str(target["host"]),
                port=int(target["port"]),
                proto=str(target["proto"]),
                must_reach=record["expected"] == EXPECT_CONNECTED,
            ),
            expected=str(record["expected"]),
            actual=Outcome(record["actual"]),
            errno=int(record["errno"]),
            latency_ms=float(record["latency_ms"]),
            echoed=bool(record["echoed"]),
            listener_saw_nonce=record["listener_saw_nonce"],
            passed=bool(record["passed"]),
            reason=str(record["reason"]),
        )


def bundle_key(bottle_name: str) -> str:
    return f"bundle:{bottle_name}"


def plan_targets(
    source: Bottle,
    bottles: Sequence[Bottle],
    sentinels: Mapping[str, Listener],
    egress: tuple[str, int] | None,
) -> list[Target]:
    """Every target ``source`` probes: all bundles, the sentinels, egress."""
    targets = []
    for bottle in bottles:
        port = next(iter(bottle.bundle_ports.values()))
        own = bottle.bottle_id == source.bottle_id
        targets.append(
            Target(
                key=bundle_key(bottle.name),
                kind=TargetKind.OWN_BUNDLE if own else TargetKind.BUNDLE,
                host=bottle.bundle_host,
                port=port,
                must_reach=own,
            )
        )
    for key, listener in sentinels.items():
        targets.append(
            Target(
                key=key,
                kind=TargetKind.SENTINEL,
                host=listener.host,
                port=listener.port,
                proto=listener.proto,
            )
        )
    if egress is not None:
        targets.append(Target("egress", TargetKind.EGRESS, egress[0], egress[1]))
    return targets


def judge(
    source: str,
    results: Sequence[ProbeResult],
    witnesses: Mapping[str, NonceWitness],
) -> list[Cell]:
    """Turn one bottle's probe results into cells, positive control first."""
    cells = [
        _judge_one(source, result, witnesses.get(result.target.key))
        for result in results
    ]
    control = [cell for cell in cells if cell.target.kind is TargetKind.OWN_BUNDLE]
    if control and all(cell.passed for cell in control):
        return cells
    why = (
        "the positive control failed: this bottle did not reach its own bundle"
        if control
        else "no positive control: this bottle has no bundle to reach"
    )
    return [
        cell
        if cell.target.kind is TargetKind.OWN_BUNDLE
        else dataclasses.replace(
            cell, actual=Outcome.INCONCLUSIVE, passed=False, reason=why
        )
        for cell in cells
    ]


def _judge_one(source: str, result: ProbeResult, witness: NonceWitness | None) -> Cell:
    target = result.target
    saw = None if witness is None else witness.saw_nonce(result.nonce)
    if target.must_reach:
        expected = EXPECT_CONNECTED
        passed = (
            result.outcome is Outcome.CONNECTED and result.echoed and saw is not False
        )
        if passed:
            reason = "reached, and the listener logged the nonce"
        elif result.outcome is Outcome.CONNECTED:
            reason = "connected, but the nonce did not make the round trip"
        else:
            reason = f"could not reach it: {result.outcome}"
    else:
        expected = EXPECT_BLOCKED
        failed_to_connect = result.outcome in BLOCKED_OUTCOMES
        passed = failed_to_connect and saw is not True
        if passed and result.outcome is Outcome.UNSUPPORTED:
            reason = "unreachable: the bottle has no such address family or address"
        elif passed:
            reason = f"blocked ({result.outcome})" + (
                ", and the listener logged nothing" if saw is False else ""
            )
        elif saw:
            reason = "LEAK: the target's listener logged this probe's nonce"
        elif result.outcome is Outcome.CONNECTED:
            reason = "LEAK: the connection was established"
        else:
            reason = f"the prober failed in an unexpected way: {result.outcome}"
    return Cell(
        source=source,
        target=target,
        expected=expected,
        actual=result.outcome,
        errno=result.errno,
        latency_ms=result.latency_ms,
        echoed=result.echoed,
        listener_saw_nonce=saw,
        passed=passed,
        reason=reason,
    )


@dataclasses.dataclass
class Matrix:
    """Every cell of one run, with its rows and columns in a stable order."""

    backend: str
    cells: list[Cell] = dataclasses.field(default_factory=list)

    def add(self, cells: Iterable[Cell]) -> None:
        self.cells.extend(cells)

    @property
    def rows(self) -> list[str]:
        return list(dict.fromkeys(cell.source for cell in self.cells))

    @property
    def columns(self) -> list[str]:
        return list(dict.fromkeys(cell.column for cell in self.cells))

    @property
    def passed(self) -> bool:
        return bool(self.cells) and all(cell.passed for cell in self.cells)

    def cell(self, source: str, column: str) -> Cell | None:
        for cell in self.cells:
            if cell.source == source and cell.column == column:
                return cell
        return None

    def failures(self) -> list[Cell]:
        return [cell for cell in self.cells if not cell.passed]


#: Four-letter codes keep a two-bottle matrix within 80 columns.
_SHORT = {
    Outcome.CONNECTED: "CONN",
    Outcome.DENIED: "DENY",
    Outcome.REFUSED: "REFU",
    Outcome.UNREACHABLE: "UNRE",
    Outcome.TIMEOUT: "TIME",
    Outcome.UNSUPPORTED: "UNSU",
    Outcome.ERROR: "ERRO",
    Outcome.INCONCLUSIVE: "INCO",
}


def render_text(matrix: Matrix, width: int = 80) -> list[str]:
    """The matrix as terminal lines: ``expected/actual`` per cell.

    A cell is ``conn`` or ``blk`` (expected) then the actual class; a
    mismatch ends in ``!``.  Rows are bottles and columns targets, with the
    column names numbered below when that fits ``width``; a matrix with many
    targets and few bottles is turned on its side (one line per target);
    when neither fits, each cell becomes one character, with a legend.
    """
    rows, columns = matrix.rows, matrix.columns
    if not rows:
        return ["(no cells)"]

    def text(row: str, column: str) -> str:
        cell = matrix.cell(row, column)
        return "" if cell is None else _cell_text(cell)

    legend = (
        "cells: expected/actual; conn = must connect, blk = must be blocked, "
        "! = mismatch"
    )
    body = [[row, *(text(row, column) for column in columns)] for row in rows]
    full = _align([["", *columns], *body])
    if max(len(line) for line in full) <= width:
        return [*full, legend]
    numbered = _align([["", *[str(i) for i in range(len(columns))]], *body])
    if max(len(line) for line in numbered) <= width:
        key = "columns: " + ", ".join(f"{i}={c}" for i, c in enumerate(columns))
        return [
            *numbered,
            *textwrap.wrap(key, width, break_on_hyphens=False),
            legend,
        ]
    sideways = _align(
        [
            ["target", *rows],
            *([column, *(text(r, column) for r in rows)] for column in columns),
        ]
    )
    if max(len(line) for line in sideways) <= width:
        return [*sideways, legend]
    return _render_compact(rows, columns, matrix, width)


def _align(table: list[list[str]]) -> list[str]:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return [
        "  ".join(text.ljust(widths[i]) for i, text in enumerate(line)).rstrip()
        for line in table
    ]


def _cell_text(cell: Cell) -> str:
    expected = "conn" if cell.expected == EXPECT_CONNECTED else "blk"
    mark = "" if cell.passed else "!"  # a mismatch stands out
    return f"{expected}/{_SHORT[cell.actual]}{mark}"


_GLYPH = {Outcome.UNSUPPORTED: "N"}


def _render_compact(
    rows: list[str], columns: list[str], matrix: Matrix, width: int
) -> list[str]:
    label_width = max(len(row) for row in rows)
    key = "columns: " + ", ".join(f"{i}={c}" for i, c in enumerate(columns))
    lines = textwrap.wrap(key, width, break_on_hyphens=False)
    digits = "".join(str(i % 10) for i in range(len(columns)))
    lines.append(" " * label_width + " " + digits)
    for row in rows:
        glyphs = []
        for column in columns:
            cell = matrix.cell(row, column)
            if cell is None:
                glyphs.append(" ")
            elif cell.passed:
                glyphs.append("+" if cell.expected == EXPECT_CONNECTED else ".")
            else:
                glyphs.append(_GLYPH.get(cell.actual, cell.actual.value[0]))
        lines.append(row.ljust(label_width) + " " + "".join(glyphs))
    legend = (
        "+ connected, . blocked, as expected; a mismatch shows its class: "
        "C=CONNECTED D=DENIED R=REFUSED U=UNREACHABLE T=TIMEOUT E=ERROR "
        "I=INCONCLUSIVE N=UNSUPPORTED"
    )
    lines.extend(textwrap.wrap(legend, width))
    return lines
