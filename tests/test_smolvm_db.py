"""The allowlist patch of smolvm's state DB, on real SQLite files."""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bottle.smolvm_db import (
    PatchResult,
    SmolvmDb,
    SmolvmDbError,
    default_db_path,
    resolve_db_path,
)

ALIAS = ["127.0.0.16/32"]

#: A record as smolvm 0.8.0 stores it after `create --from X --allow-cidr C`.
RECORD_080 = (
    '{"name":"m","created_at":"2026-05-27T19:58:22Z","state":"created","pid":null,'
    '"pid_start_time":null,"cpus":1,"mem":512,"mounts":[],"ports":[[8080,80]],'
    '"network":true,"allowed_cidrs":null,"restart":{"policy":"never",'
    '"max_retries":0,"restart_count":0,"user_stopped":false},"image":null,'
    '"source_smolmachine":"/tmp/agent.smolmachine","network_backend":"tsi"}'
)
#: The same machine as smolvm 1.8.0 stores it: the allowlist kept.
RECORD_180 = RECORD_080.replace(
    '"allowed_cidrs":null', '"allowed_cidrs":["127.0.0.16/32"]'
).replace('"network_backend":"tsi"', '"network_backend":"virtio-net","labels":{}')


def make_db(path: Path, records: dict[str, bytes | str], *, schema: str = "") -> Path:
    """A DB in smolvm's schema (or ``schema``), WAL mode, fully checkpointed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute(
        schema
        or "CREATE TABLE vms (name TEXT PRIMARY KEY NOT NULL, data BLOB NOT NULL)"
    )
    for name, data in records.items():
        connection.execute("INSERT INTO vms VALUES (?, ?)", (name, data))
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    return path


def raw_record(path: Path, name: str) -> bytes | str:
    connection = sqlite3.connect(path)
    try:
        value: bytes | str = connection.execute(
            "SELECT data FROM vms WHERE name = ?", (name,)
        ).fetchone()[0]
        return value
    finally:
        connection.close()


@pytest.fixture
def db_file(tmp_path: Path) -> Path:
    return tmp_path / "smolvm" / "server" / "smolvm.db"


def test_patch_sets_the_allowlist_of_a_080_record(db_file: Path) -> None:
    """The patch replaces only the bytes of `null`, and says it applied."""
    db = SmolvmDb(make_db(db_file, {"m": RECORD_080.encode()}))

    result = db.ensure_allowlist("m", ALIAS)

    assert result == PatchResult(applied=True, before=None, after=ALIAS)
    assert db.read_allowlist("m") == ALIAS
    stored = raw_record(db_file, "m")
    assert isinstance(stored, bytes), "smolvm's records are BLOBs; keep the type"
    assert stored.decode() == RECORD_080.replace(
        '"allowed_cidrs":null', '"allowed_cidrs":["127.0.0.16/32"]'
    )


def test_patch_is_a_noop_on_a_180_record(
    db_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A smolvm that stored the allowlist itself gets no write, and a log line."""
    make_db(db_file, {"m": RECORD_180.encode()})
    before = db_file.read_bytes()

    with caplog.at_level(logging.INFO, logger="bottle.smolvm_db"):
        result = SmolvmDb(db_file).ensure_allowlist("m", ALIAS)

    assert result == PatchResult(applied=False, before=ALIAS, after=ALIAS)
    assert "no patch needed" in caplog.text
    assert db_file.read_bytes() == before
    assert raw_record(db_file, "m") == RECORD_180.encode()


def test_patch_adds_a_missing_field_at_the_end(db_file: Path) -> None:
    record = '{"name":"m","state":"created"}'
    make_db(db_file, {"m": record.encode()})

    result = SmolvmDb(db_file).ensure_allowlist("m", [])

    assert result.applied
    assert (
        raw_record(db_file, "m") == b'{"name":"m","state":"created","allowed_cidrs":[]}'
    )


def test_unknown_fields_are_kept_in_order(db_file: Path) -> None:
    record = {
        "zeta": {"nested": [1, 2.5, None, {"deep": "ünïcødé ✓"}]},
        "name": "m",
        "allowed_cidrs": ["10.9.8.0/24"],
        "future_field": [["a", 1], ["b", 2]],
        "big": 12345678901234567890,
        "escaped": 'tab\there \u2028 \\ "quoted"',
    }
    text = json.dumps(record, separators=(",", ":"), ensure_ascii=True)
    make_db(db_file, {"m": text.encode()})

    SmolvmDb(db_file).ensure_allowlist("m", ALIAS)

    after = raw_record(db_file, "m")
    assert isinstance(after, bytes)
    patched = json.loads(after)
    assert list(patched) == list(record)
    assert {**record, "allowed_cidrs": ALIAS} == patched
    assert after.decode() == text.replace('["10.9.8.0/24"]', '["127.0.0.16/32"]')


def test_a_locked_db_is_waited_for_within_the_bound_then_refused(
    db_file: Path,
) -> None:
    """Another writer holding the DB: wait the bound, fail clearly, change nothing."""
    make_db(db_file, {"m": RECORD_080.encode()})
    holder = sqlite3.connect(db_file, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(SmolvmDbError) as refused:
            SmolvmDb(db_file, busy_timeout=0.4).ensure_allowlist("m", ALIAS)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    assert 0.35 <= waited < 3.0
    message = str(refused.value)
    assert "write transaction within 0.4 s" in message
    assert "nothing was changed" in message
    assert refused.value.machine == "m"
    assert raw_record(db_file, "m") == RECORD_080.encode()


def test_a_short_lock_is_waited_out(db_file: Path) -> None:
    """A writer that finishes within the bound only delays the patch."""
    import threading

    make_db(db_file, {"m": RECORD_080.encode()})
    holder = sqlite3.connect(db_file, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        result = SmolvmDb(db_file, busy_timeout=5).ensure_allowlist("m", ALIAS)
    finally:
        release.join()
        holder.close()
    assert result.applied


REFUSALS: list[tuple[str, dict[str, bytes | str], str, str]] = [
    (
        "no vms table",
        {},
        "CREATE TABLE machines (name TEXT, data BLOB)",
        "has no `vms` table (tables: machines)",
    ),
    (
        "no data column",
        {},
        "CREATE TABLE vms (name TEXT PRIMARY KEY, record BLOB)",
        "table `vms` has no `data` column",
    ),
    ("a JSON list", {"m": b"[1, 2]"}, "", "not a JSON object (list)"),
    ("a JSON string", {"m": b'"text"'}, "", "not a JSON object (str)"),
    ("not JSON", {"m": b'{"name": '}, "", "not valid JSON"),
    ("garbage", {"m": b"\x00\x01"}, "", "not a JSON object (not JSON at all)"),
    ("not UTF-8", {"m": b'{"name":"\xff"}'}, "", "not UTF-8"),
    (
        "a string allowlist",
        {"m": b'{"name":"m","allowed_cidrs":"127.0.0.1/32"}'},
        "",
        '`allowed_cidrs` is "127.0.0.1/32", neither null nor a list',
    ),
    (
        "a list of numbers",
        {"m": b'{"allowed_cidrs":[1,2]}'},
        "",
        "`allowed_cidrs` is [1, 2], neither null",
    ),
    (
        "an object",
        {"m": b'{"allowed_cidrs":{"a":1}}'},
        "",
        '`allowed_cidrs` is {"a": 1}',
    ),
    (
        "twice",
        {"m": b'{"allowed_cidrs":null,"allowed_cidrs":[]}'},
        "",
        "holds `allowed_cidrs` 2 times",
    ),
    ("no such machine", {"other": RECORD_080.encode()}, "", "machines: other"),
]


@pytest.mark.parametrize(
    ("records", "schema", "expected"),
    [pytest.param(r, s, e, id=i) for i, r, s, e in REFUSALS],
)
def test_an_unexpected_db_is_refused_and_left_untouched(
    db_file: Path, records: dict[str, bytes | str], schema: str, expected: str
) -> None:
    make_db(db_file, records, schema=schema)
    before = db_file.read_bytes()

    with pytest.raises(SmolvmDbError) as refused:
        SmolvmDb(db_file, busy_timeout=0.2).ensure_allowlist("m", ALIAS)

    assert expected in str(refused.value)
    assert str(db_file) in str(refused.value)
    assert "\n" not in str(refused.value)
    assert db_file.read_bytes() == before
    assert (
        not Path(f"{db_file}-wal").exists() or not Path(f"{db_file}-wal").read_bytes()
    )


def test_a_missing_db_is_named_with_the_way_to_point_elsewhere(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.db"
    with pytest.raises(SmolvmDbError, match=r"does not exist.*smolvm_db"):
        SmolvmDb(missing).read_allowlist("m")
    assert not missing.exists(), "the patch must never create smolvm's DB"


def test_db_errors_survive_pickling() -> None:
    error = SmolvmDbError("/x.db", "m", "has no `vms` table")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.machine, copy.problem) == ("/x.db", "m", error.problem)
    assert str(copy) == str(error)


def test_db_path_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path("/home/u")
    mac = default_db_path("darwin", {}, home)
    assert mac == home / "Library/Application Support/smolvm/server/smolvm.db"
    assert default_db_path("linux", {}, home) == home / (
        ".local/share/smolvm/server/smolvm.db"
    )
    assert default_db_path("linux", {"XDG_DATA_HOME": "/x"}, home) == Path(
        "/x/smolvm/server/smolvm.db"
    )
    monkeypatch.setenv("BOTTLE_SMOLVM_DB", "/env.db")
    assert resolve_db_path() == Path("/env.db")
    assert resolve_db_path("/option.db") == Path("/option.db")


# -- any record survives the patch ---------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
other_keys = st.text(max_size=12).filter(lambda key: key != "allowed_cidrs")
allowlists = st.none() | st.lists(st.text(max_size=20), max_size=4)


@st.composite
def records(draw: st.DrawFn) -> tuple[str, Any]:
    """A record's text, and the allowlist it held (``...`` when it had none)."""
    fields = draw(st.dictionaries(other_keys, json_values, max_size=8))
    items = list(fields.items())
    held: Any = ...
    if draw(st.booleans()):
        held = draw(allowlists)
        items.insert(draw(st.integers(0, len(items))), ("allowed_cidrs", held))
    text = json.dumps(
        dict(items), separators=(",", ":"), ensure_ascii=draw(st.booleans())
    )
    return text, held


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(record=records(), wanted=st.lists(st.text(max_size=20), max_size=3))
def test_any_record_survives_the_patch_with_only_the_allowlist_changed(
    record: tuple[str, Any], wanted: list[str]
) -> None:
    text, held = record
    with scratch_db({"m": text.encode()}) as path:
        result = SmolvmDb(path).ensure_allowlist("m", wanted)
        after = raw_record(path, "m")

    assert isinstance(after, bytes)
    assert result.applied == (held != wanted)
    assert result.before == (None if held is ... else held)
    original, patched = json.loads(text), json.loads(after)
    assert patched["allowed_cidrs"] == wanted
    assert [k for k in patched if k != "allowed_cidrs"] == [
        k for k in original if k != "allowed_cidrs"
    ]
    original.pop("allowed_cidrs", None)
    patched.pop("allowed_cidrs")
    assert patched == original
    if not result.applied:
        assert after == text.encode()
    elif held is ...:
        assert after.decode().startswith(text[:-1])
    else:
        # Only the value's bytes changed: everything before and after it stays.
        # (Keys of the generated records are too short to hide another
        # "allowed_cidrs" key, so the first one is the top-level one.)
        key = '"allowed_cidrs":'
        start = text.index(key) + len(key)
        _, end = json.JSONDecoder().raw_decode(text, start)
        value = json.dumps(wanted, separators=(",", ":"), ensure_ascii=False)
        assert after.decode() == text[:start] + value + text[end:]


@contextlib.contextmanager
def scratch_db(records: dict[str, bytes | str]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as directory:
        yield make_db(Path(directory) / "smolvm.db", records)
