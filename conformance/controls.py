"""Negative controls: deliberately leaky bottles that each probe must catch.

A verification suite is worth what it can detect.  Each control runs the
conformance suite against a bottle weakened in one known way, on a real
backend, and names exactly the tests that must fail; every other test must
still pass.  ``tests/test_negative_controls.py`` runs them all, and checks
that every kind of probe in :mod:`bottle.catalogue` is proven by at least one
control (or is listed in :data:`UNPROVEN` with the reason).

Controls use two bottles, ``a`` and ``b``.
"""

from __future__ import annotations

import dataclasses

PAIRS = ("a-b", "b-a")
BOTH = ("a", "b")


def _each(test: str, params: tuple[str, ...] = BOTH) -> frozenset[str]:
    return frozenset(f"{test}[{param}]" for param in params)


@dataclasses.dataclass(frozen=True)
class NegativeControl:
    """One deliberately leaky bottle and the tests its leak must fail."""

    name: str
    backend: str
    leak: str
    args: tuple[str, ...]
    must_fail: frozenset[str]
    #: The kinds of probe (catalogue names) this control proves can see a leak.
    proves: tuple[str, ...]
    #: Extra environment (e.g. which smolvm version the fake imitates).
    env: tuple[tuple[str, str], ...] = ()


_ALLOWLIST = _each("test_effective_allowlist_is_own_alias")
#: What an alias without its guard fails on its own: a host service bound on
#: every address answers at the bottle's alias.
_UNGUARDED = _each("test_cannot_reach_host_services_via_own_alias")

CONTROLS: tuple[NegativeControl, ...] = (
    NegativeControl(
        "widened-to-localhost",
        "netns",
        "the allowlist widened to 127.0.0.1/32, as v1 of the seed system had it",
        ("--bottle-allowlist=alias,127.0.0.1/32",),
        _each("test_cannot_reach_loopback_sentinel")
        | _each("test_cannot_reach_loopback_over_udp")
        | _each("test_cannot_reach_loopback_over_ipv6")
        | _ALLOWLIST,
        ("loopback-sentinel", "udp-sentinel", "ipv6-loopback"),
    ),
    NegativeControl(
        "widened-to-all-loopback",
        "netns",
        "the allowlist widened to 127.0.0.0/8",
        ("--bottle-allowlist=alias,127.0.0.0/8",),
        _each("test_cannot_reach_other_bundle", PAIRS)
        | _each("test_cannot_reach_loopback_sentinel")
        | _each("test_cannot_reach_loopback_over_udp")
        | _each("test_cannot_reach_loopback_over_ipv6")
        | _each("test_cannot_reach_other_aliases")
        | _ALLOWLIST,
        ("other-bundle", "other-alias"),
    ),
    NegativeControl(
        "shared-alias",
        "netns",
        "two bottles sharing one alias, unguarded (guarded, each alias guard "
        "turns the other bottle's bundle away, and the positive controls fail)",
        (
            "--bottle-backend-option=alias_override=127.0.0.16",
            "--bottle-backend-option=alias_guard=off",
        ),
        _each("test_cannot_reach_other_bundle", PAIRS)
        | _each("test_cannot_reach_other_bundle_via_own_alias", PAIRS)
        | _UNGUARDED,
        ("other-bundle", "other-bundle-via-own-alias"),
    ),
    NegativeControl(
        "bundle-on-every-address",
        "netns",
        "bundles listening on 0.0.0.0 instead of their alias, with no alias "
        "guard to turn other ports away (as on macOS, which has no nftables)",
        (
            "--bottle-backend-option=bundle_bind=all",
            "--bottle-backend-option=alias_guard=off",
        ),
        _each("test_cannot_reach_other_bundle_via_own_alias", PAIRS) | _UNGUARDED,
        ("other-bundle-via-own-alias",),
    ),
    NegativeControl(
        "udp-open",
        "netns",
        "UDP left open while TCP is filtered",
        ("--bottle-backend-option=udp=open",),
        _each("test_cannot_reach_loopback_over_udp"),
        ("udp-sentinel",),
    ),
    NegativeControl(
        "ipv6-open",
        "netns",
        "IPv6 left unfiltered while IPv4 is",
        ("--bottle-backend-option=ipv6=open",),
        _each("test_cannot_reach_host_addresses"),
        ("host-address",),
    ),
    NegativeControl(
        "alias-unguarded",
        "netns",
        "the alias answering on every port, as an IP-only allowlist leaves it",
        ("--bottle-backend-option=alias_guard=off",),
        _UNGUARDED,
        ("host-service-via-own-alias",),
    ),
    NegativeControl(
        "outside-allowed",
        "netns",
        "the allowlist widened to the outside stand-in's network",
        ("--bottle-allowlist=alias,198.51.100.0/24",),
        _each("test_cannot_reach_egress_target")
        | _each("test_cannot_reach_outside")
        | _ALLOWLIST,
        ("egress", "dns", "metadata", "public"),
    ),
    NegativeControl(
        "veth-gateway-allowed",
        "netns",
        "the allowlist widened to the bottle's gateway network",
        ("--bottle-allowlist=alias,198.18.0.0/15",),
        _each("test_cannot_reach_host_addresses") | _ALLOWLIST,
        ("gateway",),
    ),
    NegativeControl(
        "docker-no-gateway-rule",
        "docker",
        "a docker bottle on a plain --internal network, without the host rule "
        "that closes the gateway",
        ("--bottle-backend-option=gateway_rule=off",),
        _each("test_cannot_reach_host_addresses"),
        ("host-address", "gateway"),
    ),
    NegativeControl(
        "docker-non-internal-network",
        "docker",
        "a docker bottle on a non-internal network (and without the gateway "
        "rule, which alone would still stop its traffic)",
        (
            "--bottle-backend-option=internal=off",
            "--bottle-backend-option=gateway_rule=off",
        ),
        _each("test_cannot_reach_host_addresses")
        | _each("test_cannot_reach_egress_target")
        | _each("test_cannot_reach_outside"),
        ("host-address", "egress", "dns", "metadata", "public"),
    ),
    NegativeControl(
        "docker-bundle-on-every-address",
        "docker",
        "a docker bundle published on 0.0.0.0 instead of the bottle's alias",
        ("--bottle-backend-option=bundle_publish=all",),
        _ALLOWLIST,
        (),
    ),
)

#: Probe kinds no control proves yet, and why.
UNPROVEN: dict[str, str] = {
    "own-bundle": "the positive control itself: a bottle that cannot reach its "
    "bundle makes the whole row INCONCLUSIVE (tests/test_plugin.py)",
    "loopback-collision": "no backend here can make two bottles share a "
    "loopback; the probe is checked against a crossing listener in "
    "tests/test_prober_contract.py",
}
