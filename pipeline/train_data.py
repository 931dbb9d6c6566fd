"""Training ingest: colour photos under any storage URL -> what a pix2pix worker trains on.

On the driver (``build_training_data``), with Ray Data:

1. list SRC recursively by image extension (``pipeline.listing``), and the validation URL
   when one is given; otherwise hold out a fraction of SRC, chosen by a hash of each photo's
   relative path so that a re-run (a resume) holds out the same photos;
2. read, decode (JPEGs at a reduced scale) and resize every photo to the load size as uint8
   RGB, in parallel CPU tasks; photos that fail are counted and logged with their path, grey
   ones are counted apart (see ``prepare_training_photo``); neither stops training;
3. materialise the result once in the object store (245 KB a photo at 286²).

On each training worker, per batch (``random_crop_flip``, ``to_model_lab``):

4. the pix2pix recipe: an independent random crop to the model size and a coin-flip mirror
   per photo;
5. sRGB -> CIE Lab via ``models.colour``: normalised L is the input, normalised ab the target.

Why decode once and augment on the worker: decoding a full-size JPEG costs far more than a
training step at 64², so re-reading every epoch (200 in the recipe) would bound throughput
by storage and decode; Train workers hold every CPU of a small machine, so per-epoch Ray Data
tasks would wait for CPUs that never free up; uint8 at the load size is 3.2× smaller to ship
than float Lab at the model size; and the crop and flip draw from the worker's torch RNG,
which checkpoints save and restore.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import torch
from PIL import Image

from models.colour import normalize_ab, normalize_l, rgb_to_lab
from models.metrics import colorfulness
from pipeline.decode import DecodeError, decode_image
from pipeline.listing import IMAGE_EXTENSIONS, list_images
from pipeline.provenance import redact_uri
from pipeline.storage import StorageError, portable_storage_options, read_bytes

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

# At most this many listing blocks: enough to spread decoding over any cluster, few enough
# that the driver does not create millions of tiny objects for a million-photo archive.
_MAX_BLOCKS = 2000
_MIN_ROWS_PER_BLOCK = 4
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
    """Materialised training and validation photos, and what became of every listed file."""

    train: Any  # ray.data.Dataset, column "rgb": (load_size, load_size, 3) uint8
    val: Any  # ray.data.Dataset, columns "rgb": (image_size, image_size, 3) uint8, "source_uri"
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


def _keep_usable(batch: dict[str, np.ndarray], *, columns: tuple[str, ...]) -> dict[str, Any]:
    keep = batch["status"] == STATUS_OK
    return {name: batch[name][keep] for name in columns}


def _prepare(
    listing: pa.Table,
    *,
    size: int,
    columns: tuple[str, ...],
    min_colorfulness: float,
    storage_options: Mapping[str, Any] | None,
    sample_count: int = 0,
) -> tuple[Any, list[SkippedPhoto], int, list[str]]:
    """Decode a listing on Ray Data.

    Returns the materialised usable rows, the skipped photos, how many are usable, and the
    first ``sample_count`` usable URIs in sorted order (the driver never holds all of them).
    """
    rows_per_block = max(_MIN_ROWS_PER_BLOCK, math.ceil(listing.num_rows / _MAX_BLOCKS))
    blocks = max(1, math.ceil(listing.num_rows / rows_per_block))
    decoded = (
        ray.data.from_arrow(listing.select(["source_uri"]), override_num_blocks=blocks)
        .map_batches(
            read_and_prepare_batch,
            fn_kwargs={
                "size": size,
                "min_colorfulness": min_colorfulness,
                "storage_options": storage_options,
            },
            batch_size=None,  # one call per block: blocks are already small
            batch_format="numpy",
        )
        .materialize()
    )
    skipped: list[SkippedPhoto] = []
    usable_count, samples = 0, []
    for part in decoded.select_columns(
        ["source_uri", "status", "error_type", "error_message"]
    ).iter_batches(batch_format="pyarrow", batch_size=10_000):
        ok = pc.equal(part["status"], STATUS_OK)
        usable_uris = part.filter(ok)["source_uri"].to_pylist()
        usable_count += len(usable_uris)
        samples = heapq.nsmallest(sample_count, [*samples, *usable_uris])
        for row in part.filter(pc.invert(ok)).to_pylist():
            skipped.append(
                SkippedPhoto(
                    source_uri=redact_uri(row["source_uri"]),
                    status=row["status"],
                    error_type=row["error_type"],
                    message=row["error_message"],
                )
            )
    usable = decoded.map_batches(
        _keep_usable, fn_kwargs={"columns": columns}, batch_size=None, batch_format="numpy"
    ).materialize()
    del decoded  # the placeholder rows of skipped photos are no longer needed
    return usable, skipped, usable_count, samples


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
    min_colorfulness: float = DEFAULT_MIN_COLORFULNESS,
    min_train_images: int = 1,
    sample_count: int = 4,
    storage_options: Mapping[str, Any] | None = None,
) -> TrainingData:
    """Decode and materialise the listed photos on Ray Data (needs Ray).

    Args:
        listing: from ``list_training_photos``.
        image_size: the model's input side; training photos load at ``load_size_for`` it,
            validation photos at it.
        min_colorfulness: photos below it count as grey and are skipped.
        min_train_images: fewer usable training photos is an error (workers × batch size:
            every worker must get at least one full batch per epoch).
        sample_count: validation photos shown in the sample grid of each checkpoint.
        storage_options: fsspec options; by default ``portable_storage_options`` of each URL.
            They travel inside Ray task payloads, never to logs or metadata.

    Raises:
        TrainingDataError: no usable colour photos to train or validate on, or too few.
    """
    started = time.perf_counter()
    load_size = load_size_for(image_size)
    train, train_skipped, train_count, _ = _prepare(
        listing.train,
        size=load_size,
        columns=("rgb",),
        min_colorfulness=min_colorfulness,
        storage_options=portable_storage_options(listing.source_url, storage_options),
    )
    val, val_skipped, val_count, samples = _prepare(
        listing.val,
        size=image_size,
        columns=("rgb", "source_uri"),
        min_colorfulness=min_colorfulness,
        sample_count=sample_count,
        storage_options=portable_storage_options(
            listing.val_url or listing.source_url, storage_options
        ),
    )
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
    )
    logger.info(
        "training data: %d listed, %d train, %d validation, %d grey, %d failed (%.1f s)",
        data.listed,
        data.train_images,
        data.val_images,
        data.grey,
        data.failed,
        data.prepare_seconds,
    )
    for photo in skipped:
        if photo.status == STATUS_FAILED:
            logger.warning("skipped %s: %s (%s)", photo.source_uri, photo.message, photo.error_type)
    _check_enough(data, min_train_images=min_train_images)
    return data


def build_training_data(
    source_url: str,
    *,
    image_size: int,
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
        min_colorfulness=min_colorfulness,
        min_train_images=min_train_images,
        sample_count=sample_count,
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
