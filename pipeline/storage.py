"""Storage by fsspec URL: a local path, file://…, s3://bucket/prefix, or anything fsspec knows.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL) or explicit storage options. Nothing here logs or returns them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.core import url_to_fs


class StorageError(OSError):
    """A storage location could not be reached, read or written; the message names the URL."""


def _s3_defaults() -> dict[str, Any]:
    # botocore reads AWS_ENDPOINT_URL itself in recent versions; passing it explicitly keeps
    # S3-compatible stores (SeaweedFS, MinIO, Ceph) working with older clients too.
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs: dict[str, Any] = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        options["client_kwargs"] = client_kwargs
    return options


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the bare path for ``url``."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a") and not options:
        options = _s3_defaults()
    try:
        return url_to_fs(url, **options)
    except (ValueError, ImportError) as err:
        raise StorageError(f"{url}: cannot open this location ({err})") from err


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with '/', whatever the protocol."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(
    url: str, *, storage_options: Mapping[str, Any] | None = None, missing_ok: bool = False
) -> bytes | None:
    """The object's bytes; None when it does not exist and ``missing_ok``."""
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except (PermissionError, OSError) as err:
        raise StorageError(f"{url}: cannot read ({type(err).__name__}: {err})") from err


def write_bytes_atomic(
    url: str, data: bytes, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write so that a reader sees the old object, nothing, or the whole new one.

    Object stores publish a PUT only when it completes, so a direct write is already atomic
    there; on file systems the bytes go to a temporary sibling that is then renamed.
    """
    fs, path = filesystem(url, storage_options)
    try:
        if "file" in fs.protocol or "local" in fs.protocol:
            parent = path.rsplit("/", 1)[0]
            fs.makedirs(parent, exist_ok=True)
            # A short hidden name: the target's own name may already be near the 255-byte limit.
            tmp = f"{parent}/.chromascan-{uuid.uuid4().hex[:16]}.tmp"
            try:
                with fs.open(tmp, "wb") as handle:
                    handle.write(data)
                fs.mv(tmp, path)
            finally:
                if fs.exists(tmp):
                    fs.rm(tmp)
        else:
            fs.pipe_file(path, data)
    except (PermissionError, OSError) as err:
        raise StorageError(f"{url}: cannot write ({type(err).__name__}: {err})") from err
