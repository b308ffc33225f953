"""One conformance run per test run: every bottle probing everything at once.

The bottles start together, probe every target, have their effective
allowlists read back, and stop; the tests then judge the recorded result.
Under pytest-xdist the first worker that needs the result computes it and the
others read it from a file, so one run starts one set of bottles however
its tests are distributed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import filelock
import pytest

from bottle.matrix import Cell, Matrix
from bottle.suite import Plan, Sentinels, probe_all
from pytest_bottle.plugin import (
    OPTIONS_KEY,
    BottleFactory,
    BottleOptions,
    OutsideTargets,
    shared_run_label,
)


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


@dataclasses.dataclass
class ConformanceRun:
    """The matrix of one run, and what each bottle's backend reported.

    ``bottles`` maps each bottle name to its record: alias, allowlist as
    asked, allowlist as read back from the enforcing layer, backend facts.
    """

    matrix: Matrix
    bottles: dict[str, dict[str, Any]]

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

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.matrix.backend,
            "cells": [cell.to_json() for cell in self.matrix.cells],
            "bottles": self.bottles,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ConformanceRun:
        cells = [Cell.from_json(record) for record in data["cells"]]
        return cls(Matrix(str(data["backend"]), cells), dict(data["bottles"]))


def run_the_matrix(
    factory: BottleFactory,
    sentinels: Sentinels,
    outside: OutsideTargets,
    options: BottleOptions,
    names: list[str],
) -> ConformanceRun:
    """Start the bottles together, probe everything, read back, stop them."""
    backend = factory.backend
    bottles = factory.start_many([factory.spec(name) for name in names])
    try:
        plan = Plan(
            sentinels,
            outside.targets,
            outside.witness,
            pool_aliases=[str(a) for a in factory.launcher.pool.range.addresses()],
        )
        matrix = probe_all(backend, bottles, plan, timeout=options.probe_timeout)
        version = backend.version()
        records = {
            bottle.name: {
                "bottle": bottle.name,
                "backend": backend.name,
                "backend_version": version,
                "alias": bottle.alias,
                "allowlist": bottle.allowlist,
                "effective_allowlist": backend.effective_allowlist(bottle),
                "facts": bottle.facts,
            }
            for bottle in bottles
        }
    finally:
        for bottle in bottles:
            factory.stop(bottle)
    return ConformanceRun(matrix, records)


@pytest.fixture(scope="session")
def conformance_run(
    bottle_factory: BottleFactory,
    bottle_sentinels: Sentinels,
    bottle_outside: OutsideTargets,
    bottle_options: BottleOptions,
    request: pytest.FixtureRequest,
) -> ConformanceRun:
    """The matrix of this run: every bottle against every target, computed once."""
    names = bottle_names(request.config)
    if not hasattr(request.config, "workerinput"):
        return run_the_matrix(
            bottle_factory, bottle_sentinels, bottle_outside, bottle_options, names
        )

    runs = Path(bottle_factory.launcher.pool.state_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    shared = runs / f"{shared_run_label(request.config)}.conformance.json"
    with filelock.FileLock(str(shared) + ".lock"):
        if shared.exists():
            return ConformanceRun.from_json(json.loads(shared.read_text("utf-8")))
        result = run_the_matrix(
            bottle_factory, bottle_sentinels, bottle_outside, bottle_options, names
        )
        shared.write_text(json.dumps(result.to_json()), encoding="utf-8")
        return result
