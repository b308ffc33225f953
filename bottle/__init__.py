"""bot-bottle: launch AI-agent sandboxes and prove each one is isolated.

The launcher library.  It never imports pytest; the plugin lives in
``pytest_bottle``.
"""

from __future__ import annotations

from bottle.backends import (
    Backend,
    BackendConfig,
    Bottle,
    available_backends,
    load_backend,
)
from bottle.errors import (
    BackendUnavailable,
    BottleError,
    BottleNotFound,
    BottleStartError,
    BottleUsageError,
    CommandFailed,
    LeaseStoreError,
    PoolExhausted,
)
from bottle.launcher import Launcher, reap
from bottle.pool import AliasPool, AliasRange, Lease, Owner
from bottle.spec import BottleSpec, BundleService, load_spec

__all__ = [
    "AliasPool",
    "AliasRange",
    "Backend",
    "BackendConfig",
    "BackendUnavailable",
    "Bottle",
    "BottleError",
    "BottleNotFound",
    "BottleSpec",
    "BottleStartError",
    "BottleUsageError",
    "BundleService",
    "CommandFailed",
    "Launcher",
    "Lease",
    "LeaseStoreError",
    "Owner",
    "PoolExhausted",
    "available_backends",
    "load_backend",
    "load_spec",
    "reap",
]
