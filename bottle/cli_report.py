"""``bottle report diff`` and ``bottle check``: reports from the command line.

    bottle report diff OLD.json NEW.json
        Compare two reports cell by cell, regressions first.  Exit 1 when a
        cell that passed in OLD fails in NEW, 0 otherwise, 4 on bad input.
    bottle check [--backend B] [--out DIR] [-- PYTEST ARGS...]
        Run the conformance suite with pytest, writing report.json and
        report.html into DIR (default ./bottle-reports/<UTC timestamp>), and
        print where they are.  The exit status is pytest's.

:func:`add_report_commands` adds both to the ``bottle`` command's parser;
:data:`REPORT_COMMANDS` maps each command name to its handler, which takes
the parsed arguments and the alias pool like every ``bottle`` handler.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bottle.errors import BottleError, BottleUsageError
from bottle.pool import AliasPool, pool_from_environment
from bottle.report import cells_of, compare, read_report, render_comparison

EXIT_WORSE = 1
EXIT_ERROR = 1
EXIT_USAGE = 4
REPORT_FILE = "report.json"
HTML_FILE = "report.html"

Handler = Callable[[argparse.Namespace, AliasPool], int]


def add_report_commands(subparsers: Any) -> None:
    """Add ``report diff`` and ``check`` to the ``bottle`` parser's commands.

    ``subparsers`` is what ``ArgumentParser.add_subparsers`` returned; the
    chosen command lands in ``args.command``.
    """
    report = subparsers.add_parser("report", help="work with JSON reports")
    actions = report.add_subparsers(dest="report_command", required=True)
    diff = actions.add_parser(
        "diff", help="compare two reports; exit 1 when a cell got worse"
    )
    diff.add_argument("old", type=Path, help="the earlier report (JSON)")
    diff.add_argument("new", type=Path, help="the later report (JSON)")

    check = subparsers.add_parser(
        "check", help="run the conformance suite and write JSON and HTML reports"
    )
    check.add_argument("--backend", help="backend to run (default: pytest's)")
    check.add_argument(
        "--out",
        type=Path,
        help="folder for the reports (default: ./bottle-reports/<timestamp>)",
    )
    check.add_argument(
        "pytest_args",
        nargs=argparse.REMAINDER,
        metavar="PYTEST ARGS",
        help="more pytest arguments after `--`, e.g. -- --bottle-probe-timeout=3",
    )


def cmd_report(args: argparse.Namespace, pool: AliasPool) -> int:
    """``bottle report diff OLD NEW``."""
    if args.report_command != "diff":
        raise BottleUsageError("bottle report", "use: bottle report diff OLD NEW")
    old, new = read_report(args.old), read_report(args.new)
    backends = tuple(str((r.get("backend") or {}).get("name")) for r in (old, new))
    if backends[0] != backends[1]:
        raise BottleUsageError(
            f"reports of backends {backends[0]} and {backends[1]}",
            "compare two runs of one backend (an upgrade of it, say)",
        )
    comparison = compare(cells_of(old), cells_of(new))
    for line in render_comparison(comparison, str(args.old), str(args.new)):
        sys.stdout.write(line + "\n")
    return EXIT_WORSE if comparison.got_worse else 0


def check_command(
    out: Path, backend: str | None, pool: str | None, extra: list[str]
) -> list[str]:
    """The pytest command line ``bottle check`` runs."""
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "conformance",
        "-p",
        "no:cacheprovider",
        # The cells' junitxml properties need a family that has properties.
        "-o",
        "junit_family=xunit1",
        f"--bottle-report={out / REPORT_FILE}",
        f"--bottle-html={out / HTML_FILE}",
    ]
    if backend:
        argv.append(f"--bottle-backend={backend}")
    if pool:
        argv.append(f"--bottle-pool={pool}")
    return argv + extra


def default_out_dir(now: datetime.datetime | None = None) -> Path:
    when = now or datetime.datetime.now(datetime.UTC)
    return Path("bottle-reports") / when.strftime("%Y%m%dT%H%M%SZ")


def cmd_check(args: argparse.Namespace, pool: AliasPool) -> int:
    """``bottle check``: run the suite, then say where the reports are."""
    out: Path = args.out or default_out_dir()
    extra = list(args.pytest_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BottleUsageError(
            f"--out {out}", f"cannot make the folder: {exc}"
        ) from None
    argv = check_command(out, args.backend, str(pool.range), extra)
    completed = subprocess.run(argv, check=False)
    for name in (REPORT_FILE, HTML_FILE):
        path = out / name
        state = "" if path.exists() else " (not written: see pytest's output)"
        sys.stdout.write(f"bottle check: {path.resolve()}{state}\n")
    sys.stdout.write(f"bottle check: pytest exited {completed.returncode}\n")
    return completed.returncode


REPORT_COMMANDS: dict[str, Handler] = {"report": cmd_report, "check": cmd_check}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        raise BottleUsageError("bottle", message)


def main(argv: list[str] | None = None) -> int:
    """The two commands on their own: ``python -m bottle.cli_report report diff``.

    Exit codes as ``bottle``'s: 4 for bad input (one line on stderr).
    """
    parser = _Parser(prog="bottle")
    parser.add_argument("--pool", help="alias pool (default: $BOTTLE_POOL or built-in)")
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )
    add_report_commands(commands)
    try:
        args = parser.parse_args(argv)
        pool = AliasPool(pool_from_environment(args.pool))
        return REPORT_COMMANDS[args.command](args, pool)
    except BottleUsageError as exc:
        sys.stderr.write(f"bottle: error: {exc}\n")
        return EXIT_USAGE
    except BottleError as exc:
        sys.stderr.write(f"bottle: {exc}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

__all__ = [
    "REPORT_COMMANDS",
    "add_report_commands",
    "check_command",
    "cmd_check",
    "cmd_report",
    "main",
]
