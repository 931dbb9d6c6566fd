"""``chromascan train`` at the CLI edge: flags, and inputs that are wrong before Ray starts.

Every case here fails before a Ray cluster would start; a test that started one would hang
or take seconds, and ``ray.init`` is made to fail loudly to prove it is never reached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from jobs.cli import main
from jobs.train import default_depth


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ray.init reached: this input should have failed before Ray")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(10):
        crop = np.ascontiguousarray(data.coffee()[index * 10 :, index * 20 :])
        Image.fromarray(crop).save(folder / f"{index}.jpg")
    return folder


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["train", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_lists_the_options(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps and truncates option names when narrow
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    for option in (
        "--output",
        "--workers",
        "--gpu",
        "--epochs",
        "--batch-size",
        "--image-size",
        "--width",
        "--val-fraction",
        "--val",
        "--no-bf16",
        "--max-failures",
        "--keep-checkpoints",
        "--export",
        "--name",
    ):
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--workers", "0"],
            "Invalid value for '--workers': Input should be greater than or equal to 1",
        ),
        (["--val-fraction", "1.5"], "Invalid value for '--val-fraction': 1.5 is not between 0 "
         "and 1 (exclusive)"),
        (["--val-fraction", "0.2", "--val", "elsewhere"], "Invalid value for '--val-fraction': "
         "give either --val or --val-fraction, not both"),
        (["--image-size", "100"], "Invalid value for '--image-size': 100 allows a U-Net of depth "
         "2 only (the side must be a multiple of 2**depth); use a multiple of 32 such as 64, 128 "
         "or 256, or set --depth"),
        (["--image-size", "100", "--depth", "3"], "Invalid value: image_size 100 must be a "
         "multiple of 2**depth = 8"),
        (["--export", "worst"], "Invalid value for '--export': 'worst' is not one of latest, "
         "best"),
        (["--name", "bad name!"], "Invalid value for '--name': model name 'bad name!' must be "
         "1-100 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"),
        (["--lr", "0"], "Invalid value for '--lr': 0 is not a positive number"),
        (["--epochs", "3", "--decay-epochs", "5"], "Invalid value: decay epochs must be between "
         "0 and epochs (3), got 5"),
        (["--max-failures", "-1"], "Invalid value for '--max-failures': Input should be greater "
         "than or equal to 0"),
    ],
)  # fmt: skip
def test_bad_flags_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], photos: Path, argv: list[str], message: str
) -> None:
    code, out, err = _run(capsys, str(photos), "--output", "out", *argv)
    assert code == 2
    assert out == ""
    assert err == f"chromascan: {message} (see 'chromascan train --help')\n"


def test_output_is_required(capsys: pytest.CaptureFixture[str], photos: Path) -> None:
    code, _, err = _run(capsys, str(photos))
    assert code == 2
    assert err == "chromascan: Missing option '--output' / '-o'. (see 'chromascan train --help')\n"


def test_missing_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = _run(capsys, str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert code == 1
    assert err == f"chromascan: {tmp_path / 'nowhere'}: no such folder or prefix\n"


def test_folder_without_images(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no pictures")
    (empty / ".hidden.jpg").write_bytes(b"editor clutter, skipped")
    code, _, err = _run(capsys, str(empty), "--output", str(tmp_path / "out"))
    assert code == 1
    assert err == (
        f"chromascan: {empty}: no images found (looked for .bmp, .gif, .j2k, .jp2, .jpeg, .jpg, "
        ".jpx, .png, .tif, .tiff, .webp in all subfolders)\n"
    )
    assert not (tmp_path / "out").exists()


def test_too_few_photos_for_the_workers(
    capsys: pytest.CaptureFixture[str], photos: Path, tmp_path: Path
) -> None:
    code, _, err = _run(
        capsys, str(photos), "--output", str(tmp_path / "out"), "--workers", "4",
        "--batch-size", "4",
    )  # fmt: skip
    assert code == 1
    assert err == (
        f"chromascan: {photos}: 9 training images, but every worker needs at least one full "
        "batch: need 16 (workers × batch size)\n"
    )


def test_a_single_photo_cannot_be_split(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    Image.fromarray(data.coffee()).save(folder / "only.png")
    code, _, err = _run(capsys, str(folder), "--output", str(tmp_path / "out"))
    assert code == 1
    assert err == (
        f"chromascan: {folder}: only 1 image found; need at least 2 (one to train on, one to "
        "validate), or a separate validation URL\n"
    )


@pytest.mark.parametrize(("size", "depth"), [(256, 8), (512, 8), (128, 7), (64, 6), (96, 5)])
def test_default_depth_is_the_deepest_that_fits(size: int, depth: int) -> None:
    assert default_depth(size) == depth
