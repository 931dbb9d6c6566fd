"""chromascan bench run on the shared local Ray cluster, with a tiny model and tiny scans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from jobs.bench_run import write_samples
from jobs.cli import main
from models.config import GeneratorConfig
from models.networks import UNetGenerator, init_weights
from pipeline.model_store import save_model

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(width=4, depth=5, image_size=32))
    init_weights(generator)
    folder = tmp_path_factory.mktemp("bench-model")
    save_model(generator, str(folder), name="bench-tiny")
    return str(folder)


def test_bench_run_prints_stages_bottleneck_and_projection(
    capsys: pytest.CaptureFixture[str], tiny_model: str
) -> None:
    code = main(["bench", "run", "-m", tiny_model, "--images", "4", "--size", "64x48",
                 "--scans", "1000"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    for stage in ("prepare ", "model fp32 ", "model bf16 ", "finalize "):
        assert any(line.startswith(stage) for line in captured.out.splitlines()), stage
    assert "end to end (" in captured.out
    assert "bottleneck: " in captured.out
    assert "projection: 1,000 scans of 64×48 at this rate: " in captured.out
    # Progress goes to stderr, one line per step, so stdout stays the report alone.
    assert "bench: prepare: 4 images on one worker ..." in captured.err
    assert "bench: end to end: 4/4 in " in captured.err


def test_bench_run_json_has_the_fields(
    capsys: pytest.CaptureFixture[str], tiny_model: str, tmp_path: Path
) -> None:
    # Given scans (--src): the report describes what was decoded, here 16-bit TIFFs.
    src = tmp_path / "scans"
    write_samples(str(src), 3, width=40, height=30, bits=16)
    code = main(["bench", "run", "-m", tiny_model, "--src", str(src), "-p", "fp32", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["size"] == {"width": 40, "height": 30, "bits": 16}
    assert report["images"] == 3
    # finalize twice, side by side: with the writers before pipeline.png, then as it runs now
    assert [(s["stage"], s["precision"]) for s in report["stages"]] == [
        ("prepare", None), ("model", "fp32"), ("finalize", "before"), ("finalize", None)
    ]  # fmt: skip
    assert report["projection"]["hours_at_estimate_before"] > 0
    for stage in report["stages"]:
        assert stage["single_worker_images_per_s"] > 0
        assert stage["cluster_images_per_s"] == pytest.approx(
            stage["single_worker_images_per_s"] * stage["workers"]
        )
    assert report["cluster"]["cpus"] >= 1
    assert report["bottleneck"]["stage"] in {"prepare", "model", "finalize"}
    assert report["end_to_end"]["precision"] == "fp32"
    assert report["end_to_end"]["images"] == 3
    assert report["projection"]["scans"] == 3_000_000
    assert report["projection"]["hours_at_end_to_end"] > 0
    assert report["projection"]["hours_at_estimate"] > 0
    assert "cluster rate = single-worker rate x workers" in report["method"]


def test_worker_peaks_are_this_clusters_workers() -> None:
    import os

    import ray

    from jobs.bench_memory import WorkerPeaks, peak_rss_mib, raylet_worker_pids

    @ray.remote(num_cpus=1)
    def worker_pid() -> int:
        return os.getpid()

    pid = ray.get(worker_pid.remote())
    assert pid in raylet_worker_pids()
    assert os.getpid() not in raylet_worker_pids()  # the driver is not a raylet child
    with WorkerPeaks() as peaks:
        pass
    assert peaks.peaks[pid] == pytest.approx(peak_rss_mib(pid), rel=0.5)
    assert peaks.peaks[pid] > 10  # a Python worker with Ray loaded is tens of MiB at least
