"""Reports, baselines and known upstream bugs: the release-gating half of the plugin.

A separate pytest plugin (entry point ``bottle_report``) next to
:mod:`pytest_bottle.plugin`, whose ``bottle`` option group it shares.  It

- writes the run's report as JSON (``--bottle-report``) and as one HTML page
  (``--bottle-html``) from the cells and facts the matrix collector gathered;
- compares the run with an earlier report (``--bottle-baseline``): a cell
  that passed there and fails here fails the run and is named first;
- adds each cell's classes to pytest's own ``--junitxml`` as properties;
- marks the conformance tests a known upstream bug makes fail as
  ``xfail(strict=True)`` when the running version is affected and no
  workaround carried the run (see :func:`pytest_runtest_setup`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Generator, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from bottle.backends import Backend, Bottle
from bottle.errors import BottleError, BottleUsageError
from bottle.html_report import write_html
from bottle.known_bugs import (
    Assessment,
    KnownBug,
    Verdict,
    affecting,
    assess,
    by_id,
)
from bottle.matrix import Cell, Matrix
from bottle.report import (
    Comparison,
    build_report,
    cells_of,
    compare,
    read_report,
    render_comparison,
    write_report,
)
from pytest_bottle.plugin import (
    _RUN_KEY,
    CELL_PROPERTY,
    BottleFactory,
    MatrixCollector,
)

log = logging.getLogger(__name__)

#: junitxml properties added next to ``bottle_cell``, one set per cell.
EXPECTED_PROPERTY = "bottle_expected"
ACTUAL_PROPERTY = "bottle_actual"
SOURCE_PROPERTY = "bottle_source"
TARGET_PROPERTY = "bottle_target"
#: A user property naming a known bug and how it bore on a test.
KNOWN_BUG_PROPERTY = "bottle_known_bug"

#: The conformance tests are matched to known bugs by function name (each
#: bug lists the ones it makes fail); other suites mark their tests with
#: ``@pytest.mark.bottle_known_bug("<bug id>")``.
_CONFORMANCE_MODULE = "conformance.test_isolation"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bottle", "bot-bottle isolation")

    def add(flag: str, ini: str, help_text: str) -> None:
        group.addoption(flag, dest=ini, metavar="PATH", help=help_text)
        parser.addini(ini, help=help_text, type="string")

    add(
        "--bottle-report",
        "bottle_report",
        "Write the run's report as JSON to PATH (schema: bottle/report_schema.json)",
    )
    add(
        "--bottle-html",
        "bottle_html",
        "Write the run's report as one self-contained HTML page to PATH",
    )
    add(
        "--bottle-baseline",
        "bottle_baseline",
        "Compare with an earlier JSON report; a cell that passed there and "
        "fails now fails the run",
    )


class ReportPlugin:
    """Writes the reports and the baseline comparison at the end of a session."""

    def __init__(
        self,
        config: pytest.Config,
        json_path: Path | None,
        html_path: Path | None,
        baseline_path: Path | None,
        baseline: Mapping[str, Any] | None,
    ) -> None:
        self.config = config
        self.json_path = json_path
        self.html_path = html_path
        self.baseline_path = baseline_path
        self.baseline = baseline
        self.comparison: Comparison | None = None
        self.assessments: list[Assessment] = []
        self.written: list[str] = []
        self.errors: list[str] = []
        #: The backend's version, read once by the first test that needed it.
        self.backend_version: str | None = None

    def _collector(self) -> MatrixCollector | None:
        collector = self.config.pluginmanager.get_plugin("bottle-matrix")
        return collector if isinstance(collector, MatrixCollector) else None

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        collector = self._collector()
        if collector is None:
            return
        matrix = Matrix(collector.backend, list(collector.cells))
        version = next(
            (
                str(record["backend_version"])
                for record in collector.facts.values()
                if record.get("backend_version")
            ),
            self.backend_version,
        )
        self.assessments = _assessments(
            collector.backend,
            version,
            [r.get("facts", {}) for r in collector.facts.values()],
        )
        report = build_report(
            matrix,
            backend_version=version,
            bottles=collector.facts,
            known_bugs=self.assessments,
            run=self.config.stash.get(_RUN_KEY, None),
        )
        for path, write in (
            (self.json_path, write_report),
            (self.html_path, write_html),
        ):
            if path is None:
                continue
            try:
                write(report, path)
                self.written.append(str(path))
            except OSError as exc:
                self.errors.append(f"cannot write {path}: {exc}")
                session.exitstatus = pytest.ExitCode.USAGE_ERROR
        if self.baseline is not None:
            self.comparison = compare(cells_of(self.baseline), matrix.cells)
            if self.comparison.got_worse and session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED

    @pytest.hookimpl(tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        write = terminalreporter.write_line
        if self.comparison is not None:
            comparison = self.comparison
            terminalreporter.write_sep(
                "=", f"bottle baseline comparison (against {self.baseline_path})"
            )
            for line in render_comparison(comparison, "baseline", "now"):
                worse = line.startswith("REGRESSED") or line.startswith("GOT WORSE")
                write(line, red=worse, bold=worse)
        for assessment in self.assessments:
            write(
                f"bottle known bug {assessment.bug.id}: {assessment.verdict}: "
                f"{assessment.detail}",
                yellow=assessment.verdict is Verdict.EXPECTED_TO_FAIL,
            )
        for path in self.written:
            write(f"bottle report: {path}")
        for error in self.errors:
            write(f"bottle report: {error}", red=True)


_PLUGIN_NAME = "bottle-report"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "bottle_known_bug(bug_id): the test fails where the known upstream bug "
        "bug_id is live; it is then marked xfail(strict=True)",
    )
    if hasattr(config, "workerinput"):
        return  # pytest-xdist workers: the controller writes the reports

    def path_of(name: str) -> Path | None:
        value = config.getoption(name) or config.getini(name)
        if not value:
            return None
        return config.invocation_params.dir / Path(str(value)).expanduser()

    baseline_path = path_of("bottle_baseline")
    baseline = None
    if baseline_path is not None:
        try:
            baseline = read_report(baseline_path)
        except BottleUsageError as exc:
            raise pytest.UsageError(f"--bottle-baseline: {exc}") from None
    plugin = ReportPlugin(
        config,
        path_of("bottle_report"),
        path_of("bottle_html"),
        baseline_path,
        baseline,
    )
    config.pluginmanager.register(plugin, _PLUGIN_NAME)


# -- pytest's junitxml: each cell's classes as properties -----------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        # junitxml reads the properties of the teardown report, which copies
        # the item's properties after this, so they go on the item.
        item.user_properties.extend(cell_properties(report.user_properties))
    return report


def cell_properties(
    properties: Iterable[tuple[str, object]],
) -> list[tuple[str, object]]:
    """``bottle_expected``/``_actual``/``_source``/``_target`` for each cell."""
    extra: list[tuple[str, object]] = []
    for name, value in properties:
        if name != CELL_PROPERTY:
            continue
        cell = Cell.from_json(json.loads(str(value)))
        extra += [
            (SOURCE_PROPERTY, cell.source),
            (
                TARGET_PROPERTY,
                f"{cell.column} {cell.target.proto} {cell.target.address}",
            ),
            (EXPECTED_PROPERTY, cell.expected),
            (ACTUAL_PROPERTY, str(cell.actual)),
        ]
    return extra


# -- known upstream bugs: xfail where live, a note where a workaround carried -----


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    """After a test's fixtures are up, decide what known bugs mean for it.

    Only then are the backend's version and the live bottles' facts known:
    whether a workaround ran is a fact of each started bottle, not of the
    options.  For each known bug of the running version that makes the test
    fail:

    - live (no workaround, or it did not run in every bottle): the test is
      marked ``xfail(strict=True)`` with the bug as reason, so an XPASS says
      the bug is gone from this version;
    - carried by the workaround (every bottle says it applied it): the test
      runs as usual, since it must pass, and its report names the bug and
      the workaround that carried it;
    - not triggered (the runtime stored the right value itself): the test
      runs as usual and its report says so.

    pytest's skipping plugin evaluates xfail marks again at call time when
    none were found at setup, so a mark added here takes effect.
    """
    result = yield
    for marker in item.iter_markers("bottle_known_bug"):
        by_id(str(marker.args[0]) if marker.args else "")  # unknown: an error
    try:
        _apply_known_bugs(item)
    except BottleError as exc:
        log.warning("known bugs not checked for %s: %s", item.nodeid, exc)
    return result


def _known_bugs_of(item: pytest.Item, bugs: Iterable[KnownBug]) -> list[KnownBug]:
    """The known bugs that bear on a test: named by its marks, or, for the
    conformance suite, listing its function among the tests they make fail."""
    named = {
        str(marker.args[0])
        for marker in item.iter_markers("bottle_known_bug")
        if marker.args
    }
    module = getattr(getattr(item, "module", None), "__name__", "")
    function = getattr(item, "originalname", item.name)
    in_suite = module == _CONFORMANCE_MODULE
    return [
        bug for bug in bugs if bug.id in named or (in_suite and bug.fails(function))
    ]


def _apply_known_bugs(item: pytest.Item) -> None:
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    backend = funcargs.get("bottle_backend")
    if not isinstance(backend, Backend):
        return
    version = _cached_version(item.config, backend)
    plugin = item.config.pluginmanager.get_plugin(_PLUGIN_NAME)
    if isinstance(plugin, ReportPlugin):
        plugin.backend_version = version
    bugs = _known_bugs_of(item, affecting(backend.name, version))
    if not bugs:
        return
    facts = _bottle_facts(funcargs)
    for bug in bugs:
        assessment = assess(bug, facts)
        item.user_properties.append(
            (
                KNOWN_BUG_PROPERTY,
                json.dumps(
                    {
                        "bug": bug.id,
                        "verdict": str(assessment.verdict),
                        "detail": assessment.detail,
                    }
                ),
            )
        )
        if assessment.verdict is Verdict.EXPECTED_TO_FAIL:
            item.add_marker(
                pytest.mark.xfail(
                    reason=f"{bug.describe()}; {assessment.detail}", strict=True
                )
            )


_VERSION_KEY = pytest.StashKey[str]()


def _cached_version(config: pytest.Config, backend: Backend) -> str:
    cached = config.stash.get(_VERSION_KEY, None)
    if cached is None:
        cached = config.stash[_VERSION_KEY] = backend.version()
    return cached


def _bottle_facts(funcargs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The backend facts of the bottles this test judges.

    From the live bottles of the factory, the test's own bottles, and any
    fixture value with a ``bottles`` mapping of bottle name to a record with
    ``facts`` (the conformance suite's run, whose bottles are stopped once
    probed and whose records may come from another pytest-xdist worker).
    """
    found: list[Mapping[str, Any]] = []
    factory = funcargs.get("bottle_factory")
    if isinstance(factory, BottleFactory):
        found += [bottle.facts for bottle in factory.launcher.bottles.values()]
    for value in funcargs.values():
        if isinstance(value, Bottle):
            found.append(value.facts)
        records = getattr(value, "bottles", None)
        if not isinstance(records, Mapping) or value is factory:
            continue
        for record in records.values():
            if isinstance(record, Bottle):
                found.append(record.facts)
            elif isinstance(record, Mapping) and isinstance(
                record.get("facts"), Mapping
            ):
                found.append(record["facts"])
    return found


def _assessments(
    backend: str, version: str | None, facts: list[dict[str, Any]]
) -> list[Assessment]:
    if version is None:
        return []
    try:
        bugs: list[KnownBug] = affecting(backend, version)
    except BottleUsageError as exc:
        log.warning("known bugs not checked: %s", exc)
        return []
    return [assess(bug, facts) for bug in bugs]


__all__ = ["ReportPlugin", "cell_properties"]
