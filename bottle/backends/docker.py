"""Bottles as Docker containers on a per-bottle ``--internal`` network.

A docker bottle is:

- ``bb-<id>-int``: an ``--internal`` bridge network of the bottle's own.  It
  has no route out, so the agent reaches only what sits on it.
- ``bb-<id>-pub``: a second, ordinary bridge network.  Docker cannot publish
  ports from an internal network, so the bundle's containers also join this
  one, and publish their ports on the bottle's loopback alias only.
- ``bb-<id>-bundle-<service>``: one container per bundle service.  An echo
  service runs the project's prober as a nonce echo server
  (``bottle-probe --serve PORT``); its log is the far side's evidence.  A
  service listens on one port, the same inside its container (where the agent
  dials it, at the container's address on the internal network) and on the
  host (the alias).  A port the spec leaves at 0 is a free port of the alias,
  different from every other docker bottle's of this process, so that a probe
  of another bundle's port at this bottle's own bundle means something.
- ``bb-<id>-agent``: the agent, on the internal network only, with every
  capability dropped, ``no-new-privileges`` and no published ports.

Network membership, not a list of addresses, is what confines the agent, so
the only allowlist a docker bottle takes is the default, its own alias; any
other entry is refused before anything is made.

Docker leaves one way out of an internal network: the host itself answers on
the bridge's gateway address, so the agent reaches every host service bound
to ``0.0.0.0``.  The backend closes it with an nftables table of the bottle's
own that rejects anything entering the host from the bottle's bridges unless
it answers a connection the host made, and anything the host would forward
between the internal bridge and any other interface (Docker drops that
already, silently; a reject makes a blocked probe fail at once instead of
timing out).  The bridges are named by the backend
(not by Docker), so the table is loaded before they exist and no packet ever
passes unfiltered.

Backend options (``OPTIONS``) choose the agent's image and, for negative
controls only, weaken the bottle on purpose, so that each probe is shown to
see the leak it looks for:

- ``gateway_rule=off`` leaves the nftables table out: the agent reaches every
  host service bound to ``0.0.0.0`` at its gateway.
- ``internal=off`` makes the agent's network an ordinary bridge, with a
  default route through the host, NAT and all (the table's forward rule, if
  loaded, still rejects what the host would forward).
- ``bundle_publish=all`` publishes the bundle's port on ``0.0.0.0`` instead
  of the alias, so it answers on every host address.

Every container and network carries the labels ``bot-bottle.bottle`` and
``bot-bottle.run``, so a reaper finds what a crashed run left.  Images are
never pulled: the agent and bundle run the probe image built here from the
prober's source (see :mod:`bottle.images`) unless the spec names another
image that is already present.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from bottle import images
from bottle.backends.base import (
    BackendConfig,
    Bottle,
    ExecResult,
    Requirement,
    bottles_with_nft_tables,
    reject_unknown_options,
    run_host_command,
)
from bottle.bundle import free_port
from bottle.errors import (
    BackendUnavailable,
    BottleError,
    BottleStartError,
    BottleUsageError,
    CommandFailed,
)
from bottle.listeners import ListenerHub
from bottle.pool import Lease
from bottle.spec import ALIAS_ENTRY, AgentSpec, BottleSpec, BundleService, parse_cidr

log = logging.getLogger(__name__)

LABEL_BOTTLE = "bot-bottle.bottle"
LABEL_RUN = "bot-bottle.run"
LABEL_BACKEND = "bot-bottle.backend"
NAME_PREFIX = "bb-"
#: Not ``bottle_``: the netns backend reaps every ``inet bottle_*`` table.
TABLE_PREFIX = "bbdk_"
BRIDGE_PREFIX = "bd"
IDLE_COMMAND = ("sleep", "2147483647")
NOBODY = "65534:65534"
PING_TIMEOUT_SECONDS = 3
API_TIMEOUT_SECONDS = 60
READY_TIMEOUT_SECONDS = 15.0
#: How long a witness waits for Docker to copy a late log line before it says
#: a nonce never arrived (the echo server logs before it answers, but Docker
#: copies container output to its log asynchronously).
LOG_GRACE_SECONDS = 0.05
#: How many free ports of an alias are tried before giving up on finding one
#: that no other bottle of this process uses.
PORT_ATTEMPTS = 50

OPTIONS = {
    "image": (
        "image for the agent and non-echo bundle services when the spec names "
        "none (default: the probe image, built here from bottle/bottle-probe.c)"
    ),
    # The options below weaken isolation on purpose.  They exist for the
    # negative controls, which prove that each probe can see its leak.
    "gateway_rule": (
        "on (default) rejects what enters the host from the bottle's bridges; "
        "off: NEGATIVE CONTROL, Docker's behaviour, where the agent reaches "
        "host services bound to 0.0.0.0 at its gateway"
    ),
    "internal": (
        "on (default) | off: NEGATIVE CONTROL, the agent's network is an "
        "ordinary (not --internal) bridge with a route out through the host"
    ),
    "bundle_publish": (
        "alias (default) | all: NEGATIVE CONTROL, the bundle's port is "
        "published on 0.0.0.0, every host address"
    ),
}

#: Each option that weakens isolation: its safe value, then its leaky one.
_LEAKY_CHOICES = {
    "gateway_rule": ("on", "off"),
    "internal": ("on", "off"),
    "bundle_publish": ("alias", "all"),
}


class _PortReservations:
    """Bundle ports held by this process's docker bottles, by bottle id.

    The kernel picks each free port independently per address, so two
    bottles on two aliases can be handed the same one; this keeps them apart.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, set[int]] = {}

    def hold(self, bottle_id: str, port: int) -> None:
        with self._lock:
            self._held.setdefault(bottle_id, set()).add(port)

    def choose(self, bottle_id: str, host: str) -> int:
        """A free port of ``host`` that no other bottle here holds, now held."""
        with self._lock:
            taken = set().union(*self._held.values())
            for _ in range(PORT_ATTEMPTS):
                port = free_port(host)
                if port not in taken:
                    self._held.setdefault(bottle_id, set()).add(port)
                    return port
        raise BottleStartError(
            bottle_id,
            f"no free port on {host} that other bottles do not use "
            f"after {PORT_ATTEMPTS} tries",
        )

    def release(self, bottle_id: str) -> None:
        with self._lock:
            self._held.pop(bottle_id, None)


_PORTS = _PortReservations()


class DockerRemovalError(BottleError):
    """Some of a bottle's containers, networks or rules could not be removed."""

    def __init__(self, bottle_id: str, problems: Sequence[str]) -> None:
        super().__init__(bottle_id, list(problems))
        self.bottle_id = bottle_id
        self.problems = list(problems)

    def __str__(self) -> str:
        return f"bottle {self.bottle_id} left resources: {'; '.join(self.problems)}"


def network_name(bottle_id: str, kind: str) -> str:
    return f"{NAME_PREFIX}{bottle_id}-{kind}"


def bridge_name(bottle_id: str, kind: str) -> str:
    """A bridge name of at most 15 characters, derived from the bottle id."""
    digest = hashlib.sha1(bottle_id.encode()).hexdigest()[:11]
    return f"{BRIDGE_PREFIX}{kind[0]}{digest}"


def agent_name(bottle_id: str) -> str:
    return f"{NAME_PREFIX}{bottle_id}-agent"


def bundle_name(bottle_id: str, service: str) -> str:
    return f"{NAME_PREFIX}{bottle_id}-bundle-{service}"


def table_name(bottle_id: str) -> str:
    return TABLE_PREFIX + bottle_id.replace("-", "_")


def engine_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def engine_problem() -> str | None:
    """Why no Docker engine answers here, in one line; None when one does."""
    address = engine_address()
    hint = "start dockerd (or run under scripts/with-dockerd)"
    if address.startswith("unix://"):
        path = address.removeprefix("unix://")
        if not os.path.exists(path):
            # Checked first: the SDK leaks a socket when it cannot connect.
            return f"no Docker engine answers at {address}: {hint} (no socket)"
    try:
        import docker

        client = docker.from_env(timeout=PING_TIMEOUT_SECONDS)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Docker engine answers at {address}: {hint} ({_one_line(exc)})"
    return None


class ContainerLogWitness:
    """The far side of a bundle echo service: its container's log."""

    def __init__(self, client: Any, container: str) -> None:
        self.client = client
        self.container = container
        #: Nonces of the log as of the last :meth:`refresh`, if one was asked.
        self._snapshot: set[str] | None = None

    def saw_nonce(self, nonce: str) -> bool:
        if self._snapshot is not None:
            return nonce in self._snapshot
        if nonce in self._nonces():
            return True
        time.sleep(LOG_GRACE_SECONDS)
        return nonce in self._nonces()

    def refresh(self) -> None:
        # Docker copies a container's output to its log asynchronously.
        time.sleep(LOG_GRACE_SECONDS)
        self._snapshot = self._nonces()

    def _nonces(self) -> set[str]:
        output = self.client.api.logs(self.container, stdout=True, stderr=False)
        text = output.decode(errors="replace")
        return {line.split(" ", 1)[0] for line in text.splitlines()}

    def __repr__(self) -> str:
        return f"<ContainerLogWitness {self.container}>"


class DockerBackend:
    """Bottles as containers on per-bottle internal networks."""

    name: ClassVar[str] = "docker"

    def __init__(self, config: BackendConfig) -> None:
        reject_unknown_options(self.name, config.options, OPTIONS)
        self.config = config
        leaky = {
            key: _leaky_choice(config.options, key, safe, weak)
            for key, (safe, weak) in _LEAKY_CHOICES.items()
        }
        if any(leaky.values()):
            log.warning(
                "docker bottles are deliberately leaky: %s",
                ", ".join(
                    f"{key}={config.options[key]}" for key in leaky if leaky[key]
                ),
            )
        self.gateway_rule = not leaky["gateway_rule"]
        self.internal = not leaky["internal"]
        #: The host address bundles publish on: the alias, or None for every one.
        self.publish_on_alias = not leaky["bundle_publish"]
        self.default_image = config.options.get("image", "")
        self.cache_dir = config.state_dir / "docker"
        self._docker: Any = None
        self._image_lock = threading.Lock()

    # -- what the host needs -------------------------------------------------

    def requirements(self) -> list[Requirement]:
        found: list[Requirement] = []
        try:
            import docker
        except ImportError:
            return [
                Requirement(
                    "docker SDK for Python",
                    False,
                    "pip install 'bot-bottle[docker]'",
                )
            ]
        found.append(Requirement("docker SDK for Python", True, docker.__version__))

        engine_problem = self._engine_problem()
        found.append(
            Requirement(
                "Docker engine",
                engine_problem is None,
                engine_problem or f"answers at {engine_address()}",
            )
        )

        built = engine_problem is None and self._probe_image_present()
        tag = _safe_tag()
        for what, present, hint in (
            ("gcc", shutil.which("gcc") is not None, "apt-get install gcc"),
            (
                "static C library",
                images.static_libc_present(),
                "apt-get install libc6-dev",
            ),
            (
                "static busybox",
                images.find_busybox() is not None,
                "apt-get install busybox-static",
            ),
        ):
            detail = (
                f"not needed: {tag} is built"
                if built
                else ("present" if present else f"to build {tag}: {hint}")
            )
            found.append(
                Requirement(
                    f"{what} (builds the probe image)", present or built, detail
                )
            )

        if self.gateway_rule:
            nft = shutil.which("nft")
            is_root = platform.system() == "Linux" and os.geteuid() == 0
            found.append(
                Requirement(
                    "`nft` command (gateway rule)",
                    nft is not None,
                    nft or "apt-get install nftables, or gateway_rule=off",
                )
            )
            found.append(
                Requirement(
                    "root (gateway rule)",
                    is_root,
                    "running as root"
                    if is_root
                    else "run as root, or gateway_rule=off",
                )
            )
        return found

    def check(self) -> None:
        problems = []
        for requirement in self.requirements():
            if requirement.present:
                continue
            if requirement.what == "Docker engine":
                # The one failure users hit most gets a line of its own.
                raise BackendUnavailable(self.name, requirement.detail)
            problems.append(f"{requirement.what}: {requirement.detail}")
        if problems:
            raise BackendUnavailable(self.name, "; ".join(problems))

    def version(self) -> str:
        info = self._client().version()
        return (
            f"Docker Engine {info.get('Version', '?')} "
            f"(API {info.get('ApiVersion', '?')}), Linux {platform.release()}"
        )

    # -- start and stop ------------------------------------------------------

    def start(self, spec: BottleSpec, lease: Lease, hub: ListenerHub) -> Bottle:
        refuse_other_allowlists(spec, lease.alias)
        bottle_id = lease.bottle_id
        handle: dict[str, Any] = {
            "run": lease.run,
            "agent": agent_name(bottle_id),
            "bundle": {},
            "networks": {
                "int": network_name(bottle_id, "int"),
                "pub": network_name(bottle_id, "pub"),
            },
            "bridges": [bridge_name(bottle_id, "int"), bridge_name(bottle_id, "pub")],
            "table": table_name(bottle_id) if self.gateway_rule else "",
            "gateway_rule": "on" if self.gateway_rule else "off",
            "internal": "on" if self.internal else "off",
            "bundle_publish": "alias" if self.publish_on_alias else "all",
            "agent_user": _docker_user(spec.agent.user),
            "allowlist": list(spec.allowlist),
        }
        bottle = Bottle(
            spec=spec,
            bottle_id=bottle_id,
            alias=lease.alias,
            allowlist=[],
            backend=self.name,
            bundle_ports={},
            handle=handle,
        )
        started = time.monotonic()
        try:
            self._start(bottle, lease)
        except BaseException as exc:
            log.debug("start of %s failed, removing what it made", bottle_id)
            try:
                self.remove(bottle_id, handle)
            except BottleError:
                log.exception("could not clean up after the failed start")
            if isinstance(exc, BottleUsageError):
                raise
            if isinstance(exc, Exception):
                raise BottleStartError(bottle_id, _one_line(exc)) from exc
            raise
        log.debug("started %s in %.2f s", bottle_id, time.monotonic() - started)
        return bottle

    def stop(self, bottle: Bottle, hub: ListenerHub | None) -> None:
        self.remove(bottle.bottle_id, bottle.handle)

    def remove(self, bottle_id: str, handle: Mapping[str, Any]) -> None:
        import docker.errors

        problems: list[str] = []
        try:
            client = self._client()
            selector = {"label": f"{LABEL_BOTTLE}={bottle_id}"}
            names = {agent_name(bottle_id), *dict(handle.get("bundle", {})).values()}
            for record in client.api.containers(all=True, filters=selector):
                names.add(str(record["Id"]))
            for container in sorted(names):
                try:
                    client.api.remove_container(container, force=True, v=True)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    problems.append(f"container {container}: {_one_line(exc)}")
            networks = {network_name(bottle_id, kind) for kind in ("int", "pub")}
            for record in client.api.networks(filters=selector):
                networks.add(str(record["Id"]))
            for network in sorted(networks):
                problem = _remove_network(client, network)
                if problem:
                    problems.append(f"network {network}: {problem}")
        except docker.errors.DockerException as exc:
            problems.append(f"Docker engine at {engine_address()}: {_one_line(exc)}")

        # The rules go last: while a container may still be attached, the
        # bridge stays filtered.
        if shutil.which("nft") is not None:
            table = table_name(bottle_id)
            deleted = run_host_command(
                ["nft", "delete", "table", "inet", table], check=False
            )
            if deleted.returncode != 0 and "No such file" not in deleted.stderr:
                problems.append(f"nft table {table}: {_one_line_text(deleted.stderr)}")
        if problems:
            raise DockerRemovalError(bottle_id, problems)
        _PORTS.release(bottle_id)

    def leftovers(self) -> set[str]:
        import docker.errors

        found: set[str] = set()
        try:
            client = self._client()
            selector = {"label": LABEL_BOTTLE}
            for record in client.api.containers(all=True, filters=selector):
                found.add(str((record.get("Labels") or {})[LABEL_BOTTLE]))
            for record in client.api.networks(filters=selector):
                found.add(str((record.get("Labels") or {})[LABEL_BOTTLE]))
        except docker.errors.DockerException as exc:
            log.warning("cannot list Docker leftovers: %s", _one_line(exc))
        return found | bottles_with_nft_tables(TABLE_PREFIX)

    def host_side_addresses(self, bottle: Bottle) -> dict[str, str]:
        gateways = dict(bottle.handle.get("gateways", {}))
        addresses = {}
        if gateways.get("int"):
            addresses["gateway"] = str(gateways["int"])
        if gateways.get("pub"):
            addresses["bundle-network-gateway"] = str(gateways["pub"])
        return addresses

    def agent_loopback(self, bottle: Bottle) -> str:
        return "127.0.0.1"  # a container has a loopback of its own

    def attach(self, lease: Lease) -> Bottle:
        handle = dict(lease.handle)
        ports = {str(k): int(v) for k, v in handle.get("bundle_ports", {}).items()}
        spec = BottleSpec(
            name=lease.bottle_id.split("-", 1)[-1],
            bundle=tuple(BundleService(name, port) for name, port in ports.items()),
            allowlist=tuple(handle.get("allowlist", ["alias"])),
            agent=AgentSpec(image=str(handle.get("image", ""))),
            backend=self.name,
        )
        bottle = Bottle(
            spec=spec,
            bottle_id=lease.bottle_id,
            alias=lease.alias,
            allowlist=spec.effective_allowlist(lease.alias),
            backend=self.name,
            bundle_ports=ports,
            handle=handle,
            bundle_host=str(handle.get("bundle_host", "")),
        )
        client = self._client()
        for service, container in dict(handle.get("echo", {})).items():
            bottle.bundle_witnesses[service] = ContainerLogWitness(client, container)
        bottle.facts.update(handle.get("facts", {}))
        return bottle

    # -- inside the bottle ---------------------------------------------------

    def exec(
        self, bottle: Bottle, argv: Sequence[str], *, timeout: float = 60.0
    ) -> ExecResult:
        client = self._client()
        user = str(bottle.handle.get("agent_user", NOBODY))
        container = str(bottle.handle["agent"])

        def run() -> tuple[int, bytes, bytes]:
            created = client.api.exec_create(container, list(argv), user=user)
            output = client.api.exec_start(created["Id"], demux=True)
            stdout, stderr = output if output is not None else (b"", b"")
            code = client.api.exec_inspect(created["Id"]).get("ExitCode")
            return int(code if code is not None else 1), stdout or b"", stderr or b""

        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            code, stdout, stderr = executor.submit(run).result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return ExecResult(list(argv), 124, "", f"timed out after {timeout} s")
        finally:
            executor.shutdown(wait=False)
        return ExecResult(
            list(argv),
            code,
            stdout.decode(errors="replace"),
            stderr.decode(errors="replace"),
        )

    def prober_command(self, bottle: Bottle) -> list[str]:
        return [images.PROBER_IN_IMAGE]

    def effective_allowlist(self, bottle: Bottle) -> list[str]:
        """Where the bundle's ports are published, read back from the engine.

        The allowlist of a docker bottle is the host address its bundle is
        exposed on: the alias, as ``/32``.  The agent itself is confined by
        network membership instead (its internal network routes nothing but
        its own subnet, and the host rejects the rest); that subnet is in
        ``bottle.facts["internal_subnets"]``.
        """
        client = self._client()
        published: list[str] = []
        for container in dict(bottle.handle.get("bundle", {})).values():
            attrs = client.api.inspect_container(container)
            for bindings in (attrs["HostConfig"].get("PortBindings") or {}).values():
                for binding in bindings or []:
                    host = ipaddress.ip_address(binding.get("HostIp") or "0.0.0.0")
                    # An unspecified address publishes on every address.
                    prefix = 0 if host.is_unspecified else host.max_prefixlen
                    cidr = str(ipaddress.ip_network(f"{host}/{prefix}"))
                    if cidr not in published:
                        published.append(cidr)
        return published

    # -- the pieces ------------------------------------------------------------

    def _client(self) -> Any:
        if self._docker is None:
            import docker

            self._docker = docker.from_env(
                timeout=API_TIMEOUT_SECONDS, max_pool_size=32
            )
            # Close its connections when the backend goes away, not at some
            # later garbage collection with a ResourceWarning.
            weakref.finalize(self, self._docker.close)
        return self._docker

    def _engine_problem(self) -> str | None:
        return engine_problem()

    def _probe_image_present(self) -> bool:
        try:
            self._client().images.get(images.image_tag())
        except Exception:
            return False
        return True

    def _start(self, bottle: Bottle, lease: Lease) -> None:
        client = self._client()
        handle = bottle.handle
        bottle_id = bottle.bottle_id
        labels = {
            LABEL_BOTTLE: bottle_id,
            LABEL_RUN: lease.run,
            LABEL_BACKEND: self.name,
        }
        with self._image_lock:
            probe_image = images.ensure_image(client, self.cache_dir)
        agent_image = bottle.spec.agent.image or self.default_image or probe_image
        handle["image"] = agent_image
        self._require_local_image(agent_image)

        if self.gateway_rule:
            self._load_rules(bottle_id, handle["bridges"])

        gateways: dict[str, str] = {}
        subnets: list[str] = []
        for kind, internal in (("int", self.internal), ("pub", False)):
            network = client.networks.create(
                handle["networks"][kind],
                driver="bridge",
                internal=internal,
                labels=labels,
                options={
                    "com.docker.network.bridge.name": bridge_name(bottle_id, kind),
                },
                check_duplicate=True,
            )
            gateway, network_subnets = _gateway_and_subnets(network.attrs)
            gateways[kind] = gateway
            if kind == "int":
                subnets = network_subnets
        handle["gateways"] = gateways
        handle["subnets"] = subnets
        bottle.allowlist = bottle.spec.effective_allowlist(lease.alias)

        # Where each service answers: the host at the published address, the
        # agent at the container's own address; the port is the same for both.
        published: dict[str, str] = {}
        agent_side: dict[str, str] = {}
        echo: dict[str, str] = {}
        for service in bottle.spec.bundle:
            container, address, port = self._start_service(
                bottle, service, labels, probe_image, agent_image
            )
            handle["bundle"][service.name] = container
            bottle.bundle_ports[service.name] = port
            agent_side[service.name] = f"{address}:{port}"
            published[service.name] = f"{self._publish_host(bottle)}:{port}"
            if service.is_echo:
                echo[service.name] = container
                bottle.bundle_witnesses[service.name] = ContainerLogWitness(
                    client, container
                )
            if not bottle.bundle_host or bottle.bundle_host == bottle.alias:
                bottle.bundle_host = address
        handle["echo"] = echo
        handle["bundle_ports"] = dict(bottle.bundle_ports)
        handle["bundle_host"] = bottle.bundle_host
        handle["bundle_addresses"] = agent_side

        self._start_agent(bottle, labels, agent_image, probe_image)
        bottle.facts.update(
            {
                "gateway_rule": handle["gateway_rule"],
                "internal": handle["internal"],
                "bundle_publish": handle["bundle_publish"],
                "internal_network": handle["networks"]["int"],
                "internal_subnets": subnets,
                "published": published,
                "bundle_addresses": agent_side,
                "image": agent_image,
            }
        )
        handle["facts"] = dict(bottle.facts)

    def _start_service(
        self,
        bottle: Bottle,
        service: BundleService,
        labels: Mapping[str, str],
        probe_image: str,
        agent_image: str,
    ) -> tuple[str, str, int]:
        """Start one bundle container; returns its name, address and port."""
        client = self._client()
        name = bundle_name(bottle.bottle_id, service.name)
        host = self._publish_host(bottle)
        if service.port:
            port = service.port
            _PORTS.hold(bottle.bottle_id, port)
        else:
            port = _PORTS.choose(bottle.bottle_id, host)
        options: dict[str, Any] = {}
        if service.is_echo:
            image = probe_image
            command = [images.PROBER_IN_IMAGE, "--serve", str(port)]
            options = {"user": NOBODY, "cap_drop": ["ALL"]}
        else:
            image = agent_image
            command = [p.format(alias="0.0.0.0", port=port) for p in service.command]
        networks = bottle.handle["networks"]
        container = client.containers.create(
            image,
            command,
            name=name,
            labels=dict(labels),
            network=networks["int"],
            ports={f"{port}/tcp": (host, port)},
            security_opt=["no-new-privileges"],
            detach=True,
            **options,
        )
        client.networks.get(networks["pub"]).connect(container)
        container.start()

        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            container.reload()
            if container.status not in ("created", "running"):
                raise BottleStartError(
                    bottle.bottle_id,
                    f"bundle container {name} is {container.status}: "
                    + _tail(container.logs()),
                )
            address, host_port = _container_addresses(
                container.attrs, networks["int"], port
            )
            ready = address and host_port and container.status == "running"
            if ready and (
                not service.is_echo
                or b"serving" in container.logs(stdout=False, stderr=True)
            ):
                if host_port != port:
                    raise BottleStartError(
                        bottle.bottle_id,
                        f"bundle container {name} was published on host port "
                        f"{host_port}, not on {port} as asked",
                    )
                return name, address, port
            if time.monotonic() > deadline:
                raise BottleStartError(
                    bottle.bottle_id,
                    f"bundle container {name} was not ready within "
                    f"{READY_TIMEOUT_SECONDS:.0f} s (status {container.status}, "
                    f"address {address or 'none'}): " + _tail(container.logs()),
                )
            time.sleep(0.02)

    def _publish_host(self, bottle: Bottle) -> str:
        return bottle.alias if self.publish_on_alias else "0.0.0.0"

    def _require_local_image(self, image: str) -> None:
        """Refuse, before creating anything, an image this engine does not have."""
        import docker.errors

        try:
            self._client().images.get(image)
        except docker.errors.ImageNotFound:
            raise BottleUsageError(
                f"agent image {image!r}",
                "is not on this Docker engine, and bot-bottle never pulls; "
                "build or load it first (docker build, docker load)",
            ) from None

    def _start_agent(
        self,
        bottle: Bottle,
        labels: Mapping[str, str],
        image: str,
        probe_image: str,
    ) -> None:
        client = self._client()
        command = list(bottle.spec.agent.command) or list(IDLE_COMMAND)
        container = client.containers.create(
            image,
            command,
            name=bottle.handle["agent"],
            labels=dict(labels),
            network=bottle.handle["networks"]["int"],
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            user=bottle.handle["agent_user"],
            detach=True,
        )
        if image != probe_image:
            # Another agent image: bring the static prober along.
            binary = images.prober_binary(self.cache_dir)
            container.put_archive("/", images.prober_tar(binary))
        container.start()
        container.reload()
        if container.status != "running":
            raise BottleStartError(
                bottle.bottle_id,
                f"agent container is {container.status}: " + _tail(container.logs()),
            )

    def _load_rules(self, bottle_id: str, bridges: Sequence[str]) -> None:
        # The bridges are matched by name, so the rules are in force before
        # Docker creates them.  Input: nothing from the bottle's bridges
        # reaches a host socket unless it answers a connection the host opened
        # (a published port's proxy dialling the bundle).  Forward: the
        # internal bridge exchanges nothing with any other interface; Docker
        # drops that too, silently, which costs each probe its full timeout,
        # while a reject fails it at once.  TCP is reset rather than answered
        # with ICMP, which the kernel rate-limits to a few per second.
        internal = bridges[0]
        reject = "reject with icmpx type admin-prohibited"
        reset = "reject with tcp reset"
        names = ", ".join(f'"{bridge}"' for bridge in bridges)
        table = table_name(bottle_id)
        ruleset = f"""
table inet {table} {{
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        iifname {{ {names} }} ct state established,related accept
        iifname {{ {names} }} meta l4proto tcp {reset}
        iifname {{ {names} }} {reject}
    }}
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "{internal}" oifname != "{internal}" meta l4proto tcp {reset}
        iifname "{internal}" oifname != "{internal}" {reject}
        oifname "{internal}" iifname != "{internal}" {reject}
    }}
}}
"""
        argv = ["nft", "-f", "-"]
        log.debug("loading nftables table %s", table)
        completed = subprocess.run(
            argv, input=ruleset, capture_output=True, text=True, check=False, timeout=30
        )
        if completed.returncode != 0:
            raise CommandFailed(argv, completed.returncode, completed.stderr)


def refuse_other_allowlists(spec: BottleSpec, alias: str) -> None:
    """Refuse, in one line, an allowlist a docker bottle cannot honour.

    The agent is confined by the networks it sits on, not by addresses: it
    reaches its own bundle and nothing else whatever the list says, and an
    address such as 127.0.0.1 means the container itself in there.  So the
    only allowlist taken is the default, the bottle's own alias (also when
    written as its ``/32``).
    """
    supported = (
        f"docker bottles support only the allowlist {ALIAS_ENTRY!r} (the "
        "bottle's own alias), since network membership alone confines the "
        "agent; use the netns backend for other entries"
    )
    own = ipaddress.ip_network(f"{alias}/32")
    if not spec.allowlist:
        raise BottleUsageError("empty allowlist", supported)
    for entry in spec.allowlist:
        if entry != ALIAS_ENTRY and parse_cidr(entry) != own:
            raise BottleUsageError(f"allowlist entry {entry!r}", supported)


def _leaky_choice(options: Mapping[str, str], key: str, safe: str, leaky: str) -> bool:
    """Whether option ``key`` asks for its leaky value; anything else is refused."""
    value = options.get(key, safe)
    if value not in (safe, leaky):
        raise BottleUsageError(
            f"backend option {key}={value!r}", f"valid values: {safe}, {leaky}"
        )
    return value == leaky


def _docker_user(user: str) -> str:
    # Images need not know the name "nobody"; its numeric ids work anywhere.
    return NOBODY if user in ("", "nobody") else user


def _gateway_and_subnets(attrs: Mapping[str, Any]) -> tuple[str, list[str]]:
    config = (attrs.get("IPAM") or {}).get("Config") or []
    subnets = [str(entry["Subnet"]) for entry in config if entry.get("Subnet")]
    gateway = next((str(e["Gateway"]) for e in config if e.get("Gateway")), "")
    if not gateway and subnets:
        # Docker gives a bridge network's gateway the subnet's first address.
        gateway = str(next(ipaddress.ip_network(subnets[0]).hosts()))
    return gateway, subnets


def _container_addresses(
    attrs: Mapping[str, Any], network: str, port: int
) -> tuple[str, int]:
    settings = attrs.get("NetworkSettings") or {}
    address = str(
        ((settings.get("Networks") or {}).get(network) or {}).get("IPAddress") or ""
    )
    bindings = (settings.get("Ports") or {}).get(f"{port}/tcp") or []
    host_port = int(bindings[0]["HostPort"]) if bindings else 0
    return address, host_port


def _remove_network(client: Any, network: str) -> str:
    import docker.errors

    # A force-removed container's endpoint can linger for a moment.
    for attempt in range(20):
        try:
            client.api.remove_network(network)
            return ""
        except docker.errors.NotFound:
            return ""
        except docker.errors.APIError as exc:
            if attempt == 19:
                return _one_line(exc)
            time.sleep(0.1)
    return ""


def _safe_tag() -> str:
    try:
        return images.image_tag()
    except BottleError:
        return f"{images.IMAGE_REPOSITORY}:?"


def _tail(output: bytes | str, lines: int = 3) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    return " | ".join(text.strip().splitlines()[-lines:]) or "no output"


def _one_line(exc: BaseException) -> str:
    return _one_line_text(str(exc)) or type(exc).__name__


def _one_line_text(text: str) -> str:
    return " ".join(text.split())[:300]
