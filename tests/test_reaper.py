"""The reaper, against real leftovers: namespaces, nftables tables and leases
that a SIGKILLed process left behind."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bottle.backends import BackendConfig
from bottle.backends.netns import NetnsBackend, host_veth_name, netns_name, table_name
from bottle.launcher import new_run_label, reap
from bottle.pool import AliasPool, AliasRange, Owner
from bottle.runs import RunRegistry
from tests.conftest import needs_root_netns, run_bottle

pytestmark = needs_root_netns

POOL = "127.0.0.48-127.0.0.55"

#: A second process that starts bottles through the library, says which, and
#: then waits: for a line on stdin (it stops its bottles) or for SIGKILL.
CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    from bottle.backends import BackendConfig, load_backend
    from bottle.launcher import Launcher
    from bottle.pool import AliasPool, AliasRange
    from bottle.spec import spec_from_mapping

    state_dir, pool_text, run, *names = sys.argv[1:]
    pool = AliasPool(AliasRange.parse(pool_text), Path(state_dir))
    backend = load_backend("netns", BackendConfig(Path(state_dir)))
    launcher = Launcher(backend, pool, run=run)
    for name in names:
        bottle = launcher.start(spec_from_mapping({"name": name}))
        print(bottle.bottle_id, bottle.alias, bottle.bundle_ports["echo"], flush=True)
    print("ready", flush=True)
    sys.stdin.readline()
    launcher.stop_all()
    """
)


class Host:
    """What this test's bottles hold on the host, and how to clean it up."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.pool = AliasPool(AliasRange.parse(POOL), state_dir)
        self.backend = NetnsBackend(BackendConfig(state_dir))
        self.children: list[subprocess.Popen[str]] = []
        self.ids: set[str] = set()

    def start_child(self, run: str, *names: str) -> dict[str, tuple[str, int]]:
        """Start ``names`` in a child process; returns alias and port by id."""
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(self.state_dir), POOL, run, *names],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.children.append(child)
        self.ids.update(f"{run}-{name}" for name in names)
        assert child.stdout is not None
        started: dict[str, tuple[str, int]] = {}
        for line in child.stdout:
            if line.strip() == "ready":
                return started
            bottle_id, alias, port = line.split()
            started[bottle_id] = (alias, int(port))
        raise AssertionError(f"the child exited {child.wait()} before it was ready")

    def names_of(self, run: str) -> set[str]:
        """Namespaces, tables and host veths that the run ``run`` holds."""
        veths = {host_veth_name(bottle_id) for bottle_id in self.ids}
        listing = "\n".join(
            subprocess.run(argv, capture_output=True, text=True, check=True).stdout
            for argv in (
                ["ip", "netns", "list"],
                ["nft", "list", "tables"],
                ["ip", "-o", "link", "show"],
            )
        )
        found = set()
        for word in listing.replace(":", " ").replace("@", " ").split():
            if run in word or word in veths:
                found.add(word)
        return found

    def lease_ids(self) -> set[str]:
        return {lease.bottle_id for lease in self.pool.leases()}

    def clean_up(self) -> None:
        for child in self.children:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=10)
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
        for bottle_id in self.ids:
            self.backend.remove(bottle_id, {})
        for bottle_id in self.ids:
            self.pool.release(bottle_id)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    """This test's lease store, backend and child processes, always cleaned up."""
    tracker = Host(tmp_path / "reaper-state")
    yield tracker
    tracker.clean_up()


def test_reap_removes_what_a_killed_run_left(host: Host) -> None:
    run = new_run_label()
    before = (host.names_of(run), host.lease_ids())

    started = host.start_child(run, "one", "two")
    host.children[0].send_signal(signal.SIGKILL)
    host.children[0].wait(timeout=10)

    ids = {f"{run}-one", f"{run}-two"}
    assert set(started) == ids
    assert host.lease_ids() == ids
    assert all(not lease.owner.is_alive() for lease in host.pool.leases())
    left = host.names_of(run)
    for bottle_id in ids:
        assert netns_name(bottle_id) in left
        assert table_name(bottle_id) in left
        assert host_veth_name(bottle_id) in left

    removed = reap(host.backend, host.pool)

    # Another run's leftovers may be reaped too: the reaper works host-wide.
    assert ids <= set(removed)
    # The kernel finishes destroying a namespace's veth in the background.
    deadline = time.monotonic() + 10
    while host.names_of(run) != before[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (host.names_of(run), host.lease_ids()) == before


@pytest.mark.parametrize(
    "kinds",
    [("netns", "table"), ("netns",), ("table",)],
    ids=["netns-and-table", "netns-only", "table-only"],
)
def test_reap_removes_leftovers_of_a_dead_run_that_have_no_lease(
    host: Host,
    kinds: tuple[str, ...],
    dead_owner: Owner,
    request: pytest.FixtureRequest,
) -> None:
    """The lease may live in a lost state directory; the run registry, which is
    host-wide, says its owner is dead."""
    bottle_id = "deadbe-x"
    host.ids.add(bottle_id)
    registry = RunRegistry()
    registry.register("deadbe", dead_owner)
    request.addfinalizer(lambda: registry.unregister("deadbe"))
    if "netns" in kinds:
        subprocess.run(["ip", "netns", "add", netns_name(bottle_id)], check=True)
    if "table" in kinds:
        subprocess.run(
            ["nft", "add", "table", "inet", table_name(bottle_id)], check=True
        )
    assert host.names_of("deadbe") == {
        {"netns": "bb-deadbe-x", "table": "bottle_deadbe_x"}[kind] for kind in kinds
    }

    removed = reap(host.backend, host.pool)

    assert bottle_id in removed
    assert host.names_of("deadbe") == set()


def test_reap_leaves_leftovers_of_runs_it_cannot_account_for(host: Host) -> None:
    """No lease here and no run record: another lease store may own it."""
    bottle_id = "0ther5-x"
    host.ids.add(bottle_id)
    RunRegistry().unregister("0ther5")
    subprocess.run(["ip", "netns", "add", netns_name(bottle_id)], check=True)

    removed = reap(host.backend, host.pool)

    assert bottle_id not in removed
    assert netns_name(bottle_id) in host.names_of("0ther5")


@pytest.fixture
def dead_owner() -> Owner:
    """The identity of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    owner = Owner.of_pid(child.pid)
    child.wait()
    return owner


def test_reap_never_touches_a_live_owners_bottle(host: Host) -> None:
    run = new_run_label()
    started = host.start_child(run, "live")
    child = host.children[0]
    (bottle_id, (alias, port)), *_ = started.items()
    holding = host.names_of(run)

    # Reap from this process and from a third one, as a second terminal would.
    removed_here = reap(host.backend, host.pool)
    third = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path;"
            "from bottle.backends import BackendConfig, load_backend;"
            "from bottle.launcher import reap;"
            "from bottle.pool import AliasPool, AliasRange;"
            "state = Path(sys.argv[1]);"
            "pool = AliasPool(AliasRange.parse(sys.argv[2]), state);"
            "print(reap(load_backend('netns', BackendConfig(state)), pool))",
            str(host.state_dir),
            POOL,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )

    assert bottle_id not in removed_here
    assert bottle_id not in third.stdout
    assert host.names_of(run) == holding
    assert host.lease_ids() == {bottle_id}
    with socket.create_connection((alias, port), timeout=5) as conn:
        conn.sendall(b"still-here\n")
        assert conn.makefile("rb").readline() == b"still-here\n"

    # The owner then stops its own bottle cleanly.
    assert child.stdin is not None
    child.stdin.write("stop\n")
    child.stdin.flush()
    assert child.wait(timeout=30) == 0
    assert host.names_of(run) == set()
    assert host.lease_ids() == set()


def test_bottle_down_reaps_a_bottle_whose_keeper_was_killed(host: Host) -> None:
    def bottle(*args: str) -> subprocess.CompletedProcess[str]:
        return run_bottle(*args, state_dir=host.state_dir, BOTTLE_POOL=POOL)

    up = bottle("up", "--name", "orphan")
    assert up.returncode == 0, up.stderr
    (lease,) = host.pool.leases()
    host.ids.add(lease.bottle_id)
    keeper = psutil.Process(lease.owner.pid)
    keeper.kill()
    keeper.wait(timeout=10)
    run = lease.bottle_id.split("-", 1)[0]
    # Its namespace may already be gone: any reaper on the host, in any lease
    # store, takes a dead bottle's resources.  The lease is this store's own.
    assert "(dead)" in bottle("ls").stdout

    down = bottle("down", "orphan")

    assert down.returncode == 0, down.stderr
    assert host.names_of(run) == set()
    assert host.lease_ids() == set()
