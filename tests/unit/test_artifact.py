"""The model artifact contract: files, id, verification, refusal of anything untrustworthy."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import pytest
import torch

from models.artifact import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    build_artifact_files,
    load_artifact_files,
)
from models.networks import UNetGenerator
from pipeline.model_store import load_model, save_model


def _rewrite_json(folder: Path, **changes: object) -> None:
    path = folder / CONFIG_FILE
    metadata = json.loads(path.read_text())
    metadata.update(changes)
    path.write_text(json.dumps(metadata))


def test_round_trip_gives_the_same_predictions(
    tmp_path: Path, small_generator: UNetGenerator
) -> None:
    model_id = save_model(
        small_generator, str(tmp_path / "m"), name="tiny", provenance={"steps": 12, "data": "x/"}
    )
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.model_id == model_id
    assert not loaded.generator.training
    l_norm = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.generator(l_norm), small_generator(l_norm))
    assert loaded.metadata["provenance"] == {"steps": 12, "data": "x/"}
    assert loaded.metadata["generator"]["width"] == 8
    assert loaded.metadata["image_size"] == 32
    assert {"created_at", "colour", "parameters", "weights_sha256"} <= loaded.metadata.keys()


def test_model_id_is_name_and_weights_hash(tmp_path: Path, small_generator: UNetGenerator) -> None:
    model_id = save_model(small_generator, str(tmp_path), name="archive-v2")
    sha256 = hashlib.sha256((tmp_path / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert model_id == f"archive-v2@{sha256[:12]}"
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["weights_sha256"] == sha256


def test_same_weights_same_id(small_generator: UNetGenerator) -> None:
    first = build_artifact_files(small_generator)
    second = build_artifact_files(small_generator)
    assert first[WEIGHTS_FILE] == second[WEIGHTS_FILE]


@pytest.mark.parametrize("name", ["", "has space", "a@b", "a/b", "-leading"])
def test_bad_names_are_refused(small_generator: UNetGenerator, name: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        build_artifact_files(small_generator, name=name)


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file_is_named(
    tmp_path: Path, small_generator: UNetGenerator, missing: str
) -> None:
    save_model(small_generator, str(tmp_path))
    (tmp_path / missing).unlink()
    with pytest.raises(ArtifactError, match=f"{tmp_path}/{missing}: missing"):
        load_model(str(tmp_path))


def test_tampered_weights_are_refused(tmp_path: Path, small_generator: UNetGenerator) -> None:
    save_model(small_generator, str(tmp_path))
    weights = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0x01  # one bit in the last float
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE}: sha256 .* does not match"):
        load_model(str(tmp_path))


def test_config_that_does_not_match_the_weights(
    tmp_path: Path, small_generator: UNetGenerator
) -> None:
    save_model(small_generator, str(tmp_path))
    metadata = json.loads((tmp_path / CONFIG_FILE).read_text())
    _rewrite_json(tmp_path, generator={**metadata["generator"], "width": 16})
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE}: weights do not match the config"):
        load_model(str(tmp_path))
    _rewrite_json(
        tmp_path,
        generator={**metadata["generator"], "depth": 4, "image_size": 16, "dropout_blocks": 2},
    )
    with pytest.raises(ArtifactError, match=r"weights do not match the config.*unexpected net"):
        load_model(str(tmp_path))


def test_invalid_config_is_named(tmp_path: Path, small_generator: UNetGenerator) -> None:
    save_model(small_generator, str(tmp_path))
    metadata = json.loads((tmp_path / CONFIG_FILE).read_text())
    _rewrite_json(tmp_path, generator={**metadata["generator"], "image_size": 33})
    with pytest.raises(ArtifactError, match=f"{CONFIG_FILE}: invalid generator config"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_pickled_weights_are_refused_without_unpickling(
    tmp_path: Path, small_generator: UNetGenerator, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    save_model(small_generator, str(tmp_path))
    buffer = io.BytesIO()
    if how == "torch.save":
        torch.save(small_generator.state_dict(), buffer)
    else:
        pickle.dump({"weights": [1, 2, 3]}, buffer)
    payload = buffer.getvalue()
    # A correct hash: the attacker controls both files; the format check must still refuse.
    (tmp_path / WEIGHTS_FILE).write_bytes(payload)
    _rewrite_json(tmp_path, weights_sha256=hashlib.sha256(payload).hexdigest())

    def _no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("the loader tried to unpickle")

    monkeypatch.setattr(pickle, "loads", _no_unpickling)
    monkeypatch.setattr(pickle, "load", _no_unpickling)
    monkeypatch.setattr(torch, "load", _no_unpickling)
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE}: looks like a pickle"):
        load_model(str(tmp_path))


def test_garbage_weights_are_refused(tmp_path: Path, small_generator: UNetGenerator) -> None:
    save_model(small_generator, str(tmp_path))
    payload = b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    (tmp_path / WEIGHTS_FILE).write_bytes(payload)
    _rewrite_json(tmp_path, weights_sha256=hashlib.sha256(payload).hexdigest())
    with pytest.raises(ArtifactError, match=f"{WEIGHTS_FILE}: not a valid safetensors file"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"format": "something-else"}', "not a chromascan model description"),
        (b'{"format": "chromascan-model", "format_version": 99}', "format_version 99 is newer"),
        (b'{"format": "chromascan-model", "format_version": 1}', "missing required field"),
    ],
)
def test_bad_model_json_is_named(
    tmp_path: Path, small_generator: UNetGenerator, content: bytes, message: str
) -> None:
    save_model(small_generator, str(tmp_path))
    (tmp_path / CONFIG_FILE).write_bytes(content)
    with pytest.raises(ArtifactError, match=f"{CONFIG_FILE}: {message}"):
        load_model(str(tmp_path))


def test_other_colour_normalisation_is_refused(
    tmp_path: Path, small_generator: UNetGenerator
) -> None:
    save_model(small_generator, str(tmp_path))
    metadata = json.loads((tmp_path / CONFIG_FILE).read_text())
    _rewrite_json(tmp_path, colour={**metadata["colour"], "ab_scale": 128.0})
    with pytest.raises(ArtifactError, match="colour normalisation"):
        load_model(str(tmp_path))


def test_load_from_bytes_names_the_location(small_generator: UNetGenerator) -> None:
    files = build_artifact_files(small_generator)
    loaded = load_artifact_files(files, location="s3://bucket/models/a/")
    assert loaded.name == "chromascan-pix2pix"
    with pytest.raises(ArtifactError, match=r"^s3://bucket/models/a/model.json: missing"):
        load_artifact_files({WEIGHTS_FILE: files[WEIGHTS_FILE]}, location="s3://bucket/models/a/")


def test_save_leaves_no_temporary_files(tmp_path: Path, small_generator: UNetGenerator) -> None:
    save_model(small_generator, str(tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
