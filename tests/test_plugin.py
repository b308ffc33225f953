"""The plugin as users meet it: whole pytest runs driven with pytester."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import STANDIN_EGRESS, SUITE_TESTS_OF_TWO_BOTTLES, needs_root_netns

POOL = "127.0.0.56-127.0.0.63"
SUITE_ARGS = (
    "--pyargs",
    "conformance",
    "-p",
    "no:cacheprovider",
    f"--bottle-pool={POOL}",
    f"--bottle-egress-target={STANDIN_EGRESS}",
    "--bottle-egress-standin",
)


def leftovers_of(result: pytest.RunResult) -> list[str]:
    """Namespaces and nft tables still named after the run that printed this.

    Other runs on the host (parallel tests) may hold their own meanwhile, so
    only the run's own names are compared.
    """
    match = re.search(r"bot-bottle: backend \S+, run (\w+),", result.stdout.str())
    assert match, "the run did not print its label in the header"
    run = match.group(1)
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    return [
        line
        for line in (namespaces + tables).splitlines()
        if f"bb-{run}" in line or f"bs-{run}" in line or f"bottle_{run}" in line
    ]


def test_unknown_backend_is_a_usage_error_listing_the_available(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest("--bottle-backend=nosuch")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--bottle-backend=nosuch: unknown backend; available: *netns*"]
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "--bottle-egress-target=198.51.100.53",
            "*--bottle-egress-target '198.51.100.53'*HOST:PORT*",
        ),
        ("--bottle-pool=10.0.0.0/24", "*alias pool '10.0.0.0/24': leaves 127.0.0.0/8*"),
        ("--bottle-pool=127.0.0.0/30", "*contains 127.0.0.1*"),
        ("--bottle-allowlist=alias,nonsense", "*allowlist entry 'nonsense'*"),
        (
            "--bottle-probe-timeout=-1",
            "*--bottle-probe-timeout=-1: use a number of at least*",
        ),
        ("--bottle-backend-option=novalue", "*--bottle-backend-option=novalue*"),
        ("--bottle-count=0", "*--bottle-count=0: use a whole number of at least 1*"),
        ("--bottle-count=2.5", "*--bottle-count=2.5: use a whole number*"),
        ("--bottle-pool-wait=soon", "*--bottle-pool-wait=soon: use a number*"),
        ("--bottle-pool-wait=nan", "*--bottle-pool-wait=nan: use a number*"),
        ("--bottle-probe-timeout=inf", "*--bottle-probe-timeout=inf: use a number*"),
    ],
)
def test_bad_option_values_are_one_line_usage_errors(
    pytester: pytest.Pytester, option: str, message: str
) -> None:
    result = pytester.runpytest(option)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


@needs_root_netns
def test_more_bottles_than_the_pool_has_is_one_usage_error(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest_subprocess(*SUITE_ARGS, "--bottle-count=9")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --bottle-count=9: the pool * has 8 aliases; use at most 8 *"]
    )
    assert "error" not in result.parseoutcomes()


def test_ini_twins_are_read(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nbottle_backend = nosuch\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--bottle-backend=nosuch: unknown backend*"])


def test_every_fixture_has_a_docstring(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--fixtures", "-p", "no:cacheprovider")
    text = result.stdout.str()
    for fixture in (
        "bottle_backend",
        "bottle_factory",
        "bottle",
        "bottle_sentinel",
        "bottle_sentinels",
        "bottle_outside",
        "bottle_pool",
        "bottle_options",
    ):
        _, _, rest = text.partition(f"\n{fixture} ")
        assert rest, f"{fixture} is not listed"
        doc = rest.split("\n", 2)[1]
        assert doc.strip(), f"{fixture} has an empty description"
        assert "no docstring" not in doc, f"{fixture}: {doc!r}"


@needs_root_netns
def test_suite_passes_on_netns_and_prints_the_matrix(
    pytester: pytest.Pytester,
) -> None:
    result = pytester.runpytest_subprocess(*SUITE_ARGS)
    result.assert_outcomes(passed=SUITE_TESTS_OF_TWO_BOTTLES)
    result.stdout.fnmatch_lines(
        [
            "*bottle isolation matrix (netns)*",
            "target *a *b",
            "bundle:a *conn/CONN *blk/REFU",
            "bundle:b *blk/REFU *conn/CONN",
            "bottle verdict: every cell as expected",
        ]
    )
    assert leftovers_of(result) == []


@needs_root_netns
def test_widened_allowlist_fails_exactly_the_sentinel_cells(
    pytester: pytest.Pytester,
) -> None:
    """The negative control: v1's 127.0.0.1/32 widening must be caught."""
    result = pytester.runpytest_subprocess(
        *SUITE_ARGS, "--bottle-allowlist=alias,127.0.0.1/32", "-rf"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=SUITE_TESTS_OF_TWO_BOTTLES - 8, failed=8)
    result.stdout.fnmatch_lines_random(
        [
            "FAILED *test_cannot_reach_loopback_sentinel[[]a[]]*",
            "FAILED *test_cannot_reach_loopback_sentinel[[]b[]]*",
            "*a -> sentinel:127.0.0.1 *expected BLOCKED, got CONNECTED*LEAK*",
            "*b -> sentinel:127.0.0.1 *expected BLOCKED, got CONNECTED*LEAK*",
            "bottle verdict: 6 cell(s) differ from what was expected",
        ]
    )
    result.stdout.fnmatch_lines(["sentinel:127.0.0.1 *blk/CONN! *blk/CONN!"])


@needs_root_netns
def test_unreachable_own_bundle_makes_the_rest_inconclusive(
    pytester: pytest.Pytester,
) -> None:
    """A bottle that reaches nothing proves nothing: the positive control."""
    result = pytester.runpytest_subprocess(
        *SUITE_ARGS, "--bottle-allowlist=127.0.0.99/32"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*INCONCLUSIVE*positive control failed*"])


@needs_root_netns
def test_a_killed_run_is_reaped_by_the_next_one(
    pytester: pytest.Pytester, private_state_dir: Path
) -> None:
    pytester.makepyfile(
        test_hang="""
        import time

        def test_hold(bottle):
            print("BOTTLE-UP", bottle.bottle_id, flush=True)
            time.sleep(120)
        """
    )
    env = dict(os.environ, BOTTLE_STATE_DIR=str(private_state_dir))
    hung = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-p",
            "no:cacheprovider",
            f"--bottle-pool={POOL}",
            "test_hang.py",
        ],
        cwd=pytester.path,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert hung.stdout is not None
    killed_run = ""
    for line in hung.stdout:
        found = re.search(r"BOTTLE-UP (\w+)-", line)
        if found:
            killed_run = found.group(1)
            break
    hung.send_signal(signal.SIGKILL)
    hung.wait()
    hung.stdout.close()
    left = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert f"bb-{killed_run}-" in left, "the killed run left nothing to reap"

    (pytester.path / "test_hang.py").unlink()
    pytester.makepyfile(test_next="def test_next(bottle):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--bottle-pool={POOL}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"bot-bottle: removed 1 leftover(s) of dead runs: {killed_run}-*"]
    )
    left = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert f"bb-{killed_run}-" not in left
    assert leftovers_of(result) == []
