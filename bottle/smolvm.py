"""Driving smol-machines' ``smolvm`` command.

Which ``smolvm``: the path given explicitly (the backend option ``smolvm``),
else ``$BOTTLE_SMOLVM``, else the first ``smolvm`` on ``PATH``.

Which project: the PyPI packages ``smolvm`` and ``smolvm-core`` belong to
another project and install a ``smolvm`` command of their own.  A command is
taken for smol-machines' smolvm only when both

- ``smolvm --version`` prints, first, ``smolvm X.Y.Z`` (the form of the Rust
  argument parser smolvm is built with, optionally ``vX.Y.Z``), and
- ``smolvm --help`` lists a ``machine`` subcommand, the family every bottle
  command belongs to.

Anything else is refused with the output it gave, so the user sees which
program answered.

The command form depends on the version: before 1.0.2 ``machine create`` and
``machine delete`` take the machine name as a positional argument; from 1.0.2
every ``machine`` command takes ``--name``.

A ``--version`` line carrying the marker :data:`FAKE_MARKER` comes from the
project's test stand-in (``tests/fake_smolvm/smolvm``), which runs its
"guests" as network namespaces and needs no hypervisor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bottle.errors import BottleError

log = logging.getLogger(__name__)

#: The environment variable naming the ``smolvm`` binary.
SMOLVM_ENV = "BOTTLE_SMOLVM"

#: What the test stand-in appends to its ``--version`` line.
FAKE_MARKER = "(bot-bottle fake: no hypervisor)"

#: From this version on, every ``machine`` command names the machine by flag.
NAME_FLAG_SINCE = (1, 0, 2)

#: From this version on, ``create --from`` keeps ``--allow-cidr``.
FROM_KEEPS_ALLOWLIST_SINCE = (1, 8, 0)

_VERSION_LINE = re.compile(r"^smolvm v?(\d+)\.(\d+)\.(\d+)([-+.\w]*)(.*)$")
_MACHINE_COMMAND = re.compile(r"^\s+machine\b", re.MULTILINE)
_QUERY_TIMEOUT_SECONDS = 20.0


class SmolvmUnusable(BottleError):
    """No usable smol-machines ``smolvm`` here; ``problem`` says what is wrong.

    ``what`` is one of ``binary``, ``identity``, ``version``.
    """

    def __init__(self, what: str, path: str, problem: str) -> None:
        super().__init__(what, path, problem)
        self.what = what
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return self.problem


class SmolvmCommandError(BottleError):
    """A ``smolvm`` command failed; keeps the command, status and stderr."""

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr: str, machine: str = ""
    ) -> None:
        super().__init__(list(argv), returncode, stderr, machine)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.machine = machine

    def __str__(self) -> str:
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else "no error output"
        about = f" (machine {self.machine})" if self.machine else ""
        command = " ".join(self.argv[:3])
        return f"`{command} ...`{about} exited {self.returncode}: {detail}"


@dataclasses.dataclass(frozen=True)
class SmolvmVersion:
    """A parsed ``smolvm --version``."""

    major: int
    minor: int
    patch: int
    suffix: str = ""
    fake: bool = False

    @classmethod
    def parse(cls, output: str) -> SmolvmVersion:
        """Read the first line of ``smolvm --version``; ValueError if foreign."""
        first = output.strip().splitlines()[0] if output.strip() else ""
        match = _VERSION_LINE.match(first.strip())
        if match is None:
            raise ValueError(f"not a smolvm version line: {first!r}")
        major, minor, patch, suffix, rest = match.groups()
        return cls(int(major), int(minor), int(patch), suffix, fake=FAKE_MARKER in rest)

    @property
    def triple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    @property
    def names_by_flag(self) -> bool:
        """Whether ``create``/``delete`` take ``--name`` (1.0.2 on)."""
        return self.triple >= NAME_FLAG_SINCE

    @property
    def from_keeps_allowlist(self) -> bool:
        """Whether ``create --from`` stores ``--allow-cidr`` (1.8.0 on)."""
        return self.triple >= FROM_KEEPS_ALLOWLIST_SINCE

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}{self.suffix}"
        return f"{text} (fake)" if self.fake else text


@dataclasses.dataclass(frozen=True)
class ExecOutput:
    """What ``smolvm machine exec`` returned (124 when it timed out)."""

    returncode: int
    stdout: str
    stderr: str


def find_smolvm(explicit: str | None = None) -> Path:
    """The ``smolvm`` to use: ``explicit``, else ``$BOTTLE_SMOLVM``, else PATH."""
    if explicit:
        source, chosen = "backend option smolvm", explicit
    elif os.environ.get(SMOLVM_ENV):
        source, chosen = f"${SMOLVM_ENV}", os.environ[SMOLVM_ENV]
    else:
        found = shutil.which("smolvm")
        if found is None:
            raise SmolvmUnusable(
                "binary",
                "",
                "smolvm binary: not found on PATH; install smol-machines' smolvm "
                f"or name it with the backend option smolvm=PATH or ${SMOLVM_ENV}",
            )
        return Path(found)
    path = Path(chosen).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        raise SmolvmUnusable(
            "binary",
            str(path),
            f"smolvm binary: {path} (from {source}) is not an executable file",
        )
    return path


class Smolvm:
    """One ``smolvm`` binary, verified, with the command form of its version."""

    def __init__(
        self,
        path: Path,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
    ) -> None:
        self.path = Path(path)
        #: The environment of smolvm commands; None: this process's, as it is
        #: at each call.
        self.env = None if env is None else dict(env)
        self.timeout = timeout
        self._version: SmolvmVersion | None = None

    @classmethod
    def locate(cls, explicit: str | None = None) -> Smolvm:
        """Find the binary (see :func:`find_smolvm`) and verify it."""
        smolvm = cls(find_smolvm(explicit))
        smolvm.version()
        return smolvm

    def __repr__(self) -> str:
        return f"Smolvm({str(self.path)!r})"

    # -- what it is ------------------------------------------------------------

    def version(self) -> SmolvmVersion:
        """The parsed version, after checking this is smol-machines' smolvm."""
        if self._version is not None:
            return self._version
        output = self._query(["--version"])
        try:
            version = SmolvmVersion.parse(output)
        except ValueError:
            shown = output.strip().splitlines()[:1] or ["nothing"]
            raise SmolvmUnusable(
                "version",
                str(self.path),
                f"smolvm version: `{self.path} --version` printed {shown[0]!r}, not "
                "`smolvm X.Y.Z`; is this the unrelated PyPI package `smolvm`? "
                "install smol-machines' smolvm",
            ) from None
        help_text = self._query(["--help"])
        if not _MACHINE_COMMAND.search(help_text):
            raise SmolvmUnusable(
                "identity",
                str(self.path),
                f"smolvm identity: `{self.path} --help` lists no `machine` command, "
                "so it is not smol-machines' smolvm (the PyPI packages smolvm and "
                "smolvm-core install another program of that name)",
            )
        log.debug("%s is smolvm %s", self.path, version)
        self._version = version
        return version

    # -- machine commands ------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        source: str = "",
        image: str = "",
        net: bool = True,
        allow_cidrs: Sequence[str] = (),
        ports: Sequence[tuple[int, int]] = (),
        publish_address: str = "",
    ) -> None:
        """``machine create`` from a ``.smolmachine`` (``source``) or an image."""
        if bool(source) == bool(image):
            raise ValueError("give exactly one of source and image")
        argv = ["machine", "create", *self._name_for_create_delete(name)]
        argv += ["--from", source] if source else ["--image", image]
        if net:
            argv.append("--net")
        for cidr in allow_cidrs:
            argv += ["--allow-cidr", cidr]
        for host, guest in ports:
            argv += ["-p", f"{host}:{guest}"]
        extra_env = {"SMOLVM_PUBLISH_ADDR": publish_address} if publish_address else {}
        self._run(argv, machine=name, extra_env=extra_env)

    def start(self, name: str) -> None:
        self._run(["machine", "start", "--name", name], machine=name)

    def stop(self, name: str) -> None:
        self._run(["machine", "stop", "--name", name], machine=name)

    def delete(self, name: str) -> None:
        argv = ["machine", "delete", *self._name_for_create_delete(name)]
        self._run(argv, machine=name)

    def status(self, name: str) -> dict[str, Any]:
        output = self._run(["machine", "status", "--name", name, "--json"], name)
        parsed = self._json(output, ["machine", "status"], name)
        if not isinstance(parsed, dict):
            raise SmolvmCommandError(
                [str(self.path), "machine", "status"], 0, f"not an object: {output}"
            )
        return parsed

    def machines(self) -> list[dict[str, Any]]:
        """``machine ls --json`` as a list of machine objects."""
        output = self._run(["machine", "ls", "--json"])
        parsed = self._json(output, ["machine", "ls"], "")
        if isinstance(parsed, dict):
            parsed = parsed.get("machines", [])
        if not isinstance(parsed, list):
            raise SmolvmCommandError(
                [str(self.path), "machine", "ls"], 0, f"not a list: {output[:200]}"
            )
        return [item for item in parsed if isinstance(item, dict)]

    def exec(
        self, name: str, argv: Sequence[str], *, timeout: float = 60.0
    ) -> ExecOutput:
        """Run ``argv`` in the machine; the guest's exit status comes back."""
        command = [str(self.path), "machine", "exec", "--name", name, "--", *argv]
        log.debug("running %s", " ".join(command))
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            return ExecOutput(124, _text(exc.stdout), _text(exc.stderr))
        return ExecOutput(completed.returncode, completed.stdout, completed.stderr)

    # -- the pieces ------------------------------------------------------------

    def _name_for_create_delete(self, name: str) -> list[str]:
        return ["--name", name] if self.version().names_by_flag else [name]

    def _query(self, argv: list[str]) -> str:
        command = [str(self.path), *argv]
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=_QUERY_TIMEOUT_SECONDS,
                env=self.env,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SmolvmUnusable(
                "binary",
                str(self.path),
                f"smolvm binary: {self.path} did not run: {exc}",
            ) from exc
        if completed.returncode != 0:
            detail = (completed.stderr or completed.stdout).strip().splitlines()
            raise SmolvmUnusable(
                "version",
                str(self.path),
                f"smolvm version: `{' '.join(command)}` exited "
                f"{completed.returncode}: {(detail or ['no output'])[-1]}",
            )
        return completed.stdout

    def _run(
        self,
        argv: list[str],
        machine: str = "",
        *,
        extra_env: Mapping[str, str] | None = None,
    ) -> str:
        command = [str(self.path), *argv]
        log.debug("running %s", " ".join(command))
        env = {**(os.environ if self.env is None else self.env), **(extra_env or {})}
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=self.timeout,
                env=env,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SmolvmCommandError(
                command, 124, f"timed out after {self.timeout:g} s", machine
            ) from exc
        except OSError as exc:
            raise SmolvmCommandError(command, 127, str(exc), machine) from exc
        if completed.returncode != 0:
            raise SmolvmCommandError(
                command, completed.returncode, completed.stderr, machine
            )
        return completed.stdout

    def _json(self, output: str, what: list[str], machine: str) -> Any:
        try:
            return json.loads(output)
        except ValueError as exc:
            raise SmolvmCommandError(
                [str(self.path), *what, "--json"],
                0,
                f"printed no JSON ({exc}): {output[:200]!r}",
                machine,
            ) from exc


def _text(value: bytes | str | None) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value or ""
