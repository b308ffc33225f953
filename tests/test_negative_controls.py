"""Every negative control fails exactly the tests it names, on a real backend.

The list of controls lives in ``conformance/controls.py``; a probe kind that
no control proves must be listed there as unproven, with the reason.
"""

from __future__ import annotations

import re

import pytest

from bottle.catalogue import PROBES
from conformance.controls import CONTROLS, UNPROVEN, NegativeControl
from tests.conftest import STANDIN_EGRESS, SUITE_TESTS_OF_TWO_BOTTLES, needs_root_netns

POOL = "127.0.0.104-127.0.0.111"


def failed_tests(result: pytest.RunResult) -> set[str]:
    return set(re.findall(r"^FAILED \S+::(\S+)", result.stdout.str(), re.M))


def test_every_probe_kind_is_proven_by_a_control_or_listed_as_unproven() -> None:
    proven = {kind for control in CONTROLS for kind in control.proves}
    names = {probe.name for probe in PROBES}
    assert proven <= names, f"controls name unknown probes: {proven - names}"
    assert names - proven == set(UNPROVEN), (
        "probe kinds without a negative control must be listed in UNPROVEN; "
        f"missing: {sorted(names - proven - set(UNPROVEN))}, "
        f"listed but proven: {sorted(set(UNPROVEN) & proven)}"
    )


def _engine_problem() -> str | None:
    try:
        from bottle.backends.docker import engine_problem
    except ImportError as exc:
        return f"the docker SDK is not installed ({exc})"
    return engine_problem()


def _needs(control: NegativeControl) -> list[pytest.MarkDecorator]:
    if control.backend != "docker":
        return [needs_root_netns]
    problem = _engine_problem()
    return [pytest.mark.skipif(problem is not None, reason=problem or "")]


@pytest.mark.parametrize(
    "control",
    [pytest.param(c, id=c.name, marks=_needs(c)) for c in CONTROLS],
)
def test_control_fails_exactly_its_tests(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    control: NegativeControl,
) -> None:
    for key, value in control.env:
        monkeypatch.setenv(key, value)
    result = pytester.runpytest_subprocess(
        "--pyargs",
        "conformance",
        "-p",
        "no:cacheprovider",
        "-rf",
        f"--bottle-backend={control.backend}",
        f"--bottle-pool={POOL}",
        f"--bottle-egress-target={STANDIN_EGRESS}",
        "--bottle-egress-standin",
        *control.args,
    )

    assert failed_tests(result) == set(control.must_fail), result.stdout.str()[-3000:]
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) == len(control.must_fail)
    assert outcomes.get("passed", 0) + outcomes.get("skipped", 0) == (
        SUITE_TESTS_OF_TWO_BOTTLES - len(control.must_fail)
    )
    assert "error" not in outcomes
