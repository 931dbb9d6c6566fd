"""Training ingest without Ray: listing and split, per-photo preparation, crop/flip, Lab."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from skimage import color, data

from models.colour import AB_SCALE, L_SCALE
from pipeline.decode import DecodeError
from pipeline.listing import LISTING_SCHEMA
from pipeline.storage import StorageError, portable_storage_options
from pipeline.train_data import (
    STATUS_FAILED,
    STATUS_GREY,
    STATUS_OK,
    GreyPhotoError,
    PhotoListing,
    TrainingDataError,
    list_training_photos,
    load_size_for,
    prepare_training_photo,
    prepared_fingerprint,
    random_crop_flip,
    read_and_prepare_batch,
    read_shard_batch,
    rgb_to_unit,
    rows_per_shard,
    shard_name,
    shuffle_buffer_rows,
    split_listing,
    to_model_lab,
    write_shard_batch,
)


def _encode(pixels: np.ndarray, image_format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def _listing(paths: list[str]) -> pa.Table:
    return pa.table(
        {
            "source_uri": [f"/root/{p}" for p in paths],
            "relative_path": paths,
            "source_size": [1] * len(paths),
            "source_version": [""] * len(paths),
            "listing_error": [None] * len(paths),
        },
        schema=LISTING_SCHEMA,
    )


def _write_photos(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    photo = data.coffee()
    paths = []
    for index in range(count):
        path = folder / f"photo{index:02d}.jpg"
        path.write_bytes(_encode(np.ascontiguousarray(photo[index * 5 :, index * 7 :])))
        paths.append(path)
    return paths


def test_load_size_keeps_the_pix2pix_proportion() -> None:
    assert load_size_for(256) == 286
    assert load_size_for(128) == 143
    assert load_size_for(64) == 72


def test_split_is_deterministic_disjoint_and_order_free() -> None:
    paths = [f"folder/{i:03d}.jpg" for i in range(40)]
    train, val = split_listing(_listing(paths), val_fraction=0.1)
    assert val.num_rows == 4
    assert train.num_rows == 36
    train_paths = set(train.column("relative_path").to_pylist())
    val_paths = set(val.column("relative_path").to_pylist())
    assert not train_paths & val_paths
    assert train_paths | val_paths == set(paths)
    # Same photos held out whatever the listing order, and on every run.
    _, val_shuffled = split_listing(_listing(paths[::-1]), val_fraction=0.1)
    assert set(val_shuffled.column("relative_path").to_pylist()) == val_paths
    # Another seed holds out other photos.
    _, val_other = split_listing(_listing(paths), val_fraction=0.1, seed=1)
    assert set(val_other.column("relative_path").to_pylist()) != val_paths


def test_split_keeps_at_least_one_on_each_side() -> None:
    _, val = split_listing(_listing(["a.jpg", "b.jpg", "c.jpg"]), val_fraction=0.01)
    assert val.num_rows == 1
    train, _ = split_listing(_listing(["a.jpg", "b.jpg"]), val_fraction=0.9)
    assert train.num_rows == 1
    train, val = split_listing(_listing(["a.jpg"]), val_fraction=0.5)
    assert (train.num_rows, val.num_rows) == (1, 0)


def test_split_barely_moves_when_photos_are_added() -> None:
    paths = [f"{i:03d}.jpg" for i in range(100)]
    _, before = split_listing(_listing(paths), val_fraction=0.1)
    _, after = split_listing(_listing([*paths, "new1.jpg", "new2.jpg"]), val_fraction=0.1)
    kept = set(before.column("relative_path").to_pylist()) & set(
        after.column("relative_path").to_pylist()
    )
    assert len(kept) >= 8  # of 10: at most the newcomers displace a couple


def test_colour_photo_is_squashed_to_the_load_size() -> None:
    photo = data.coffee()  # 600×400, not square
    prepared = prepare_training_photo(_encode(photo), size=72)
    assert prepared.shape == (72, 72, 3)
    assert prepared.dtype == np.uint8
    # The whole photo, squashed: the mean colour survives (a crop would not keep it this well).
    assert np.abs(prepared.mean(axis=(0, 1)) - photo.mean(axis=(0, 1))).max() < 6


@pytest.mark.parametrize(
    "pixels",
    [
        data.camera(),  # one channel
        np.repeat(data.camera()[..., None], 3, axis=2),  # grey stored as RGB
    ],
    ids=["L", "RGB-grey"],
)
def test_grey_photos_are_refused(pixels: np.ndarray) -> None:
    with pytest.raises(GreyPhotoError):
        prepare_training_photo(_encode(pixels), size=64)


def test_sixteen_bit_grey_is_grey() -> None:
    buffer = io.BytesIO()
    Image.fromarray(data.camera().astype(np.uint16) * 257).save(buffer, format="PNG")
    with pytest.raises(GreyPhotoError):
        prepare_training_photo(buffer.getvalue(), size=64)


def test_toned_prints_are_kept() -> None:
    grey = data.camera().astype(np.float32)
    sepia = np.clip(grey[..., None] * np.array([1.0, 0.85, 0.65]), 0, 255).astype(np.uint8)
    assert prepare_training_photo(_encode(sepia), size=64).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "payload", [b"", b"\xff\xd8\xff\xe0 truncated jpeg", b"plain text, not a picture"]
)
def test_undecodable_bytes_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        prepare_training_photo(payload, size=64)


def test_batch_reports_every_row_and_never_raises(tmp_path: Path) -> None:
    good = _write_photos(tmp_path, 2)
    grey = tmp_path / "grey.png"
    grey.write_bytes(_encode(data.camera(), "PNG"))
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 nope")
    missing = tmp_path / "deleted-since-listing.jpg"
    uris = [str(good[0]), str(grey), str(corrupt), str(missing), str(good[1])]
    out = read_and_prepare_batch(
        {"source_uri": np.array(uris, dtype=object)},
        size=36,
        min_colorfulness=5.0,
        storage_options=None,
    )
    assert list(out["source_uri"]) == uris
    assert list(out["status"]) == [STATUS_OK, STATUS_GREY, STATUS_FAILED, STATUS_FAILED, STATUS_OK]
    assert out["error_type"][2] == "OSError"  # a JPEG header, then nothing: truncated
    assert out["error_type"][3] == "FileNotFoundError"
    assert out["rgb"].shape == (5, 36, 36, 3)
    assert out["rgb"][0].any()
    assert not out["rgb"][1:4].any()  # placeholders, never trained on


def test_a_shard_keeps_every_row_and_gives_back_the_usable_pixels(tmp_path: Path) -> None:
    good = _write_photos(tmp_path / "photos", 3)
    corrupt = tmp_path / "photos" / "corrupt.jpg"
    corrupt.write_bytes(b"not a photo")
    uris = [str(good[0]), str(corrupt), str(good[1]), str(good[2])]
    listing = {"source_uri": np.array(uris, dtype=object)}
    status = write_shard_batch(
        listing,
        size=36,
        min_colorfulness=5.0,
        source_options=None,
        shard_folder=str(tmp_path / "shards"),
        target_options=None,
    )
    # The driver gets the status of every row and the shard's URI, never pixels.
    assert set(status) == {"source_uri", "status", "error_type", "error_message", "shard_uri"}
    assert list(status["status"]) == [STATUS_OK, STATUS_FAILED, STATUS_OK, STATUS_OK]
    (shard,) = set(status["shard_uri"])
    assert Path(shard).parent == tmp_path / "shards"
    assert Path(shard).name == shard_name(uris)  # a retried task rewrites the same file

    read = read_shard_batch(
        {"shard_uri": np.array([shard, shard], dtype=object)},
        size=36,
        columns=("rgb", "source_uri"),
        storage_options=None,
    )
    expected = read_and_prepare_batch(listing, size=36, min_colorfulness=5.0, storage_options=None)[
        "rgb"
    ][[0, 2, 3]]
    assert read["rgb"].dtype == np.uint8
    assert read["rgb"].shape == (6, 36, 36, 3)
    np.testing.assert_array_equal(read["rgb"][:3], expected)  # bit for bit, twice
    np.testing.assert_array_equal(read["rgb"][3:], expected)
    assert list(read["source_uri"]) == [uris[0], uris[2], uris[3]] * 2


def test_the_fingerprint_follows_the_files_and_settings_not_the_order() -> None:
    def listing(paths: list[str], size: int = 1) -> PhotoListing:
        table = _listing(paths)
        sizes = pa.array([size] * len(paths), pa.int64())
        table = table.set_column(table.schema.get_field_index("source_size"), "source_size", sizes)
        return PhotoListing("/root", None, 0.1, train=table, val=_listing(["v.jpg"]))

    base = prepared_fingerprint(listing(["a.jpg", "b.jpg"]), image_size=64, min_colorfulness=5)
    same = prepared_fingerprint(listing(["b.jpg", "a.jpg"]), image_size=64, min_colorfulness=5)
    assert base == same
    changed = [
        prepared_fingerprint(
            listing(["a.jpg", "b.jpg"], size=2), image_size=64, min_colorfulness=5
        ),
        prepared_fingerprint(listing(["a.jpg"]), image_size=64, min_colorfulness=5),
        prepared_fingerprint(listing(["a.jpg", "b.jpg"]), image_size=128, min_colorfulness=5),
        prepared_fingerprint(listing(["a.jpg", "b.jpg"]), image_size=64, min_colorfulness=9),
    ]
    assert base not in changed
    assert len(set(changed)) == len(changed)


def test_shards_and_shuffle_buffers_stay_a_few_mib() -> None:
    assert rows_per_shard(286) * 286 * 286 * 3 <= 2 * 1024 * 1024
    assert rows_per_shard(286) >= 8
    assert shuffle_buffer_rows(286) == 2 * rows_per_shard(286)
    assert rows_per_shard(4096) == 1  # a huge model size still makes shards of one photo


def test_random_crop_flip_takes_windows_of_each_photo() -> None:
    # Pixel values encode their position, so every output pixel says where it came from.
    size, load = 4, 7
    ys, xs = np.meshgrid(np.arange(load), np.arange(load), indexing="ij")
    frame = np.stack((ys * 10, xs * 10, np.zeros_like(ys)), axis=-1).astype(np.uint8)
    batch = torch.from_numpy(np.stack([frame] * 64))
    out = random_crop_flip(batch, size=size, generator=torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, size, size)
    assert out.dtype == torch.float32
    assert out.min() >= 0.0
    assert out.max() <= 1.0
    rows = (out[:, 0] * 255 / 10).round().long()  # (B, S, S) source row of each pixel
    cols = (out[:, 1] * 255 / 10).round().long()
    flipped = 0
    for index in range(64):
        assert (rows[index] == rows[index, :, :1]).all()  # rows intact: a window, not a warp
        step = cols[index, 0, 1] - cols[index, 0, 0]
        assert step in (1, -1)
        assert (cols[index].diff(dim=1) == step).all()  # contiguous columns
        flipped += int(step == -1)
    assert 16 < flipped < 48  # a fair coin over 64 photos
    offsets = {(int(rows[i, 0, 0]), int(cols[i, 0].min())) for i in range(64)}
    assert len(offsets) > 8  # crops land in many places


def test_random_crop_flip_is_reproducible_from_the_rng() -> None:
    batch = torch.randint(0, 255, (3, 10, 10, 3), dtype=torch.uint8)
    first = random_crop_flip(batch, size=8, generator=torch.Generator().manual_seed(3))
    second = random_crop_flip(batch, size=8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="smaller than the crop"):
        random_crop_flip(batch, size=11)


def test_model_lab_matches_scikit_image() -> None:
    photo = data.astronaut()[::8, ::8]  # (64, 64, 3)
    l_norm, ab_norm = to_model_lab(rgb_to_unit(torch.from_numpy(photo[None].copy())))
    assert l_norm.shape == (1, 1, 64, 64)
    assert ab_norm.shape == (1, 2, 64, 64)
    assert l_norm.min() >= -1
    assert l_norm.max() <= 1
    assert ab_norm.abs().max() <= 1
    reference = color.rgb2lab(photo)
    assert np.abs((l_norm[0, 0].numpy() + 1) * L_SCALE - reference[..., 0]).max() < 1e-3
    ab = ab_norm[0].permute(1, 2, 0).numpy() * AB_SCALE
    assert np.abs(ab - reference[..., 1:]).max() < 1e-2


def test_listing_errors_name_the_location(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    with pytest.raises(TrainingDataError, match=r"empty: no images found \(looked for .*\.jpg"):
        list_training_photos(str(empty))
    with pytest.raises(StorageError, match="no such folder"):
        list_training_photos(str(tmp_path / "missing"))
    single = tmp_path / "single"
    _write_photos(single, 1)
    with pytest.raises(TrainingDataError, match="only 1 image found; need at least 2"):
        list_training_photos(str(single))
    few = tmp_path / "few"
    _write_photos(few, 5)
    with pytest.raises(TrainingDataError, match=r"4 training images.*need 8 \(workers × batch"):
        list_training_photos(str(few), min_train_images=8)
    with pytest.raises(TrainingDataError, match="between 0 and 1"):
        list_training_photos(str(few), val_fraction=1.0)


def test_names_that_are_not_utf8_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    photos = tmp_path / "photos"
    _write_photos(photos, 4)
    # "café.jpg" in Latin-1: listed with a reason, since no Arrow string can hold the name.
    raw = os.fsencode(photos)
    os.rename(os.path.join(raw, b"photo00.jpg"), os.path.join(raw, b"caf\xe9.jpg"))
    with caplog.at_level(logging.WARNING, logger="pipeline.train_data"):
        listing = list_training_photos(str(photos), val_fraction=0.25)
    names = listing.train["relative_path"].to_pylist() + listing.val["relative_path"].to_pylist()
    assert sorted(names) == ["photo01.jpg", "photo02.jpg", "photo03.jpg"]
    assert "skipping 1 unreadable file(s), e.g. file name is not valid UTF-8 (caf\\xe9.jpg)" in (
        caplog.text
    )


def test_separate_validation_folder_is_not_trained_on(tmp_path: Path) -> None:
    _write_photos(tmp_path / "all", 6)
    val_folder = tmp_path / "all" / "val"
    _write_photos(val_folder, 2)
    listing = list_training_photos(str(tmp_path / "all"), val_url=str(val_folder))
    assert listing.val.num_rows == 2
    assert listing.train.num_rows == 6  # the two under val/ are listed under SRC too
    assert listing.val_fraction == 0.0
    assert not set(listing.train.column("source_uri").to_pylist()) & set(
        listing.val.column("source_uri").to_pylist()
    )


def test_portable_options_carry_the_drivers_s3_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert portable_storage_options("/some/local/folder") is None
    explicit = {"key": "k", "secret": "s"}
    assert portable_storage_options("s3://bucket/x", explicit) == explicit
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    options = portable_storage_options("s3://bucket/photos")
    assert options is not None
    assert options["key"] == "AKIDEXAMPLE"
    assert options["secret"] == "not-a-real-secret"
    assert options["client_kwargs"] == {
        "endpoint_url": "http://127.0.0.1:9",
        "region_name": "eu-west-1",
    }
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert "key" not in (portable_storage_options("s3://bucket/photos") or {})
