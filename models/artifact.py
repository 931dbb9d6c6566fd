"""The model artifact: ``model.safetensors`` (generator weights) + ``model.json`` (everything else).

Contract (DESIGN.md): the model id is ``<name>@<first 12 hex of sha256(model.safetensors)>``;
loading verifies that hash and never unpickles. This module works on bytes only;
pipeline.model_store moves them to and from any storage URL, local folders included.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from models.colour import normalization_spec
from models.config import DEFAULT_MODEL_NAME, GeneratorConfig
from models.networks import UNetGenerator, count_parameters

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
ARTIFACT_FORMAT = "chromascan-model"
ARTIFACT_FORMAT_VERSION = 1
ARCHITECTURE = "pix2pix-unet"

_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# Leading bytes of the formats torch.save and pickle.dump write: refused, never unpickled.
_PICKLE_SIGNATURES = (b"\x80", b"PK\x03\x04")


class ArtifactError(ValueError):
    """A model artifact is missing, damaged, tampered with or inconsistent."""


@dataclass(frozen=True)
class LoadedModel:
    """A verified generator (in eval mode) and the metadata it was saved with."""

    generator: UNetGenerator
    config: GeneratorConfig
    model_id: str
    sha256: str
    metadata: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return self.model_id.split("@", 1)[0]


def model_id_for(name: str, sha256: str) -> str:
    return f"{name}@{sha256[:12]}"


def validate_model_name(name: str) -> str:
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"model name {name!r} must be 1-100 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def build_artifact_files(
    generator: UNetGenerator,
    *,
    name: str = DEFAULT_MODEL_NAME,
    provenance: Mapping[str, Any] | None = None,
    created_at: datetime | None = None,
) -> dict[str, bytes]:
    """Serialise a generator into the two artifact files, keyed by file name.

    Args:
        generator: the trained generator; its config is recorded as the architecture.
        name: the first half of the model id.
        provenance: training data URL, steps, final metrics and the like, recorded verbatim;
            must be JSON-serialisable and must not hold secrets.
        created_at: defaults to now (UTC).
    """
    validate_model_name(name)
    # Contiguous CPU float copies: safetensors refuses shared or strided storage, and the
    # artifact must not depend on the device or autocast state it was trained with.
    tensors = {
        key: value.detach().cpu().contiguous() for key, value in generator.state_dict().items()
    }
    weights = safetensors_save(tensors, metadata={"format": ARTIFACT_FORMAT})
    sha256 = hashlib.sha256(weights).hexdigest()
    config = generator.config
    metadata = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "name": name,
        "model_id": model_id_for(name, sha256),
        "architecture": ARCHITECTURE,
        "generator": config.to_dict(),
        "parameters": count_parameters(generator),
        "image_size": config.image_size,
        "colour": normalization_spec(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": sha256,
        "weights_size": len(weights),
        "created_at": (created_at or datetime.now(UTC)).isoformat(timespec="seconds"),
        "provenance": dict(provenance or {}),
    }
    config_bytes = (json.dumps(metadata, indent=2, sort_keys=True) + "\n").encode()
    return {WEIGHTS_FILE: weights, CONFIG_FILE: config_bytes}


def _parse_metadata(data: bytes, where: str) -> dict[str, Any]:
    try:
        metadata = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(metadata, dict) or metadata.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{where}: not a chromascan model description (format != {ARTIFACT_FORMAT!r})"
        )
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(
            f"{where}: format_version {version!r} is newer than this chromascan reads "
            f"({ARTIFACT_FORMAT_VERSION}); upgrade chromascan"
        )
    for key in ("name", "weights_sha256", "generator", "colour"):
        if key not in metadata:
            raise ArtifactError(f"{where}: missing required field {key!r}")
    if metadata["colour"] != normalization_spec():
        raise ArtifactError(
            f"{where}: colour normalisation {metadata['colour']} differs from this chromascan's "
            f"{normalization_spec()}; the model would produce wrong colours"
        )
    return metadata


def _parse_weights(data: bytes, where: str) -> dict[str, torch.Tensor]:
    if data.startswith(_PICKLE_SIGNATURES):
        raise ArtifactError(
            f"{where}: looks like a pickle or torch.save file; chromascan loads safetensors only "
            "and never unpickles (pickles can run arbitrary code)"
        )
    try:
        return safetensors_load(data)
    except (SafetensorError, ValueError, OSError) as err:
        raise ArtifactError(f"{where}: not a valid safetensors file ({err})") from err


def _check_state_dict(
    generator: UNetGenerator, tensors: Mapping[str, torch.Tensor], where: str
) -> None:
    expected = {key: tuple(value.shape) for key, value in generator.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in tensors.items()}
    problems = [f"missing {key}" for key in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {key}" for key in sorted(found.keys() - expected.keys())]
    problems += [
        f"{key} has shape {found[key]}, config needs {expected[key]}"
        for key in sorted(expected.keys() & found.keys())
        if expected[key] != found[key]
    ]
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise ArtifactError(f"{where}: weights do not match the config in {CONFIG_FILE}: {shown}")


def load_artifact_files(files: Mapping[str, bytes | None], *, location: str) -> LoadedModel:
    """Verify and load an artifact from its file contents (None for a file that is missing).

    Args:
        files: ``{"model.json": bytes, "model.safetensors": bytes}``.
        location: where the files came from, used in every error message.

    Raises:
        ArtifactError: naming the file, when one is missing, tampered with (hash mismatch),
            pickled, unparsable, or inconsistent with the config.
    """
    location = location.rstrip("/")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if files.get(name) is None:
            raise ArtifactError(
                f"{location}/{name}: missing; a model artifact needs both "
                f"{CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    config_where = f"{location}/{CONFIG_FILE}"
    weights_where = f"{location}/{WEIGHTS_FILE}"
    metadata = _parse_metadata(files[CONFIG_FILE], config_where)  # type: ignore[arg-type]
    weights: bytes = files[WEIGHTS_FILE]  # type: ignore[assignment]
    sha256 = hashlib.sha256(weights).hexdigest()
    if sha256 != metadata["weights_sha256"]:
        raise ArtifactError(
            f"{weights_where}: sha256 {sha256[:12]}… does not match "
            f"{metadata['weights_sha256'][:12]}… recorded in {CONFIG_FILE}; "
            "the weights were changed or damaged"
        )
    tensors = _parse_weights(weights, weights_where)
    try:
        config = GeneratorConfig.from_dict(metadata["generator"])
    except (TypeError, ValueError) as err:
        raise ArtifactError(f"{config_where}: invalid generator config ({err})") from err
    generator = UNetGenerator(config)
    _check_state_dict(generator, tensors, weights_where)
    generator.load_state_dict(tensors, strict=True)
    generator.eval()
    return LoadedModel(
        generator=generator,
        config=config,
        model_id=model_id_for(metadata["name"], sha256),
        sha256=sha256,
        metadata=metadata,
    )


def artifact_model_id(files: Mapping[str, bytes]) -> str:
    """The model id recorded in files made by build_artifact_files."""
    return json.loads(files[CONFIG_FILE])["model_id"]
