"""The colorize run: list SRC, stream it through the stages on Ray Data, write the manifest.

The driver holds the listing (≈200 bytes a key) and manifest rows, never pixels. Manifest rows
are flushed to Parquet part files as they arrive, so a run that dies keeps what it finished.
"""

from __future__ import annotations

import io
import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.attempts import start_attempt_ledger
from pipeline.credentials import SigningKeys
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.listing import list_images
from pipeline.manifest import read_manifest
from pipeline.model_store import load_model
from pipeline.provenance import redact_uri
from pipeline.schema import MANIFEST_SCHEMA, STATUS_FAILED, STATUS_OK, STATUS_SKIPPED
from pipeline.stages import (
    OUTPUT_BITS,
    Colorizer,
    StageOptions,
    finalize_batch,
    output_relative_path,
    prepare_batch,
)
from pipeline.storage import (
    DEFAULT_TIMEOUT_S,
    StorageUnavailableError,
    error_chain,
    join,
    portable_storage_options,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_SMALL_CLUSTER_CPUS = 8
# On CPU the forward pass is about three quarters of an image's CPU time (512x384 JPEG to
# PNG, bf16, batch 8: 74-85 of ~100 core-ms, the rest decode, merge and PNG encode), so by
# default about three single-threaded actors run per four CPUs. Measured on 2 cores against
# one actor: settled 18.4-19.4 vs 14.3-14.4 images/s.
_CPU_MODEL_SHARE = 0.75
# What a CPU actor reserves per thread. A whole CPU each would leave the decode and encode
# tasks no CPU on a small node (two actors on two cores: nothing else could ever be
# scheduled); the actor waits on its inputs part of the time and the OS shares the cores.
_CPU_ACTOR_RESERVATION = 0.5


def colorizer_actors(config: ColorizeConfig, resources: Mapping[str, float]) -> int:
    """How many colorizer actors a run uses on a cluster with ``resources`` (ray's totals)."""
    if config.actors is not None:
        return config.actors
    if config.gpu:
        return max(1, int(resources.get("GPU", 0)))
    cpus = float(resources.get("CPU", 1))
    return max(1, round(_CPU_MODEL_SHARE * cpus / config.actor_cpus))


def colorizer_pool_size(config: ColorizeConfig, resources: Mapping[str, float], rows: int) -> int:
    """The actors a run of ``rows`` inputs starts: never more than an execution has blocks,
    since each actor imports torch and loads the model before its first input."""
    blocks = math.ceil(min(rows, config.rows_per_execution) / config.rows_per_block)
    return max(1, min(colorizer_actors(config, resources), blocks))


def actor_cpu_reservation(config: ColorizeConfig) -> float:
    """The CPUs each colorizer actor reserves in Ray (its torch threads are actor_cpus)."""
    return float(config.actor_cpus) if config.gpu else _CPU_ACTOR_RESERVATION * config.actor_cpus


class ColorizeError(ValueError):
    """The run cannot start: nothing to colour, or a setting that cannot work."""


@dataclass(frozen=True)
class ColorizeConfig:
    """A colorize run's settings; recorded in the run summary (without storage options)."""

    src: str  # folder or URL of the scans
    dst: str  # folder or URL for images/, manifest/ and runs/
    model: str  # folder or URL of the model artifact
    gpu: bool = False  # one actor per GPU, reduced precision
    actors: int | None = None  # colorizer actors; None: one per GPU, or ~3 per 4 CPUs
    batch_size: int = 8  # model inputs per forward pass
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger scans fail with ImageTooLarge
    limit: int | None = None  # colour at most this many inputs (in listing order)
    precision: str = "auto"  # auto: bf16 on GPUs and on CPUs with native bf16, else fp32
    # zlib level of output PNGs. 1 is the default by measurement: against level 6 it encodes
    # 2.5-4x faster (512² photo 21 vs 70 ms; 60 MP scan 4.3 vs 17.7 s) for files 5-20% larger.
    png_compress_level: int = 1
    finalize_threads: int = 1
    # Output bits per channel: "8", "16", or "source" (16 for 16-bit masters, else 8): a
    # 16-bit master's derivative keeps its tonal range (FADGI, Metamorfoze).
    bits: str = "source"
    actor_cpus: int = 1  # CPUs each colorizer actor reserves, and its torch threads
    incremental: bool = True  # skip inputs the ledger (DST's manifests) already has done
    retry_failed: bool = True  # incremental: inputs that failed before are tried again
    any_model: bool = False  # incremental: done by any model counts (else only this model)
    rows_per_block: int = 4  # inputs per prepare/finalize task: small, so work spreads
    # Inputs per Ray Data execution. The driver keeps about 60 KB per block of an execution
    # (measured: 2,500 blocks made with from_arrow cost it 147 MiB), so one execution over
    # a 3-million-scan archive would need ~44 GB; successive executions of this many inputs
    # keep it flat (measured: 486 -> 506 MiB from 1,666 to 10,000 scans in executions of
    # 1,000), at the cost of one actor start (model load) per execution.
    rows_per_execution: int = 2048
    flush_rows: int = 256  # manifest rows per Parquet part file (at most)
    flush_seconds: float = 30.0  # ... or this often, so a crash loses little
    # The longest one read or write may go unanswered (+1 s per MiB) before the store counts
    # as down and the run stops; a re-run finishes the rest.
    storage_timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ColorizeError(f"actors must be at least 1, got {self.actors}")
        if self.actor_cpus < 1:
            raise ColorizeError(f"actor CPUs must be at least 1, got {self.actor_cpus}")
        if self.batch_size < 1:
            raise ColorizeError(f"batch size must be at least 1, got {self.batch_size}")
        if self.rows_per_block < 1:
            raise ColorizeError(f"rows per block must be at least 1, got {self.rows_per_block}")
        if self.rows_per_execution < self.rows_per_block:
            raise ColorizeError(
                f"rows per execution ({self.rows_per_execution}) must be at least rows per "
                f"block ({self.rows_per_block})"
            )
        if self.max_pixels < 1:
            raise ColorizeError(f"max pixels must be at least 1, got {self.max_pixels}")
        if self.limit is not None and self.limit < 0:
            raise ColorizeError(f"limit must not be negative, got {self.limit}")
        if self.precision not in PRECISIONS:
            raise ColorizeError(
                f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}"
            )
        if self.bits not in OUTPUT_BITS:
            raise ColorizeError(f"bits must be 8, 16 or source, got {self.bits!r}")
        if self.finalize_threads < 1:
            raise ColorizeError(f"finalize threads must be at least 1, got {self.finalize_threads}")
        if not 0 <= self.png_compress_level <= 9:
            raise ColorizeError(f"PNG compression level must be 0-9, got {self.png_compress_level}")
        if not self.storage_timeout_s > 0:
            raise ColorizeError(
                f"storage timeout must be more than 0 seconds, got {self.storage_timeout_s:g}"
            )


@dataclass
class Progress:
    """Counts so far, handed to the progress callback after every arriving block."""

    total: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    elapsed_s: float = 0.0

    @property
    def done(self) -> int:
        return self.ok + self.failed

    @property
    def images_per_second(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass
class RunSummary:
    run_id: str
    model_id: str
    listed: int
    attempted: int
    ok: int
    failed: int
    skipped: int
    elapsed_s: float
    images_per_second: float
    manifest_uri: str
    summary_uri: str
    error_types: dict[str, int] = field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""


def new_run_id(now: datetime | None = None) -> str:
    """Sortable and unique: 20261125T120301Z-3f9a1c."""
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def with_output_paths(listing: pa.Table) -> pa.Table:
    """Add output_path (relative to DST/images): the source path with its suffix -> .png.

    Two sources that differ only in suffix (scan.tif and scan.jpg) would map to one output;
    those keep their suffix (scan.tif.png, scan.jpg.png) so that neither overwrites the other.
    """
    relative = listing.column("relative_path").to_pylist()
    outputs = [output_relative_path(path) for path in relative]
    counts = Counter(outputs)
    resolved = [
        output_relative_path(path, keep_suffix=True) if counts[output] > 1 else output
        for path, output in zip(relative, outputs, strict=True)
    ]
    return listing.append_column("output_path", pa.array(resolved, pa.string()))


LEDGER_KEYS = ("relative_path", "source_version")


def subtract_ledger(
    listing: pa.Table,
    ledger: pa.Table,
    *,
    model_id: str,
    retry_failed: bool,
    any_model: bool,
) -> pa.Table:
    """The listed inputs that still need colouring: a columnar anti-join, not a Python loop.

    An input is done when the ledger has a row for the same relative path and source version
    (a changed scan has a new ETag or mtime) that is ``ok`` (or ``failed``, unless failures are
    retried) and was made by this model (or any model, with ``any_model``).
    """
    if ledger.num_rows == 0 or listing.num_rows == 0:
        return listing
    done = pc.equal(ledger["status"], STATUS_OK)
    if not retry_failed:
        done = pc.or_(done, pc.equal(ledger["status"], STATUS_FAILED))
    if not any_model:
        done = pc.and_(done, pc.equal(ledger["model_id"], model_id))
    keys = ledger.filter(pc.fill_null(done, False)).select(list(LEDGER_KEYS))
    remaining = listing.join(keys, keys=list(LEDGER_KEYS), join_type="left anti")
    # join does not keep order; listing order (sorted per folder) makes --limit predictable.
    return remaining.sort_by([("relative_path", "ascending")])


def _to_manifest_table(rows: list[dict[str, Any]], run_id: str) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in MANIFEST_SCHEMA.names}
    for row in rows:
        started, finished = row.get("started_at"), row.get("finished_at")
        values = {
            **row,
            "run_id": run_id,
            "source_uri": redact_uri(str(row["source_uri"])),
            "started_at": datetime.fromtimestamp(started, UTC) if started else None,
            "finished_at": datetime.fromtimestamp(finished, UTC) if finished else None,
            "duration_s": (finished - started) if started and finished else None,
        }
        for name, column in columns.items():
            value = values.get(name)
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, float) and math.isnan(value):
                value = None
            column.append(value)
    return pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)


class ManifestWriter:
    """Appends part files under DST/manifest/run=<run_id>/ as rows arrive."""

    def __init__(
        self,
        dst: str,
        run_id: str,
        *,
        storage_options: Mapping[str, Any] | None,
        flush_rows: int,
        flush_seconds: float,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.folder = join(dst, "manifest", f"run={run_id}")
        self.timeout_s = timeout_s
        self.run_id = run_id
        self.storage_options = storage_options
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.pending: list[dict[str, Any]] = []
        self.parts = 0
        self.last_flush = time.monotonic()
        # Counts, not rows: the driver's memory must not grow with the archive.
        self.statuses: Counter[str] = Counter()
        self.error_types: Counter[str] = Counter()

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.pending.extend(rows)
        due = time.monotonic() - self.last_flush >= self.flush_seconds
        if len(self.pending) >= self.flush_rows or (due and self.pending):
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = _to_manifest_table(self.pending, self.run_id)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        write_bytes_atomic(
            join(self.folder, f"part-{self.parts:05d}.parquet"),
            buffer.getvalue(),
            storage_options=self.storage_options,
            timeout_s=self.timeout_s,
        )
        self.statuses.update(table.column("status").to_pylist())
        failed = table.filter(pc.equal(table["status"], STATUS_FAILED))
        self.error_types.update(failed.column("error_type").to_pylist())
        self.parts += 1
        self.pending = []
        self.last_flush = time.monotonic()

    @property
    def rows(self) -> int:
        return sum(self.statuses.values())


def _batch_rows(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist()


def run_colorize(
    config: ColorizeConfig,
    *,
    software: str,
    storage_options: Mapping[str, Any] | None = None,
    progress: Callable[[Progress], None] | None = None,
    listing: pa.Table | None = None,
    run_id: str | None = None,
    connect: Callable[[], None] | None = None,
    signing: SigningKeys | None = None,
) -> RunSummary:
    """Colour every image under config.src into config.dst; returns the run's summary.

    Ray must be initialised when there is work: ``connect`` is called first, and only then, so
    a nightly run with nothing new never starts Ray. ``listing`` lets a caller pass an
    already made listing instead of listing SRC again.

    Raises:
        ColorizeError: nothing to colour, or settings that cannot work.
        ArtifactError, StorageError: the model or a location cannot be used.
    """
    run_id = run_id or new_run_id()
    started_at = datetime.now(UTC)
    clock = time.perf_counter()
    model = load_model(config.model, storage_options=storage_options)
    if listing is None:
        listing = list_images(config.src, storage_options=storage_options)
        if listing.num_rows == 0:
            raise ColorizeError(f"{config.src}: no images found (looked for jpg, png, tif, ...)")
    listed = listing.num_rows
    # Output names from the whole listing, so a name collision resolves the same way whatever
    # the ledger or --limit leaves to do in this run.
    listing = with_output_paths(listing)
    already_done = 0
    if config.incremental:
        ledger = read_manifest(
            config.dst,
            storage_options=storage_options,
            columns=["relative_path", "source_version", "status", "model_id"],
        )
        listing = subtract_ledger(
            listing,
            ledger,
            model_id=model.model_id,
            retry_failed=config.retry_failed,
            any_model=config.any_model,
        )
        already_done = listed - listing.num_rows
    if config.limit is not None:
        listing = listing.slice(0, config.limit)
    options = StageOptions(
        run_id=run_id,
        dst=config.dst,
        model_url=config.model,
        model_id=model.model_id,
        model_sha256=model.sha256,
        image_size=model.config.image_size,
        software=software,
        max_pixels=config.max_pixels,
        png_compress_level=config.png_compress_level,
        finalize_threads=config.finalize_threads,
        output_bits=config.bits,
        storage_timeout_s=config.storage_timeout_s,
        storage_options=_worker_storage_options(config, storage_options),
        signing=signing,
    )
    writer = ManifestWriter(
        config.dst,
        run_id,
        storage_options=storage_options,
        flush_rows=config.flush_rows,
        flush_seconds=config.flush_seconds,
        timeout_s=config.storage_timeout_s,
    )
    state = Progress(total=listing.num_rows, skipped=already_done)
    if listing.num_rows:
        if connect is not None:
            connect()
        # Resolved once Ray is up, so the run summary records what ran.
        actors = colorizer_pool_size(config, ray.cluster_resources(), listing.num_rows)
        config = replace(config, actors=actors)
        # Counts the starts of scans in flight, so that one that kills its worker is tried
        # once more in isolation and then failed, instead of being retried forever.
        ledger = start_attempt_ledger()
        options = replace(options, attempt_ledger=ledger)
        try:
            for start in range(0, listing.num_rows, config.rows_per_execution):
                chunk = listing.slice(start, config.rows_per_execution)
                for batch in _stream(chunk, config, options, actors):
                    _record(_batch_rows(batch), writer, state)
                    state.elapsed_s = time.perf_counter() - clock
                    if progress:
                        progress(state)
        except Exception as err:
            outage = _storage_outage(err)
            if outage is None:
                raise
            raise _stopped_by_storage(outage, writer, state) from None
        finally:
            ray.kill(ledger)
    writer.flush()
    elapsed = time.perf_counter() - clock
    summary = RunSummary(
        run_id=run_id,
        model_id=model.model_id,
        listed=listed,
        attempted=writer.rows,
        ok=writer.statuses[STATUS_OK],
        failed=writer.statuses[STATUS_FAILED],
        # Inputs the ledger already had get no new row (DESIGN.md); the summary counts them.
        skipped=already_done + writer.statuses[STATUS_SKIPPED],
        elapsed_s=elapsed,
        images_per_second=writer.rows / elapsed if elapsed > 0 else 0.0,
        manifest_uri=writer.folder,
        summary_uri=join(config.dst, "runs", f"{run_id}.json"),
        error_types=dict(writer.error_types.most_common()),
        started_at=started_at.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    _write_run_summary(summary, config, storage_options, signing)
    return summary


def _record(rows: list[dict[str, Any]], writer: ManifestWriter, state: Progress) -> None:
    writer.add(rows)
    for row in rows:
        if row["status"] == STATUS_OK:
            state.ok += 1
        else:
            state.failed += 1


def _worker_storage_options(
    config: ColorizeConfig, storage_options: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """What the Ray workers use to reach the run's stores.

    Workers on other nodes, or started before the driver's AWS_* environment was set, do not
    share that environment: they get the driver's S3 endpoint, region and static credentials
    inside the task payloads (as training's workers do), never in a log or file.
    """
    if storage_options is not None:
        return dict(storage_options)
    s3_url = next(
        (url for url in (config.src, config.dst, config.model) if url.startswith("s3")), None
    )
    return portable_storage_options(s3_url) if s3_url else None


def _stopped_by_storage(
    outage: str, writer: ManifestWriter, state: Progress
) -> StorageUnavailableError:
    """The one-line error for a run the store stopped answering; keeps what finished.

    Every row that arrived is flushed if the manifest's store still takes it; if not, those
    inputs simply count as not done, and the next run colours them again.
    """
    unrecorded = 0
    try:
        writer.flush()
    except StorageUnavailableError:
        unrecorded = len(writer.pending)
    kept = (
        f"{state.done - unrecorded} finished and recorded ({unrecorded} finished but could not "
        "be recorded and will be done again)"
        if unrecorded
        else "what finished is recorded"
    )
    return StorageUnavailableError(
        f"the run stopped after {state.done} of {state.total} inputs: {outage}; "
        f"{kept}. Run the same command again once the store answers to do the rest"
    )


def _storage_outage(error: BaseException) -> str | None:
    """The message of the StorageUnavailableError behind ``error``, if the store stopped it.

    Only that error counts: the storage layer raises it once its own time budget is spent, so
    a Ray timeout or an unrelated ConnectionError is never mistaken for an outage. A Ray-made
    subclass of the task's error carries the task's whole traceback in its message; the
    task's own error, behind it in ``.cause``, has the one line.
    """
    found = [e for e in error_chain(error) if isinstance(e, StorageUnavailableError)]
    if not found:
        return None
    own = next((e for e in found if type(e) is StorageUnavailableError), found[0])
    message = str(own).strip()
    return message.splitlines()[0] if message else type(own).__name__


def _stream(listing: pa.Table, config: ColorizeConfig, options: StageOptions, actors: int) -> Any:
    """The Ray Data pipeline; yields manifest-row batches as pyarrow tables as they finish.

    ``actors`` is the run's pool size (colorizer_pool_size); a short last execution starts
    no more of them than it has blocks.
    """
    # Many small blocks: each prepare/finalize task takes a few inputs, so a cluster's CPUs
    # all get work and one huge scan does not hold up a long block behind it.
    blocks = [
        listing.slice(start, config.rows_per_block)
        for start in range(0, listing.num_rows, config.rows_per_block)
    ]
    dataset = ray.data.from_arrow(blocks)
    # On GPU, half a CPU per prepare task: resources that differ from the actor's keep Ray
    # Data from fusing decode into the GPU actor, which would starve the model of inputs. On
    # CPU the same resources as the actor's, so that decode is fused into the actor: the
    # model inputs skip a hop between processes, and the cores are shared either way
    # (measured on 2 cores, 512 scans: settled 19.9-21.0 fused vs 18.6-19.4 images/s).
    dataset = dataset.map_batches(
        prepare_batch,
        batch_size=None,
        fn_kwargs={"options": options},
        num_cpus=0.5 if config.gpu else actor_cpu_reservation(config),
    )
    dataset = dataset.map_batches(
        Colorizer,
        fn_constructor_kwargs={
            "model_url": options.model_url,
            "expected_sha256": options.model_sha256,
            "use_gpu": config.gpu,
            "precision": config.precision,
            "threads": config.actor_cpus,
            "storage_options": options.storage_options,
        },
        batch_size=config.batch_size,
        compute=ray.data.ActorPoolStrategy(size=min(actors, len(blocks))),
        num_gpus=1 if config.gpu else 0,
        num_cpus=actor_cpu_reservation(config),
    )
    dataset = dataset.map_batches(
        finalize_batch,
        batch_size=1,
        fn_kwargs={"options": options},
        num_cpus=config.finalize_threads,
    )
    if ray.cluster_resources().get("CPU", 0) <= _SMALL_CLUSTER_CPUS:
        # Ray Data reserves each operator a share of the CPUs. On a small cluster the 1-CPU
        # finalize tasks never fit their share and wait until inference has finished, so the
        # stages run one after another (measured on 2 cores: first output after 17 s of a
        # 30 s run). Without the reservation finalize runs beside the actor from the start.
        dataset.context.op_resource_reservation_enabled = False
    # A UDF's error reaches the driver inside Ray's RayTaskError, and Ray Data would first wrap
    # it in a UserCodeException whose cause chain does not survive the trip between processes:
    # raised as it is, a worker's StorageUnavailableError stays recognisable, so the run stops
    # in one line instead of a traceback (test_reliability, store down in the workers).
    dataset.context.raise_original_map_exception = True
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")


def _write_run_summary(
    summary: RunSummary,
    config: ColorizeConfig,
    storage_options: Mapping[str, Any] | None,
    signing: SigningKeys | None = None,
) -> None:
    document = {
        "run": asdict(summary),
        "config": {
            **asdict(config),
            "src": redact_uri(config.src),
            "dst": redact_uri(config.dst),
            "model": redact_uri(config.model),
        },
        "versions": {"ray": ray.__version__},
        # Who signed the outputs' content credentials: the certificate's subject, never a key.
        "signing": None if signing is None else signing.describe(),
    }
    data = (json.dumps(document, indent=2, sort_keys=True, default=str) + "\n").encode()
    write_bytes_atomic(
        summary.summary_uri, data, storage_options=storage_options,
        timeout_s=config.storage_timeout_s,
    )  # fmt: skip
