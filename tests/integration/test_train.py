"""``chromascan train`` on a real local Ray cluster: real photos, real files, real S3.

Tiny models (width 8, 64² images) on two dozen crops of scikit-image's sample photos keep
each run to seconds of training; what is checked is what the issue asks to see: losses
finite, validation L1 below the untrained generator's, checkpoints and an artifact that
loads, bad files reported and skipped, and runs that continue instead of starting over when
a worker or the driver dies.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import torch
from PIL import Image
from skimage import data

from jobs.cli import main
from models.config import DiscriminatorConfig, GeneratorConfig
from pipeline.model_store import load_model
from pipeline.train_data import build_training_data
from pipeline.training import (
    RUN_FOLDER,
    SAMPLES_FILE,
    TrainConfig,
    run_training,
)
from tests.integration.checkpoints import SNAPSHOT, wait_for_checkpoint

pytestmark = pytest.mark.integration

PHOTOS = 24
TINY = ["--image-size", "64", "--width", "8", "--batch-size", "2", "--decay-epochs", "0"]


def _write_photo_folder(root: Path) -> Path:
    """24 colour crops (JPEG and PNG, in subfolders), a corrupt JPEG, text named .png, a grey
    photo and a text file that is not listed at all."""
    rng = np.random.default_rng(0)
    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for index in range(PHOTOS):
        photo = sources[index % len(sources)]
        height, width = photo.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.5, 0.8)), int(width * rng.uniform(0.5, 0.8))
        top, left = rng.integers(0, height - crop_h), rng.integers(0, width - crop_w)
        crop = photo[top : top + crop_h, left : left + crop_w]
        if index % 2:
            crop = crop[:, ::-1]
        folder = root / "people" if index % 4 == 0 else root / "things" / f"set{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = "jpg" if index % 2 else "png"
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"photo{index:02d}.{suffix}")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF broken off here")
    (root / "notes.png").write_text("a text file with an image name")
    grey = np.repeat(data.camera()[..., None], 3, axis=2)  # stored as RGB, but grey
    Image.fromarray(grey).save(root / "grey.jpg")
    (root / "README.txt").write_text("not an image extension: not listed")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_photo_folder(tmp_path_factory.mktemp("train-photos"))


def _run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _checkpoint_folders(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("epoch_"))


def _assert_learned(history: dict[str, Any], *, epochs: int, world_size: int) -> None:
    """Every epoch once, in order; finite losses; validation L1 below the untrained one."""
    rows = history["epochs"]
    assert [row["epoch"] for row in rows] == list(range(1, epochs + 1))
    steps = [row["step"] for row in rows]
    assert steps == [steps[0] * (i + 1) for i in range(epochs)]  # never restarted at 0
    for row in rows:
        for key in ("g_loss", "g_adv_loss", "g_l1_loss", "d_loss", "val_l1", "val_psnr"):
            assert math.isfinite(row[key]), (key, row)
        assert row["world_size"] == world_size
        assert row["replica_spread"] == 0.0  # DDP kept every replica identical
    assert rows[-1]["val_l1"] < history["initial"]["val_l1"]
    assert rows[-1]["val_l1_initial"] == history["initial"]["val_l1"]


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str


def _invoke(*argv: str) -> CliRun:
    """``chromascan train`` in this process (on the shared cluster), output captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *argv])
    return CliRun(code, out.getvalue(), err.getvalue())


LOCAL_RUN = ["--workers", "2", "--epochs", "4", "--keep-checkpoints", "2", "--name", "tiny"]


@pytest.fixture(scope="module")
def local_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local-run") / "run"


@pytest.fixture(scope="module")
def local_run(ray_local: dict[str, Any], photos: Path, local_output: Path) -> CliRun:
    """Two workers, four epochs, from the local photo folder: trained once for these tests."""
    run = _invoke(str(photos), "--output", str(local_output), *LOCAL_RUN, *TINY)
    assert run.code == 0, run.err
    return run


def test_two_workers_learn_from_a_local_folder(local_run: CliRun, local_output: Path) -> None:
    summary = json.loads((local_output / "train.json").read_text())
    _assert_learned(summary["history"], epochs=4, world_size=2)
    assert "epoch 4/4" in local_run.err
    assert "decoded copy reused" not in local_run.err

    # The decoded copy: one folder of shards per listing, complete when prepared.json is there.
    (prepared,) = (local_output / "data").iterdir()
    record = json.loads((prepared / "prepared.json").read_text())
    assert record["listed"] == PHOTOS + 3
    assert record["fingerprint"].startswith(prepared.name)
    assert sorted(p.name for p in prepared.iterdir()) == ["prepared.json", "train", "val"]
    assert list((prepared / "train").glob("shard-*.parquet"))

    # Checkpoints: the last two kept, each with both workers' RNG and a sample grid.
    run_dir = local_output / RUN_FOLDER
    assert _checkpoint_folders(run_dir) == ["epoch_00003", "epoch_00004"]
    for name in _checkpoint_folders(run_dir):
        files = {p.name for p in (run_dir / name).iterdir()}
        assert {"rng_rank0.pt", "rng_rank1.pt", "generator.safetensors", SAMPLES_FILE} <= files
        grid = Image.open(io.BytesIO((run_dir / name / SAMPLES_FILE).read_bytes()))
        rows = min(4, summary["data"]["val_images"])  # grey input | colourised | original
        assert grid.size == (3 * 64 + 2 * 2, rows * 64 + (rows - 1) * 2)


def test_bad_files_are_reported_and_skipped(
    local_run: CliRun, photos: Path, local_output: Path
) -> None:
    reported = [line for line in local_run.err.splitlines() if line.startswith("skipped  ")]
    assert len(reported) == 2, local_run.err
    assert reported[0].startswith(f"skipped  {photos / 'corrupt.jpg'}: ")
    assert reported[1].startswith(f"skipped  {photos / 'notes.png'}: not an image format")
    assert reported[1].endswith("(UnidentifiedImageError)")
    assert "skipped 1 grey, 2 unreadable" in local_run.err
    summary = json.loads((local_output / "train.json").read_text())
    assert summary["data"]["listed"] == PHOTOS + 3
    assert summary["data"]["train_images"] + summary["data"]["val_images"] == PHOTOS
    skipped = {Path(s["source_uri"]).name: s for s in summary["data"]["skipped"]}
    assert skipped["corrupt.jpg"]["status"] == "failed"
    assert skipped["notes.png"]["error_type"] == "UnidentifiedImageError"
    assert skipped["grey.jpg"]["status"] == "grey"


def test_the_artifact_loads_and_says_how_it_was_made(
    local_run: CliRun, photos: Path, local_output: Path
) -> None:
    summary = json.loads((local_output / "train.json").read_text())
    loaded = load_model(str(local_output / "model"))
    assert loaded.model_id.startswith("tiny@")
    assert f"model    {loaded.model_id}" in local_run.out
    assert loaded.config.width == 8
    assert loaded.config.image_size == 64
    provenance = loaded.metadata["provenance"]
    last = summary["history"]["epochs"][-1]
    assert provenance["trained"] is True
    assert provenance["training_data"] == str(photos)
    assert provenance["epochs"] == 4
    assert provenance["steps"] == last["step"]
    assert provenance["final_metrics"]["val_l1"] == pytest.approx(last["val_l1"])
    assert provenance["config"]["batch_size"] == 2
    assert provenance["checkpoint"] == "epoch_00004"
    with torch.inference_mode():
        ab = loaded.generator(torch.zeros(1, 1, 64, 64))
    assert ab.shape == (1, 2, 64, 64)


def test_running_again_continues_the_finished_run(
    local_run: CliRun, photos: Path, local_output: Path
) -> None:
    """The same command plus --export best: nothing is retrained (the run is complete), and
    the kept checkpoint with the lowest validation L1 becomes the artifact."""
    summary = json.loads((local_output / "train.json").read_text())
    again = _invoke(
        str(photos), "--output", str(local_output), *LOCAL_RUN, "--export", "best", *TINY
    )
    assert again.code == 0, again.err
    assert "decoded copy reused" in again.err  # the photos were not decoded again
    assert "resume   continuing after epoch 4" in again.err
    assert "epoch 1/4" not in again.err
    rerun = json.loads((local_output / "train.json").read_text())
    assert rerun["resumed_from"]["epoch"] == 4
    assert rerun["history"]["epochs"] == summary["history"]["epochs"]

    kept = {row["epoch"]: row["val_l1"] for row in summary["history"]["epochs"][2:]}
    best_epoch = min(kept, key=kept.__getitem__)
    provenance = load_model(str(local_output / "model")).metadata["provenance"]
    assert provenance["selected"] == "best"
    assert provenance["checkpoint"] == f"epoch_{best_epoch:05d}"
    assert provenance["final_metrics"]["val_l1"] == kept[best_epoch]
    assert "(best checkpoint" in again.out


def test_train_from_s3_and_write_checkpoints_to_s3(
    ray_local: dict[str, Any],
    photos: Path,
    s3_server: Any,
    s3_bucket: str,
    s3_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.put(str(photos) + "/", f"{s3_bucket}/photos/", recursive=True)
    for name in ("people/photo00.png", "people/photo04.png", "things/set1/photo01.jpg"):
        fs.copy(f"{s3_bucket}/photos/{name}", f"{s3_bucket}/validation/{name}")
    source, output = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/runs/first"
    val = f"s3://{s3_bucket}/validation"

    # Credentials come from the standard AWS environment only (s3_env), as for a user; the
    # Ray workers were started before it was set, so they must get them from the driver.
    code, out, err = _run_cli(
        capsys, source, "--output", output, "--val", val, "--workers", "2", "--epochs", "3",
        *TINY,
    )  # fmt: skip
    assert code == 0, err
    assert f"skipped  {source}/corrupt.jpg: " in err
    assert f"3 validation from {val}" in err

    fs.invalidate_cache()
    keys = fs.find(f"{s3_bucket}/runs/first")
    names = {key.split("/runs/first/", 1)[1] for key in keys}
    assert {"model/model.json", "model/model.safetensors", "train.json"} <= names
    assert f"{RUN_FOLDER}/epoch_00003/generator.safetensors" in names
    assert f"{RUN_FOLDER}/epoch_00003/rng_rank1.pt" in names
    assert f"{RUN_FOLDER}/epoch_00003/{SAMPLES_FILE}" in names

    summary = json.loads(fs.cat_file(f"{s3_bucket}/runs/first/train.json"))
    _assert_learned(summary["history"], epochs=3, world_size=2)
    loaded = load_model(f"{output}/model", storage_options=options)
    assert loaded.metadata["provenance"]["training_data"] == source
    assert f"-> {output}/model" in out

    assert loaded.metadata["provenance"]["validation_data"] == val
    assert summary["data"]["val_images"] == 3

    # Nothing written to the bucket, and nothing in Ray's logs, holds the credentials.
    secrets = (s3_server.secret_key.encode(), s3_server.access_key.encode())
    for key in keys:
        if key.endswith((".json", ".png")):
            blob = fs.cat_file(key)
            assert not any(secret in blob for secret in secrets), key
    logs = [p for p in Path(str(ray_local["temp_dir"])).rglob("*") if "logs" in p.parts]
    assert logs
    for path in logs:
        if path.is_file():
            blob = path.read_bytes()
            assert not any(secret in blob for secret in secrets), path


def _train_worker_pids(temp_dir: str) -> list[int]:
    """PIDs of the Ray Train workers of the test cluster (children of its raylet)."""
    processes: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        processes[int(entry.name)] = (parent, command)
    raylets = {pid for pid, (_, cmd) in processes.items() if "raylet" in cmd and temp_dir in cmd}
    return [
        pid
        for pid, (parent, cmd) in processes.items()
        if parent in raylets and cmd.startswith("ray::RayTrainWorker")
    ]


def _tiny_config(epochs: int) -> TrainConfig:
    return TrainConfig(
        generator=GeneratorConfig(width=8, depth=6, image_size=64),
        discriminator=DiscriminatorConfig(width=8),
        epochs=epochs,
        decay_epochs=0,
        batch_size=2,
    )


def _decoded_copy_of_the_local_run(local_output: Path, output: Path) -> Path:
    """OUTPUT/data of the module's local run, copied under ``output``: the same photo listing
    finds it there (its fingerprint names the listing, not the place), so a test whose subject
    is restarting, not decoding, spares a second decode of the photos."""
    prepared = output / "data"
    shutil.copytree(local_output / "data", prepared)
    return prepared


def test_a_killed_worker_restarts_from_the_latest_checkpoint(
    ray_local: dict[str, Any], photos: Path, local_run: CliRun, local_output: Path, tmp_path: Path
) -> None:
    # Killed after epoch 1, so the restart resumes from epoch 1 or 2 of 3: a checkpoint, not
    # the start, and not the end.
    epochs = 3
    output = tmp_path / "run"
    config = _tiny_config(epochs)
    training_data = build_training_data(
        str(photos),
        image_size=64,
        prepared_url=str(_decoded_copy_of_the_local_run(local_output, output)),
        min_train_images=4,
    )
    assert training_data.reused
    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        wait_for_checkpoint(output / RUN_FOLDER, "epoch_00001")
        pids = _train_worker_pids(str(ray_local["temp_dir"]))
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        killed.append(pids[-1])

    events: list[dict[str, Any]] = []
    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    outcome = run_training(
        training_data,
        config,
        output_url=str(output),
        workers=2,
        max_failures=1,
        keep_checkpoints=2,
        on_progress=events.append,
    )
    killer.join(timeout=5)
    assert killed, "the worker was never killed"

    # The restarted workers continued from a checkpoint, not from scratch...
    resumes = outcome.history["resumes"]
    assert len(resumes) == 1
    assert 1 <= resumes[0]["epoch"] < epochs
    assert resumes[0]["step"] == resumes[0]["epoch"] * outcome.history["epochs"][0]["step"]
    assert [e["kind"] for e in events].count("resumed") == 1
    # ...so every epoch was trained exactly once and the step counter never went back.
    _assert_learned(outcome.history, epochs=epochs, world_size=2)
    assert outcome.metrics["epoch"] == epochs
    assert outcome.checkpoint == f"epoch_{epochs:05d}"


def test_rerunning_after_the_driver_died_continues_the_run(
    ray_local: dict[str, Any],
    photos: Path,
    local_run: CliRun,
    local_output: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "run"
    _decoded_copy_of_the_local_run(local_output, output)
    argv = [
        str(photos), "--output", str(output), "--workers", "2", "--epochs", "3", *TINY,
    ]  # fmt: skip
    # A separate driver process on the shared cluster, killed outright after epoch 1.
    env = {**os.environ, "RAY_ADDRESS": str(ray_local["address"])}
    driver = subprocess.Popen(
        [sys.executable, "-m", "jobs", "train", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_checkpoint(output / RUN_FOLDER, "epoch_00001")
    finally:
        driver.kill()
        _, driver_err = driver.communicate(timeout=60)
    assert driver.returncode == -signal.SIGKILL, driver_err.decode(errors="replace")[-2000:]
    interrupted = json.loads((output / RUN_FOLDER / SNAPSHOT).read_text())
    assert interrupted  # the dead run left its checkpoints registered

    # The same command again: it continues after the last checkpoint the dead run finished.
    code, out, err = _run_cli(capsys, *argv)
    assert code == 0, err
    summary = json.loads((output / "train.json").read_text())
    resumed_epoch = summary["resumed_from"]["epoch"]
    assert 1 <= resumed_epoch < 3
    assert f"resume   continuing after epoch {resumed_epoch}" in err
    assert "epoch 1/3" not in err  # the first epoch was not trained again
    assert f"continued after epoch {resumed_epoch}" in out
    _assert_learned(summary["history"], epochs=3, world_size=2)


def test_a_folder_of_only_bad_photos_is_a_one_line_error(
    ray_local: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / "text.png").write_text("not a picture")
    Image.fromarray(data.camera()).save(folder / "grey.png")
    code, out, err = _run_cli(capsys, str(folder), "--output", str(tmp_path / "out"), *TINY)
    assert code == 1
    assert out == ""
    assert err.splitlines()[-1] == (
        f"chromascan: {folder}: no usable colour photos to train on "
        "(1 grey, 2 unreadable, of 3 listed)"
    )
    # Nothing of a training run: only the decoded copy's status rows (OUTPUT/data), which let
    # the same listing fail at once next time instead of being decoded again.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data"]


def test_a_missing_bucket_is_a_one_line_error(
    s3_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = "s3://no-such-bucket-for-chromascan/photos"
    code, out, err = _run_cli(capsys, source, "--output", str(tmp_path / "out"))
    assert code == 1
    assert out == ""
    assert err == f"chromascan: {source}: no such folder or prefix\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_gpu_worker_trains_in_bf16(photos: Path, tmp_path: Path) -> None:
    # Its own driver and local cluster: the shared test cluster has no GPUs.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    output = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "train", str(photos), "--output", str(output), "--gpu",
         "--epochs", "3", *TINY],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "train.json").read_text())
    _assert_learned(summary["history"], epochs=3, world_size=1)
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    assert summary["history"]["epochs"][-1]["precision"] == expected
