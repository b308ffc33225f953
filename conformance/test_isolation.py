"""The isolation contract of a bottle, one test per cell (or group of cells).

The agent reaches its own bundle, and nothing else: not another bottle's
bundle, not a service on the host's loopback or on any host address, not the
outside.  ``source`` and ``other`` are the suite's bottles (``--bottle-count``),
filled in by ``conftest.pytest_generate_tests``.  Every cell is recorded for
the matrix in the terminal summary; ``bottle probes`` lists where each probe
came from.
"""

from __future__ import annotations

import pytest

from bottle.matrix import Cell
from conformance.conftest import ConformanceRun
from pytest_bottle.plugin import record_cell, record_facts


def describe(cell: Cell) -> str:
    return (
        f"{cell.source} -> {cell.column} ({cell.target.address}): expected "
        f"{cell.expected}, got {cell.actual}: {cell.reason}"
    )


def check(cell: Cell, request: pytest.FixtureRequest) -> None:
    check_all([cell], request)


def check_all(cells: list[Cell], request: pytest.FixtureRequest) -> None:
    """Record every cell for the matrix; fail with one line per bad cell."""
    if not cells:
        pytest.fail("no cell of this kind was probed", pytrace=False)
    for cell in cells:
        record_cell(request.node, cell)
    failed = [describe(cell) for cell in cells if not cell.passed]
    if failed:
        pytest.fail("\n".join(failed), pytrace=False)


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
    """Seed issue #75: two bottles must not see each other's published ports."""
    check(conformance_run.cell(source, f"bundle:{other}"), request)


def test_cannot_reach_other_bundle_via_own_alias(
    source: str,
    other: str,
    conformance_run: ConformanceRun,
    request: pytest.FixtureRequest,
) -> None:
    """TSI filters the IP, never the port: a bundle bound on every address
    would answer on this bottle's own alias."""
    cells = conformance_run.cells_of(source, (f"via-own-alias:{other}",))
    if not cells:
        pytest.skip(f"bundles of {source} and {other} share a port number")
    check_all(cells, request)


def test_cannot_reach_loopback_sentinel(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """Seed issue #75: the 127.0.0.1/32 allowlist opened all of host loopback."""
    check(conformance_run.cell(source, "sentinel:127.0.0.1"), request)


def test_cannot_reach_loopback_over_udp(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """TSI drops a denied UDP send silently: only the receiver's log can tell."""
    check(conformance_run.cell(source, "sentinel:127.0.0.1/udp"), request)


def test_cannot_reach_loopback_over_ipv6(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """IPv4-only filters have let [::1] and [::ffff:127.0.0.1] through."""
    check_all(conformance_run.cells_of(source, ("sentinel:[",)), request)


def test_cannot_reach_other_aliases(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """Fix #76 of seed issue #75: the allowlist is the bottle's own alias only,
    so no other alias of the pool answers, leased or free."""
    cells = conformance_run.cells_of(source, ("alias:",))
    if not cells:
        pytest.skip("every alias of the pool is leased to the suite's bottles")
    check_all(cells, request)


def test_cannot_reach_host_addresses(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """A sentinel on every host interface, probed at the bottle's gateways and at
    every address the host owns: Docker --internal networks leaked this way."""
    check_all(
        conformance_run.cells_of(source, ("gateway:", "host:", "host6:")), request
    )


def test_cannot_reach_host_services_via_own_alias(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """TSI admits every port of the bottle's alias, and a host service bound on
    every address answers there: only the bundle's own ports may."""
    check(conformance_run.cell(source, "host-via-own-alias"), request)


def test_cannot_reach_egress_target(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """smolvm's --from bug (0.8.0-1.7.7) left egress unrestricted; TCP and UDP."""
    check_all(conformance_run.cells_of(source, ("egress",)), request)


def test_cannot_reach_outside(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """A resolver forwarding a nonce-bearing name, the cloud metadata service,
    and a second public address: the usual ways out of a sandbox."""
    check_all(conformance_run.cells_of(source, ("dns", "metadata", "public")), request)


def test_own_loopback_stays_own(
    source: str, conformance_run: ConformanceRun, request: pytest.FixtureRequest
) -> None:
    """libkrun issue 860: two guests listening on one port collided on the host.
    Every bottle listens on the same port of its own loopback at once."""
    check(conformance_run.cell(source, "loopback:self"), request)


def test_effective_allowlist_is_own_alias(
    source: str, conformance_run: ConformanceRun
) -> None:
    """Read back from the enforcing layer, not from what was asked for."""
    bottle = conformance_run.bottles[source]
    assert bottle["effective_allowlist"] == [f"{bottle['alias']}/32"]
