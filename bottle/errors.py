"""The one exception hierarchy of bot-bottle.

Every error the library raises derives from :class:`BottleError`, so a caller
can catch one class.  Subclasses keep their context as attributes and pass all
of their constructor arguments to ``Exception.__init__`` so that they survive
pickling (pytest-xdist sends them from workers to the controller).
"""

from __future__ import annotations

from collections.abc import Sequence


class BottleError(Exception):
    """Base class of every error raised by bot-bottle."""


class BottleUsageError(BottleError):
    """Bad input from the user: an option, a spec file, a name.

    The message is one line naming the input and what would be valid.
    """

    def __init__(self, what: str, problem: str) -> None:
        super().__init__(what, problem)
        self.what = what
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.what}: {self.problem}"


class PoolExhausted(BottleError):
    """Every alias of the pool is leased to a live owner."""

    def __init__(self, pool: str, holders: Sequence[str]) -> None:
        super().__init__(pool, list(holders))
        self.pool = pool
        self.holders = list(holders)

    def __str__(self) -> str:
        listed = "; ".join(self.holders) or "none"
        return f"every alias of pool {self.pool} is leased to a live owner: {listed}"


class LeaseStoreError(BottleError):
    """The lease store cannot be read safely (for example a corrupt file)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem

    def __str__(self) -> str:
        return f"lease store {self.path}: {self.problem}"


class BackendUnavailable(BottleError):
    """A backend cannot run on this host; the reason says what is missing."""

    def __init__(self, backend: str, reason: str) -> None:
        super().__init__(backend, reason)
        self.backend = backend
        self.reason = reason

    def __str__(self) -> str:
        return f"backend {self.backend!r} cannot run here: {self.reason}"


class CommandFailed(BottleError):
    """A host command the launcher ran exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str = "") -> None:
        super().__init__(list(argv), returncode, stderr)
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr

    def __str__(self) -> str:
        command = " ".join(self.argv)
        detail = self.stderr.strip().splitlines()[-1:] or ["no error output"]
        return f"`{command}` exited {self.returncode}: {detail[0]}"


class BottleStartError(BottleError):
    """A bottle could not be started; everything it created was removed."""

    def __init__(self, bottle_id: str, problem: str) -> None:
        super().__init__(bottle_id, problem)
        self.bottle_id = bottle_id
        self.problem = problem

    def __str__(self) -> str:
        return f"bottle {self.bottle_id} did not start: {self.problem}"


class BottleNotFound(BottleError):
    """No live bottle has the given name."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(name, list(known))
        self.name = name
        self.known = list(known)

    def __str__(self) -> str:
        known = ", ".join(self.known) or "none"
        return f"no bottle named {self.name!r} (live bottles: {known})"
