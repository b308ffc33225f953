"""Reports of a conformance run, for people and machines, and their comparison.

A report is a JSON document (schema ``bottle/report_schema.json``, versioned
by ``schema_version``) holding the run's facts (backend and its version,
each bottle's backend facts such as whether a workaround was applied, the
host platform, the time, the known upstream bugs that bear on the run) and
every cell of the matrix with its evidence.

Two reports compare cell by cell, keyed by source bottle and column.  A cell
that passed in the old run and fails in the new one is REGRESSED; a cell
that must be blocked and became reachable is the worst case and is named
first.  A cell that failed and now passes is FIXED.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bottle.errors import BottleUsageError
from bottle.known_bugs import Assessment
from bottle.matrix import EXPECT_BLOCKED, EXPECT_CONNECTED, Cell, Matrix

SCHEMA_NAME = "bot-bottle-report"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "report_schema.json"


def cell_evidence(cell: Cell) -> str:
    """The evidence behind a cell's verdict, in one sentence."""
    if cell.listener_saw_nonce is None:
        far = "no listener of this run at the target (an outside address)"
    elif cell.listener_saw_nonce:
        far = "the target's listener logged this probe's nonce"
    else:
        far = "the target's listener logged no nonce from this probe"
    near = "the nonce came back" if cell.echoed else "no nonce came back"
    errno = f", errno {cell.errno}" if cell.errno else ""
    return (
        f"prober: {cell.actual} in {cell.latency_ms:.1f} ms{errno}, {near}; "
        f"{far}; {cell.reason}"
    )


def cell_record(cell: Cell) -> dict[str, Any]:
    """One cell as the report stores it: the cell's JSON plus its evidence."""
    record = cell.to_json()
    record["target"]["address"] = cell.target.address
    record["evidence"] = cell_evidence(cell)
    return record


def host_platform() -> dict[str, str]:
    """Where the run happened (no host name: reports get shared)."""
    return {
        "platform": platform.platform(),
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def build_report(
    matrix: Matrix,
    *,
    backend_version: str | None,
    bottles: Mapping[str, Mapping[str, Any]] | None = None,
    known_bugs: Sequence[Assessment] = (),
    run: str | None = None,
    generated_at: datetime.datetime | None = None,
) -> dict[str, Any]:
    """The report of one run.

    ``bottles`` maps each bottle's name to what the plugin recorded for it:
    ``alias``, ``allowlist``, ``backend_version`` and ``facts`` (the
    backend's own facts, kept as they are).
    """
    when = generated_at or datetime.datetime.now(datetime.UTC)
    records = []
    for name, record in (bottles or {}).items():
        records.append(
            {
                "name": name,
                "alias": record.get("alias"),
                "allowlist": list(record.get("allowlist") or []),
                "backend_version": record.get("backend_version"),
                "facts": dict(record.get("facts") or {}),
            }
        )
    failed = len(matrix.failures())
    verdict = "empty" if not matrix.cells else ("pass" if failed == 0 else "fail")
    return {
        "schema": SCHEMA_NAME,
        "schema_version": SCHEMA_VERSION,
        "generated_at": when.isoformat(timespec="seconds"),
        "run": run,
        "backend": {"name": matrix.backend, "version": backend_version},
        "host": host_platform(),
        "bottles": records,
        "known_bugs": [assessment.to_json() for assessment in known_bugs],
        "summary": {
            "cells": len(matrix.cells),
            "passed": len(matrix.cells) - failed,
            "failed": failed,
            "verdict": verdict,
        },
        "rows": matrix.rows,
        "columns": matrix.columns,
        "cells": [cell_record(cell) for cell in matrix.cells],
    }


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """Write ``report`` as indented JSON, making the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def read_report(path: Path) -> dict[str, Any]:
    """Read a report written by :func:`write_report`; bad input is a usage error."""
    what = f"report {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BottleUsageError(what, "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BottleUsageError(what, f"cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BottleUsageError(what, f"is not JSON: {exc}") from None
    return check_report(data, what)


def check_report(data: Any, what: str = "report") -> dict[str, Any]:
    """``data`` if it is a report this version reads, else a usage error."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise BottleUsageError(what, f"is not a {SCHEMA_NAME} JSON document")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BottleUsageError(
            what,
            f"has schema_version {data.get('schema_version')!r}; this bot-bottle "
            f"reads version {SCHEMA_VERSION}",
        )
    cells_of(data, what)
    return data


def cells_of(report: Mapping[str, Any], what: str = "report") -> list[Cell]:
    """The cells of a report, as :class:`Cell` objects."""
    cells = report.get("cells")
    if not isinstance(cells, list):
        raise BottleUsageError(what, "has no list of cells")
    found = []
    for index, record in enumerate(cells):
        try:
            found.append(Cell.from_json(record))
        except (KeyError, TypeError, ValueError) as exc:
            raise BottleUsageError(
                what, f"cell {index} is malformed ({type(exc).__name__}: {exc})"
            ) from None
    return found


def matrix_of(report: Mapping[str, Any]) -> Matrix:
    """The matrix a report holds."""
    backend = report.get("backend") or {}
    return Matrix(str(backend.get("name", "?")), cells_of(report))


# -- comparing two runs --------------------------------------------------------


class Change(enum.StrEnum):
    REGRESSED = "REGRESSED"
    FIXED = "FIXED"
    #: Both runs agree on the verdict but saw a different outcome class.
    CHANGED = "CHANGED"
    ONLY_OLD = "ONLY IN OLD"
    ONLY_NEW = "ONLY IN NEW"


_ORDER = list(Change)


@dataclasses.dataclass(frozen=True)
class CellChange:
    """One cell that differs between two runs."""

    change: Change
    source: str
    column: str
    old: Cell | None
    new: Cell | None

    @property
    def newly_reachable(self) -> bool:
        """A must-block cell that now fails: the worst kind of regression."""
        return (
            self.change is Change.REGRESSED
            and self.new is not None
            and self.new.expected == EXPECT_BLOCKED
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "change": str(self.change),
            "source": self.source,
            "column": self.column,
            "newly_reachable": self.newly_reachable,
            "old": None if self.old is None else cell_record(self.old),
            "new": None if self.new is None else cell_record(self.new),
        }


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every cell that differs between an old run and a new one."""

    changes: list[CellChange]
    compared: int
    #: The old run judged cells and the new one none: it proves nothing.
    new_is_empty: bool = False

    def of(self, change: Change) -> list[CellChange]:
        return [item for item in self.changes if item.change is change]

    @property
    def regressed(self) -> list[CellChange]:
        return self.of(Change.REGRESSED)

    @property
    def got_worse(self) -> bool:
        """Whether any cell that passed before fails now, or none was judged."""
        return bool(self.regressed) or self.new_is_empty

    def to_json(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "got_worse": self.got_worse,
            "new_is_empty": self.new_is_empty,
            "changes": [item.to_json() for item in self.changes],
        }


def compare(old: Iterable[Cell], new: Iterable[Cell]) -> Comparison:
    """Compare two runs' cells, regressions first, newly reachable cells first."""
    old_cells = {(cell.source, cell.column): cell for cell in old}
    new_cells = {(cell.source, cell.column): cell for cell in new}
    changes = []
    compared = 0
    for key in [*old_cells, *(k for k in new_cells if k not in old_cells)]:
        before, after = old_cells.get(key), new_cells.get(key)
        if before is None:
            change = Change.ONLY_NEW
        elif after is None:
            change = Change.ONLY_OLD
        else:
            compared += 1
            if before.passed and not after.passed:
                change = Change.REGRESSED
            elif after.passed and not before.passed:
                change = Change.FIXED
            elif before.actual != after.actual or before.expected != after.expected:
                change = Change.CHANGED
            else:
                continue
        changes.append(CellChange(change, key[0], key[1], before, after))
    changes.sort(key=lambda item: (_ORDER.index(item.change), not item.newly_reachable))
    return Comparison(changes, compared, bool(old_cells) and not new_cells)


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "absent"
    expected = "must connect" if cell.expected == EXPECT_CONNECTED else "must block"
    return f"{expected}, {cell.actual}" + ("" if cell.passed else " (FAIL)")


def render_comparison(
    comparison: Comparison, old_label: str = "old", new_label: str = "new"
) -> list[str]:
    """The comparison as text lines, regressions first."""
    lines = []
    for item in comparison.changes:
        cell = item.new or item.old
        assert cell is not None
        where = f"{item.source} -> {item.column} ({cell.target.proto} "
        where += f"{cell.target.address})"
        label = "REGRESSED, NEWLY REACHABLE" if item.newly_reachable else item.change
        lines.append(f"{label}: {where}")
        lines.append(
            f"    {old_label}: {_cell_text(item.old)}; "
            f"{new_label}: {_cell_text(item.new)}"
        )
        if item.change is Change.REGRESSED and item.new is not None:
            lines.append(f"    {item.new.reason}")
    counts = ", ".join(
        f"{len(comparison.of(change))} {str(change).lower()}" for change in Change
    )
    verdict = "GOT WORSE" if comparison.got_worse else "no cell got worse"
    if comparison.new_is_empty:
        lines.append(f"{new_label} judged no cell at all: it proves nothing")
    lines.append(f"{verdict}: {counts} ({comparison.compared} cells in both runs)")
    return lines


__all__ = [
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "CellChange",
    "Change",
    "Comparison",
    "build_report",
    "cells_of",
    "check_report",
    "compare",
    "matrix_of",
    "read_report",
    "render_comparison",
    "write_report",
]
