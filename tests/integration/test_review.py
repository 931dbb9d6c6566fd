"""``chromascan review`` served for real and driven in headless Chromium.

The app runs as the CLI runs it (a subprocess, uvicorn on a free loopback port); a curator
browses, filters, opens a scan, approves one and rejects one with a reason. The decisions must
be in DST/review/, survive a restart, and decide what ``export-bag --approved-only`` bags.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import bagit
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.synthetic_manifest import write_synthetic_dst
from tests.integration.browser import SCROLL_UNTIL_IMAGES_SETTLE, DevTools, Page

TOKEN = "correct-horse-battery-staple"


@pytest.fixture
def dst(tmp_path: Path) -> Path:
    root = tmp_path / "dst"
    # 40 rows over 2 runs; every ok row gets a real scan and output.
    write_synthetic_dst(root, rows=40, runs=2, with_files=120)
    return root


@contextmanager
def serve(dst: Path, *extra: str) -> Iterator[str]:
    """The review app as `chromascan review` starts it; yields its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs", "review", str(dst), "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert "serving on http://" in line, (line, process.stderr.read())  # type: ignore[union-attr]
        url = line.rsplit(" ", 1)[-1].strip()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _loads(page: Page) -> int:
    return sum(1 for e in page.browser.events if e.get("method") == "Page.loadEventFired")


def _then_wait(page: Page, script: str, *, timeout_s: float = 60.0) -> None:
    """Run ``script`` (which navigates) and wait until the next page has loaded."""
    before = _loads(page)
    page.evaluate(f"setTimeout(() => {{ {script} }}, 0); true")
    deadline = time.monotonic() + timeout_s
    while _loads(page) <= before:
        page.browser.events.append(page.browser._read(deadline))


_IMAGES = (
    "(async () => {\n"
    + SCROLL_UNTIL_IMAGES_SETTLE
    + "  return {images: images.length, loaded: images.filter((i) => i.complete && "
    "i.naturalWidth > 0).length};\n})()"
)


def test_curator_reviews_in_chromium(
    dst: Path, chromium: DevTools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "thumbs"
    with serve(dst, "--reviewer", "Ada Curator", "--cache", str(cache)) as url:
        page = Page(chromium, url)
        total = page.evaluate("document.getElementById('total').textContent")
        assert total.startswith("40 sources match")
        assert page.evaluate("document.querySelectorAll('.card').length") == 40
        images = page.evaluate(_IMAGES)
        assert images["images"] > 0
        # Thumbnails made on demand (the failed scans of this DST are not on storage: a tile
        # saying so stands in for each).
        assert images["loaded"] == images["images"]
        assert any(cache.rglob("*.jpg"))  # ... and cached

        # Filter: only ok sources, then one path.
        _then_wait(page, "document.getElementById('f-status').value = 'ok';"
                         "document.getElementById('filters').submit();")  # fmt: skip
        ok_cards = page.evaluate("document.querySelectorAll('.card').length")
        assert 0 < ok_cards < 40
        assert page.evaluate(
            "Array.from(document.querySelectorAll('.card .meta')).every("
            "(m, i) => i % 2 === 1 || m.textContent.startsWith('ok'))"
        )
        sources = page.evaluate(
            "Array.from(document.querySelectorAll('.card')).map((c) => c.dataset.source)"
        )
        first, second = sources[0], sources[1]
        name = first.rsplit("/", 1)[-1]
        _then_wait(page, f"document.getElementById('f-path').value = '*{name}';"
                         "document.getElementById('filters').submit();")  # fmt: skip
        assert page.evaluate("document.querySelectorAll('.card').length") == 1

        # Open it: scan and colourised copy side by side, at full resolution, with a zoom.
        _then_wait(page, "document.querySelector('.card a.open').click();")
        shown = page.evaluate(_IMAGES)
        assert shown == {"images": 2, "loaded": 2}
        sizes = page.evaluate(
            "(() => { const z = document.getElementById('zoom'); z.value = '2';"
            "z.dispatchEvent(new Event('input'));"
            "const i = document.getElementById('output-image');"
            "return [i.naturalWidth, i.getBoundingClientRect().width]; })()"
        )
        assert sizes == [32, 64]  # the full-resolution output, zoomed 200 %
        _then_wait(page, "document.getElementById('approve').click();")
        assert page.evaluate("document.getElementById('state').textContent") == "approved"

        # Reject another from the list, with a reason, as a selection.
        _then_wait(page, f"location.href = '/?status=ok&path=' + encodeURIComponent("
                         f"'*{second.rsplit('/', 1)[-1]}');")  # fmt: skip
        _then_wait(page, "document.querySelector('input[name=source]').checked = true;"
                         "document.getElementById('reason-selected').value = 'faces too red';"
                         "document.getElementById('reject-selected').click();")  # fmt: skip
        assert page.evaluate("document.querySelector('.card .state').textContent") == "rejected"
        assert "faces too red" in page.evaluate("document.querySelector('.card').textContent")
        assert page.problems() == []

    decisions = pq.read_table(dst / "review").to_pylist()
    assert sorted((d["source_uri"], d["decision"], d["reason"], d["reviewer"])
                  for d in decisions) == sorted([
        (first, "approved", None, "Ada Curator"),
        (second, "rejected", "faces too red", "Ada Curator"),
    ])  # fmt: skip

    # A restart reads the decisions back.
    with serve(dst, "--read-only") as url:
        page = Page(chromium, url + "?review=approved")
        assert page.evaluate(
            "Array.from(document.querySelectorAll('.card')).map((c) => c.dataset.source)"
        ) == [first]
        assert page.evaluate("document.querySelectorAll('#approve-selected').length") == 0
        refused = urllib.request.Request(url + "decide", data=b"decision=approved&source=x")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(refused, timeout=30)
        assert err.value.code == 403

    code = main(["manifest", "export-bag", str(dst), str(tmp_path / "bag"), "--approved-only",
                 "--engine", "threads"])  # fmt: skip
    assert code == 0
    bag = bagit.Bag(str(tmp_path / "bag"))
    bag.validate()
    relative = first.split("-scans/", 1)[1]
    assert sorted(bag.payload_files()) == [f"data/{relative}"]
    capsys.readouterr()


def test_exposed_app_requires_the_token(dst: Path) -> None:
    with serve(dst, "--read-only", "--host", "0.0.0.0", "--token", TOKEN) as url:
        local = url.replace("0.0.0.0", "127.0.0.1")
        for address in (local, local + "thumb?source=x&kind=scan", local + "?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(address, timeout=30)
            assert err.value.code == 401
        with urllib.request.urlopen(
            urllib.request.Request(local, headers={"Authorization": f"Bearer {TOKEN}"}),
            timeout=30,
        ) as answer:
            assert answer.status == 200
            assert "40 sources match" in answer.read().decode()
