"""The smolvm driver and the smolmachines backend, against the fake smolvm.

``tests/fake_smolvm/smolvm`` imitates smolvm 0.8.0, 1.0.2 and 1.8.0, keeps a
real SQLite DB in smolvm's schema, and runs each machine's "guest" as a
network namespace filtered on the host by the record's ``allowed_cidrs`` as
it stands at start, so a missing allowlist patch is a real, measured leak.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bottle import (
    AliasPool,
    AliasRange,
    BackendConfig,
    BottleSpec,
    Launcher,
    load_backend,
)
from bottle.backends.base import Backend
from bottle.backends.smolmachines import (
    PATCH_APPLIED,
    PATCH_NOT_NEEDED,
    PATCH_TURNED_OFF,
    SmolmachinesBackend,
    hypervisor_requirement,
    machine_name,
)
from bottle.errors import BackendUnavailable, BottleUsageError
from bottle.launcher import reap
from bottle.listeners import Listener
from bottle.matrix import Matrix, judge, plan_targets
from bottle.pool import Owner
from bottle.probe import Outcome, run_probes
from bottle.runs import RunRegistry
from bottle.smolvm import (
    FAKE_MARKER,
    Smolvm,
    SmolvmCommandError,
    SmolvmUnusable,
    SmolvmVersion,
)
from bottle.smolvm_db import SmolvmDb, default_db_path
from bottle.spec import AgentSpec

FAKE = Path(__file__).resolve().parent / "fake_smolvm" / "smolvm"
VERSIONS = ["0.8.0", "1.0.2", "1.8.0"]
POOL = "127.0.0.40-127.0.0.47"

needs_root_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nft") is None,
    reason="needs root and nftables (`nft`): the fake's guests are namespaces",
)


@pytest.fixture(params=VERSIONS)
def version(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The smolvm version the fake imitates."""
    chosen: str = request.param
    monkeypatch.setenv("FAKE_SMOLVM_VERSION", chosen)
    return chosen


@pytest.fixture(autouse=True)
def smolvm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """smolvm's data directory (and so its DB) is the test's own."""
    data = tmp_path / "data"
    monkeypatch.setenv("XDG_DATA_HOME", str(data))
    monkeypatch.delenv("BOTTLE_SMOLVM", raising=False)
    monkeypatch.delenv("BOTTLE_SMOLVM_DB", raising=False)
    return data


@pytest.fixture
def db(smolvm_home: Path) -> SmolvmDb:
    return SmolvmDb(default_db_path(platform="linux"))


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    """A packed machine for ``--from`` (the fake only checks it exists)."""
    path = tmp_path / "agent.smolmachine"
    path.write_bytes(b"")
    return path


@pytest.fixture
def driver() -> Iterator[Smolvm]:
    smolvm = Smolvm(FAKE)
    yield smolvm
    for machine in smolvm.machines():
        for step in (smolvm.stop, smolvm.delete):
            with contextlib.suppress(SmolvmCommandError):
                step(str(machine["name"]))
    assert fake_guests() == set()


def fake_guests() -> set[str]:
    """The fake's namespaces of this test's machines left on the host."""
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    return {
        line.split(" ", 1)[0]
        for line in listing.splitlines()
        if line.startswith("bbfake-tc-") or line.startswith("bbfake-bb-")
    }


# -- the driver ----------------------------------------------------------------


def test_version_is_parsed_and_picks_the_command_form(
    driver: Smolvm, version: str
) -> None:
    found = driver.version()
    assert str(found) == f"{version} (fake)"
    assert found.fake
    assert found.names_by_flag == (version != "0.8.0")
    assert found.from_keeps_allowlist == (version == "1.8.0")


@pytest.mark.parametrize(
    ("line", "triple", "fake"),
    [
        ("smolvm 0.8.0", (0, 8, 0), False),
        ("smolvm v1.7.7\n", (1, 7, 7), False),
        ("smolvm 1.8.0-rc.1", (1, 8, 0), False),
        (f"smolvm 1.0.2 {FAKE_MARKER}", (1, 0, 2), True),
    ],
)
def test_version_lines(line: str, triple: tuple[int, int, int], fake: bool) -> None:
    parsed = SmolvmVersion.parse(line)
    assert (parsed.triple, parsed.fake) == (triple, fake)


@pytest.mark.parametrize("line", ["SmolVM 0.3.1", "smolvm, version 0.2", "", "1.2.3"])
def test_foreign_version_lines_are_refused(line: str) -> None:
    with pytest.raises(ValueError, match="not a smolvm version line"):
        SmolvmVersion.parse(line)


def test_create_keeps_or_drops_the_allowlist_as_the_version_does(
    driver: Smolvm, version: str, db: SmolvmDb, packed: Path
) -> None:
    """0.8.0 and 1.0.2 drop --allow-cidr with --from; 1.8.0 keeps it."""
    driver.create("tc-from", source=str(packed), allow_cidrs=["127.0.0.40/32"])
    driver.create("tc-image", image="agent:latest", allow_cidrs=["127.0.0.41"])

    expected = ["127.0.0.40/32"] if version == "1.8.0" else None
    assert db.read_allowlist("tc-from") == expected
    assert db.read_allowlist("tc-image") == ["127.0.0.41/32"]
    record = db.read_record("tc-from")
    assert record["source_smolmachine"] == str(packed)
    assert record["network"] is True
    names = [item["name"] for item in driver.machines()]
    assert names == ["tc-from", "tc-image"]
    assert "allowed_cidrs" not in json.dumps(driver.machines())

    driver.delete("tc-from")
    assert [item["name"] for item in driver.machines()] == ["tc-image"]


def test_the_wrong_name_form_is_a_usage_error(
    driver: Smolvm, version: str, packed: Path
) -> None:
    """The fake rejects the other version's form, so the driver's choice shows."""
    wrong = ["--name", "tc-x"] if not driver.version().names_by_flag else ["tc-x"]
    completed = subprocess.run(
        [str(FAKE), "machine", "create", *wrong, "--from", str(packed)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 2


def test_errors_carry_the_command_and_smolvm_message(driver: Smolvm) -> None:
    with pytest.raises(SmolvmCommandError) as failed:
        driver.start("tc-missing")
    error = failed.value
    assert error.returncode == 1
    assert error.machine == "tc-missing"
    assert "Error: machine 'tc-missing' not found" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.argv, copy.returncode, copy.machine) == (
        error.argv,
        1,
        "tc-missing",
    )
    assert str(copy) == str(error)


@needs_root_netns
def test_start_exec_stop_in_a_guest(driver: Smolvm, version: str) -> None:
    driver.create("tc-run", image="agent:latest", allow_cidrs=["127.0.0.42/32"])
    driver.start("tc-run")
    assert driver.status("tc-run")["state"] == "running"

    who = driver.exec("tc-run", ["id", "-u"])
    assert (who.returncode, who.stdout.strip()) == (0, "65534")
    assert driver.exec("tc-run", ["sh", "-c", "echo oops >&2; exit 7"]).returncode == 7
    assert driver.exec("tc-run", ["sleep", "5"], timeout=0.5).returncode == 124
    routes = driver.exec("tc-run", ["ip", "route"]).stdout
    assert "default" not in routes

    driver.stop("tc-run")
    assert driver.status("tc-run")["state"] == "stopped"
    assert fake_guests() == set()


# -- the backend ---------------------------------------------------------------


def make_backend(tmp_path: Path, **options: str) -> Backend:
    return load_backend(
        "smolmachines",
        BackendConfig(tmp_path / "state", {"smolvm": str(FAKE), **options}),
    )


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(BottleUsageError, match="unknown to backend 'smolmachines'"):
        make_backend(tmp_path, colour="blue")
    with pytest.raises(BottleUsageError, match=r"allowlist_patch='maybe'.*on or off"):
        make_backend(tmp_path, allowlist_patch="maybe")


def test_check_passes_with_the_fake_and_needs_no_hypervisor(tmp_path: Path) -> None:
    backend = make_backend(tmp_path)
    backend.check()
    requirements = {req.what: req for req in backend.requirements()}
    assert requirements["hypervisor"].detail == "not needed: bot-bottle's stand-in"
    assert backend.version() == "smolvm 0.8.0 (fake)"


def test_the_fake_is_found_by_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BOTTLE_SMOLVM", str(FAKE))
    backend = load_backend("smolmachines", BackendConfig(tmp_path))
    backend.check()


def write_script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (None, "smolvm binary: /nonexistent/smolvm (from backend option smolvm)"),
        ('echo "SmolVM 0.3.1"', "smolvm version:"),
        (
            'case "$1" in --version) echo "smolvm 1.8.0";; '
            '*) echo "usage: smolvm run IMAGE";; esac',
            "smolvm identity:",
        ),
        ("echo boom >&2; exit 3", "exited 3: boom"),
    ],
    ids=["missing", "impostor-version", "impostor-help", "broken"],
)
def test_an_unusable_smolvm_is_one_line_naming_what_is_missing(
    tmp_path: Path, body: str | None, expected: str
) -> None:
    path = (
        Path("/nonexistent/smolvm")
        if body is None
        else write_script(tmp_path / "smolvm", body)
    )
    backend = load_backend(
        "smolmachines", BackendConfig(tmp_path, {"smolvm": str(path)})
    )
    with pytest.raises(BackendUnavailable) as refused:
        backend.check()
    message = str(refused.value)
    assert expected in message
    assert "\n" not in message
    assert message.startswith("backend 'smolmachines' cannot run here: ")
    assert not all(req.present for req in backend.requirements())


def test_nothing_on_path_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    backend = load_backend("smolmachines", BackendConfig(tmp_path))
    with pytest.raises(BackendUnavailable, match="smolvm binary: not found on PATH"):
        backend.check()


def test_a_real_smolvm_needs_a_hypervisor(tmp_path: Path) -> None:
    real = SmolvmVersion(1, 8, 0)
    missing = hypervisor_requirement(real, system="Linux", kvm=tmp_path / "kvm")
    assert not missing.present
    assert missing.detail == f"{tmp_path / 'kvm'} is missing (enable KVM)"
    other = hypervisor_requirement(real, system="Windows")
    assert "macOS and Linux, not Windows" in other.detail
    assert hypervisor_requirement(SmolvmVersion(1, 8, 0, fake=True)).present


def test_unusable_errors_survive_pickling() -> None:
    error = SmolvmUnusable("version", "/bin/smolvm", "smolvm version: nope")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.what, copy.path, str(copy)) == ("version", "/bin/smolvm", str(error))


@pytest.fixture
def launcher(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Launcher]:
    options = getattr(request, "param", {})
    backend = make_backend(tmp_path, **options)
    backend.check()
    pool = AliasPool(AliasRange.parse(POOL), state_dir=tmp_path / "state")
    launcher = Launcher(backend, pool)
    yield launcher
    launcher.stop_all()
    assert backend.leftovers() == set()
    assert fake_guests() == set()


def probe_all(launcher: Launcher, specs: list[BottleSpec]) -> tuple[Matrix, Listener]:
    bottles = launcher.start_many(specs)
    sentinel = launcher.hub.listen("127.0.0.1", 0, label="sentinel")
    witnesses = {f"bundle:{b.name}": b.bundle_listeners["echo"] for b in bottles}
    witnesses["sentinel:127.0.0.1"] = sentinel
    matrix = Matrix("smolmachines")
    for bottle in bottles:
        targets = plan_targets(
            bottle, bottles, {"sentinel:127.0.0.1": sentinel}, ("198.51.100.53", 53)
        )
        results = run_probes(launcher.backend, bottle, targets)
        matrix.add(judge(bottle.name, results, witnesses))
    return matrix, sentinel


def agents(packed: Path, *names: str) -> list[BottleSpec]:
    return [BottleSpec(name, agent=AgentSpec(source=str(packed))) for name in names]


@needs_root_netns
@pytest.mark.parametrize(
    "launcher", [{"allowlist_patch": "off"}], indirect=True, ids=["patch-off"]
)
def test_without_the_patch_0_8_0_leaks_host_loopback(
    launcher: Launcher, packed: Path
) -> None:
    """The seed's bug, measured: `--from` drops the allowlist, the guest roams."""
    matrix, sentinel = probe_all(launcher, agents(packed, "a", "b"))

    assert not matrix.passed
    for row, other in (("a", "b"), ("b", "a")):
        leak = matrix.cell(row, "sentinel:127.0.0.1")
        assert leak is not None
        assert (leak.actual, leak.listener_saw_nonce) == (Outcome.CONNECTED, True)
        neighbour = matrix.cell(row, f"bundle:{other}")
        assert neighbour is not None
        assert neighbour.actual is Outcome.CONNECTED
    assert len(sentinel.touches) == 2
    bottle = next(iter(launcher.bottles.values()))
    assert bottle.facts["allowlist_patch"] == PATCH_TURNED_OFF
    assert bottle.facts["stored_allowlist"] is None
    assert launcher.backend.effective_allowlist(bottle) == ["0.0.0.0/0", "::/0"]


@needs_root_netns
def test_with_the_patch_every_cell_holds(
    version: str, launcher: Launcher, packed: Path
) -> None:
    # `version` comes first: it sets the fake's version before the backend
    # reads it.
    matrix, sentinel = probe_all(launcher, agents(packed, "a", "b"))

    failures = [cell.to_json() for cell in matrix.failures()]
    assert matrix.passed, failures
    assert sentinel.touches == []
    for bottle in launcher.bottles.values():
        assert bottle.facts["smolvm_version"] == f"{version} (fake)"
        if version == "1.8.0":
            assert bottle.facts["allowlist_patch"] == PATCH_NOT_NEEDED
        else:
            assert bottle.facts["allowlist_patch"] == PATCH_APPLIED
            assert bottle.facts["stored_allowlist"] is None
        assert launcher.backend.effective_allowlist(bottle) == [f"{bottle.alias}/32"]
        assert bottle.handle["machine"] == machine_name(bottle.bottle_id)


@needs_root_netns
def test_a_failed_start_leaves_nothing(launcher: Launcher, tmp_path: Path) -> None:
    """A start that fails removes what it made and gives the alias back."""
    gone = tmp_path / "gone.smolmachine"
    spec = BottleSpec("a", agent=AgentSpec(source=str(gone)))
    with pytest.raises(Exception, match=r"smolmachine .* not found"):
        launcher.start(spec)
    assert launcher.backend.leftovers() == set()
    assert launcher.pool.leases() == []


def test_an_agent_from_nothing_is_a_usage_error_on_a_real_smolvm(
    tmp_path: Path,
) -> None:
    """Only the stand-in makes agents from a placeholder; smolvm needs one named."""
    real = write_script(
        tmp_path / "smolvm",
        'case "$1" in --version) echo "smolvm 1.8.0";; '
        '*) printf "Commands:\\n  machine  Manage machines\\n";; esac',
    )
    backend = load_backend(
        "smolmachines", BackendConfig(tmp_path / "state", {"smolvm": str(real)})
    )
    pool = AliasPool(AliasRange.parse(POOL), state_dir=tmp_path / "state")
    launcher = Launcher(backend, pool)
    with pytest.raises(BottleUsageError, match=r"needs `source`.*option source=PATH"):
        launcher.start(BottleSpec("noagent"))
    assert launcher.pool.leases() == []
    launcher.stop_all()


@needs_root_netns
def test_the_reaper_removes_machines_of_dead_runs(
    launcher: Launcher, packed: Path, request: pytest.FixtureRequest
) -> None:
    registry = RunRegistry()
    registry.unregister("dead00")
    request.addfinalizer(lambda: registry.unregister("dead00"))
    smolvm = Smolvm(FAKE)
    smolvm.create(machine_name("dead00-a"), source=str(packed))
    smolvm.start(machine_name("dead00-a"))
    assert "dead00-a" in launcher.backend.leftovers()
    assert reap(launcher.backend, launcher.pool) == [], "an unknown run was reaped"

    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_owner = Owner.of_pid(exited.pid)
    exited.wait()
    registry.register("dead00", dead_owner)

    assert reap(launcher.backend, launcher.pool) == ["dead00-a"]
    assert launcher.backend.leftovers() == set()


def test_the_patch_refuses_an_unexpected_record_before_start(
    tmp_path: Path, packed: Path, db: SmolvmDb
) -> None:
    """A record that does not look like smolvm's is never started."""
    backend = make_backend(tmp_path)
    assert isinstance(backend, SmolmachinesBackend)
    smolvm = Smolvm(FAKE)
    smolvm.create("tc-odd", source=str(packed))
    connection = sqlite3.connect(db.path)
    connection.execute(
        "UPDATE vms SET data = ? WHERE name = 'tc-odd'",
        (b'{"name":"tc-odd","allowed_cidrs":"everything"}',),
    )
    connection.commit()
    connection.close()
    with pytest.raises(Exception, match="neither null nor a list"):
        backend.db.ensure_allowlist("tc-odd", ["127.0.0.40/32"])
    smolvm.delete("tc-odd")
