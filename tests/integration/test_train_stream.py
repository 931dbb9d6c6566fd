"""Training streams its photos: an epoch over several times the object store's size.

The scenario runs in tests/integration/fault_scenarios.py as a child process with a Ray
instance of its own (the shared test cluster's object store is not small), and asserts on
the figures Ray itself reports for its object store: peak use and bytes spilled to disk.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.bench_train import write_colour_photos
from tests.integration.test_faults import run_scenario

pytestmark = pytest.mark.integration

STORE_MB = 80  # near Ray's smallest allowed store (75 MiB): fewer photos to decode and train
TRAIN_PHOTOS = 1000  # 1,000 × 286² × 3 bytes = 245 MB decoded: 2.9× the store


@pytest.mark.timeout(1200)
def test_an_epoch_over_three_times_the_object_store_does_not_spill(tmp_path: Path) -> None:
    photos, val = tmp_path / "photos", tmp_path / "val"
    # Small sources (decode is not what is measured); they load at 286² like any photo.
    write_colour_photos(str(photos), TRAIN_PHOTOS, size=(160, 120))
    write_colour_photos(str(val), 4, size=(160, 120), seed=1)
    observed = run_scenario(
        "train_store",
        tmp_path,
        "--src", str(photos), "--val", str(val), "--output", str(tmp_path / "run"),
        "--store-mb", str(STORE_MB),
        timeout=900,
    )  # fmt: skip
    training, preparing = observed["training"], observed["preparing"]
    capacity = training["capacity_bytes"]
    assert capacity <= STORE_MB * 1024 * 1024
    decoded = observed["train_images"] * observed["load_size"] ** 2 * 3
    assert observed["train_images"] == TRAIN_PHOTOS
    assert decoded >= 2.8 * capacity, (decoded, capacity)

    # The epoch ran over every photo (full batches of 16 on each of 2 workers)...
    assert observed["metrics"]["epoch"] == 1
    assert observed["metrics"]["images_seen"] == TRAIN_PHOTOS // 32 * 32
    # ...through the object store, which held a bounded window of it, never the set.
    assert training["created_bytes"] >= decoded * 0.9  # the photos did travel through it
    assert training["peak_bytes"] <= capacity
    assert training["spilled_bytes"] <= capacity // 20, training
    # Decoding writes shards from inside its tasks: pixels never enter the store.
    assert preparing["spilled_bytes"] == 0, preparing
    assert preparing["peak_bytes"] <= capacity // 4, preparing
