"""chromascan manifest summary / show / verify / export-bag / report on a hand-made DST.

No Ray here: the DST is written directly (PNG outputs, a Parquet manifest, run summaries) in
the layout DESIGN.md fixes, so each case can set up exactly the history it needs. The same
commands run against a real colorize output in tests/integration/test_manifest_tools.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bagit
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.bag import BagError, export_bag
from pipeline.manifest_query import ManifestToolError
from pipeline.manifest_tools import HASH_CHUNK_BYTES, hash_stream, latest_rows
from pipeline.report import write_report
from pipeline.schema import MANIFEST_COLUMNS, MANIFEST_SCHEMA
from pipeline.storage import filesystem

MODEL = "tiny@0123456789ab"
RUN_1 = "20260101T010000Z-aaaaaa"
RUN_2 = "20260102T010000Z-bbbbbb"
T0 = datetime(2026, 1, 1, 1, 0, tzinfo=UTC)


def _png(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _scan(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (30, 40), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass
class Dst:
    root: Path
    scans: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    def output(self, relative_output: str) -> Path:
        return self.images / relative_output

    def add_run(
        self,
        run_id: str,
        rows: list[dict[str, Any]],
        *,
        summary: dict[str, Any] | None = None,
    ) -> None:
        folder = self.root / "manifest" / f"run={run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        full = [{name: row.get(name) for name in MANIFEST_SCHEMA.names} | {"run_id": run_id}
                for row in rows]  # fmt: skip
        pq.write_table(
            pa.Table.from_pylist(full, schema=MANIFEST_SCHEMA), folder / "part-0.parquet"
        )
        if summary is not None:
            (self.root / "runs").mkdir(exist_ok=True)
            (self.root / "runs" / f"{run_id}.json").write_text(json.dumps({"run": summary}))

    def ok_row(self, relative: str, seed: int, *, minutes: int = 0, **extra: Any) -> dict[str, Any]:
        """Colour ``relative`` (a scan path): write scan and output, return its manifest row."""
        scan = _scan(seed)
        (self.scans / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.scans / relative).write_bytes(scan)
        output_relative = relative.rsplit(".", 1)[0] + ".png"
        data = _png(seed)
        self.output(output_relative).parent.mkdir(parents=True, exist_ok=True)
        self.output(output_relative).write_bytes(data)
        started = T0 + timedelta(minutes=minutes)
        return {
            "source_uri": f"{self.scans}/{relative}",
            "relative_path": relative,
            "source_size": len(scan),
            "source_version": "v1",
            "source_sha256": hashlib.sha256(scan).hexdigest(),
            "source_format": "JPEG",
            "source_mode": "L",
            "source_width": 40,
            "source_height": 30,
            "source_bits": 8,
            "status": "ok",
            "output_uri": f"{self.images}/{output_relative}",
            "output_sha256": hashlib.sha256(data).hexdigest(),
            "output_size": len(data),
            "output_width": 40,
            "output_height": 30,
            "model_id": MODEL,
            "model_sha256": "0123456789ab" + "0" * 52,
            "colorfulness": 12.5 + seed,
            "started_at": started,
            "finished_at": started + timedelta(seconds=2),
            "duration_s": 2.0,
            **extra,
        }

    def failed_row(
        self, relative: str, error_type: str, message: str, *, minutes: int = 0
    ) -> dict[str, Any]:
        (self.scans / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.scans / relative).write_bytes(b"not an image")
        started = T0 + timedelta(minutes=minutes)
        return {
            "source_uri": f"{self.scans}/{relative}",
            "relative_path": relative,
            "status": "failed",
            "error_type": error_type,
            "error_message": message,
            "model_id": MODEL,
            "model_sha256": "0123456789ab" + "0" * 52,
            "started_at": started,
            "finished_at": started + timedelta(seconds=1),
        }


@pytest.fixture
def dst(tmp_path: Path) -> Dst:
    made = Dst(tmp_path / "dst", tmp_path / "scans")
    made.root.mkdir()
    rows = [
        made.ok_row("box1/a.jpg", 1),
        made.ok_row("box1/b.jpg", 2),
        made.ok_row("box2/c d é.jpg", 3),  # spaces and non-ASCII are everyday file names
        made.failed_row("box2/broken.jpg", "UnidentifiedImageError", "cannot identify image"),
    ]
    made.add_run(RUN_1, rows, summary={
        "run_id": RUN_1, "model_id": MODEL, "listed": 4, "attempted": 4, "ok": 3, "failed": 1,
        "skipped": 0, "elapsed_s": 8.0, "started_at": "2026-01-01T01:00:00+00:00",
        "finished_at": "2026-01-01T01:00:08+00:00",
    })  # fmt: skip
    return made


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- verify --------------------------------------------------------------------------------


def test_verify_passes_on_a_clean_dst(dst: Dst, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "manifest", "verify", str(dst.root), "--engine", "threads")
    assert (code, err) == (0, "")
    assert out.startswith(
        "3 outputs in the manifest: 3 verified, 0 changed, 0 missing, 0 unreadable; "
        "0 untracked files; "
    )
    assert out.count("\n") == 1


def test_verify_catches_modified_deleted_and_extra_files(
    dst: Dst, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = dst.output("box1/a.png")
    original = hashlib.sha256(changed.read_bytes()).hexdigest()
    changed.write_bytes(changed.read_bytes() + b"\0")
    deleted = hashlib.sha256(dst.output("box1/b.png").read_bytes()).hexdigest()
    dst.output("box1/b.png").unlink()
    dst.output("box2/extra.png").write_bytes(b"stray")
    dst.output("box2/.c d é.png.1234.tmp").write_bytes(b"half")  # a crashed write's leftover

    code, out, err = _run(capsys, "manifest", "verify", str(dst.root), "--engine", "threads")
    assert code == 3
    assert err == f"chromascan: verify found 4 problems under {dst.root}/images\n"
    lines = out.splitlines()
    now = hashlib.sha256(changed.read_bytes()).hexdigest()
    size = changed.stat().st_size
    assert lines[:4] == [
        f"changed    box1/a.png  sha256 {now}, manifest {original}; {size} bytes, "
        f"manifest {size - 1}",
        f"missing    box1/b.png  sha256 {deleted}",
        "untracked  box2/.c d é.png.1234.tmp  4 bytes",
        "untracked  box2/extra.png  5 bytes",
    ]
    assert lines[4].startswith(
        "3 outputs in the manifest: 1 verified, 1 changed, 1 missing, 0 unreadable; "
        "2 untracked files;"
    )


def test_verify_takes_the_latest_ok_row_of_each_output(
    dst: Dst, capsys: pytest.CaptureFixture[str]
) -> None:
    # Night 2 re-colours a.jpg (new bytes) and fails on b.jpg, which keeps night 1's output.
    dst.add_run(RUN_2, [
        dst.ok_row("box1/a.jpg", 10, minutes=60 * 24),
        dst.failed_row("box1/b.jpg", "OSError", "truncated", minutes=60 * 24),
    ])  # fmt: skip
    code, out, _ = _run(capsys, "manifest", "verify", str(dst.root), "--engine", "threads")
    assert code == 0, out
    # Night 1's bytes for a.png would now be a change.
    dst.output("box1/a.png").write_bytes(_png(1))
    code, out, _ = _run(capsys, "manifest", "verify", str(dst.root), "--engine", "threads")
    assert code == 3
    assert out.startswith("changed    box1/a.png")


def test_verify_works_on_a_copied_dst(
    dst: Dst, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # output_uri names the old place; outputs are found through the mirrored source path.
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(dst.root, copy)
    code, out, _ = _run(capsys, "manifest", "verify", str(copy), "--engine", "threads")
    assert code == 0, out
    (copy / "images/box2/c d é.png").unlink()
    code, out, _ = _run(capsys, "manifest", "verify", str(copy), "--engine", "threads")
    assert code == 3
    assert out.startswith("missing    box2/c d é.png")


def test_hashing_streams_in_bounded_chunks(tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    payload = np.random.default_rng(0).bytes(3 * HASH_CHUNK_BYTES + 17)
    big.write_bytes(payload)
    fs, path = filesystem(str(big))
    reads: list[int] = []
    real_open = fs.open

    def spying_open(*args: Any, **kwargs: Any) -> Any:
        handle = real_open(*args, **kwargs)
        real_read = handle.read

        def read(size: int = -1) -> bytes:
            reads.append(size)
            return real_read(size)

        handle.read = read
        return handle

    fs.open = spying_open  # type: ignore[method-assign]
    try:
        digests, size = hash_stream(fs, path, algorithms=("sha256", "sha512"))
    finally:
        del fs.open
    assert size == len(payload)
    assert digests == {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "sha512": hashlib.sha512(payload).hexdigest(),
    }
    assert reads
    assert all(0 < n <= HASH_CHUNK_BYTES for n in reads)


def test_latest_rows_prefers_finish_time_then_run_id() -> None:
    table = pa.table({
        "key": ["a", "a", "a", "b", None],
        "run_id": ["r1", "r3", "r2", "r1", "r9"],
        "finished_at": pa.array([T0, T0, T0 + timedelta(hours=1), None, T0],
                                pa.timestamp("ms", tz="UTC")),
    })  # fmt: skip
    latest = latest_rows(table, "key")
    assert latest.to_pydict()["run_id"] == ["r2", "r1"]


# --- summary and show ----------------------------------------------------------------------


def test_summary_per_run_and_overall(dst: Dst, capsys: pytest.CaptureFixture[str]) -> None:
    # A run that died (rows, no run summary) and a nightly run with nothing to do (the reverse).
    dst.add_run(RUN_2, [dst.failed_row("box1/b.jpg", "OSError", "truncated", minutes=60)])
    noop = "20260103T010000Z-cccccc"
    (dst.root / "runs" / f"{noop}.json").write_text(json.dumps({"run": {
        "run_id": noop, "model_id": MODEL, "listed": 4, "attempted": 0, "skipped": 4,
        "elapsed_s": 0.5, "started_at": "2026-01-03T01:00:00+00:00",
        "finished_at": "2026-01-03T01:00:01+00:00",
    }}))  # fmt: skip
    code, out, err = _run(capsys, "manifest", "summary", str(dst.root))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"DST {dst.root}",
        f"run {RUN_1}  2026-01-01T01:00:00+00:00 to 2026-01-01T01:00:08+00:00",
        "  4 rows: 3 ok, 1 failed; 0.50 images/s over 8.0 s",
        "  listed 4, 0 already done before",
        f"  models: 4 {MODEL}",
        "  failed: 1 × UnidentifiedImageError",
        f"run {RUN_2}  2026-01-01T02:00:00+00:00 to 2026-01-01T02:00:01+00:00",
        "  1 rows: 1 failed; 1.00 images/s over 1.0 s (no run summary: row times)",
        f"  models: 1 {MODEL}",
        "  failed: 1 × OSError",
        f"run {noop}  2026-01-03T01:00:00+00:00 to 2026-01-03T01:00:01+00:00",
        "  0 rows: none; 0.00 images/s over 0.5 s",
        "  listed 4, 4 already done before",
        f"  models: 0 {MODEL}",
        "all runs: 3 runs, 5 rows: 3 ok, 2 failed",
        "sources: 4, by latest attempt: 2 ok, 2 failed; outputs: 3",
        "failing now: 1 × OSError",
        "failing now: 1 × UnidentifiedImageError",
        f"models: 5 {MODEL}",
        "review of the outputs: 0 approved, 0 rejected, 3 pending",
        "throughput: 0.53 images/s over 9.5 s of runs",
    ]
    code, out, _ = _run(capsys, "manifest", "summary", str(dst.root), "--json")
    figures = json.loads(out)
    assert [run["run_id"] for run in figures["runs"]] == [RUN_1, RUN_2, noop]
    assert figures["latest_statuses"] == {"ok": 2, "failed": 2}


def test_show_table_csv_and_json(dst: Dst, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "manifest", "show", str(dst.root))
    assert (code, err) == (0, "4 rows\n")
    lines = out.splitlines()
    assert lines[0].split() == ["run", "status", "source", "colourfulness", "model", "error"]
    assert any("box2/broken.jpg" in line and "UnidentifiedImageError: cannot identify" in line
               for line in lines)  # fmt: skip
    assert len(lines) == 5

    code, out, _ = _run(capsys, "manifest", "show", str(dst.root), "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0
    # Every manifest column, then the review state of the row's output.
    assert tuple(rows[0]) == (*MANIFEST_COLUMNS, "review", "review_reason")
    assert len(rows) == 4

    code, out, _ = _run(capsys, "manifest", "show", str(dst.root), "--status", "failed",
                        "--format", "json")  # fmt: skip
    rows = json.loads(out)
    assert code == 0
    assert [row["relative_path"] for row in rows] == ["box2/broken.jpg"]
    assert tuple(rows[0]) == (*MANIFEST_COLUMNS, "review", "review_reason")
    assert rows[0]["finished_at"] == "2026-01-01T01:00:01+00:00"
    assert out.count("\n") == 3  # "[", one line per row, "]"

    code, out, _ = _run(capsys, "manifest", "show", str(dst.root), "--run", "nope",
                        "--format", "json")  # fmt: skip
    assert (code, json.loads(out)) == (0, [])


def test_show_keeps_hostile_names_on_one_line(dst: Dst, capsys: pytest.CaptureFixture[str]) -> None:
    dst.add_run(RUN_2, [dst.failed_row("box3/two\nlines.jpg", "OSError", "bad\rthing")])
    code, out, _ = _run(capsys, "manifest", "show", str(dst.root), "--status", "failed")
    assert code == 0
    assert "box3/two\\x0alines.jpg" in out
    assert "OSError: bad\\x0dthing" in out
    assert len(out.splitlines()) == 3


# --- CLI errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["summary", "show", "verify", "report"])
def test_missing_dst_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, err = _run(capsys, "manifest", command, str(tmp_path / "nope"))
    assert (code, out) == (1, "")
    assert err == f"chromascan: {tmp_path / 'nope'}: no such folder or prefix\n"


@pytest.mark.parametrize("command", ["summary", "show", "verify", "report"])
def test_dst_without_manifest_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    (tmp_path / "images").mkdir()
    code, out, err = _run(capsys, "manifest", command, str(tmp_path))
    assert (code, out) == (1, "")
    assert err == (
        f"chromascan: {tmp_path}: no manifest here (expected manifest/run=<run_id>/"
        "part-*.parquet; is this a chromascan colorize destination?)\n"
    )
    assert not (tmp_path / "report.html").exists()


def test_export_bag_without_manifest_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "manifest", "export-bag", str(tmp_path), str(tmp_path / "bag"))
    assert code == 1
    assert err.startswith(f"chromascan: {tmp_path}: no manifest here")
    assert not (tmp_path / "bag").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["show", "DST", "--format", "xml"],
            "chromascan: Invalid value for '--format': unknown format 'xml'; choose from table, "
            "csv, json (see 'chromascan manifest show --help')",
        ),
        (
            ["show", "DST", "--status", "done"],
            "chromascan: Invalid value for '--status': unknown status 'done'; choose from ok, "
            "failed, skipped (see 'chromascan manifest show --help')",
        ),
        (
            ["export-bag", "DST", "BAG", "--info", "Source-Organization"],
            "chromascan: Invalid value for '--info': expected LABEL=VALUE, got "
            "'Source-Organization' (see 'chromascan manifest export-bag --help')",
        ),
        (
            ["report", "DST", "--thumb-size", "8"],
            "chromascan: Invalid value for '--thumb-size': Input should be greater than or "
            "equal to 32 (see 'chromascan manifest report --help')",
        ),
        (
            ["verify"],
            "chromascan: Missing argument 'DST'. (see 'chromascan manifest verify --help')",
        ),
    ],
)
def test_usage_errors_are_one_line_with_exit_2(
    dst: Dst, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [str(dst.root) if a == "DST" else str(dst.root.parent / "bag") if a == "BAG" else a
            for a in argv]  # fmt: skip
    code, out, err = _run(capsys, "manifest", *argv)
    assert (code, out) == (2, "")
    assert err == message + "\n"


def test_manifest_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "manifest", "--help")
    assert code == 0
    for command in ("summary", "show", "verify", "export-bag", "report"):
        assert command in out
        code, out_command, _ = _run(capsys, "manifest", command, "--help")
        assert code == 0
        assert "Usage: chromascan manifest" in out_command


# --- export-bag ----------------------------------------------------------------------------


def _tags(path: Path) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in path.read_text().splitlines()]  # type: ignore[misc]


def test_export_bag_is_valid_for_the_reference_validator(
    dst: Dst, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # '%' is bagged as bagit-python reads it (see pipeline/bag.py); a line break encoded as
    # %0A; spaces and accents as they are.
    dst.add_run(RUN_2, [dst.ok_row("box3/50% grey.jpg", 7, minutes=60),
                        dst.ok_row("box3/two\nlines.jpg", 8, minutes=60)])  # fmt: skip
    bag_path = tmp_path / "bag"
    code, out, err = _run(capsys, "manifest", "export-bag", str(dst.root), str(bag_path),
                          "--engine", "threads",
                          "--info", "Source-Organization=City Archive & Co.")  # fmt: skip
    assert (code, err) == (0, ""), err
    assert out.startswith(f"wrote bag {bag_path}: 5 files, ")
    assert out.splitlines()[1] == f"model {MODEL} sha256:0123456789ab{'0' * 52}"

    bag = bagit.Bag(str(bag_path))
    bag.validate()  # raises BagValidationError with the details on any problem
    assert bag.version_info == (1, 0)
    assert set(bag.algorithms) == {"sha256", "sha512"}
    assert sorted(bag.payload_files()) == [
        "data/box1/a.png", "data/box1/b.png", "data/box2/c d é.png", "data/box3/50% grey.png",
        "data/box3/two\nlines.png",
    ]  # fmt: skip
    assert "data/box3/two%0Alines.png" in (bag_path / "manifest-sha256.txt").read_text()
    for relative in bag.payload_files():
        assert (bag_path / relative).read_bytes() == (dst.images / relative[5:]).read_bytes()

    info = dict(_tags(bag_path / "bag-info.txt"))
    octets = sum(p.stat().st_size for p in (bag_path / "data").rglob("*") if p.is_file())
    assert info["Payload-Oxum"] == f"{octets}.5"
    assert info["Bagging-Date"] == datetime.now(UTC).date().isoformat()
    assert info["Bag-Software-Agent"].startswith("chromascan ")
    assert info["Source-Organization"] == "City Archive & Co."
    assert info["Chromascan-Source"] == str(dst.scans)
    assert info["Chromascan-Model"] == f"{MODEL} sha256:0123456789ab{'0' * 52}"
    assert info["Chromascan-Runs"] == f"2: {RUN_1} to {RUN_2}"
    assert "compositeWithTrainedAlgorithmicMedia" in info["Chromascan-Digital-Source-Type"]

    # The tag manifests cover our tag files; the payload rows map to the payload.
    tagged = {line.split(None, 1)[1] for line in
              (bag_path / "tagmanifest-sha512.txt").read_text().splitlines()}  # fmt: skip
    assert {"bagit.txt", "bag-info.txt", "manifest-sha256.txt", "manifest-sha512.txt",
            "chromascan/manifest.parquet", "chromascan/README.txt",
            f"chromascan/runs/{RUN_1}.json"} == tagged  # fmt: skip
    rows = pq.read_table(bag_path / "chromascan/manifest.parquet").to_pylist()
    assert sorted(row["bag_path"] for row in rows) == sorted(bag.payload_files())
    for row in rows:
        data = (bag_path / row["bag_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["output_sha256"]


def test_export_bag_refuses_changed_outputs_and_leaves_nothing(
    dst: Dst, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dst.output("box1/b.png").write_bytes(b"tampered")
    code, _, err = _run(capsys, "manifest", "export-bag", str(dst.root), str(tmp_path / "bag"),
                        "--engine", "threads")  # fmt: skip
    assert code == 1
    assert err == (
        "chromascan: box1/b.png: sha256 differs from the manifest's; it was changed after "
        "colouring (manifest verify lists every problem)\n"
    )
    assert not (tmp_path / "bag").exists()


def test_export_bag_will_not_overwrite(dst: Dst, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(BagError, match="already exists and is not empty"):
        export_bag(str(dst.root), str(taken), software="chromascan test")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(BagError, match="Payload-Oxum is computed"):
        export_bag(str(dst.root), str(tmp_path / "b"), software="t", info=[("Payload-Oxum", "1")])
    with pytest.raises(BagError, match="contain ':'"):
        export_bag(str(dst.root), str(tmp_path / "b"), software="t", info=[("A:B", "1")])


def test_export_bag_refuses_paths_that_leave_the_bag(dst: Dst, tmp_path: Path) -> None:
    row = dst.ok_row("box1/a.jpg", 1, minutes=90)
    row["output_uri"] = f"{dst.images}/../../outside.png"
    dst.add_run(RUN_2, [row])
    with pytest.raises(BagError, match="not a plain relative path"):
        export_bag(str(dst.root), str(tmp_path / "bag"), software="t")
    assert not (tmp_path / "outside.png").exists()
    assert not (tmp_path / "bag").exists()


def test_export_bag_refuses_names_validators_would_misread(dst: Dst, tmp_path: Path) -> None:
    dst.add_run(RUN_2, [dst.ok_row("box3/line%0Abreak.jpg", 4, minutes=90)])
    with pytest.raises(BagError, match="literal %0A or %0D"):
        export_bag(str(dst.root), str(tmp_path / "bag"), software="t")
    assert not (tmp_path / "bag").exists()


# --- report --------------------------------------------------------------------------------


def test_report_escapes_file_names_and_embeds_everything(
    dst: Dst, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = "box3/<script>alert('x')</script> & \"q\".jpg"
    dst.add_run(RUN_2, [dst.ok_row(hostile, 5, minutes=60)])
    out = tmp_path / "r" / "report.html"
    code, stdout, err = _run(capsys, "manifest", "report", str(dst.root), "--out", str(out))
    assert (code, err) == (0, "")
    # 4 outputs, each in all 4 samples (fewer than a sample holds), and the failure's card.
    assert stdout.startswith(f"wrote {out}: 5 sources (1 failing), 17 cards sampled, "
                             "32 thumbnails, ")  # fmt: skip
    page = out.read_text()
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;.jpg" in page
    assert page.count("<script>") == 1  # ours, allowed by its hash in the CSP
    # Nothing outside the page: no http(s), no file URLs, images only as data: URIs.
    assert "http://" not in page.replace("http://cv.iptc.org", "")
    assert "https://" not in page
    assert page.count('src="data:image/jpeg;base64,') == 32
    assert 'src="/' not in page
    assert 'loading="lazy"' in page
    assert "cannot identify image" in page


def test_report_survives_missing_files(dst: Dst, tmp_path: Path) -> None:
    dst.output("box1/a.png").unlink()
    (dst.scans / "box1/b.jpg").unlink()
    result = write_report(str(dst.root), str(tmp_path / "r.html"), software="t", workers=2)
    assert (result.sources, result.cards, result.failed) == (4, 13, 1)
    # In each of the 4 samples: a's scan, b's output, both of c's; a's output and b's scan
    # missing; the broken scan's card has no preview.
    assert result.thumbnails == 4 * 4
    assert result.placeholders == 4 * 2 + 1
    page = (tmp_path / "r.html").read_text()
    assert "output not found" in page
    assert "scan not found" in page


def test_no_manifest_error_type_is_user_facing() -> None:
    assert issubclass(BagError, ManifestToolError)


# --- Filters, paging and review states (DuckDB over the Parquet) ---------------------------


def _paths(out: str) -> list[str]:
    return [row["relative_path"] for row in json.loads(out)]


def test_show_filters_push_down(dst: Dst, capsys: pytest.CaptureFixture[str]) -> None:
    other = "other@ffffffffffff"
    dst.add_run(RUN_2, [
        dst.ok_row("box3/e.jpg", 40, minutes=60, model_id=other),
        dst.failed_row("box3/f.jpg", "DecodeTimeout", "too slow", minutes=60),
    ])  # fmt: skip

    def show(*argv: str) -> list[str]:
        code, out, err = _run(capsys, "manifest", "show", str(dst.root), "--format", "json", *argv)
        assert code == 0, err
        return _paths(out)

    assert show("--error-type", "DecodeTimeout") == ["box3/f.jpg"]
    assert show("--model", other) == ["box3/e.jpg"]
    assert show("--path", "box1/*") == ["box1/a.jpg", "box1/b.jpg"]
    assert show("--min-colourfulness", "14", "--max-colourfulness", "16") == [
        "box1/b.jpg",
        "box2/c d é.jpg",
    ]  # fmt: skip  (12.5 + seed: 14.5 and 15.5)
    assert show("--run", RUN_2, "--status", "ok") == ["box3/e.jpg"]
    # Paging: pages of two, in source order, together the whole listing exactly once.
    everything = show()
    pages = [show("--limit", "2", "--page", str(page)) for page in (1, 2, 3, 4)]
    assert [len(page) for page in pages] == [2, 2, 2, 0]
    assert [path for page in pages for path in page] == everything
    code, _, err = _run(capsys, "manifest", "show", str(dst.root), "--page", "2")
    assert (code, err.splitlines()[0]) == (
        2, "chromascan: Invalid value for '--page': --page needs --limit (the page size) "
        "(see 'chromascan manifest show --help')",
    )  # fmt: skip


def test_review_states_follow_the_current_output(
    dst: Dst, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.manifest_query import ManifestQuery
    from pipeline.review import ReviewConfig, ReviewError, create_app

    _, review = create_app(ReviewConfig(dst=str(dst.root), reviewer="Ada",
                                          cache_dir=str(tmp_path / "cache")))  # fmt: skip
    a, b, c = (str(dst.scans / name) for name in ("box1/a.jpg", "box1/b.jpg", "box2/c d é.jpg"))
    assert review.record([a, b], "approved", None) == 2
    with pytest.raises(ReviewError, match="a rejection needs a reason"):
        review.record([c], "rejected", None)
    with pytest.raises(ReviewError, match="no colourised output"):
        review.record([str(dst.scans / "box2/broken.jpg")], "approved", None)
    review.record([b], "rejected", "sky turned green")  # the latest decision counts
    review.close()
    assert len(list((dst.root / "review").glob("part-*.parquet"))) == 2  # appended, not edited

    def states() -> dict[str, str | None]:
        code, out, _ = _run(capsys, "manifest", "show", str(dst.root), "--format", "json")
        assert code == 0
        return {row["relative_path"]: row["review"] for row in json.loads(out)}

    assert states() == {"box1/a.jpg": "approved", "box1/b.jpg": "rejected",
                        "box2/c d é.jpg": "pending", "box2/broken.jpg": None}  # fmt: skip
    code, out, _ = _run(capsys, "manifest", "show", str(dst.root), "--review", "rejected",
                        "--format", "json")  # fmt: skip
    assert [(row["relative_path"], row["review_reason"]) for row in json.loads(out)] == [
        ("box1/b.jpg", "sky turned green")
    ]
    code, out, _ = _run(capsys, "manifest", "summary", str(dst.root))
    assert "review of the outputs: 1 approved, 1 rejected, 1 pending" in out.splitlines()

    # a is coloured again (new bytes, new sha256): the approval was of the old copy.
    dst.add_run(RUN_2, [dst.ok_row("box1/a.jpg", 7, minutes=60)])
    assert states()["box1/a.jpg"] == "pending"
    with ManifestQuery(str(dst.root)) as query:
        assert query.scalar("SELECT count(*) FROM decisions") == 3  # the old one is kept

    # Only b is bagged as approved once it is approved again; a (pending) and c are left out.
    _, review = create_app(ReviewConfig(dst=str(dst.root), reviewer="Ada",
                                        cache_dir=str(tmp_path / "cache")))  # fmt: skip
    review.record([b], "approved", None)
    review.close()
    code, _, err = _run(capsys, "manifest", "export-bag", str(dst.root), str(tmp_path / "bag"),
                        "--approved-only", "--engine", "threads")  # fmt: skip
    assert (code, err) == (0, "")
    bag = bagit.Bag(str(tmp_path / "bag"))
    bag.validate()
    assert sorted(bag.payload_files()) == ["data/box1/b.png"]


def test_review_refuses_exposure_without_a_token(
    dst: Dst, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "review", str(dst.root), "--reviewer", "Ada",
                          "--host", "0.0.0.0")  # fmt: skip
    assert (code, out) == (2, "")
    assert err == (
        "chromascan: Invalid value for '--host': listening on 0.0.0.0 exposes the archive to "
        "the network; give --token too (see 'chromascan review --help')\n"
    )
    code, _, err = _run(capsys, "review", str(dst.root))
    assert code == 2
    assert "give your name" in err
