"""The `bottle` command, driven as a user drives it: real processes, real
namespaces, real nftables rules.  Nothing here leaves this machine."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bottle.backends import BackendConfig
from bottle.backends.netns import (
    NetnsBackend,
    agent_uid,
    host_veth_name,
    netns_name,
    table_name,
)
from bottle.catalogue import PROBES
from bottle.launcher import Launcher
from bottle.pool import AliasPool, AliasRange
from bottle.spec import BottleSpec, spec_from_mapping
from tests.conftest import needs_root_netns, run_bottle

pytestmark = needs_root_netns

#: Every lease store is a host of its own, so the stores of one test file
#: take pools apart: the alias guard of one store's bottle would otherwise
#: turn away the other store's bottle on the same alias.
POOL = "127.0.0.40-127.0.0.43"
REV_POOL = "127.0.0.44-127.0.0.46"
OTHER_POOL = "127.0.0.47-127.0.0.47"
#: Sixteen aliases of their own for the exhaustion test, clear of the other
#: test files' pools so that parallel runs do not compete for them.
FULL_POOL = "127.0.0.96/28"
FULL_POOL_TEXT = "127.0.0.96-127.0.0.111"
#: A Python the agent (nobody) may run: this venv's may live under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclasses.dataclass(frozen=True)
class Up:
    """What `bottle up` printed."""

    bottle_id: str
    alias: str
    ports: dict[str, int]


def host_names() -> str:
    """Every namespace and nftables table of the host, one per line."""
    namespaces = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout
    tables = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=True
    ).stdout
    return namespaces + tables


def bottles_named(names: list[str]) -> set[str]:
    """Namespaces and tables of bottles with one of these names, by any run.

    Other runs on the host may start and stop their own bottles meanwhile, so
    tests compare only the names they could have made.
    """
    alternatives = "|".join(map(re.escape, names))
    pattern = re.compile(
        r"\b(?:bb-[0-9a-f]{6}-|bottle_[0-9a-f]{6}_)(?:" + alternatives + r")(?=\s)"
    )
    return set(pattern.findall(host_names()))


def has_resources(bottle_id: str) -> dict[str, bool]:
    names = host_names().split()
    return {
        "netns": netns_name(bottle_id) in names,
        "table": table_name(bottle_id) in names,
    }


class Cli:
    """Runs `bottle` with its own lease store and pool; cleans up after itself."""

    def __init__(self, state_dir: Path, pool: str) -> None:
        self.state_dir = state_dir
        self.pool = pool
        self.started: list[str] = []

    def run(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_bottle(
            *args, state_dir=self.state_dir, **{"BOTTLE_POOL": self.pool, **(env or {})}
        )

    def up(self, *args: str) -> Up:
        result = self.run("up", *args)
        assert result.returncode == 0, result.stderr
        match = re.search(r"\(id (\S+), backend netns\)", result.stdout)
        assert match, result.stdout
        bottle_id = match.group(1)
        self.started.append(bottle_id)
        alias = re.search(r"^  alias\s+(\S+)$", result.stdout, re.M)
        assert alias, result.stdout
        ports = {
            name: int(port)
            for name, port in re.findall(
                r"^  bundle\s+(\S+) on [\d.]+:(\d+)$", result.stdout, re.M
            )
        }
        return Up(bottle_id, alias.group(1), ports)

    def leases(self) -> list[dict[str, object]]:
        path = self.state_dir / "leases.json"
        if not path.exists():
            return []
        records: list[dict[str, object]] = json.loads(path.read_text("utf-8"))
        return records

    def owner_pid(self, bottle_id: str) -> int:
        for record in self.leases():
            if record["bottle_id"] == bottle_id:
                owner = record["owner"]
                assert isinstance(owner, dict)
                return int(owner["pid"])
        raise AssertionError(f"no lease for {bottle_id}: {self.leases()}")

    def clean_up(self) -> None:
        """`bottle down --all`, then remove by hand whatever that missed."""
        keepers = [self.owner_pid(str(r["bottle_id"])) for r in self.leases()]
        self.run("down", "--all")
        for pid in keepers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        backend = NetnsBackend(BackendConfig(self.state_dir))
        for bottle_id in self.started:
            backend.remove(bottle_id, {})
        (self.state_dir / "leases.json").unlink(missing_ok=True)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    """A `bottle` command with a private lease store and the test file's pool."""
    runner = Cli(tmp_path / "cli-state", POOL)
    yield runner
    runner.clean_up()


@pytest.fixture(scope="module")
def rev_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """The `bottle` command that started the shared bottle `rev`."""
    runner = Cli(tmp_path_factory.mktemp("rev") / "state", REV_POOL)
    yield runner
    runner.clean_up()


@pytest.fixture(scope="module")
def rev(rev_cli: Cli) -> Up:
    """One bottle started by `bottle up --name rev`, shared by this module."""
    return rev_cli.up("--name", "rev")


def echo(host: str, port: int, line: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(line + b"\n")
        return conn.makefile("rb").readline().rstrip(b"\n")


# -- a running bottle ------------------------------------------------------


def test_up_prints_the_alias_and_port_and_the_keeper_owns_the_lease(
    rev: Up, rev_cli: Cli
) -> None:
    assert rev.alias in {f"127.0.0.{n}" for n in range(44, 47)}
    assert set(rev.ports) == {"echo"}
    assert 0 < rev.ports["echo"] < 65536
    assert rev.bottle_id.endswith("-rev")

    listing = rev_cli.run("ls")
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if rev.bottle_id in line)
    assert row.split()[:4] == ["rev", rev.bottle_id, "netns", rev.alias]
    assert f"echo:{rev.ports['echo']}" in row
    owner = re.search(r"pid (\d+) \(live\)", row)
    assert owner, row

    # The CLI that ran `up` has exited; the lease belongs to a keeper process.
    keeper = psutil.Process(int(owner.group(1)))
    assert keeper.is_running()
    assert "bottle.keeper" in keeper.cmdline()
    assert keeper.pid == rev_cli.owner_pid(rev.bottle_id)
    assert has_resources(rev.bottle_id) == {"netns": True, "table": True}


def test_the_bundle_echo_service_answers_on_the_alias_from_the_host(rev: Up) -> None:
    assert echo(rev.alias, rev.ports["echo"], b"nonce-from-host") == b"nonce-from-host"


def test_exec_runs_the_agent_under_a_uid_of_its_bottle(rev: Up, rev_cli: Cli) -> None:
    result = rev_cli.run("exec", "rev", "--", "sh", "-c", "id -u; id -g")

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{agent_uid(rev.alias)}\n65534\n"


def test_exec_passes_the_exit_code_through(rev: Up, rev_cli: Cli) -> None:
    result = rev_cli.run("exec", "rev", "--", "sh", "-c", "echo out; exit 7")

    assert result.returncode == 7
    assert result.stdout == "out\n"


def test_the_agent_reaches_its_bundle_and_not_the_host(rev: Up, rev_cli: Cli) -> None:
    with socket.socket() as sentinel:
        sentinel.bind(("127.0.0.1", 0))
        sentinel.listen()
        script = textwrap.dedent(
            f"""
            import socket
            with socket.create_connection(("{rev.alias}", {rev.ports["echo"]}), 5) as c:
                c.sendall(b"inside\\n")
                print(c.makefile().readline().strip())
            try:
                socket.create_connection(("127.0.0.1", {sentinel.getsockname()[1]}), 5)
            except OSError as exc:
                print("blocked", exc.errno)
            else:
                print("reached")
            """
        )

        result = rev_cli.run("exec", "rev", "--", SYSTEM_PYTHON, "-I", "-c", script)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "inside"
    assert lines[1].startswith("blocked")


def test_the_agent_cannot_change_routes_or_rules(rev: Up, rev_cli: Cli) -> None:
    route = rev_cli.run(
        "exec", "rev", "--", "ip", "route", "add", "1.2.3.4", "dev", "bb0"
    )
    flush = rev_cli.run("exec", "rev", "--", "nft", "flush", "ruleset")

    assert route.returncode != 0
    assert "Operation not permitted" in route.stderr
    assert flush.returncode != 0
    assert "Operation not permitted" in flush.stderr
    inside = subprocess.run(
        ["ip", "-n", netns_name(rev.bottle_id), "route"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "1.2.3.4" not in inside
    assert has_resources(rev.bottle_id)["table"]


def test_exec_of_an_unknown_bottle_names_the_live_ones(rev: Up, rev_cli: Cli) -> None:
    result = rev_cli.run("exec", "nosuch", "--", "true")

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "'nosuch'" in result.stderr
    assert rev.bottle_id in result.stderr


def test_another_lease_store_never_takes_this_ones_bottle(
    rev: Up, tmp_path: Path
) -> None:
    # Bottles of other lease stores look like leftovers to this one; `up` and
    # `down` in a second store must leave them alone all the same.
    other = Cli(tmp_path / "other-state", OTHER_POOL)
    try:
        started = other.up("--name", "other")
        assert has_resources(rev.bottle_id) == {"netns": True, "table": True}

        keeper = psutil.Process(other.owner_pid(started.bottle_id))
        keeper.kill()
        keeper.wait(timeout=10)
        down = other.run("down", "other")

        assert down.returncode == 0, down.stderr
        assert has_resources(started.bottle_id) == {"netns": False, "table": False}
        assert other.leases() == []
    finally:
        other.clean_up()
    assert has_resources(rev.bottle_id) == {"netns": True, "table": True}
    assert echo(rev.alias, rev.ports["echo"], b"untouched") == b"untouched"


# -- up from a file, down -------------------------------------------------


def test_up_from_a_spec_file(cli: Cli, tmp_path: Path) -> None:
    spec = tmp_path / "twin.toml"
    spec.write_text(
        'name = "twin"\nallowlist = ["alias"]\n'
        '[[bundle]]\nname = "api"\n[[bundle]]\nname = "web"\n',
        encoding="utf-8",
    )

    started = cli.up(str(spec))

    assert started.bottle_id.endswith("-twin")
    assert set(started.ports) == {"api", "web"}
    for name, port in started.ports.items():
        assert echo(started.alias, port, name.encode()) == name.encode()
    listing = cli.run("ls").stdout
    assert "api:" in listing
    assert "web:" in listing


def test_down_removes_the_namespace_the_rules_and_the_lease(cli: Cli) -> None:
    started = cli.up("--name", "gone")
    keeper = psutil.Process(cli.owner_pid(started.bottle_id))
    assert has_resources(started.bottle_id) == {"netns": True, "table": True}

    result = cli.run("down", "gone")

    assert result.returncode == 0, result.stderr
    assert f"bottle {started.bottle_id} is down; {started.alias} is free" in (
        result.stdout
    )
    assert has_resources(started.bottle_id) == {"netns": False, "table": False}
    assert cli.leases() == []
    keeper.wait(timeout=10)
    with pytest.raises(ConnectionRefusedError):
        echo(started.alias, started.ports["echo"], b"anyone?")
    assert "no bottles" in cli.run("ls").stdout


def test_down_leaves_a_bottle_that_another_program_holds(cli: Cli) -> None:
    """`bottle down --all` signals keepers, never a pytest session."""
    pool = AliasPool(AliasRange.parse(POOL), cli.state_dir)
    launcher = Launcher(NetnsBackend(BackendConfig(cli.state_dir)), pool)
    held = launcher.start(BottleSpec("held"))
    try:
        result = cli.run("down", "--all")

        assert result.returncode == 1
        assert "not a bottle keeper" in result.stderr
        assert has_resources(held.bottle_id) == {"netns": True, "table": True}
    finally:
        launcher.stop_all()


# -- bad input and failed starts -----------------------------------------


def test_bad_input_is_one_line_naming_it(cli: Cli, tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("name = \n", encoding="utf-8")
    unknown_key = tmp_path / "unknown.toml"
    unknown_key.write_text('name = "x"\ncolour = "red"\n', encoding="utf-8")
    cases: list[tuple[list[str], dict[str, str], list[str]]] = [
        (["up", "--backend", "nosuch"], {}, ["'nosuch'", "available:", "netns"]),
        (["up", "--allow", "300.1.1.1"], {}, ["'300.1.1.1'", "CIDR"]),
        (["up", "--port", "70000"], {}, ["port 70000", "1-65535"]),
        (["up", "--name", "Bad_Name"], {}, ["'Bad_Name'", "lowercase"]),
        (["up", str(bad_toml)], {}, [str(bad_toml), "is not TOML"]),
        (["up", str(unknown_key)], {}, [str(unknown_key), "'colour'", "valid keys"]),
        (["up", str(tmp_path / "none.toml")], {}, ["none.toml", "does not exist"]),
        (
            ["ls"],
            {"BOTTLE_POOL": "10.0.0.0/24"},
            ["'10.0.0.0/24'", "leaves 127.0.0.0/8"],
        ),
        (["down"], {}, ["bottle down", "--all"]),
        (["exec", "x"], {}, ["bottle exec", "`--`"]),
        (["up", "--backend-option", "nope"], {}, ["'nope'", "KEY=VALUE"]),
        (["up", "--backend-option", "x=1"], {}, ["'x'", "transfer_net"]),
    ]
    before = bottles_named(["bottle", "x"])

    for args, env, fragments in cases:
        result = cli.run(*args, env=env)

        assert result.returncode == 4, (args, result.stderr)
        assert result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stderr.startswith("bottle: error: ")
        for fragment in fragments:
            assert fragment in result.stderr, (args, result.stderr)

    assert cli.leases() == []
    assert bottles_named(["bottle", "x"]) <= before


def test_a_malformed_flag_names_the_command_and_the_flag(cli: Cli) -> None:
    result = cli.run("up", "--port", "abc")

    assert result.returncode == 4
    assert result.stderr.startswith("usage: bottle up ")
    assert result.stderr.splitlines()[-1] == (
        "bottle: error: bottle up: argument --port: invalid int value: 'abc'"
    )


def test_a_missing_agent_user_fails_and_leaves_nothing(
    cli: Cli, tmp_path: Path
) -> None:
    spec = tmp_path / "nouser.toml"
    spec.write_text('name = "nouser"\n[agent]\nuser = "no-such-user"\n', "utf-8")

    result = cli.run("up", str(spec))

    assert result.returncode == 4, result.stderr
    assert result.stderr.count("\n") == 1
    assert "'no-such-user'" in result.stderr
    assert "nouser" in result.stderr
    assert cli.leases() == []
    assert bottles_named(["nouser"]) == set()


def test_a_bundle_that_dies_at_start_leaves_nothing(cli: Cli, tmp_path: Path) -> None:
    # The namespace and the rules exist by the time the bundle command runs,
    # so this failure has something to clean up.
    spec = tmp_path / "broken.toml"
    spec.write_text(
        'name = "broken"\n[[bundle]]\nname = "svc"\ncommand = ["sh", "-c", "exit 3"]\n',
        "utf-8",
    )

    result = cli.run("up", str(spec))

    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1
    assert "did not start" in result.stderr
    assert "exited 3" in result.stderr
    assert cli.leases() == []
    assert bottles_named(["broken"]) == set()


# -- host set-up -----------------------------------------------------------


def test_doctor_lists_netns_as_ready(cli: Cli) -> None:
    result = cli.run("doctor")

    assert result.returncode == 0, result.stdout
    assert "netns: ready" in result.stdout.splitlines()
    assert f"alias pool {POOL} (4 aliases)" in result.stdout


def test_setup_on_linux_needs_nothing_and_smolvm_setup_is_the_same(cli: Cli) -> None:
    setup = cli.run("setup")
    smolvm = cli.run("smolvm-setup")

    assert setup.returncode == 0
    assert "nothing else is needed" in setup.stdout
    assert POOL in setup.stdout
    assert (smolvm.returncode, smolvm.stdout) == (setup.returncode, setup.stdout)


# -- exhaustion ------------------------------------------------------------


def test_sixteen_bottles_hold_sixteen_aliases_and_the_seventeenth_fails(
    tmp_path: Path,
) -> None:
    # The sixteen start through the library, in this process, for speed; the
    # seventeenth is a real `bottle up` in the same lease store.
    state_dir = tmp_path / "full-state"
    pool = AliasPool(AliasRange.parse(FULL_POOL), state_dir)
    launcher = Launcher(NetnsBackend(BackendConfig(state_dir)), pool)
    full = Cli(state_dir, FULL_POOL)
    try:
        started = launcher.start_many(
            [spec_from_mapping({"name": f"b{n}"}) for n in range(16)]
        )

        aliases = {bottle.alias for bottle in started}
        assert aliases == {f"127.0.0.{n}" for n in range(96, 112)}
        assert len(full.leases()) == 16

        result = full.run("up", "--name", "b16")

        assert result.returncode == 1, result.stdout
        assert result.stderr.count("\n") == 1
        assert f"every alias of pool {FULL_POOL_TEXT} is leased" in result.stderr
        for bottle in started:
            assert f"{bottle.alias} by bottle {bottle.bottle_id}" in result.stderr
        assert re.search(r"^b16 ", full.run("ls").stdout, re.M) is None
    finally:
        launcher.stop_all()
        if any(str(r["bottle_id"]).endswith("-b16") for r in full.leases()):
            full.clean_up()
    assert full.leases() == []
    for bottle in started:
        assert has_resources(bottle.bottle_id) == {"netns": False, "table": False}


def test_probes_lists_every_probe_with_its_source(cli: Cli) -> None:
    result = cli.run("probes")

    assert result.returncode == 0, result.stderr
    for kind in PROBES:
        assert f"{kind.name}  (columns {kind.columns}, test {kind.test})" in (
            result.stdout
        )
    assert result.stdout.count("  source   ") == len(PROBES)


# -- what the agent leaves running -------------------------------------------


def agent_processes() -> list[str]:
    listing = subprocess.run(
        ["ps", "-e", "-o", "pid=,stat=,args="],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [line for line in listing.splitlines() if " Z" not in line]


def test_down_ends_what_the_agent_left_running(cli: Cli) -> None:
    """A background job must not keep the namespace, and its veth to the host,
    alive once the bottle's rules are gone."""
    started = cli.up("--name", "bg")
    marker = f"bottle-bg-{started.bottle_id}"
    job = cli.run(
        "exec",
        "bg",
        "--",
        "bash",
        "-c",
        f"nohup bash -c 'exec -a {marker} sleep 300' >/dev/null 2>&1 &",
    )
    assert job.returncode == 0, job.stderr
    assert any(marker in line for line in agent_processes())

    assert cli.run("down", "bg").returncode == 0

    deadline = time.monotonic() + 5
    while any(marker in line for line in agent_processes()):
        assert time.monotonic() < deadline, agent_processes()
        time.sleep(0.05)
    assert has_resources(started.bottle_id) == {"netns": False, "table": False}
    veths = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True)
    assert host_veth_name(started.bottle_id) not in veths.stdout


def test_exec_timeout_ends_the_command_and_its_children(cli: Cli) -> None:
    started = cli.up("--name", "slow")
    marker = f"bottle-slow-{started.bottle_id}"
    script = f"echo begun; (exec -a {marker} sleep 300) & sleep 300"

    result = cli.run("exec", "--timeout", "1", "slow", "--", "bash", "-c", script)

    assert result.returncode == 124
    assert result.stdout == "begun\n"
    assert result.stderr.strip().endswith(
        "the command was ended (its exit code is 124)"
    )
    assert not any(marker in line for line in agent_processes())


def test_exec_passes_binary_output_without_failing(cli: Cli) -> None:
    cli.up("--name", "bin")
    result = cli.run("exec", "bin", "--", "head", "-c", "64", "/dev/urandom")
    assert result.returncode == 0, result.stderr
