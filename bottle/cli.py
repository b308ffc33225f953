"""The ``bottle`` command: a minimal launcher for bottles on any backend.

    bottle up [SPEC.toml] [--name N] [--backend B] [--allow CIDR] [--port P]
    bottle down NAME | --all
    bottle ls
    bottle exec NAME -- CMD...
    bottle setup            (also: bottle smolvm-setup)
    bottle doctor
    bottle probes
    bottle report diff OLD.json NEW.json
    bottle check [--backend B] [--out DIR] [-- PYTEST ARGS...]

Exit codes: 0 success, 1 a bottle or backend error, 4 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from bottle import loopback
from bottle.backends import (
    DEFAULT_BACKEND,
    Backend,
    BackendConfig,
    available_backends,
    load_backend,
)
from bottle.catalogue import PROBES
from bottle.cli_report import REPORT_COMMANDS, add_report_commands
from bottle.errors import BottleError, BottleNotFound, BottleUsageError
from bottle.keeper import KEEPER_OWNER_KIND
from bottle.pool import AliasPool, Lease, pool_from_environment
from bottle.spec import read_spec_file, spec_from_mapping

log = logging.getLogger(__name__)

EXIT_ERROR = 1
EXIT_USAGE = 4
#: What ``bottle exec`` passes on when the command ran out of time.
EXIT_TIMED_OUT = 124
EXEC_TIMEOUT_SECONDS = 86400.0
_KEEPER_START_SECONDS = 120
_KEEPER_STOP_SECONDS = 30


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        raise BottleUsageError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bottle", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", help="alias pool (default: $BOTTLE_POOL or built-in)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    up = commands.add_parser("up", help="start a bottle and print its alias and ports")
    up.add_argument("spec", nargs="?", type=Path, help="TOML spec file")
    up.add_argument("--name", help="bottle name (overrides the spec's)")
    up.add_argument("--backend", help=f"backend (default: {DEFAULT_BACKEND})")
    up.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="CIDR",
        help="allowlist entry; 'alias' is the bottle's own alias (repeatable)",
    )
    up.add_argument(
        "--port",
        action="append",
        type=int,
        default=None,
        help="port of an echo bundle service (repeatable; 0 = any)",
    )
    up.add_argument(
        "--backend-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="backend-specific setting (repeatable)",
    )

    down = commands.add_parser("down", help="stop a bottle")
    down.add_argument("name", nargs="?", help="bottle name or id")
    down.add_argument("--all", action="store_true", help="stop every bottle")

    commands.add_parser("ls", help="list bottles and their leases")

    run = commands.add_parser("exec", help="run a command inside a bottle")
    run.add_argument("name", help="bottle name or id")
    run.add_argument(
        "--timeout",
        type=float,
        default=EXEC_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="end the command and its children after this long, exit 124 "
        f"(default {EXEC_TIMEOUT_SECONDS:g}, a day)",
    )
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- CMD...")

    for name in ("setup", "smolvm-setup"):
        commands.add_parser(name, help="prepare the host's loopback aliases")
    commands.add_parser("doctor", help="what each backend needs and whether it is here")
    commands.add_parser(
        "probes", help="every probe: what it targets, where it came from"
    )
    add_report_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        pool = AliasPool(pool_from_environment(args.pool))
        handler = _COMMANDS[args.command]
        return handler(args, pool)
    except BottleUsageError as exc:
        sys.stderr.write(f"bottle: error: {exc}\n")
        return EXIT_USAGE
    except BottleError as exc:
        sys.stderr.write(f"bottle: {exc}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away, e.g. `bottle probes | head`
        sys.stderr.close()
        return 0


def _out(line: str = "") -> None:
    sys.stdout.write(line + "\n")


def _backend(
    name: str, pool: AliasPool, options: dict[str, str] | None = None
) -> Backend:
    return load_backend(name, BackendConfig(pool.state_dir, options or {}))


def _cmd_up(args: argparse.Namespace, pool: AliasPool) -> int:
    data: dict[str, Any] = {}
    if args.spec is not None:
        data = read_spec_file(args.spec)
    if args.name:
        data["name"] = args.name
    data.setdefault("name", "bottle")
    if args.allow:
        data["allowlist"] = args.allow
    if args.port:
        data["bundle"] = [
            {"name": f"echo{i}", "port": p} for i, p in enumerate(args.port)
        ]
    backend_name = args.backend or data.pop("backend", "") or DEFAULT_BACKEND
    options = _options(args.backend_option)

    try:
        spec_from_mapping(data)
    except BottleUsageError as exc:
        if args.spec is None:
            raise
        raise BottleUsageError(f"spec file {args.spec}", str(exc)) from None
    backend = _backend(backend_name, pool, options)
    backend.check()
    pool.state_dir.mkdir(parents=True, exist_ok=True)
    request = {
        "spec": data,
        "backend": backend_name,
        "options": options,
        "pool": str(pool.range),
        "state_dir": str(pool.state_dir),
        "log_file": str(pool.state_dir / "keeper.log"),
    }
    descriptor, request_path = tempfile.mkstemp(dir=pool.state_dir, suffix=".json")
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        json.dump(request, stream)

    read_end, write_end = os.pipe()
    subprocess.Popen(
        [sys.executable, "-m", "bottle.keeper", request_path, str(write_end)],
        pass_fds=(write_end,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8") as stream:
        status_text = stream.read()
    if not status_text:
        raise BottleError(
            f"the keeper process died before reporting; see {request['log_file']}"
        )
    status = json.loads(status_text)
    if not status["ok"]:
        if status.get("usage"):
            raise BottleUsageError(f"bottle {data['name']!r}", status["error"])
        raise BottleError(status["error"])
    _out(f"bottle {data['name']} is up (id {status['id']}, backend {backend_name})")
    _out(f"  alias     {status['alias']}")
    _out(f"  allowlist {', '.join(status['allowlist'])}")
    for service, port in status["ports"].items():
        _out(f"  bundle    {service} on {status['alias']}:{port}")
    return 0


def _options(items: list[str]) -> dict[str, str]:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BottleUsageError(f"--backend-option {item!r}", "use KEY=VALUE")
        options[key] = value
    return options


def _find(pool: AliasPool, name: str) -> Lease:
    leases = pool.leases()
    matches = [
        lease
        for lease in leases
        if name in (lease.bottle_id, lease.bottle_id.split("-", 1)[-1])
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise BottleNotFound(name, [lease.bottle_id for lease in leases])
    ids = ", ".join(lease.bottle_id for lease in matches)
    raise BottleUsageError(f"bottle name {name!r}", f"is ambiguous; use an id: {ids}")


def _cmd_down(args: argparse.Namespace, pool: AliasPool) -> int:
    if args.all == bool(args.name):
        raise BottleUsageError("bottle down", "give either a bottle name or --all")
    targets = pool.leases() if args.all else [_find(pool, args.name)]
    status = 0
    for lease in targets:
        if _held_by_another_program(lease):
            status = EXIT_ERROR
            sys.stderr.write(
                f"bottle: {lease.bottle_id} belongs to a running process (pid "
                f"{lease.owner.pid}) that is not a bottle keeper, e.g. a pytest "
                "session; it stops its own bottles\n"
            )
            continue
        _stop_lease(pool, lease)
        _out(f"bottle {lease.bottle_id} is down; {lease.alias} is free")
    return status


def _held_by_another_program(lease: Lease) -> bool:
    kind = lease.handle.get("owner_kind", KEEPER_OWNER_KIND)
    return kind != KEEPER_OWNER_KIND and lease.owner.is_alive()


def _stop_lease(pool: AliasPool, lease: Lease) -> None:
    if lease.owner.is_alive():
        os.kill(lease.owner.pid, 15)
        deadline = time.monotonic() + _KEEPER_STOP_SECONDS
        while time.monotonic() < deadline:
            if all(held.bottle_id != lease.bottle_id for held in pool.leases()):
                return
            time.sleep(0.05)
        raise BottleError(
            f"bottle {lease.bottle_id}: its owner (pid {lease.owner.pid}) did not "
            f"stop it within {_KEEPER_STOP_SECONDS} s"
        )
    # Only this bottle: a host-wide reap would also take bottles recorded in
    # other lease stores (another BOTTLE_STATE_DIR) for leftovers.
    _backend(lease.backend, pool).remove(lease.bottle_id, lease.handle)
    pool.release(lease.bottle_id)


def _cmd_ls(args: argparse.Namespace, pool: AliasPool) -> int:
    leases = pool.leases()
    if not leases:
        _out(f"no bottles (pool {pool.range}, state {pool.state_dir})")
        return 0
    rows = [["NAME", "ID", "BACKEND", "ALIAS", "OWNER", "BUNDLE"]]
    for lease in leases:
        state = "live" if lease.owner.is_alive() else "dead"
        ports = lease.handle.get("bundle_ports", {})
        bundle = ", ".join(f"{name}:{port}" for name, port in ports.items())
        rows.append(
            [
                lease.bottle_id.split("-", 1)[-1],
                lease.bottle_id,
                lease.backend,
                lease.alias,
                f"pid {lease.owner.pid} ({state})",
                bundle or "-",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


def _cmd_exec(args: argparse.Namespace, pool: AliasPool) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise BottleUsageError("bottle exec", "give the command after `--`")
    lease = _find(pool, args.name)
    backend = _backend(lease.backend, pool)
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise BottleUsageError(
            f"--timeout {args.timeout:g}", "give a positive number of seconds"
        )
    result = backend.exec(backend.attach(lease), argv, timeout=args.timeout)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode == EXIT_TIMED_OUT:
        sys.stderr.write(
            f"bottle exec: {args.name}: still running after {args.timeout:g} s; the "
            "command was ended (its exit code is 124)\n"
        )
    return result.returncode


def _cmd_setup(args: argparse.Namespace, pool: AliasPool) -> int:
    aliases = [str(address) for address in pool.range.addresses()]
    if not loopback.is_macos():
        failures = loopback.unbindable(aliases)
        if failures:
            for alias, reason in failures.items():
                _out(f"cannot bind {alias}: {reason}")
            return EXIT_ERROR
        _out(
            f"Linux: every address of {pool.range} is already local and can be "
            "bound; nothing else is needed."
        )
        return 0
    commands = loopback.setup_commands(aliases)
    if not commands:
        _out(f"every alias of {pool.range} is already on lo0; nothing to do.")
        return 0
    _out("bottle setup will run (sudo asks for your password once):")
    for command in commands:
        _out("  " + " ".join(command))
    for command in commands:
        subprocess.run(command, check=True)
    _out(f"added {len(commands)} alias(es) to lo0.")
    return 0


def _cmd_doctor(args: argparse.Namespace, pool: AliasPool) -> int:
    _out(f"alias pool {pool.range} ({len(pool.range)} aliases), state {pool.state_dir}")
    ready = 0
    for name in available_backends():
        try:
            backend = _backend(name, pool)
            requirements = backend.requirements()
        except BottleError as exc:
            _out(f"{name}: cannot be loaded: {exc}")
            continue
        usable = all(req.present for req in requirements)
        ready += usable
        _out(f"{name}: {'ready' if usable else 'NOT ready'}")
        for req in requirements:
            mark = "ok " if req.present else "MISSING"
            _out(f"  [{mark}] {req.what}: {req.detail}")
    return 0 if ready else EXIT_ERROR


def _cmd_probes(args: argparse.Namespace, pool: AliasPool) -> int:
    for kind in PROBES:
        _out(f"{kind.name}  (columns {kind.columns}, test {kind.test})")
        for label, text in (("targets", kind.targets), ("source", kind.source)):
            for number, line in enumerate(textwrap.wrap(text, 70)):
                _out(f"  {label if number == 0 else '':8} {line}")
    return 0


_COMMANDS = {
    "up": _cmd_up,
    "down": _cmd_down,
    "ls": _cmd_ls,
    "exec": _cmd_exec,
    "setup": _cmd_setup,
    "smolvm-setup": _cmd_setup,
    "doctor": _cmd_doctor,
    "probes": _cmd_probes,
}
_COMMANDS.update(REPORT_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
