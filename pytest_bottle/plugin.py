"""The pytest plugin: options, fixtures and the isolation matrix summary.

It stays thin: everything that starts, probes or judges a bottle lives in
the ``bottle`` library.  A backend's SDK is imported only when that backend is
chosen (backends are entry points, loaded on use).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bottle import BackendConfig, load_backend
from bottle.backends import DEFAULT_BACKEND, Backend, Bottle, available_backends
from bottle.errors import BackendUnavailable, BottleUsageError, LeaseStoreError
from bottle.launcher import Launcher, new_run_label, reap
from bottle.listeners import Listener, ListenerHub
from bottle.matrix import Cell, Matrix, render_text
from bottle.pool import AliasPool, Owner, pool_from_environment
from bottle.probe import DEFAULT_PROBE_TIMEOUT_SECONDS
from bottle.runs import RunRegistry
from bottle.spec import ALIAS_ENTRY, BottleSpec
from bottle.standin import (
    FileWitness,
    StandIn,
    reap_standins,
    start_standin,
    stop_standin,
)
from bottle.suite import (
    DEFAULT_EGRESS_TARGET,
    DEFAULT_METADATA_TARGET,
    DEFAULT_PUBLIC_TARGET,
    STANDIN_DEFAULTS,
    OutsideTarget,
    Sentinels,
    outside_targets,
    parse_host_port,
    resolver_of_this_host,
)

log = logging.getLogger(__name__)

#: A user property on each conformance test's report carrying its cell, so the
#: controller can draw the matrix even when pytest-xdist workers ran the tests.
CELL_PROPERTY = "bottle_cell"
#: A user property carrying one bottle's backend facts (versions, workarounds).
FACTS_PROPERTY = "bottle_facts"
_STANDIN_ENV = "BOTTLE_EGRESS_STANDIN"
_FIXTURES = {
    "bottle_backend",
    "bottle_factory",
    "bottle",
    "bottle_sentinel",
    "bottle_sentinels",
    "bottle_outside",
    "bottle_pool",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bottle", "bot-bottle isolation")

    def add(flag: str, ini: str, help_text: str, **kwargs: Any) -> None:
        ini_type = kwargs.pop("ini_type", "string")
        group.addoption(flag, dest=ini, help=help_text, **kwargs)
        parser.addini(ini, help=help_text, type=ini_type)

    add(
        "--bottle-backend",
        "bottle_backend",
        f"Backend bottles run on (default: {DEFAULT_BACKEND})",
        metavar="NAME",
    )
    add(
        "--bottle-egress-target",
        "bottle_egress_target",
        f"HOST:PORT every bottle must not reach over TCP and UDP (default: "
        f"{DEFAULT_EGRESS_TARGET})",
        metavar="HOST:PORT",
    )
    add(
        "--bottle-dns-target",
        "bottle_dns_target",
        "Resolver HOST:PORT a bottle must not get a nonce-bearing query to "
        "(default: this host's first nameserver)",
        metavar="HOST:PORT",
    )
    add(
        "--bottle-metadata-target",
        "bottle_metadata_target",
        f"Cloud metadata HOST:PORT (default: {DEFAULT_METADATA_TARGET})",
        metavar="HOST:PORT",
    )
    add(
        "--bottle-public-target",
        "bottle_public_target",
        f"A second public HOST:PORT (default: {DEFAULT_PUBLIC_TARGET})",
        metavar="HOST:PORT",
    )
    add(
        "--bottle-pool",
        "bottle_pool",
        "Loopback alias pool, as a CIDR or first-last range "
        "(default: $BOTTLE_POOL or 127.0.0.16-127.0.0.31)",
        metavar="RANGE",
    )
    add(
        "--bottle-allowlist",
        "bottle_allowlist",
        f"Comma-separated allowlist of the suite's bottles; {ALIAS_ENTRY!r} is "
        f"each bottle's own alias /32 (default: {ALIAS_ENTRY})",
        metavar="CIDRS",
    )
    add(
        "--bottle-backend-option",
        "bottle_backend_options",
        "Backend-specific setting KEY=VALUE (repeatable)",
        action="append",
        metavar="KEY=VALUE",
        ini_type="linelist",
    )
    add(
        "--bottle-egress-standin",
        "bottle_egress_standin",
        "Own every outside target (egress, DNS, metadata, public) in a "
        "stand-in namespace of this run, so that no probe can leave the "
        "machine; unset targets default to test addresses (needs root)",
        action="store_true",
        default=None,
        ini_type="bool",
    )
    add(
        "--bottle-count",
        "bottle_count",
        "How many bottles the conformance suite runs at once (default: 2)",
        metavar="N",
    )
    add(
        "--bottle-pool-wait",
        "bottle_pool_wait",
        "Seconds to wait for a free alias when the pool is exhausted, "
        "before failing with PoolExhausted (default: 0)",
        metavar="SECONDS",
    )
    add(
        "--bottle-probe-timeout",
        "bottle_probe_timeout",
        f"Seconds a probe waits for an answer (default: "
        f"{DEFAULT_PROBE_TIMEOUT_SECONDS})",
        metavar="SECONDS",
    )


@dataclasses.dataclass(frozen=True)
class BottleOptions:
    """The plugin's options, read from the command line or the ini file."""

    backend: str
    egress: tuple[str, int]
    dns: tuple[str, int]
    metadata: tuple[str, int]
    public: tuple[str, int]
    pool: str | None
    allowlist: tuple[str, ...]
    backend_options: dict[str, str]
    egress_standin: bool
    probe_timeout: float
    bottle_count: int
    pool_wait: float

    @classmethod
    def from_config(cls, config: pytest.Config) -> BottleOptions:
        def get(name: str) -> Any:
            value = config.getoption(name)
            return config.getini(name) if value in (None, []) else value

        backend = get("bottle_backend") or DEFAULT_BACKEND
        known = available_backends()
        if backend not in known:
            raise pytest.UsageError(
                f"--bottle-backend={backend}: unknown backend; "
                f"available: {', '.join(known)}"
            )
        standin = bool(get("bottle_egress_standin"))
        defaults = (
            dict(STANDIN_DEFAULTS)
            if standin
            else {
                "egress": DEFAULT_EGRESS_TARGET,
                "dns": resolver_of_this_host(),
                "metadata": DEFAULT_METADATA_TARGET,
                "public": DEFAULT_PUBLIC_TARGET,
            }
        )
        try:
            outside = {
                key: parse_host_port(
                    get(f"bottle_{key}_target") or defaults[key],
                    what=f"--bottle-{key}-target",
                )
                for key in defaults
            }
            pool = get("bottle_pool") or None
            pool_from_environment(pool)
            allowlist = tuple(
                entry.strip()
                for entry in (get("bottle_allowlist") or ALIAS_ENTRY).split(",")
                if entry.strip()
            )
            BottleSpec("check", allowlist=allowlist)
        except BottleUsageError as exc:
            raise pytest.UsageError(f"bot-bottle option: {exc}") from None
        backend_options = {}
        for item in get("bottle_backend_options") or []:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise pytest.UsageError(
                    f"--bottle-backend-option={item}: use KEY=VALUE"
                )
            backend_options[key.strip()] = value.strip()
        probe_timeout = _number(
            "--bottle-probe-timeout",
            get("bottle_probe_timeout") or DEFAULT_PROBE_TIMEOUT_SECONDS,
            minimum=0.001,
        )
        pool_wait = _number("--bottle-pool-wait", get("bottle_pool_wait") or 0)
        bottle_count = int(
            _number("--bottle-count", get("bottle_count") or 2, minimum=1, whole=True)
        )
        if bottle_count > 26:
            raise pytest.UsageError(
                f"--bottle-count={bottle_count}: at most 26 bottles (a to z)"
            )
        return cls(
            backend=backend,
            egress=outside["egress"],
            dns=outside["dns"],
            metadata=outside["metadata"],
            public=outside["public"],
            pool=pool,
            allowlist=allowlist,
            backend_options=backend_options,
            egress_standin=standin,
            probe_timeout=probe_timeout,
            bottle_count=bottle_count,
            pool_wait=pool_wait,
        )


def _number(
    option: str, text: object, *, minimum: float = 0.0, whole: bool = False
) -> float:
    """A numeric option value, or one usage error naming the option."""
    kind = "a whole number" if whole else "a number"
    try:
        value = float(str(text))
        if (
            not math.isfinite(value)
            or value < minimum
            or (whole and not value.is_integer())
        ):
            raise ValueError(text)
    except ValueError:
        raise pytest.UsageError(
            f"{option}={text}: use {kind} of at least {minimum:g}"
        ) from None
    return value


OPTIONS_KEY = pytest.StashKey[BottleOptions]()
_RUN_KEY = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    options = BottleOptions.from_config(config)
    config.stash[OPTIONS_KEY] = options
    config.stash[_RUN_KEY] = _run_label(config)
    _stop_cleanly_on_sigterm()
    config.pluginmanager.register(MatrixCollector(options.backend), "bottle-matrix")
    config.addinivalue_line(
        "markers",
        "bottle_spec(**fields): fields of the spec the `bottle` fixture starts",
    )


def _stop_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a CI job cancelled) into KeyboardInterrupt.

    pytest then tears fixtures down as on Ctrl-C, and bottles are stopped
    instead of being left for the next run's reaper.  A handler someone else
    installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def _run_label(config: pytest.Config) -> str:
    """One label for the run; each pytest-xdist worker adds its number."""
    worker_input = getattr(config, "workerinput", None)
    if worker_input is None:
        return new_run_label()
    worker = str(worker_input["workerid"]).removeprefix("gw")
    return f"{worker_input['bottle_run']}w{worker}"


def shared_run_label(config: pytest.Config) -> str:
    """The label of the whole run: the controller's under pytest-xdist."""
    worker_input = getattr(config, "workerinput", None)
    if worker_input is not None:
        return str(worker_input["bottle_run"])
    return config.stash[_RUN_KEY]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    node.workerinput["bottle_run"] = node.config.stash[_RUN_KEY]


def pytest_report_header(config: pytest.Config) -> str:
    options = config.stash[OPTIONS_KEY]
    pool = options.pool or str(pool_from_environment(None))
    return (
        f"bot-bottle: backend {options.backend}, run {config.stash[_RUN_KEY]}, "
        f"pool {pool}"
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Fail at once, in one line, when the backend or lease store cannot serve.

    A corrupt lease store is refused, never reset: live bottles may hold
    aliases recorded in it.
    """
    uses_bottles = any(
        _FIXTURES & set(getattr(item, "fixturenames", ())) for item in session.items
    )
    if not uses_bottles:
        return
    options = session.config.stash[OPTIONS_KEY]
    try:
        _backend_for(session.config).check()
        pool = AliasPool(pool_from_environment(options.pool))
        pool.leases()
    except (BackendUnavailable, BottleUsageError, LeaseStoreError) as exc:
        raise pytest.UsageError(str(exc)) from None
    size = len(list(pool.range.addresses()))
    if options.bottle_count > size:
        raise pytest.UsageError(
            f"--bottle-count={options.bottle_count}: the pool {pool.range} has "
            f"{size} aliases; use at most {size} or a larger --bottle-pool"
        )


def _backend_for(config: pytest.Config) -> Backend:
    options = config.stash[OPTIONS_KEY]
    pool = AliasPool(pool_from_environment(options.pool))
    return load_backend(
        options.backend, BackendConfig(pool.state_dir, options.backend_options)
    )


class BottleFactory:
    """Starts bottles for tests and stops every one at the end of the session."""

    def __init__(self, launcher: Launcher, options: BottleOptions) -> None:
        self.launcher = launcher
        self.options = options

    @property
    def backend(self) -> Backend:
        return self.launcher.backend

    @property
    def hub(self) -> ListenerHub:
        return self.launcher.hub

    def spec(self, name: str, **fields: Any) -> BottleSpec:
        """A spec with the session's allowlist unless ``fields`` overrides it."""
        fields.setdefault("allowlist", self.options.allowlist)
        return BottleSpec(name, **fields)

    def start(self, spec: BottleSpec | str, **fields: Any) -> Bottle:
        if isinstance(spec, str):
            spec = self.spec(spec, **fields)
        return self.launcher.start(spec)

    def start_many(self, specs: list[BottleSpec]) -> list[Bottle]:
        return self.launcher.start_many(specs)

    def stop(self, bottle: Bottle) -> None:
        self.launcher.stop(bottle)


@pytest.fixture(scope="session")
def bottle_options(pytestconfig: pytest.Config) -> BottleOptions:
    """The plugin's options for this session (backend, pool, egress, ...)."""
    return pytestconfig.stash[OPTIONS_KEY]


@pytest.fixture(scope="session")
def bottle_backend(pytestconfig: pytest.Config) -> Backend:
    """The backend chosen with ``--bottle-backend``, checked to run here."""
    backend = _backend_for(pytestconfig)
    backend.check()
    return backend


@pytest.fixture(scope="session")
def bottle_pool(bottle_options: BottleOptions) -> AliasPool:
    """The loopback alias pool shared with every process on this host."""
    return AliasPool(pool_from_environment(bottle_options.pool))


@pytest.fixture(scope="session")
def bottle_factory(
    bottle_backend: Backend,
    bottle_pool: AliasPool,
    bottle_options: BottleOptions,
    pytestconfig: pytest.Config,
) -> Iterator[BottleFactory]:
    """Starts bottles on the chosen backend; all are stopped after the session.

    Leftovers of dead runs are reaped first, and the terminal says so.
    """
    registry = RunRegistry()
    reaped = reap(bottle_backend, bottle_pool, registry) + reap_standins(
        bottle_pool, registry
    )
    registry.forget_dead()
    if reaped:
        _write_line(
            pytestconfig,
            f"bot-bottle: removed {len(reaped)} leftover(s) of dead runs: "
            + ", ".join(reaped),
        )
    run = pytestconfig.stash[_RUN_KEY]
    launcher = Launcher(
        bottle_backend,
        bottle_pool,
        run=run,
        pool_wait_seconds=bottle_options.pool_wait,
    )
    factory = BottleFactory(launcher, bottle_options)
    try:
        yield factory
    finally:
        launcher.stop_all()


@pytest.fixture
def bottle(
    bottle_factory: BottleFactory, request: pytest.FixtureRequest
) -> Iterator[Bottle]:
    """A fresh bottle for one test, stopped after it.

    Mark the test with ``@pytest.mark.bottle_spec(allowlist=[...])`` to change
    its spec.
    """
    marker = request.node.get_closest_marker("bottle_spec")
    fields = dict(marker.kwargs) if marker else {}
    name = fields.pop("name", f"t{abs(hash(request.node.nodeid)) % 10**6}")
    started = bottle_factory.start(name, **fields)
    try:
        yield started
    finally:
        bottle_factory.stop(started)


@pytest.fixture(scope="session")
def bottle_sentinels(bottle_factory: BottleFactory) -> Iterator[Sentinels]:
    """Host listeners no bottle may reach: 127.0.0.1 and every interface."""
    sentinels = Sentinels.start(bottle_factory.hub)
    try:
        yield sentinels
    finally:
        sentinels.close(bottle_factory.hub)


@pytest.fixture(scope="session")
def bottle_sentinel(bottle_sentinels: Sentinels) -> Listener:
    """A host listener on ``127.0.0.1`` (free port) that logs every nonce."""
    return bottle_sentinels.loopback


@dataclasses.dataclass(frozen=True)
class OutsideTargets:
    """The outside addresses bottles must not reach, and who can witness them."""

    targets: list[OutsideTarget]
    witness: FileWitness | None

    def addresses(self) -> list[tuple[str, int]]:
        return [(target.host, target.port) for target in self.targets]


def _outside_of(options: BottleOptions) -> list[OutsideTarget]:
    return outside_targets(
        options.egress, options.dns, options.metadata, options.public
    )


@pytest.fixture(scope="session")
def bottle_outside(
    bottle_options: BottleOptions, bottle_factory: BottleFactory
) -> Iterator[OutsideTargets]:
    """Egress (TCP, UDP), DNS, metadata and public targets, stand-ins if asked.

    Under pytest-xdist the controller makes the stand-in and the workers read
    its nonce log, so there is one stand-in per run.
    """
    targets = _outside_of(bottle_options)
    shared = os.environ.get(_STANDIN_ENV)
    if shared:
        yield OutsideTargets(targets, FileWitness(Path(shared)))
        return
    if not bottle_options.egress_standin:
        yield OutsideTargets(targets, None)
        return
    outside = OutsideTargets(targets, None)
    standin = start_standin(
        outside.addresses(),
        bottle_factory.hub,
        bottle_factory.launcher.pool,
        bottle_factory.launcher.run,
    )
    try:
        yield OutsideTargets(targets, standin.witness)
    finally:
        stop_standin(standin, bottle_factory.hub)


# -- pytest-xdist: one stand-in for the whole run ------------------------------

_CONTROLLER_STANDIN = pytest.StashKey[tuple[StandIn, ListenerHub]]()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config: pytest.Config, specs: list[Any]) -> None:
    options = config.stash[OPTIONS_KEY]
    if not options.egress_standin or _STANDIN_ENV in os.environ:
        return
    hub = ListenerHub()
    pool = AliasPool(pool_from_environment(options.pool))
    registry = RunRegistry()
    reap_standins(pool, registry)
    run = config.stash[_RUN_KEY]
    registry.register(run, Owner.current())
    addresses = [(target.host, target.port) for target in _outside_of(options)]
    standin = start_standin(addresses, hub, pool, run)
    config.stash[_CONTROLLER_STANDIN] = (standin, hub)
    os.environ[_STANDIN_ENV] = str(standin.log_path)


def pytest_unconfigure(config: pytest.Config) -> None:
    held = config.stash.get(_CONTROLLER_STANDIN, None)
    if held is not None:
        standin, hub = held
        stop_standin(standin, hub)
        hub.shutdown()
        RunRegistry().unregister(standin.run)
        os.environ.pop(_STANDIN_ENV, None)


# -- the matrix in the terminal summary ----------------------------------------


def record_cell(item: pytest.Item, cell: Cell) -> None:
    """Attach ``cell`` to the test's report for the matrix and the reports.

    It goes to the item's user properties directly, not through the
    ``record_property`` fixture, which warns under junitxml's xunit2 family.
    """
    item.user_properties.append((CELL_PROPERTY, json.dumps(cell.to_json())))


def record_facts(item: pytest.Item, record: dict[str, Any]) -> None:
    """Attach a bottle's record (alias, allowlists, backend version and facts)."""
    item.user_properties.append((FACTS_PROPERTY, json.dumps(record)))


class MatrixCollector:
    """Gathers every cell reported by the tests and draws the matrix."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.cells: list[Cell] = []
        #: Per bottle name: the backend's version and facts such as whether a
        #: workaround was applied.
        self.facts: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == CELL_PROPERTY:
                self.cells.append(Cell.from_json(json.loads(str(value))))
            elif name == FACTS_PROPERTY:
                record = json.loads(str(value))
                self.facts[record["bottle"]] = record

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.cells:
            return
        matrix = Matrix(self.backend, list(self.cells))
        terminalreporter.write_sep("=", f"bottle isolation matrix ({self.backend})")
        for line in render_text(matrix, width=terminalreporter._tw.fullwidth):
            terminalreporter.write_line(line)
        failures = matrix.failures()
        for cell in failures:
            terminalreporter.write_line(
                f"  {cell.source} -> {cell.column} ({cell.target.address}): "
                f"expected {cell.expected}, got {cell.actual}: {cell.reason}",
                red=True,
            )
        verdict = (
            "every cell as expected"
            if not failures
            else f"{len(failures)} cell(s) differ from what was expected"
        )
        terminalreporter.write_line(f"bottle verdict: {verdict}")


def _write_line(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        log.info("%s", line)
        return
    # Fixtures run with output captured; this line is for the user now.
    with capture.global_and_fixture_disabled():
        reporter.write_line(line)


__all__ = [
    "BottleFactory",
    "BottleOptions",
    "MatrixCollector",
    "OutsideTargets",
    "record_cell",
    "record_facts",
    "shared_run_label",
]
