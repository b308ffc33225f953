"""The loopback alias pool, with real files, real locks and real processes."""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import bottle.pool
from bottle.errors import BottleUsageError, LeaseStoreError, PoolExhausted
from bottle.pool import DEFAULT_POOL, AliasPool, AliasRange, Lease, Owner

SMALL_POOL = "127.0.0.16/30"
SMALL_ALIASES = ["127.0.0.16", "127.0.0.17", "127.0.0.18", "127.0.0.19"]
LOOPBACK_LOW = int(ipaddress.IPv4Address("127.0.0.0"))
LOOPBACK_HIGH = int(ipaddress.IPv4Address("127.255.255.255"))
LOCALHOST = int(ipaddress.IPv4Address("127.0.0.1"))


def every_alias_configured(alias: str) -> bool:
    return True


def make_pool(state_dir: Path, text: str = SMALL_POOL) -> AliasPool:
    return AliasPool(
        AliasRange.parse(text), state_dir, alias_is_configured=every_alias_configured
    )


def dead_owner_of_this_pid() -> Owner:
    """An owner whose pid is alive but whose start time is not that process's."""
    return Owner(os.getpid(), Owner.current().started - 3600.0)


# Child processes import the library the way a second terminal would.
CHILD_PRELUDE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from bottle.pool import AliasPool, AliasRange
    def pool(state_dir, text):
        return AliasPool(
            AliasRange.parse(text), Path(state_dir),
            alias_is_configured=lambda alias: True,
        )
    """
)


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start processes that are always killed and reaped when the test ends."""
    started: list[subprocess.Popen[str]] = []

    def start(*argv: str, stdin: int | None = None) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        return process

    yield start

    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def read_line(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        assert process.stderr is not None
        process.wait(timeout=30)
        raise AssertionError(f"child exited early: {process.stderr.read()}")
    return line


def python_child(
    spawn: Callable[..., subprocess.Popen[str]],
    script: str,
    *args: str,
    stdin: int | None = None,
) -> subprocess.Popen[str]:
    code = CHILD_PRELUDE + textwrap.dedent(script)
    return spawn(sys.executable, "-c", code, *args, stdin=stdin)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


# --- AliasRange.parse -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "first", "last"),
    [
        ("127.0.0.16/28", "127.0.0.16", "127.0.0.31"),
        ("127.0.0.16-127.0.0.31", "127.0.0.16", "127.0.0.31"),
        (" 127.0.0.16 - 127.0.0.31 ", "127.0.0.16", "127.0.0.31"),
        ("127.0.0.20/28", "127.0.0.16", "127.0.0.31"),
        ("127.0.0.20", "127.0.0.20", "127.0.0.20"),
        ("127.0.0.0", "127.0.0.0", "127.0.0.0"),
        ("127.1.0.0/16", "127.1.0.0", "127.1.255.255"),
        ("127.0.0.2-127.255.255.254", "127.0.0.2", "127.255.255.254"),
    ],
)
def test_parse_accepts_cidr_and_first_last_forms(
    text: str, first: str, last: str
) -> None:
    parsed = AliasRange.parse(text)

    assert (str(parsed.first), str(parsed.last)) == (first, last)
    assert len(parsed) == int(parsed.last) - int(parsed.first) + 1


def test_default_pool_is_sixteen_aliases_from_127_0_0_16() -> None:
    parsed = AliasRange.parse(DEFAULT_POOL)

    assert len(parsed) == 16
    assert [str(a) for a in parsed.addresses()] == [
        f"127.0.0.{n}" for n in range(16, 32)
    ]
    assert "127.0.0.16" in parsed
    assert "127.0.0.32" not in parsed
    assert "not an address" not in parsed


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("10.0.0.16-10.0.0.31", "leaves 127.0.0.0/8"),
        ("192.168.1.0/24", "leaves 127.0.0.0/8"),
        ("127.0.0.16-128.0.0.2", "leaves 127.0.0.0/8"),
        ("126.255.255.250-127.0.0.20", "leaves 127.0.0.0/8"),
        ("127.0.0.0/8", "contains 127.0.0.1"),
        ("127.0.0.0/30", "contains 127.0.0.1"),
        ("127.0.0.1", "contains 127.0.0.1"),
        ("127.0.0.1-127.0.0.31", "contains 127.0.0.1"),
        ("127.255.255.0/24", "broadcast"),
        ("127.0.0.31-127.0.0.16", "empty"),
        ("garbage", "not an address range"),
        ("", "not an address range"),
        ("127.0.0.16-", "not an address range"),
        ("127.0.0.16/33", "not an address range"),
        ("127.0.0.300-127.0.0.301", "not an address range"),
        ("::1/128", "not an address range"),
        ("127.0.0.16-127.0.0.17-127.0.0.18", "not an address range"),
    ],
)
def test_parse_rejects_bad_range_in_one_line_naming_input_and_choices(
    text: str, problem: str
) -> None:
    with pytest.raises(BottleUsageError) as caught:
        AliasRange.parse(text)

    message = str(caught.value)
    assert caught.value.what == f"alias pool {text!r}"
    assert message.startswith(f"alias pool {text!r}: ")
    assert problem in message
    assert "a CIDR or first-last range inside 127.0.0.0/8 without 127.0.0.1" in message
    assert "\n" not in message


usable_addresses = st.integers(min_value=LOCALHOST + 1, max_value=LOOPBACK_HIGH - 1)


@given(usable_addresses, usable_addresses)
def test_parse_accepts_any_range_inside_loopback_without_localhost(
    one: int, other: int
) -> None:
    first, last = sorted((one, other))
    text = f"{ipaddress.IPv4Address(first)}-{ipaddress.IPv4Address(last)}"

    parsed = AliasRange.parse(text)

    assert (int(parsed.first), int(parsed.last)) == (first, last)
    assert len(parsed) == last - first + 1
    assert str(AliasRange.parse(str(parsed))) == str(parsed)


@given(st.integers(min_value=10, max_value=32), st.data())
def test_parse_accepts_any_cidr_inside_loopback_without_localhost(
    prefix: int, data: st.DataObject
) -> None:
    index = data.draw(st.integers(min_value=0, max_value=2 ** (prefix - 8) - 1))
    network = ipaddress.IPv4Network((LOOPBACK_LOW + (index << (32 - prefix)), prefix))
    assume(LOCALHOST not in range(int(network[0]), int(network[-1]) + 1))
    assume(int(network[-1]) != LOOPBACK_HIGH)

    parsed = AliasRange.parse(str(network))

    assert (parsed.first, parsed.last) == (network[0], network[-1])
    assert len(parsed) == network.num_addresses


@given(
    st.integers(min_value=LOOPBACK_LOW, max_value=LOCALHOST),
    st.integers(min_value=LOCALHOST, max_value=LOOPBACK_HIGH),
)
def test_parse_rejects_any_range_containing_localhost(first: int, last: int) -> None:
    text = f"{ipaddress.IPv4Address(first)}-{ipaddress.IPv4Address(last)}"

    with pytest.raises(BottleUsageError, match=r"127\.0\.0\.1"):
        AliasRange.parse(text)


def test_pool_from_environment_prefers_explicit_then_variable_then_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BOTTLE_POOL", raising=False)
    assert str(bottle.pool.pool_from_environment()) == DEFAULT_POOL

    monkeypatch.setenv("BOTTLE_POOL", "127.0.0.64/29")
    assert str(bottle.pool.pool_from_environment()) == "127.0.0.64-127.0.0.71"
    assert str(bottle.pool.pool_from_environment(SMALL_POOL)) == (
        "127.0.0.16-127.0.0.19"
    )

    monkeypatch.setenv("BOTTLE_POOL", "10.0.0.0/8")
    with pytest.raises(BottleUsageError, match=r"10\.0\.0\.0/8"):
        bottle.pool.pool_from_environment()


# --- Leases ------------------------------------------------------------------


def test_sixteen_bottles_hold_the_sixteen_default_aliases_and_a_17th_is_refused(
    tmp_path: Path,
) -> None:
    pool = make_pool(tmp_path, DEFAULT_POOL)

    leases = [pool.acquire(f"bottle-{n}", backend="netns") for n in range(16)]

    assert [lease.alias for lease in leases] == [f"127.0.0.{n}" for n in range(16, 32)]
    assert pool.leases() == leases
    with pytest.raises(PoolExhausted) as caught:
        pool.acquire("bottle-16")
    exhausted = caught.value
    assert exhausted.pool == "127.0.0.16-127.0.0.31"
    assert len(exhausted.holders) == 16
    for lease in leases:
        assert lease.describe() in exhausted.holders
        assert f"{lease.alias} by bottle {lease.bottle_id} " in str(exhausted)
    assert "bottle-16" not in str(exhausted)
    assert pickle.loads(pickle.dumps(exhausted)).holders == exhausted.holders


def test_released_alias_is_leased_again_lowest_first(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    for n in range(4):
        pool.acquire(f"b{n}")

    released = pool.release("b2")
    again = pool.acquire("b4")

    assert released is not None
    assert released.alias == again.alias == "127.0.0.18"
    assert pool.release("b2") is None
    assert pool.release("never-leased") is None


def test_acquire_refuses_a_bottle_that_already_holds_a_lease(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    pool.acquire("twice")

    with pytest.raises(BottleUsageError, match=r"'twice'.*already holds a lease"):
        pool.acquire("twice")
    assert [lease.bottle_id for lease in pool.leases()] == ["twice"]


def test_acquire_refuses_an_alias_missing_from_loopback_and_names_setup(
    tmp_path: Path,
) -> None:
    pool = AliasPool(
        AliasRange.parse(SMALL_POOL),
        tmp_path,
        alias_is_configured=lambda alias: alias != "127.0.0.16",
    )

    with pytest.raises(BottleUsageError, match=r"127\.0\.0\.16.*bottle setup"):
        pool.acquire("b")
    assert pool.leases() == []


def test_update_changes_owner_and_handle_and_keeps_alias(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    lease = pool.acquire("b", backend="netns", run="run-1")
    new_owner = Owner.of_pid(os.getppid())

    updated = pool.update("b", owner=new_owner, handle={"netns": "bottle-b"})

    assert updated.alias == lease.alias
    assert updated.owner == new_owner
    assert (updated.backend, updated.run) == ("netns", "run-1")
    assert make_pool(tmp_path).leases() == [updated]
    with pytest.raises(LeaseStoreError, match="no lease for bottle 'other'"):
        pool.update("other", handle={})


def test_acquire_waits_for_a_release_by_another_process(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    holder = python_child(
        spawn,
        """
        p = pool(sys.argv[1], sys.argv[2])
        for n in range(4):
            p.acquire(f"held-{n}")
        print("ready", flush=True)
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.005)
        time.sleep(0.3)
        p.release("held-2")
        sys.stdin.read()
        """,
        str(tmp_path / "state"),
        SMALL_POOL,
        str(tmp_path / "go"),
        stdin=subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert read_line(holder) == "ready\n"
    pool = make_pool(tmp_path / "state")
    started = time.monotonic()
    (tmp_path / "go").touch()

    lease = pool.acquire("waiter", wait_seconds=15.0)

    waited = time.monotonic() - started
    assert lease.alias == "127.0.0.18"
    assert 0.3 <= waited < 15.0
    assert holder.poll() is None
    holder.stdin.close()
    assert holder.wait(timeout=30) == 0


def test_acquire_gives_up_after_wait_seconds_when_nobody_releases(
    tmp_path: Path,
) -> None:
    pool = make_pool(tmp_path)
    for n in range(4):
        pool.acquire(f"held-{n}")
    started = time.monotonic()

    with pytest.raises(PoolExhausted) as caught:
        pool.acquire("waiter", wait_seconds=0.5)

    waited = time.monotonic() - started
    assert 0.5 <= waited < 3.0
    assert len(caught.value.holders) == 4


# --- Dead owners ---------------------------------------------------------------


def test_lease_of_a_process_that_exited_is_reclaimed_on_next_acquire(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    child = python_child(
        spawn,
        """
        p = pool(sys.argv[1], sys.argv[2])
        print(p.acquire("child-bottle").alias)
        """,
        str(tmp_path),
        SMALL_POOL,
    )
    output, errors = child.communicate(timeout=60)
    assert child.returncode == 0, errors
    assert output.strip() == "127.0.0.16"
    pool = make_pool(tmp_path)
    [orphan] = pool.leases()
    assert orphan.owner.pid == child.pid
    assert not orphan.owner.is_alive()
    reclaimed: list[Lease] = []

    lease = pool.acquire("next", reclaim=reclaimed.append)

    assert reclaimed == [orphan]
    assert lease.alias == "127.0.0.16"
    assert pool.leases() == [lease]


def test_owner_recorded_from_a_live_child_is_dead_once_the_child_exits(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    child = spawn("sleep", "30")
    owner = Owner.of_pid(child.pid)
    pool = make_pool(tmp_path)
    held = pool.acquire("short-lived", owner=owner)
    assert owner.is_alive()
    assert pool.reclaim() == []

    child.kill()
    child.wait(timeout=10)

    assert not owner.is_alive()
    assert pool.acquire("next").alias == held.alias
    assert [lease.bottle_id for lease in pool.leases()] == ["next"]


def test_unreaped_zombie_owner_counts_as_dead(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    child = spawn("sleep", "30")
    owner = Owner.of_pid(child.pid)
    pool = make_pool(tmp_path)
    held = pool.acquire("zombie", owner=owner)

    os.kill(child.pid, 9)
    wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)

    assert not owner.is_alive()
    assert pool.reclaim() == [held]
    assert pool.leases() == []


@pytest.mark.parametrize(
    "owner_factory",
    [
        pytest.param(dead_owner_of_this_pid, id="this-pid-started-earlier"),
        pytest.param(
            lambda: Owner(os.getpid(), Owner.current().started + 0.01),
            id="this-pid-started-10ms-later",
        ),
        pytest.param(lambda: Owner(1, 0.0), id="init-pid-started-at-epoch"),
    ],
)
def test_live_pid_with_another_start_time_counts_as_dead(
    tmp_path: Path, owner_factory: Callable[[], Owner]
) -> None:
    reused = owner_factory()
    assert psutil.pid_exists(reused.pid)
    assert Owner.current().is_alive()
    pool = make_pool(tmp_path)
    held = pool.acquire("reused-pid", owner=reused)
    reclaimed: list[Lease] = []

    lease = pool.acquire("next", reclaim=reclaimed.append)

    assert not reused.is_alive()
    assert reclaimed == [held]
    assert lease.alias == held.alias


def test_failing_reclaim_callback_keeps_the_dead_lease(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    dead = pool.acquire("dead", owner=dead_owner_of_this_pid())
    seen: list[Lease] = []

    def cleanup_fails(lease: Lease) -> None:
        seen.append(lease)
        raise RuntimeError("the dead bottle's namespace is busy")

    lease = pool.acquire("next", reclaim=cleanup_fails)

    assert seen == [dead]
    assert lease.alias == "127.0.0.17"
    assert pool.leases() == [dead, lease]
    assert pool.reclaim(cleanup_fails) == []
    assert pool.leases() == [dead, lease]
    assert pool.reclaim() == [dead]
    assert pool.leases() == [lease]


def test_live_owners_are_never_reclaimed(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    held = [pool.acquire(f"b{n}") for n in range(4)]

    def must_not_be_called(lease: Lease) -> None:
        raise AssertionError(f"reclaimed live {lease.describe()}")

    assert pool.reclaim(must_not_be_called) == []
    with pytest.raises(PoolExhausted):
        pool.acquire("b4", reclaim=must_not_be_called)
    assert pool.leases() == held


# --- Model-based state machine -------------------------------------------------

MAX_LIVE_OWNERS = 4


def test_pool_matches_a_plain_model_under_acquire_release_death_reclaim(
    tmp_path: Path,
) -> None:
    class PoolMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.state_dir = Path(tempfile.mkdtemp(dir=tmp_path))
            self.pool = make_pool(self.state_dir)
            self.processes: list[subprocess.Popen[bytes] | None] = []
            self.owners: list[Owner] = []
            self.alive: list[bool] = []
            self.model: dict[str, tuple[str, int]] = {}
            self.bottles: list[str] = []

        def live_owners(self) -> list[int]:
            return [index for index, alive in enumerate(self.alive) if alive]

        def dead_in_model(self) -> dict[str, tuple[str, int]]:
            return {
                alias: held
                for alias, held in self.model.items()
                if not self.alive[held[1]]
            }

        @precondition(lambda self: len(self.live_owners()) < MAX_LIVE_OWNERS)
        @rule()
        def start_owner(self) -> None:
            process = subprocess.Popen(["sleep", "120"])
            self.processes.append(process)
            self.owners.append(Owner.of_pid(process.pid))
            self.alive.append(True)

        @precondition(lambda self: any(self.alive))
        @rule(choice=st.integers(min_value=0, max_value=MAX_LIVE_OWNERS - 1))
        def acquire(self, choice: int) -> None:
            live = self.live_owners()
            self.acquire_as(live[choice % len(live)])

        @rule()
        def acquire_for_owner_whose_pid_was_reused(self) -> None:
            # A keeper that died right after leasing, its pid since taken over.
            self.processes.append(None)
            self.owners.append(dead_owner_of_this_pid())
            self.alive.append(False)
            self.acquire_as(len(self.owners) - 1)

        def acquire_as(self, owner_index: int) -> None:
            bottle_id = f"bottle-{len(self.bottles)}"
            self.bottles.append(bottle_id)
            dead = self.dead_in_model()
            reclaimed: list[Lease] = []

            try:
                lease = self.pool.acquire(
                    bottle_id,
                    owner=self.owners[owner_index],
                    reclaim=reclaimed.append,
                )
            except PoolExhausted as exhausted:
                lease = None
                holders = exhausted.holders
            else:
                holders = []

            assert {r.bottle_id for r in reclaimed} == {b for b, _ in dead.values()}
            for alias in dead:
                del self.model[alias]
            free = [alias for alias in SMALL_ALIASES if alias not in self.model]
            if free:
                assert lease is not None
                assert lease.alias == free[0]
                assert lease.owner == self.owners[owner_index]
                self.model[free[0]] = (bottle_id, owner_index)
            else:
                assert lease is None
                assert len(holders) == len(SMALL_ALIASES)
                assert all(self.alive[index] for _, index in self.model.values())

        @precondition(lambda self: bool(self.bottles))
        @rule(choice=st.integers(min_value=0, max_value=50))
        def release(self, choice: int) -> None:
            bottle_id = self.bottles[choice % len(self.bottles)]
            held = [a for a, (b, _) in self.model.items() if b == bottle_id]

            released = self.pool.release(bottle_id)

            if held:
                assert released is not None
                assert released.alias == held[0]
                del self.model[held[0]]
            else:
                assert released is None

        @precondition(lambda self: any(self.alive))
        @rule(
            choice=st.integers(min_value=0, max_value=MAX_LIVE_OWNERS - 1),
            reap=st.booleans(),
        )
        def owner_dies(self, choice: int, reap: bool) -> None:
            holding = {index for _, index in self.model.values()}
            live = self.live_owners()
            candidates = [index for index in live if index in holding] or live
            index = candidates[choice % len(candidates)]
            process = self.processes[index]
            assert process is not None

            process.kill()
            if reap:
                process.wait(timeout=10)
            else:
                wait_until(
                    lambda: psutil.Process(process.pid).status() == psutil.STATUS_ZOMBIE
                )
            self.alive[index] = False

        @precondition(lambda self: bool(self.dead_in_model()))
        @rule(cleanup_fails=st.booleans())
        def reclaim(self, cleanup_fails: bool) -> None:
            dead = self.dead_in_model()
            seen: list[Lease] = []

            def cleanup(lease: Lease) -> None:
                seen.append(lease)
                if cleanup_fails:
                    raise RuntimeError("cannot clean up")

            dropped = self.pool.reclaim(cleanup)

            assert {s.bottle_id for s in seen} == {b for b, _ in dead.values()}
            if cleanup_fails:
                assert dropped == []
            else:
                assert {d.alias for d in dropped} == set(dead)
                for alias in dead:
                    del self.model[alias]

        @invariant()
        def store_matches_model(self) -> None:
            if not self.pool.path.exists():
                assert not self.model
                return
            records = json.loads(self.pool.path.read_text(encoding="utf-8"))
            aliases = [record["alias"] for record in records]
            bottle_ids = [record["bottle_id"] for record in records]

            assert len(set(aliases)) == len(aliases)
            assert len(set(bottle_ids)) == len(bottle_ids)
            assert all(alias in SMALL_ALIASES for alias in aliases)
            assert {
                lease.alias: (lease.bottle_id, lease.owner)
                for lease in map(Lease.from_json, records)
            } == {
                alias: (bottle_id, self.owners[index])
                for alias, (bottle_id, index) in self.model.items()
            }

        def teardown(self) -> None:
            for process in filter(None, self.processes):
                if process.poll() is None:
                    process.kill()
                process.wait(timeout=10)
            shutil.rmtree(self.state_dir, ignore_errors=True)

    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


# --- Real race between processes ---------------------------------------------

RACER = """
import json, random
state_dir, text, name, cycles, markers, go = sys.argv[1:7]
p = pool(state_dir, text)
Path(markers, f"ready-{name}").touch()
while not os.path.exists(go):
    time.sleep(0.002)
holds = []
for cycle in range(int(cycles)):
    bottle_id = f"{name}-{cycle}"
    lease = p.acquire(bottle_id, wait_seconds=60)
    start = time.monotonic()
    marker = os.path.join(markers, lease.alias)
    try:
        descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        sys.exit(f"DUPLICATE {lease.alias}: {bottle_id} found {marker}")
    os.close(descriptor)
    stored = {held.alias: held.bottle_id for held in p.leases()}
    if stored.get(lease.alias) != bottle_id:
        sys.exit(f"STORE {lease.alias} shows {stored.get(lease.alias)}")
    time.sleep(random.uniform(0, 0.01))
    os.unlink(marker)
    end = time.monotonic()
    p.release(bottle_id)
    holds.append([lease.alias, bottle_id, start, end])
print(json.dumps(holds))
"""

RACERS = 16
CYCLES = 4


def test_sixteen_processes_racing_never_hold_the_same_alias_at_once(
    tmp_path: Path, spawn: Callable[..., subprocess.Popen[str]]
) -> None:
    state_dir = tmp_path / "state"
    markers = tmp_path / "markers"
    markers.mkdir()
    go = tmp_path / "go"
    racers = [
        python_child(
            spawn,
            RACER,
            str(state_dir),
            SMALL_POOL,
            f"racer{n}",
            str(CYCLES),
            str(markers),
            str(go),
        )
        for n in range(RACERS)
    ]
    wait_until(
        lambda: (
            len(list(markers.glob("ready-*"))) == RACERS
            or any(racer.poll() is not None for racer in racers)
        ),
        timeout=60,
    )
    go.touch()

    holds: list[tuple[str, str, float, float]] = []
    for racer in racers:
        output, errors = racer.communicate(timeout=120)
        assert racer.returncode == 0, errors
        holds.extend(tuple(hold) for hold in json.loads(output))

    assert len(holds) == RACERS * CYCLES
    assert {alias for alias, *_ in holds} <= set(SMALL_ALIASES)
    for alias in SMALL_ALIASES:
        intervals = sorted(
            (start, end, bottle_id)
            for held, bottle_id, start, end in holds
            if held == alias
        )
        for (_, end, earlier), (start, _, later) in itertools.pairwise(intervals):
            assert end <= start, f"{earlier} and {later} both held {alias}"
    assert make_pool(state_dir).leases() == []
    assert sorted(p.name for p in markers.iterdir()) == sorted(
        f"ready-racer{n}" for n in range(RACERS)
    )


# --- Corrupt store -----------------------------------------------------------


def truncated_store(tmp_path: Path) -> bytes:
    scratch = tmp_path / "scratch"
    pool = make_pool(scratch)
    for n in range(3):
        pool.acquire(f"b{n}", backend="netns")
        pool.update(f"b{n}", handle={"netns": f"bottle-b{n}"})
    whole = pool.path.read_bytes()
    return whole[: len(whole) // 2]


def one_record(**changes: object) -> bytes:
    record = Lease(
        "127.0.0.16", "b0", Owner(os.getpid(), 1.0), 1.0, "netns", "", {}
    ).to_json()
    record.update(changes)
    return json.dumps([record]).encode()


CORRUPT_STORES: list[tuple[str, Callable[[Path], bytes]]] = [
    ("empty", lambda _: b""),
    ("whitespace", lambda _: b" \n\t\n"),
    ("truncated", truncated_store),
    ("zero-filled", lambda _: b"\0" * 512),
    ("not-utf8", lambda _: b"\xff\xfe[\x00]"),
    ("not-a-list", lambda _: b'{"127.0.0.16": {}}'),
    ("record-not-an-object", lambda _: b'["127.0.0.16"]'),
    ("record-missing-owner", lambda _: b'[{"alias": "127.0.0.16"}]'),
    ("owner-pid-not-a-number", lambda _: one_record(owner={"pid": "x", "started": 1})),
    ("alias-not-an-address", lambda _: one_record(alias="garbage")),
    (
        "alias-leased-twice",
        lambda _: (
            b"[" + one_record()[1:-1] + b"," + one_record(bottle_id="b1")[1:-1] + b"]"
        ),
    ),
    (
        "bottle-leased-twice",
        lambda _: (
            b"["
            + one_record()[1:-1]
            + b","
            + one_record(alias="127.0.0.17")[1:-1]
            + b"]"
        ),
    ),
]


@pytest.mark.parametrize(
    "corrupt",
    [pytest.param(make, id=name) for name, make in CORRUPT_STORES],
)
def test_corrupt_store_raises_naming_the_file_and_is_left_untouched(
    tmp_path: Path, corrupt: Callable[[Path], bytes]
) -> None:
    contents = corrupt(tmp_path)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = state_dir / "leases.json"
    store.write_bytes(contents)
    before = sorted(p.name for p in state_dir.iterdir())
    pool = make_pool(state_dir)

    operations: list[Callable[[], object]] = [
        lambda: pool.acquire("b", wait_seconds=0.2),
        lambda: pool.release("b0"),
        pool.reclaim,
        pool.leases,
        lambda: pool.update("b0", handle={}),
    ]
    for operation in operations:
        with pytest.raises(LeaseStoreError) as caught:
            operation()
        assert caught.value.path == str(store)
        assert str(store) in str(caught.value)
        assert store.read_bytes() == contents

    assert sorted(p.name for p in state_dir.iterdir()) == sorted(
        {*before, "leases.lock"}
    )
    assert pickle.loads(pickle.dumps(caught.value)).path == str(store)


def test_lock_held_too_long_by_another_process_raises_naming_the_lock(
    tmp_path: Path,
    spawn: Callable[..., subprocess.Popen[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    holder = python_child(
        spawn,
        """
        with pool(sys.argv[1], sys.argv[2]).locked():
            print("locked", flush=True)
            sys.stdin.read()
        """,
        str(tmp_path),
        SMALL_POOL,
        stdin=subprocess.PIPE,
    )
    assert holder.stdin is not None
    assert read_line(holder) == "locked\n"
    monkeypatch.setattr(bottle.pool, "LOCK_TIMEOUT_SECONDS", 0.3)
    pool = make_pool(tmp_path)

    with pytest.raises(LeaseStoreError, match=r"leases\.lock was held"):
        pool.acquire("b")

    holder.stdin.close()
    assert holder.wait(timeout=30) == 0
    assert pool.acquire("b").alias == "127.0.0.16"
