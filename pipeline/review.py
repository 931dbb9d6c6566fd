"""``chromascan review``: curators look at each colourised copy and approve or reject it.

A Starlette app with server-rendered pages over ``ManifestQuery``: every page is one bounded
query (a filtered, sorted page of the latest attempt per source), so browsing a manifest of
millions of rows costs a page of memory. Thumbnails are made on demand from storage and kept
in a local cache keyed by what they show (the scan's version, the output's sha256), so a
re-colourised scan gets a fresh one.

Decisions are appended to DST/review/ as one new Parquet part per decision request, never
edited in place (REVIEW_SCHEMA in pipeline/manifest_query.py). A decision names the exact
output it was made on (its sha256): the latest decision on the current output counts, and a
re-colourised scan is pending again until someone decides on the new copy.

Security: bound to loopback by default, where no authentication is asked for. When exposed
(``host`` other than loopback) a token is required on every request: ``?token=`` once (it is
then kept in an HttpOnly, SameSite=Strict cookie) or ``Authorization: Bearer``. Decisions are
POSTs that must come from the app's own pages (Origin checked), so another site open in the
curator's browser cannot approve anything; every value from the manifest is HTML-escaped.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import pyarrow as pa
import pyarrow.parquet as pq
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.decode import DecodeError, decode_image
from pipeline.manifest_query import (
    DECISIONS,
    REJECTED,
    REVIEW_FOLDER,
    REVIEW_SCHEMA,
    REVIEW_STATES,
    ManifestQuery,
    RowFilter,
)
from pipeline.provenance import redact_uri
from pipeline.report import thumbnail_jpeg
from pipeline.schema import STATUS_OK
from pipeline.storage import StorageError, filesystem, join, read_bytes

logger = logging.getLogger(__name__)

PAGE_SIZE = 48
THUMB_SIZE = 240
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "chromascan_review_token"
_BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                    "GIF": "image/gif"}  # fmt: skip
_STATUSES = ("ok", "failed", "skipped")


class ReviewError(ValueError):
    """A decision that cannot be recorded (no reason for a rejection, no such output)."""


@dataclass(frozen=True)
class ReviewConfig:
    dst: str
    reviewer: str | None  # None: read-only
    read_only: bool = False
    token: str | None = None
    cache_dir: str | None = None  # thumbnails; default: a folder under the user's cache
    storage_options: Mapping[str, Any] | None = None


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


# --- Decisions ------------------------------------------------------------------------------


def append_decisions(
    dst: str,
    rows: list[dict[str, Any]],
    *,
    storage_options: Mapping[str, Any] | None = None,
    now: datetime | None = None,
) -> str:
    """Write ``rows`` (REVIEW_SCHEMA columns) as a new part under DST/review/; its URI.

    A new uniquely named file per call: earlier decisions are never rewritten, and two apps
    deciding at once cannot overwrite each other.
    """
    decided_at = now or datetime.now(UTC)
    table = pa.Table.from_pylist(
        [{name: row.get(name) for name in REVIEW_SCHEMA.names} | {"decided_at": decided_at}
         for row in rows],
        schema=REVIEW_SCHEMA,
    )  # fmt: skip
    name = f"part-{decided_at.strftime('%Y%m%dT%H%M%S%fZ')}-{uuid.uuid4().hex[:12]}.parquet"
    uri = join(dst, REVIEW_FOLDER, name)
    fs, path = filesystem(uri, storage_options)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    try:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(path, "wb") as handle:
            handle.write(buffer.getvalue())
    except OSError as err:
        raise StorageError(f"{redact_uri(uri)}: cannot write ({err})") from err
    return uri


# --- Pages -----------------------------------------------------------------------------------

_CSS = """
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, sans-serif; background: #f6f5f2; color: #1d1d1f; }
header { padding: 14px 24px; background: #fff; border-bottom: 1px solid #e3e1dc;
  display: flex; gap: 18px; align-items: baseline; flex-wrap: wrap; }
header h1 { font-size: 19px; margin: 0; } header a { color: inherit; }
main { padding: 16px 24px; }
form.filters { display: flex; gap: 8px; flex-wrap: wrap; align-items: end; margin-bottom: 12px; }
form.filters label { font-size: 12px; color: #6b6b70; display: flex; flex-direction: column; }
input, select, button { font: inherit; font-size: 14px; padding: 4px 8px; }
.grid { display: grid; gap: 12px; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); }
.card { background: #fff; border: 1px solid #e3e1dc; border-radius: 10px; padding: 10px; }
.card.approved { border-color: #1f7a4d; } .card.rejected { border-color: #b3261e; }
.pair { display: flex; gap: 8px; }
.pair img { width: 240px; height: 240px; object-fit: contain; background: #eee; }
.meta { font-size: 12.5px; color: #6b6b70; overflow-wrap: anywhere; }
.state { font-weight: 600; } .approved .state { color: #1f7a4d; }
.rejected .state { color: #b3261e; }
.actions { display: flex; gap: 8px; flex-wrap: wrap; align-items: center; margin: 12px 0; }
.pager { display: flex; gap: 12px; margin: 14px 0; align-items: center; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.viewer { overflow: auto; height: 75vh; background: #222; border-radius: 8px; }
.viewer img { display: block; max-width: 100%; transform-origin: 0 0; }
.viewer.zoomed img { max-width: none; }
.error { color: #b3261e; }
"""

_ZOOM_JS = """
(() => {
  const viewers = Array.from(document.querySelectorAll(".viewer"));
  const zoom = document.getElementById("zoom");
  const apply = () => {
    const factor = Number(zoom.value);
    for (const viewer of viewers) {
      viewer.classList.toggle("zoomed", factor > 0);
      const img = viewer.querySelector("img");
      img.style.width = factor > 0 ? `${img.naturalWidth * factor}px` : "";
    }
    document.getElementById("zoom-label").textContent =
      Number(zoom.value) > 0 ? `${Math.round(factor * 100)}%` : "fit";
  };
  zoom.addEventListener("input", apply);
  // Scrolling one side scrolls the other: the same spot of scan and copy stays in view.
  for (const viewer of viewers) {
    viewer.addEventListener("scroll", () => {
      for (const other of viewers) {
        if (other !== viewer) {
          other.scrollLeft = viewer.scrollLeft;
          other.scrollTop = viewer.scrollTop;
        }
      }
    });
  }
})();
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _page(title: str, body: str, config: ReviewConfig, *, script: str = "") -> HTMLResponse:
    who = "read-only" if config.read_only else f"reviewing as {_e(config.reviewer)}"
    scripts = f"<script>{script}</script>" if script else ""
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · chromascan review</title><style>{_CSS}</style></head><body>"
        f'<header><h1><a href="/">chromascan review</a></h1>'
        f"<code>{_e(redact_uri(config.dst))}</code><span>{who}</span></header>"
        f"<main>{body}</main>{scripts}</body></html>"
    )
    response = HTMLResponse(text)
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
        "script-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
    return response


def _filters(params: Mapping[str, str]) -> tuple[RowFilter, dict[str, str]]:
    def text(name: str) -> str | None:
        value = (params.get(name) or "").strip()
        return value or None

    def number(name: str) -> float | None:
        value = text(name)
        try:
            return None if value is None else float(value)
        except ValueError:
            return None

    status = text("status") if text("status") in _STATUSES else None
    review = text("review") if text("review") in REVIEW_STATES else None
    chosen = RowFilter(
        status=status,
        error_type=text("error_type"),
        run_id=text("run"),
        model_id=text("model"),
        path=text("path"),
        min_colourfulness=number("min_c"),
        max_colourfulness=number("max_c"),
        review=review,
    )
    names = ("status", "error_type", "run", "model", "path", "min_c", "max_c", "review")
    kept = {key: value for key, value in params.items() if key in names and value}
    return chosen, kept


def _thumb_url(source_uri: str, kind: str, version: Any) -> str:
    return "/thumb?" + urlencode({"source": source_uri, "kind": kind, "v": version or ""})


def _image_url(source_uri: str, kind: str, version: Any) -> str:
    return "/image?" + urlencode({"source": source_uri, "kind": kind, "v": version or ""})


def _placeholder(text: str) -> Response:
    """A grey tile that says why there is no thumbnail, rather than a broken image."""
    svg = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{THUMB_SIZE}" height="{THUMB_SIZE}">'
        '<rect width="100%" height="100%" fill="#ddd"/><text x="50%" y="50%" fill="#555" '
        f'font-family="sans-serif" font-size="14" text-anchor="middle">{_e(text)}</text></svg>'
    )
    return Response(svg, media_type="image/svg+xml", headers={"Cache-Control": "no-store"})


class _TokenGate:
    """Every request carries the token (query, cookie or bearer header), or it gets 401."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        offered = (
            request.query_params.get("token")
            or request.cookies.get(TOKEN_COOKIE)
            or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        )
        if not offered or not hmac.compare_digest(offered.encode(), self.token):
            response: Response = PlainTextResponse("a valid token is required", status_code=401)
        elif "token" in request.query_params:
            # Keep the token out of the address bar and the history from here on.
            others = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            response = RedirectResponse(
                request.url.path + ("?" + urlencode(others) if others else ""), status_code=303
            )
            response.set_cookie(TOKEN_COOKIE, self.token.decode(), httponly=True,
                                samesite="strict")  # fmt: skip
        else:
            await self.app(scope, receive, send)
            return
        await response(scope, receive, send)


class ReviewApp:
    """The pages and their one shared ManifestQuery (DuckDB is used from one thread at a time).

    The handlers are plain functions, which Starlette runs on its thread pool: thumbnails are
    decoded in parallel while the queries take turns on the connection.
    """

    def __init__(self, config: ReviewConfig) -> None:
        self.config = config
        self.query = ManifestQuery(config.dst, storage_options=config.storage_options)
        self.lock = threading.Lock()
        cache = config.cache_dir or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
            "chromascan", "review-thumbnails",
        )  # fmt: skip
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)

    # --- data -------------------------------------------------------------------------------

    def _rows(self, sql: str, values: list[Any]) -> list[dict[str, Any]]:
        with self.lock:
            return self.query.table(sql, values).to_pylist()

    def _current(self, source_uri: str) -> dict[str, Any] | None:
        """The source's latest attempt, with its output path and review state."""
        rows = self._rows(
            "SELECT l.*, o.output_path FROM latest_reviewed l LEFT JOIN outputs o "
            "ON l.source_uri = o.source_uri AND l.output_sha256 = o.output_sha256 "
            "WHERE l.source_uri = ? LIMIT 1",
            [source_uri],
        )
        return rows[0] if rows else None

    def _history(self, source_uri: str) -> list[dict[str, Any]]:
        return self._rows(
            "SELECT decision, reason, reviewer, decided_at, output_sha256 FROM decisions "
            "WHERE source_uri = ? ORDER BY decided_at DESC LIMIT 50",
            [source_uri],
        )

    # --- handlers ---------------------------------------------------------------------------

    def index(self, request: Request) -> Response:
        params = dict(request.query_params)
        chosen, kept = _filters(params)
        try:
            page = max(1, int(params.get("page") or 1))
        except ValueError:
            page = 1
        sql, values = self.query.select(
            chosen, latest=True, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
        )
        started = time.perf_counter()
        rows = self._rows(sql, values)
        with self.lock:
            total = self.query.count(chosen, latest=True)
        elapsed = time.perf_counter() - started
        pages = max(1, -(-total // PAGE_SIZE))
        here = urlencode(kept | {"page": str(page)})
        body = [self._filter_form(kept)]
        body.append(
            f'<p class="meta" id="total">{total:,} sources match · page {page} of {pages:,} '
            f"· {elapsed * 1000:.0f} ms</p>"
        )
        actions = "" if self.config.read_only else (
            '<div class="actions"><button name="decision" value="approved" id="approve-selected">'
            "Approve selected</button><input name=\"reason\" placeholder=\"Reason (needed to "
            'reject)" aria-label="Reason" id="reason-selected"><button name="decision" '
            'value="rejected" id="reject-selected">Reject selected</button></div>'
        )  # fmt: skip
        body.append(f'<form method="post" action="/decide" id="selection">'
                    f'<input type="hidden" name="next" value="/?{_e(here)}">{actions}'
                    '<div class="grid">')  # fmt: skip
        for row in rows:
            body.append(self._card(row))
        body.append("</div></form>")
        if not rows:
            body.append('<p class="meta" id="none">No source matches these filters.</p>')
        body.append('<nav class="pager">')
        if page > 1:
            body.append(f'<a id="prev" href="/?{_e(urlencode(kept | {"page": page - 1}))}">'
                        "← previous</a>")  # fmt: skip
        if page < pages:
            body.append(f'<a id="next" href="/?{_e(urlencode(kept | {"page": page + 1}))}">'
                        "next →</a>")  # fmt: skip
        body.append("</nav>")
        return _page("browse", "".join(body), self.config)

    def _filter_form(self, kept: Mapping[str, str]) -> str:
        def select(name: str, choices: tuple[str, ...], label: str) -> str:
            options = "".join(
                f'<option value="{c}"{" selected" if kept.get(name) == c else ""}>{c}</option>'
                for c in choices
            )
            return (f'<label>{label}<select name="{name}" id="f-{name}"><option value="">any'
                    f"</option>{options}</select></label>")  # fmt: skip

        def field(name: str, label: str, size: int = 14) -> str:
            return (f'<label>{label}<input name="{name}" id="f-{name}" size="{size}" '
                    f'value="{_e(kept.get(name, ""))}"></label>')  # fmt: skip

        return (
            '<form class="filters" method="get" action="/" id="filters">'
            + select("status", _STATUSES, "status")
            + select("review", REVIEW_STATES, "review")
            + field("path", "path (glob)", 20)
            + field("error_type", "error type")
            + field("run", "run")
            + field("model", "model")
            + field("min_c", "colourfulness ≥", 5)
            + field("max_c", "≤", 5)
            + '<button type="submit" id="apply">Filter</button></form>'
        )

    def _card(self, row: dict[str, Any]) -> str:
        source = row["source_uri"]
        name = row.get("relative_path") or source
        state = row.get("review")
        thumbs = [
            f'<img src="{_e(_thumb_url(source, "scan", row.get("source_version")))}" '
            f'alt="scan {_e(name)}" loading="lazy">'
        ]
        if row["status"] == STATUS_OK and row.get("output_sha256"):
            thumbs.append(
                f'<img src="{_e(_thumb_url(source, "output", row["output_sha256"]))}" '
                f'alt="colourised {_e(name)}" loading="lazy">'
            )
        pick = ""
        if state is not None and not self.config.read_only:
            pick = (f'<label><input type="checkbox" name="source" value="{_e(source)}"> '
                    "select</label> ")  # fmt: skip
        detail = "/scan?" + urlencode({"source": source})
        colour = row.get("colorfulness")
        facts = [row["status"], f"colourfulness {colour:.1f}" if colour is not None else None,
                 row.get("error_type"), row.get("model_id"), f"run {row['run_id']}"]  # fmt: skip
        reason = f" — {_e(row['review_reason'])}" if row.get("review_reason") else ""
        return (
            f'<div class="card {_e(state or "")}" data-source="{_e(source)}">'
            f'<a href="{_e(detail)}" class="open"><div class="pair">{"".join(thumbs)}</div></a>'
            f'<div><a href="{_e(detail)}" class="open">{_e(name)}</a></div>'
            f'<div class="meta">{" · ".join(_e(f) for f in facts if f)}</div>'
            f'<div class="meta">{pick}<span class="state">{_e(state or "no output")}</span>'
            f"{reason}</div></div>"
        )

    def scan(self, request: Request) -> Response:
        source = request.query_params.get("source") or ""
        row = self._current(source)
        if row is None:
            return _page("not found", '<p class="error">No such source in the manifest.</p>',
                         self.config)  # fmt: skip
        name = row.get("relative_path") or source
        views = [
            f'<div><h3>scan</h3><div class="viewer"><img id="scan-image" src="'
            f'{_e(_image_url(source, "scan", row.get("source_version")))}" alt="scan"></div></div>'
        ]
        if row.get("output_path"):
            views.append(
                f'<div><h3>colourised</h3><div class="viewer"><img id="output-image" src="'
                f'{_e(_image_url(source, "output", row["output_sha256"]))}" alt="colourised">'
                "</div></div>"
            )
        state = row.get("review")
        decide = ""
        if state is not None and not self.config.read_only:
            back = urlencode({"source": source})
            decide = (
                '<form method="post" action="/decide" class="actions" id="decide">'
                f'<input type="hidden" name="source" value="{_e(source)}">'
                f'<input type="hidden" name="next" value="/scan?{_e(back)}">'
                '<button name="decision" value="approved" id="approve">Approve</button>'
                '<input name="reason" id="reason" placeholder="Reason (needed to reject)" '
                'aria-label="Reason" size="40">'
                '<button name="decision" value="rejected" id="reject">Reject</button></form>'
            )
        history = "".join(
            f"<li>{_e(h['decided_at'])}: <b>{_e(h['decision'])}</b> by {_e(h['reviewer'])}"
            f"{' — ' + _e(h['reason']) if h['reason'] else ''}"
            f"{'' if h['output_sha256'] == row.get('output_sha256') else ' (an earlier output)'}"
            "</li>"
            for h in self._history(source)
        )
        facts = " · ".join(_e(f) for f in (
            row["status"], row.get("error_type"), row.get("error_message"), row.get("model_id"),
            f"run {row['run_id']}", f"{row.get('source_width')} × {row.get('source_height')}",
        ) if f)  # fmt: skip
        body = (
            f'<h2>{_e(name)}</h2><p class="meta">{facts}</p>'
            f'<p>Review: <span class="state" id="state">{_e(state or "no output")}</span>'
            f"{' — ' + _e(row['review_reason']) if row.get('review_reason') else ''}</p>"
            f"{decide}"
            '<p><label>zoom <input type="range" id="zoom" min="0" max="4" step="0.25" value="0">'
            '</label> <span id="zoom-label">fit</span> (0: fit; 1: full resolution)</p>'
            f'<div class="side">{"".join(views)}</div>'
            f'<h3>Decisions</h3><ul id="history">{history or "<li>none yet</li>"}</ul>'
        )
        return _page(str(name), body, self.config, script=_ZOOM_JS)

    def _bytes(self, row: dict[str, Any], kind: str) -> bytes | None:
        """The scan's or the output's bytes; None when storage has none (or cannot be read)."""
        if kind == "scan":
            uri = row["source_uri"]
        elif row.get("output_path"):
            uri = join(self.config.dst, "images", row["output_path"])
        else:
            return None
        try:
            return read_bytes(uri, storage_options=self.config.storage_options, missing_ok=True)
        except OSError:
            return None

    def _requested(self, request: Request) -> tuple[str, str, dict[str, Any]] | None:
        """(source, kind, current row) an image request names, or None: no such image."""
        source = request.query_params.get("source") or ""
        kind = request.query_params.get("kind") or ""
        row = self._current(source)
        if row is None or kind not in ("scan", "output"):
            return None
        return source, kind, row

    def thumb(self, request: Request) -> Response:
        if (requested := self._requested(request)) is None:
            return PlainTextResponse("no such image", status_code=404)
        source, kind, row = requested
        version = row.get("source_version") if kind == "scan" else row.get("output_sha256")
        key = hashlib.sha256(f"{source}\0{kind}\0{version}\0{THUMB_SIZE}".encode()).hexdigest()
        cached = self.cache / key[:2] / f"{key}.jpg"
        if cached.exists():
            data = cached.read_bytes()
        else:
            if (original := self._bytes(row, kind)) is None:
                return _placeholder(f"{kind} not found")
            try:
                data, _, _ = thumbnail_jpeg(original, size=THUMB_SIZE)
            except DecodeError as err:
                return _placeholder(f"no preview ({err.error_type})")
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = cached.with_suffix(f".{uuid.uuid4().hex}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, cached)
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=86400"})  # fmt: skip

    def image(self, request: Request) -> Response:
        """Full resolution: the bytes as stored when browsers show them, else a PNG of them."""
        if (requested := self._requested(request)) is None:
            return PlainTextResponse("no such image", status_code=404)
        _, kind, row = requested
        if (data := self._bytes(row, kind)) is None:
            return PlainTextResponse("image not found on storage", status_code=404)
        if kind == "output":
            return Response(data, media_type="image/png")
        media = _BROWSER_FORMATS.get(str(row.get("source_format") or "").upper())
        if media is not None:
            return Response(data, media_type=media)
        try:
            decoded = decode_image(data)
        except DecodeError as err:
            return PlainTextResponse(f"cannot show ({err.error_type})", status_code=422)
        from PIL import Image  # noqa: PLC0415

        pixels = decoded.pixels
        if pixels.dtype != "uint8":
            pixels = (pixels >> 8).astype("uint8")
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        return Response(buffer.getvalue(), media_type="image/png")

    async def decide(self, request: Request) -> Response:
        if self.config.read_only:
            return PlainTextResponse("this review app is read-only", status_code=403)
        form = parse_qs((await request.body()).decode("utf-8", "replace"))
        decision = (form.get("decision") or [""])[0]
        reason = (form.get("reason") or [""])[0].strip() or None
        sources = form.get("source") or []
        target = (form.get("next") or ["/"])[0]
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        try:
            recorded = self.record(sources, decision, reason)
        except ReviewError as err:
            return _page("not recorded", f'<p class="error" id="problem">{_e(err)}</p>'
                         f'<p><a href="{_e(target)}">back</a></p>', self.config)  # fmt: skip
        logger.info("recorded %d %s decisions", recorded, decision)
        return RedirectResponse(target, status_code=303)

    def record(self, sources: list[str], decision: str, reason: str | None) -> int:
        """Append one decision per source on its current output; how many were recorded."""
        if decision not in DECISIONS:
            raise ReviewError(f"unknown decision {decision!r}; choose from {', '.join(DECISIONS)}")
        if decision == REJECTED and not reason:
            raise ReviewError("a rejection needs a reason")
        if not sources:
            raise ReviewError("select at least one scan")
        rows = []
        for source in dict.fromkeys(sources):
            row = self._current(source)
            if row is None or row["status"] != STATUS_OK or not row.get("output_sha256"):
                raise ReviewError(f"{source}: no colourised output to decide on")
            rows.append({
                "source_uri": source, "relative_path": row.get("relative_path"),
                "source_version": row.get("source_version"),
                "output_sha256": row["output_sha256"], "decision": decision, "reason": reason,
                "reviewer": self.config.reviewer, "run_id": row["run_id"],
            })  # fmt: skip
        append_decisions(self.config.dst, rows, storage_options=self.config.storage_options)
        with self.lock:
            self.query.refresh_reviews()
        return len(rows)

    def close(self) -> None:
        self.query.close()


class _SameOrigin:
    """POSTs must come from this app's own pages: another site cannot decide for a curator."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            request = Request(scope)
            origin = request.headers.get("origin")
            host = request.headers.get("host", "")
            if origin is not None and origin.split("://", 1)[-1] != host:
                await PlainTextResponse("cross-origin request refused", status_code=403)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def _closing(review: ReviewApp) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            review.close()

    return lifespan


def create_app(config: ReviewConfig) -> tuple[Starlette, ReviewApp]:
    """The ASGI app and its state (close it when the server stops)."""
    review = ReviewApp(config)
    middleware = [Middleware(_SameOrigin)]
    if config.token:
        middleware.insert(0, Middleware(_TokenGate, token=config.token))
    app = Starlette(
        routes=[
            Route("/", review.index),
            Route("/scan", review.scan),
            Route("/thumb", review.thumb),
            Route("/image", review.image),
            Route("/decide", review.decide, methods=["POST"]),
            # Browsers ask for it on every page; an empty answer keeps their consoles clean.
            Route("/favicon.ico", lambda _request: Response(status_code=204)),
        ],
        middleware=middleware,
        lifespan=_closing(review),
    )
    return app, review
