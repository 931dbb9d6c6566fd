"""Storage by fsspec URL: a local path, file://…, s3://bucket/prefix, or anything fsspec knows.

S3 settings come from the standard AWS environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, AWS_ENDPOINT_URL) or explicit storage options. Nothing here logs or returns them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.core import url_to_fs

# The most one read or write may take before the store counts as not answering: this much,
# plus one second per MiB moved (a 300 MB TIFF at 1 MiB/s still fits). botocore's own
# read timeout does not bound a PUT to a store that accepts the connection and then never
# answers (measured against a frozen SeaweedFS: a 10-byte put_object waited until killed).
DEFAULT_TIMEOUT_S = 120.0
_SECONDS_PER_MIB = 1.0


class StorageError(OSError):
    """A storage location could not be reached, read or written; the message names the URL."""


class StorageUnavailableError(StorageError):
    """The store itself is not answering (timeouts, refused or dropped connections).

    Unlike a missing or forbidden object this is not about one input: a run stops on it
    rather than record every remaining input as failed, and a re-run finishes the rest.
    """


# Connection-level failures, as the S3 stack raises them after its own retries: builtin
# TimeoutError/ConnectionError (OSError subclasses; fsspec's FSTimeoutError is one) and
# botocore's HTTPClientError family (EndpointConnectionError, ConnectTimeoutError,
# ReadTimeoutError, ConnectionClosedError), which is not an OSError.
_UNAVAILABLE_NAMES = frozenset(
    {"HTTPClientError", "EndpointConnectionError", "ConnectionClosedError", "ConnectTimeoutError",
     "ReadTimeoutError", "ProxyConnectionError", "ServerDisconnectedError",
     "ClientConnectorError"}
)  # fmt: skip


def error_chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every error behind it: causes, contexts, and a Ray task error's cause."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        # RayTaskError keeps the task's own exception in .cause, not in __cause__.
        for nxt in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(nxt, BaseException):
                pending.append(nxt)


def is_unavailable(error: BaseException) -> bool:
    """Whether ``error`` (or an error behind it) says the store is not answering."""
    return any(
        isinstance(current, StorageUnavailableError | TimeoutError | ConnectionError)
        or any(cls.__name__ in _UNAVAILABLE_NAMES for cls in type(current).__mro__)
        for current in error_chain(error)
    )


def _timeout_for(size: int, timeout_s: float) -> float:
    return timeout_s + _SECONDS_PER_MIB * size / 2**20


# Credential problems botocore raises outside the OSError tree: a settings problem to report
# in one line, not a traceback.
_CREDENTIAL_NAMES = frozenset({"NoCredentialsError", "PartialCredentialsError"})


def _is_storage_failure(err: BaseException) -> bool:
    return (
        isinstance(err, OSError)
        or is_unavailable(err)
        or any(cls.__name__ in _CREDENTIAL_NAMES for cls in type(err).__mro__)
    )


def _storage_error(url: str, doing: str, err: BaseException) -> StorageError:
    detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    if is_unavailable(err):
        return StorageUnavailableError(
            f"{url}: cannot {doing}, the store is not answering ({detail})"
        )
    return StorageError(f"{url}: cannot {doing} ({detail})")


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
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    missing_ok: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    size_hint: int = 0,
) -> bytes | None:
    """The object's bytes; None when it does not exist and ``missing_ok``.

    Raises:
        FileNotFoundError: it does not exist (and not ``missing_ok``).
        StorageUnavailableError: no answer within ``timeout_s`` (+1 s per MiB of ``size_hint``).
        StorageError: anything else that stops the read (permission, network).
    """
    fs, path = filesystem(url, storage_options)
    try:
        if isinstance(fs, AsyncFileSystem):
            return fs.cat_file(path, timeout=_timeout_for(size_hint, timeout_s))
        return fs.cat_file(path)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    except Exception as err:
        if _is_storage_failure(err):
            raise _storage_error(url, "read", err) from err
        raise


def write_bytes_atomic(
    url: str,
    data: bytes,
    *,
    storage_options: Mapping[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Write so that a reader sees the old object, nothing, or the whole new one.

    Object stores publish a PUT only when it completes, so a direct write is already atomic
    there; on file systems the bytes go to a temporary sibling that is then renamed.

    Raises:
        StorageUnavailableError: no answer within ``timeout_s`` (+1 s per MiB written).
        StorageError: anything else that stops the write.
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
        elif isinstance(fs, AsyncFileSystem):
            fs.pipe_file(path, data, timeout=_timeout_for(len(data), timeout_s))
        else:
            fs.pipe_file(path, data)
    except Exception as err:
        if _is_storage_failure(err):
            raise _storage_error(url, "write", err) from err
        raise


def portable_storage_options(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Storage options that reach ``url``'s store, with the same identity, from any Ray node.

    Explicit options are returned as they are. Otherwise, for S3, the endpoint and region that
    pipeline.storage derives from this process's environment, plus its static credentials
    (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) when set: Ray workers on
    other nodes, or started before those variables were, do not share the driver's
    environment. Without static credentials the workers use their own chain (instance roles).
    The result travels inside Ray task payloads only; callers must never log or record it.
    """
    if storage_options is not None:
        return dict(storage_options)
    fs, _ = filesystem(url)
    options = dict(getattr(fs, "storage_options", {}) or {})
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if {"s3", "s3a"} & set(protocols) and key and secret and "key" not in options:
        options.update(key=key, secret=secret)
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token:
            options["token"] = token
    return options or None
