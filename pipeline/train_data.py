"""Training ingest: colour photos under any storage URL -> what a pix2pix worker trains on.

On the driver (``prepare_training_data``), once per run, with Ray Data:

1. list SRC recursively by image extension (``pipeline.listing``), and the validation URL
   when one is given; otherwise hold out a fraction of SRC, chosen by a hash of each photo's
   relative path so that a re-run (a resume) holds out the same photos;
2. read, decode (JPEGs at a reduced scale) and resize every photo to the load size as uint8
   RGB, in parallel CPU tasks; photos that fail are counted and logged with their path, grey
   ones are counted apart (see ``prepare_training_photo``); neither stops training;
3. in the same tasks, one streaming execution, write them as Parquet shards of ~2 MiB under
   the run's storage path (OUTPUT/data/<fingerprint>/{train,val}/): every listed photo is a
   row with its status, usable ones with their raw pixels; the photos in a seeded random
   order, so that every shard is a sample of the whole set. Only the status rows come back
   to the driver, which counts and reports the skipped photos as they stream past: no pass
   of its own. A rerun over the same listing (a resume) finds the shards complete
   (prepared.json) and decodes nothing; it counts from the shards' status columns.

Every epoch (``TrainingData.train``, a lazy Ray Data read of the shards):

4. Ray Train's streaming split reads the shards again, in a new random order, in zero-CPU
   tasks, into the workers' ``iter_torch_batches`` with a small local shuffle buffer. The
   object store holds the blocks in flight, a window bounded by Ray Data's backpressure
   and the shuffle buffers, never the whole set; the validation photos (few, fixed) are
   the only ones kept in it.

On each training worker, per batch (``random_crop_flip``, ``to_model_lab``):

5. the pix2pix recipe: an independent random crop to the model size and a coin-flip mirror
   per photo, drawn afresh every epoch;
6. sRGB -> CIE Lab via ``models.colour``: normalised L is the input, normalised ab the target.

Why a decoded copy at the load size rather than decoding the photos every epoch: decoding a
full-size JPEG costs far more than a training step at 64², so re-decoding every epoch (200 in
the recipe) would bound throughput by storage and decode, and Train workers hold every CPU of
a small machine, so per-epoch decode tasks would compete with them. Reading a shard back is a
zstd decompression and no image decode, light enough to run in zero-CPU read tasks beside the
workers. The shards are read by our own function over a list of their URIs rather than by
``ray.data.read_parquet``, whose planning (file metadata, size sampling) is redone at every
execution: 7-12 s an epoch on a loaded 2-core machine for a single small file, against
0.3 s for the list. uint8 at the load size is 3.2× smaller to ship than float Lab at the
model size, and the crop and flip draw from the worker's torch RNG, which checkpoints save
and restore.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq
import ray.data
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from models.colour import normalize_ab, normalize_l, rgb_to_lab
from models.metrics import colorfulness
from pipeline.decode import DecodeError, decode_image
from pipeline.listing import IMAGE_EXTENSIONS, list_images
from pipeline.provenance import redact_uri
from pipeline.storage import (
    StorageError,
    filesystem,
    join,
    portable_storage_options,
    read_bytes,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

# pix2pix resizes 256² crops' sources to 286²; other model sizes keep the same proportion.
LOAD_SIZE_RATIO = 286 / 256
# Hasler–Süsstrunk M below this is grey for training purposes. Their scale puts "slightly
# colourful" at 15; grey scans stored as RGB, with a faint cast, score 0-3; toned (sepia)
# prints score 10-35 and are kept: they are not grey, and leaving them out is curation.
DEFAULT_MIN_COLORFULNESS = 5.0
DEFAULT_VAL_FRACTION = 0.1

STATUS_OK = "ok"
STATUS_GREY = "grey"  # decodable, but without colour to learn ab from
STATUS_FAILED = "failed"  # unreadable or not an image

# Decode blocks are shard-sized (8 photos at 286²), but at least this many, so that small
# sets still decode on every CPU.
_MIN_BLOCKS = 16
_READ_TASKS = 2  # shard reads in flight per execution (epoch)
_MAX_URI_BLOCKS = 10_000
# The decoded copy: OUTPUT/data/<fingerprint>/{train,val}/*.parquet and prepared.json.
PREPARED_FOLDER = "data"
PREPARED_FILE = "prepared.json"  # written last: the shards beside it are complete
_PREPARED_FORMAT = 1  # bump when the shards' columns or their meaning change
_FINGERPRINT_CHARS = 16
# Decoded bytes per shard file and per block in flight: 8 photos at 286². Small against any
# object store (Ray Data's streaming budget is a fraction of it, and each worker's shuffle
# buffer pins the blocks its rows came from); reading one is a 1-2 MB request.
_SHARD_BYTES = 2 * 1024 * 1024
_STATUS_COLUMNS = ("source_uri", "status", "error_type", "error_message")
# Errors reading one listed file can raise (gone since the listing, no permission, network).
_READ_ERRORS = (StorageError, OSError)


class TrainingDataError(ValueError):
    """The photos cannot train a model: none found, none usable, or too few for the setup."""


class TrainingConfigError(ValueError):
    """Training settings that cannot work, or cannot continue the run already in OUTPUT.

    Defined here rather than in pipeline.training so that the CLI can name it without
    importing Ray Train.
    """


class GreyPhotoError(ValueError):
    """A decodable photo without colour; the generator would learn nothing but ab = 0."""


@dataclass(frozen=True)
class SkippedPhoto:
    """A listed photo that does not take part in training, and why."""

    source_uri: str
    status: str  # STATUS_GREY or STATUS_FAILED
    error_type: str  # DecodeError's type (UnidentifiedImageError, ...), or GreyPhoto
    message: str


@dataclass(frozen=True)
class TrainingData:
    """The prepared photos: a streamed training set, the validation set, what was skipped."""

    # ray.data.Dataset, lazy: every execution (epoch) reads the shards again, files in a new
    # random order; column "rgb": (load_size, load_size, 3) uint8.
    train: Any
    # ray.data.Dataset, materialised; columns "rgb": (image_size, image_size, 3) uint8, and
    # "source_uri".
    val: Any
    source_url: str  # redacted of any user:password
    val_url: str | None  # separate validation URL, or None when held out of source_url
    val_fraction: float  # the held-out share of source_url (0 when val_url is given)
    image_size: int
    load_size: int
    listed: int  # image files listed under both URLs
    train_images: int  # usable photos in train
    val_images: int  # usable photos in val
    skipped: tuple[SkippedPhoto, ...] = field(repr=False)
    sample_uris: tuple[str, ...] = ()  # validation photos shown in each checkpoint's grid
    prepare_seconds: float = 0.0
    prepared_url: str = ""  # the decoded copy's folder, OUTPUT/data/<fingerprint>
    reused: bool = False  # the decoded copy was already there (a rerun): nothing was decoded
    shard_uris: tuple[str, ...] = field(default=(), repr=False)  # train's, ~2 MiB each

    @property
    def grey(self) -> int:
        return sum(1 for s in self.skipped if s.status == STATUS_GREY)

    @property
    def failed(self) -> int:
        return sum(1 for s in self.skipped if s.status == STATUS_FAILED)


def load_size_for(image_size: int) -> int:
    """The side photos are resized to before the random crop: 286 for 256, in proportion."""
    return round(image_size * LOAD_SIZE_RATIO)


def _readable(listing: pa.Table, where: str) -> pa.Table:
    """The listing less the files known unreadable from their names alone, which are logged."""
    unreadable = pc.is_valid(listing["listing_error"])
    skipped = pc.sum(unreadable).as_py() or 0
    if skipped:
        first = listing.filter(unreadable)["listing_error"][0].as_py()
        logger.warning("%s: skipping %d unreadable file(s), e.g. %s", where, skipped, first)
    return listing.filter(pc.invert(unreadable))


def split_listing(
    listing: pa.Table, *, val_fraction: float, seed: int = 0
) -> tuple[pa.Table, pa.Table]:
    """Hold out ``round(n × val_fraction)`` photos (at least one when the fraction is > 0).

    The held-out photos are those whose sha256(seed, relative path) sorts first: the same
    photos on every run over the same folder, whatever the listing order, and mostly the same
    ones when photos are added. Returns (train, val).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = listing.num_rows
    held_out = 0 if val_fraction == 0 or count < 2 else max(1, round(count * val_fraction))
    held_out = min(held_out, count - 1)  # keep at least one photo to train on
    keys = [
        hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()
        for path in listing.column("relative_path").to_pylist()
    ]
    order = sorted(range(count), key=keys.__getitem__)
    # Typed indices: an empty Python list would be a null array, which take() refuses.
    val_rows = pa.array(sorted(order[:held_out]), type=pa.int64())
    train_rows = pa.array(sorted(order[held_out:]), type=pa.int64())
    return listing.take(train_rows), listing.take(val_rows)


def prepare_training_photo(
    data: bytes, *, size: int, min_colorfulness: float = DEFAULT_MIN_COLORFULNESS
) -> np.ndarray:
    """A photo file's bytes -> (size, size, 3) uint8 sRGB, the whole photo squashed to a square.

    Squashing rather than cropping to a square matches what colourising does at inference
    (the whole scan is resized to the model size), so the model trains on the geometry it will
    see. Bicubic, as in pix2pix; Pillow filters properly when shrinking.

    Raises:
        DecodeError: not a decodable image.
        GreyPhotoError: a grey image (one channel, or RGB with colourfulness below
            ``min_colorfulness``): training on it would teach the generator to predict grey.
    """
    decoded = decode_image(data, draft_size=size)
    pixels = decoded.pixels
    if pixels.ndim == 2:
        raise GreyPhotoError(f"grey image ({decoded.mode}, {decoded.width}×{decoded.height})")
    if pixels.dtype == np.uint16:  # 8 bits are plenty for colour targets
        pixels = np.rint(pixels / 257.0).astype(np.uint8)
    resized = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC))
    score = colorfulness(resized)
    if score < min_colorfulness:
        raise GreyPhotoError(
            f"no colour to learn from: colourfulness {score:.1f} < {min_colorfulness:g}"
        )
    return resized


def read_and_prepare_batch(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    min_colorfulness: float,
    storage_options: Mapping[str, Any] | None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: listing rows -> status, reason and (size, size, 3) uint8 RGB.

    Every input row gives one output row; rows that are not usable carry zeros and the reason,
    so the driver can count and report them. Nothing raised by one file stops the batch.
    """
    uris = [str(uri) for uri in batch["source_uri"]]
    rgb = np.zeros((len(uris), size, size, 3), dtype=np.uint8)
    status, error_type, message = [], [], []
    for index, uri in enumerate(uris):
        try:
            data = read_bytes(uri, storage_options=storage_options)
            rgb[index] = prepare_training_photo(
                data or b"", size=size, min_colorfulness=min_colorfulness
            )
        except GreyPhotoError as err:
            status.append(STATUS_GREY)
            error_type.append("GreyPhoto")
            message.append(str(err))
            logger.info("skipping grey photo %s: %s", redact_uri(uri), err)
        except DecodeError as err:
            status.append(STATUS_FAILED)
            error_type.append(err.error_type)
            message.append(str(err))
            logger.warning("skipping %s: %s (%s)", redact_uri(uri), err, err.error_type)
        except _READ_ERRORS as err:
            status.append(STATUS_FAILED)
            error_type.append(type(err).__name__)
            message.append(str(err))
            logger.warning("skipping %s: cannot read (%s)", redact_uri(uri), err)
        else:
            status.append(STATUS_OK)
            error_type.append("")
            message.append("")
    return {
        "source_uri": np.array(uris, dtype=object),
        "status": np.array(status, dtype=object),
        "error_type": np.array(error_type, dtype=object),
        "error_message": np.array(message, dtype=object),
        "rgb": rgb,
    }


def arrow_location(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[str, Any | None]:
    """(path, pyarrow filesystem or None) for Ray's readers and writers from any fsspec URL.

    Local paths go to Ray as absolute paths. Anything else is wrapped as a pyarrow filesystem
    over our own fsspec one, so that Ray reaches it with exactly the endpoint and credentials
    the rest of chromascan uses (pyarrow's S3 client ignores AWS_ENDPOINT_URL).
    """
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        return str(Path(path).resolve()), None
    return path.rstrip("/"), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def prepared_fingerprint(
    listing: PhotoListing, *, image_size: int, min_colorfulness: float, seed: int = 0
) -> str:
    """sha256 of everything the decoded copy depends on: the listed files and the settings.

    A file that changed (size, ETag or mtime), was added or went away gives another
    fingerprint, hence a fresh decoded copy; the same listing finds the copy it made before.
    """
    digest = hashlib.sha256()
    settings = {
        "format": _PREPARED_FORMAT,
        "image_size": image_size,
        "load_size": load_size_for(image_size),
        "min_colorfulness": min_colorfulness,
        "seed": seed,
    }
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for part, table in (("train", listing.train), ("val", listing.val)):
        digest.update(f"\n[{part}]\n".encode())
        keys = table.select(["source_uri", "source_size", "source_version"]).sort_by("source_uri")
        for batch in keys.to_batches(max_chunksize=10_000):
            uris, sizes, versions = (column.to_pylist() for column in batch.columns)
            for uri, size, version in zip(uris, sizes, versions, strict=True):
                digest.update(f"{uri}\0{size}\0{version}\n".encode())
    return digest.hexdigest()


def rows_per_shard(size: int) -> int:
    """Photos per shard file (and per block in flight): about _SHARD_BYTES of decoded pixels."""
    return max(1, _SHARD_BYTES // (size * size * 3))


def shuffle_buffer_rows(size: int) -> int:
    """Rows each worker's local shuffle buffer holds: two shards' worth (4 MiB of pixels).

    The rows of every shard are already a random sample of the archive and the shards come
    in a new order every epoch; the buffer only varies which of them share a batch. A larger
    one would cost object store, not just worker memory: the rows it holds keep the blocks
    they came from pinned in the store.
    """
    return 2 * rows_per_shard(size)


def shard_name(uris: list[str]) -> str:
    """A shard's file name, from the photos in it: a retried task rewrites the same file."""
    digest = hashlib.sha256("\n".join(uris).encode()).hexdigest()[:20]
    return f"shard-{digest}.parquet"


def write_shard_batch(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    min_colorfulness: float,
    source_options: Mapping[str, Any] | None,
    shard_folder: str,
    target_options: Mapping[str, Any] | None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: listing rows -> one Parquet shard written -> status rows.

    The shard holds every row of the batch with its status; usable ones carry their pixels
    as raw bytes (binary, not a list of uint8: Parquet reads a byte string back in one copy).
    What returns to the driver is only the status columns and the shard's URI, no pixels.
    """
    prepared = read_and_prepare_batch(
        batch, size=size, min_colorfulness=min_colorfulness, storage_options=source_options
    )
    usable = prepared["status"] == STATUS_OK
    pixels = [rgb.tobytes() if ok else b"" for rgb, ok in zip(prepared["rgb"], usable, strict=True)]
    table = pa.table(
        {
            **{name: pa.array(prepared[name].tolist(), pa.string()) for name in _STATUS_COLUMNS},
            "rgb": pa.array(pixels, pa.binary()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    uri = join(shard_folder, shard_name(table["source_uri"].to_pylist()))
    write_bytes_atomic(uri, sink.getvalue().to_pybytes(), storage_options=target_options)
    status = {name: prepared[name] for name in _STATUS_COLUMNS}
    return {**status, "shard_uri": np.array([uri] * len(usable), dtype=object)}


def read_shard_batch(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    columns: tuple[str, ...],
    storage_options: Mapping[str, Any] | None,
) -> dict[str, np.ndarray]:
    """Ray Data batch function: shard URIs -> their usable photos' ``columns``.

    "rgb" comes back as (N, size, size, 3) uint8; any other column as it was stored.
    """
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    read = [name for name in columns if name != "rgb"] + ["status", *(["rgb"] * ("rgb" in columns))]
    for uri in batch["shard_uri"]:
        data = read_bytes(str(uri), storage_options=storage_options)
        table = pq.read_table(pa.BufferReader(data or b""), columns=list(dict.fromkeys(read)))
        table = table.filter(pc.equal(table["status"], STATUS_OK))
        for name in columns:
            if name == "rgb":
                flat = np.frombuffer(b"".join(table["rgb"].to_pylist()), dtype=np.uint8)
                parts[name].append(flat.reshape(table.num_rows, size, size, 3))
            else:
                parts[name].append(np.array(table[name].to_pylist(), dtype=object))
    if not batch["shard_uri"].size:
        return {name: np.zeros((0, size, size, 3), np.uint8) for name in columns}
    return {name: np.concatenate(values) for name, values in parts.items()}


def _shard_dataset(shard_uris: list[str]) -> Any:
    # A block per shard up to _MAX_URI_BLOCKS (Ray Data reorders and splits blocks between
    # workers); beyond that the driver would create too many tiny objects.
    return ray.data.from_items(
        [{"shard_uri": uri} for uri in shard_uris],
        override_num_blocks=max(1, min(len(shard_uris), _MAX_URI_BLOCKS)),
    )


def read_shards_shuffled(
    batch: dict[str, np.ndarray],
    *,
    size: int,
    columns: tuple[str, ...],
    storage_options: Mapping[str, Any] | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data batch function: a block of shard URIs -> their usable photos, shard by shard.

    The shards of the block in a new random order every execution (unseeded on purpose), and
    one output block per shard: a block is what the object store holds at a time.
    """
    uris = batch["shard_uri"]
    for index in np.random.default_rng().permutation(len(uris)):
        yield read_shard_batch(
            {"shard_uri": uris[index : index + 1]},
            size=size,
            columns=columns,
            storage_options=storage_options,
        )


def _write_shards(
    listing: pa.Table,
    shard_folder: str,
    *,
    size: int,
    min_colorfulness: float,
    seed: int,
    source_options: Mapping[str, Any] | None,
    target_options: Mapping[str, Any] | None,
) -> Any:
    """Decode a listing on Ray Data into Parquet shards; the status rows, lazily (a Dataset).

    One streaming execution, run as the caller iterates the status rows: decoded pixels go
    from decode to shard inside one task and never enter the object store. The rows are
    shuffled first (seeded), so that every shard is a random sample of the archive: reading
    the shards in a new order each epoch then mixes photos from all over it.
    """
    count = listing.num_rows
    order = np.random.default_rng(seed).permutation(count)
    shuffled = listing.select(["source_uri"]).take(pa.array(order, type=pa.int64()))
    per_shard = rows_per_shard(size)
    # Shard-sized blocks, but at least _MIN_BLOCKS of them so that small sets still decode
    # on every CPU.
    rows_per_block = max(1, min(per_shard, math.ceil(count / _MIN_BLOCKS)))
    blocks = max(1, math.ceil(count / rows_per_block))
    return ray.data.from_arrow(shuffled, override_num_blocks=blocks).map_batches(
        write_shard_batch,
        fn_kwargs={
            "size": size,
            "min_colorfulness": min_colorfulness,
            "source_options": source_options,
            "shard_folder": shard_folder,
            "target_options": target_options,
        },
        batch_size=None,  # one shard per block
        batch_format="numpy",
    )


def _read_status(shard_uris: list[str], *, storage_options: Mapping[str, Any] | None) -> Any:
    """The status rows of shards already written (a rerun), lazily, without their pixels."""
    return _shard_dataset(shard_uris).map_batches(
        _status_of_shards,
        fn_kwargs={"storage_options": storage_options},
        batch_size=None,
        batch_format="numpy",
    )


def _status_of_shards(
    batch: dict[str, np.ndarray], *, storage_options: Mapping[str, Any] | None
) -> dict[str, np.ndarray]:
    columns: dict[str, list[Any]] = {name: [] for name in (*_STATUS_COLUMNS, "shard_uri")}
    for uri in batch["shard_uri"]:
        data = read_bytes(str(uri), storage_options=storage_options)
        table = pq.read_table(pa.BufferReader(data or b""), columns=list(_STATUS_COLUMNS))
        for name in _STATUS_COLUMNS:
            columns[name].extend(table[name].to_pylist())
        columns["shard_uri"].extend([str(uri)] * table.num_rows)
    return {name: np.array(values, dtype=object) for name, values in columns.items()}


@dataclass
class _Tally:
    """What the driver keeps of the status rows: the skipped photos, counts, sample URIs."""

    skipped: list[SkippedPhoto] = field(default_factory=list)
    usable: int = 0
    samples: list[str] = field(default_factory=list)
    shards: set[str] = field(default_factory=set)


def _tally(status: Any, *, sample_count: int) -> _Tally:
    """Stream the status rows (a Dataset) once: one object per skipped photo and per shard."""
    tally = _Tally()
    for part in status.iter_batches(batch_format="pyarrow", batch_size=10_000):
        ok = pc.equal(part["status"], STATUS_OK)
        usable_uris = part.filter(ok)["source_uri"].to_pylist()
        tally.usable += len(usable_uris)
        tally.samples = heapq.nsmallest(sample_count, [*tally.samples, *usable_uris])
        tally.shards.update(pc.unique(part["shard_uri"]).to_pylist())
        for row in part.filter(pc.invert(ok)).to_pylist():
            tally.skipped.append(
                SkippedPhoto(
                    source_uri=redact_uri(row["source_uri"]),
                    status=row["status"],
                    error_type=row["error_type"],
                    message=row["error_message"],
                )
            )
    tally.skipped.sort(key=lambda photo: photo.source_uri)  # shard order is random; reports not
    return tally


def read_usable(
    shard_uris: list[str],
    *,
    size: int,
    columns: tuple[str, ...],
    storage_options: Mapping[str, Any] | None,
) -> Any:
    """A lazy Ray Data read of the usable photos in ``shard_uris`` (a ray.data.Dataset).

    Every execution (every epoch, under Ray Train) visits the shards in a new random order.
    The read tasks take no CPU: Ray Train's workers may hold every CPU, and reading a shard
    is a zstd decompression, not an image decode. Each yields a 2 MiB block at a time, and
    the workers consume far slower than two of them produce.
    """
    return (
        _shard_dataset(shard_uris)
        .randomize_block_order()
        .map_batches(
            read_shards_shuffled,
            fn_kwargs={"size": size, "columns": columns, "storage_options": storage_options},
            batch_size=None,
            batch_format="numpy",
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=_READ_TASKS),
        )
    )


@dataclass(frozen=True)
class PhotoListing:
    """The photo files of a training run, split into training and validation (no pixels)."""

    source_url: str
    val_url: str | None
    val_fraction: float  # of source_url, held out; 0 when val_url is given
    train: pa.Table = field(repr=False)  # pipeline.listing.LISTING_SCHEMA
    val: pa.Table = field(repr=False)


def list_training_photos(
    source_url: str,
    *,
    val_url: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    min_train_images: int = 1,
    storage_options: Mapping[str, Any] | None = None,
) -> PhotoListing:
    """List the photos and choose the validation ones; on the driver, without Ray.

    Cheap, so that a wrong path, an empty folder or an unreachable bucket is reported before
    a cluster starts.

    Args:
        source_url: folder or URL of colour photos, searched recursively.
        val_url: a separate folder or URL of validation photos; else ``val_fraction`` of
            ``source_url`` is held out. Photos under both are used for validation only.
        val_fraction: share of ``source_url`` held out when ``val_url`` is None.
        seed: salts the held-out choice.
        min_train_images: fewer listed training photos is an error (see TrainingData).
        storage_options: fsspec options; by default from the environment.

    Raises:
        StorageError: a location does not exist or cannot be listed.
        TrainingDataError: no images, or too few.
    """
    if val_url is None and not 0.0 < val_fraction < 1.0:
        raise TrainingDataError(
            f"the validation fraction must be between 0 and 1, got {val_fraction:g}"
        )
    where = redact_uri(source_url)
    listing = _readable(list_images(source_url, storage_options=storage_options), where)
    if listing.num_rows == 0:
        raise TrainingDataError(
            f"{where}: no images found (looked for "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))} in all subfolders)"
        )
    if val_url is None:
        train, val = split_listing(listing, val_fraction=val_fraction, seed=seed)
        if val.num_rows == 0:
            raise TrainingDataError(
                f"{where}: only {listing.num_rows} image found; need at least 2 (one to train "
                "on, one to validate), or a separate validation URL"
            )
    else:
        val = _readable(list_images(val_url, storage_options=storage_options), redact_uri(val_url))
        if val.num_rows == 0:
            raise TrainingDataError(f"{redact_uri(val_url)}: no validation images found")
        # A validation photo that is also trained on would flatter every validation metric.
        held_out = pa.array(sorted(set(val.column("source_uri").to_pylist())), pa.string())
        train = listing.filter(pc.invert(pc.is_in(listing["source_uri"], value_set=held_out)))
        val_fraction = 0.0
    if train.num_rows < min_train_images:
        raise TrainingDataError(
            f"{where}: {train.num_rows} training images, but every worker needs at least one "
            f"full batch: need {min_train_images} (workers × batch size)"
        )
    return PhotoListing(
        source_url=where,
        val_url=redact_uri(val_url) if val_url else None,
        val_fraction=val_fraction,
        train=train,
        val=val,
    )


def prepare_training_data(
    listing: PhotoListing,
    *,
    image_size: int,
    prepared_url: str,
    min_colorfulness: float = DEFAULT_MIN_COLORFULNESS,
    min_train_images: int = 1,
    sample_count: int = 4,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainingData:
    """Decode the listed photos once into shards under ``prepared_url``; stream them (needs Ray).

    Args:
        listing: from ``list_training_photos``.
        image_size: the model's input side; training photos load at ``load_size_for`` it,
            validation photos at it.
        prepared_url: where the decoded copy goes (``OUTPUT/data`` for ``chromascan train``);
            a folder per listing fingerprint, reused when the same listing comes again, and
            any other one removed once the new copy is complete.
        min_colorfulness: photos below it count as grey and are skipped.
        min_train_images: fewer usable training photos is an error (workers × batch size:
            every worker must get at least one full batch per epoch).
        sample_count: validation photos shown in the sample grid of each checkpoint.
        seed: the order photos are written to the shards in.
        storage_options: fsspec options for the photos and for ``prepared_url``; by default
            ``portable_storage_options`` of each URL. They travel inside Ray task payloads,
            never to logs or metadata.

    Raises:
        TrainingDataError: no usable colour photos to train or validate on, or too few.
    """
    started = time.perf_counter()
    load_size = load_size_for(image_size)
    fingerprint = prepared_fingerprint(
        listing, image_size=image_size, min_colorfulness=min_colorfulness, seed=seed
    )
    root = prepared_url.rstrip("/")
    folder = join(root, fingerprint[:_FINGERPRINT_CHARS])
    target_options = portable_storage_options(root, storage_options)
    fs, folder_path = filesystem(folder, target_options)
    reused = bool(fs.exists(f"{folder_path.rstrip('/')}/{PREPARED_FILE}"))
    sizes = {"train": load_size, "val": image_size}
    tallies: dict[str, _Tally] = {}
    if reused:
        for part in sizes:
            shards = sorted(
                f"{join(folder, part)}/{path.rsplit('/', 1)[-1]}"
                for path in fs.glob(f"{folder_path.rstrip('/')}/{part}/*.parquet")
            )
            status = _read_status(shards, storage_options=target_options)
            tallies[part] = _tally(status, sample_count=sample_count if part == "val" else 0)
    else:
        if fs.exists(folder_path):  # an earlier preparation stopped part-way
            fs.rm(folder_path, recursive=True)
        for part, table in (("train", listing.train), ("val", listing.val)):
            origin = listing.val_url if part == "val" and listing.val_url else listing.source_url
            status = _write_shards(
                table,
                join(folder, part),
                size=sizes[part],
                min_colorfulness=min_colorfulness,
                seed=seed,
                source_options=portable_storage_options(origin, storage_options),
                target_options=target_options,
            )
            tallies[part] = _tally(status, sample_count=sample_count if part == "val" else 0)
        record = {
            "format": _PREPARED_FORMAT,
            "fingerprint": fingerprint,
            "source_url": listing.source_url,
            "val_url": listing.val_url,
            "image_size": image_size,
            "load_size": load_size,
            "min_colorfulness": min_colorfulness,
            "listed": listing.train.num_rows + listing.val.num_rows,
            "shards": {part: len(tally.shards) for part, tally in tallies.items()},
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        # Last: its presence says the shards beside it are complete.
        write_bytes_atomic(
            join(folder, PREPARED_FILE),
            (json.dumps(record, indent=2) + "\n").encode(),
            storage_options=target_options,
        )
        _remove_other_copies(root, keep=fingerprint[:_FINGERPRINT_CHARS], options=target_options)
    train = read_usable(
        sorted(tallies["train"].shards),
        size=load_size,
        columns=("rgb",),
        storage_options=target_options,
    )
    val = read_usable(
        sorted(tallies["val"].shards),
        size=image_size,
        columns=("rgb", "source_uri"),
        storage_options=target_options,
    ).materialize()
    train_skipped, val_skipped = tallies["train"].skipped, tallies["val"].skipped
    train_count, val_count = tallies["train"].usable, tallies["val"].usable
    samples = tallies["val"].samples
    skipped = tuple(train_skipped + val_skipped)
    data = TrainingData(
        train=train,
        val=val,
        source_url=listing.source_url,
        val_url=listing.val_url,
        val_fraction=listing.val_fraction,
        image_size=image_size,
        load_size=load_size,
        listed=listing.train.num_rows + listing.val.num_rows,
        train_images=train_count,
        val_images=val_count,
        skipped=skipped,
        sample_uris=tuple(samples),
        prepare_seconds=time.perf_counter() - started,
        prepared_url=redact_uri(folder),
        reused=reused,
        shard_uris=tuple(sorted(tallies["train"].shards)),
    )
    logger.info(
        "training data: %d listed, %d train, %d validation, %d grey, %d failed (%.1f s%s)",
        data.listed,
        data.train_images,
        data.val_images,
        data.grey,
        data.failed,
        data.prepare_seconds,
        ", decoded copy reused" if reused else "",
    )
    for photo in skipped:
        if photo.status == STATUS_FAILED:
            logger.warning("skipped %s: %s (%s)", photo.source_uri, photo.message, photo.error_type)
    _check_enough(data, min_train_images=min_train_images)
    return data


def _remove_other_copies(root: str, *, keep: str, options: Mapping[str, Any] | None) -> None:
    """Remove the decoded copies of earlier listings: only the current one is ever read."""
    fs, root_path = filesystem(root, options)
    try:
        entries = fs.ls(root_path, detail=True)
    except FileNotFoundError:
        return
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if entry.get("type") == "directory" and name != keep:
            fs.rm(entry["name"], recursive=True)


def build_training_data(
    source_url: str,
    *,
    image_size: int,
    prepared_url: str,
    val_url: str | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    min_colorfulness: float = DEFAULT_MIN_COLORFULNESS,
    min_train_images: int = 1,
    sample_count: int = 4,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainingData:
    """``list_training_photos`` then ``prepare_training_data``; see them for the arguments."""
    listing = list_training_photos(
        source_url,
        val_url=val_url,
        val_fraction=val_fraction,
        seed=seed,
        min_train_images=min_train_images,
        storage_options=storage_options,
    )
    return prepare_training_data(
        listing,
        image_size=image_size,
        prepared_url=prepared_url,
        min_colorfulness=min_colorfulness,
        min_train_images=min_train_images,
        sample_count=sample_count,
        seed=seed,
        storage_options=storage_options,
    )


def _check_enough(data: TrainingData, *, min_train_images: int) -> None:
    where = data.source_url
    reasons = f"{data.grey} grey, {data.failed} unreadable, of {data.listed} listed"
    if data.train_images == 0:
        raise TrainingDataError(f"{where}: no usable colour photos to train on ({reasons})")
    if data.val_images == 0:
        raise TrainingDataError(
            f"{data.val_url or where}: no usable colour photos to validate on ({reasons})"
        )
    if data.train_images < min_train_images:
        raise TrainingDataError(
            f"{where}: {data.train_images} usable training photos, but every worker needs at "
            f"least one full batch: need {min_train_images} (workers × batch size); "
            "add photos or lower --workers / --batch-size"
        )


# -- on the training worker ----------------------------------------------------------------


def random_crop_flip(
    rgb: torch.Tensor, *, size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, H, W, 3) uint8 at the load size -> (B, 3, size, size) float32 sRGB in [0, 1].

    Each photo gets its own crop offset and its own coin-flip horizontal mirror, drawn from
    ``generator`` (default: torch's global RNG, which checkpoints save per worker).
    """
    batch, height, width, _ = rgb.shape
    if height < size or width < size:
        raise ValueError(f"photos of {width}×{height} are smaller than the crop {size}")
    tops = torch.randint(0, height - size + 1, (batch,), generator=generator).tolist()
    lefts = torch.randint(0, width - size + 1, (batch,), generator=generator).tolist()
    flips = (torch.rand(batch, generator=generator) < 0.5).tolist()
    crops = []
    for index in range(batch):
        crop = rgb[index, tops[index] : tops[index] + size, lefts[index] : lefts[index] + size]
        crops.append(crop.flip(1) if flips[index] else crop)  # (S, S, 3); dim 1 is x
    stacked = torch.stack(crops)  # (B, S, S, 3) uint8
    return stacked.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S) in [0, 1]


def rgb_to_unit(rgb: torch.Tensor) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 in [0, 1], for validation (no augmentation)."""
    return rgb.permute(0, 3, 1, 2).float().div_(255.0)


def to_model_lab(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) sRGB in [0, 1] -> generator input L (B, 1, S, S) and target ab (B, 2, S, S).

    Both in [-1, 1] (models.colour's normalisation); ab is clamped because a few saturated
    sRGB blues reach |b| slightly above the scale, beyond what tanh can output.
    """
    lab = rgb_to_lab(rgb.float())  # (B, 3, S, S): L in [0, 100], ab about ±110
    l_norm = normalize_l(lab[:, :1]).clamp(-1.0, 1.0)
    ab_norm = normalize_ab(lab[:, 1:]).clamp(-1.0, 1.0)
    return l_norm, ab_norm
