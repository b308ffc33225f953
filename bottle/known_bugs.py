"""Known upstream bugs that break isolation, and the versions they affect.

Each entry names its source upstream, the backend whose runtime carries it,
the half-open version range ``[affected_from, fixed_in)`` it affects, and
which clauses of the isolation contract it breaks:

``blocked``
    cells that must be blocked become reachable (the ``test_cannot_reach_*``
    conformance tests);
``stored-allowlist``
    the allowlist read back from the enforcing layer is not the one asked for.

A clause is a summary: not every test of a clause a bug breaks fails under
it.  Each entry therefore lists, by name, the conformance tests (functions
of ``conformance.test_isolation``) whose cells the bug really makes fail;
only those are expected to fail where the bug is live, so a test the bug
leaves alone still has to pass.

A bug may have a workaround that bot-bottle applies.  The backend records in
each bottle's facts whether the workaround ran, so a run can tell three cases
apart (:func:`assess`): the workaround carried the cell, the bug did not
trigger, or the bug is live and the cells it breaks are expected to fail.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from bottle.errors import BottleUsageError

#: What the smolmachines backend's version text says for bot-bottle's fake
#: smolvm, which has no hypervisor and so carries no libkrun bug.
FAKE_MARKER = "(fake)"

BREAKS_BLOCKED = "blocked"
BREAKS_STORED_ALLOWLIST = "stored-allowlist"

#: The conformance tests a guest with unrestricted egress fails: every
#: target it can now open.  Left out on purpose:
#: ``test_cannot_reach_other_bundle_via_own_alias`` dials another bundle's
#: port at the bottle's own alias, where nothing listens on that port (each
#: bundle listens on its own alias only), so even an unrestricted guest is
#: refused there.  ``test_cannot_reach_host_services_via_own_alias`` dials a
#: host service bound on every address at the bottle's own alias, where the
#: host's alias guard turns away every port but the bundle's, whatever the
#: guest's allowlist.
UNRESTRICTED_EGRESS_FAILS = frozenset(
    {
        "test_cannot_reach_other_bundle",
        "test_cannot_reach_loopback_sentinel",
        "test_cannot_reach_loopback_over_udp",
        "test_cannot_reach_loopback_over_ipv6",
        "test_cannot_reach_other_aliases",
        "test_cannot_reach_host_addresses",
        "test_cannot_reach_egress_target",
        "test_cannot_reach_outside",
    }
)
#: The conformance test that reads the allowlist back from the enforcing layer.
STORED_ALLOWLIST_TEST = "test_effective_allowlist_is_own_alias"

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z][0-9A-Za-z.-]*))?")


@dataclasses.dataclass(frozen=True, order=False)
class Version:
    """``MAJOR.MINOR.PATCH[-PRE]``; a pre-release sorts before its release."""

    major: int
    minor: int
    patch: int
    pre: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        """The first ``X.Y.Z[-pre]`` in ``text`` (e.g. ``smolvm 1.8.0 (fake)``)."""
        match = _VERSION.search(text)
        if match is None:
            raise BottleUsageError(
                f"version {text!r}", "has no MAJOR.MINOR.PATCH number in it"
            )
        major, minor, patch, pre = match.groups()
        return cls(int(major), int(minor), int(patch), pre or "")

    def _key(self) -> tuple[int, int, int, int, str]:
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, self.pre)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        return f"{text}-{self.pre}" if self.pre else text


@dataclasses.dataclass(frozen=True)
class Workaround:
    """A workaround bot-bottle applies, and the bottle fact that reports it."""

    name: str
    #: The key in ``Bottle.facts`` the backend records the workaround under.
    fact: str
    #: The fact's value when the workaround ran and changed something.
    carried: str
    #: The fact's value when the upstream behaved and the workaround did nothing.
    not_needed: str


@dataclasses.dataclass(frozen=True)
class KnownBug:
    """One upstream bug, the versions it affects and where it is described."""

    id: str
    backend: str
    #: The program whose version the range is about (``smolvm``...).
    component: str
    title: str
    #: First affected version; None when every release before the fix is.
    affected_from: Version | None
    fixed_in: Version
    source: str
    breaks: frozenset[str]
    #: The conformance tests whose cells the bug makes fail (see the module's
    #: docstring); the ones marked expected failures where it is live.
    fails_tests: frozenset[str] = frozenset()
    workaround: Workaround | None = None
    #: Whether bot-bottle's fake of the runtime imitates this bug.
    in_fake: bool = True

    def affects(self, version: Version) -> bool:
        """Whether ``version`` lies in ``[affected_from, fixed_in)``."""
        lower_ok = self.affected_from is None or version >= self.affected_from
        return lower_ok and version < self.fixed_in

    def fails(self, test_name: str) -> bool:
        """Whether the conformance test function ``test_name`` fails under it."""
        return test_name in self.fails_tests

    @property
    def affected_range(self) -> str:
        if self.affected_from is None:
            return f"{self.component} < {self.fixed_in}"
        return f"{self.component} >= {self.affected_from}, < {self.fixed_in}"

    def describe(self) -> str:
        """One line for an xfail reason or a report."""
        return (
            f"known bug {self.id}: {self.title} ({self.affected_range}; {self.source})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "backend": self.backend,
            "component": self.component,
            "title": self.title,
            "affected_from": (
                None if self.affected_from is None else str(self.affected_from)
            ),
            "fixed_in": str(self.fixed_in),
            "source": self.source,
            "breaks": sorted(self.breaks),
            "fails_tests": sorted(self.fails_tests),
            "workaround": (
                None if self.workaround is None else dataclasses.asdict(self.workaround)
            ),
        }


ALLOWLIST_PATCH = Workaround(
    name="allowlist DB patch (allowed_cidrs written between create and start)",
    fact="allowlist_patch",
    carried="applied",
    not_needed="not needed",
)

KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        id="smolvm-from-drops-allow-cidr",
        backend="smolmachines",
        component="smolvm",
        title=(
            "`machine create --from` returns before reading `--allow-cidr` and "
            "stores allowed_cidrs null: unrestricted egress, no warning"
        ),
        affected_from=Version(0, 8, 0),
        fixed_in=Version(1, 8, 0),
        source="smol-machines/smolvm pull request 892",
        breaks=frozenset({BREAKS_BLOCKED, BREAKS_STORED_ALLOWLIST}),
        fails_tests=UNRESTRICTED_EGRESS_FAILS | {STORED_ALLOWLIST_TEST},
        workaround=ALLOWLIST_PATCH,
    ),
    KnownBug(
        id="smolvm-tsi-allowlist-not-enforced",
        backend="smolmachines",
        component="smolvm",
        title=(
            "the libkrun builds shipped with smolvm did not enforce the TSI "
            "allowlist; fixed by switching to virtio-net when an egress policy "
            "is set"
        ),
        affected_from=None,
        fixed_in=Version(1, 1, 3),
        source="smol-machines/smolvm pull request 427",
        breaks=frozenset({BREAKS_BLOCKED}),
        # The allowlist is stored as asked, and not enforced.
        fails_tests=UNRESTRICTED_EGRESS_FAILS,
        # The fake has no libkrun: its guests are enforced by nftables.
        in_fake=False,
    ),
    KnownBug(
        id="smolvm-cached-image-run-fail-open",
        backend="smolmachines",
        component="smolvm",
        title=(
            "`machine run` from a cached image ignored the egress policy "
            "(bot-bottle creates and starts machines and does not use `run`)"
        ),
        affected_from=None,
        fixed_in=Version(1, 9, 0),
        source="smol-machines/smolvm pull request 972",
        breaks=frozenset(),
    ),
)


def affecting(
    backend: str, version: str | Version, bugs: Iterable[KnownBug] = KNOWN_BUGS
) -> list[KnownBug]:
    """The known bugs of ``backend`` at ``version``.

    ``version`` may be the backend's whole version text (``smolvm 1.2.0``);
    the first ``X.Y.Z`` in it counts.  Text marked as bot-bottle's fake
    leaves out the bugs the fake does not imitate.  A backend without known
    bugs never has its version parsed.
    """
    candidates = [bug for bug in bugs if bug.backend == backend]
    if not candidates:
        return []
    fake = isinstance(version, str) and FAKE_MARKER in version
    parsed = version if isinstance(version, Version) else Version.parse(version)
    return [
        bug for bug in candidates if bug.affects(parsed) and (bug.in_fake or not fake)
    ]


def by_id(bug_id: str, bugs: Iterable[KnownBug] = KNOWN_BUGS) -> KnownBug:
    """The entry named ``bug_id``; a usage error lists the known ids."""
    known = list(bugs)
    for bug in known:
        if bug.id == bug_id:
            return bug
    raise BottleUsageError(
        f"known bug {bug_id!r}", "unknown; known: " + ", ".join(b.id for b in known)
    )


class Verdict(enum.StrEnum):
    """How a known bug bears on one run."""

    #: The bug is live: the cells it breaks are expected to fail.
    EXPECTED_TO_FAIL = "expected to fail"
    #: The bug is there, and bot-bottle's workaround made the cells pass.
    CARRIED_BY_WORKAROUND = "carried by workaround"
    #: The runtime behaved (e.g. the agent did not use the buggy path).
    NOT_TRIGGERED = "not triggered"
    #: The bug is in a part of the runtime bot-bottle does not use.
    NOT_ON_PATH = "not on bot-bottle's path"


@dataclasses.dataclass(frozen=True)
class Assessment:
    """A known bug against one run's bottle facts."""

    bug: KnownBug
    verdict: Verdict
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "bug": self.bug.to_json(),
            "verdict": str(self.verdict),
            "detail": self.detail,
        }


def assess(bug: KnownBug, bottle_facts: Sequence[Mapping[str, Any]]) -> Assessment:
    """Whether ``bug`` is live in a run whose bottles recorded ``bottle_facts``.

    A bug that breaks no clause of the contract is not on bot-bottle's path.
    Without a workaround, an affecting bug is live.  With one, the
    workaround's fact decides: every bottle ``carried`` means the workaround
    made the cells pass; every bottle ``not_needed`` means the runtime
    stored the right value itself; anything else (the workaround turned off,
    a bottle that did not say) leaves the bug live.
    """
    if not bug.breaks:
        return Assessment(bug, Verdict.NOT_ON_PATH, "no conformance test depends on it")
    workaround = bug.workaround
    if workaround is None:
        return Assessment(bug, Verdict.EXPECTED_TO_FAIL, "no workaround is known")
    values = [str(facts.get(workaround.fact, "unrecorded")) for facts in bottle_facts]
    if values and all(value == workaround.carried for value in values):
        return Assessment(
            bug,
            Verdict.CARRIED_BY_WORKAROUND,
            f"{workaround.name}: {workaround.fact}={workaround.carried} in every "
            "bottle",
        )
    if values and all(value == workaround.not_needed for value in values):
        return Assessment(
            bug,
            Verdict.NOT_TRIGGERED,
            f"{workaround.fact}={workaround.not_needed} in every bottle: the "
            "runtime stored the right value itself",
        )
    seen = ", ".join(sorted(set(values))) or "no bottle facts"
    return Assessment(
        bug,
        Verdict.EXPECTED_TO_FAIL,
        f"{workaround.name} did not carry every bottle ({workaround.fact}: {seen})",
    )


__all__ = [
    "KNOWN_BUGS",
    "STORED_ALLOWLIST_TEST",
    "UNRESTRICTED_EGRESS_FAILS",
    "Assessment",
    "KnownBug",
    "Verdict",
    "Version",
    "Workaround",
    "affecting",
    "assess",
    "by_id",
]
