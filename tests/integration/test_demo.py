"""The README's main command, at its --quick size: the whole path, twice, then in a browser."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from jobs.sample_archive import build_sample_archive
from pipeline.manifest import read_manifest
from tests.integration.browser import IMAGES_LOADED, DevTools, Page

pytestmark = pytest.mark.usefixtures("ray_local")


def test_quick_demo_runs_end_to_end_and_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], chromium: DevTools
) -> None:
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    first = capsys.readouterr().out
    # It shows the real commands it runs, and each did its work.
    commands = ("train", "nightly", "manifest summary", "manifest verify", "manifest report")
    for command in commands:
        assert f"$ chromascan {command} " in first
    assert "5 ok, 1 failed, 0 already done" in first  # the corrupt file fails, the rest colour
    assert "5 verified, 0 changed, 0 missing" in first
    assert "against the held-out colour originals" in first
    scans = build_sample_archive(output / "samples", quick=True)
    kinds = {scan.kind for scan in scans}
    assert {"16-bit greyscale TIFF", "sepia-toned print", "EXIF-rotated JPEG", "large scan",
            "corrupt file", "8-bit greyscale JPEG"} <= kinds  # fmt: skip
    ledger = read_manifest(str(output / "colour")).to_pandas()
    assert sorted(ledger.status) == ["failed"] + ["ok"] * 5

    # Again: nothing finished is redone, and it says so.
    assert main(["demo", "--quick", "--output", str(output)]) == 0
    second = capsys.readouterr().out
    assert "is already trained with these settings: not training again" in second
    assert "$ chromascan train " not in second
    assert "0 ok, 1 failed, 5 already done" in second  # only the corrupt file is retried

    # The report opens in a real browser with every image shown.
    page = Page(chromium, (output / "report.html").as_uri())
    seen = page.evaluate(IMAGES_LOADED)
    # Four sample galleries (least and most colourful, newest, random), each holding all five
    # coloured scans of so small an archive, before and after.
    assert seen["images"] == 4 * 2 * 5
    assert seen["loaded"] == seen["images"], seen["notLoaded"]
    assert page.problems() == []
    shot = np.asarray(
        Image.open(io.BytesIO(page.screenshot(tmp_path / "report.png"))).convert("RGB")
    )
    assert shot.shape[0] > 100
    assert shot.shape[1] > 100
    assert shot.std() > 10  # a page with content, not a blank screen
