"""How fast bot-bottle gives its verdict, against the bare backends.

    .venv/bin/python benchmarks/bench.py [--backends netns,docker] [--repeat 3]

Prints one table per measure, with ratios:

- start and stop of 1, 4 and 16 bottles through the launcher, against the
  bare backend doing the same work in the same run (``ip``/``nft`` by hand
  for netns; networks and containers through the docker SDK for docker);
- time to the full verdict of the 16-bottle matrix (16 x 16 bundle cells plus
  host and egress cells) and probes per second;
- the whole conformance suite with 16 bottles under pytest, with one worker
  and with ``-n 2``, and the peak memory of the pytest process.

Needs root (and a Docker engine for the docker rows).  Nothing leaves the
host: the egress target is a stand-in namespace's test address.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import ipaddress
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bottle import AliasPool, AliasRange, BottleSpec, Launcher
from bottle.backends import Backend, BackendConfig, load_backend
from bottle.errors import BackendUnavailable
from bottle.listeners import ListenerHub
from bottle.standin import start_standin, stop_standin
from bottle.suite import (
    STANDIN_DEFAULTS,
    Plan,
    Sentinels,
    outside_targets,
    parse_host_port,
    probe_all,
)

REPO = Path(__file__).resolve().parent.parent
POOL = "127.0.0.16-127.0.0.31"
OUTSIDE = outside_targets(
    *(
        parse_host_port(STANDIN_DEFAULTS[key])
        for key in ("egress", "dns", "metadata", "public")
    )
)
COUNTS = (1, 4, 16)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def best_of(repeat: int, action: Callable[[], float]) -> float:
    return statistics.median(action() for _ in range(repeat))


# -- bare netns: the same commands the backend runs, without the launcher ----


_cycles = iter(range(1_000_000))


def bare_netns_cycle(count: int) -> float:
    """Create and remove ``count`` namespaces with veth and nft table by hand.

    Names are new each cycle: the kernel destroys a deleted namespace's veth
    asynchronously, so reusing a name at once can collide.
    """
    cycle = next(_cycles)

    def make(index: int) -> None:
        name = f"bench-{cycle}-{index}"
        veth = f"bench{cycle}x{index}"
        host = ipaddress.IPv4Address("198.18.128.0") + 4 * index + 1
        table = f"""table inet bench_{cycle}_{index} {{
            set allow4 {{
                type ipv4_addr; flags interval; elements = {{ 127.0.0.{40 + index} }}
            }}
            chain input {{
                type filter hook input priority -10; policy accept;
                iifname "{veth}" ip daddr @allow4 accept
                iifname "{veth}" reject with icmpx type admin-prohibited
            }}
            chain forward {{
                type filter hook forward priority -10; policy accept;
                iifname "{veth}" reject with icmpx type admin-prohibited
            }}
        }}"""
        subprocess.run(["nft", "-f", "-"], input=table, text=True, check=True)
        commands = (
            f"netns add {name}\n"
            f"link add {veth} type veth peer name bb0 netns {name}\n"
            f"addr add {host}/30 dev {veth}\nlink set {veth} up\n"
        )
        subprocess.run(["ip", "-batch", "-"], input=commands, text=True, check=True)
        inner = (
            f"link set lo up\naddr add {host + 1}/30 dev bb0\nlink set bb0 up\n"
            f"route add 127.0.0.0/8 via {host}\n"
        )
        subprocess.run(
            ["ip", "-n", name, "-batch", "-"], input=inner, text=True, check=True
        )

    def remove(index: int) -> None:
        subprocess.run(["nft", "delete", "table", "inet", f"bench_{cycle}_{index}"])
        subprocess.run(["ip", "netns", "delete", f"bench-{cycle}-{index}"])

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
        try:
            list(executor.map(make, range(count)))
        finally:
            list(executor.map(remove, range(count)))
    return time.perf_counter() - started


# -- bare docker: networks and containers through the SDK ---------------------


def bare_docker_cycle(count: int) -> float:
    """Per bottle: two networks, an agent and a bundle container, then remove."""
    import docker

    from bottle import images

    client = docker.from_env()
    image = images.ensure_image(client, Path(tempfile.gettempdir()) / "bottle-bench")

    def make(index: int) -> None:
        internal = client.networks.create(f"bench-{index}-int", internal=True)
        public = client.networks.create(f"bench-{index}-pub")
        client.containers.run(
            image,
            ["sleep", "3600"],
            name=f"bench-{index}-agent",
            network=internal.name,
            detach=True,
            cap_drop=["ALL"],
        )
        bundle = client.containers.create(
            image,
            ["/usr/local/bin/bottle-probe", "--serve", "8080"],
            name=f"bench-{index}-bundle",
            network=public.name,
            ports={"8080/tcp": (f"127.0.0.{40 + index}", None)},
        )
        internal.connect(bundle)
        bundle.start()

    def remove(index: int) -> None:
        for suffix in ("agent", "bundle"):
            client.containers.get(f"bench-{index}-{suffix}").remove(force=True)
        for suffix in ("int", "pub"):
            client.networks.get(f"bench-{index}-{suffix}").remove()

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as executor:
        list(executor.map(make, range(count)))
        list(executor.map(remove, range(count)))
    return time.perf_counter() - started


BARE = {"netns": bare_netns_cycle, "docker": bare_docker_cycle}


# -- through the launcher ------------------------------------------------------


def launcher_cycle(backend: Backend, pool: AliasPool, count: int) -> float:
    launcher = Launcher(backend, pool)
    started = time.perf_counter()
    launcher.start_many([BottleSpec(f"b{i}") for i in range(count)])
    launcher.stop_all()
    return time.perf_counter() - started


def verdict_of_sixteen(backend: Backend, pool: AliasPool) -> tuple[float, float, int]:
    """Start 16 bottles, probe the full matrix; returns start, verdict, cells."""
    hub = ListenerHub()
    launcher = Launcher(backend, pool, hub=hub)
    addresses = [(target.host, target.port) for target in OUTSIDE]
    standin = start_standin(addresses, hub, pool, launcher.run)
    sentinels = Sentinels.start(hub)
    try:
        started = time.perf_counter()
        bottles = launcher.start_many([BottleSpec(f"b{i}") for i in range(16)])
        up = time.perf_counter() - started
        plan = Plan(
            sentinels,
            OUTSIDE,
            standin.witness,
            pool_aliases=[str(alias) for alias in pool.range.addresses()],
        )
        started = time.perf_counter()
        matrix = probe_all(backend, bottles, plan)
        verdict = time.perf_counter() - started
        if not matrix.passed:
            raise SystemExit(f"the 16-bottle matrix failed: {matrix.failures()[:3]}")
        return up, verdict, len(matrix.cells)
    finally:
        launcher.stop_all()
        sentinels.close(hub)
        stop_standin(standin, hub)
        hub.shutdown()


def pytest_run(backend: str, workers: int) -> tuple[float, float]:
    """The conformance suite with 16 bottles; returns seconds and peak MiB."""
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "conformance",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--bottle-backend={backend}",
        "--bottle-count=16",
        "--bottle-egress-standin",
    ]
    if workers > 1:
        argv += ["-n", str(workers)]
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pytest on {backend} with {workers} worker(s) failed")
    return elapsed, usage.ru_maxrss / 1024


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, [("-" * w) for w in widths], *rows]:
        print("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="netns,docker")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    state = Path(tempfile.mkdtemp(prefix="bottle-bench."))
    os.environ["BOTTLE_STATE_DIR"] = str(state)
    pool = AliasPool(AliasRange.parse(POOL), state)

    for name in args.backends.split(","):
        backend = load_backend(name, BackendConfig(state))
        try:
            backend.check()
        except BackendUnavailable as exc:
            print(f"\n{name}: not measured: {exc}")
            continue
        rows = []
        for count in COUNTS:
            bare = best_of(args.repeat, functools.partial(BARE[name], count))
            ours = best_of(
                args.repeat, functools.partial(launcher_cycle, backend, pool, count)
            )
            rows.append(
                [
                    str(count),
                    f"{bare * 1000:.0f}",
                    f"{ours * 1000:.0f}",
                    f"{ours / bare:.2f}",
                    f"{(ours - bare) / bare:+.0%}",
                ]
            )
        table(
            f"{name}: start and stop N bottles (median of {args.repeat}, ms)",
            ["N", "bare", "launcher", "ratio", "overhead"],
            rows,
        )

        up, verdict, cells = verdict_of_sixteen(backend, pool)
        table(
            f"{name}: the 16-bottle matrix",
            ["cells", "start 16 (s)", "verdict (s)", "probes/s", "start/verdict"],
            [
                [
                    str(cells),
                    f"{up:.2f}",
                    f"{verdict:.2f}",
                    f"{cells / verdict:.0f}",
                    f"{up / verdict:.1f}",
                ]
            ],
        )

        one, one_mib = pytest_run(name, 1)
        two, two_mib = pytest_run(name, 2)
        table(
            f"{name}: pytest conformance --bottle-count=16",
            ["workers", "seconds", "peak MiB", "vs 1 worker"],
            [
                ["1", f"{one:.2f}", f"{one_mib:.0f}", "1.00"],
                ["2", f"{two:.2f}", f"{two_mib:.0f}", f"{two / one:.2f}"],
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
