"""chromascan colorize end to end: real Ray, real files, real S3 (SeaweedFS)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from PIL import Image, ImageOps

import pipeline.colorize
from jobs.cli import main
from models.colorize import image_to_lightness
from models.colour import lightness_to_grey
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.colorize import ColorizeConfig, run_colorize
from pipeline.decode import decode_image
from pipeline.model_store import save_model
from pipeline.provenance import DIGITAL_SOURCE_TYPE, read_png_provenance, srgb_icc_profile
from pipeline.schema import MANIFEST_COLUMNS
from tests.integration.corpus import Entry, make_corpus
from tests.integration.ray_cluster import TEST_CLUSTER_CPUS

pytestmark = pytest.mark.usefixtures("ray_local")

DESIGN_COLUMNS = (
    "run_id",
    "source_uri",
    "source_size",
    "source_version",
    "source_sha256",
    "source_format",
    "source_mode",
    "source_width",
    "source_height",
    "source_bits",
    "status",
    "error_type",
    "error_message",
    "output_uri",
    "output_sha256",
    "output_size",
    "output_width",
    "output_height",
    "model_id",
    "model_sha256",
    "colorfulness",
    "started_at",
    "finished_at",
    "duration_s",
    "worker",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    generator = UNetGenerator(GeneratorConfig(width=8, depth=5, image_size=32))
    init_weights(generator)
    # Scale the last layer up so the colours are strong enough to leave sRGB in places:
    # the outputs must keep the scan's L even then.
    with torch.no_grad():
        generator.net.up[1].weight.mul_(40.0)
    folder = tmp_path_factory.mktemp("model")
    save_model(generator, str(folder), name="test-model")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Entry]]:
    root = tmp_path_factory.mktemp("archive")
    return root, make_corpus(root)


def _manifest(dst: Path | str, fs: Any = None) -> pd.DataFrame:
    if fs is None:
        return pq.read_table(Path(dst) / "manifest").to_pandas()
    return pq.read_table(f"{dst}/manifest", filesystem=fs).to_pandas()


def _grey8(lightness: np.ndarray) -> np.ndarray:
    return np.rint(lightness_to_grey(torch.from_numpy(lightness)).numpy() * 255).astype(int)


def _check_rows(frame: pd.DataFrame, entries: list[Entry], prefix: str) -> dict[str, Any]:
    """Exactly one row per entry, with the status and error it should have."""
    assert len(frame) == len(entries)
    rows = {row.source_uri: row for row in frame.itertuples()}
    assert len(rows) == len(entries)
    for entry in entries:
        row = rows[f"{prefix}/{entry.relative_path}"]
        assert row.relative_path == entry.relative_path
        if entry.ok:
            assert row.status == "ok", (entry, row.error_type, row.error_message)
            assert pd.isna(row.error_type)
        else:
            assert row.status == "failed", entry
            assert row.error_type == entry.error_type, (entry, row.error_message)
            assert row.error_message
            assert pd.isna(row.output_uri)
        if entry.note:
            assert entry.note in row.notes
    return rows


def _check_output(source: bytes, output: bytes, row: Any, model_id: str) -> None:
    """Full resolution, the source's own L, the provenance, the recorded hash."""
    assert hashlib.sha256(output).hexdigest() == row.output_sha256
    assert len(output) == row.output_size
    assert hashlib.sha256(source).hexdigest() == row.source_sha256
    with Image.open(io.BytesIO(source)) as original:
        try:
            expected_size = ImageOps.exif_transpose(original).size
        except Exception:  # Pillow's own transpose rewrites EXIF that it cannot write back
            orientation = original.getexif().get(0x0112, 1)
            swapped = isinstance(orientation, int) and orientation in (5, 6, 7, 8)
            expected_size = original.size[::-1] if swapped else original.size
    with Image.open(io.BytesIO(output)) as coloured:
        assert coloured.format == "PNG"
        assert coloured.mode == "RGB"
        assert coloured.size == expected_size
        rgb = np.asarray(coloured)
    assert (row.output_width, row.output_height) == expected_size
    assert (row.source_width, row.source_height) == expected_size
    # Its L is the source's L within one 8-bit level, everywhere.
    source_l = decode_image(source).source_lightness()
    difference = np.abs(_grey8(image_to_lightness(rgb)) - _grey8(source_l))
    assert difference.max() <= 1, (row.relative_path, difference.max())
    info = read_png_provenance(output)
    xmp = str(info["xmp"])
    assert DIGITAL_SOURCE_TYPE in xmp
    assert model_id in xmp
    assert row.source_sha256 in xmp
    assert row.source_uri.replace("&", "&amp;") in xmp
    assert info["icc_profile"] == srgb_icc_profile()
    assert row.model_id == model_id
    assert row.colorfulness >= 0


def test_local_folder_to_local_folder(
    corpus: tuple[Path, list[Entry]], model_dir: Path, tmp_path: Path
) -> None:
    root, entries = corpus
    dst = tmp_path / "out"
    summary = run_colorize(
        ColorizeConfig(src=str(root), dst=str(dst), model=str(model_dir), batch_size=4),
        software="chromascan test",
    )
    good = sum(e.ok for e in entries)
    assert (summary.ok, summary.failed, summary.attempted) == (
        good,
        len(entries) - good,
        len(entries),
    )

    frame = _manifest(dst)
    assert set(DESIGN_COLUMNS) <= set(frame.columns)
    assert tuple(c for c in frame.columns if c != "run") == MANIFEST_COLUMNS
    assert set(frame["run_id"]) == {summary.run_id}
    rows = _check_rows(frame, entries, str(root))
    for entry in entries:
        row = rows[f"{root}/{entry.relative_path}"]
        if not entry.ok:
            continue
        expected_output = dst / "images" / Path(entry.relative_path).with_suffix(".png")
        assert row.output_uri == str(expected_output)
        _check_output(
            (root / entry.relative_path).read_bytes(), expected_output.read_bytes(), row,
            summary.model_id,
        )  # fmt: skip

    # Orientation applied and the EXIF kept, with the tag reset; DPI carried over.
    rotated = read_png_provenance((dst / "images/good/rotated.png").read_bytes())
    assert rotated["exif"].get(0x0112) == 1
    assert rotated["exif"].get(0x010F) == "chromascan test camera"
    assert rotated["dpi"] == pytest.approx((600, 600), abs=0.1)
    assert read_png_provenance((dst / "images/good/bilevel.png").read_bytes())["dpi"] == (
        pytest.approx((300, 300), abs=0.1)
    )
    # 16-bit source: scaled, not clipped (8-bit clipping would make it nearly white).
    sixteen = np.asarray(Image.open(dst / "images/good/chelsea16.png").convert("L"), float)
    eight = np.asarray(Image.open(root / "good/chelsea16.tif"), float) / 257
    assert abs(sixteen.mean() - eight.mean()) < 2
    # Failed rows say what went wrong in words.
    assert "exceeds the limit" in rows[f"{root}/bad/bomb.png"].error_message
    assert "truncated" in rows[f"{root}/bad/truncated.jpg"].error_message

    # No temporary or stray files next to the outputs.
    written = sorted(
        p.relative_to(dst / "images").as_posix() for p in (dst / "images").rglob("*") if p.is_file()
    )
    assert written == sorted(
        str(Path(e.relative_path).with_suffix(".png")) for e in entries if e.ok
    )

    # The run summary.
    document = json.loads((dst / "runs" / f"{summary.run_id}.json").read_text())
    assert document["run"]["ok"] == good
    assert document["config"]["model"] == str(model_dir)
    # The actor pool that ran: about 3 per 4 CPUs, at most one per block of 4 inputs.
    assert document["config"]["actors"] == min(
        round(0.75 * TEST_CLUSTER_CPUS), -(-len(entries) // 4)
    )

    # Readable with no extra code by pandas, pyarrow and DuckDB.
    parts = sorted((dst / "manifest" / f"run={summary.run_id}").glob("part-*.parquet"))
    assert parts
    assert pd.read_parquet(dst / "manifest").shape[0] == len(entries)
    count = duckdb.sql(
        f"select count(*), count(*) filter (where status = 'ok') "
        f"from read_parquet('{dst}/manifest/*/*.parquet', hive_partitioning = true)"
    ).fetchall()[0]
    assert count == (len(entries), good)


def test_a_run_larger_than_one_execution_colours_each_input_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """11 scans, 4 per Ray Data execution (3 executions, the last one short), 2 per block."""
    executions: list[int] = []
    real_stream = pipeline.colorize._stream

    def counted_stream(listing: Any, *args: Any) -> Any:
        executions.append(listing.num_rows)
        return real_stream(listing, *args)

    monkeypatch.setattr(pipeline.colorize, "_stream", counted_stream)
    src = tmp_path / "scans"
    src.mkdir()
    for index in range(11):
        Image.new("L", (40, 30), 20 * index).save(src / f"s{index:02d}.png")
    dst = tmp_path / "out"
    seen: list[int] = []
    summary = run_colorize(
        ColorizeConfig(src=str(src), dst=str(dst), model=str(model_dir), batch_size=2,
                       rows_per_block=2, rows_per_execution=4),
        software="chromascan test",
        progress=lambda state: seen.append(state.done),
    )  # fmt: skip
    assert (summary.listed, summary.ok, summary.failed) == (11, 11, 0)
    assert executions == [4, 4, 3]
    assert seen == sorted(seen)  # one count across the executions
    assert seen[-1] == 11
    frame = pq.read_table(dst / "manifest").to_pandas()
    assert sorted(frame["relative_path"]) == [f"s{index:02d}.png" for index in range(11)]
    assert sorted(p.name for p in (dst / "images").iterdir()) == [
        f"s{index:02d}.png" for index in range(11)
    ]


def test_s3_bucket_to_s3_bucket(
    corpus: tuple[Path, list[Entry]],
    model_dir: Path,
    s3_server: Any,
    s3_bucket: str,
) -> None:
    root, entries = corpus
    options = s3_server.storage_options()
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(root) + "/", f"{s3_bucket}/scans/", recursive=True)
    fs.put(str(model_dir) + "/", f"{s3_bucket}/models/tiny/", recursive=True)
    src, dst = f"s3://{s3_bucket}/scans", f"s3://{s3_bucket}/coloured"
    summary = run_colorize(
        ColorizeConfig(src=src, dst=dst, model=f"s3://{s3_bucket}/models/tiny"),
        software="chromascan test",
        storage_options=options,
    )
    good = sum(e.ok for e in entries)
    assert (summary.ok, summary.failed) == (good, len(entries) - good)
    frame = _manifest(f"{s3_bucket}/coloured", fs)
    rows = _check_rows(frame, entries, src)
    for entry in entries:
        row = rows[f"{src}/{entry.relative_path}"]
        if entry.ok:
            key = f"{dst}/images/{Path(entry.relative_path).with_suffix('.png')}"
            assert row.output_uri == key
            _check_output(fs.cat_file(f"{src}/{entry.relative_path}"), fs.cat_file(key), row,
                          summary.model_id)  # fmt: skip
            assert row.source_version  # the ETag
    assert fs.exists(f"{s3_bucket}/coloured/runs/{summary.run_id}.json")
    # No credentials anywhere in what the run wrote.
    written = b"".join(fs.cat_file(p) for p in fs.find(f"{s3_bucket}/coloured/runs"))
    written += b"".join(fs.cat_file(p) for p in fs.find(f"{s3_bucket}/coloured/manifest"))
    assert s3_server.secret_key.encode() not in written
    assert s3_server.access_key.encode() not in written


def test_cli_colorize_summary_and_exit_codes(
    corpus: tuple[Path, list[Entry]],
    model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, entries = corpus
    good = sum(e.ok for e in entries)
    in_good = sum(e.ok and e.relative_path.startswith("good/") for e in entries)
    argv = ["colorize", str(root / "good"), str(tmp_path / "a"), "--model", str(model_dir)]
    assert main([*argv, "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert (
        f"3 ok, 0 failed, 0 already done, {in_good - 3} not attempted, of {in_good} listed" in out
    )

    argv = ["colorize", str(root), str(tmp_path / "b"), "--model", str(model_dir)]
    assert main(argv) == 3  # some inputs failed
    captured = capsys.readouterr()
    assert f"{good} ok, {len(entries) - good} failed" in captured.out
    assert "failed: 2 × UnidentifiedImageError" in captured.out
    assert captured.err.strip().endswith(
        f"chromascan: {len(entries) - good} of {len(entries)} scans failed "
        "(see the manifest; --allow-failures exits 0)"
    )
    # Again into the same folder: only the failed scans are tried (and fail) again, and
    # --allow-failures makes that a success.
    assert main([*argv, "--allow-failures"]) == 0
    assert f"0 ok, {len(entries) - good} failed, {good} already done" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--actors", "0"], 2, "Invalid value for '--actors'"),
        (["--precision", "int4"], 2, "unknown precision 'int4'"),
        (["--png-level", "12"], 2, "Invalid value for '--png-level'"),
    ],
)
def test_cli_bad_flags(
    corpus: tuple[Path, list[Entry]], model_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], extra: list[str], code: int, message: str,
) -> None:  # fmt: skip
    root, _ = corpus
    argv = ["colorize", str(root), str(tmp_path), "--model", str(model_dir), *extra]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1


def test_cli_bad_locations(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert (
        main(["colorize", str(tmp_path / "empty"), str(tmp_path / "o"), "-m", str(model_dir)]) == 1
    )
    assert (
        capsys.readouterr().err
        == f"chromascan: {tmp_path / 'empty'}: no images found (looked for jpg, png, tif, ...)\n"
    )
    assert (
        main(["colorize", str(tmp_path / "nope"), str(tmp_path / "o"), "-m", str(model_dir)]) == 1
    )
    assert capsys.readouterr().err == f"chromascan: {tmp_path / 'nope'}: no such folder or prefix\n"
    assert (
        main(["colorize", str(tmp_path), str(tmp_path / "o"), "-m", str(tmp_path / "nomodel")]) == 1
    )
    assert "nomodel/model.json: missing" in capsys.readouterr().err


def test_bench_pipeline_runs_both_sides(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["bench", "pipeline", "--model", str(model_dir), "--images", "6", "--rounds", "1",
                 "--batch-size", "4", "--json"])  # fmt: skip
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 6
    assert len(result["plain_images_per_s"]) == len(result["ray_images_per_s"]) == 1
    assert result["ratio"] > 0
    assert result["forward_images_per_s"] > 0
    assert result["forward_all_cores_images_per_s"] > 0
    assert len(result["ray_steady_images_per_s"]) == 1
    assert result["actor_cpus"] == 1
    # About 3 actors per 4 CPUs, but no more than the run's blocks (6 scans: 2 blocks of 4).
    assert round(0.75 * TEST_CLUSTER_CPUS) > 2
    assert result["actors"] == 2
    # The settled rate leaves the start-up out, so it is never below the whole run's rate
    # unless a single block carried every result (then it is 0: not measurable).
    steady, whole = result["ray_steady_images_per_s"][0], result["ray_images_per_s"][0]
    assert steady == 0 or steady >= whole


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_actor_matches_cpu(
    corpus: tuple[Path, list[Entry]], model_dir: Path, tmp_path: Path
) -> None:
    root, _ = corpus
    runs = {}
    for name, gpu in (("cpu", False), ("gpu", True)):
        run_colorize(
            ColorizeConfig(src=str(root / "good"), dst=str(tmp_path / name), model=str(model_dir),
                           gpu=gpu, precision="bf16" if gpu else "fp32"),
            software="chromascan test",
        )  # fmt: skip
        runs[name] = {
            p.name: np.asarray(Image.open(p), int) for p in (tmp_path / name).rglob("*.png")
        }
    assert runs["cpu"].keys() == runs["gpu"].keys()
    for key, pixels in runs["cpu"].items():
        # bf16 on the GPU vs fp32 on the CPU: within 3 levels on average, same L by design.
        assert np.abs(runs["gpu"][key] - pixels).mean() < 3
