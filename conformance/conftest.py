"""One conformance run per session: two bottles probing everything at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from bottle.backends import Bottle
from bottle.matrix import Cell, Matrix
from bottle.suite import Sentinels, probe_all
from pytest_bottle.plugin import OPTIONS_KEY, BottleFactory, BottleOptions, EgressTarget


def bottle_names(config: pytest.Config) -> list[str]:
    """The suite's bottles, a, b, c, ... as many as ``--bottle-count``."""
    options: BottleOptions = config.stash[OPTIONS_KEY]
    return [chr(ord("a") + index) for index in range(options.bottle_count)]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    names = bottle_names(metafunc.config)
    if "source" in metafunc.fixturenames and "other" in metafunc.fixturenames:
        pairs = [(a, b) for a in names for b in names if a != b]
        metafunc.parametrize(("source", "other"), pairs)
    elif "source" in metafunc.fixturenames:
        metafunc.parametrize("source", names)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # One matrix per run: under pytest-xdist every cell goes to the worker
    # that holds the bottles (the plugin turns on --dist loadgroup).
    for item in items:
        if item.path.parent == Path(__file__).parent:
            item.add_marker(pytest.mark.xdist_group("bottle-matrix"))


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
    request: pytest.FixtureRequest,
) -> Iterator[ConformanceRun]:
    """Starts bottles a and b together, probes every target, keeps the matrix."""
    names = bottle_names(request.config)
    specs = [bottle_factory.spec(name) for name in names]
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
