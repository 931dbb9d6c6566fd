"""The CLI edge: commands listed, exact one-line errors, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cli import main, package_version


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_console_script_lists_commands_and_version() -> None:
    # The installed entry point, as a user runs it.
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    for command in ("model", "demo"):
        assert command in result.stdout
    version = subprocess.run(
        [sys.executable, "-m", "jobs", "--version"], capture_output=True, text=True, check=False
    )
    assert version.stdout.strip() == f"chromascan {package_version()}"


@pytest.mark.parametrize("argv", [["model", "--help"], ["model", "init", "--help"],
                                  ["model", "info", "--help"], ["demo", "--help"]])  # fmt: skip
def test_every_command_has_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = _run(capsys, *argv)
    assert code == 0
    assert "Usage:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "chromascan: No such option: --bogus (see 'chromascan --help')"),
        (
            ["model", "init", "x", "--width", "0"],
            "chromascan: Invalid value for '--width': Input should be greater than or equal to 1 "
            "(see 'chromascan model init --help')",
        ),
        (
            ["model", "init", "x", "--image-size", "100"],
            "chromascan: Invalid value: image_size 100 must be a multiple of 2**depth = 256 "
            "(see 'chromascan model init --help')",
        ),
        (
            ["model", "info"],
            "chromascan: Missing argument 'SOURCE'. (see 'chromascan model info --help')",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.strip().lower() == message.lower()
    assert out == ""


def test_model_init_then_info(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "m"
    code, out, _ = _run(
        capsys, "model", "init", str(target), "--width", "8", "--depth", "5", "--image-size", "32"
    )
    assert code == 0
    assert out.startswith("wrote chromascan-init@")
    code, out, _ = _run(capsys, "model", "info", str(target))
    assert code == 0
    assert "verified sha256" in out
    assert "width 8, depth 5" in out
    code, out, _ = _run(capsys, "model", "info", str(target), "--json")
    assert json.loads(out)["generator"]["width"] == 8


def test_broken_artifact_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = _run(capsys, "model", "info", str(tmp_path))
    assert code == 1
    assert err == (
        f"chromascan: {tmp_path}/model.json: missing; a model artifact needs both model.json "
        "and model.safetensors\n"
    )
    assert "Traceback" not in err


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobs", "model", "info", str(tmp_path / "none")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_model_bench_prints_each_combination(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _run(
        capsys, "model", "init", str(tmp_path), "--width", "4", "--depth", "5", "--image-size", "32"
    )
    code, out, _ = _run(
        capsys, "bench", "forward", str(tmp_path), "-b", "1", "-b", "2", "-p", "fp32", "-p", "bf16",
        "--repeats", "1",
    )  # fmt: skip
    assert code == 0
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        ("1", "fp32"),
        ("1", "bf16"),
        ("2", "fp32"),
        ("2", "bf16"),
    ]
    assert all(float(r[3]) > 0 for r in rows)
    assert float(rows[0][4]) == 0.0  # fp32 against itself


def test_model_bench_refuses_unknown_precision(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "bench", "forward", "-p", "int3")
    assert code == 2
    assert "unknown precision 'int3'" in err


def test_the_cli_starts_without_loading_torch_or_ray() -> None:
    # `chromascan --help` and every one-line error must answer at once, not after 2 s of
    # importing the pipeline.
    probe = "import sys, jobs.cli; print(sorted({'torch', 'ray'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_cli_default_pixel_limit_matches_the_decoder() -> None:
    from jobs.colorize import DEFAULT_MAX_PIXELS as CLI_DEFAULT
    from pipeline.decode import DEFAULT_MAX_PIXELS

    assert CLI_DEFAULT == DEFAULT_MAX_PIXELS


def test_cli_default_storage_timeout_matches_the_storage_layer() -> None:
    from jobs.colorize import DEFAULT_STORAGE_TIMEOUT_S
    from pipeline.colorize import ColorizeConfig
    from pipeline.storage import DEFAULT_TIMEOUT_S

    assert DEFAULT_STORAGE_TIMEOUT_S == DEFAULT_TIMEOUT_S
    assert ColorizeConfig(src="a", dst="b", model="c").storage_timeout_s == DEFAULT_TIMEOUT_S


def test_bare_command_prints_help_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out.count("Usage:") == 1


def test_a_user_error_from_a_ray_task_is_reported_by_its_own_message() -> None:
    """Ray's wrapper is a subclass of the task's error whose message is a whole traceback."""
    from ray.exceptions import RayTaskError

    from jobs.errors import is_user_error, own_error
    from pipeline.storage import StorageUnavailableError

    raised = StorageUnavailableError("s3://b/scans/a.tif: cannot read, the store is not answering")
    wrapped = RayTaskError("prepare_batch", "Traceback\n  File x\n", raised).as_instanceof_cause()
    assert isinstance(wrapped, StorageUnavailableError)
    assert "\n" in str(wrapped)
    assert is_user_error(wrapped)
    assert own_error(wrapped) is raised
    plain = ValueError("not a task error")
    assert own_error(plain) is plain


@pytest.mark.parametrize(
    ("settings", "resources", "actors", "reserved"),
    [
        ({}, {"CPU": 2.0}, 2, 0.5),  # this machine kind: two single-thread actors
        ({}, {"CPU": 16.0}, 12, 0.5),
        ({"actor_cpus": 2}, {"CPU": 16.0}, 6, 1.0),
        ({}, {"CPU": 1.0}, 1, 0.5),
        ({"actors": 1}, {"CPU": 16.0}, 1, 0.5),  # what the user asked for wins
        ({"gpu": True}, {"CPU": 8.0, "GPU": 4.0}, 4, 1.0),  # one per GPU
        ({"gpu": True}, {"CPU": 8.0}, 1, 1.0),  # no GPU yet (an autoscaler adds one)
    ],
)
def test_colorizer_actor_pool_follows_the_cluster(
    settings: dict[str, object], resources: dict[str, float], actors: int, reserved: float
) -> None:
    from pipeline.colorize import ColorizeConfig, actor_cpu_reservation, colorizer_actors

    config = ColorizeConfig(src="a", dst="b", model="c", **settings)  # type: ignore[arg-type]
    assert colorizer_actors(config, resources) == actors
    assert actor_cpu_reservation(config) == reserved


@pytest.mark.parametrize(("rows", "actors"), [(1, 1), (5, 2), (8, 2), (9, 3), (100_000, 3)])
def test_no_more_colorizer_actors_than_an_execution_has_blocks(rows: int, actors: int) -> None:
    from pipeline.colorize import ColorizeConfig, colorizer_pool_size

    config = ColorizeConfig(src="a", dst="b", model="c", rows_per_block=4, actors=3)
    assert colorizer_pool_size(config, {"CPU": 4.0}, rows) == actors


def test_bench_finalize_times_depths_and_signing_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = _run(
        capsys, "bench", "finalize", "--size", "96x64", "--bits", "8", "--bits", "16",
        "--repeats", "1",
    )  # fmt: skip
    assert code == 0
    lines = [line.split() for line in out.splitlines()[2:]]
    assert [tuple(line[:3]) for line in lines] == [
        ("96x64", "8", "no"), ("96x64", "8", "yes"), ("96x64", "16", "no"), ("96x64", "16", "yes"),
    ]  # fmt: skip
    assert lines[0][-1] == "1.00×"
    png_mb = [float(line[5]) for line in lines]
    assert png_mb[2] > png_mb[0]  # a 16-bit PNG is larger
    assert png_mb[1] > png_mb[0]  # and a signed one carries its C2PA manifest


def test_bench_finalize_refuses_other_depths(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "bench", "finalize", "--bits", "12")
    assert code == 2
    assert "--bits takes 8 or 16" in err
