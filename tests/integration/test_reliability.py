"""Bad input refused with one clear line, S3 access control, and inputs the listing chokes on.

The bad-input corpus itself (tests/integration/corpus.py) runs through test_colorize and
test_manifest_tools; this module covers what a user types and what a store refuses.
"""

from __future__ import annotations

import io
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from PIL import Image

from jobs.cli import main
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.colorize import ColorizeConfig, Progress, run_colorize
from pipeline.listing import list_images
from pipeline.model_store import save_model
from pipeline.storage import StorageError, StorageUnavailableError
from tests.integration.corpus import crash_scan

NOT_AN_ARTIFACT = (
    "{path}/model.json: missing; a model artifact needs both model.json and model.safetensors"
)
SIGNATURE = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "key and signing method."
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    folder = tmp_path_factory.mktemp("model")
    save_model(generator, str(folder), name="reliability")
    return folder


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scans")
    for index in range(2):
        Image.new("L", (48, 32), 60 + 80 * index).save(folder / f"scan{index}.png")
    return folder


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


# --- CLI: every job command refuses bad input with one line and a non-zero exit -----------

# (argv, exit code, the whole of stderr); {scans}, {model}, {tmp} are filled in per test.
_USAGE = "(see 'chromascan {command} --help')"
CLI_CASES: list[tuple[list[str], int, str]] = [
    # A path that does not exist.
    (["colorize", "{tmp}/nowhere", "{tmp}/out", "-m", "{model}"], 1,
     "{tmp}/nowhere: no such folder or prefix"),
    (["nightly", "{tmp}/nowhere", "{tmp}/out", "-m", "{model}"], 1,
     "{tmp}/nowhere: no such folder or prefix"),
    (["train", "{tmp}/nowhere", "-o", "{tmp}/out"], 1, "{tmp}/nowhere: no such folder or prefix"),
    (["manifest", "summary", "{tmp}/nowhere"], 1, "{tmp}/nowhere: no such folder or prefix"),
    (["manifest", "verify", "{tmp}/nowhere"], 1, "{tmp}/nowhere: no such folder or prefix"),
    (["manifest", "report", "{tmp}/nowhere", "--out", "{tmp}/r.html"], 1,
     "{tmp}/nowhere: no such folder or prefix"),
    (["manifest", "export-bag", "{tmp}/nowhere", "{tmp}/bag"], 1,
     "{tmp}/nowhere: no such folder or prefix"),
    # A model that is not an artifact: a folder of scans, a missing folder, an image file.
    (["colorize", "{scans}", "{tmp}/out", "-m", "{scans}"], 1,
     NOT_AN_ARTIFACT.format(path="{scans}")),
    (["nightly", "{scans}", "{tmp}/out", "-m", "{tmp}/nomodel"], 1,
     NOT_AN_ARTIFACT.format(path="{tmp}/nomodel")),
    (["model", "info", "{scans}"], 1, NOT_AN_ARTIFACT.format(path="{scans}")),
    (["colorize", "{scans}", "{tmp}/out", "-m", "{scans}/scan0.png"], 1,
     "{scans}/scan0.png/model.json: cannot read (NotADirectoryError: [Errno 20] Not a directory: "
     "'{scans}/scan0.png/model.json')"),
    # Zero and negative counts.
    (["colorize", "{scans}", "{tmp}/out", "-m", "{model}", "--batch-size", "0"], 2,
     "Invalid value for '--batch-size': Input should be greater than or equal to 1 " + _USAGE),
    (["colorize", "{scans}", "{tmp}/out", "-m", "{model}", "--actors", "-2"], 2,
     "Invalid value for '--actors': Input should be greater than or equal to 1 " + _USAGE),
    (["colorize", "{scans}", "{tmp}/out", "-m", "{model}", "--limit", "-1"], 2,
     "Invalid value for '--limit': Input should be greater than or equal to 0 " + _USAGE),
    (["colorize", "{scans}", "{tmp}/out", "-m", "{model}", "--max-pixels", "0"], 2,
     "Invalid value for '--max-pixels': Input should be greater than or equal to 1 " + _USAGE),
    (["nightly", "{scans}", "{tmp}/out", "-m", "{model}", "--batch-size", "0"], 2,
     "Invalid value for '--batch-size': Input should be greater than or equal to 1 " + _USAGE),
    (["nightly", "{scans}", "{tmp}/out", "-m", "{model}", "--actor-cpus", "-1"], 2,
     "Invalid value for '--actor-cpus': Input should be greater than or equal to 1 " + _USAGE),
    (["train", "{scans}", "-o", "{tmp}/out", "--epochs", "0"], 2,
     "Invalid value for '--epochs': Input should be greater than or equal to 1 " + _USAGE),
    (["train", "{scans}", "-o", "{tmp}/out", "--workers", "-1"], 2,
     "Invalid value for '--workers': Input should be greater than or equal to 1 " + _USAGE),
    (["model", "init", "{tmp}/m", "--width", "0"], 2,
     "Invalid value for '--width': Input should be greater than or equal to 1 " + _USAGE),
    (["manifest", "verify", "{tmp}", "--workers", "0"], 2,
     "Invalid value for '--workers': Input should be greater than or equal to 1 " + _USAGE),
    # An unknown option.
    (["colorize", "{scans}", "{tmp}/out", "-m", "{model}", "--frobnicate"], 2,
     "No such option: --frobnicate " + _USAGE),
    (["nightly", "{scans}", "{tmp}/out", "-m", "{model}", "--frobnicate"], 2,
     "No such option: --frobnicate " + _USAGE),
    (["train", "{scans}", "-o", "{tmp}/out", "--frobnicate"], 2,
     "No such option: --frobnicate " + _USAGE),
    (["model", "info", "{model}", "--frobnicate"], 2, "No such option: --frobnicate " + _USAGE),
    (["nightly", "{scans}", "{tmp}/out", "-m", "{model}", "--storage-timeout", "0"], 2,
     "Invalid value: storage timeout must be more than 0 seconds, got 0 "
     "(see 'chromascan nightly --help')"),
]  # fmt: skip


def _command_name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("model", "manifest") else argv[0]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    CLI_CASES,
    ids=[f"{_command_name(argv)}:{message[:40]}" for argv, _, message in CLI_CASES],
)
def test_cli_bad_input_is_one_line(
    capsys: pytest.CaptureFixture[str], model_dir: Path, scans: Path, tmp_path: Path,
    argv: list[str], code: int, message: str,
) -> None:  # fmt: skip
    values = {"scans": str(scans), "model": str(model_dir), "tmp": str(tmp_path),
              "command": _command_name(argv)}  # fmt: skip
    filled = [part.format(**values) for part in argv]
    got, err = _run(capsys, filled)
    assert got == code
    assert err == f"chromascan: {message.format(**values)}\n"
    # Nothing written for a run that was refused.
    assert not (tmp_path / "out").exists()


# --- S3 with access control --------------------------------------------------------------


@pytest.fixture
def s3_archive(s3_server: Any, s3_bucket: str, scans: Path, model_dir: Path) -> str:
    """The bucket holding scans/ and model/, uploaded with the right credentials."""
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    fs.put(f"{scans}/", f"{s3_bucket}/scans/", recursive=True)
    fs.put(f"{model_dir}/", f"{s3_bucket}/model/", recursive=True)
    return s3_bucket


def _keys(s3_server: Any, bucket: str) -> list[str]:
    fs = s3fs.S3FileSystem(**s3_server.storage_options(), skip_instance_cache=True)
    return sorted(fs.find(bucket))


def test_s3_wrong_credentials_fail_with_one_line_and_write_nothing(
    s3_server: Any,
    s3_env: dict[str, str],
    s3_archive: str,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _keys(s3_server, s3_archive)
    wrong = "wrong-" + s3_server.secret_key[6:]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made with the right key is cached
    bucket = f"s3://{s3_archive}"
    cases = [
        # The model is read first: S3 answers a wrongly signed HEAD with a bare 403.
        (["colorize", f"{bucket}/scans", f"{bucket}/out", "-m", f"{bucket}/model"],
         f"{bucket}/model/model.json: cannot read (PermissionError: Forbidden)"),
        (["colorize", f"{bucket}/scans", f"{bucket}/out", "-m", str(model_dir)],
         f"{bucket}/scans: cannot list (PermissionError: {SIGNATURE})"),
        (["nightly", f"{bucket}/scans", f"{bucket}/out", "-m", str(model_dir)],
         f"{bucket}/scans: cannot list (PermissionError: {SIGNATURE})"),
        (["train", f"{bucket}/scans", "-o", f"{bucket}/train"],
         f"{bucket}/scans: cannot list (PermissionError: {SIGNATURE})"),
        (["manifest", "summary", f"{bucket}/out"],
         f"{bucket}/out: cannot open (PermissionError: {SIGNATURE})"),
    ]  # fmt: skip
    for argv, message in cases:
        code, err = _run(capsys, argv)
        assert (code, err) == (1, f"chromascan: {message}\n"), argv
        assert wrong not in err
        assert s3_server.secret_key not in err
    assert _keys(s3_server, s3_archive) == before


@pytest.mark.usefixtures("ray_local")
def test_s3_same_run_with_wrong_then_right_credentials(
    s3_server: Any, s3_archive: str, tmp_path: Path
) -> None:
    right = s3_server.storage_options()
    wrong = {**right, "secret": "wrong-" + s3_server.secret_key[6:]}
    bucket = f"s3://{s3_archive}"
    config = ColorizeConfig(src=f"{bucket}/scans", dst=f"{bucket}/out", model=f"{bucket}/model")
    before = _keys(s3_server, s3_archive)
    with pytest.raises(StorageError) as refused:
        run_colorize(config, software="chromascan test", storage_options=wrong)
    assert (
        str(refused.value) == f"{bucket}/model/model.json: cannot read (PermissionError: Forbidden)"
    )
    assert _keys(s3_server, s3_archive) == before

    summary = run_colorize(config, software="chromascan test", storage_options=right)
    assert (summary.listed, summary.ok, summary.failed) == (2, 2, 0)
    written = [key for key in _keys(s3_server, s3_archive) if key not in before]
    assert sorted(k for k in written if "/images/" in k) == [
        f"{s3_archive}/out/images/scan0.png",
        f"{s3_archive}/out/images/scan1.png",
    ]


# --- Names the listing cannot carry ------------------------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_non_utf8_names_become_failed_rows_and_the_rest_is_coloured(tmp_path: Path) -> None:
    """A Latin-1 file and folder name (an old Windows share) cannot go into the manifest as is.

    Each becomes one failed row that names the problem, shown with its odd bytes escaped, and
    the UTF-8 names beside it are coloured as usual.
    """
    folder = tmp_path / "archive"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 100).save(buffer, format="PNG")
    (folder / "good.png").write_bytes(buffer.getvalue())
    (folder / "café ok.png").write_bytes(buffer.getvalue())  # UTF-8, unusual but valid
    # b"caf\xe9.png" is "café.png" in Latin-1; Python gives it back as a surrogate escape.
    raw_folder = os.fsencode(folder)
    with open(os.path.join(raw_folder, b"caf\xe9.png"), "wb") as handle:
        handle.write(buffer.getvalue())
    os.mkdir(os.path.join(raw_folder, b"bo\xeete"))
    with open(os.path.join(raw_folder, b"bo\xeete", b"scan.png"), "wb") as handle:
        handle.write(buffer.getvalue())

    listing = list_images(str(folder))
    assert sorted(listing.column("relative_path").to_pylist()) == [
        "bo\\xeete/scan.png", "caf\\xe9.png", "café ok.png", "good.png",
    ]  # fmt: skip

    model = tmp_path / "model"
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    save_model(generator, str(model), name="names")
    dst = tmp_path / "out"
    summary = run_colorize(
        ColorizeConfig(src=str(folder), dst=str(dst), model=str(model)), software="test"
    )
    assert (summary.listed, summary.ok, summary.failed) == (4, 2, 2)
    rows = {
        row["relative_path"]: row
        for row in pq.read_table(dst / "manifest").to_pylist()
    }  # fmt: skip
    assert {path: row["status"] for path, row in rows.items()} == {
        "bo\\xeete/scan.png": "failed", "caf\\xe9.png": "failed",
        "café ok.png": "ok", "good.png": "ok",
    }  # fmt: skip
    assert rows["caf\\xe9.png"]["error_type"] == "UnsupportedName"
    assert rows["caf\\xe9.png"]["error_message"] == (
        "file name is not valid UTF-8 (caf\\xe9.png); rename the file with a UTF-8 name to "
        "colourise it"
    )
    assert rows["bo\\xeete/scan.png"]["error_message"].startswith(
        "file name is not valid UTF-8 (bo\\xeete)"
    )
    assert sorted(p.name for p in (dst / "images").rglob("*.png")) == ["café ok.png", "good.png"]


def _twelve_scans_and_a_model(
    s3_server: Any, s3_bucket: str, model: Path
) -> tuple[dict[str, Any], s3fs.S3FileSystem, Path]:
    """12 small grey PNGs under s3_bucket/scans, and a tiny model in a local folder."""
    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for index in range(12):
        buffer = io.BytesIO()
        Image.new("L", (48, 32), 10 + 20 * index).save(buffer, format="PNG")
        fs.pipe_file(f"{s3_bucket}/scans/scan{index:02d}.png", buffer.getvalue())
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    save_model(generator, str(model), name="tiny")
    return options, fs, model


def _assert_one_ok_row_and_output_per_scan(fs: s3fs.S3FileSystem, s3_bucket: str) -> None:
    fs.invalidate_cache()
    frame = pq.read_table(f"{s3_bucket}/out/manifest", filesystem=fs).to_pandas()
    assert sorted(frame["relative_path"]) == [f"scan{index:02d}.png" for index in range(12)]
    assert set(frame["status"]) == {"ok"}
    outputs = fs.find(f"{s3_bucket}/out/images")
    assert sorted(outputs) == [f"{s3_bucket}/out/images/scan{i:02d}.png" for i in range(12)]


# --- The S3 server stops answering for a few seconds mid-run -----------------------------


@pytest.mark.usefixtures("ray_local")
def test_s3_server_paused_mid_run_the_run_completes(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """SIGSTOP freezes every SeaweedFS component for 3 s once the first results are in.

    Connections still open (the kernel queues them) but nothing answers, as with a stalled
    server or a network hiccup; the run must wait it out, and end with one ok row per input.
    SeaweedS3 restarts on new ports and a new data folder, so a stop-and-restart on the same
    endpoint is not what this test can do.
    """
    options, fs, model = _twelve_scans_and_a_model(s3_server, s3_bucket, tmp_path / "model")
    bucket = f"s3://{s3_bucket}"
    # One input per block and a manifest part per block: the driver keeps writing to the
    # server while it is frozen, not only the workers.
    config = ColorizeConfig(
        src=f"{bucket}/scans", dst=f"{bucket}/out", model=str(model), batch_size=1,
        rows_per_block=1, flush_rows=1,
    )  # fmt: skip
    paused: list[threading.Timer] = []
    done_when_paused: list[int] = []

    def pause_once(state: Progress) -> None:
        if paused:
            return
        done_when_paused.append(state.done)
        os.killpg(s3_server.pid, signal.SIGSTOP)
        resume = threading.Timer(3.0, os.killpg, (s3_server.pid, signal.SIGCONT))
        paused.append(resume)
        resume.start()

    try:
        summary = run_colorize(
            config, software="chromascan test", storage_options=options, progress=pause_once
        )
    finally:
        # The server is shared by the whole session: it must never stay frozen.
        for timer in paused:
            timer.cancel()
        os.killpg(s3_server.pid, signal.SIGCONT)
    assert done_when_paused[0] < 12  # the pause fell inside the run, not after it
    assert (summary.listed, summary.ok, summary.failed) == (12, 12, 0)
    _assert_one_ok_row_and_output_per_scan(fs, s3_bucket)


def _stopped_by_the_store(
    s3_server: Any, config: ColorizeConfig, options: dict[str, Any], **hooks: Any
) -> str:
    """Run, expecting the one-line stop of a store that does not answer; thaw it whatever."""
    try:
        with pytest.raises(StorageUnavailableError) as down:
            run_colorize(config, software="chromascan test", storage_options=options, **hooks)
    finally:
        # The server is shared by the whole session: it must never stay frozen.
        os.killpg(s3_server.pid, signal.SIGCONT)
    message = str(down.value)
    assert "\n" not in message
    assert message.endswith("Run the same command again once the store answers to do the rest")
    return message


# --- The S3 server stays down past the retry budget ---------------------------------------


@pytest.mark.usefixtures("ray_local")
def test_s3_down_past_the_budget_stops_the_run_and_a_rerun_finishes(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """SeaweedFS frozen (SIGSTOP) for good once the first results are in, with a 3 s budget.

    The run must stop with one message that says what happened and what to do, not record
    every remaining scan as failed; once the server answers again the same run, re-run,
    colours the rest: in the end one ok row and one output per scan, nothing twice.
    """
    options, fs, model = _twelve_scans_and_a_model(s3_server, s3_bucket, tmp_path / "model")
    bucket = f"s3://{s3_bucket}"
    config = ColorizeConfig(
        src=f"{bucket}/scans", dst=f"{bucket}/out", model=str(model), batch_size=1,
        rows_per_block=1, flush_rows=1, storage_timeout_s=3.0,
    )  # fmt: skip
    stopped: list[int] = []

    def stop_once(state: Progress) -> None:
        if not stopped:
            stopped.append(state.done)
            os.killpg(s3_server.pid, signal.SIGSTOP)

    message = _stopped_by_the_store(s3_server, config, options, progress=stop_once)
    assert message.startswith(f"the run stopped after {stopped[0]} of 12 inputs: {bucket}/")
    assert "the store is not answering" in message
    fs.invalidate_cache()
    first = pq.read_table(f"{s3_bucket}/out/manifest", filesystem=fs).to_pandas()
    # Stopped, not failed: no scan was blamed for the outage.
    assert set(first["status"]) <= {"ok"}
    assert len(first) < 12

    summary = run_colorize(config, software="chromascan test", storage_options=options)
    assert summary.listed == 12
    assert summary.skipped == len(first)
    assert (summary.ok, summary.failed) == (12 - len(first), 0)
    _assert_one_ok_row_and_output_per_scan(fs, s3_bucket)


@pytest.mark.usefixtures("ray_local")
def test_s3_source_down_in_the_workers_stops_the_run_in_one_line(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    """The scans' store freezes after the listing; the output folder is local.

    Only the Ray workers' reads meet the outage here, so the stop must come through Ray's own
    error (which keeps no Python cause chain across processes), not from a driver-side write
    that happens to time out first: the run stops in one line, having blamed no scan.
    """
    options, _fs, model = _twelve_scans_and_a_model(s3_server, s3_bucket, tmp_path / "model")
    out = tmp_path / "out"
    config = ColorizeConfig(
        src=f"s3://{s3_bucket}/scans", dst=str(out), model=str(model), batch_size=1,
        rows_per_block=1, flush_rows=1, storage_timeout_s=3.0,
    )  # fmt: skip

    def freeze() -> None:
        os.killpg(s3_server.pid, signal.SIGSTOP)

    message = _stopped_by_the_store(s3_server, config, options, connect=freeze)
    assert message.startswith(f"the run stopped after 0 of 12 inputs: s3://{s3_bucket}/scans/")
    assert "cannot read, the store is not answering" in message
    assert not (out / "manifest").exists() or not pq.read_table(out / "manifest").num_rows

    summary = run_colorize(config, software="chromascan test", storage_options=options)
    assert (summary.listed, summary.ok, summary.failed, summary.skipped) == (12, 12, 0, 0)
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"scan{index:02d}.png" for index in range(12)
    ]


@pytest.mark.usefixtures("ray_local")
def test_a_scan_that_kills_its_worker_becomes_one_failed_row(
    model_dir: Path, tmp_path: Path
) -> None:
    """The workers die by SIGKILL on one scan (a codec segfault, the OOM killer): Ray would
    retry it forever. It is tried once more in a child process of its own, which dies too,
    and becomes a WorkerCrashed row; the scans in its batch and after it are coloured."""
    folder = tmp_path / "archive"
    folder.mkdir()
    (folder / "b-crash.png").write_bytes(crash_scan())
    for index in range(5):
        Image.new("L", (48, 32), 40 + 30 * index).save(folder / f"scan{index}.png")
    dst = tmp_path / "out"
    summary = run_colorize(
        ColorizeConfig(src=str(folder), dst=str(dst), model=str(model_dir), actors=1),
        software="test",
    )
    assert (summary.listed, summary.ok, summary.failed) == (6, 5, 1)
    rows = {row["relative_path"]: row for row in pq.read_table(dst / "manifest").to_pylist()}
    assert len(rows) == 6
    crashed = rows["b-crash.png"]
    assert crashed["status"] == "failed"
    assert crashed["error_type"] == "WorkerCrashed"
    assert "killed by SIGKILL" in crashed["error_message"]
    assert all(rows[f"scan{i}.png"]["status"] == "ok" for i in range(5))
    assert summary.error_types == {"WorkerCrashed": 1}
