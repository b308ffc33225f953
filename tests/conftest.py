"""Shared set-up of the project's own tests.

Every test runs with its own lease store, and nothing a test does may send a
packet off this machine: outside targets are stand-ins such as 198.51.100.53.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: The stand-in egress target of the project's own tests (TEST-NET-2).
STANDIN_EGRESS = "198.51.100.53:53"
#: How many tests the conformance suite has with its default two bottles.
SUITE_TESTS_OF_TWO_BOTTLES = 26


def run_bottle(
    *args: str, state_dir: Path, timeout: float = 60.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the `bottle` command as a user would, with its own lease store and
    any other environment variables given (``BOTTLE_POOL="..."``)."""
    return subprocess.run(
        [sys.executable, "-m", "bottle.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "BOTTLE_STATE_DIR": str(state_dir), **env},
        timeout=timeout,
        check=False,
    )


needs_root_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="needs root and nftables (`nft`) to create namespaces and rules",
)


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own lease store, never the user's."""
    state = tmp_path / "state"
    monkeypatch.setenv("BOTTLE_STATE_DIR", str(state))
    monkeypatch.setenv("COLUMNS", "80")
    return state
