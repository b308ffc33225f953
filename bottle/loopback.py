"""Loopback aliases on the host: whether they exist and how to add them.

On Linux every address of ``127.0.0.0/8`` is already local, so nothing needs
to be set up.  On macOS only ``127.0.0.1`` is; each alias must be added to
``lo0`` once (``ifconfig lo0 alias``, which needs sudo): ``bottle setup``.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
import subprocess
import sys
from collections.abc import Iterable

log = logging.getLogger(__name__)


def is_macos() -> bool:
    return sys.platform == "darwin"


@functools.lru_cache(maxsize=1)
def _lo0_addresses() -> frozenset[str]:
    output = subprocess.run(
        ["ifconfig", "lo0"], capture_output=True, text=True, check=False
    ).stdout
    return frozenset(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)", output))


def alias_is_configured(alias: str) -> bool:
    """Whether ``alias`` can be used as a local address on this host."""
    if not is_macos():
        return True
    return alias in _lo0_addresses()


def setup_commands(aliases: Iterable[str]) -> list[list[str]]:
    """The commands that add the missing aliases (macOS), else nothing."""
    if not is_macos():
        return []
    _lo0_addresses.cache_clear()
    return [
        ["sudo", "ifconfig", "lo0", "alias", alias, "up"]
        for alias in aliases
        if not alias_is_configured(alias)
    ]


def unbindable(aliases: Iterable[str]) -> dict[str, str]:
    """The aliases a TCP socket cannot bind, with the reason for each."""
    failures = {}
    for alias in aliases:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((alias, 0))
            except OSError as exc:
                failures[alias] = exc.strerror or str(exc)
    return failures
