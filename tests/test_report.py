"""Reports, baselines, junitxml properties and known upstream bugs."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the test extra
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bottle import cli_report
from bottle.backends.smolmachines import PATCH_APPLIED, PATCH_NOT_NEEDED
from bottle.errors import BottleUsageError
from bottle.known_bugs import (
    KNOWN_BUGS,
    Verdict,
    Version,
    affecting,
    assess,
    by_id,
)
from bottle.matrix import EXPECT_BLOCKED, EXPECT_CONNECTED, Cell, Matrix, render_text
from bottle.probe import Outcome, Target, TargetKind
from bottle.report import (
    SCHEMA_PATH,
    Change,
    build_report,
    cells_of,
    check_report,
    compare,
)
from tests.conftest import STANDIN_EGRESS, needs_root_netns

POOL = "127.0.0.80-127.0.0.87"
SUITE_ARGS = (
    "--pyargs",
    "conformance",
    "-p",
    "no:cacheprovider",
    f"--bottle-egress-target={STANDIN_EGRESS}",
    "--bottle-egress-standin",
    f"--bottle-pool={POOL}",
)
#: The stand-in refuses an address in the /24 of one this host uses, and a
#: stand-in of a concurrent run on this host (another checkout's tests)
#: counts as one.  Such a run ends within seconds, so the run is tried again.
_STANDIN_BUSY = "which this host uses"
FROM_BUG = "smolvm-from-drops-allow-cidr"
TSI_BUG = "smolvm-tsi-allowlist-not-enforced"
CACHED_RUN_BUG = "smolvm-cached-image-run-fail-open"


def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


def validate(report: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.Draft202012Validator(schema()).validate(report)


def run_suite_subprocess(folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """A real netns conformance run in ``folder`` (retried while the stand-in
    address is held by a concurrent run)."""
    argv = [sys.executable, "-m", "pytest", *SUITE_ARGS, *extra]
    for _ in range(10):
        completed = subprocess.run(
            argv, cwd=folder, capture_output=True, text=True, check=False, timeout=600
        )
        if _STANDIN_BUSY not in completed.stdout:
            return completed
        time.sleep(3)
    return completed


def run_suite(pytester: pytest.Pytester, *extra: str) -> pytest.RunResult:
    for _ in range(10):
        result = pytester.runpytest_subprocess(*SUITE_ARGS, *extra, timeout=600)
        if _STANDIN_BUSY not in result.stdout.str():
            return result
        time.sleep(3)
    return result


@pytest.fixture(scope="module")
def netns_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The JSON report of one real netns run, every cell as expected."""
    if needs_root_netns.args[0]:
        pytest.skip(needs_root_netns.kwargs["reason"])
    folder = tmp_path_factory.mktemp("run")
    completed = run_suite_subprocess(folder, "--bottle-report=report.json")
    assert completed.returncode == 0, completed.stdout[-3000:]
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return report


def leak(report: dict[str, Any], column: str = "sentinel:127.0.0.1") -> dict[str, Any]:
    """A copy of ``report`` in which bottle a reached ``column``."""
    edited = copy.deepcopy(report)
    for cell in edited["cells"]:
        if cell["source"] == "a" and cell["target"]["key"] == column:
            assert cell["expected"] == EXPECT_BLOCKED
            assert cell["passed"]
            cell.update(
                actual="CONNECTED",
                errno=0,
                echoed=True,
                listener_saw_nonce=True,
                passed=False,
                reason="LEAK: the target's listener logged this probe's nonce",
            )
            return edited
    raise AssertionError(f"no cell a -> {column}")


# -- a real run's reports --------------------------------------------------------


@needs_root_netns
def test_real_run_writes_a_report_that_validates_and_junitxml_properties(
    pytester: pytest.Pytester,
) -> None:
    result = run_suite(
        pytester,
        "--bottle-report=out/report.json",
        "--bottle-html=out/report.html",
        "--junitxml=out/junit.xml",
        # Per-test properties exist in junitxml's xunit1 family only.
        "-o",
        "junit_family=xunit1",
    )
    assert result.ret == 0, result.stdout.str()[-3000:]
    result.stdout.fnmatch_lines(["bottle report: */out/report.json"])

    report = json.loads((pytester.path / "out/report.json").read_text())
    validate(report)
    assert report["backend"]["name"] == "netns"
    assert report["backend"]["version"].startswith("Linux ")
    assert report["summary"]["verdict"] == "pass"
    assert {bottle["name"] for bottle in report["bottles"]} == {"a", "b"}
    columns = {cell["target"]["key"] for cell in report["cells"]}
    assert {"bundle:a", "bundle:b", "sentinel:127.0.0.1", "egress"} <= columns
    sentinel = next(
        c for c in report["cells"] if c["target"]["key"] == "sentinel:127.0.0.1"
    )
    assert sentinel["listener_saw_nonce"] is False
    assert "logged no nonce" in sentinel["evidence"]
    assert (pytester.path / "out/report.html").read_text().startswith("<!DOCTYPE")

    tree = ET.parse(pytester.path / "out/junit.xml")
    case = next(
        c
        for c in tree.iter("testcase")
        if c.get("name") == "test_cannot_reach_loopback_sentinel[a]"
    )
    properties = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert properties["bottle_source"] == "a"
    assert properties["bottle_expected"] == "BLOCKED"
    assert properties["bottle_actual"] in {o.value for o in Outcome}
    assert str(properties["bottle_target"]).startswith("sentinel:127.0.0.1 tcp ")
    assert "bottle_cell" in properties


def test_report_diff_names_a_newly_reachable_cell_and_exits_1(
    netns_report: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(netns_report))
    new.write_text(json.dumps(leak(netns_report)))
    validate(json.loads(new.read_text()))

    assert cli_report.main(["report", "diff", str(old), str(new)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(
        "REGRESSED, NEWLY REACHABLE: a -> sentinel:127.0.0.1 (tcp 127.0.0.1:"
    )
    assert lines[-1].startswith("GOT WORSE: 1 regressed, 0 fixed")


def test_report_diff_swapped_lists_the_cell_as_fixed_and_exits_0(
    netns_report: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(leak(netns_report)))
    new.write_text(json.dumps(netns_report))

    assert cli_report.main(["report", "diff", str(old), str(new)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FIXED: a -> sentinel:127.0.0.1")
    assert lines[-1].startswith("no cell got worse: 0 regressed, 1 fixed")


def test_report_diff_lists_cells_only_one_run_has(
    netns_report: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trimmed = copy.deepcopy(netns_report)
    trimmed["cells"] = [c for c in trimmed["cells"] if c["target"]["key"] != "egress"]
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(netns_report))
    new.write_text(json.dumps(trimmed))

    assert cli_report.main(["report", "diff", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "ONLY IN OLD: a -> egress" in out
    assert "ONLY IN OLD: b -> egress" in out


def test_report_diff_against_a_run_that_judged_nothing_got_worse(
    netns_report: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A backend that could not run writes a report without cells: a gate
    must not pass on it."""
    empty = copy.deepcopy(netns_report)
    empty["cells"] = []
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(netns_report))
    new.write_text(json.dumps(empty))

    assert cli_report.main(["report", "diff", str(old), str(new)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == f"{new} judged no cell at all: it proves nothing"
    assert lines[-1].startswith("GOT WORSE: 0 regressed")


def test_report_diff_of_two_backends_is_refused_in_one_line(
    netns_report: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = copy.deepcopy(netns_report)
    other["backend"]["name"] = "smolmachines"
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps(netns_report))
    new.write_text(json.dumps(other))

    assert cli_report.main(["report", "diff", str(old), str(new)]) == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "reports of backends netns and smolmachines" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "*report */missing.json: no such file*"),
        ("not json", "*is not JSON*"),
        ('{"schema": "other"}', "*is not a bot-bottle-report JSON document*"),
        (
            '{"schema": "bot-bottle-report", "schema_version": 99}',
            "*schema_version 99; this bot-bottle reads version 1*",
        ),
        (
            '{"schema": "bot-bottle-report", "schema_version": 1, "cells": [{}]}',
            "*cell 0 is malformed*",
        ),
    ],
)
def test_report_diff_bad_input_exits_4_in_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    message: str,
) -> None:
    bad = tmp_path / "missing.json"
    if content is not None:
        bad.write_text(content)
    assert cli_report.main(["report", "diff", str(bad), str(bad)]) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert pytest.importorskip("fnmatch").fnmatch(err[0], message)


def test_check_command_runs_the_suite_with_both_reports(tmp_path: Path) -> None:
    argv = cli_report.check_command(tmp_path, "netns", "127.0.0.80-127.0.0.87", ["-x"])
    assert argv[1:5] == ["-m", "pytest", "--pyargs", "conformance"]
    assert f"--bottle-report={tmp_path / 'report.json'}" in argv
    assert f"--bottle-html={tmp_path / 'report.html'}" in argv
    assert "--bottle-backend=netns" in argv
    assert argv[-1] == "-x"
    assert cli_report.default_out_dir().parent == Path("bottle-reports")


@needs_root_netns
def test_bottle_check_writes_both_reports_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reports"
    code = 0
    for _ in range(10):
        code = cli_report.main(
            [
                "--pool",
                POOL,
                "check",
                "--backend",
                "netns",
                "--out",
                str(out),
                "--",
                f"--bottle-egress-target={STANDIN_EGRESS}",
                "--bottle-egress-standin",
                "-q",
            ]
        )
        if code == 0:
            break
        time.sleep(3)  # the stand-in address may be held by a concurrent run
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    assert f"bottle check: {(out / 'report.json').resolve()}\n" in printed
    assert f"bottle check: {(out / 'report.html').resolve()}\n" in printed
    validate(json.loads((out / "report.json").read_text()))


# -- --bottle-baseline -----------------------------------------------------------

_RECORDING_TEST = """
import json
from bottle.matrix import Cell
from pytest_bottle.plugin import record_cell

CELLS = json.loads({cells!r})

def test_cells(request):
    for record in CELLS:
        record_cell(request.node, Cell.from_json(record))
"""


def recorded_cells(
    pytester: pytest.Pytester, report: dict[str, Any], *args: str
) -> pytest.RunResult:
    """A run whose one test passes and records ``report``'s cells."""
    pytester.makepyfile(
        test_recorded=_RECORDING_TEST.format(cells=json.dumps(report["cells"]))
    )
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def synthetic_report() -> dict[str, Any]:
    cells = [
        make_cell(source, target, passed=True)
        for source in ("a", "b")
        for target in ("bundle:a", "bundle:b", "sentinel:127.0.0.1", "egress")
    ]
    return build_report(Matrix("netns", cells), backend_version="test")


def test_baseline_regression_fails_the_run_and_is_named_first(
    pytester: pytest.Pytester,
) -> None:
    good = synthetic_report()
    (pytester.path / "baseline.json").write_text(json.dumps(good))

    result = recorded_cells(
        pytester, leak(good), "--bottle-baseline=baseline.json", "-rN"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if "baseline comparison" in line)
    assert lines[start + 1].startswith("REGRESSED, NEWLY REACHABLE: a -> sentinel:")
    result.stdout.fnmatch_lines(["GOT WORSE: 1 regressed*", "*1 passed*"])


def test_baseline_fixed_and_one_sided_cells_are_listed_and_pass(
    pytester: pytest.Pytester,
) -> None:
    good = synthetic_report()
    (pytester.path / "baseline.json").write_text(json.dumps(leak(good)))
    fewer = copy.deepcopy(good)
    fewer["cells"] = [c for c in good["cells"] if c["target"]["key"] != "egress"]

    result = recorded_cells(pytester, fewer, "--bottle-baseline=baseline.json")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["FIXED: a -> sentinel:127.0.0.1*", "ONLY IN OLD: a -> egress*"]
    )


def test_bad_baseline_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--bottle-baseline=nosuch.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--bottle-baseline: report */nosuch.json: no such*"])


def test_report_options_are_in_the_bottle_group_with_ini_twins(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    group = text[text.index("bot-bottle isolation:") :]
    for flag in ("--bottle-report=PATH", "--bottle-html=PATH", "--bottle-baseline"):
        assert flag in group.split("\n\n")[0]
    for ini in ("bottle_report ", "bottle_html ", "bottle_baseline "):
        assert ini in text


# -- known upstream bugs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("smolvm 0.7.9", {TSI_BUG}),
        ("smolvm 0.8.0", {FROM_BUG, TSI_BUG}),
        ("smolvm 1.1.2", {FROM_BUG, TSI_BUG}),
        ("smolvm 1.1.3", {FROM_BUG}),
        ("smolvm 1.7.7", {FROM_BUG}),
        ("smolvm 1.8.0-rc1", {FROM_BUG}),
        ("smolvm 1.8.0", set()),
        ("smolvm 0.8.0 (fake)", {FROM_BUG}),
        ("smolvm 1.0.0 (fake)", {FROM_BUG}),
        ("smolvm 2.0.0", set()),
    ],
)
def test_known_bug_ranges(version: str, expected: set[str]) -> None:
    breaking = {bug.id for bug in affecting("smolmachines", version) if bug.breaks}
    assert breaking == expected


def test_cached_image_run_bug_is_listed_before_190_but_breaks_no_test() -> None:
    ids = [bug.id for bug in affecting("smolmachines", "1.8.5")]
    assert ids == ["smolvm-cached-image-run-fail-open"]
    assert not by_id(ids[0]).breaks
    assert affecting("smolmachines", "1.9.0") == []


def test_every_bug_names_its_source_and_a_backend_without_bugs_parses_nothing() -> None:
    for bug in KNOWN_BUGS:
        assert "pull request" in bug.source
        assert bug.id in bug.describe()
    assert affecting("netns", "Linux 6.1, nftables v1.0.6 (Lester Gooch #5)") == []
    with pytest.raises(BottleUsageError, match=r"no MAJOR\.MINOR\.PATCH"):
        affecting("smolmachines", "smolvm unknown")
    with pytest.raises(BottleUsageError, match="unknown; known: smolvm-"):
        by_id("nosuch")


versions = st.tuples(
    st.integers(0, 3),
    st.integers(0, 12),
    st.integers(0, 12),
    st.sampled_from(["", "rc1"]),
)


@given(versions)
def test_a_range_holds_exactly_the_versions_between_its_bounds(
    parts: tuple[int, int, int, str],
) -> None:
    major, minor, patch, pre = parts
    text = f"smolvm {major}.{minor}.{patch}" + (f"-{pre}" if pre else "")
    version = Version.parse(text)
    assert str(version) == text.removeprefix("smolvm ")
    release = (major, minor, patch)
    from_bug = by_id(FROM_BUG)
    # A pre-release sorts before its release: 1.8.0-rc1 still has the bug.
    in_range = (0, 8, 0) <= release < (1, 8, 0) or (release == (1, 8, 0) and bool(pre))
    if release == (0, 8, 0) and pre:
        in_range = False
    assert from_bug.affects(version) is in_range
    assert (from_bug in affecting("smolmachines", text)) is in_range


@given(versions, versions)
def test_version_order_is_total_and_matches_the_numbers(
    a: tuple[int, int, int, str], b: tuple[int, int, int, str]
) -> None:
    va, vb = Version(*a), Version(*b)
    assert (va < vb) + (va > vb) + (va._key() == vb._key()) == 1
    if a[:3] != b[:3]:
        assert (va < vb) is (a[:3] < b[:3])


@pytest.mark.parametrize(
    ("values", "verdict"),
    [
        ([PATCH_APPLIED, PATCH_APPLIED], Verdict.CARRIED_BY_WORKAROUND),
        ([PATCH_NOT_NEEDED, PATCH_NOT_NEEDED], Verdict.NOT_TRIGGERED),
        ([PATCH_APPLIED, "off"], Verdict.EXPECTED_TO_FAIL),
        (["off"], Verdict.EXPECTED_TO_FAIL),
        ([], Verdict.EXPECTED_TO_FAIL),
    ],
)
def test_the_allowlist_patch_fact_decides_the_from_bug(
    values: list[str], verdict: Verdict
) -> None:
    facts = [{"allowlist_patch": value} for value in values]
    assert assess(by_id(FROM_BUG), facts).verdict is verdict
    assert assess(by_id(TSI_BUG), facts).verdict is Verdict.EXPECTED_TO_FAIL
    assert assess(by_id(CACHED_RUN_BUG), facts).verdict is Verdict.NOT_ON_PATH


@pytest.mark.parametrize(
    ("version", "patch", "verdicts"),
    [
        (
            "0.8.0 (fake)",
            PATCH_APPLIED,
            {
                FROM_BUG: "carried by workaround",
                CACHED_RUN_BUG: "not on bot-bottle's path",
            },
        ),
        (
            "1.8.0 (fake)",
            PATCH_NOT_NEEDED,
            {CACHED_RUN_BUG: "not on bot-bottle's path"},
        ),
    ],
)
def test_report_of_a_smolvm_run_says_how_the_patch_bore_on_it(
    version: str, patch: str, verdicts: dict[str, str]
) -> None:
    """The facts as the smolmachines backend records them, read by the report."""
    bottles = {
        name: {
            "backend_version": f"smolvm {version}",
            "alias": alias,
            "allowlist": [f"{alias}/32"],
            "facts": {"smolvm_version": version, "allowlist_patch": patch},
        }
        for name, alias in (("a", "127.0.0.80"), ("b", "127.0.0.81"))
    }
    bugs = affecting("smolmachines", f"smolvm {version}")
    facts: list[dict[str, Any]] = [
        {"smolvm_version": version, "allowlist_patch": patch} for _ in bottles
    ]
    report = build_report(
        Matrix("smolmachines", [make_cell("a", "bundle:a", passed=True)]),
        backend_version=f"smolvm {version}",
        bottles=bottles,
        known_bugs=[assess(bug, facts) for bug in bugs],
    )
    validate(report)
    assert {b["facts"]["allowlist_patch"] for b in report["bottles"]} == {patch}
    assert {k["bug"]["id"]: k["verdict"] for k in report["known_bugs"]} == verdicts


_STUB_BACKEND = """
import pytest
from bottle.backends import Bottle
from bottle.spec import BottleSpec


class StubBackend:
    name = "smolmachines"

    def version(self):
        return "smolvm {version}"

    def unused(self, *args, **kwargs):
        raise NotImplementedError

    requirements = check = start = stop = remove = leftovers = unused
    exec = prober_command = effective_allowlist = unused
    host_side_addresses = attach = agent_loopback = unused


@pytest.fixture
def bottle_backend():
    return StubBackend()


# Like the conformance suite's run: bottles stopped, their records kept.
class Run:

    bottles = {{"a": {{"facts": {{"allowlist_patch": "{patch}"}}}}}}


@pytest.fixture
def stub_bottle():
    if {as_record}:
        return Run()
    return Bottle(
        BottleSpec("a"), "r-a", "127.0.0.80", ["127.0.0.80/32"], "smolmachines",
        {{}}, facts={{"allowlist_patch": "{patch}"}},
    )
"""

_STUB_TEST = """
import pytest

LEAKS = {leaks}


@pytest.mark.bottle_known_bug("{bug}")
def test_blocked(bottle_backend, stub_bottle, record_property):
    assert not LEAKS, "LEAK: reached the sentinel"
"""


@pytest.mark.parametrize(
    ("version", "patch", "leaks", "outcome", "note"),
    [
        # Live bug, and the cell leaks: an expected failure.
        ("0.8.0", "off", True, {"xfailed": 1}, "expected to fail"),
        # Live bug, yet no leak: strict XPASS fails and says the bug is gone.
        ("0.8.0", "off", False, {"failed": 1}, "expected to fail"),
        # The DB patch carried it: the test must pass, and does.
        ("1.2.0", "applied", False, {"passed": 1}, "carried by workaround"),
        # ... and a leak despite the patch is a plain failure, not an xfail.
        ("1.2.0", "applied", True, {"failed": 1}, "carried by workaround"),
        # Fixed upstream: nothing to say.
        ("1.8.0", "not needed", False, {"passed": 1}, None),
    ],
)
@pytest.mark.parametrize("as_record", [False, True], ids=["bottle", "run-record"])
def test_known_bug_marks_xfail_only_where_live(
    pytester: pytest.Pytester,
    as_record: bool,
    version: str,
    patch: str,
    leaks: bool,
    outcome: dict[str, int],
    note: str | None,
) -> None:
    pytester.makeconftest(
        _STUB_BACKEND.format(version=version, patch=patch, as_record=as_record)
    )
    pytester.makepyfile(test_stub=_STUB_TEST.format(leaks=leaks, bug=FROM_BUG))
    result = pytester.runpytest(
        "-p",
        "no:cacheprovider",
        "-rxX",
        "--junitxml=j.xml",
        "-o",
        "junit_family=xunit1",
    )
    result.assert_outcomes(**outcome)
    if outcome == {"failed": 1} and note == "expected to fail":
        result.stdout.fnmatch_lines(["*XPASS(strict)*known bug smolvm-from-drops*"])
    properties = [
        json.loads(str(p.get("value")))
        for p in ET.parse(pytester.path / "j.xml").iter("property")
        if p.get("name") == "bottle_known_bug"
    ]
    assert [p["verdict"] for p in properties] == ([note] if note else [])


def test_an_unknown_bug_id_in_a_marker_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        _STUB_BACKEND.format(version="0.8.0", patch="off", as_record=False)
    )
    pytester.makepyfile(test_stub=_STUB_TEST.format(leaks=False, bug="nosuch"))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*known bug 'nosuch': unknown; known: smolvm-*"])


# -- the terminal at 80 columns ----------------------------------------------------


def make_cell(source: str, column: str, *, passed: bool) -> Cell:
    own = column == f"bundle:{source}"
    kind = (
        TargetKind.OWN_BUNDLE
        if own
        else TargetKind.BUNDLE
        if column.startswith("bundle:")
        else TargetKind.EGRESS
        if column == "egress"
        else TargetKind.SENTINEL
    )
    target = Target(column, kind, "127.0.0.1", 4000, must_reach=own)
    actual = Outcome.CONNECTED if own or not passed else Outcome.DENIED
    return Cell(
        source=source,
        target=target,
        expected=EXPECT_CONNECTED if own else EXPECT_BLOCKED,
        actual=actual,
        errno=0 if actual is Outcome.CONNECTED else 13,
        latency_ms=0.5,
        echoed=actual is Outcome.CONNECTED,
        listener_saw_nonce=actual is Outcome.CONNECTED,
        passed=passed,
        reason="test",
    )


def test_sixteen_bottles_fit_in_80_columns() -> None:
    names = [f"bottle{i:02d}" for i in range(16)]
    columns = [f"bundle:{n}" for n in names] + [
        "sentinel:127.0.0.1",
        "egress",
        "gateway:veth-gateway",
        "host:eth0",
        "host:docker0",
    ]
    cells = [
        make_cell(s, c, passed=not (s == "bottle03" and c == "sentinel:127.0.0.1"))
        for s in names
        for c in columns
    ]
    lines = render_text(Matrix("netns", cells), width=80)
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if line.startswith("bottle")]
    assert len(rows) == 16
    assert "C" in rows[3]  # the leak stands out in its row


def test_compare_orders_leaks_before_other_regressions() -> None:
    old = [make_cell("a", c, passed=True) for c in ("bundle:a", "sentinel:x")]
    broken_control = Cell(**{**vars(old[0]), "passed": False})
    new = [broken_control, make_cell("a", "sentinel:x", passed=False)]
    comparison = compare(old, new)
    assert [(c.change, c.column) for c in comparison.changes] == [
        (Change.REGRESSED, "sentinel:x"),
        (Change.REGRESSED, "bundle:a"),
    ]
    assert comparison.changes[0].newly_reachable
    assert comparison.got_worse


def test_a_built_report_validates_and_reads_back() -> None:
    report = synthetic_report()
    validate(report)
    assert check_report(json.loads(json.dumps(report))) == report
    assert [c.to_json() for c in cells_of(report)] == [
        make_cell(s, t, passed=True).to_json()
        for s in ("a", "b")
        for t in ("bundle:a", "bundle:b", "sentinel:127.0.0.1", "egress")
    ]
