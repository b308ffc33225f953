"""Bottle specs: TOML files and mappings, their defaults and their errors."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bottle.errors import BottleUsageError
from bottle.spec import (
    ALIAS_ENTRY,
    AgentSpec,
    BundleService,
    load_spec,
    spec_from_mapping,
)

GOOD_SPEC = """
name = "reviewer"
backend = "netns"
allowlist = ["alias", "127.0.0.40/32"]

[agent]
image = "bottle-probe:latest"
user = "nobody"

[[bundle]]
name = "proxy"
port = 8080
command = ["python3", "-m", "http.server", "--bind", "{alias}", "{port}"]

[[bundle]]
name = "echo"

[options]
colour = "blue"
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_a_good_file_is_read_whole(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, GOOD_SPEC))

    assert spec.name == "reviewer"
    assert spec.backend == "netns"
    assert spec.allowlist == ("alias", "127.0.0.40/32")
    assert spec.agent == AgentSpec(image="bottle-probe:latest", user="nobody")
    proxy, echo = spec.bundle
    assert proxy.name == "proxy"
    assert proxy.port == 8080
    assert proxy.command[-2:] == ("{alias}", "{port}")
    assert not proxy.is_echo
    assert echo == BundleService("echo")
    assert echo.is_echo
    assert spec.options == {"colour": "blue"}


BAD_FILES = [
    pytest.param("name = \n", ["is not TOML", "line 1"], id="invalid-toml"),
    pytest.param(
        'name = "a"\ncolour = "red"\n',
        ["'colour'", "unknown", "valid keys", "'allowlist'", "'bundle'"],
        id="unknown-key",
    ),
    pytest.param(
        'name = "a"\n[agent]\nshell = "zsh"\n',
        ["[agent] key 'shell'", "valid keys", "'user'"],
        id="unknown-agent-key",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "p"\nhost = "x"\n',
        ["[[bundle]] #1 key 'host'", "valid keys", "'port'"],
        id="unknown-bundle-key",
    ),
    pytest.param(
        'name = "a"\nallowlist = ["alias", "300.1.1.1"]\n',
        ["allowlist entry '300.1.1.1'", "CIDR", "'alias'"],
        id="bad-allowlist-entry",
    ),
    pytest.param(
        'name = "a"\nallowlist = "alias"\n',
        ["allowlist", "list of strings"],
        id="allowlist-not-a-list",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "p"\nport = 70000\n',
        ["port 70000", "'p'", "1-65535"],
        id="port-too-high",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "p"\nport = -1\n',
        ["port -1", "1-65535"],
        id="port-negative",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "p"\nport = "80"\n',
        ["port '80'", "whole number", "1-65535"],
        id="port-a-string",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "p"\nport = true\n',
        ["port True", "whole number"],
        id="port-a-boolean",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "web"\n[[bundle]]\nname = "web"\n',
        ["bundle service name 'web'", "used twice"],
        id="duplicate-service",
    ),
    pytest.param(
        'name = "a"\n[[bundle]]\nname = "Web_1"\n',
        ["bundle service name 'Web_1'", "lowercase"],
        id="bad-service-name",
    ),
    pytest.param(
        'name = "Bad_Name"\n',
        ["bottle name 'Bad_Name'", "1-20 lowercase letters, digits or dashes"],
        id="bad-bottle-name",
    ),
    pytest.param(
        'name = "a-name-much-longer-than-twenty"\n',
        ["bottle name 'a-name-much-longer-than-twenty'", "1-20"],
        id="bottle-name-too-long",
    ),
    pytest.param('allowlist = ["alias"]\n', ["has no `name`"], id="no-name"),
    pytest.param('name = "a"\nbundle = 5\n', ["bundle", "[[bundle]]"], id="bundle-5"),
    pytest.param('name = "a"\noptions = 5\n', ["options", "table"], id="options-5"),
    pytest.param('name = "a"\nagent = "x"\n', ["[agent]", "table"], id="agent-str"),
]


@pytest.mark.parametrize(("text", "fragments"), BAD_FILES)
def test_a_bad_file_is_one_line_naming_the_file_and_the_fix(
    tmp_path: Path, text: str, fragments: list[str]
) -> None:
    path = write(tmp_path, text)

    with pytest.raises(BottleUsageError) as caught:
        load_spec(path)

    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"spec file {path}: ")
    for fragment in fragments:
        assert fragment in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"

    with pytest.raises(BottleUsageError, match="does not exist") as caught:
        load_spec(path)

    assert str(caught.value) == f"spec file {path}: does not exist"


def test_a_directory_or_binary_file_is_a_usage_error(tmp_path: Path) -> None:
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"name = \xff\xfe\n")

    with pytest.raises(BottleUsageError, match="not UTF-8") as caught:
        load_spec(binary)
    assert str(binary) in str(caught.value)

    with pytest.raises(BottleUsageError, match="cannot be read") as caught:
        load_spec(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_usage_errors_survive_pickling(tmp_path: Path) -> None:
    with pytest.raises(BottleUsageError) as caught:
        load_spec(write(tmp_path, 'name = "Bad_Name"\n'))

    copy = pickle.loads(pickle.dumps(caught.value))

    assert str(copy) == str(caught.value)
    assert copy.what == caught.value.what


def test_defaults_are_one_echo_service_and_the_alias() -> None:
    spec = spec_from_mapping({"name": "plain"})

    assert spec.bundle == (BundleService("echo"),)
    assert spec.bundle[0].port == 0
    assert spec.bundle[0].is_echo
    assert spec.allowlist == (ALIAS_ENTRY,) == ("alias",)
    assert spec.agent.user == "nobody"
    assert spec.backend == ""
    assert spec.options == {}
    assert spec.effective_allowlist("127.0.0.40") == ["127.0.0.40/32"]


def test_a_bad_mapping_names_the_input_without_a_file() -> None:
    with pytest.raises(BottleUsageError) as caught:
        spec_from_mapping({"name": "a", "allowlist": ["nonsense"]})

    assert str(caught.value).startswith("allowlist entry 'nonsense': ")
    assert "\n" not in str(caught.value)


def test_effective_allowlist_resolves_the_alias_and_dedupes() -> None:
    spec = spec_from_mapping(
        {
            "name": "wide",
            "allowlist": [
                "alias",
                "127.0.0.44",
                "127.0.0.44/32",
                "10.1.2.3/8",
                "10.0.0.0/8",
                "::1",
            ],
        }
    )

    assert spec.effective_allowlist("127.0.0.44") == [
        "127.0.0.44/32",
        "10.0.0.0/8",
        "::1/128",
    ]
    assert spec.effective_allowlist("127.0.0.45") == [
        "127.0.0.45/32",
        "127.0.0.44/32",
        "10.0.0.0/8",
        "::1/128",
    ]


addresses = st.integers(0, 2**32 - 1).map(
    lambda value: ".".join(str((value >> shift) & 255) for shift in (24, 16, 8, 0))
)


@given(
    entries=st.lists(st.one_of(st.just("alias"), addresses), max_size=8),
    alias_low=st.integers(16, 31),
)
def test_effective_allowlist_is_unique_normalised_and_complete(
    entries: list[str], alias_low: int
) -> None:
    alias = f"127.0.0.{alias_low}"
    spec = spec_from_mapping({"name": "prop", "allowlist": entries})

    resolved = spec.effective_allowlist(alias)

    assert len(resolved) == len(set(resolved))
    assert all(cidr.endswith("/32") for cidr in resolved)
    expected = {f"{alias}/32" if e == "alias" else f"{e}/32" for e in entries}
    assert set(resolved) == expected
