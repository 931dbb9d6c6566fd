"""Nightly incremental runs and crash-safe resume, on real files with real Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from jobs.cli import main
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.manifest import read_manifest
from pipeline.model_store import save_model

pytestmark = pytest.mark.usefixtures("ray_local")


def _model(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    save_model(generator, str(folder), name=f"seed{seed}")
    return str(folder)


def _scans(folder: Path, names: list[str], *, shift: int = 0) -> None:
    photo = Image.fromarray(data.astronaut()).convert("L").resize((96, 64))
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        # Each scan differs (rolled), so each has its own hash and output.
        rolled = Image.fromarray(np.roll(np.asarray(photo), 5 * index + shift, axis=1))
        rolled.save(folder / name, quality=90)


def _nightly(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["nightly", *argv]) == 0
    return capsys.readouterr().out


def test_nightly_colours_only_what_is_new_or_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "scans", tmp_path / "out"
    model = _model(tmp_path / "m1", seed=1)
    _scans(src, [f"a{i}.jpg" for i in range(5)])
    assert "5 ok, 0 failed, 0 already done" in _nightly(capsys, str(src), str(dst), "-m", model)

    _scans(src / "new", ["b0.jpg", "b1.jpg"])
    assert "2 ok, 0 failed, 5 already done" in _nightly(capsys, str(src), str(dst), "-m", model)

    started = time.perf_counter()
    out = _nightly(capsys, str(src), str(dst), "-m", model)
    unchanged_s = time.perf_counter() - started
    assert "0 ok, 0 failed, 7 already done" in out

    # A changed scan (new content, so a new mtime) is re-coloured, and only it.
    time.sleep(0.01)
    _scans(src, ["a3.jpg"], shift=17)
    assert "1 ok, 0 failed, 6 already done" in _nightly(capsys, str(src), str(dst), "-m", model)

    # A new model re-colours everything, unless --any-model.
    other = _model(tmp_path / "m2", seed=2)
    assert "0 ok, 0 failed, 7 already done" in _nightly(
        capsys, str(src), str(dst), "-m", other, "--any-model"
    )
    assert "7 ok, 0 failed, 0 already done" in _nightly(
        capsys, str(src), str(dst), "-m", model.replace("m1", "m2")
    )

    ledger = read_manifest(str(dst)).to_pandas()
    ok = ledger[ledger.status == "ok"]
    # Never two ok rows for the same source version and model.
    assert not ok.duplicated(["relative_path", "source_version", "model_id"]).any()
    assert len(ok) == 5 + 2 + 1 + 7
    assert unchanged_s < 30  # no Ray work at all: the ledger answers (timed in the bench)


def test_failed_scans_are_retried_unless_told_not_to(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = tmp_path / "scans", tmp_path / "out"
    model = _model(tmp_path / "m", seed=3)
    _scans(src, ["good.jpg"])
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    argv = [str(src), str(dst), "-m", model, "--allow-failures"]
    assert "1 ok, 1 failed, 0 already done" in _nightly(capsys, *argv)
    assert "0 ok, 1 failed, 1 already done" in _nightly(capsys, *argv)
    assert "0 ok, 0 failed, 2 already done" in _nightly(capsys, *argv, "--no-retry-failed")
    # Fixed at the source: the next night colours it.
    _scans(src, ["broken.jpg"])
    assert "1 ok, 0 failed, 1 already done" in _nightly(capsys, *argv)


def _outputs(dst: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dst / "images").as_posix(): p.read_bytes()
        for p in sorted((dst / "images").rglob("*.png"))
        if not p.name.startswith(".")
    }


def test_killed_run_resumes_to_the_same_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "scans"
    names = [f"s{i:02d}.jpg" for i in range(24)]
    _scans(src, names)
    model = _model(tmp_path / "m", seed=4)

    # Reference: one uninterrupted run (in this process, on the shared cluster).
    reference = tmp_path / "reference"
    assert main(["colorize", str(src), str(reference), "-m", model, "--batch-size", "2"]) == 0
    capsys.readouterr()

    # The same command in its own process (its own local Ray), killed mid-way with SIGKILL.
    dst = tmp_path / "crashed"
    command = [sys.executable, "-m", "jobs", "colorize", str(src), str(dst), "-m", model,
               "--batch-size", "2", "--flush-seconds", "0.5"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    process = subprocess.Popen(
        command, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            parts = list((dst / "manifest").rglob("part-*.parquet")) if dst.exists() else []
            if parts and len(_outputs(dst)) >= 4:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)  # the driver only, as a crash would
        process.wait(timeout=30)
    finally:
        # Clean up whatever of its local Ray outlived it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    rows_before = read_manifest(str(dst)).num_rows
    assert 0 < rows_before < len(names)

    # Running the same command again finishes the rest.
    assert main(["colorize", str(src), str(dst), "-m", model, "--batch-size", "2"]) == 0
    ledger = read_manifest(str(dst)).to_pandas()
    ok = ledger[ledger.status == "ok"]
    assert sorted(ok.relative_path) == sorted(names)  # exactly one ok row per input
    assert _outputs(dst) == _outputs(reference)  # byte-identical outputs
