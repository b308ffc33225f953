"""What a bottle is: its name, agent, bundle services and allowlist.

A spec is plain data.  It can be written as a small TOML file::

    name = "reviewer"
    backend = "netns"
    allowlist = ["alias"]          # the default: the bottle's alias /32

    [agent]
    image = "bottle-probe:latest"  # used by container and VM backends

    [[bundle]]
    name = "proxy"
    port = 8080                    # 0 picks a free port on the alias
    command = ["python3", "-m", "http.server", "--bind", "{alias}", "{port}"]

A bundle service without a ``command`` is a nonce echo service: it answers
each probe's nonce and logs it, which is what the conformance suite needs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bottle.errors import BottleUsageError

#: The allowlist entry that stands for the bottle's own alias ``/32``.
ALIAS_ENTRY = "alias"

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")


@dataclasses.dataclass(frozen=True)
class BundleService:
    """One service of a bottle's bundle, listening on the bottle's alias."""

    name: str
    port: int = 0
    command: tuple[str, ...] = ()

    @property
    def is_echo(self) -> bool:
        """A service without a command is the built-in nonce echo service."""
        return not self.command


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    """How the agent runs; each backend reads the fields it understands."""

    image: str = ""
    source: str = ""
    user: str = "nobody"
    command: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class BottleSpec:
    """Everything needed to start one bottle."""

    name: str
    bundle: tuple[BundleService, ...] = (BundleService("echo"),)
    allowlist: tuple[str, ...] = (ALIAS_ENTRY,)
    agent: AgentSpec = AgentSpec()
    backend: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_name(self.name)
        seen = set()
        for service in self.bundle:
            check_name(service.name, what="bundle service name")
            if service.name in seen:
                raise BottleUsageError(
                    f"bundle service name {service.name!r}", "is used twice"
                )
            seen.add(service.name)
            if not 0 <= service.port <= 65535:
                raise BottleUsageError(
                    f"port {service.port} of bundle service {service.name!r}",
                    "must be 0 (any free port) or 1-65535",
                )
        for entry in self.allowlist:
            if entry != ALIAS_ENTRY:
                parse_cidr(entry)

    def effective_allowlist(self, alias: str) -> list[str]:
        """The allowlist with ``alias`` resolved, as normalised CIDRs."""
        resolved = []
        for entry in self.allowlist:
            text = f"{alias}/32" if entry == ALIAS_ENTRY else entry
            cidr = str(parse_cidr(text))
            if cidr not in resolved:
                resolved.append(cidr)
        return resolved


def check_name(name: str, what: str = "bottle name") -> str:
    if not _NAME_PATTERN.match(name):
        raise BottleUsageError(
            f"{what} {name!r}",
            "use 1-20 lowercase letters, digits or dashes, starting with a "
            "letter or digit",
        )
    return name


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR of the allowlist; a bare address becomes its ``/32``/``/128``."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise BottleUsageError(
            f"allowlist entry {text!r}",
            f"not a CIDR or address; use e.g. 127.0.0.16/32 or {ALIAS_ENTRY!r}",
        ) from None


def load_spec(path: Path) -> BottleSpec:
    """Read a spec from a TOML file; every error names the file."""
    data = read_spec_file(path)
    try:
        return spec_from_mapping(data)
    except BottleUsageError as exc:
        raise BottleUsageError(f"spec file {path}", str(exc)) from None


def read_spec_file(path: Path) -> dict[str, Any]:
    """The parsed TOML of a spec file; every error names the file."""
    what = f"spec file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BottleUsageError(what, "does not exist") from None
    except UnicodeDecodeError:
        raise BottleUsageError(what, "is not UTF-8 text") from None
    except OSError as exc:
        raise BottleUsageError(what, f"cannot be read ({exc.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BottleUsageError(what, f"is not TOML: {exc}") from None


_TOP_KEYS = {"name", "backend", "allowlist", "agent", "bundle", "options"}
_AGENT_KEYS = {field.name for field in dataclasses.fields(AgentSpec)}
_SERVICE_KEYS = {"name", "port", "command"}


def spec_from_mapping(data: Mapping[str, Any]) -> BottleSpec:
    """Build a spec from parsed TOML (or any mapping of the same shape)."""
    _reject_unknown(data, _TOP_KEYS, "spec")
    if "name" not in data:
        raise BottleUsageError("spec", "has no `name`")

    agent_data = data.get("agent", {})
    _reject_unknown(agent_data, _AGENT_KEYS, "[agent]")
    agent = AgentSpec(
        image=str(agent_data.get("image", "")),
        source=str(agent_data.get("source", "")),
        user=str(agent_data.get("user", "nobody")),
        command=tuple(_strings(agent_data.get("command", []), "agent.command")),
    )

    services = []
    bundle = data.get("bundle", [{"name": "echo"}])
    if isinstance(bundle, str) or not isinstance(bundle, Sequence):
        raise BottleUsageError("bundle", "must be an array of tables ([[bundle]])")
    for index, entry in enumerate(bundle):
        _reject_unknown(entry, _SERVICE_KEYS, f"[[bundle]] #{index + 1}")
        port = entry.get("port", 0)
        # TOML's true and false are Python ints too.
        if isinstance(port, bool) or not isinstance(port, int):
            raise BottleUsageError(
                f"[[bundle]] #{index + 1} port {port!r}",
                "not a whole number; use 0 (any free port) or 1-65535",
            )
        services.append(
            BundleService(
                name=str(entry.get("name", f"service-{index + 1}")),
                port=port,
                command=tuple(_strings(entry.get("command", []), "bundle.command")),
            )
        )

    options = data.get("options", {})
    if not isinstance(options, Mapping):
        raise BottleUsageError("options", "must be a table ([options])")

    return BottleSpec(
        name=str(data["name"]),
        bundle=tuple(services),
        allowlist=tuple(_strings(data.get("allowlist", [ALIAS_ENTRY]), "allowlist")),
        agent=agent,
        backend=str(data.get("backend", "")),
        options=dict(options),
    )


def _reject_unknown(data: Any, known: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise BottleUsageError(where, "must be a table")
    unknown = sorted(set(data) - known)
    if unknown:
        raise BottleUsageError(
            f"{where} key {unknown[0]!r}", f"unknown; valid keys: {sorted(known)}"
        )


def _strings(value: Any, where: str) -> Sequence[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise BottleUsageError(where, "must be a list of strings")
    return [str(item) for item in value]
