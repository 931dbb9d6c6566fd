"""The manifest tools on a DST with a synthetic manifest of 1,000,000 rows.

What is measured is each command's process peak (ru_maxrss of the child), not its time: the
tools must answer in bounded memory however many rows there are. The report must stay under
a fixed size and still open in Chromium with its images loaded and no console errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.bench_manifest import PEAK_WRAPPER
from jobs.synthetic_manifest import write_synthetic_dst
from tests.integration.browser import SCROLL_UNTIL_IMAGES_SETTLE, DevTools, Page

ROWS = 1_000_000
# Process peak of `manifest summary` / `show`: Python, pyarrow and DuckDB loaded (~150 MB)
# plus DuckDB's 256 MB working-memory limit, with room to spare. Reading the whole manifest
# into one Arrow table, as the tools did before, peaks well above it at this size.
PEAK_BOUND_BYTES = 700 * 2**20
REPORT_BOUND_BYTES = 3 * 10**6  # the report's fixed size bound (see pipeline/report.py)


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("scale") / "dst"
    counts = write_synthetic_dst(root, rows=ROWS)
    return root, counts


def _peak(*argv: str) -> tuple[int, str, str, int]:
    """(exit code, stdout, stderr, peak resident bytes) of `chromascan ARGV` as a process.

    The peak is VmHWM read by the process itself at exit: ru_maxrss of a child would also
    count the pages of this (large) test process it was forked from.
    """
    process = subprocess.run(
        [sys.executable, "-c", PEAK_WRAPPER, *argv],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    err, _, peak = process.stderr.rpartition("VmHWM:")
    return process.returncode, process.stdout, err, int(peak.split()[0]) * 1024


def test_summary_and_show_in_bounded_memory(million: tuple[Path, dict[str, int]]) -> None:
    root, counts = million
    code, out, err, peak = _peak("manifest", "summary", str(root), "--json")
    assert (code, err) == (0, "")
    figures = json.loads(out)
    assert figures["rows"] == ROWS
    assert figures["statuses"] == {k: counts[k] for k in ("ok", "failed", "skipped")}
    assert figures["sources"] == ROWS
    assert figures["outputs"] == counts["ok"]
    assert figures["reviews"] == {"approved": 0, "rejected": 0, "pending": counts["ok"]}
    assert len(figures["runs"]) == 10
    assert peak < PEAK_BOUND_BYTES, f"summary peaked at {peak / 2**20:.0f} MiB"

    code, out, err, peak = _peak(
        "manifest", "show", str(root), "--status", "failed", "--limit", "20", "--format", "json"
    )
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert len(rows) == 20
    assert {row["status"] for row in rows} == {"failed"}
    assert [row["source_uri"] for row in rows] == sorted(row["source_uri"] for row in rows)
    assert peak < PEAK_BOUND_BYTES, f"show peaked at {peak / 2**20:.0f} MiB"

    # A later page of a filtered listing, deep in the archive.
    code, out, _, peak = _peak(
        "manifest", "show", str(root), "--error-type", "DecodeTimeout", "--limit", "5",
        "--page", "1000", "--format", "json",
    )  # fmt: skip
    assert code == 0
    assert [row["error_type"] for row in json.loads(out)] == ["DecodeTimeout"] * 5
    assert peak < PEAK_BOUND_BYTES


_INSPECT = (
    "(async () => {\n"
    + SCROLL_UNTIL_IMAGES_SETTLE
    + """  return {
    images: images.length,
    loaded: images.filter((image) => image.complete && image.naturalWidth > 0).length,
    kinds: document.querySelectorAll("#failed tbody tr").length,
    cards: document.querySelectorAll(".grid > .card").length,
    text: document.body.textContent,
  };
})()"""
)


def test_report_stays_small_and_opens(
    million: tuple[Path, dict[str, int]], chromium: DevTools, tmp_path: Path
) -> None:
    root, counts = million
    page = tmp_path / "report.html"
    code, out, err, peak = _peak("manifest", "report", str(root), "--out", str(page))
    assert (code, err) == (0, ""), err
    assert out.startswith(f"wrote {page}: {ROWS} sources ({counts['failed']} failing)")
    size = page.stat().st_size
    assert size < REPORT_BOUND_BYTES, f"{size} bytes"
    assert peak < PEAK_BOUND_BYTES

    browser_page = Page(chromium, page.as_uri())
    seen = browser_page.evaluate(_INSPECT)
    assert seen["images"] > 0
    assert seen["loaded"] == seen["images"]
    assert seen["cards"] <= 4 * 24 + 20 * 10
    # Each failure kind is one row of the kinds table, plus its capped list of inputs; the
    # page says what it sampled and how to see the rest.
    assert "chromascan review" in seen["text"]
    assert "samples of at most 24" in seen["text"]
    assert browser_page.problems() == []
    assert browser_page.requested_schemes() <= {"file", "data"}
