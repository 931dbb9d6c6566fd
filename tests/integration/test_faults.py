"""A worker node of a multi-node Ray cluster dies mid-run: the run still ends complete.

Each scenario runs in tests/integration/fault_scenarios.py as a child process (it builds a
``ray.cluster_utils.Cluster``, which this process cannot once the shared `ray_local` cluster
is up) and writes what it saw as JSON. The assertions here are on that JSON and, mostly, on
what the run left on disk: the manifest, the PNGs, the checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from skimage import data

from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.model_store import save_model
from tests.integration import fault_scenarios
from tests.integration.s3server import _die_with_parent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCANS = 24
SCAN_SIZE = (64, 48)  # width, height


def _session_pids(session: int) -> list[int]:
    """Processes of a session: the scenario and every Ray process it started.

    Ray's workers get process groups of their own, but stay in the session the child
    opened (start_new_session), which is what makes them findable after the child is gone.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session:  # field 6 of stat: the session id
            pids.append(int(entry.name))
    return pids


def _kill_session(session: int) -> None:
    for pid in _session_pids(session):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_scenario(name: str, tmp_path: Path, *args: str, timeout: float) -> dict[str, Any]:
    """``python -m tests.integration.fault_scenarios NAME ...``; its JSON result.

    Whatever happens, nothing of its Ray cluster outlives the call.
    """
    # Short: Ray's unix socket paths under it must stay below 108 bytes.
    ray_temp = tempfile.mkdtemp(prefix="cs-f-")
    result = tmp_path / f"{name}.json"
    log = tmp_path / f"{name}.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    # Workers must import this checkout's packages like the driver does.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    # Read by Ray at import: every node and the driver on 127.0.0.1 (see LOOPBACK_ONLY).
    env[fault_scenarios.LOOPBACK_ONLY] = "0"
    command = [
        sys.executable, "-m", "tests.integration.fault_scenarios", name,
        "--ray-temp", ray_temp, "--result", str(result), *args,
    ]  # fmt: skip
    with open(log, "wb") as output:
        child = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            # A session of its own, so that every Ray process it starts can be found and
            # killed afterwards; and it dies with pytest even when no teardown runs (Ray's
            # processes fate-share with it). preexec_fn only calls prctl: safe with threads.
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509
        )
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        _kill_session(child.pid)
        child.wait()
        shutil.rmtree(ray_temp, ignore_errors=True)
    tail = log.read_text(errors="replace")[-6000:]
    assert code is not None, f"{name} scenario still running after {timeout} s:\n{tail}"
    assert code == 0, f"{name} scenario exited with {code}:\n{tail}"
    observed: dict[str, Any] = json.loads(result.read_text())
    return observed


# --- A worker node dies mid-colorize -------------------------------------------------------


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, Path]:
    """(scans, model): 24 grey PNG and JPEG scans in two folders, and a tiny generator."""
    scans = tmp_path / "scans"
    for index in range(SCANS):
        folder = scans / ("odd" if index % 2 else "even")
        folder.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 255, SCAN_SIZE[0], dtype=np.float32)[None, :]
        pixels = np.clip(ramp * 0.5 + 8 * index, 0, 255).astype(np.uint8)
        image = Image.fromarray(np.repeat(pixels, SCAN_SIZE[1], axis=0), mode="L")
        image.save(folder / f"scan{index:02d}.{'jpg' if index % 3 == 0 else 'png'}")
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    model = tmp_path / "model"
    save_model(generator, str(model), name="faults")
    return scans, model


def _expected_outputs(scans: Path) -> set[str]:
    return {str(p.relative_to(scans).with_suffix(".png")) for p in scans.rglob("scan*")}


def test_a_worker_node_lost_mid_colorize_every_input_gets_one_ok_row(
    archive: tuple[Path, Path], tmp_path: Path
) -> None:
    scans, model = archive
    dst = tmp_path / "out"
    observed = run_scenario(
        "colorize", tmp_path, "--src", str(scans), "--dst", str(dst), "--model", str(model),
        timeout=150,
    )  # fmt: skip

    # The node that ran the colorizer was taken down while the run was under way...
    assert len(observed["removals"]) == 1, observed
    [removal] = observed["removals"]
    victim = removal["node_id"]
    assert removal["done"] < SCANS, removal  # inside the run, not after it
    assert victim in {a["node_id"] for a in removal["actors"]}
    assert victim in observed["nodes_before"]
    assert victim not in observed["nodes_after"]
    assert len(observed["nodes_after"]) == len(observed["nodes_before"]) - 1
    # ...and its actor was restarted elsewhere: the work it held was redone, not dropped.
    [lost] = [a for a in removal["actors"] if a["node_id"] == victim]
    after = {a["actor_id"]: a for a in observed["actors_after"]}
    assert after[lost["actor_id"]]["restarts"] >= 1
    assert after[lost["actor_id"]]["node_id"] in observed["nodes_after"]

    summary = observed["summary"]
    assert (summary["listed"], summary["ok"], summary["failed"]) == (SCANS, SCANS, 0)

    # The manifest: exactly one ok row per input, no duplicates, nothing missing.
    manifest = pq.read_table(dst / "manifest").to_pylist()
    rows_per_input = Counter(row["relative_path"] for row in manifest)
    duplicates = {path: n for path, n in rows_per_input.items() if n > 1}
    assert duplicates == {}
    assert {str(Path(path).with_suffix(".png")) for path in rows_per_input} == (
        _expected_outputs(scans)
    )
    assert len(manifest) == SCANS
    assert {row["status"] for row in manifest} == {"ok"}
    assert {row["run_id"] for row in manifest} == {summary["run_id"]}

    # The PNGs: one per input, each the file its manifest row describes, full size.
    written = {
        str(p.relative_to(dst / "images"))
        for p in (dst / "images").rglob("*")
        # A task killed mid-write can leave its hidden temporary file; never a second PNG.
        if p.is_file() and not p.name.startswith(".chromascan-")
    }
    assert written == _expected_outputs(scans)
    for row in manifest:
        path = Path(row["output_uri"])
        assert path.is_file(), row["output_uri"]
        blob = path.read_bytes()
        assert row["output_sha256"] == hashlib.sha256(blob).hexdigest()
        with Image.open(io.BytesIO(blob)) as image:
            assert image.size == SCAN_SIZE
            assert image.mode == "RGB"
    run_summary = json.loads((dst / "runs" / f"{summary['run_id']}.json").read_text())
    assert (run_summary["run"]["ok"], run_summary["run"]["failed"]) == (SCANS, 0)


# --- A training worker's node dies mid-epoch -----------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 colour crops of scikit-image's sample photos, PNG and JPEG."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for index in range(12):
        photo = sources[index % len(sources)]
        height, width = photo.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.5, 0.8)), int(width * rng.uniform(0.5, 0.8))
        top, left = rng.integers(0, height - crop_h), rng.integers(0, width - crop_w)
        crop = np.ascontiguousarray(photo[top : top + crop_h, left : left + crop_w])
        Image.fromarray(crop).save(folder / f"photo{index:02d}.{'jpg' if index % 2 else 'png'}")
    return folder


EPOCHS = 3


@pytest.fixture(scope="module")
def train_run(
    photos: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    """(what the scenario observed, the run's output folder): trained once for these tests."""
    folder = tmp_path_factory.mktemp("train-faults")
    output = folder / "run"
    observed = run_scenario(
        "train", folder, "--src", str(photos), "--output", str(output), "--epochs", str(EPOCHS),
        timeout=240,
    )  # fmt: skip
    return observed, output


def test_a_training_node_lost_mid_epoch_restarts_from_the_latest_checkpoint(
    train_run: tuple[dict[str, Any], Path],
) -> None:
    observed, output = train_run

    # A node running training workers was removed after the first checkpoint, and replaced.
    [removal] = observed["removals"]
    victim = removal["node_id"]
    assert victim in {w["node_id"] for w in removal["workers"]}
    assert victim != observed["head"]
    assert victim not in observed["nodes_after"]
    assert observed["added"][0] in observed["nodes_after"]
    # The worker group was started again, at full size, without the lost node.
    alive_before = {w["actor_id"] for w in removal["workers"]}
    restarted = [w for w in observed["workers_after"] if w["actor_id"] not in alive_before]
    assert len(restarted) >= 2, observed["workers_after"]
    assert victim not in {w["node_id"] for w in restarted}

    # One restart, from the latest checkpoint registered when the node went (or a later one
    # if the next was registered while the node was being killed), not from scratch.
    outcome = observed["outcome"]
    history = outcome["history"]
    latest = max(int(name.removeprefix("epoch_")) for name in removal["registered"])
    [resume] = history["resumes"]
    assert latest <= resume["epoch"] < EPOCHS
    steps_per_epoch = history["epochs"][0]["step"]
    assert steps_per_epoch > 0
    assert resume["step"] == resume["epoch"] * steps_per_epoch
    assert resume["world_size"] == 2

    # Every epoch trained once, in order, and the step counter never went back or doubled.
    assert [row["epoch"] for row in history["epochs"]] == list(range(1, EPOCHS + 1))
    assert [row["step"] for row in history["epochs"]] == [
        steps_per_epoch * epoch for epoch in range(1, EPOCHS + 1)
    ]
    assert all(row["world_size"] == 2 for row in history["epochs"])
    assert outcome["metrics"]["epoch"] == EPOCHS
    assert outcome["metrics"]["step"] == EPOCHS * steps_per_epoch
    assert outcome["checkpoint"] == f"epoch_{EPOCHS:05d}"
    summary = json.loads((output / "train.json").read_text())
    assert summary["history"]["epochs"] == history["epochs"]
    assert (output / "model" / "model.safetensors").is_file()

    # The driver heard of the restart through the progress queue, as a CLI user would, when
    # the queue was not on the lost node (where it may be is the next test's business).
    [queue] = removal["progress_queue"]
    if queue["node_id"] != victim:
        assert observed["events"].count("resumed") == 1, observed["events"]
        assert observed["events"][-1] == "epoch"


def test_the_progress_queue_lives_on_the_driver_node(
    train_run: tuple[dict[str, Any], Path],
) -> None:
    observed, _ = train_run
    placed = [*observed["probe_queues"], *observed["removals"][0]["progress_queue"]]
    assert len(placed) == fault_scenarios.PROBE_QUEUES + 1
    assert {queue["node_id"] for queue in placed} == {observed["driver_node"]}
