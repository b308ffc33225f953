"""Every kind of probe the conformance suite runs, what it targets, and why.

Each entry names the columns of the matrix it produces (a prefix of the
column key), the conformance test that judges them, and where the idea came
from.  ``bottle probes`` prints this list; the negative controls
(:mod:`conformance.controls`) must cover every entry, which a test checks.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ProbeKind:
    """One kind of probe: its columns, its test, and its source."""

    name: str
    columns: str
    test: str
    targets: str
    source: str


PROBES: tuple[ProbeKind, ...] = (
    ProbeKind(
        "own-bundle",
        "bundle:<own>",
        "test_reaches_own_bundle",
        "the bottle's own bundle on its alias (the positive control: without "
        "it, no blocked cell means anything)",
        "a bottle with no network at all proves nothing",
    ),
    ProbeKind(
        "other-bundle",
        "bundle:<other>",
        "test_cannot_reach_other_bundle",
        "every other bottle's bundle, where its agent would dial it",
        "bot-bottle issue #75 (the seed): two simultaneous bottles must not see "
        "each other's published ports",
    ),
    ProbeKind(
        "other-bundle-via-own-alias",
        "via-own-alias:",
        "test_cannot_reach_other_bundle_via_own_alias",
        "another bottle's bundle port on this bottle's own alias",
        "smolvm's TSI networking: the allowlist filters the IP only, never the "
        "port, so a bundle bound on every address answers on any alias",
    ),
    ProbeKind(
        "loopback-sentinel",
        "sentinel:127.0.0.1",
        "test_cannot_reach_loopback_sentinel",
        "a host listener on 127.0.0.1 (TCP)",
        "bot-bottle issue #75 (the seed): with the allowlist 127.0.0.1/32 the "
        "agent reached every service on the host's loopback",
    ),
    ProbeKind(
        "udp-sentinel",
        "sentinel:127.0.0.1/udp",
        "test_cannot_reach_loopback_over_udp",
        "a host UDP listener on 127.0.0.1, judged by its nonce log",
        "smolvm's TSI networking: a denied UDP send is dropped silently, so a send "
        "without error proves nothing; only the receiver can tell",
    ),
    ProbeKind(
        "ipv6-loopback",
        "sentinel:[",
        "test_cannot_reach_loopback_over_ipv6",
        "a host listener on [::1], and 127.0.0.1 spelled [::ffff:127.0.0.1]",
        "filters written for IPv4 have let IPv6 and IPv4-mapped IPv6 "
        "destinations through (TSI's allowlist adds ::1/128 separately)",
    ),
    ProbeKind(
        "other-alias",
        "alias:",
        "test_cannot_reach_other_aliases",
        "every other alias of the pool, free ones included, at a listener "
        "bound on every host address",
        "bot-bottle issue #75, fixed by #76: each bottle's allowlist is its own "
        "alias /32 and nothing else of 127.0.0.0/8",
    ),
    ProbeKind(
        "host-address",
        "host",
        "test_cannot_reach_host_addresses",
        "a listener bound on every host interface, at every address the host "
        "owns (IPv4 and IPv6)",
        "Docker: a container on an --internal network reached host "
        "services bound to 0.0.0.0",
    ),
    ProbeKind(
        "gateway",
        "gateway:",
        "test_cannot_reach_host_addresses",
        "the same listener at every gateway the bottle sees",
        "Docker: the leak went through the bridge's gateway address",
    ),
    ProbeKind(
        "host-service-via-own-alias",
        "host-via-own-alias",
        "test_cannot_reach_host_services_via_own_alias",
        "a listener bound on every host address, dialled at the bottle's own "
        "alias (where its bundle listens)",
        "smolvm's TSI networking: the allowlist <alias>/32 admits every port of "
        "the alias, and a host service bound to 0.0.0.0 answers on it",
    ),
    ProbeKind(
        "egress",
        "egress",
        "test_cannot_reach_egress_target",
        "the egress target (default 8.8.8.8:53) over TCP and UDP",
        "smolvm 0.8.0-1.7.7 (--from bug, fixed by upstream PR 892): allowed_cidrs "
        "stored as null gives unrestricted egress without a warning",
    ),
    ProbeKind(
        "dns",
        "dns",
        "test_cannot_reach_outside",
        "a DNS query for NONCE.bottle-probe.test to the resolver",
        "DNS is the classic way out of a sandbox that blocks connections: a "
        "forwarding resolver carries the nonce outside",
    ),
    ProbeKind(
        "metadata",
        "metadata",
        "test_cannot_reach_outside",
        "the cloud metadata service (default 169.254.169.254:80)",
        "cloud metadata endpoints hand out credentials to whoever reaches "
        "them from the instance",
    ),
    ProbeKind(
        "public",
        "public",
        "test_cannot_reach_outside",
        "a second public address (default 1.1.1.1:443)",
        "an allowlist that lets one public address through (a resolver, a "
        "proxy) is often wider than meant",
    ),
    ProbeKind(
        "loopback-collision",
        "loopback:self",
        "test_own_loopback_stays_own",
        "every bottle listens on one port of its own loopback at once and "
        "must reach its own listener there",
        "libkrun issue 860: two guests listening on one port collided on the host",
    ),
)


def probe_for_column(column: str) -> ProbeKind | None:
    """The kind of probe a matrix column belongs to (longest prefix wins)."""
    best = None
    for kind in PROBES:
        prefix = kind.columns.split("<", 1)[0]
        if column.startswith(prefix) and (
            best is None or len(prefix) > len(best.columns.split("<", 1)[0])
        ):
            best = kind
    return best
