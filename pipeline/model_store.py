"""Model artifacts at any storage URL (the artifact format itself lives in models.artifact)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.artifact import (
    CONFIG_FILE,
    DEFAULT_MODEL_NAME,
    WEIGHTS_FILE,
    LoadedModel,
    artifact_model_id,
    build_artifact_files,
    load_artifact_files,
)
from models.networks import UNetGenerator
from pipeline.storage import join, read_bytes, write_bytes_atomic


def save_model(
    generator: UNetGenerator,
    url: str,
    *,
    name: str = DEFAULT_MODEL_NAME,
    provenance: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write the artifact under ``url`` (a folder or prefix); returns the model id."""
    files = build_artifact_files(generator, name=name, provenance=provenance)
    # Weights first, so model.json never names weights that are not yet readable.
    for file_name in (WEIGHTS_FILE, CONFIG_FILE):
        write_bytes_atomic(join(url, file_name), files[file_name], storage_options=storage_options)
    return artifact_model_id(files)


def load_model(url: str, *, storage_options: Mapping[str, Any] | None = None) -> LoadedModel:
    """Read and verify the artifact under ``url``; ArtifactError names the faulty file."""
    files = {
        file_name: read_bytes(
            join(url, file_name), storage_options=storage_options, missing_ok=True
        )
        for file_name in (CONFIG_FILE, WEIGHTS_FILE)
    }
    return load_artifact_files(files, location=url)
