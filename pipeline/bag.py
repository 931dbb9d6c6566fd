"""Export the outputs of a DST as a BagIt bag (RFC 8493), checked against the manifest.

Layout of the bag::

    bagit.txt                        BagIt-Version 1.0, UTF-8; written last, so a bag whose
                                     export died is visibly incomplete
    bag-info.txt                     Payload-Oxum, Bagging-Date, Bag-Size, Bag-Software-Agent,
                                     External-Description, Chromascan-* provenance (source
                                     roots, models with their weights' sha256, runs, the IPTC
                                     digital source type), plus any --info fields
    manifest-sha256.txt              every payload file
    manifest-sha512.txt              every payload file
    tagmanifest-sha256.txt           every tag file above and below (not the tagmanifests)
    tagmanifest-sha512.txt
    data/<path under DST/images>     the colourised PNGs (provenance is inside each PNG)
    chromascan/manifest.parquet      one manifest row per payload file (the latest ok row,
                                     all manifest columns) plus bag_path
    chromascan/runs/<run_id>.json    the run summaries of the runs that made the payload
    chromascan/README.txt            what the above are, for whoever opens the bag in 2080

The bag is written here rather than by ``bagit.make_bag``: make_bag bags a local folder in
place, so it would need a full local copy first and then a second read of every file to hash
it. Writing it directly copies and hashes each output in one streaming pass, from a bucket as
well as a folder, and checks every sha256 against the manifest while it copies, so a bag can
never certify a file that no longer matches what chromascan wrote. The reference ``bagit``
package validates the result in the tests.

Paths: RFC 8493 asks for CR, LF and '%' in manifest paths to be percent-encoded, but bagit-
python, bagit-java and the other common validators decode only %0D and %0A
(LibraryOfCongress/bagit-python#157). Following the validators, CR and LF are encoded and '%'
is written as is; a path that already contains a literal %0A or %0D is refused, because no
validator could tell it from an encoded line break.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.manifest_query import APPROVED, ManifestQuery, ManifestToolError
from pipeline.manifest_tools import (
    OUTPUT_PATH,
    current_outputs,
    file_tasks,
    hash_stream,
    open_manifest,
    ordered_map,
    read_run_summary,
)
from pipeline.provenance import DIGITAL_SOURCE_TYPE, redact_uri
from pipeline.storage import StorageError, filesystem, join, portable_storage_options

BAGIT_TXT = b"BagIt-Version: 1.0\nTag-File-Character-Encoding: UTF-8\n"
ALGORITHMS = ("sha256", "sha512")
# Fields the exporter computes; --info may not override them or the bag would lie.
COMPUTED_FIELDS = ("Payload-Oxum", "Bagging-Date", "Bag-Size", "Bag-Software-Agent")
_LABEL = re.compile(r"^[^\s:][^:\r\n]*$")
_AMBIGUOUS = re.compile(r"%0[ad]", re.IGNORECASE)  # must not be read as CR / LF

README = """\
This bag holds AI-colourised derivatives of black-and-white scans, made by chromascan.
The scans are the masters and are not in this bag; every PNG under data/ names its source,
the source's sha256 and the model in its XMP, with the IPTC digital source type
compositeWithTrainedAlgorithmicMedia.

chromascan/manifest.parquet  one row per file under data/ (column bag_path): the source URI,
                             size, version and sha256, what was decoded, the output's sha256,
                             size and dimensions, the model id and its weights' sha256, the
                             colourfulness, and when and where it was made. Readable by
                             pyarrow, pandas, DuckDB, Spark and R's arrow package.
chromascan/runs/<id>.json    the settings and counts of each run that made a file here.
bag-info.txt                 Chromascan-* fields summarise the same provenance.
"""


class BagError(ManifestToolError):
    """The bag cannot be made as asked; the message says why and what to do."""


@dataclass(frozen=True)
class BagResult:
    bag: str
    files: int
    octets: int
    models: tuple[str, ...]
    runs: int
    elapsed_s: float


def encode_manifest_path(path: str) -> str:
    """A payload path as a manifest line writes it (see the module docstring on '%')."""
    if _AMBIGUOUS.search(path):
        raise BagError(
            f"{path!r}: contains a literal %0A or %0D, which BagIt validators read as a line "
            "break; rename the file to bag it"
        )
    return path.replace("\r", "%0D").replace("\n", "%0A")


# Absolute, empty, '.' or '..' segments: the manifest is data, and a crafted output_uri must
# not make the export write outside the bag. Then the ambiguous %0A / %0D (above).
_UNSAFE_PATH = r"^/|^$|/$|//|(^|/)\.\.?(/|$)"


def _check_paths(paths: pa.ChunkedArray) -> None:
    """Refuse, before copying anything, a payload path that cannot be bagged as it is."""
    unsafe = pc.match_substring_regex(paths, _UNSAFE_PATH)
    if pc.any(unsafe).as_py():
        path = paths.filter(unsafe)[0].as_py()
        raise BagError(f"{path!r}: not a plain relative path under images/; refusing to bag it")
    ambiguous = pc.match_substring_regex(paths, _AMBIGUOUS.pattern, ignore_case=True)
    if pc.any(ambiguous).as_py():
        encode_manifest_path(paths.filter(ambiguous)[0].as_py())  # raises, naming the path


def human_size(octets: int) -> str:
    value = float(octets)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def check_info_fields(info: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Validate user bag-info fields: labels without ':' or leading space, one-line values."""
    checked = []
    for raw_label, value in info:
        label = raw_label.strip()
        if not _LABEL.match(label):
            raise BagError(f"bag-info label {label!r} must not be empty or contain ':'")
        if label.lower() in (name.lower() for name in COMPUTED_FIELDS):
            raise BagError(f"bag-info field {label} is computed by the export; drop it")
        if "\n" in value or "\r" in value:
            raise BagError(f"bag-info field {label} must be one line")
        checked.append((label, value.strip()))
    return checked


class _HashedWriter:
    """A binary handle that also hashes what goes through it (tag manifests need the sums)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.hashers = {name: hashlib.new(name) for name in ALGORITHMS}

    def write(self, data: bytes) -> None:
        self.handle.write(data)
        for hasher in self.hashers.values():
            hasher.update(data)

    def digests(self) -> dict[str, str]:
        return {name: hasher.hexdigest() for name, hasher in self.hashers.items()}


def _source_roots(outputs: pa.Table) -> list[str]:
    roots = set()
    for uri, relative in zip(
        outputs["source_uri"].to_pylist(), outputs["relative_path"].to_pylist(), strict=True
    ):
        if uri and relative and uri.endswith("/" + relative):
            roots.add(uri[: -len(relative) - 1])
    return sorted(roots)


def export_bag(
    dst: str,
    bag: str,
    *,
    software: str,
    info: Sequence[tuple[str, str]] = (),
    storage_options: Mapping[str, Any] | None = None,
    workers: int = 8,
    now: datetime | None = None,
    approved_only: bool = False,
    engine: str = "threads",
    connect: Callable[[], None] | None = None,
) -> BagResult:
    """Write a BagIt bag of DST's current outputs to ``bag`` (a new or empty folder or prefix).

    ``engine``: "threads" copies on this machine; "ray" copies in Ray Data tasks (``workers``
    at a time) on the cluster ``connect`` joins, so ``bag`` must be a place the cluster can
    write (a bucket, or a local folder for a local Ray). ``approved_only``: only the outputs
    whose latest review decision approves them in their current form.

    Raises:
        BagError: the bag location is taken, an output is missing or changed, or a path
            cannot be bagged. What was written is removed again.
        StorageError, ManifestToolError: DST cannot be read or holds no manifest.
    """
    started = time.perf_counter()
    info = check_info_fields(info)
    table = open_manifest(dst, storage_options=storage_options)
    outputs, unlocatable = current_outputs(table, dst)
    if unlocatable.num_rows:
        raise BagError(
            f"{unlocatable.num_rows} ok manifest rows name outputs outside {redact_uri(dst)}"
            f"/images (e.g. {unlocatable['output_uri'][0].as_py()}); cannot bag them"
        )
    if approved_only:
        outputs = _approved(dst, outputs, storage_options)
        if outputs.num_rows == 0:
            raise BagError(
                f"{redact_uri(dst)}: no approved outputs to bag (approve some with "
                "`chromascan review`)"
            )
    if outputs.num_rows == 0:
        raise BagError(f"{redact_uri(dst)}: no coloured outputs to bag (no ok manifest rows)")
    _check_paths(outputs[OUTPUT_PATH])

    bag_fs, bag_root = filesystem(bag, storage_options)
    bag_root = bag_root.rstrip("/")
    existed = _claim(bag_fs, bag_root, bag)
    try:
        bag_fs.makedirs(bag_root, exist_ok=True)
        if engine == "ray" and connect is not None:
            connect()
        octets, manifest_digests = _write_payload(
            dst, bag, bag_fs, bag_root, outputs, storage_options=storage_options,
            workers=workers, engine=engine,
        )  # fmt: skip
        run_ids = sorted(set(outputs["run_id"].to_pylist()))
        models = _models(outputs)
        tag_files = _tag_files(dst, outputs, run_ids, storage_options=storage_options)
        tag_files["bag-info.txt"] = _bag_info(
            dst, outputs, run_ids, models, octets=octets, software=software, info=info,
            now=now or datetime.now(UTC),
        )  # fmt: skip
        tag_files["bagit.txt"] = BAGIT_TXT
        for name, data in tag_files.items():
            if name != "bagit.txt":
                _write(bag_fs, f"{bag_root}/{name}", data)
        # The payload manifests were hashed as they were written; the rest are small.
        digests = {
            **manifest_digests,
            **{
                name: {algorithm: hashlib.new(algorithm, data).hexdigest()
                       for algorithm in ALGORITHMS}
                for name, data in tag_files.items()
            },
        }  # fmt: skip
        for algorithm in ALGORITHMS:
            lines = "".join(f"{digests[name][algorithm]}  {name}\n" for name in sorted(digests))
            _write(bag_fs, f"{bag_root}/tagmanifest-{algorithm}.txt", lines.encode())
        _write(bag_fs, f"{bag_root}/bagit.txt", BAGIT_TXT)  # last: the bag is complete
    except BaseException:
        _release(bag_fs, bag_root, existed)
        raise
    return BagResult(
        bag=redact_uri(bag),
        files=outputs.num_rows,
        octets=octets,
        models=tuple(models),
        runs=len(run_ids),
        elapsed_s=time.perf_counter() - started,
    )


def _approved(dst: str, outputs: pa.Table, storage_options: Mapping[str, Any] | None) -> pa.Table:
    """The outputs whose latest decision in DST/review/ approves that very output (sha256)."""
    with ManifestQuery(dst, storage_options=storage_options) as query:
        approved = query.table(
            "SELECT DISTINCT source_uri, output_sha256 FROM outputs WHERE review = ?", [APPROVED]
        )
    if approved.num_rows == 0:
        return outputs.slice(0, 0)
    keys = approved.append_column("approved", pa.array([True] * approved.num_rows))
    joined = outputs.join(keys, keys=["source_uri", "output_sha256"], join_type="inner")
    return joined.drop_columns(["approved"]).select(outputs.column_names).sort_by(OUTPUT_PATH)


def _claim(fs: Any, root: str, shown: str) -> bool:
    """Make sure the bag location is free; returns whether the (empty) folder existed."""
    try:
        if fs.isfile(root):
            raise BagError(f"{redact_uri(shown)}: is a file; give a new folder for the bag")
        if fs.isdir(root):
            if fs.ls(root, detail=False):
                raise BagError(
                    f"{redact_uri(shown)}: already exists and is not empty; give a new folder"
                )
            return True
    except OSError as err:
        raise StorageError(
            f"{redact_uri(shown)}: cannot use ({type(err).__name__}: {err})"
        ) from err
    return False


def _release(fs: Any, root: str, existed: bool) -> None:
    """Remove a half-written bag (the folder itself only if we made it)."""
    try:
        if existed:
            for child in fs.ls(root, detail=False):
                fs.rm(child, recursive=True)
        elif fs.exists(root):
            fs.rm(root, recursive=True)
    except OSError:
        pass  # the original error matters more; an incomplete bag has no bagit.txt anyway


def _write(fs: Any, path: str, data: bytes) -> None:
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as handle:
        handle.write(data)


class _Copier:
    """Copies outputs into the bag's data/, hashing as it goes; made where it runs."""

    def __init__(self, dst: str, bag: str, storage_options: Mapping[str, Any] | None) -> None:
        self.dst = dst
        self.src_fs, images_root = filesystem(join(dst, "images"), storage_options)
        self.images_root = images_root.rstrip("/")
        self.bag_fs, bag_root = filesystem(bag, storage_options)
        self.bag_root = bag_root.rstrip("/")
        self.made: set[str] = set()

    def copy(self, row: Mapping[str, Any]) -> tuple[str, dict[str, str], int]:
        path = row[OUTPUT_PATH]
        target = f"{self.bag_root}/data/{path}"
        parent = target.rsplit("/", 1)[0]
        if parent not in self.made:
            self.bag_fs.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        try:
            with self.bag_fs.open(target, "wb") as handle:
                digests, size = hash_stream(
                    self.src_fs, f"{self.images_root}/{path}", algorithms=ALGORITHMS,
                    copy_to=handle,
                )  # fmt: skip
        except FileNotFoundError as err:
            raise BagError(
                f"{path}: in the manifest but missing from {redact_uri(self.dst)}/images "
                "(manifest verify lists every problem)"
            ) from err
        if digests["sha256"] != row["output_sha256"]:
            raise BagError(
                f"{path}: sha256 differs from the manifest's; it was changed after colouring "
                "(manifest verify lists every problem)"
            )
        return path, digests, size


RAY_BATCH_ROWS = 64  # outputs per copy task


def copy_batch(
    batch: pa.Table, *, dst: str, bag: str, storage_options: Mapping[str, Any] | None
) -> pa.Table:
    """Ray Data stage: copy one batch into the bag; (path, digests, size) or the error."""
    copier = _Copier(dst, bag, storage_options)
    paths, sha256, sha512, sizes, errors = [], [], [], [], []
    for row in batch.to_pylist():
        try:
            path, digests, size = copier.copy(row)
        except (BagError, OSError) as err:
            path, digests, size = row[OUTPUT_PATH], {}, 0
            errors.append(str(err) if isinstance(err, BagError) else f"{path}: {err}")
        else:
            errors.append(None)
        paths.append(path)
        sha256.append(digests.get("sha256"))
        sha512.append(digests.get("sha512"))
        sizes.append(size)
    return pa.table({"path": paths, "sha256": sha256, "sha512": sha512, "size": sizes,
                     "error": pa.array(errors, pa.string())})  # fmt: skip


def _task_options(
    dst: str, bag: str, storage_options: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """The driver's S3 settings for the tasks (they may not share its environment)."""
    if storage_options is not None:
        return dict(storage_options)
    s3_url = next((url for url in (dst, bag) if url.startswith("s3")), None)
    return portable_storage_options(s3_url) if s3_url else None


def _copy_on_ray(
    outputs: pa.Table,
    *,
    dst: str,
    bag: str,
    storage_options: Mapping[str, Any] | None,
    workers: int,
) -> Iterator[tuple[str, dict[str, str], int]]:
    """Copy in Ray Data tasks where the files are; yield what the payload manifests need."""
    batches = file_tasks(
        outputs.select([OUTPUT_PATH, "output_sha256"]),
        copy_batch,
        rows_per_task=RAY_BATCH_ROWS,
        workers=workers,
        fn_kwargs={
            "dst": dst,
            "bag": bag,
            "storage_options": _task_options(dst, bag, storage_options),
        },
    )
    for batch in batches:
        for row in batch.to_pylist():
            if row["error"] is not None:
                raise BagError(row["error"])
            yield row["path"], {"sha256": row["sha256"], "sha512": row["sha512"]}, row["size"]


def _write_payload(
    dst: str,
    bag: str,
    bag_fs: Any,
    bag_root: str,
    outputs: pa.Table,
    *,
    storage_options: Mapping[str, Any] | None,
    workers: int,
    engine: str = "threads",
) -> tuple[int, dict[str, dict[str, str]]]:
    """Copy every output into data/, hashing as it goes; write the payload manifests.

    Returns the payload's total size and each manifest file's own digests (for the tag
    manifests), so neither manifest has to be read back.
    """
    rows = (
        row
        for batch in outputs.select([OUTPUT_PATH, "output_sha256"]).to_batches(1024)
        for row in batch.to_pylist()
    )
    if engine == "ray":
        copied: Iterator[tuple[str, dict[str, str], int]] = _copy_on_ray(
            outputs, dst=dst, bag=bag, storage_options=storage_options, workers=workers
        )
    else:
        copier = _Copier(dst, bag, storage_options)
        copied = ordered_map(copier.copy, rows, workers=workers)
    octets = 0
    writers = {
        name: _HashedWriter(bag_fs.open(f"{bag_root}/manifest-{name}.txt", "wb"))
        for name in ALGORITHMS
    }
    try:
        for path, digests, size in copied:
            octets += size
            for name, writer in writers.items():
                writer.write(f"{digests[name]}  data/{encode_manifest_path(path)}\n".encode())
    finally:
        for writer in writers.values():
            writer.handle.close()
    return octets, {f"manifest-{name}.txt": writer.digests() for name, writer in writers.items()}


def _models(outputs: pa.Table) -> list[str]:
    pairs = outputs.select(["model_id", "model_sha256"]).group_by(["model_id", "model_sha256"])
    rows = pairs.aggregate([]).to_pylist()
    return sorted(f"{row['model_id']} sha256:{row['model_sha256']}" for row in rows)


def _tag_files(
    dst: str,
    outputs: pa.Table,
    run_ids: list[str],
    *,
    storage_options: Mapping[str, Any] | None,
) -> dict[str, bytes]:
    payload = outputs.append_column(
        "bag_path", pc.binary_join_element_wise("data/", outputs[OUTPUT_PATH], "")
    ).drop_columns([OUTPUT_PATH])
    buffer = io.BytesIO()
    pq.write_table(payload, buffer, compression="zstd")
    files = {
        "chromascan/manifest.parquet": buffer.getvalue(),
        "chromascan/README.txt": README.encode(),
    }
    for run_id in run_ids:
        document = read_run_summary(dst, run_id, storage_options=storage_options)
        if document is not None:
            files[f"chromascan/runs/{run_id}.json"] = (
                json.dumps(document, indent=2, sort_keys=True) + "\n"
            ).encode()
    return files


def _bag_info(
    dst: str,
    outputs: pa.Table,
    run_ids: list[str],
    models: list[str],
    *,
    octets: int,
    software: str,
    info: Sequence[tuple[str, str]],
    now: datetime,
) -> bytes:
    fields: list[tuple[str, str]] = [
        ("Bag-Software-Agent", software),
        ("Bagging-Date", now.date().isoformat()),
        ("Bag-Size", human_size(octets)),
        ("Payload-Oxum", f"{octets}.{outputs.num_rows}"),
        (
            "External-Description",
            "AI-colourised derivatives of black-and-white scans, made by chromascan; "
            "the scans are the masters. See chromascan/README.txt.",
        ),
        ("Chromascan-Destination", redact_uri(dst)),
        *(("Chromascan-Source", root) for root in _source_roots(outputs)),
        *(("Chromascan-Model", model) for model in models),
        ("Chromascan-Runs", f"{len(run_ids)}: {run_ids[0]} to {run_ids[-1]}"),
        ("Chromascan-Digital-Source-Type", DIGITAL_SOURCE_TYPE),
        ("Chromascan-Manifest", "chromascan/manifest.parquet"),
        *info,
    ]
    return "".join(f"{label}: {value}\n" for label, value in fields).encode()
