"""smolvm's state DB: where it is, and the careful allowlist patch.

smolvm keeps one SQLite DB per user (``vms(name TEXT PRIMARY KEY, data
BLOB)``, WAL mode), each ``data`` a compact UTF-8 JSON record of a machine.
The record's ``allowed_cidrs`` is ``null`` (unrestricted egress) or a list of
CIDR strings (``[]`` denies everything), and smolvm reads it when the machine
starts.

smolvm 0.8.0 through 1.7.7 drop ``--allow-cidr`` when a machine is created
``--from`` a packed ``.smolmachine`` and store ``null``: unrestricted egress,
without a warning.  :meth:`SmolvmDb.ensure_allowlist` sets the allowlist in
the record between ``machine create`` and ``machine start``.  It is careful,
because the DB is smolvm's and not ours:

- one short ``BEGIN IMMEDIATE`` transaction that waits for a busy DB within
  a bound, then fails with an error saying so;
- only the bytes of the ``allowed_cidrs`` value are replaced: every other
  field keeps its text, its position and its order;
- the record is read back and checked before the transaction commits, and
  read again after;
- a DB or record that does not look as expected (no ``vms`` table, no
  ``data`` column, data that is not a JSON object, ``allowed_cidrs`` of
  another type than null or a list of strings) is refused, naming what was
  unexpected, and left untouched;
- when the record already holds exactly the allowlist, nothing is written
  and the log says so: that is how a smolvm that fixed the bug shows itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from bottle.errors import BottleError

log = logging.getLogger(__name__)

#: How long the patch waits for a DB that another process is writing.  smolvm
#: itself waits 15 s; its own transactions are short, so 5 s is generous.
DEFAULT_BUSY_TIMEOUT_SECONDS = 5.0

#: The environment variable that overrides the DB's location.
DB_ENV = "BOTTLE_SMOLVM_DB"

_FIELD = "allowed_cidrs"


class SmolvmDbError(BottleError):
    """smolvm's state DB could not be read or patched safely.

    ``problem`` names exactly what was unexpected; the DB was left as it was.
    """

    def __init__(self, path: str, machine: str, problem: str) -> None:
        super().__init__(path, machine, problem)
        self.path = path
        self.machine = machine
        self.problem = problem

    def __str__(self) -> str:
        where = f" (machine {self.machine!r})" if self.machine else ""
        return f"smolvm state DB {self.path}{where}: {self.problem}"


#: Makes a :class:`SmolvmDbError` about one DB and machine from a problem.
_Fail = Callable[[str], SmolvmDbError]


@dataclasses.dataclass(frozen=True)
class PatchResult:
    """What :meth:`SmolvmDb.ensure_allowlist` found and did.

    ``before`` is ``None`` when the record held ``null`` (unrestricted).
    """

    applied: bool
    before: list[str] | None
    after: list[str]


def default_db_path(
    platform: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Path:
    """Where smolvm keeps its DB on this platform (its ``data_local_dir``)."""
    platform = platform or sys.platform
    environ = os.environ if environ is None else environ
    home = home or Path.home()
    if platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "smolvm" / "server" / "smolvm.db"


def resolve_db_path(explicit: str | None = None) -> Path:
    """The DB named explicitly, else by ``$BOTTLE_SMOLVM_DB``, else the default."""
    chosen = explicit or os.environ.get(DB_ENV)
    return Path(chosen).expanduser() if chosen else default_db_path()


class SmolvmDb:
    """smolvm's state DB at ``path``; every call opens its own connection."""

    def __init__(
        self, path: Path, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT_SECONDS
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout

    def __repr__(self) -> str:
        return f"SmolvmDb({str(self.path)!r})"

    def read_allowlist(self, name: str) -> list[str] | None:
        """The machine's stored ``allowed_cidrs``; ``None`` means unrestricted."""
        with self._connect(name) as connection:
            text = self._record_text(connection, name)
        return _read_field(self._fail(name), text).value

    def read_record(self, name: str) -> dict[str, Any]:
        """The machine's whole record, parsed."""
        with self._connect(name) as connection:
            text = self._record_text(connection, name)
        record: dict[str, Any] = json.loads(text)
        return record

    def ensure_allowlist(self, name: str, cidrs: Sequence[str]) -> PatchResult:
        """Make the machine's ``allowed_cidrs`` exactly ``cidrs``.

        Does nothing (and logs it) when the record already holds them.
        """
        wanted = [str(cidr) for cidr in cidrs]
        fail = self._fail(name)
        with self._connect(name) as connection:
            try:
                connection.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise fail(
                    f"could not start a write transaction within "
                    f"{self.busy_timeout:g} s ({exc}): another process (smolvm?) "
                    "holds the DB; nothing was changed"
                ) from exc
            try:
                raw = self._record_raw(connection, name)
                text = _decode(fail, raw)
                field = _read_field(fail, text)
                if field.value == wanted:
                    connection.execute("ROLLBACK")
                    log.info(
                        "smolvm stored the allowlist of %s itself (%s): no patch "
                        "needed",
                        name,
                        ", ".join(wanted) or "deny all",
                    )
                    return PatchResult(False, list(wanted), list(wanted))
                patched = field.replaced(text, wanted)
                stored: bytes | str = (
                    patched.encode("utf-8") if isinstance(raw, bytes) else patched
                )
                connection.execute(
                    "UPDATE vms SET data = ? WHERE name = ?", (stored, name)
                )
                _check_patch(fail, text, self._record_text(connection, name), wanted)
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

        after = self.read_allowlist(name)
        if after != wanted:
            raise fail(f"read back {_FIELD}={after!r} after the patch, not {wanted!r}")
        log.info(
            "patched the allowlist of smolvm machine %s: %s -> %s",
            name,
            "null (unrestricted)" if field.value is None else field.value,
            wanted,
        )
        return PatchResult(True, field.value, list(wanted))

    # -- the pieces ------------------------------------------------------------

    def _fail(self, name: str) -> _Fail:
        path = str(self.path)

        def fail(problem: str) -> SmolvmDbError:
            return SmolvmDbError(path, name, problem)

        return fail

    @contextlib.contextmanager
    def _connect(self, name: str) -> Iterator[sqlite3.Connection]:
        fail = self._fail(name)
        if not self.path.is_file():
            raise fail(
                "does not exist; is smolvm's data directory elsewhere? set the "
                f"backend option smolvm_db or ${DB_ENV}"
            )
        try:
            # mode=rw: never create a DB that smolvm did not make.
            connection = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=rw",
                uri=True,
                timeout=self.busy_timeout,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise fail(f"cannot be opened: {exc}") from exc
        try:
            self._check_schema(fail, connection)
            yield connection
        except sqlite3.OperationalError as exc:
            raise fail(f"could not be read: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise fail(f"is not a usable SQLite DB: {exc}") from exc
        finally:
            connection.close()

    def _check_schema(self, fail: _Fail, connection: sqlite3.Connection) -> None:
        columns = {str(row[1]) for row in connection.execute("PRAGMA table_info(vms)")}
        if not columns:
            tables = sorted(
                str(row[0])
                for row in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                )
            )
            raise fail(
                f"has no `vms` table (tables: {', '.join(tables) or 'none'}); "
                "not a smolvm DB of a known version"
            )
        for column in ("name", "data"):
            if column not in columns:
                raise fail(
                    f"table `vms` has no `{column}` column (columns: "
                    f"{', '.join(sorted(columns))}); not a smolvm DB of a known "
                    "version"
                )

    def _record_raw(self, connection: sqlite3.Connection, name: str) -> bytes | str:
        row = connection.execute(
            "SELECT data FROM vms WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            known = [str(r[0]) for r in connection.execute("SELECT name FROM vms")]
            raise self._fail(name)(
                f"has no machine of that name (machines: {', '.join(known) or 'none'})"
            )
        value = row[0]
        if not isinstance(value, bytes | str):
            raise self._fail(name)(
                f"its `data` is a {type(value).__name__}, not a JSON text or blob"
            )
        return value

    def _record_text(self, connection: sqlite3.Connection, name: str) -> str:
        return _decode(self._fail(name), self._record_raw(connection, name))


@dataclasses.dataclass(frozen=True)
class _Field:
    """Where ``allowed_cidrs`` sits in a record's text, and its value.

    ``start``/``end`` delimit the value's text; both are ``None`` when the
    record has no such key (``close`` is then the index of the final ``}``
    and ``empty`` whether the object has no key at all).
    """

    value: list[str] | None
    start: int | None
    end: int | None
    close: int
    empty: bool

    def replaced(self, text: str, cidrs: list[str]) -> str:
        value = json.dumps(cidrs, separators=(",", ":"), ensure_ascii=False)
        if self.start is not None and self.end is not None:
            return text[: self.start] + value + text[self.end :]
        separator = "" if self.empty else ","
        return (
            text[: self.close] + f'{separator}"{_FIELD}":{value}' + text[self.close :]
        )


def _decode(fail: _Fail, raw: bytes | str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"its record is not UTF-8 text ({exc})") from exc


def _read_field(fail: _Fail, text: str) -> _Field:
    """Scan the record's top-level object, finding ``allowed_cidrs`` exactly.

    The value's position is found by the JSON decoder itself (each top-level
    value is decoded with ``raw_decode``, which reports where it ends), so
    the patch can replace those bytes and no others.
    """
    decoder = json.JSONDecoder()
    whitespace = " \t\n\r"

    def skip(index: int) -> int:
        while index < len(text) and text[index] in whitespace:
            index += 1
        return index

    index = skip(0)
    if index >= len(text) or text[index] != "{":
        try:
            kind = type(json.loads(text)).__name__
        except ValueError:
            kind = "not JSON at all"
        raise fail(f"its record is not a JSON object ({kind})")
    try:
        whole = json.loads(text)
    except ValueError as exc:
        raise fail(f"its record is not valid JSON ({exc})") from exc
    if not isinstance(whole, dict):  # pragma: no cover - the "{" check above
        raise fail("its record is not a JSON object")

    found: list[tuple[Any, int, int]] = []
    index = skip(index + 1)
    keys = 0
    while text[index] != "}":
        key, index = decoder.raw_decode(text, index)
        index = skip(index)
        index = skip(index + 1)  # the ":"
        value, end = decoder.raw_decode(text, index)
        if key == _FIELD:
            found.append((value, index, end))
        keys += 1
        index = skip(end)
        if text[index] == ",":
            index = skip(index + 1)
    close = index

    if len(found) > 1:
        raise fail(f"its record holds `{_FIELD}` {len(found)} times")
    if not found:
        return _Field(None, None, None, close, keys == 0)
    value, start, end = found[0]
    if value is not None and not (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    ):
        raise fail(
            f"its `{_FIELD}` is {json.dumps(value, ensure_ascii=False)[:80]}, "
            "neither null nor a list of CIDR strings"
        )
    return _Field(value, start, end, close, keys == 0)


def _check_patch(fail: _Fail, before: str, after: str, wanted: list[str]) -> None:
    """The record read back holds ``wanted`` and every other field unchanged."""
    old: dict[str, Any] = json.loads(before)
    new: dict[str, Any] = json.loads(after)
    if new.get(_FIELD) != wanted:
        raise fail(f"read back {_FIELD}={new.get(_FIELD)!r}, not {wanted!r}")
    old.pop(_FIELD, None)
    new.pop(_FIELD, None)
    if list(old.items()) != list(new.items()):
        raise fail("the patch would change other fields; nothing was changed")
