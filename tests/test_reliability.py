"""A suite that survives interrupts, kills, parallel workers and bad state."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from benchmarks.soak import soak
from tests.conftest import needs_root_netns

POOL = "127.0.0.120-127.0.0.127"
SIXTEEN = "127.0.0.128-127.0.0.143"

HOLDING_TEST = """
import time

def test_hold(bottle):
    time.sleep(120)
"""


def names_of(run: str) -> list[str]:
    listing = (
        subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout
        + subprocess.run(
            ["nft", "list", "tables"], capture_output=True, text=True, check=True
        ).stdout
    )
    return [line for line in listing.splitlines() if run in line]


def start_holding_run(
    pytester: pytest.Pytester, state: Path, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    """A pytest run that holds one bottle; returns it and the bottle's run."""
    pytester.makepyfile(test_hold=HOLDING_TEST)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-p",
            "no:cacheprovider",
            f"--bottle-pool={POOL}",
            *extra,
            "test_hold.py",
        ],
        cwd=pytester.path,
        env=dict(os.environ, BOTTLE_STATE_DIR=str(state)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The lease store says when the bottle is up (xdist hides workers' output).
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        store = state / "leases.json"
        leases = json.loads(store.read_text()) if store.exists() else []
        if leases:
            return process, str(leases[0]["bottle_id"]).split("-")[0]
        assert process.poll() is None, "the run ended before its bottle was up"
        time.sleep(0.1)
    raise AssertionError("no bottle came up within 60 s")


@needs_root_netns
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_tears_everything_down(
    pytester: pytest.Pytester, private_state_dir: Path, signum: signal.Signals
) -> None:
    process, run = start_holding_run(pytester, private_state_dir)
    assert names_of(run), "the bottle is not there"

    process.send_signal(signum)
    output, _ = process.communicate(timeout=60)

    assert process.returncode != 0
    assert "KeyboardInterrupt" in output or "Interrupted" in output, output
    assert names_of(run) == []
    assert (private_state_dir / "leases.json").read_text().strip() == "[]"


INTERRUPTED_TEARDOWN = """
import os
import signal

from bottle.backends import netns

_remove = netns.NetnsBackend.remove


def remove(self, bottle_id, handle):
    # Ctrl-C arrives while the bottles are being removed.
    os.kill(os.getpid(), signal.SIGINT)
    _remove(self, bottle_id, handle)


netns.NetnsBackend.remove = remove


def test_four(bottle_factory):
    bottles = bottle_factory.start_many([bottle_factory.spec(n) for n in "wxyz"])
    for bottle in bottles[:2]:
        bottle_factory.stop(bottle)
"""


@needs_root_netns
def test_an_interrupt_during_teardown_waits_for_it_to_finish(
    pytester: pytest.Pytester, private_state_dir: Path
) -> None:
    """A teardown cut short once left a namespace with its rules gone."""
    pytester.makepyfile(test_four=INTERRUPTED_TEARDOWN)
    result = pytester.runpytest_subprocess(f"--bottle-pool={POOL}", "-s")

    output = result.stdout.str() + result.stderr.str()
    assert result.ret != 0
    assert "KeyboardInterrupt" in output, output
    run = re.search(r"bot-bottle: backend netns, run (\w+)", output)
    assert run is not None, output
    assert names_of(run.group(1)) == []
    assert (private_state_dir / "leases.json").read_text().strip() == "[]"


@needs_root_netns
def test_a_killed_xdist_worker_is_reaped_by_the_next_run(
    pytester: pytest.Pytester, private_state_dir: Path
) -> None:
    process, run = start_holding_run(pytester, private_state_dir, "-n", "1")
    workers = psutil.Process(process.pid).children(recursive=True)
    # The controller first: alive, it would start a new worker, whose session
    # would reap the dead worker's bottle before the next run could.
    process.send_signal(signal.SIGKILL)
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert names_of(run), "the killed worker left nothing to reap"

    (pytester.path / "test_hold.py").unlink()
    pytester.makepyfile(test_next="def test_next(bottle):\n    pass\n")
    result = pytester.runpytest_subprocess(f"--bottle-pool={POOL}")

    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [f"bot-bottle: removed 1 leftover(s) of dead runs: {run}*"]
    )
    assert names_of(run) == []


TWO_WORKERS = """
import json, time
from pathlib import Path
import pytest
from bottle.errors import PoolExhausted

SHARED = Path({shared!r})

def hold_eight(factory, tag):
    bottles = [factory.start(f"{{tag}}{{i}}") for i in range(8)]
    (SHARED / tag).write_text(json.dumps([b.alias for b in bottles]))
    deadline = time.monotonic() + 60
    while len(list(SHARED.iterdir())) < 2:
        assert time.monotonic() < deadline, "the other worker never held its 8"
        time.sleep(0.05)
    return bottles

def test_first(bottle_factory):
    hold_eight(bottle_factory, "p")
    {seventeenth}

def test_second(bottle_factory):
    bottles = hold_eight(bottle_factory, "q")
    time.sleep(0.5)
    for bottle in bottles:
        bottle_factory.stop(bottle)
"""

FAILS_AT_ONCE = """with pytest.raises(PoolExhausted) as refused:
        bottle_factory.start("late")
    assert len(refused.value.holders) == 16"""

WAITS_FOR_ONE = """late = bottle_factory.start("late")
    assert late.alias"""


@needs_root_netns
@pytest.mark.parametrize(
    ("seventeenth", "wait"),
    [(FAILS_AT_ONCE, "0"), (WAITS_FOR_ONE, "30")],
    ids=["fails-at-once", "waits-for-a-free-alias"],
)
def test_sixteen_bottles_on_two_workers_and_a_seventeenth(
    pytester: pytest.Pytester, tmp_path: Path, seventeenth: str, wait: str
) -> None:
    shared = tmp_path / "held"
    shared.mkdir()
    pytester.makepyfile(
        test_sixteen=TWO_WORKERS.format(shared=str(shared), seventeenth=seventeenth)
    )

    result = pytester.runpytest_subprocess(
        "-n",
        "2",
        "-p",
        "no:cacheprovider",
        f"--bottle-pool={SIXTEEN}",
        f"--bottle-pool-wait={wait}",
    )

    result.assert_outcomes(passed=2)
    aliases = [
        alias for path in shared.iterdir() for alias in json.loads(path.read_text())
    ]
    assert len(aliases) == 16
    assert len(set(aliases)) == 16


@needs_root_netns
@pytest.mark.parametrize(
    "content", ["", '[{"alias": ', "not json at all"], ids=["empty", "cut", "garbage"]
)
def test_a_corrupt_lease_store_is_refused_not_reset(
    pytester: pytest.Pytester, private_state_dir: Path, content: str
) -> None:
    private_state_dir.mkdir(parents=True)
    store = private_state_dir / "leases.json"
    store.write_text(content)
    pytester.makepyfile(test_one="def test_one(bottle):\n    pass\n")

    result = pytester.runpytest_subprocess(f"--bottle-pool={POOL}")

    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: lease store {store}: *"])
    assert store.read_text() == content


@needs_root_netns
def test_a_lock_file_left_by_a_dead_process_does_not_block(
    pytester: pytest.Pytester, private_state_dir: Path
) -> None:
    private_state_dir.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import filelock, sys, time; l = filelock.FileLock(sys.argv[1]); "
            "l.acquire(); print('held', flush=True); time.sleep(60)",
            str(private_state_dir / "leases.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    holder.stdout.close()
    pytester.makepyfile(test_one="def test_one(bottle):\n    pass\n")

    started = time.monotonic()
    result = pytester.runpytest_subprocess(f"--bottle-pool={POOL}")

    result.assert_outcomes(passed=1)
    assert time.monotonic() - started < 60


@needs_root_netns
def test_soak_leaks_nothing(private_state_dir: Path) -> None:
    """The short soak; `benchmarks/soak.py --cycles 200` is the full one."""
    figures = soak(20, private_state_dir)
    assert figures["cycles"] == 20
