"""chromascan manifest tools on a real colorize run: verify (local and S3), bag, report in Chromium.

One module-scoped colorize run (real Ray, the bad-input corpus plus file names with HTML
and percent characters) feeds every test; each test works on its own copy when it tampers.
The report is opened in Debian's headless Chromium, driven over the DevTools protocol on a
pipe (no ports), and must load every thumbnail with no console error and no network request.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bagit
import pytest
import s3fs
import torch

from jobs.cli import main
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.colorize import ColorizeConfig, RunSummary, run_colorize
from pipeline.model_store import save_model
from tests.integration.browser import SCROLL_UNTIL_IMAGES_SETTLE, DevTools, Page
from tests.integration.corpus import Entry, make_corpus

pytestmark = pytest.mark.usefixtures("ray_local")

# File names are user data: these must come through verify, bag and report intact.
ODD_NAMES = ("odd/<b>\"quoted\" & 'apostrophe'.jpg", "odd/50% grey café.jpg")


@dataclass(frozen=True)
class Coloured:
    src: Path
    dst: Path
    entries: list[Entry]
    summary: RunSummary

    @property
    def ok(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.ok]

    @property
    def failed(self) -> list[Entry]:
        return [entry for entry in self.entries if not entry.ok]


@pytest.fixture(scope="module")
def coloured(tmp_path_factory: pytest.TempPathFactory) -> Coloured:
    src = tmp_path_factory.mktemp("archive")
    entries = make_corpus(src, photos=1)
    (src / "odd").mkdir()
    for name in ODD_NAMES:
        shutil.copyfile(src / "good/astronaut.jpg", src / name)
        entries.append(Entry(name, ok=True))
    torch.manual_seed(3)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    model = tmp_path_factory.mktemp("model")
    save_model(generator, str(model), name="tools-test")
    dst = tmp_path_factory.mktemp("coloured") / "dst"
    summary = run_colorize(
        ColorizeConfig(src=str(src), dst=str(dst), model=str(model), batch_size=8),
        software="chromascan test",
    )
    assert (summary.ok, summary.failed) == (
        sum(e.ok for e in entries),
        sum(not e.ok for e in entries),
    )
    return Coloured(src, dst, entries, summary)


def _output(entry: Entry) -> str:
    return entry.relative_path.rsplit(".", 1)[0] + ".png"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _findings(out: str) -> list[tuple[str, str]]:
    """(kind, path) of each finding line; paths here hold no double spaces."""
    lines = out.splitlines()[:-1]  # the last line is the totals
    return [(line[:10].strip(), line[11:].split("  ", 1)[0]) for line in lines]


# --- verify --------------------------------------------------------------------------------


def test_verify_local_clean_then_modified_deleted_extra(
    coloured: Coloured, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst = tmp_path / "dst"
    shutil.copytree(coloured.dst, dst)
    # Copied: output_uri names the original folder; verify finds the files all the same.
    code, out, err = _run(capsys, "manifest", "verify", str(dst))
    assert (code, err) == (0, ""), out
    count = len(coloured.ok)
    assert out.startswith(f"{count} outputs in the manifest: {count} verified, 0 changed, ")

    modified, deleted = (dst / "images" / _output(coloured.ok[i]) for i in (0, 1))
    modified.write_bytes(modified.read_bytes()[:-1] + b"\x00")  # same size, other bytes
    deleted.unlink()
    (dst / "images" / ODD_NAMES[0]).with_name("stray.png").write_bytes(b"x")
    code, out, err = _run(capsys, "manifest", "verify", str(dst))
    assert code == 3
    assert err == f"chromascan: verify found 3 problems under {dst}/images\n"
    assert sorted(_findings(out)) == sorted([
        ("changed", _output(coloured.ok[0])),
        ("missing", _output(coloured.ok[1])),
        ("untracked", "odd/stray.png"),
    ])  # fmt: skip


def test_verify_and_bag_on_s3(
    coloured: Coloured,
    s3_server: Any,
    s3_bucket: str,
    s3_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options())
    fs.put(f"{coloured.dst}/", f"{s3_bucket}/dst/", recursive=True)
    dst = f"s3://{s3_bucket}/dst"
    code, out, err = _run(capsys, "manifest", "verify", dst)
    assert (code, err) == (0, ""), out
    # The report reads outputs from the bucket (and scans from where the manifest says).
    code, out, err = _run(capsys, "manifest", "report", dst, "--out", str(tmp_path / "r.html"))
    assert (code, err) == (0, "")
    # Four samples of at most 24 outputs, scan and output each.
    assert f" {8 * min(len(coloured.ok), 24)} thumbnails, " in out

    # A bag from the bucket into the bucket (streamed, hashed while copied) validates.
    code, out, err = _run(capsys, "manifest", "export-bag", dst, f"s3://{s3_bucket}/bag")
    assert (code, err) == (0, "")
    fs.get(f"{s3_bucket}/bag/", str(tmp_path / "bag"), recursive=True)
    bagit.Bag(str(tmp_path / "bag")).validate()

    first, second = (f"{s3_bucket}/dst/images/{_output(coloured.ok[i])}" for i in (0, 1))
    fs.pipe_file(first, fs.cat_file(first) + b"\x00")
    fs.rm(second)
    fs.pipe_file(f"{s3_bucket}/dst/images/good/stray.png", b"x")
    # Hashed in Ray Data tasks, two at a time, reading the bucket where they run.
    code, out, err = _run(capsys, "manifest", "verify", dst, "--workers", "2")
    assert code == 3
    assert err == f"chromascan: verify found 3 problems under {dst}/images\n"
    assert sorted(_findings(out)) == sorted([
        ("changed", _output(coloured.ok[0])),
        ("missing", _output(coloured.ok[1])),
        ("untracked", "good/stray.png"),
    ])  # fmt: skip
    assert s3_server.secret_key not in out + err


# --- export-bag ----------------------------------------------------------------------------


def test_export_bag_validates_with_bagit(
    coloured: Coloured, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bag_path = tmp_path / "bag"
    code, out, err = _run(capsys, "manifest", "export-bag", str(coloured.dst), str(bag_path),
                          "--info", "Source-Organization=Test Archive")  # fmt: skip
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith(f"model {coloured.summary.model_id} sha256:")
    bag = bagit.Bag(str(bag_path))
    bag.validate()
    assert sorted(bag.payload_files()) == sorted(f"data/{_output(e)}" for e in coloured.ok)
    for entry in coloured.ok:
        copied = (bag_path / "data" / _output(entry)).read_bytes()
        assert copied == (coloured.dst / "images" / _output(entry)).read_bytes()
    assert bag.info["Chromascan-Source"] == str(coloured.src)
    assert bag.info["Source-Organization"] == "Test Archive"
    assert (
        bag.info["Chromascan-Runs"] == f"1: {coloured.summary.run_id} to {coloured.summary.run_id}"
    )
    run = json.loads((bag_path / f"chromascan/runs/{coloured.summary.run_id}.json").read_text())
    assert run["run"]["ok"] == len(coloured.ok)


# --- summary and show ----------------------------------------------------------------------


def test_summary_and_show_on_a_real_run(
    coloured: Coloured, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "manifest", "summary", str(coloured.dst))
    assert code == 0
    ok, failed = len(coloured.ok), len(coloured.failed)
    assert f"run {coloured.summary.run_id}  " in out
    assert f"  {ok + failed} rows: {ok} ok, {failed} failed; " in out
    assert f"  models: {ok + failed} {coloured.summary.model_id}" in out
    assert "  failed: 2 × UnidentifiedImageError" in out

    code, out, _ = _run(capsys, "manifest", "show", str(coloured.dst), "--status", "failed",
                        "--format", "json")  # fmt: skip
    rows = json.loads(out)
    assert sorted((row["relative_path"], row["error_type"]) for row in rows) == sorted(
        (entry.relative_path, entry.error_type) for entry in coloured.failed
    )


# --- report in a real browser --------------------------------------------------------------

# Scroll until the lazy thumbnails have loaded (as a reader would), then report what loaded.
_INSPECT = (
    """
(async () => {
"""
    + SCROLL_UNTIL_IMAGES_SETTLE
    + """  const cards = Array.from(document.querySelectorAll(".grid > .card"));
  return {
    images: images.length,
    lazy: images.filter((image) => image.loading === "lazy").length,
    loaded: images.filter((image) => image.complete && image.naturalWidth > 0).length,
    notLoaded: images.filter((image) => !(image.complete && image.naturalWidth > 0))
      .map((image) => image.alt),
    shown: images.filter((image) => image.getBoundingClientRect().width > 0).length,
    names: cards.map((card) => card.querySelector("h3").textContent),
    statuses: cards.map((card) => card.dataset.status),
    failedRows: document.querySelectorAll("#failed tbody tr").length,
    placeholders: document.querySelectorAll(".grid .noimg").length,
    scripts: document.scripts.length,
  };
})()
"""
)

_FILTER = """
(() => {
  const visible = () => Array.from(document.querySelectorAll(".grid > .card"))
    .filter((card) => !card.hidden && card.getBoundingClientRect().height > 0).length;
  document.querySelector("button[data-filter='failed']").click();
  const failed = visible();
  document.querySelector("button[data-filter='all']").click();
  const search = document.getElementById("q");
  search.value = "QUOTED";
  search.dispatchEvent(new Event("input"));
  const searched = visible();
  return {failed, searched, counter: document.getElementById("shown").textContent};
})()
"""


def test_report_in_headless_chromium(
    coloured: Coloured, chromium: DevTools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "report.html"
    code, out, err = _run(capsys, "manifest", "report", str(coloured.dst), "--out", str(page))
    assert (code, err) == (0, "")
    assert out.startswith(f"wrote {page}: {len(coloured.entries)} sources ")
    ok, failed = len(coloured.ok), len(coloured.failed)

    browser_page = Page(chromium, page.as_uri())
    evaluate = browser_page.evaluate

    seen = evaluate(_INSPECT)
    browser_page.screenshot(tmp_path / "report.png")

    # Cards for sampled outputs and every listed failure, names shown as text exactly as they
    # are on disk.
    names = {entry.relative_path for entry in coloured.entries}
    assert set(seen["names"]) <= names
    assert {entry.relative_path for entry in coloured.failed} <= set(seen["names"])
    assert seen["statuses"].count("failed") == failed
    kinds = len({entry.error_type for entry in coloured.failed})
    assert seen["failedRows"] == kinds + failed  # the kinds table, then the listed inputs
    # Every ok card shows its scan and its output; no failed scan of the corpus decodes, so
    # each failed card holds a placeholder instead of a broken image.
    assert seen["images"] == 4 * 2 * min(ok, 24)
    assert seen["placeholders"] == failed
    assert seen["lazy"] == seen["images"]
    assert seen["loaded"] == seen["images"], seen["notLoaded"]
    assert seen["shown"] == seen["images"]
    assert seen["scripts"] == 1

    filtered = evaluate(_FILTER)
    assert filtered["failed"] == failed
    assert 0 < filtered["searched"] <= 4  # only the "quoted" file name, once per sample at most
    assert filtered["counter"].endswith(f" of {4 * min(ok, 24) + failed} shown")

    # No errors, and nothing fetched from anywhere but the page itself and its data: URIs.
    assert browser_page.problems() == []
    assert browser_page.requested_schemes() <= {"file", "data"}
