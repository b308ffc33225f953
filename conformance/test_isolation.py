"""The isolation contract of a bottle, one test per cell of the matrix.

``source`` and ``other`` are the suite's bottles (``--bottle-count``), filled in
by ``conftest.pytest_generate_tests``.

The agent reaches its own bundle, and nothing else: not another bottle's
bundle, not a service on the host's loopback or on any host address, not the
outside.  Every cell is recorded for the matrix in the terminal summary.
"""

from __future__ import annotations

import pytest

from bottle.matrix import Cell
from conformance.conftest import ConformanceRun
from pytest_bottle.plugin import record_cell, record_facts


def check(cell: Cell, request: pytest.FixtureRequest) -> None:
    record_cell(request.node, cell)
    assert cell.passed, (
        f"{cell.source} -> {cell.column} ({cell.target.address}): expected "
        f"{cell.expected}, got {cell.actual}: {cell.reason}"
    )


def test_reaches_own_bundle(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """The positive control: without it no blocked cell means anything."""
    record_facts(request.node, conformance_run.bottles[source])
    check(conformance_run.cell(source, f"bundle:{source}"), request)


def test_cannot_reach_other_bundle(
    source: str,
    other: str,
    conformance_run: ConformanceRun,
    request: pytest.FixtureRequest,
) -> None:
    check(conformance_run.cell(source, f"bundle:{other}"), request)


def test_cannot_reach_loopback_sentinel(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    check(conformance_run.cell(source, "sentinel:127.0.0.1"), request)


def test_cannot_reach_egress_target(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    check(conformance_run.cell(source, "egress"), request)


def test_cannot_reach_host_addresses(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """A sentinel on every host interface, probed at the bottle's gateways and at
    every address the host owns: container networks have leaked this way."""
    cells = conformance_run.cells_of(source, ("gateway:", "host:"))
    assert cells, "no host address or gateway was probed"
    for cell in cells:
        record_cell(request.node, cell)
    leaks = [cell for cell in cells if not cell.passed]
    assert not leaks, "; ".join(
        f"{c.column} ({c.target.address}): got {c.actual}: {c.reason}" for c in leaks
    )


def test_effective_allowlist_is_own_alias(
    source: str, conformance_run: ConformanceRun
) -> None:
    """Read back from the enforcing layer, not from what was asked for."""
    bottle = conformance_run.bottles[source]
    assert bottle["effective_allowlist"] == [f"{bottle['alias']}/32"]
