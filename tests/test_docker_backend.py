"""The docker backend against a real Docker engine.

These tests skip, naming what is missing, only when no engine answers; the
project's CI runs them under ``scripts/with-dockerd``.  Nothing here pulls an
image or sends a packet off this machine: outside targets are stand-in test
addresses that the bottle's rules reject before they leave the host.
"""

from __future__ import annotations

import concurrent.futures
import io
import re
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bottle import images
from bottle.backends import BackendConfig, Bottle, load_backend
from bottle.backends import docker as docker_backend
from bottle.backends.docker import (
    LABEL_BOTTLE,
    LABEL_RUN,
    OPTIONS,
    DockerBackend,
    agent_name,
    bridge_name,
    bundle_name,
    engine_problem,
    network_name,
    refuse_other_allowlists,
    table_name,
)
from bottle.errors import BackendUnavailable, BottleStartError, BottleUsageError
from bottle.launcher import Launcher
from bottle.listeners import ListenerHub
from bottle.matrix import judge, plan_targets
from bottle.pool import AliasPool
from bottle.probe import Outcome, Target, TargetKind, run_probes
from bottle.spec import AgentSpec, BottleSpec, BundleService
from tests.conftest import run_bottle

#: A TEST-NET-2 address standing in for the internet; rejected on the host.
STANDIN_EGRESS = ("198.51.100.53", 53)


def _engine_problem() -> str | None:
    try:
        import docker  # noqa: F401
    except ImportError:
        return "the docker SDK is not installed (pip install 'bot-bottle[docker]')"
    problem = engine_problem()
    return problem


_PROBLEM = _engine_problem()
needs_engine = pytest.mark.skipif(_PROBLEM is not None, reason=_PROBLEM or "")


def _backend(state: Path, **options: str) -> DockerBackend:
    backend = load_backend("docker", BackendConfig(state, dict(options)))
    assert isinstance(backend, DockerBackend)
    return backend


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def backend(state: Path) -> DockerBackend:
    return _backend(state)


@pytest.fixture
def launcher(backend: DockerBackend, state: Path) -> Iterator[Launcher]:
    launcher = Launcher(backend, AliasPool(state_dir=state))
    yield launcher
    launcher.stop_all()
    ids = {launcher.bottle_id(name) for name in ("a", "b", "c", "plain", "slow")}
    assert not ids & backend.leftovers()


_clients: list[Any] = []


def _client() -> Any:
    import docker

    if not _clients:
        _clients.append(docker.from_env())
    return _clients[0]


@pytest.fixture(scope="module", autouse=True)
def _close_client() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def _nft_tables() -> str:
    return subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, check=False
    ).stdout


# -- no engine needed ---------------------------------------------------------


def test_unknown_option_lists_the_valid_ones(state: Path) -> None:
    with pytest.raises(BottleUsageError, match="gateway_rule"):
        _backend(state, gatway_rule="off")


def test_gateway_rule_takes_on_or_off_only(state: Path) -> None:
    with pytest.raises(BottleUsageError, match="valid values: on, off"):
        _backend(state, gateway_rule="maybe")


@pytest.mark.parametrize(
    ("key", "valid"),
    [("internal", "on, off"), ("bundle_publish", "alias, all")],
)
def test_leaky_options_take_their_two_values_only(
    state: Path, key: str, valid: str
) -> None:
    with pytest.raises(BottleUsageError, match=f"{key}='yes'.*valid values: {valid}"):
        _backend(state, **{key: "yes"})


def test_leaky_options_are_marked_as_negative_controls() -> None:
    for key in ("gateway_rule", "internal", "bundle_publish"):
        assert "NEGATIVE CONTROL" in OPTIONS[key]
    assert "NEGATIVE CONTROL" not in OPTIONS["image"]


def test_no_engine_is_one_line_naming_the_address(
    state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    socket_path = tmp_path / "nothing.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")
    with pytest.raises(BackendUnavailable) as caught:
        _backend(state).check()
    message = str(caught.value)
    assert "\n" not in message
    assert f"no Docker engine answers at unix://{socket_path}" in message
    assert "start dockerd" in message


def test_names_derive_from_the_bottle_id_and_fit_the_kernel() -> None:
    ids = ["a1b2c3-a", "a1b2c3-b", "ffffff-" + "x" * 20]
    bridges = {bridge_name(i, kind) for i in ids for kind in ("int", "pub")}
    assert len(bridges) == 2 * len(ids)
    assert all(len(name) <= 15 for name in bridges)
    assert network_name("r-a", "int") == "bb-r-a-int"
    assert agent_name("r-a") == "bb-r-a-agent"
    assert bundle_name("r-a", "echo") == "bb-r-a-bundle-echo"
    # The netns backend reaps every `inet bottle_*` table: never name one so.
    assert not table_name("r-a").startswith("bottle_")


@pytest.mark.parametrize(
    "allowlist",
    [
        ("alias", "127.0.0.1/32"),
        ("127.0.0.1/32", "0.0.0.0/0"),
        ("127.0.0.0/8",),
        ("alias", "198.51.100.0/24"),
        ("127.0.0.17/32",),
    ],
)
def test_an_allowlist_beyond_the_alias_is_refused_in_one_line(
    allowlist: tuple[str, ...],
) -> None:
    with pytest.raises(BottleUsageError) as caught:
        refuse_other_allowlists(BottleSpec("a", allowlist=allowlist), "127.0.0.16")
    message = str(caught.value)
    assert "\n" not in message
    refused = next(entry for entry in allowlist if entry != "alias")
    assert message.startswith(f"allowlist entry {refused!r}: ")
    assert "docker bottles support only the allowlist 'alias'" in message


def test_an_empty_allowlist_is_refused_too() -> None:
    with pytest.raises(BottleUsageError, match=r"^empty allowlist: docker bottles"):
        refuse_other_allowlists(BottleSpec("a", allowlist=()), "127.0.0.16")


@pytest.mark.parametrize(
    "allowlist",
    [("alias",), ("alias", "alias"), ("127.0.0.16",), ("alias", "127.0.0.16/32")],
)
def test_the_own_alias_in_any_spelling_is_taken(allowlist: tuple[str, ...]) -> None:
    refuse_other_allowlists(BottleSpec("a", allowlist=allowlist), "127.0.0.16")


def test_a_refused_allowlist_creates_nothing(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _backend(state)

    def no_engine() -> Any:
        raise AssertionError("the engine was asked for a bottle that is refused")

    monkeypatch.setattr(backend, "_client", no_engine)
    launcher = Launcher(backend, AliasPool(state_dir=state))
    try:
        spec = BottleSpec("a", allowlist=("alias", "127.0.0.1/32"))
        with pytest.raises(
            BottleUsageError, match=re.escape("allowlist entry '127.0.0.1/32'")
        ):
            launcher.start(spec)
        assert launcher.pool.leases() == []
        assert launcher.bottles == {}
    finally:
        launcher.stop_all()


def test_ports_chosen_for_two_bottles_differ_even_if_the_kernel_repeats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kernel picks free ports per address: two aliases may get the same.
    offered = iter([41000, 41000, 41000, 41001, 41000])
    monkeypatch.setattr(docker_backend, "free_port", lambda host: next(offered))
    ports = docker_backend._PortReservations()
    assert ports.choose("r-a", "127.0.0.16") == 41000
    assert ports.choose("r-b", "127.0.0.17") == 41001
    ports.release("r-a")
    assert ports.choose("r-c", "127.0.0.18") == 41000


def test_ports_give_up_in_one_line_when_every_offer_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(docker_backend, "free_port", lambda host: 41000)
    ports = docker_backend._PortReservations()
    ports.hold("r-a", 41000)
    with pytest.raises(BottleStartError, match=re.escape("no free port on 127.0.0.17")):
        ports.choose("r-b", "127.0.0.17")


# -- a real engine --------------------------------------------------------------


@needs_engine
def test_check_and_version(backend: DockerBackend) -> None:
    backend.check()
    assert backend.version().startswith("Docker Engine ")
    assert all(req.present for req in backend.requirements())


@needs_engine
def test_probe_image_is_built_once_and_reused(backend: DockerBackend) -> None:
    client = _client()
    tag = images.ensure_image(client, backend.cache_dir)
    started = time.monotonic()
    assert images.ensure_image(client, backend.cache_dir) == tag
    assert time.monotonic() - started < 1
    assert tag == images.image_tag()


@needs_engine
def test_a_bottle_is_two_labelled_networks_and_hardened_containers(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottle = launcher.start(BottleSpec("a"))
    client = _client()

    internal = client.networks.get(network_name(bottle.bottle_id, "int"))
    public = client.networks.get(network_name(bottle.bottle_id, "pub"))
    assert internal.attrs["Internal"] is True
    assert public.attrs["Internal"] is False
    for network in (internal, public):
        assert network.attrs["Labels"][LABEL_BOTTLE] == bottle.bottle_id
        assert network.attrs["Labels"][LABEL_RUN] == launcher.run

    agent = client.containers.get(agent_name(bottle.bottle_id))
    host_config = agent.attrs["HostConfig"]
    assert host_config["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host_config["SecurityOpt"]
    assert not host_config.get("PortBindings")
    assert list(agent.attrs["NetworkSettings"]["Networks"]) == [internal.name]
    assert agent.labels[LABEL_BOTTLE] == bottle.bottle_id

    bundle = client.containers.get(bundle_name(bottle.bottle_id, "echo"))
    assert set(bundle.attrs["NetworkSettings"]["Networks"]) == {
        internal.name,
        public.name,
    }
    bindings = [
        binding
        for port_bindings in bundle.attrs["HostConfig"]["PortBindings"].values()
        for binding in port_bindings
    ]
    assert bindings
    assert {binding["HostIp"] for binding in bindings} == {bottle.alias}

    assert bottle.bundle_host != bottle.alias
    assert backend.effective_allowlist(bottle) == bottle.allowlist
    assert table_name(bottle.bottle_id) in _nft_tables()
    assert backend.leftovers() >= {bottle.bottle_id}


@needs_engine
def test_the_agent_cannot_change_its_network(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottle = launcher.start(BottleSpec("a"))
    result = backend.exec(
        bottle, ["ip", "route", "add", "198.51.100.99", "dev", "eth0"]
    )
    assert result.returncode != 0
    assert "not permitted" in result.stderr
    assert backend.exec(bottle, ["id", "-u"]).stdout.strip() == "65534"


@needs_engine
def test_two_bottles_reach_their_own_bundle_only(
    launcher: Launcher, backend: DockerBackend
) -> None:
    a, b = launcher.start_many([BottleSpec("a"), BottleSpec("b")])
    sentinel = launcher.hub.listen("127.0.0.1", 0, label="sentinel")
    for source in (a, b):
        targets = plan_targets(
            source, [a, b], {"sentinel:127.0.0.1": sentinel}, STANDIN_EGRESS
        )
        results = run_probes(backend, source, targets)
        witnesses = {
            "bundle:a": a.bundle_witnesses["echo"],
            "bundle:b": b.bundle_witnesses["echo"],
            "sentinel:127.0.0.1": sentinel,
        }
        cells = judge(source.name, results, witnesses)
        failed = [f"{c.column}: {c.reason}" for c in cells if not c.passed]
        assert not failed
        own = next(c for c in cells if c.column == f"bundle:{source.name}")
        assert own.actual is Outcome.CONNECTED
        assert own.listener_saw_nonce is True
        # Blocked probes are rejected by the host, not dropped until a timeout.
        assert all(c.actual is not Outcome.TIMEOUT for c in cells)
    assert sentinel.touches == []


def _gateway_probe(backend: DockerBackend, bottle: Bottle, hub: ListenerHub) -> Any:
    everywhere = hub.listen("0.0.0.0", 0, label="sentinel on every address")
    targets = [
        Target(f"gateway:{label}", TargetKind.SENTINEL, address, everywhere.port)
        for label, address in backend.host_side_addresses(bottle).items()
    ]
    assert targets, "the backend named no host-side address"
    results = run_probes(backend, bottle, targets, timeout=1.0)
    return results, everywhere


@needs_engine
def test_gateway_rule_off_shows_the_leak(state: Path) -> None:
    backend = _backend(state, gateway_rule="off")
    launcher = Launcher(backend, AliasPool(state_dir=state))
    try:
        bottle = launcher.start(BottleSpec("a"))
        assert bottle.handle["table"] == ""
        results, everywhere = _gateway_probe(backend, bottle, launcher.hub)
        gateway = next(r for r in results if r.target.key == "gateway:gateway")
        assert gateway.outcome is Outcome.CONNECTED
        assert everywhere.saw_nonce(gateway.nonce)
    finally:
        launcher.stop_all()
    assert table_name(bottle.bottle_id) not in _nft_tables()


@needs_engine
def test_gateway_rule_on_closes_the_leak(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottle = launcher.start(BottleSpec("a"))
    results, everywhere = _gateway_probe(backend, bottle, launcher.hub)
    for result in results:
        # The sentinel listens there, so a reset can only be the host's rule.
        assert result.outcome is Outcome.REFUSED, result
    assert everywhere.touches == []


@needs_engine
def test_internal_off_puts_the_agent_on_an_ordinary_network(state: Path) -> None:
    backend = _backend(state, internal="off")
    launcher = Launcher(backend, AliasPool(state_dir=state))
    try:
        bottle = launcher.start(BottleSpec("a"))
        network = _client().networks.get(network_name(bottle.bottle_id, "int"))
        assert network.attrs["Internal"] is False
        assert bottle.facts["internal"] == "off"
    finally:
        launcher.stop_all()


@needs_engine
def test_bundle_publish_all_publishes_on_every_address(state: Path) -> None:
    backend = _backend(state, bundle_publish="all")
    launcher = Launcher(backend, AliasPool(state_dir=state))
    try:
        bottle = launcher.start(BottleSpec("a"))
        assert backend.effective_allowlist(bottle) == ["0.0.0.0/0"]
        assert bottle.facts["published"]["echo"].startswith("0.0.0.0:")
    finally:
        launcher.stop_all()


@needs_engine
def test_two_agents_listen_on_one_loopback_port_each_their_own(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottles = launcher.start_many([BottleSpec("a"), BottleSpec("b")])
    target = Target(
        "loopback:self",
        TargetKind.OWN_LOOPBACK,
        backend.agent_loopback(bottles[0]),
        47123,
        proto="self",
        must_reach=True,
    )
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as executor:
        results = list(
            executor.map(lambda b: run_probes(backend, b, [target]), bottles)
        )
    for (result,) in results:
        assert (result.outcome, result.echoed) == (Outcome.CONNECTED, True), result
        # Both listened at once: each waits 0.4 s with its listener open.
        assert result.latency_ms >= 400


@needs_engine
def test_a_published_port_answers_on_the_alias_only(launcher: Launcher) -> None:
    bottle = launcher.start(BottleSpec("a"))
    port = bottle.bundle_ports["echo"]
    assert bottle.facts["published"]["echo"] == f"{bottle.alias}:{port}"
    alias, port_text = bottle.facts["published"]["echo"].split(":")
    with socket.create_connection((alias, int(port_text)), timeout=5) as stream:
        stream.sendall(b"hostside\n")
        assert stream.makefile().readline() == "hostside\n"
    assert bottle.bundle_witnesses["echo"].saw_nonce("hostside")
    assert not bottle.bundle_witnesses["echo"].saw_nonce("never-sent")
    with socket.socket() as other:
        assert other.connect_ex(("127.0.0.1", int(port_text))) != 0


@needs_engine
def test_a_failed_start_leaves_nothing_and_never_pulls(
    launcher: Launcher, backend: DockerBackend
) -> None:
    spec = BottleSpec("a", agent=AgentSpec(image="bottle-no-such-image:never"))
    with pytest.raises(BottleUsageError, match=r"bottle-no-such-image.*never pulls"):
        launcher.start(spec)
    bottle_id = launcher.bottle_id("a")
    assert bottle_id not in backend.leftovers()
    assert table_name(bottle_id) not in _nft_tables()
    assert launcher.pool.leases() == []


@needs_engine
def test_remove_from_the_id_alone_cleans_a_crashed_bottle(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottle = launcher.start(BottleSpec("a"))
    assert bottle.bottle_id in backend.leftovers()
    backend.remove(bottle.bottle_id, {})
    assert bottle.bottle_id not in backend.leftovers()
    assert table_name(bottle.bottle_id) not in _nft_tables()
    backend.remove(bottle.bottle_id, {})  # again: nothing left, no error


@needs_engine
def test_attach_rebuilds_a_working_bottle(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottle = launcher.start(BottleSpec("a"))
    lease = next(lease for lease in launcher.pool.leases())
    again = backend.attach(lease)
    assert again.bundle_host == bottle.bundle_host
    assert again.bundle_ports == bottle.bundle_ports
    port = again.bundle_ports["echo"]
    target = Target("bundle:a", TargetKind.OWN_BUNDLE, again.bundle_host, port)
    [result] = run_probes(backend, again, [target])
    assert result.outcome is Outcome.CONNECTED
    assert again.bundle_witnesses["echo"].saw_nonce(result.nonce)
    assert backend.host_side_addresses(again) == backend.host_side_addresses(bottle)


@needs_engine
def test_exec_times_out(launcher: Launcher, backend: DockerBackend) -> None:
    bottle = launcher.start(BottleSpec("slow"))
    started = time.monotonic()
    result = backend.exec(bottle, ["sleep", "5"], timeout=0.5)
    assert result.returncode == 124
    assert time.monotonic() - started < 3


@needs_engine
def test_another_agent_image_gets_the_prober(
    launcher: Launcher, backend: DockerBackend
) -> None:
    # An image without the prober, as a user's agent image would be.
    busybox = images.find_busybox()
    assert busybox is not None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
        for applet in ("sh", "sleep", "id"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    _client().api.import_image_from_data(
        buffer.getvalue(), repository="bottle-test-plain", tag="1"
    )

    try:
        bottle = launcher.start(
            BottleSpec("plain", agent=AgentSpec(image="bottle-test-plain:1"))
        )
        assert bottle.facts["image"] == "bottle-test-plain:1"
        port = bottle.bundle_ports["echo"]
        target = Target("own", TargetKind.OWN_BUNDLE, bottle.bundle_host, port)
        [result] = run_probes(backend, bottle, [target])
        assert result.outcome is Outcome.CONNECTED
        assert result.echoed
        launcher.stop(bottle)
    finally:
        _client().images.remove("bottle-test-plain:1", force=True)


@needs_engine
def test_bottles_get_distinct_ports_that_are_true_on_both_sides(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottles = launcher.start_many([BottleSpec("a"), BottleSpec("b"), BottleSpec("c")])
    ports = [bottle.bundle_ports["echo"] for bottle in bottles]
    assert len(set(ports)) == len(ports)
    for bottle, port in zip(bottles, ports, strict=True):
        # The host reaches the bundle at the alias and the bundle's own port...
        assert bottle.facts["published"]["echo"] == f"{bottle.alias}:{port}"
        with socket.create_connection((bottle.alias, port), timeout=5) as stream:
            stream.sendall(b"host-" + bottle.name.encode() + b"\n")
            assert stream.makefile().readline().startswith("host-")
        # ...and the agent at its container's address, on the same port.
        assert bottle.handle["bundle_addresses"]["echo"] == (
            f"{bottle.bundle_host}:{port}"
        )
        target = Target("own", TargetKind.OWN_BUNDLE, bottle.bundle_host, port)
        [result] = run_probes(backend, bottle, [target])
        assert result.outcome is Outcome.CONNECTED, result


@needs_engine
def test_a_port_the_spec_names_is_used_on_both_sides(launcher: Launcher) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        wanted = int(probe.getsockname()[1])
    bottle = launcher.start(BottleSpec("a", bundle=(BundleService("echo", wanted),)))
    assert bottle.bundle_ports == {"echo": wanted}
    assert bottle.facts["published"]["echo"] == f"{bottle.alias}:{wanted}"


@needs_engine
def test_a_started_bottle_releases_its_ports(
    launcher: Launcher, backend: DockerBackend
) -> None:
    bottle = launcher.start(BottleSpec("a"))
    port = bottle.bundle_ports["echo"]
    assert port in set().union(*docker_backend._PORTS._held.values())
    launcher.stop(bottle)
    assert bottle.bottle_id not in docker_backend._PORTS._held


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_bottle(*args, state_dir=state, timeout=120)


@needs_engine
def test_bottle_up_refuses_a_wider_allowlist_with_exit_4(state: Path) -> None:
    allow = ("--allow", "127.0.0.1/32", "--allow", "0.0.0.0/0")
    result = _cli(state, "up", "--backend", "docker", *allow)
    assert result.returncode == 4, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "allowlist entry '127.0.0.1/32'" in lines[0]
    assert "docker bottles support only the allowlist 'alias'" in lines[0]
    assert result.stdout == ""
    assert "no bottles" in _cli(state, "ls").stdout


@needs_engine
def test_bottle_up_prints_where_the_host_reaches_the_bundle(state: Path) -> None:
    result = _cli(state, "up", "--backend", "docker", "--name", "shown")
    assert result.returncode == 0, result.stderr
    try:
        match = re.search(r"^  bundle\s+echo on ([\d.]+):(\d+)$", result.stdout, re.M)
        assert match, result.stdout
        with socket.create_connection(
            (match.group(1), int(match.group(2))), timeout=5
        ) as stream:
            stream.sendall(b"printed\n")
            assert stream.makefile().readline() == "printed\n"
    finally:
        down = _cli(state, "down", "shown")
    assert down.returncode == 0, down.stderr
