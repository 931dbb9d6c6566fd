"""The bounded fuzzing run: every generated and mutated scan ends as exactly one row.

The long run is ``python -m tests.fuzz`` (2,500 mutants and the full-size extreme shapes).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tests.fuzz.generators import all_cases
from tests.fuzz.harness import run


def test_nothing_escapes_the_per_scan_stages(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about every corrupt tag it skips
        report = run(all_cases(mutations=150, seed=13, scale=0.02), tmp_path)
    kinds = report.by_kind()
    # Every kind is there and ran, so a generator that broke cannot pass by producing nothing.
    assert set(kinds) == {"exif", "png", "tiff", "jpeg", "other", "mutation"}
    assert sum(kinds["exif"].values()) >= 200
    assert kinds["exif"]["ok"] == sum(kinds["exif"].values())  # bad EXIF never costs the scan
    assert not report.problems, report.text()
