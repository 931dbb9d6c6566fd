"""List the images under a storage URL, streaming, as Arrow record batches.

An archive can hold millions of keys: the listing never decodes anything and never builds one
Python object per key beyond the current directory page; it yields Arrow batches that Ray
Data and the ledger anti-join consume column-wise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa

from pipeline.storage import StorageError, filesystem

# Case-insensitive; jp2/j2k only decode where Pillow was built with OpenJPEG.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".jp2", ".j2k", ".jpx"}
)

LISTING_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("relative_path", pa.string()),  # under the listed root, '/'-separated
        ("source_size", pa.int64()),
        ("source_version", pa.string()),  # ETag on object stores, mtime elsewhere
        # Why this entry cannot be read at all, known from its name alone (null for nearly
        # every entry): the run records it as a failed row instead of losing it.
        ("listing_error", pa.string()),
    ]
)
_BATCH_ROWS = 10_000


def _printable_name(name: str) -> tuple[str, str | None]:
    """A name Arrow can hold (UTF-8), and why it cannot be read when it is not one.

    On POSIX a file name is bytes. Python hands back bytes that are not UTF-8 (Latin-1 names
    from old Windows shares, say) as lone surrogates, which no Arrow string can carry; such a
    name is listed with those bytes shown as ``\\xe9`` and a reason, so the scan becomes a
    failed manifest row that says what to do instead of stopping the whole listing.
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return shown, (
            f"file name is not valid UTF-8 ({shown}); rename the file with a UTF-8 name "
            "to colourise it"
        )
    return name, None


def _version_of(info: Mapping[str, Any]) -> str:
    etag = info.get("ETag") or info.get("etag")
    if etag:
        return str(etag).strip('"')
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.isoformat()
        if value is not None:
            return f"{float(value):.6f}" if isinstance(value, int | float) else str(value)
    return ""


def iter_listing(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
    batch_rows: int = _BATCH_ROWS,
) -> Iterator[pa.RecordBatch]:
    """Yield LISTING_SCHEMA batches for every image under ``url``, recursively, sorted per folder.

    Hidden files and folders (a leading '.') are skipped: they are editor and OS clutter, or
    our own temporary files.

    Raises:
        StorageError: the location does not exist or cannot be listed.
    """
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    base_uri = url.rstrip("/")
    try:
        if not fs.isdir(root):
            raise StorageError(f"{url}: no such folder or prefix")
        walker = fs.walk(root, detail=True)
        rows: dict[str, list[Any]] = {name: [] for name in LISTING_SCHEMA.names}
        for folder, subfolders, files in walker:
            # Prune hidden folders in place so walk does not descend into them.
            for name in [n for n in subfolders if n.startswith(".")]:
                del subfolders[name]
            relative_folder, folder_error = _printable_name(
                folder.rstrip("/")[len(root) :].strip("/")
            )
            for name in sorted(files):
                if name.startswith(".") or "." not in name:
                    continue
                if "." + name.rsplit(".", 1)[1].lower() not in extensions:
                    continue
                info = files[name]
                shown, name_error = _printable_name(name)
                relative = f"{relative_folder}/{shown}" if relative_folder else shown
                rows["source_uri"].append(f"{base_uri}/{relative}")
                rows["relative_path"].append(relative)
                rows["source_size"].append(int(info.get("size") or 0))
                rows["source_version"].append(_version_of(info))
                rows["listing_error"].append(folder_error or name_error)
                if len(rows["source_uri"]) >= batch_rows:
                    yield pa.RecordBatch.from_pydict(rows, schema=LISTING_SCHEMA)
                    rows = {key: [] for key in rows}
        if rows["source_uri"]:
            yield pa.RecordBatch.from_pydict(rows, schema=LISTING_SCHEMA)
    except StorageError:
        raise
    except (OSError, ValueError) as err:
        raise StorageError(f"{url}: cannot list ({type(err).__name__}: {err})") from err


def list_images(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    extensions: frozenset[str] = IMAGE_EXTENSIONS,
) -> pa.Table:
    """The whole listing as one Arrow table (about 200 bytes a key: 1M keys ≈ 200 MB)."""
    batches = list(iter_listing(url, storage_options=storage_options, extensions=extensions))
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA)
