"""A report as one self-contained HTML page: the run's facts, then the matrix.

The page loads nothing from anywhere (inline style, a few lines of inline
script), so it can be attached to a CI run or mailed.  Each cell of the grid
shows the expected and the actual class; a mismatch is red and marked, and a
cell's evidence shows on hover (its title) and, on click, in a panel under
the grid.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; }
h1 { font-size: 1.4em; margin: 0 0 .6em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
.verdict-pass { color: #136c2e; } .verdict-fail { color: #b3141b; }
table { border-collapse: collapse; }
table.facts td, table.facts th { padding: .15em .8em .15em 0; text-align: left;
  vertical-align: top; }
table.facts th { color: #5a6275; font-weight: 600; }
#matrix th, #matrix td { border: 1px solid #c9ced8; padding: .35em .5em; }
#matrix thead th { background: #eef0f4; font-size: .85em; max-width: 11em;
  word-break: break-all; }
#matrix tbody th { background: #eef0f4; text-align: left; white-space: nowrap; }
#matrix th.corner { white-space: nowrap; word-break: normal; }
#matrix td.cell { text-align: center; cursor: pointer; min-width: 7em; }
#matrix td.pass.expect-conn { background: #b6e3c1; }
#matrix td.pass.expect-blk { background: #dfe9f7; }
#matrix td.fail { background: #f6b2b2; outline: 3px solid #b3141b;
  outline-offset: -3px; font-weight: 700; }
#matrix td.absent { background: #f4f4f4; color: #999; }
#matrix td.selected { box-shadow: inset 0 0 0 3px #1d2330; }
.exp { display: block; font-size: .75em; color: #4a5265; }
.act { display: block; }
.mark { color: #b3141b; }
#detail { margin-top: 1em; padding: .6em .8em; border: 1px solid #c9ced8;
  background: #fafbfc; min-height: 2.5em; white-space: pre-wrap;
  font-family: ui-monospace, monospace; font-size: .9em; }
.legend span { display: inline-block; padding: .1em .5em; margin-right: .6em;
  border: 1px solid #c9ced8; }
ul.failures li { color: #b3141b; }
code { font-family: ui-monospace, monospace; }
"""

_SCRIPT = """
document.querySelectorAll('#matrix td.cell').forEach(function (td) {
  td.addEventListener('click', function () {
    document.querySelectorAll('#matrix td.selected').forEach(function (x) {
      x.classList.remove('selected');
    });
    td.classList.add('selected');
    document.getElementById('detail').textContent = td.dataset.detail;
  });
});
"""


def _facts_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(
        f"<tr><th>{escape(key)}</th><td>{escape(value)}</td></tr>"
        for key, value in rows
    )
    return f'<table class="facts">{body}</table>'


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def _bottles_table(bottles: Sequence[Mapping[str, Any]]) -> str:
    if not bottles:
        return "<p>No bottle facts were recorded.</p>"
    head = "".join(
        f"<th>{name}</th>"
        for name in ("bottle", "alias", "allowlist", "backend version", "facts")
    )
    rows = []
    for bottle in bottles:
        facts = "; ".join(
            f"{key} = {_value_text(value)}"
            for key, value in sorted(bottle.get("facts", {}).items())
        )
        cells = [
            str(bottle["name"]),
            str(bottle.get("alias") or "-"),
            ", ".join(bottle.get("allowlist") or []) or "-",
            str(bottle.get("backend_version") or "-"),
            facts or "-",
        ]
        rows.append("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>")
    return (
        f'<table class="facts bottles"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _cell_detail(cell: Mapping[str, Any]) -> str:
    target = cell["target"]
    lines = [
        f"{cell['source']} -> {target['key']} ({target['kind']}, "
        f"{target['proto']} {target['address']})",
        f"expected {cell['expected']}, actual {cell['actual']}: "
        + ("as expected" if cell["passed"] else "MISMATCH"),
        f"errno {cell['errno']}, latency {cell['latency_ms']} ms",
        f"nonce echoed to the prober: {cell['echoed']}; "
        f"listener logged the nonce: {cell['listener_saw_nonce']}",
        f"evidence: {cell['evidence']}",
    ]
    return "\n".join(lines)


def _cell_td(cell: Mapping[str, Any] | None) -> str:
    if cell is None:
        return '<td class="absent">-</td>'
    expect = "conn" if cell["expected"] == "CONNECTED" else "blk"
    state = "pass" if cell["passed"] else "fail"
    expected_text = "must connect" if expect == "conn" else "must block"
    mark = "" if cell["passed"] else ' <span class="mark">&#x2717; mismatch</span>'
    detail = _cell_detail(cell)
    return (
        f'<td class="cell {state} expect-{expect}" '
        f'data-source="{escape(cell["source"])}" '
        f'data-column="{escape(cell["target"]["key"])}" '
        f'data-passed="{str(cell["passed"]).lower()}" '
        f'title="{escape(detail)}" data-detail="{escape(detail)}">'
        f'<span class="exp">{expected_text}</span>'
        f'<span class="act">{escape(cell["actual"])}{mark}</span></td>'
    )


def _grid(report: Mapping[str, Any]) -> str:
    """The matrix as a table: bottles down the side and targets across, or,
    when there are more targets than bottles (the usual case), the other way
    round, so that the page stays about as wide as the screen."""
    cells = report["cells"]
    bottles = list(report.get("rows") or dict.fromkeys(c["source"] for c in cells))
    targets = list(
        report.get("columns") or dict.fromkeys(c["target"]["key"] for c in cells)
    )
    by_key = {(c["source"], c["target"]["key"]): c for c in cells}
    sideways = len(targets) > len(bottles)
    rows, columns = (targets, bottles) if sideways else (bottles, targets)
    corner = "target \\ bottle" if sideways else "bottle \\ target"

    def cell_at(row: str, column: str) -> Mapping[str, Any] | None:
        return by_key.get((column, row) if sideways else (row, column))

    head = "".join(f'<th scope="col">{escape(column)}</th>' for column in columns)
    body = []
    for row in rows:
        tds = "".join(_cell_td(cell_at(row, column)) for column in columns)
        body.append(f'<tr><th scope="row">{escape(row)}</th>{tds}</tr>')
    return (
        f'<table id="matrix"><thead><tr><th class="corner">{corner}</th>'
        f"{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def render_html(report: Mapping[str, Any]) -> str:
    """The page for ``report`` (a dict as :func:`bottle.report.build_report`)."""
    backend = report["backend"]
    host = report["host"]
    summary = report["summary"]
    verdict = summary["verdict"]
    title = f"bot-bottle isolation report: {backend['name']}, {verdict}"
    facts = _facts_table(
        [
            (
                "verdict",
                f"{verdict}: {summary['passed']} of {summary['cells']} "
                "cells as expected",
            ),
            ("backend", str(backend["name"])),
            ("backend version", str(backend.get("version") or "unknown")),
            ("run", str(report.get("run") or "-")),
            ("generated at", str(report["generated_at"])),
            ("host", f"{host['platform']} ({host['machine']})"),
            ("python", str(host["python"])),
        ]
    )
    bottles = _bottles_table(report.get("bottles", []))
    bugs = "".join(
        f"<li><code>{escape(item['bug']['id'])}</code>: "
        f"<strong>{escape(item['verdict'])}</strong>: {escape(item['detail'])}. "
        f"{escape(item['bug']['title'])} (fixed in {escape(item['bug']['fixed_in'])}"
        f"; {escape(item['bug']['source'])})</li>"
        for item in report.get("known_bugs", [])
    )
    failures = [cell for cell in report["cells"] if not cell["passed"]]
    failure_list = "".join(
        f"<li>{escape(cell['source'])} -&gt; {escape(cell['target']['key'])} "
        f"({escape(cell['target']['address'])}): expected "
        f"{escape(cell['expected'])}, got {escape(cell['actual'])}: "
        f"{escape(cell['reason'])}</li>"
        for cell in failures
    )
    sections = [
        f'<h1 class="verdict-{escape(verdict)}">{escape(title)}</h1>',
        facts,
        "<h2>Isolation matrix</h2>",
        '<p class="legend"><span style="background:#b6e3c1">connected, as '
        'expected</span><span style="background:#dfe9f7">blocked, as '
        'expected</span><span style="background:#f6b2b2">mismatch</span> '
        "Hover a cell for its evidence, or click it.</p>",
        _grid(report),
        '<div id="detail">Click a cell to see its evidence.</div>',
    ]
    if failures:
        sections += ["<h2>Mismatches</h2>", f'<ul class="failures">{failure_list}</ul>']
    sections += [
        "<h2>Known upstream bugs of this version</h2>",
        f"<ul>{bugs}</ul>" if bugs else "<p>None known.</p>",
        "<h2>Bottles</h2>",
        bottles,
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body>{''.join(sections)}<script>{_SCRIPT}</script></body></html>\n"
    )


def write_html(report: Mapping[str, Any], path: Path) -> None:
    """Write the page for ``report`` to ``path``, making the folder if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(report), encoding="utf-8")


__all__ = ["render_html", "write_html"]
