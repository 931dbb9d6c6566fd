"""The colorize stages as plain functions over one input, and their Ray Data batch wrappers.

    prepare   (CPU task)  read bytes, hash, decode (JPEG at reduced scale), model-size L
    Colorizer (actor)     batches of model-size L -> ab, model loaded once per actor
    finalize  (CPU task)  full-resolution decode, merge ab with the source's own L, encode
                          PNG with provenance, write atomically, hash -> one manifest row

Only compressed bytes and model-size arrays travel between stages: full-resolution pixels
are made and consumed inside one finalize call. A bad input becomes a failed row, never an
exception that stops the run. The per-input functions are what the Ray stages call, and what
the benchmark's plain single-process loop calls too.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from models.colorize import (
    cast_convolutions,
    lightness_to_model_input,
    merge_full_resolution,
)
from models.colorize import predict_ab as predict_ab_batch
from models.metrics import colorfulness
from pipeline import attempts
from pipeline.credentials import CredentialsError, SigningKeys, sign_png
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from pipeline.model_store import load_model
from pipeline.provenance import Provenance, encode_png, redact_uri
from pipeline.schema import STATUS_FAILED, STATUS_OK
from pipeline.storage import (
    DEFAULT_TIMEOUT_S,
    StorageError,
    StorageUnavailableError,
    join,
    read_bytes,
    write_bytes_atomic,
)

logger = logging.getLogger(__name__)

# Colourfulness is a statistic: a strided sample of at most this many pixels estimates it
# to well under 1% while costing nothing next to the PNG encode of a 60 MP scan.
_COLORFULNESS_SAMPLE_PIXELS = 1_000_000
# Errors a storage read or write of one input can raise; each becomes that input's failed row.
# StorageUnavailableError is not one of them: a store that does not answer is no fault of
# the input, and the run stops on it (re-raised first) instead of failing every input left.
_IO_ERRORS = (StorageError, OSError)


@dataclass(frozen=True)
class StageOptions:
    """What every stage needs; travels to Ray workers (frozen, picklable, no secrets logged)."""

    run_id: str
    dst: str
    model_url: str
    model_id: str
    model_sha256: str
    image_size: int
    software: str
    max_pixels: int = DEFAULT_MAX_PIXELS
    png_compress_level: int = 1
    # Threads one finalize may use for the merge (and CPUs its Ray task reserves, so the
    # scheduler shares the node): >1 pays when a node has fewer huge scans than cores.
    finalize_threads: int = 1
    # "isal" (pipeline.png); "reference": the merge and encoders before it, for benchmarks.
    png_encoder: str = "isal"
    output_bits: str = "source"  # "8", "16", or "source": 16 for 16-bit masters, else 8
    storage_timeout_s: float = DEFAULT_TIMEOUT_S  # per read/write, +1 s per MiB
    # Credentials for S3-compatible stores when not in the workers' environment; never
    # written to the manifest, the run summary or a log line.
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    # The run's AttemptLedger actor (pipeline.attempts): scans that killed their worker are
    # retried once in a child process, then failed. None (plain loops, tests): no counting.
    attempt_ledger: Any = field(default=None, repr=False, compare=False)
    max_attempts: int = attempts.DEFAULT_MAX_ATTEMPTS
    # C2PA signing keys (pipeline.credentials): every output signed when set. Secret, like
    # the storage options; each worker process makes its own c2pa signer from them.
    signing: SigningKeys | None = field(default=None, repr=False)


OUTPUT_BITS = ("8", "16", "source")


def output_dtype(output_bits: str, source_bits: int) -> type[np.unsignedinteger]:
    """The output's sample type: a 16-bit (or deeper) master keeps 16 bits under "source"."""
    if output_bits == "16" or (output_bits == "source" and source_bits >= 16):
        return np.uint16
    return np.uint8


# The honest name for an error no check foresaw: a bug, or a file stranger than any we know.
UNEXPECTED_ERROR = "UnexpectedError"


def _error_fields(error: BaseException, error_type: str | None = None) -> dict[str, Any]:
    message = str(error) or type(error).__name__
    return {
        "status": STATUS_FAILED,
        "error_type": error_type or getattr(error, "error_type", None) or type(error).__name__,
        "error_message": " ".join(message.split())[:2000],  # one line, whatever the source
    }


def _unexpected_fields(error: Exception, stage: str, source_uri: str) -> dict[str, Any]:
    """A failed row for an error no check names; its traceback goes to the worker's log."""
    logger.error("%s of %s failed unexpectedly", stage, redact_uri(source_uri), exc_info=error)
    return _error_fields(
        RuntimeError(
            f"{type(error).__name__} in {stage}: {error} (traceback in the worker log on "
            f"{socket.gethostname()})"
        ),
        UNEXPECTED_ERROR,
    )


def _restore_nulls(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Columns that arrived as all-NaN floats back to None objects.

    A block whose text or integer column holds only None (four failed inputs in a row have no
    source_format; four good ones have no error_type) becomes an Arrow null column, and Ray
    Data hands that to the next stage as float NaN. Passed on as floats, it meets the same
    column as strings in another batch of the same task, and Arrow's concat fails the whole
    task ("source_format has incompatible types: string vs float"): one unlucky run of bad
    inputs stopped the run. As None objects it stays a null column, which merges with any type.
    """
    return {
        key: np.full(len(value), None, dtype=object)
        if value.ndim == 1 and value.dtype.kind == "f" and len(value) and np.isnan(value).all()
        else value
        for key, value in batch.items()
    }


def _prepared_fields(options: StageOptions, started: float) -> dict[str, Any]:
    """prepare_one's output before anything is known: an ok row with no source fields."""
    return {
        "started_at": started,
        "status": STATUS_OK,
        "error_type": None,
        "error_message": None,
        "source_sha256": None,
        "source_format": None,
        "source_mode": None,
        "source_width": None,
        "source_height": None,
        "source_bits": None,
        "source_pages": None,
        "notes": None,
        "source_icc": None,
        "data": b"",
        "l_model": np.zeros((1, options.image_size, options.image_size), np.float32),
        "decode_s": 0.0,
    }


def prepare_one(row: Mapping[str, Any], options: StageOptions) -> dict[str, Any]:
    """Read, hash and decode one listed input; the model-size L, or the reason it failed."""
    started = time.time()
    out = _prepared_fields(options, started)
    if row.get("listing_error"):
        # Known unreadable from the listing alone (a name the manifest cannot hold as it is).
        out.update(
            status=STATUS_FAILED, error_type="UnsupportedName", error_message=row["listing_error"]
        )
        out["decode_s"] = time.time() - started
        return out
    try:
        data = read_bytes(
            row["source_uri"],
            storage_options=options.storage_options,
            timeout_s=options.storage_timeout_s,
            size_hint=int(row.get("source_size") or 0),
        )
        if data is None:  # read_bytes raises for a missing file; this keeps type checkers sure
            raise FileNotFoundError(row["source_uri"])
        out["source_sha256"] = hashlib.sha256(data).hexdigest()
        attempts.crash_if_asked(out["source_sha256"])
        out["source_size"] = len(data)
        decoded = decode_image(data, max_pixels=options.max_pixels, draft_size=options.image_size)
        out.update(
            source_format=decoded.format,
            source_mode=decoded.mode,
            source_bits=decoded.bits,
            source_pages=decoded.pages,
            source_width=decoded.full_size[0],
            source_height=decoded.full_size[1],
            notes="; ".join(decoded.notes) or None,
            source_icc=decoded.icc_description,
        )
        # A JPEG may have been decoded at 1/2-1/8 scale (draft): plenty for the model input.
        out["l_model"] = lightness_to_model_input(decoded.source_lightness(), options.image_size)
        out["data"] = data
    except StorageUnavailableError:
        raise
    except DecodeError as err:
        out.update(_error_fields(err))
    except FileNotFoundError as err:
        out.update(_error_fields(err, "SourceMissing"))
    except _IO_ERRORS as err:
        out.update(_error_fields(err, "SourceUnreadable"))
    except MemoryError as err:
        out.update(_error_fields(err, "OutOfMemory"))
    except Exception as err:  # the failure boundary: one scan's error never stops the run
        out.update(_unexpected_fields(err, "prepare", str(row.get("source_uri"))))
    if out["status"] != STATUS_OK:
        out["data"] = b""  # a failed scan's bytes need not travel to the model and back
    out["decode_s"] = time.time() - started
    return out


class Colorizer:
    """Batches of model-size L -> ab. One instance per actor: the model is loaded once.

    On a GPU the actor holds one device and runs in bfloat16 (float16 where bf16 is missing).
    On CPU it uses channels-last memory and, where the CPU has native bfloat16 (AVX-512 BF16
    or AMX), bfloat16 autocast; the colour difference to float32 is measured in the bench.
    """

    def __init__(
        self,
        *,
        model_url: str,
        expected_sha256: str,
        use_gpu: bool = False,
        precision: str = "auto",
        threads: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        loaded = load_model(model_url, storage_options=storage_options)
        if loaded.sha256 != expected_sha256:
            # The artifact changed between the driver's check and this actor's load: refuse
            # rather than colour half a run with another model.
            raise RuntimeError(
                f"{model_url}: model changed during the run ({loaded.sha256[:12]} != "
                f"{expected_sha256[:12]})"
            )
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.autocast_dtype = resolve_precision(precision, self.device)
        generator = loaded.generator.to(self.device)
        self.channels_last = self.device.type == "cpu"
        if self.channels_last:
            generator = generator.to(memory_format=torch.channels_last)
        self.generator = cast_convolutions(generator.eval(), self.autocast_dtype)

    def predict(self, l_model: np.ndarray) -> np.ndarray:
        """(B, 1, S, S) float32 normalised L -> (B, 2, S, S) float32 ab in Lab units."""
        tensor = torch.from_numpy(np.ascontiguousarray(l_model, dtype=np.float32))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        elif self.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        ab = predict_ab_batch(self.generator, tensor, autocast_dtype=self.autocast_dtype)
        return ab.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = _restore_nulls(batch)
        ok = batch["status"] == STATUS_OK
        count = len(ok)
        size = batch["l_model"].shape[-1]
        ab = np.zeros((count, 2, size, size), np.float32)
        infer_s = np.zeros(count, np.float64)
        if ok.any():
            started = time.perf_counter()
            try:
                ab[ok] = self.predict(batch["l_model"][ok])
            except Exception as err:  # e.g. a device out of memory: fail rows, not the run
                logger.error("model failed on a batch of %d", int(ok.sum()), exc_info=err)
                batch = _fail_rows(batch, ok, err)
                ok = np.zeros(count, dtype=bool)
            infer_s[ok] = (time.perf_counter() - started) / max(1, int(ok.sum()))
        out = {key: value for key, value in batch.items() if key != "l_model"}
        out["ab"] = ab
        out["infer_s"] = infer_s
        return out


def _fail_rows(
    batch: dict[str, np.ndarray], rows: np.ndarray, error: Exception
) -> dict[str, np.ndarray]:
    """The batch with ``rows`` marked failed by the model stage's ``error``."""
    fields = _error_fields(
        RuntimeError(f"{type(error).__name__} in the model: {error}"), "ModelError"
    )
    batch = dict(batch)
    for column, value in fields.items():
        values = np.array(batch[column], dtype=object)
        values[rows] = value
        batch[column] = values
    return batch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (else bf16 autocast is slower than fp32)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the autocast dtype (None for float32)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; choose auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else None


_UNSAFE_SEGMENTS = {"": "%2F", ".": "%2E", "..": "%2E%2E"}


def _safe_segment(segment: str) -> str:
    """One path segment that names a file inside its folder and nothing else."""
    if segment in _UNSAFE_SEGMENTS:
        return _UNSAFE_SEGMENTS[segment]
    # Percent-encode what could change the path on some file system: backslash separators,
    # control characters, NUL. ("%" stays: names like "50% grey.jpg" keep their look.)
    return "".join(
        f"%{ord(char):02X}" if char == "\\" or ord(char) < 0x20 or ord(char) == 0x7F else char
        for char in segment
    )


def output_relative_path(relative_path: str, *, keep_suffix: bool = False) -> str:
    """images/<source path relative to SRC, suffix replaced by .png> (DESIGN.md).

    ``keep_suffix`` appends .png instead (scan.tif -> scan.tif.png), for sources whose names
    differ only in their suffix.

    Object keys are untrusted: a key with "..", a leading "/", backslashes or control
    characters still maps to a path inside DST/images (those parts are percent-encoded).
    """
    segments = [_safe_segment(part) for part in relative_path.lstrip("/").split("/")]
    name = segments[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") and not keep_suffix else name
    return "/".join([*segments[:-1], f"{stem}.png"])


def _sampled(rgb: np.ndarray) -> np.ndarray:
    stride = max(
        1, int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / _COLORFULNESS_SAMPLE_PIXELS)))
    )
    return rgb[::stride, ::stride]


def _finalized_fields(row: Mapping[str, Any], options: StageOptions) -> dict[str, Any]:
    """finalize_one's output before any work: the row's status, no output yet."""
    return {
        "status": row["status"],
        "error_type": row["error_type"],
        "error_message": row["error_message"],
        "output_uri": None,
        "output_sha256": None,
        "output_size": None,
        "output_width": None,
        "output_height": None,
        "output_bits": None,
        "signed": None,
        "colorfulness": None,
        "model_id": options.model_id,
        "model_sha256": options.model_sha256,
        "worker": socket.gethostname(),
        "finalize_s": 0.0,
        "finished_at": time.time(),
    }


def finalize_one(row: Mapping[str, Any], ab: np.ndarray, options: StageOptions) -> dict[str, Any]:
    """Full-resolution colour for one prepared input; returns its manifest fields.

    ``row`` holds prepare_one's fields plus ``output_path`` (relative to DST/images).
    """
    started = time.time()
    result = _finalized_fields(row, options)
    if row["status"] == STATUS_OK:
        try:
            output_uri = join(options.dst, "images", str(row["output_path"]))
            decoded = decode_image(bytes(row["data"]), max_pixels=options.max_pixels)
            expected = (row.get("source_width"), row.get("source_height"))
            if (decoded.width, decoded.height) != expected:
                # The model input and the manifest were made from that size: never write an
                # output whose geometry disagrees with its own row.
                raise DecodeError(
                    f"decoded {decoded.width}×{decoded.height}, but the scan was listed as "
                    f"{expected[0]}×{expected[1]}",
                    error_type="SizeMismatch",
                )
            depth = output_dtype(options.output_bits, decoded.bits)
            rgb = merge_full_resolution(
                decoded.source_lightness(),
                ab,
                dtype=depth,
                threads=options.finalize_threads,
                # the 16-bit merge before the compiled kernel took it over: benchmarks only
                reference=options.png_encoder == "reference" and depth == np.uint16,
            )
            provenance = Provenance(
                source_uri=redact_uri(str(row["source_uri"])),
                source_sha256=str(row["source_sha256"]),
                model_id=options.model_id,
                software=options.software,
                source=decoded.metadata,
            )
            png = encode_png(
                rgb,
                provenance,
                exif=decoded.exif,
                dpi=decoded.dpi,
                compress_level=options.png_compress_level,
                encoder=options.png_encoder,
            )
            if options.signing is not None:  # before the hash: the manifest's is the file's
                png = sign_png(
                    png,
                    keys=options.signing,
                    source=bytes(row["data"]),
                    source_format=row.get("source_format"),
                    source_name=str(row.get("relative_path") or redact_uri(str(row["source_uri"]))),
                    model_id=options.model_id,
                    software=options.software,
                    title=posixpath.basename(str(row["output_path"])),
                )
            write_bytes_atomic(
                output_uri,
                png,
                storage_options=options.storage_options,
                timeout_s=options.storage_timeout_s,
            )
            result.update(
                output_uri=redact_uri(output_uri),
                output_sha256=hashlib.sha256(png).hexdigest(),
                output_size=len(png),
                output_height=rgb.shape[0],
                output_width=rgb.shape[1],
                output_bits=16 if depth == np.uint16 else 8,
                signed=options.signing is not None,
                colorfulness=colorfulness(_sampled(rgb)),
            )
        except StorageUnavailableError:
            raise
        except DecodeError as err:
            result.update(_error_fields(err))
        except MemoryError as err:
            # One oversized scan must not take the run down with it.
            result.update(_error_fields(err, "OutOfMemory"))
        except _IO_ERRORS as err:
            result.update(_error_fields(err, "OutputUnwritable"))
        except CredentialsError as err:  # the keys passed the preflight: this scan's own doing
            result.update(_error_fields(err, "SigningFailed"))
        except Exception as err:  # the failure boundary: one scan's error never stops the run
            result.update(_unexpected_fields(err, "finalize", str(row.get("source_uri"))))
    result["finalize_s"] = time.time() - started
    result["finished_at"] = time.time()
    return result


# --- Ray Data batch wrappers: columns in, columns out --------------------------------------

_PREPARED_COLUMNS = (
    "source_sha256", "source_format", "source_mode", "source_bits", "source_pages", "notes",
    "source_icc",
    "source_width", "source_height",
    "status", "error_type", "error_message", "started_at", "decode_s",
)  # fmt: skip


def _crashed_fields(how: str, starts: int) -> dict[str, Any]:
    return {
        "status": STATUS_FAILED,
        "error_type": attempts.WORKER_CRASHED,
        "error_message": (
            f"the process working on this scan {how} ({starts} starts): a crash in an image "
            "codec, or the node ran out of memory; the rest of the run went on"
        ),
    }


def _guarded(
    stage: str,
    inputs: list[tuple[Mapping[str, Any], tuple[Any, ...]]],
    function: Callable[..., dict[str, Any]],
    options: StageOptions,
    crashed: Callable[[Mapping[str, Any], dict[str, Any]], dict[str, Any]],
) -> list[dict[str, Any]]:
    """``function(*args)`` for each (row, args), with the bounded attempts of pipeline.attempts.

    A first start runs here. A scan started before (its worker died) runs in a child process;
    if that dies too, or the scan has had ``max_attempts`` starts, ``crashed(row, fields)``
    makes its failed row.
    """
    keys = [f"{options.run_id}/{stage}/{row['source_uri']}" for row, _ in inputs]
    starts = attempts.begin(options.attempt_ledger, keys)
    results: list[dict[str, Any] | None] = [None] * len(inputs)
    retried = []
    for index, ((row, args), count) in enumerate(zip(inputs, starts, strict=True)):
        if count == 1:
            results[index] = function(*args)
        elif count <= options.max_attempts:
            retried.append(index)
        else:
            how = "took its worker down every time"
            results[index] = crashed(row, _crashed_fields(how, count - 1))
    if retried:
        logger.warning("%s: %d scan(s) whose worker died run again in isolation", stage,
                       len(retried))  # fmt: skip
        # The child is no Ray worker: it gets the options without the ledger's actor handle.
        plain = replace(options, attempt_ledger=None)
        jobs = [(function, (*inputs[i][1][:-1], plain)) for i in retried]
        isolated = attempts.run_isolated(
            jobs,
            lambda job, how: crashed(
                inputs[retried[job]][0], _crashed_fields(how, starts[retried[job]])
            ),
        )
        for index, result in zip(retried, isolated, strict=True):
            results[index] = result
    attempts.end(options.attempt_ledger, keys)
    return [result for result in results if result is not None]


def prepare_batch(batch: dict[str, np.ndarray], options: StageOptions) -> dict[str, np.ndarray]:
    """Ray Data map_batches wrapper around prepare_one."""
    count = len(batch["source_uri"])
    inputs = []
    for i in range(count):
        row = {k: v[i] for k, v in batch.items()}
        inputs.append((row, (row, options)))
    rows = _guarded(
        "prepare",
        inputs,
        prepare_one,
        options,
        lambda _row, fields: {**_prepared_fields(options, time.time()), **fields},
    )
    out = dict(batch)
    for column in _PREPARED_COLUMNS:
        out[column] = np.array([r[column] for r in rows], dtype=object)
    out["source_size"] = np.array([r.get("source_size", batch["source_size"][i])
                                   for i, r in enumerate(rows)], dtype=np.int64)  # fmt: skip
    out["data"] = np.array([r["data"] for r in rows], dtype=object)
    out["l_model"] = np.stack([r["l_model"] for r in rows]).astype(np.float32)
    return out


def finalize_batch(batch: dict[str, np.ndarray], options: StageOptions) -> dict[str, np.ndarray]:
    """Ray Data map_batches wrapper around finalize_one; drops the bytes and arrays."""
    batch = _restore_nulls(batch)
    count = len(batch["source_uri"])
    inputs = []
    for i in range(count):
        row = {k: v[i] for k, v in batch.items() if k not in ("ab", "data")}
        row["data"] = batch["data"][i]
        inputs.append((row, (row, batch["ab"][i], options)))
    results = _guarded(
        "finalize",
        inputs,
        finalize_one,
        options,
        lambda row, fields: {**_finalized_fields(row, options), **fields},
    )
    rows = [{**row, **result} for (row, _), result in zip(inputs, results, strict=True)]
    return (
        {
            key: np.array([r.get(key) for r in rows], dtype=object)
            for key in rows[0]
            if key not in ("data", "l_model")
        }
        if rows
        else {}
    )
