"""``chromascan manifest ...``: read, check, export and report on what colorize runs wrote.

Pipeline modules are imported inside each command, like the rest of the CLI, so that
``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer

EXIT_PROBLEMS = 3  # the command ran and found problems (like colorize's "some inputs failed")

manifest_app = typer.Typer(
    help="Read, check, export and report on what colorize runs wrote to DST.",
    no_args_is_help=True,
)

_F = TypeVar("_F", bound=Callable[..., Any])
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

DstArgument = Annotated[
    str,
    typer.Argument(metavar="DST", help="Colorize destination: folder or URL (s3://bucket/prefix)."),
]
FORMATS = ("table", "csv", "json")
ENGINES = ("ray", "threads")
# verify and export-bag work file by file, where the files are (Ray Data tasks) or here.
EngineOption = Annotated[
    str,
    typer.Option(
        metavar="[ray|threads]",
        help="ray: in Ray Data tasks on the cluster (a local one unless --address; for "
        "export-bag, BAG must be writable from the cluster); threads: on this machine.",
    ),
]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster to work on (ray://HOST:10001, HOST:6379, auto)."),
]
STATUSES = ("ok", "failed", "skipped")  # pipeline.manifest_tools.STATUSES, without its imports


def _choice(value: str | None, choices: tuple[str, ...], what: str, option: str) -> str | None:
    # Checked here rather than with an Enum so that the message reads like the rest of the CLI
    # ("unknown precision 'int4'; choose from ...") instead of the validator's wording.
    if value is None or value.lower() in choices:
        return value.lower() if value else value
    raise typer.BadParameter(
        f"unknown {what} {value!r}; choose from {', '.join(choices)}", param_hint=f"'{option}'"
    )


def _one_line_errors(command: _F) -> _F:
    """ManifestToolError (no manifest, a bag that cannot be made) as one line and exit 1.

    Storage and file errors already get that treatment from jobs.cli.main.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipeline.manifest_query import ManifestToolError

        try:
            return command(*args, **kwargs)
        except ManifestToolError as err:
            typer.echo(f"chromascan: {err}", err=True)
            raise typer.Exit(1) from err

    return wrapper  # type: ignore[return-value]


def _printable(text: str) -> str:
    """One line whatever a file name holds: control characters shown as \\xNN."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)


def _software() -> str:
    from jobs.cli import package_version

    return f"chromascan {package_version()}"


def _megabytes(octets: int) -> str:
    return f"{octets / 1e6:,.1f} MB"


# --- summary -------------------------------------------------------------------------------


@manifest_app.command("summary")
@_one_line_errors
def summary_command(
    dst: DstArgument,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    top: Annotated[int, typer.Option(min=1, help="Error types listed per run and overall.")] = 5,
) -> None:
    """Per run and overall: counts by status, top error types, throughput, models used."""
    import dataclasses

    from pipeline.manifest_query import ManifestQuery
    from pipeline.manifest_tools import summarize_query
    from pipeline.manifest_tools import top as largest

    with ManifestQuery(dst) as query:
        summary = summarize_query(query)
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(summary), indent=2, sort_keys=True))
        return

    def counts(values: dict[str, int]) -> str:
        return ", ".join(f"{count} {name}" for name, count in values.items()) or "none"

    typer.echo(f"DST {summary.dst}")
    for run in summary.runs:
        timing = "" if run.timing_from == "run summary" else " (no run summary: row times)"
        rate = "" if run.images_per_second is None else f"; {run.images_per_second:.2f} images/s"
        elapsed = "" if run.elapsed_s is None else f" over {run.elapsed_s:,.1f} s"
        typer.echo(f"run {run.run_id}  {run.started_at or '?'} to {run.finished_at or '?'}")
        typer.echo(f"  {run.rows} rows: {counts(run.statuses)}{rate}{elapsed}{timing}")
        if run.listed is not None:
            typer.echo(f"  listed {run.listed}, {run.already_done or 0} already done before")
        typer.echo(f"  models: {counts(run.models)}")
        for name, count in largest(run.error_types, top):
            typer.echo(f"  failed: {count} × {name}")
    typer.echo(
        f"all runs: {len(summary.runs)} runs, {summary.rows} rows: {counts(summary.statuses)}"
    )
    typer.echo(
        f"sources: {summary.sources}, by latest attempt: {counts(summary.latest_statuses)}; "
        f"outputs: {summary.outputs}"
    )
    for name, count in largest(summary.error_types, top):
        typer.echo(f"failing now: {count} × {name}")
    typer.echo(f"models: {counts(summary.models)}")
    typer.echo(f"review of the outputs: {counts(summary.reviews)}")
    if summary.images_per_second is not None:
        typer.echo(
            f"throughput: {summary.images_per_second:.2f} images/s "
            f"over {summary.elapsed_s:,.1f} s of runs"
        )


# --- show ----------------------------------------------------------------------------------

# (heading, column, widest) of the table format; csv and json give every column.
_TABLE_COLUMNS = (
    ("run", "run_id", 24),
    ("status", "status", 7),
    ("source", "relative_path", 60),
    ("colourfulness", "colorfulness", 13),
    ("model", "model_id", 40),
    ("error", "error", 70),
)


def _cell(row: dict[str, Any], column: str) -> str:
    if column == "error":
        kind, message = row.get("error_type"), row.get("error_message")
        return f"{kind}: {message}" if kind and message else str(kind or message or "")
    if column == "relative_path":
        return str(row.get("relative_path") or row.get("source_uri") or "")
    value = row.get(column)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _fit(text: str, width: int, *, keep_end: bool) -> str:
    text = _printable(text)
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if keep_end else text[: width - 1] + "…"


def _table_lines(rows: list[dict[str, Any]], widths: list[int] | None) -> Iterable[str]:
    """Padded cells joined by NUL (the caller joins them for display); a header first when
    ``widths`` is None (the first batch), whose widths then hold for the later ones."""
    cells = [
        [_fit(_cell(row, column), widest, keep_end=column == "relative_path")
         for _, column, widest in _TABLE_COLUMNS]
        for row in rows
    ]  # fmt: skip
    if not cells:
        return
    if widths is None:
        widths = [
            max([len(heading), *(len(line[index]) for line in cells)])
            for index, (heading, _, _) in enumerate(_TABLE_COLUMNS)
        ]
        yield "\0".join(h.ljust(w) for (h, _, _), w in zip(_TABLE_COLUMNS, widths, strict=True))
    for line in cells:
        yield "\0".join(text.ljust(width) for text, width in zip(line, widths, strict=True))


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@manifest_app.command("show")
@_one_line_errors
def show_command(
    dst: DstArgument,
    status: Annotated[
        str | None,
        typer.Option(metavar="[ok|failed|skipped]", help="Only rows with this status."),
    ] = None,
    error_type: Annotated[
        str | None, typer.Option(help="Only rows failed with this error type.")
    ] = None,
    run: Annotated[str | None, typer.Option(help="Only rows of this run id.")] = None,
    model: Annotated[str | None, typer.Option(help="Only rows coloured by this model id.")] = None,
    path: Annotated[
        str | None,
        typer.Option(help="Only sources whose path under SRC matches this glob, e.g. 'box1/*'."),
    ] = None,
    min_colourfulness: Annotated[
        float | None, typer.Option(help="Only outputs at least this colourful.")
    ] = None,
    max_colourfulness: Annotated[
        float | None, typer.Option(help="Only outputs at most this colourful.")
    ] = None,
    review: Annotated[
        str | None,
        typer.Option(
            metavar="[approved|rejected|pending]",
            help="Only outputs a curator approved, rejected, or has yet to decide on.",
        ),
    ] = None,
    latest: Annotated[
        bool, typer.Option(help="Only each source's latest attempt (its current state).")
    ] = False,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many rows.")] = None,
    page: Annotated[
        int, typer.Option(min=1, help="Which page of --limit rows (1: the first).")
    ] = 1,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            metavar="[table|csv|json]",
            help="table: chosen columns to read; csv, json: every manifest column, to pipe.",
        ),
    ] = "table",
) -> None:
    """Manifest rows an archivist can read (table) or pipe (csv, json: one row per line).

    Filters are applied while the Parquet is read, so a page of a ten-million-row manifest
    costs a page of memory.
    """
    from pipeline.manifest_query import REVIEW_STATES, ManifestQuery, RowFilter

    output_format = _choice(output_format, FORMATS, "format", "--format") or "table"
    status = _choice(status, STATUSES, "status", "--status")
    review = _choice(review, REVIEW_STATES, "review state", "--review")
    if page > 1 and limit is None:
        raise typer.BadParameter("--page needs --limit (the page size)", param_hint="'--page'")
    rows = RowFilter(
        status=status, error_type=error_type, run_id=run, model_id=model, path=path,
        min_colourfulness=min_colourfulness, max_colourfulness=max_colourfulness, review=review,
    )  # fmt: skip
    with ManifestQuery(dst) as query:
        sql, values = query.select(
            rows, latest=latest, limit=limit, offset=(page - 1) * (limit or 0)
        )
        batches = query.batches(sql, values, rows=1024)
        try:
            _write_rows(batches, output_format)
        except BrokenPipeError:
            # `... | head`: the reader has what it wanted; stop quietly, as Unix tools do.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _write_rows(batches: Iterable[Any], output_format: str) -> None:
    count = 0
    if output_format == "csv":
        import pyarrow.csv as pa_csv

        sys.stdout.flush()
        writer = None
        for batch in batches:
            if writer is None:
                writer = pa_csv.CSVWriter(sys.stdout.buffer, batch.schema)
            writer.write_batch(batch)
        if writer is not None:
            writer.close()
        sys.stdout.buffer.flush()
    elif output_format == "json":
        # A JSON array with one row per line: valid JSON for jq and json.load, and still
        # greppable and streamable line by line.
        typer.echo("[")
        for batch in batches:
            for row in batch.to_pylist():
                prefix = ",\n" if count else ""
                text = json.dumps(row, default=_json_value, ensure_ascii=False)
                sys.stdout.write(prefix + text)
                count += 1
        typer.echo("\n]" if count else "]")
    else:
        # Column widths come from the first batch, so a long listing streams; a later, longer
        # cell widens only its own line.
        widths: list[int] | None = None
        for batch in batches:
            for line in _table_lines(batch.to_pylist(), widths):
                if widths is None:
                    widths = [len(cell) for cell in line.split("\0")]
                typer.echo(line.replace("\0", "  ").rstrip())
            count += batch.num_rows
        if widths is None:
            typer.echo("  ".join(heading for heading, _, _ in _TABLE_COLUMNS))
        typer.echo(f"{count} rows", err=True)
    sys.stdout.flush()


# --- verify --------------------------------------------------------------------------------


@manifest_app.command("verify")
@_one_line_errors
def verify_command(
    dst: DstArgument,
    workers: Annotated[
        int, typer.Option(min=1, help="Files hashed at once (threads, or Ray tasks).")
    ] = 8,
    engine: EngineOption = "ray",
    address: AddressOption = None,
    trust: Annotated[
        str | None,
        typer.Option(
            metavar="PEM",
            help="CA certificates to trust (PEM file; or env CHROMASCAN_TRUST_ANCHORS): signed "
            "outputs must then be Trusted, not only intact.",
        ),
    ] = None,
) -> None:
    """Re-hash every output against the manifest; list missing, changed and untracked files.

    Signed outputs also have their C2PA content credentials validated. Exit status 0 when
    everything matches, 3 when anything is missing, changed, untracked, unreadable or no
    longer validly signed.
    """
    from pipeline.credentials import CredentialsError, load_trust_anchors
    from pipeline.provenance import redact_uri
    from pipeline.verify import Finding, verify_outputs

    engine = _choice(engine, ENGINES, "engine", "--engine") or "ray"
    try:
        trust_anchors = load_trust_anchors(trust)
    except CredentialsError as err:
        raise typer.BadParameter(str(err), param_hint="'--trust'") from err

    def connect() -> None:
        # Only once DST is known to hold a manifest: a typo answers at once, Ray unstarted.
        from jobs.runtime import ensure_ray

        ensure_ray(address)

    def show(finding: Finding) -> None:
        detail = f"  {finding.detail}" if finding.detail else ""
        typer.echo(f"{finding.kind:<10} {_printable(finding.path)}{_printable(detail)}")

    result = verify_outputs(
        dst, workers=workers, on_finding=show, engine=engine,
        connect=connect if engine == "ray" else None, trust_anchors=trust_anchors,
    )  # fmt: skip
    counts = result.counts
    signed = ""
    if result.signed:
        trusted = " (trust: --trust)" if trust_anchors is not None else ""
        signed = (
            f"; {result.signed} signed, {counts['credentials']} with credentials that no longer "
            f"validate{trusted}"
        )
    typer.echo(
        f"{result.expected} outputs in the manifest: {result.verified} verified, "
        f"{counts['changed']} changed, {counts['missing']} missing, "
        f"{counts['unreadable']} unreadable; {counts['untracked']} untracked files{signed}; "
        f"{_megabytes(result.bytes_hashed)} hashed in {result.elapsed_s:.1f} s"
    )
    sys.stdout.flush()
    if result.problems:
        typer.echo(
            f"chromascan: verify found {result.problems} problems under "
            f"{redact_uri(dst.rstrip('/'))}/images",
            err=True,
        )
        raise typer.Exit(EXIT_PROBLEMS)


# --- export-bag ----------------------------------------------------------------------------


def _info_fields(values: list[str] | None) -> list[tuple[str, str]]:
    fields = []
    for value in values or []:
        label, separator, text = value.partition("=")
        if not separator:
            raise typer.BadParameter(f"expected LABEL=VALUE, got {value!r}", param_hint="'--info'")
        fields.append((label, text))
    return fields


@manifest_app.command("export-bag")
@_one_line_errors
def export_bag_command(
    dst: DstArgument,
    bag: Annotated[str, typer.Argument(help="New or empty folder or URL for the bag.")],
    info: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra bag-info.txt field as LABEL=VALUE, e.g. "
            "'Source-Organization=City Archive'; repeatable."
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Files copied at once.")] = 8,
    approved_only: Annotated[
        bool,
        typer.Option(
            "--approved-only",
            help="Only outputs a curator approved in `chromascan review` (that exact output).",
        ),
    ] = False,
    engine: EngineOption = "ray",
    address: AddressOption = None,
) -> None:
    """Write a BagIt (RFC 8493) bag of the outputs, checked against the manifest.

    data/ holds the current outputs; sha256 and sha512 manifests and tag manifests; bag-info.txt
    with Payload-Oxum, Bagging-Date and the source and model provenance; chromascan/ holds the
    manifest rows of the payload (Parquet), the run summaries and a README.
    """
    from pipeline.bag import export_bag

    engine = _choice(engine, ENGINES, "engine", "--engine") or "ray"

    def connect() -> None:
        from jobs.runtime import ensure_ray

        ensure_ray(address)

    result = export_bag(
        dst, bag, software=_software(), info=_info_fields(info), workers=workers,
        approved_only=approved_only, engine=engine, connect=connect,
    )  # fmt: skip
    typer.echo(
        f"wrote bag {result.bag}: {result.files} files, {_megabytes(result.octets)} from "
        f"{result.runs} runs in {result.elapsed_s:.1f} s"
    )
    for model in result.models:
        typer.echo(f"model {model}")


# --- report --------------------------------------------------------------------------------


@manifest_app.command("report")
@_one_line_errors
def report_command(
    dst: DstArgument,
    out: Annotated[str, typer.Option(help="Where to write the HTML page (path or URL).")] = (
        "report.html"
    ),
    thumb_size: Annotated[
        int, typer.Option(min=32, max=512, help="Thumbnail size in pixels (longer side).")
    ] = 160,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Thumbnails made at once; default up to 4.")
    ] = None,
) -> None:
    """One self-contained HTML page of a bounded size at any archive size.

    Totals, runs, every failure kind with its count and up to 10 of its inputs, and samples
    of the outputs (least and most colourful, newest, seeded random; 24 each) with before and
    after thumbnails. The page names the commands that show the rest.
    """
    from pipeline.report import write_report

    result = write_report(dst, out, software=_software(), thumb_size=thumb_size, workers=workers)
    typer.echo(
        f"wrote {result.out}: {result.sources} sources ({result.failed} failing), "
        f"{result.cards} cards sampled, {result.thumbnails} thumbnails, "
        f"{_megabytes(result.octets)} in {result.elapsed_s:.1f} s"
    )
