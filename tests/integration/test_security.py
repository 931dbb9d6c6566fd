"""Credentials stay secret through a whole train → colorize → nightly run on S3, and an object
the pipeline may not read becomes one failed row instead of stopping the run.

Both tests run against their own SeaweedFS server: the session one (conftest.py) has a single
all-powerful identity, while these need a planted, recognisable one and a narrowly scoped one,
and SeaweedFS fixes identities when it starts.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from skimage import data

from jobs.cli import main
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.colorize import ColorizeConfig, run_colorize
from pipeline.manifest import read_manifest
from pipeline.model_store import save_model
from tests.integration.conftest import isolated_aws_env
from tests.integration.s3server import S3Identity, SeaweedS3

pytestmark = pytest.mark.integration

# Shaped like real AWS keys ('/' and '+' in the secret), so that the URL-encoded and
# JSON-escaped forms differ from the raw one and each gets looked for; fresh every run, so a
# hit can only come from this run.
PLANTED = S3Identity(
    name="planted",
    actions=("Admin", "Read", "Write", "List", "Tagging"),
    access_key="AKIAPLANTED" + secrets.token_hex(5).upper(),
    secret_key=f"PlantedSecret/{secrets.token_hex(8)}+{secrets.token_hex(8)}/Key",
)
# A second secret for the wrong-credentials runs: a refused secret must not leak either.
WRONG_SECRET = f"PlantedWrong/{secrets.token_hex(8)}+{secrets.token_hex(8)}/Key"
UNKNOWN_ACCESS_KEY = "AKIAUNKNOWN" + secrets.token_hex(5).upper()

ARCHIVE = "archive"  # the bucket of the full run
LOCKED = "locked"  # the bucket with one object the scoped identity may not read
# The pipeline's identity on LOCKED: list the bucket, read the model, its own output and every
# scan whose name starts with "photo-"; "private-04.jpg" beside them matches no Read action.
SCOPED = S3Identity(
    name="scoped",
    actions=(
        f"List:{LOCKED}",
        f"Read:{LOCKED}/scans/photo-*",
        f"Read:{LOCKED}/model/*",
        f"Read:{LOCKED}/out/*",
        f"Write:{LOCKED}/out/*",
    ),
)

TINY_TRAIN = ["--image-size", "64", "--width", "8", "--batch-size", "2", "--decay-epochs", "0",
              "--epochs", "1", "--workers", "1", "--name", "planted"]  # fmt: skip


@pytest.fixture(scope="module")
def secure_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A private SeaweedFS with the planted and the scoped identity beside the admin one."""
    with SeaweedS3(tmp_path_factory.mktemp("secure-s3"), identities=[PLANTED, SCOPED]) as server:
        server.make_bucket(ARCHIVE)
        server.make_bucket(LOCKED)
        yield server


def _admin_fs(server: SeaweedS3) -> s3fs.S3FileSystem:
    # The test's own uploads and reads go through the admin identity: the planted credentials
    # are used by the code under test only, so any trace of them is the product's doing.
    return s3fs.S3FileSystem(**server.storage_options(), skip_instance_cache=True)


# --- Looking for the secret: every encoding it might take, inside every container ---------


def _needles() -> dict[str, bytes]:
    """The planted values and the encoded forms a careless writer could give them."""
    needles: dict[str, bytes] = {}
    for label, value in (
        ("secret", PLANTED.secret_key),
        ("wrong secret", WRONG_SECRET),
        ("access key", PLANTED.access_key),
        ("unknown access key", UNKNOWN_ACCESS_KEY),
    ):
        raw = value.encode()
        needles[label] = raw
        for encoding, encoded in (
            ("url-encoded", urllib.parse.quote(value, safe="").encode()),
            ("json-escaped", value.replace("/", "\\/").encode()),
        ):
            if encoded != raw:  # the access keys have no character these would change
                needles[f"{label} ({encoding})"] = encoded
        # Base64 of a value inside a longer string depends on where it starts modulo 3: look
        # for the characters that are the same whatever precedes or follows it.
        for shift in range(3):
            encoded = base64.b64encode(b"\0" * shift + raw)
            inner = encoded[4 * ((shift + 2) // 3) : 4 * ((shift + len(raw)) // 3)]
            needles[f"{label} (base64, offset {shift})"] = inner
    return needles


NEEDLES = _needles()


def _decoded_views(blob: bytes) -> Iterator[bytes]:
    """The bytes themselves, and what they hold once unpacked: compressed Parquet pages, zTXt
    and iTXt chunks, EXIF and XMP of a PNG, zip members (torch checkpoints), gzip streams."""
    yield blob
    if blob[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(blob))
        yield json.dumps({k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()},
                         ensure_ascii=False).encode()  # fmt: skip
        for column in table.columns:
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                yield "\n".join(v for v in column.to_pylist() if v is not None).encode()
            elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
                yield b"\n".join(v for v in column.to_pylist() if v is not None)
    elif blob[:8] == b"\x89PNG\r\n\x1a\n":
        with Image.open(io.BytesIO(blob)) as image:
            image.load()  # text chunks after the pixels are read only now
            values = [*image.info.values(), *getattr(image, "text", {}).values()]
            exif = image.getexif()
            values += [str(v) for v in exif.values()]
        for value in values:
            yield value if isinstance(value, bytes) else str(value).encode()
    elif blob[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            for name in archive.namelist():
                yield from _decoded_views(archive.read(name))
    elif blob[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            yield gzip.decompress(blob)


def _planted_in(blob: bytes) -> list[str]:
    """Which planted values (and in which encoding) occur in ``blob`` or what it unpacks to."""
    return sorted({label for view in _decoded_views(blob) for label, needle in NEEDLES.items()
                   if needle in view})  # fmt: skip


@dataclass
class Scanned:
    """What was searched, so the report (and a reader of a failure) can see it was not empty."""

    files: int = 0
    bytes: int = 0

    def check(self, name: str, blob: bytes, found: dict[str, list[str]]) -> None:
        self.files += 1
        self.bytes += len(blob)
        hits = _planted_in(blob)
        if hits:
            found[name] = hits


def _scan_folder(root: Path, found: dict[str, list[str]]) -> Scanned:
    scanned = Scanned()
    for path in sorted(root.rglob("*")):
        # Regular files only: Ray's folder also holds unix sockets and the plasma store.
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):  # a log rotated away while we walk
                scanned.check(str(path), path.read_bytes(), found)
    return scanned


def test_the_secret_finder_finds_planted_secrets(tmp_path: Path) -> None:
    """The finder must see a secret in every form and container used below, or the real test
    could pass because the search is broken rather than because nothing leaked."""
    raw = PLANTED.secret_key
    assert _planted_in(f"x={raw};".encode()) == ["secret"]
    assert "secret (url-encoded)" in _planted_in(f"?s={urllib.parse.quote(raw, safe='')}".encode())
    escaped = raw.replace("/", "\\/")  # some JSON writers escape "/" as "\/"
    assert "secret (json-escaped)" in _planted_in(('{"s": "' + escaped + '"}').encode())
    for prefix in (b"", b"a", b"ab"):
        encoded = base64.b64encode(prefix + raw.encode() + b"!")
        assert any(hit.startswith("secret (base64") for hit in _planted_in(encoded)), prefix
    assert _planted_in(f"key {PLANTED.access_key}".encode()) == ["access key"]

    # Inside containers whose raw bytes do not show it: Parquet, zTXt PNG, gzip, zip.
    table = pa.table({"error_message": ["fine", f"denied for {raw}"], "n": [1, 2]})
    buffer = io.BytesIO()
    # gzip Huffman-codes literals (zstd may store a short one as it is), and without statistics:
    # min/max values would sit uncompressed beside the pages.
    pq.write_table(table, buffer, compression="gzip", write_statistics=False)
    assert raw.encode() not in buffer.getvalue()
    assert "secret" in _planted_in(buffer.getvalue())
    info = PngInfo()
    info.add_text("Comment", raw, zip=True)
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG", pnginfo=info)
    assert raw.encode() not in png.getvalue()
    assert "secret" in _planted_in(png.getvalue())
    assert "secret" in _planted_in(gzip.compress(raw.encode() * 3))
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("data.pkl", raw * 3)
    assert "secret" in _planted_in(packed.getvalue())

    # And the folder walk used for Ray's logs reports a file planted among many.
    for index in range(20):
        (tmp_path / f"worker-{index}.log").write_text("nothing here\n" * 50)
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "raylet.out").write_bytes(b"...\n" + raw.encode() + b"\n...")
    found: dict[str, list[str]] = {}
    scanned = _scan_folder(tmp_path, found)
    assert found == {str(tmp_path / "nested" / "raylet.out"): ["secret"]}
    assert scanned.files == 21


# --- The full run ---------------------------------------------------------------------------


def _photo(index: int) -> np.ndarray:
    """A colour crop of one of skimage's sample photos, different for every index."""
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    photo = sources[index % len(sources)]
    height, width = photo.shape[:2]
    top, left = (index * 37) % (height // 3), (index * 53) % (width // 3)
    return np.ascontiguousarray(photo[top : top + height // 2, left : left + width // 2])


def _tiny_generator() -> UNetGenerator:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    return generator


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _scan(index: int) -> bytes:
    """A small black-and-white scan (JPEG): a greyed photo."""
    grey = Image.fromarray(_photo(index)).convert("L").resize((96, 64))
    return _encoded(np.asarray(grey), "JPEG")


@pytest.fixture
def planted_env(
    secure_s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[None]:
    """The standard AWS environment holding the planted credentials, and nothing of the host's
    (the same hygiene as conftest.s3_env, for this module's server and identity)."""
    isolated_aws_env(secure_s3.env(PLANTED), monkeypatch, tmp_path)
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@dataclass(frozen=True)
class CliRun:
    argv: tuple[str, ...]
    code: int
    out: str
    err: str


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> CliRun:
    """One ``chromascan`` command in this process, on the shared cluster; output captured."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return CliRun(tuple(argv), code, captured.out, captured.err)


@pytest.fixture
def own_ray_tmp() -> Iterator[Path]:
    """RAY_TMPDIR for commands that start their own local Ray: its session folder (logs of
    every process of that cluster) lands here, where the test can search it."""
    # Short, under /tmp: Ray's unix socket paths must stay under 108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="cs-sec-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _cli_process(ray_tmp: Path, *argv: str) -> CliRun:
    """``python -m jobs …`` as a user runs it: its own local Ray, started with this process's
    environment (the planted credentials), so its workers inherit them."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    process = subprocess.Popen(
        [sys.executable, "-m", "jobs", *argv], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=300)
    finally:
        # Whatever of its local Ray outlived it (it normally stops at exit).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return CliRun(tuple(argv), process.returncode, out, err)


def _run_everything(
    fs: s3fs.S3FileSystem,
    ray_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> list[CliRun]:
    """Train, colorize, nightly with the planted credentials; then commands the store refuses.
    Returns every command's output."""
    for index in range(8):
        suffix, fmt = ("png", "PNG") if index % 2 else ("jpg", "JPEG")
        fs.pipe_file(f"{ARCHIVE}/photos/p{index:02d}.{suffix}", _encoded(_photo(index), fmt))
    for index in range(4):
        fs.pipe_file(f"{ARCHIVE}/scans/box1/s{index:02d}.jpg", _scan(index))
    # A scan that cannot be decoded: its failed row carries an error message with context.
    fs.pipe_file(f"{ARCHIVE}/scans/box1/torn.jpg", b"\xff\xd8\xff\xe0 torn off here")
    bucket = f"s3://{ARCHIVE}"
    model = f"{bucket}/runs/first/model"
    runs: list[CliRun] = []

    # 1. Train from the bucket, checkpoints and the artifact to the bucket, on the shared
    # cluster (whose workers started without the credentials: the driver must pass them on).
    runs.append(_cli(capsys, "train", f"{bucket}/photos", "--output", f"{bucket}/runs/first",
                     *TINY_TRAIN))  # fmt: skip
    assert runs[-1].code == 0, runs[-1].err
    # 2. Colour the scans with it, S3 to S3; the torn scan fails, the run goes on. In its own
    # process and Ray, as on a user's machine, so that Ray's logs of a whole colorize run
    # are searched too.
    runs.append(_cli_process(ray_tmp, "colorize", f"{bucket}/scans", f"{bucket}/out", "-m",
                             model, "--batch-size", "2", "--allow-failures"))  # fmt: skip
    assert runs[-1].code == 0, runs[-1].err
    assert "4 ok, 1 failed, 0 already done" in runs[-1].out
    # 3. A new scan arrives; the nightly run colours it (and retries the torn one).
    fs.pipe_file(f"{ARCHIVE}/scans/box2/s04.jpg", _scan(4))
    runs.append(_cli_process(ray_tmp, "nightly", f"{bucket}/scans", f"{bucket}/out", "-m",
                             model, "--allow-failures"))  # fmt: skip
    assert runs[-1].code == 0, runs[-1].err
    assert "1 ok, 1 failed, 4 already done" in runs[-1].out

    # 4. Error paths that carry context (the URL and the store's reason), with a secret the
    # store refuses and then with an access key it does not know.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    s3fs.S3FileSystem.clear_instance_cache()
    refused = [
        _cli(capsys, "colorize", f"{bucket}/scans", f"{bucket}/out2", "-m", model),
        _cli(capsys, "nightly", f"{bucket}/scans", f"{bucket}/out", "-m", model),
        _cli(capsys, "train", f"{bucket}/photos", "--output", f"{bucket}/runs/second",
             *TINY_TRAIN),
        _cli(capsys, "manifest", "summary", f"{bucket}/out"),
    ]  # fmt: skip
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", UNKNOWN_ACCESS_KEY)
    s3fs.S3FileSystem.clear_instance_cache()
    refused.append(_cli(capsys, "nightly", f"{bucket}/scans", f"{bucket}/out", "-m", model))
    for run in refused:
        # One line naming the location and the store's reason, and a failed exit.
        assert run.code == 1, run
        assert re.fullmatch(r"chromascan: s3://archive/\S+: cannot \w+ \(PermissionError: .+\)\n",
                            run.err), run  # fmt: skip
    return runs + refused


def _check_what_was_written(
    server: SeaweedS3, fs: s3fs.S3FileSystem, found: dict[str, list[str]]
) -> Scanned:
    """Search every object in the bucket, after checking the kinds the runs must have written
    are there (so an empty bucket cannot pass)."""
    fs.invalidate_cache()
    keys = sorted(fs.find(ARCHIVE))
    kinds = {Path(key).suffix for key in keys}
    assert {".parquet", ".json", ".png", ".safetensors", ".pt"} <= kinds, kinds
    assert any("/out/manifest/run=" in key for key in keys)
    assert any("/out/runs/" in key and key.endswith(".json") for key in keys)
    outputs = [key for key in keys if key.startswith(f"{ARCHIVE}/out/images/")]
    assert len(outputs) == 5
    # The PNG metadata really is read: the XMP names the source, and the search sees it.
    with Image.open(io.BytesIO(fs.cat_file(outputs[0]))) as image:
        image.load()
        source = f"s3://{outputs[0].replace('/out/images/', '/scans/')[:-4]}.jpg"
        assert source in str(image.info)
    # The failed rows' messages are searched too: they exist and say what went wrong.
    ledger = read_manifest(f"s3://{ARCHIVE}/out", storage_options=server.storage_options())
    failed = ledger.filter(pc.equal(ledger["status"], "failed")).to_pylist()
    assert [row["relative_path"] for row in failed] == ["box1/torn.jpg"] * 2
    assert all(row["error_type"] and row["error_message"] for row in failed), failed

    # Manifests, run summaries, PNGs, model.json, weights, checkpoints (torch zip files),
    # sample grids, train.json: unpacked where they are containers.
    written = Scanned()
    for key in keys:
        written.check(f"s3://{key}", fs.cat_file(key), found)
    return written


@pytest.mark.usefixtures("planted_env")
def test_planted_credentials_appear_nowhere_after_train_colorize_nightly(
    ray_local: dict[str, Any],
    secure_s3: SeaweedS3,
    own_ray_tmp: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every log record of the in-process commands at INFO and above, as a user's logging
    # setup would show them (DEBUG is botocore's own wire log, signed headers and all).
    caplog.set_level(logging.INFO)
    fs = _admin_fs(secure_s3)
    runs = _run_everything(fs, own_ray_tmp, monkeypatch, capsys)

    found: dict[str, list[str]] = {}
    for run in runs:
        for stream, text in (("stdout", run.out), ("stderr", run.err)):
            hits = _planted_in(text.encode())
            if hits:
                found[f"{' '.join(run.argv[:2])} {stream}"] = hits
    log_hits = _planted_in(caplog.text.encode())
    if log_hits:
        found["log records"] = log_hits
    written = _check_what_was_written(secure_s3, fs, found)

    # The session folders of both clusters that ran workers (train: the shared one; colorize
    # and nightly: their own): logs of the driver, raylet, GCS, dashboard agents, runtime-env
    # agent, every worker and actor, Ray Data and Ray Train, and the session's metadata.
    ray_files = Scanned()
    for root in (Path(str(ray_local["temp_dir"])), own_ray_tmp):
        scanned = _scan_folder(root, found)
        # The folder held a cluster's logs, workers' included: the walk did not miss them.
        assert any(p.name.startswith("worker-") for p in root.rglob("logs/*")), root
        ray_files.files += scanned.files
        ray_files.bytes += scanned.bytes

    print(
        f"\nsearched {len(runs)} commands' output, {len(caplog.records)} log records, "
        f"{written.files} objects ({written.bytes} bytes) in the bucket, "
        f"{ray_files.files} files ({ray_files.bytes} bytes) of Ray's session folders"
    )
    assert found == {}


@pytest.mark.usefixtures("planted_env", "ray_local")
def test_colorize_on_a_running_cluster_reaches_s3_with_the_drivers_credentials(
    secure_s3: SeaweedS3, capsys: pytest.CaptureFixture[str]
) -> None:
    fs = _admin_fs(secure_s3)
    for index in range(2):
        fs.pipe_file(f"{ARCHIVE}/running/scans/s{index}.jpg", _scan(index))
    save_model(_tiny_generator(), f"s3://{ARCHIVE}/running/model", name="running",
               storage_options=secure_s3.storage_options())  # fmt: skip
    bucket = f"s3://{ARCHIVE}/running"
    run = _cli(capsys, "colorize", f"{bucket}/scans", f"{bucket}/out", "-m", f"{bucket}/model")
    assert run.code == 0, run.err
    assert "2 ok, 0 failed" in run.out


# --- An object the pipeline may not read ---------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_an_unreadable_object_is_one_failed_row_and_the_run_goes_on(
    secure_s3: SeaweedS3, tmp_path: Path
) -> None:
    fs = _admin_fs(secure_s3)
    names = [f"photo-{index:02d}.jpg" for index in range(4)]
    for index, name in enumerate(names):
        fs.pipe_file(f"{LOCKED}/scans/{name}", _scan(index))
    fs.pipe_file(f"{LOCKED}/scans/private-04.jpg", _scan(4))
    save_model(_tiny_generator(), f"s3://{LOCKED}/model", name="locked",
               storage_options=secure_s3.storage_options())  # fmt: skip

    scoped = secure_s3.storage_options(SCOPED)
    scoped_fs = s3fs.S3FileSystem(**scoped, skip_instance_cache=True)
    # The store really refuses that one object to this identity, and lists it.
    with pytest.raises(PermissionError):
        scoped_fs.cat_file(f"{LOCKED}/scans/private-04.jpg")
    assert scoped_fs.cat_file(f"{LOCKED}/scans/{names[0]}")
    assert f"{LOCKED}/scans/private-04.jpg" in scoped_fs.find(f"{LOCKED}/scans")

    bucket = f"s3://{LOCKED}"
    config = ColorizeConfig(src=f"{bucket}/scans", dst=f"{bucket}/out", model=f"{bucket}/model",
                            batch_size=2)  # fmt: skip
    summary = run_colorize(config, software="chromascan test", storage_options=scoped)
    assert (summary.listed, summary.ok, summary.failed) == (5, 4, 1)

    rows = read_manifest(f"{bucket}/out", storage_options=scoped).to_pylist()
    assert sorted(row["relative_path"] for row in rows) == sorted([*names, "private-04.jpg"])
    by_name = {row["relative_path"]: row for row in rows}
    denied = by_name.pop("private-04.jpg")
    assert denied["status"] == "failed"
    assert denied["error_type"] == "SourceUnreadable"
    # The URL and the store's refusal; S3 gives a HEAD's 403 no body, so the reason is either
    # the bare status or the error document's text, depending on which request s3fs sent.
    assert re.fullmatch(
        rf"{bucket}/scans/private-04\.jpg: cannot read \(PermissionError: "
        r"(Forbidden|Access Denied\.)\)",
        denied["error_message"],
    ), denied["error_message"]
    assert denied["output_uri"] is None
    assert {row["status"] for row in by_name.values()} == {"ok"}
    outputs = sorted(fs.find(f"{LOCKED}/out/images"))
    assert outputs == [f"{LOCKED}/out/images/{name[:-4]}.png" for name in names]
