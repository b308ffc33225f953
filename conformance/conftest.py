"""One conformance run per session: two bottles probing everything at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from bottle.backends import Bottle
from bottle.matrix import Cell, Matrix
from bottle.suite import Sentinels, probe_all
from pytest_bottle.plugin import BottleFactory, BottleOptions, EgressTarget

#: The bottles of the suite, running at the same time.
BOTTLE_NAMES = ("a", "b")


@dataclasses.dataclass
class ConformanceRun:
    """The bottles of one run and the matrix their probes produced."""

    bottles: dict[str, Bottle]
    matrix: Matrix

    def cell(self, source: str, column: str) -> Cell:
        found = self.matrix.cell(source, column)
        if found is None:
            known = ", ".join(self.matrix.columns)
            raise LookupError(f"no cell {source} -> {column}; columns: {known}")
        return found

    def cells_of(self, source: str, prefixes: tuple[str, ...]) -> list[Cell]:
        return [
            cell
            for cell in self.matrix.cells
            if cell.source == source and cell.column.startswith(prefixes)
        ]


@pytest.fixture(scope="session")
def conformance_run(
    bottle_factory: BottleFactory,
    bottle_sentinels: Sentinels,
    bottle_egress: EgressTarget,
    bottle_options: BottleOptions,
) -> Iterator[ConformanceRun]:
    """Starts bottles a and b together, probes every target, keeps the matrix."""
    specs = [bottle_factory.spec(name) for name in BOTTLE_NAMES]
    bottles = bottle_factory.start_many(specs)
    try:
        matrix = probe_all(
            bottle_factory.backend,
            bottles,
            bottle_sentinels,
            (bottle_egress.host, bottle_egress.port),
            bottle_egress.witness,
            timeout=bottle_options.probe_timeout,
        )
        yield ConformanceRun({bottle.name: bottle for bottle in bottles}, matrix)
    finally:
        for bottle in bottles:
            bottle_factory.stop(bottle)
