"""Backends, found through the ``bottle.backends`` entry-point group.

The built-in backends register themselves in ``pyproject.toml`` exactly as a
third party would, so a new backend needs no change to this repository.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from bottle.backends.base import (
    Backend,
    BackendConfig,
    Bottle,
    ExecResult,
    Requirement,
)
from bottle.errors import BackendUnavailable, BottleUsageError

__all__ = [
    "DEFAULT_BACKEND",
    "Backend",
    "BackendConfig",
    "Bottle",
    "ExecResult",
    "Requirement",
    "available_backends",
    "load_backend",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "bottle.backends"
DEFAULT_BACKEND = "netns"

BackendFactory = Callable[[BackendConfig], Backend]


def available_backends() -> dict[str, EntryPoint]:
    """Every registered backend by name (not imported until it is chosen)."""
    found = {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP)}
    return dict(sorted(found.items()))


def load_backend(name: str, config: BackendConfig) -> Backend:
    """Make backend ``name``; an unknown name lists the registered ones."""
    factories = available_backends()
    if name not in factories:
        raise BottleUsageError(
            f"backend {name!r}",
            f"unknown; available: {', '.join(factories) or 'none registered'}",
        )
    try:
        factory: BackendFactory = factories[name].load()
    except ImportError as exc:
        raise BackendUnavailable(
            name, f"its module could not be imported ({exc})"
        ) from exc
    return factory(config)
