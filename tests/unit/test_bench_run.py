"""bench run without Ray: size parsing, the bottleneck and projection arithmetic, bad flags."""

from __future__ import annotations

import pytest

from jobs.bench_run import BenchReport, EndToEnd, StageRate, parse_size, report_lines
from jobs.cli import main


@pytest.mark.parametrize(
    ("text", "size"), [("512x384", (512, 384)), ("6000×4000", (6000, 4000)), (" 8 X 6 ", (8, 6))]
)
def test_parse_size(text: str, size: tuple[int, int]) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "512", "512x", "-1x10", "1.5x2", "0x10", "10x0"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--size", "0x10"],
            "chromascan: Invalid value for '--size': size '0x10': width and height must both be "
            "at least 1 (see 'chromascan bench run --help')",
        ),
        (
            ["--size", "abc"],
            "chromascan: Invalid value for '--size': size 'abc' is not WIDTHxHEIGHT, e.g. 512x384 "
            "or 6000x4000 (see 'chromascan bench run --help')",
        ),
        (
            ["--bits", "12"],
            "chromascan: Invalid value for '--bits': bits must be 8 or 16, got 12 "
            "(see 'chromascan bench run --help')",
        ),
        (
            ["-p", "int3"],
            "chromascan: Invalid value for '--precision': unknown precision 'int3'; choose from "
            "auto, fp32, bf16, fp16 (see 'chromascan bench run --help')",
        ),
    ],
)
def test_bad_flags_are_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["bench", "run", *argv])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip() == message
    assert captured.out == ""


def _report() -> BenchReport:
    # 10 images; prepare 100/s, model fp32 5/s and bf16 10/s on one 1-CPU actor, finalize 4/s,
    # on a 4-CPU cluster.
    stages = [
        StageRate("prepare", None, 10, 0.1, workers=4, cpus_per_worker=1.0),
        StageRate("model", "fp32", 10, 2.0, workers=1, cpus_per_worker=1.0),
        StageRate("model", "bf16", 10, 1.0, workers=1, cpus_per_worker=1.0),
        StageRate("finalize", None, 10, 2.5, workers=4, cpus_per_worker=1.0),
    ]
    return BenchReport(
        width=6000, height=4000, bits=16, images=10, cluster_cpus=4, cluster_gpus=0, actors=1,
        batch_size=8, stages=stages, end_to_end=EndToEnd("bf16", 10, 5.0, None),
        scans=3_000_000,
    )  # fmt: skip


def test_bottleneck_and_estimate_use_the_end_to_end_precision() -> None:
    report = _report()
    assert report.bottleneck.stage == "model"
    assert report.bottleneck.precision == "bf16"
    assert report.bottleneck.cluster_images_per_s == pytest.approx(10.0)
    # CPU-seconds per image: 0.01 + 0.1 + 0.25 = 0.36, so 4 CPUs bound the run at 11.1/s.
    assert report.cpu_bound_images_per_s == pytest.approx(4 / 0.36)
    assert report.estimate_images_per_s == pytest.approx(10.0)
    assert report.hours(2.0) == pytest.approx(3_000_000 / 2 / 3600)


def test_the_shared_cpus_can_be_the_limit() -> None:
    report = _report()
    report = BenchReport(**{**report.__dict__, "cluster_cpus": 2})
    # Every stage's worker ceiling is still at least 10/s, but 2 CPUs give 2 / 0.36 = 5.6/s.
    assert report.estimate_images_per_s == pytest.approx(2 / 0.36)


def test_report_lines_and_json_name_every_stage() -> None:
    report = _report()
    text = "\n".join(report_lines(report))
    for name in ("prepare", "model fp32", "model bf16", "finalize", "end to end (bf16)"):
        assert name in text
    assert "bottleneck: model bf16 at 10.00 images/s" in text
    # End to end 10 images in 5 s: 2/s.
    assert "projection: 3,000,000 scans of 6000×4000 at this rate: 416.7 hours" in text
    document = report.as_dict()
    assert [s["stage"] for s in document["stages"]] == ["prepare", "model", "model", "finalize"]
    assert document["projection"]["hours_at_estimate"] == pytest.approx(3_000_000 / 10 / 3600)


def test_the_earlier_finalize_is_a_side_by_side_figure_not_the_estimate() -> None:
    report = _report()
    assert report.estimate_before_images_per_s is None
    assert "before pipeline.png" not in "\n".join(report_lines(report))
    slow = StageRate("finalize", "before", 10, 10.0, workers=4, cpus_per_worker=1.0)
    report = BenchReport(**{**report.__dict__, "stages": [*report.stages, slow]})
    # The estimate is the run's own: bf16 model at 10/s, as before the earlier finalize was added.
    assert report.estimate_images_per_s == pytest.approx(10.0)
    assert report.bottleneck.precision == "bf16"
    # With it: finalize 1 CPU-s per image, so 4 / (0.01 + 0.1 + 1.0) = 3.6/s bounds the run.
    assert report.estimate_before_images_per_s == pytest.approx(4 / 1.11)
    text = "\n".join(report_lines(report))
    assert "finalize CPU s/img 1.000 -> 0.250" in text  # before -> after
    assert report.as_dict()["projection"]["hours_at_estimate_before"] == pytest.approx(
        3_000_000 / (4 / 1.11) / 3600
    )


def test_peak_rss_is_read_for_a_live_process_only() -> None:
    import os
    import resource

    from jobs.bench_memory import peak_rss_mib

    peak = peak_rss_mib(os.getpid())
    # VmHWM and ru_maxrss are the same kernel counter, in kB both.
    assert peak == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.1)
    assert peak_rss_mib(2**22 + 1) is None  # above the kernel's largest pid
