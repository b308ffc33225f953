"""The HTML report of a real run, rendered by a real browser (Debian's chromium).

Chromium runs headless, only on ``file://`` pages, with networking features
that would reach out (background networking, component updates, sync, QUIC)
turned off.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bottle.html_report import write_html
from tests.conftest import needs_root_netns
from tests.test_report import leak, run_suite_subprocess

CHROMIUM = Path("/usr/bin/chromium")

needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
)
pytestmark = [needs_chromium, needs_root_netns]


def chromium(page: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="bottle-chromium-") as profile:
        return subprocess.run(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--window-size=1280,900",
                *mode,
                page.resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )


@pytest.fixture(scope="module")
def real_report(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, Any]]:
    """The HTML page and JSON report of one real netns run."""
    folder = tmp_path_factory.mktemp("html-run")
    completed = run_suite_subprocess(
        folder, "--bottle-report=report.json", "--bottle-html=report.html"
    )
    assert completed.returncode == 0, completed.stdout[-3000:]
    report: dict[str, Any] = json.loads((folder / "report.json").read_text())
    return folder / "report.html", report


def test_the_page_is_self_contained(real_report: tuple[Path, dict[str, Any]]) -> None:
    page = real_report[0].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page
    assert "url(" not in page


def test_chromium_renders_every_cell_of_the_grid(
    real_report: tuple[Path, dict[str, Any]],
) -> None:
    page, report = real_report
    dom = chromium(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]

    rendered = set(
        re.findall(
            r'<td class="cell [^"]*" data-source="([^"]+)" data-column="([^"]+)"',
            dom.stdout,
        )
    )
    expected = {(c["source"], c["target"]["key"]) for c in report["cells"]}
    assert rendered == expected
    assert 'id="matrix"' in dom.stdout
    assert report["backend"]["version"] in dom.stdout  # the run's facts at the top
    assert 'class="cell fail' not in dom.stdout


def test_the_grid_turns_sideways_when_targets_outnumber_bottles(
    real_report: tuple[Path, dict[str, Any]],
) -> None:
    page, report = real_report
    html = page.read_text()
    bottles = list(dict.fromkeys(cell["source"] for cell in report["cells"]))
    first_row = re.search(r'<tbody><tr><th scope="row">([^<]+)</th>', html)

    assert first_row is not None
    assert first_row.group(1) == report["cells"][0]["target"]["key"]
    header = re.findall(r'<th scope="col">([^<]+)</th>', html)
    assert header == bottles


def test_chromium_shows_a_mismatch_that_stands_out(
    real_report: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    page = tmp_path / "leak.html"
    write_html(leak(real_report[1]), page)

    dom = chromium(page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    failing = re.findall(
        r'<td class="cell fail[^"]*" data-source="a" data-column="([^"]+)"', dom.stdout
    )
    assert failing == ["sentinel:127.0.0.1"]
    assert "LEAK: the target" in dom.stdout  # the evidence, in the cell's title

    shot = tmp_path / "leak.png"
    screenshot = chromium(page, f"--screenshot={shot}")
    assert screenshot.returncode == 0, screenshot.stderr[-2000:]
    colours = distinct_colours(shot)
    assert (246, 178, 178) in colours  # the mismatch's red background


def test_screenshot_is_not_blank(
    real_report: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    shot = tmp_path / "page.png"
    result = chromium(real_report[0], f"--screenshot={shot}")
    assert result.returncode == 0, result.stderr[-2000:]

    colours = distinct_colours(shot)
    assert len(colours) > 50, f"only {len(colours)} colours: a blank page?"
    assert (182, 227, 193) in colours  # a must-connect cell's green
    assert (223, 233, 247) in colours  # a must-block cell's blue


def distinct_colours(png: Path) -> set[tuple[int, int, int]]:
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1280, 900)
        rgb = image.convert("RGB")
        counted = rgb.getcolors(maxcolors=1 << 24) or []
        return {
            (int(c[0]), int(c[1]), int(c[2]))
            for _, c in counted
            if isinstance(c, tuple)
        }
