"""One self-contained HTML page about a DST: runs, failures, and every image before and after.

The page must open anywhere, years later, without the archive: thumbnails of the scan and of
the output are embedded as data: URIs (small JPEGs), and the page loads nothing else. A
Content-Security-Policy with the hashes of its one stylesheet and one script enforces that,
and also means that if a file name ever slipped past the escaping it could not run code.
Every value that comes from the manifest or storage is HTML-escaped; file names are user data.

For archives of a few thousand images the cards lazy-load their thumbnails and a few lines of
inline JavaScript filter them by status and name; the HTML is streamed to the output file, so
memory holds a handful of images at a time, not the page.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.manifest_query import ManifestQuery
from pipeline.manifest_tools import (
    OUTPUT_PATH,
    STATUSES,
    ManifestSummary,
    RunStats,
    ordered_map,
    summarize_query,
)
from pipeline.provenance import redact_uri
from pipeline.schema import STATUS_FAILED, STATUS_OK
from pipeline.storage import StorageError, filesystem, join, read_bytes

DEFAULT_THUMB_SIZE = 160  # px, longer side: ~5 KB a JPEG, so 2,000 images ≈ 25 MB of page
JPEG_QUALITY = 80

# Hasler & Süsstrunk (2003), table 2: colourfulness M and how observers described it.
_COLOURFULNESS_WORDS = (
    (109, "extremely colourful"),
    (82, "highly colourful"),
    (59, "quite colourful"),
    (45, "averagely colourful"),
    (33, "moderately colourful"),
    (15, "slightly colourful"),
    (0, "not colourful"),
)


@dataclass(frozen=True)
class Thumbnail:
    data_uri: str
    width: int
    height: int


@dataclass(frozen=True)
class ReportResult:
    out: str
    sources: int  # in the manifest
    cards: int  # on the page (samples: at most 4 × SAMPLE_SIZE + the listed failures)
    failed: int
    thumbnails: int  # <img> elements on the page
    placeholders: int  # previews that could not be made (unreadable scan, missing output)
    octets: int
    elapsed_s: float


def thumbnail_jpeg(
    data: bytes, *, size: int = DEFAULT_THUMB_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[bytes, int, int]:
    """(JPEG bytes, width, height) at most ``size`` px on the longer side, orientation applied.

    Uses the pipeline's decoder, so 16-bit scans are scaled rather than clipped, CMYK and
    palette files look right and JPEGs decode at a reduced scale (fast for big scans).

    Raises:
        DecodeError: the bytes are not a decodable image.
    """
    decoded = decode_image(data, max_pixels=max_pixels, draft_size=size)
    pixels = decoded.pixels
    if pixels.dtype == np.uint16:
        pixels = (pixels >> 8).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue(), image.width, image.height


def make_thumbnail(
    data: bytes, *, size: int = DEFAULT_THUMB_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Thumbnail:
    """``thumbnail_jpeg`` as a data: URI, for a page that embeds its images.

    Raises:
        DecodeError: the bytes are not a decodable image.
    """
    jpeg, width, height = thumbnail_jpeg(data, size=size, max_pixels=max_pixels)
    encoded = base64.b64encode(jpeg).decode("ascii")
    return Thumbnail(f"data:image/jpeg;base64,{encoded}", width, height)


def colourfulness_words(value: float) -> str:
    return next(words for threshold, words in _COLOURFULNESS_WORDS if value >= threshold)


# --- Page parts --------------------------------------------------------------------------

_CSS = """
:root { --thumb: %(thumb)dpx; --bg: #f6f5f2; --fg: #1d1d1f; --muted: #6b6b70; --card: #fff;
  --line: #e3e1dc; --ok: #1f7a4d; --ok-bg: #e3f4ea; --bad: #b3261e; --bad-bg: #fbe9e7;
  --skip: #7a5b00; --skip-bg: #fdf3d6; --accent: #3a5ccc; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #161618; --fg: #ececef; --muted: #9d9da3; --card: #222226; --line: #36363b;
    --ok: #7bd3a0; --ok-bg: #1d3a2a; --bad: #ff9b92; --bad-bg: #44201d; --skip: #f0cf70;
    --skip-bg: #3d3416; --accent: #8fa8ff; }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header, main, footer { max-width: 1400px; margin: 0 auto; padding: 0 24px; }
header { padding-top: 28px; }
h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
h2 { margin: 36px 0 12px; font-size: 19px; }
h2 .count { color: var(--muted); font-weight: normal; }
code { font: 13px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.sub { margin: 0; color: var(--muted); overflow-wrap: anywhere; }
.stats { display: grid; grid-template-columns: repeat(auto-fit, minmax(130px, 1fr));
  gap: 12px; margin-top: 22px; }
.stat { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 12px 14px; }
.stat b { display: block; font-size: 24px; font-variant-numeric: tabular-nums; }
.stat span { color: var(--muted); font-size: 13px; }
.stat.ok b { color: var(--ok); } .stat.failed b { color: var(--bad); }
.scroll { overflow-x: auto; background: var(--card); border: 1px solid var(--line);
  border-radius: 10px; }
table { border-collapse: collapse; width: 100%%; font-size: 13.5px; }
th, td { text-align: left; padding: 7px 12px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
tr:last-child td { border-bottom: 0; }
td code { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.msg { overflow-wrap: anywhere; min-width: 20ch; }
td.path { overflow-wrap: anywhere; min-width: 16ch; }
a { color: var(--accent); }
.none { color: var(--muted); font-style: italic; }
.toolbar { position: sticky; top: 0; z-index: 1; display: flex; flex-wrap: wrap; gap: 8px;
  align-items: center; padding: 10px 0; background: var(--bg); }
.toolbar button { font: inherit; font-size: 13.5px; padding: 5px 12px; border-radius: 999px;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); cursor: pointer; }
.toolbar button[aria-pressed="true"] { background: var(--fg); color: var(--bg);
  border-color: var(--fg); }
.toolbar input { font: inherit; font-size: 13.5px; padding: 5px 12px; border-radius: 999px;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); min-width: 16em; }
#shown { color: var(--muted); font-size: 13px; margin-left: auto; }
.grid { display: grid; gap: 14px;
  grid-template-columns: repeat(auto-fill, minmax(calc(2 * var(--thumb) + 40px), 1fr)); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  overflow: hidden; display: flex; flex-direction: column; }
.card[hidden] { display: none; }
.card.failed { border-color: var(--bad); }
.card:target { outline: 3px solid var(--accent); }
.pair { display: flex; gap: 8px; padding: 10px 10px 0; justify-content: center; }
figure { margin: 0; text-align: center; }
.frame { width: var(--thumb); height: var(--thumb); display: flex; align-items: center;
  justify-content: center; background: var(--bg); border-radius: 6px; overflow: hidden; }
.frame img { max-width: 100%%; max-height: 100%%; width: auto; height: auto; display: block; }
.noimg { color: var(--muted); font-size: 12px; padding: 8px; text-align: center; }
figcaption { font-size: 12px; color: var(--muted); margin-top: 3px; }
.body { padding: 8px 12px 12px; }
.body h3 { font-size: 13.5px; margin: 0 0 6px; overflow-wrap: anywhere; font-weight: 600; }
.line { display: flex; align-items: center; gap: 8px; margin: 0 0 4px; font-size: 13px; }
.badge { font-size: 12px; font-weight: 600; padding: 1px 8px; border-radius: 999px; }
.badge.ok { color: var(--ok); background: var(--ok-bg); }
.badge.failed { color: var(--bad); background: var(--bad-bg); }
.badge.skipped { color: var(--skip); background: var(--skip-bg); }
meter { width: 70px; height: 10px; }
.meta { margin: 0; color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.error { margin: 6px 0 0; color: var(--bad); font-size: 12.5px; overflow-wrap: anywhere; }
#empty { color: var(--muted); }
footer { color: var(--muted); font-size: 12.5px; padding: 36px 24px 28px; }
"""

_JS = """
(() => {
  const cards = Array.from(document.querySelectorAll(".grid > .card"));
  const buttons = Array.from(document.querySelectorAll("button[data-filter]"));
  const search = document.getElementById("q");
  const shown = document.getElementById("shown");
  const empty = document.getElementById("empty");
  let status = "all";
  const press = (chosen) => {
    for (const button of buttons) {
      button.setAttribute("aria-pressed", String(button.dataset.filter === chosen));
    }
  };
  const apply = () => {
    const query = search.value.trim().toLowerCase();
    let count = 0;
    for (const card of cards) {
      const visible = (status === "all" || card.dataset.status === status) &&
        (query === "" || card.dataset.name.includes(query));
      card.hidden = !visible;
      if (visible) count += 1;
    }
    shown.textContent = `${count} of ${cards.length} shown`;
    empty.hidden = count > 0;
  };
  for (const button of buttons) {
    button.addEventListener("click", () => {
      status = button.dataset.filter;
      press(status);
      apply();
    });
  }
  search.addEventListener("input", apply);
  // A link from the failures table must reach its card even while a filter hides it.
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[href^='#s-']");
    if (link === null) return;
    status = "all";
    search.value = "";
    press(status);
    apply();
  });
  apply();
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _e(value: Any) -> str:
    """Escape anything for HTML text and double-quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def _number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return value.replace("T", " ").replace("+00:00", " UTC")


def _stat(value: int | str, label: str, kind: str = "") -> str:
    return f'<div class="stat {kind}"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def _runs_table(runs: list[RunStats]) -> Iterator[str]:
    yield (
        '<div class="scroll"><table><thead><tr><th>run</th><th>started</th><th>finished</th>'
        "<th>model</th><th>ok</th><th>failed</th><th>skipped</th><th>elapsed</th>"
        "<th>images/s</th><th>errors</th></tr></thead><tbody>"
    )
    for run in runs:
        errors = ", ".join(f"{count} × {name}" for name, count in run.error_types.items())
        elapsed = "–" if run.elapsed_s is None else f"{run.elapsed_s:,.1f} s"
        timing = "" if run.timing_from == "run summary" else " (from row times)"
        yield (
            f"<tr><td><code>{_e(run.run_id)}</code></td><td>{_e(_when(run.started_at))}</td>"
            f"<td>{_e(_when(run.finished_at))}</td>"
            f"<td>{'<br>'.join(_e(m) for m in run.models) or '–'}</td>"
            f'<td class="num">{run.statuses.get(STATUS_OK, 0)}</td>'
            f'<td class="num">{run.statuses.get(STATUS_FAILED, 0)}</td>'
            f'<td class="num">{run.statuses.get("skipped", 0)}</td>'
            f'<td class="num">{_e(elapsed)}</td>'
            f'<td class="num">{_number(run.images_per_second, 2)}{_e(timing)}</td>'
            f'<td class="msg">{_e(errors) or "–"}</td></tr>'
        )
    yield "</tbody></table></div>"


def _failed_table(failed: list[dict[str, Any]]) -> Iterator[str]:
    if not failed:
        yield '<p class="none">No input is failing: every source\'s latest attempt succeeded.</p>'
        return
    yield (
        '<div class="scroll"><table><thead><tr><th>source</th><th>error</th><th>message</th>'
        "<th>run</th><th>when</th></tr></thead><tbody>"
    )
    for row in failed:
        yield (
            f'<tr><td class="path"><a href="#{_e(row["card_id"])}">{_e(row["name"])}</a></td>'
            f"<td><code>{_e(row['error_type'])}</code></td>"
            f'<td class="msg">{_e(row["error_message"])}</td>'
            f"<td><code>{_e(row['run_id'])}</code></td><td>{_e(_when(row['finished_at']))}</td>"
            "</tr>"
        )
    yield "</tbody></table></div>"


def _figure(preview: Thumbnail | str, caption: str, name: str) -> str:
    if isinstance(preview, Thumbnail):
        inner = (
            f'<img src="{_e(preview.data_uri)}" width="{preview.width}" '
            f'height="{preview.height}" alt="{_e(caption)}: {_e(name)}" loading="lazy" '
            'decoding="async">'
        )
    else:
        inner = f'<div class="noimg" role="img" aria-label="{_e(preview)}">{_e(preview)}</div>'
    return (
        f'<figure><div class="frame">{inner}</div><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _card(row: dict[str, Any], scan: Thumbnail | str, output: Thumbnail | str | None) -> str:
    name = row["name"]
    status = row["status"] or "unknown"
    parts = [
        f'<article class="card {_e(status)}" id="{_e(row["card_id"])}" '
        f'data-status="{_e(status)}" data-name="{_e(name.lower())}">',
        '<div class="pair">',
        _figure(scan, "scan", name),
    ]
    if output is not None:
        parts.append(_figure(output, "colourised", name))
    parts.append("</div>")
    parts.append(f'<div class="body"><h3 title="{_e(row["source_uri"])}">{_e(name)}</h3>')
    line = f'<p class="line"><span class="badge {_e(status)}">{_e(status)}</span>'
    if row["colorfulness"] is not None:
        value = float(row["colorfulness"])
        line += (
            f'<span title="Hasler–Süsstrunk colourfulness: {_e(colourfulness_words(value))}">'
            f"colourfulness <b>{value:.1f}</b></span>"
            f'<meter min="0" max="110" low="15" high="59" optimum="45" value="{value:.1f}">'
            f"{value:.1f}</meter>"
        )
    parts.append(line + "</p>")
    meta = []
    if row["source_width"] and row["source_height"]:
        meta.append(f"{row['source_width']} × {row['source_height']}")
    described = " ".join(
        str(x)
        for x in (
            row["source_format"],
            row["source_mode"],
            f"{row['source_bits']}-bit" if row["source_bits"] else None,
        )
        if x
    )
    if described:
        meta.append(described)
    if row["model_id"]:
        meta.append(f"model {row['model_id']}")
    meta.append(f"run {row['run_id']}")
    parts.append(f'<p class="meta">{" · ".join(_e(m) for m in meta)}</p>')
    if row["notes"]:
        parts.append(f'<p class="meta">{_e(row["notes"])}</p>')
    if row["error_type"] or row["error_message"]:
        parts.append(
            f'<p class="error"><b>{_e(row["error_type"])}</b> {_e(row["error_message"])}</p>'
        )
    parts.append("</div></article>")
    return "".join(parts)


# --- The report ---------------------------------------------------------------------------


@contextmanager
def _open_output(out: str) -> Iterator[BinaryIO]:
    """Write a local file via a temporary sibling renamed into place; URLs in one upload."""
    fs, path = filesystem(out)
    if "file" in fs.protocol or "local" in fs.protocol:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        temporary = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as handle:
                yield handle
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
    else:
        with fs.open(path, "wb") as handle:
            yield handle


def _display_name(row: Mapping[str, Any]) -> str:
    return str(row["relative_path"] or row["source_uri"])


# Caps that keep the page the same size at any archive size: at most
# 4 × SAMPLE_SIZE ok cards (two thumbnails each) and FAILURE_KINDS_LISTED × FAILURES_PER_KIND
# failed cards (one thumbnail each), whatever the manifest holds.
SAMPLE_SIZE = 24
FAILURE_KINDS_LISTED = 20
FAILURES_PER_KIND = 10
RUNS_LISTED = 100
SAMPLE_SEED = 20  # the random sample is the same on every rebuild of an unchanged DST

# (section id, heading, ORDER BY over the current outputs)
_SAMPLES = (
    ("least", "Least colourful", "colorfulness ASC NULLS LAST, output_path"),
    ("most", "Most colourful", "colorfulness DESC NULLS LAST, output_path"),
    ("newest", "Newest", "finished_at DESC NULLS LAST, output_path"),
    ("random", "Random sample", f"hash(output_path || '{SAMPLE_SEED}'), output_path"),
)


def write_report(
    dst: str,
    out: str,
    *,
    software: str,
    storage_options: Mapping[str, Any] | None = None,
    thumb_size: int = DEFAULT_THUMB_SIZE,
    workers: int | None = None,
    now: datetime | None = None,
) -> ReportResult:
    """Write the HTML report of DST to ``out`` (a path or URL), bounded at any archive size.

    Totals, runs, every failure kind with its count and a capped list, and capped samples of
    the outputs (least and most colourful, newest, seeded random); the page says what was
    sampled and which command shows the rest.

    Raises:
        StorageError: DST cannot be read or ``out`` cannot be written.
        ManifestToolError: DST holds no manifest.
    """
    started = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)
    summary, kinds, failed, samples = _gather(dst, storage_options)

    def previews(row: dict[str, Any]) -> tuple[dict[str, Any], Thumbnail | str, Any]:
        scan = _preview(row["source_uri"], "scan", thumb_size, storage_options)
        output = None
        if row["status"] == STATUS_OK and row[OUTPUT_PATH]:
            uri = join(dst, "images", row[OUTPUT_PATH])
            output = _preview(uri, "output", thumb_size, storage_options)
        elif row["status"] == STATUS_OK:
            output = "output not recorded"
        return row, scan, output

    thumbnails = placeholders = cards = 0
    css = _CSS % {"thumb": thumb_size}
    policy = (
        f"default-src 'none'; img-src data:; style-src {_csp_hash(css)}; "
        f"script-src {_csp_hash(_JS)}; base-uri 'none'; form-action 'none'"
    )
    shown = _e(summary.dst)
    try:
        with _open_output(out) as handle:
            written = 0

            def emit(text: str) -> None:
                nonlocal written
                data = text.encode("utf-8")
                written += len(data)
                handle.write(data)

            def gallery(rows: list[dict[str, Any]]) -> None:
                nonlocal thumbnails, placeholders, cards
                emit('<div class="grid">')
                for row, scan, output in ordered_map(previews, rows, workers=workers):
                    for preview in (scan, output):
                        if isinstance(preview, Thumbnail):
                            thumbnails += 1
                        elif preview is not None:
                            placeholders += 1
                    cards += 1
                    emit(_card(row, scan, output))
                emit("</div>")

            for text in _head(summary, policy, css, software, now or datetime.now(UTC)):
                emit(text)
            for text in _overview(summary, kinds, failed, shown):
                emit(text)
            for text in _toolbar(summary, sum(len(rows) for _, _, rows in samples) + len(failed)):
                emit(text)
            emit(_samples_note(summary.outputs, shown))
            for key, heading, rows in samples:
                emit(f'<section id="sample-{key}"><h3>{_e(heading)} <span class="count">'
                     f"({len(rows)}; {_e(_SAMPLE_ORDERS[key])})</span></h3>")  # fmt: skip
                gallery(rows)
                emit("</section>")
            if failed:
                emit('<section id="sample-failed"><h3>Failed inputs listed above</h3>')
                gallery(failed)
                emit("</section>")
            emit(
                '<p id="empty" hidden>No image matches the filter.</p></section></main>'
                "<footer>Thumbnails are embedded in this page; it needs neither the scans nor "
                f"the outputs to be viewed. Made by {_e(software)}.</footer>"
                f"<script>{_JS}</script></body></html>\n"
            )
    except OSError as err:
        if isinstance(err, StorageError):
            raise
        raise StorageError(
            f"{redact_uri(out)}: cannot write ({type(err).__name__}: {err})"
        ) from err
    return ReportResult(
        out=redact_uri(out),
        sources=summary.sources,
        cards=cards,
        failed=summary.latest_statuses.get(STATUS_FAILED, 0),
        thumbnails=thumbnails,
        placeholders=placeholders,
        octets=written,
        elapsed_s=time.perf_counter() - started,
    )


def _overview(
    summary: ManifestSummary,
    kinds: list[tuple[Any, ...]],
    failed: list[dict[str, Any]],
    shown: str,
) -> Iterator[str]:
    """The runs and failures sections, each capped and saying how to see the rest."""
    yield '<section id="runs"><h2>Runs</h2>'
    runs = summary.runs[-RUNS_LISTED:]
    if len(summary.runs) > len(runs):
        yield (f'<p class="sub">The latest {len(runs)} of {len(summary.runs)} runs; all '
               f"of them: <code>chromascan manifest summary {shown}</code></p>")  # fmt: skip
    yield from _runs_table(runs)
    failing = summary.latest_statuses.get(STATUS_FAILED, 0)
    yield (f'</section><section id="failed"><h2>Failed inputs '
           f'<span class="count">({failing})</span></h2>')  # fmt: skip
    yield from _kinds_table(kinds, shown)
    if failed:
        yield (f'<p class="sub">Up to {FAILURES_PER_KIND} inputs of each of the '
               f"{min(len(kinds), FAILURE_KINDS_LISTED)} most common kinds, by path; "
               f"all of a kind: <code>chromascan manifest show {shown} --latest "
               "--status failed --error-type KIND</code></p>")  # fmt: skip
    yield from _failed_table(failed)
    yield "</section>"


def _gather(
    dst: str, storage_options: Mapping[str, Any] | None
) -> tuple[ManifestSummary, list[tuple[Any, ...]], list[dict[str, Any]], list[Any]]:
    """What the page shows, in a few bounded queries: summary, kinds, failures, samples."""
    with ManifestQuery(dst, storage_options=storage_options) as query:
        summary = summarize_query(query)
        kinds = query.pairs(
            "SELECT error_type, count(*) AS n FROM latest WHERE status = ? "
            "GROUP BY ALL ORDER BY n DESC, error_type NULLS LAST",
            [STATUS_FAILED],
        )
        failed = _rows(query.table(
            "SELECT * FROM latest WHERE status = ? AND coalesce(error_type, '') IN "
            "(SELECT coalesce(error_type, '') AS kind FROM latest WHERE status = ? GROUP BY kind "
            f"ORDER BY count(*) DESC, kind LIMIT {FAILURE_KINDS_LISTED}) "
            "QUALIFY row_number() OVER (PARTITION BY error_type ORDER BY source_uri) "
            f"<= {FAILURES_PER_KIND} ORDER BY error_type, source_uri",
            [STATUS_FAILED, STATUS_FAILED],
        ))  # fmt: skip
        samples = [
            (key, heading, _rows(query.table(
                f"SELECT * FROM outputs ORDER BY {order} LIMIT {SAMPLE_SIZE}"
            )))
            for key, heading, order in _SAMPLES
        ]  # fmt: skip
    for index, row in enumerate(failed):
        row["card_id"] = f"s-f{index + 1}"
        row[OUTPUT_PATH] = None
    for key, _heading, rows in samples:
        for index, row in enumerate(rows):
            row["card_id"] = f"s-{key}{index + 1}"
    return summary, kinds, failed, samples


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    rows = table.to_pylist()
    for row in rows:
        row["name"] = _display_name(row)
    return rows


_SAMPLE_ORDERS = {
    "least": "lowest Hasler–Süsstrunk colourfulness first",
    "most": "highest colourfulness first",
    "newest": "latest finished first",
    "random": f"a seeded (seed {SAMPLE_SEED}) hash order of the output paths",
}


def _samples_note(outputs: int, shown: str) -> str:
    return (
        f'<p class="sub">{outputs} current outputs; this page shows samples of at most '
        f"{SAMPLE_SIZE} each (a scan may appear in more than one). Browse, filter and review "
        f"all of them: <code>chromascan review {shown}</code>; list them: "
        f"<code>chromascan manifest show {shown} --status ok</code>.</p>"
    )


def _kinds_table(kinds: list[tuple[Any, ...]], shown: str) -> Iterator[str]:
    if not kinds:
        return
    yield (
        '<div class="scroll"><table><thead><tr><th>error type</th><th>inputs failing now</th>'
        "</tr></thead><tbody>"
    )
    for error_type, count in kinds:
        yield (
            f"<tr><td><code>{_e(error_type or '(none recorded)')}</code></td>"
            f'<td class="num">{int(count):,}</td></tr>'
        )
    yield "</tbody></table></div>"


def _iter_rows(table: pa.Table) -> Iterator[dict[str, Any]]:
    for batch in table.to_batches(max_chunksize=256):
        yield from batch.to_pylist()


def _preview(
    uri: str, what: str, size: int, storage_options: Mapping[str, Any] | None
) -> Thumbnail | str:
    try:
        data = read_bytes(uri, storage_options=storage_options, missing_ok=True)
    except OSError:
        return f"{what} unreadable"
    if data is None:
        return f"{what} not found"
    try:
        return make_thumbnail(data, size=size)
    except DecodeError as err:
        return f"no preview ({err.error_type})"


def _head(
    summary: ManifestSummary, policy: str, css: str, software: str, now: datetime
) -> Iterator[str]:
    latest = summary.latest_statuses
    yield (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(policy)}">'
        f'<meta name="generator" content="{_e(software)}">'
        f"<title>chromascan report · {_e(summary.dst)}</title><style>{css}</style></head><body>"
        f'<header><h1>chromascan report</h1><p class="sub"><code>{_e(summary.dst)}</code> · '
        f"generated {_e(_when(now))}</p></header><main>"
        '<section class="stats" aria-label="Overview">'
    )
    yield _stat(summary.sources, "sources")
    yield _stat(latest.get(STATUS_OK, 0), "ok now", "ok")
    yield _stat(latest.get(STATUS_FAILED, 0), "failing now", "failed")
    for status in STATUSES[2:]:
        if latest.get(status):
            yield _stat(latest[status], f"{status} now")
    yield _stat(summary.outputs, "outputs")
    yield _stat(len(summary.runs), "runs")
    yield _stat(summary.rows, "attempts")
    yield _stat(len(summary.models), "models" if len(summary.models) != 1 else "model")
    for state, count in summary.reviews.items():
        yield _stat(count, f"{state} by curators" if state != "pending" else "awaiting review")
    if summary.images_per_second is not None:
        yield _stat(f"{summary.images_per_second:.2f}", "images/s overall")
    yield "</section>"


def _toolbar(summary: ManifestSummary, cards: int) -> Iterator[str]:
    latest = summary.latest_statuses
    yield (
        f'<section id="images"><h2>Samples <span class="count">({cards} cards)</span></h2>'
        '<div class="toolbar" role="toolbar" aria-label="Filter images">'
        f'<button type="button" data-filter="all" aria-pressed="true">All {cards}</button>'
    )
    for status in STATUSES:
        if latest.get(status):
            yield (
                f'<button type="button" data-filter="{_e(status)}" aria-pressed="false">'
                f"{_e(status)}</button>"
            )
    yield (
        '<input id="q" type="search" placeholder="Filter by file name" '
        'aria-label="Filter by file name" autocomplete="off">'
        '<span id="shown" aria-live="polite"></span></div>'
    )
