"""The long fuzzing run, for local use: python -m tests.fuzz [--mutations N] [--seed S] [--scale F]

CI runs a bounded version of the same cases (tests/unit/test_fuzz.py). Exits 1 when any input
escaped the per-scan stages, was given the wrong size, or the wrong error type.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

from tests.fuzz.generators import all_cases
from tests.fuzz.harness import run


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--mutations", type=int, default=2500, help="seeded byte mutants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scale", type=float, default=1.0, help="extreme shapes' size (1.0: 1×20,000,000, ...)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)  # the stages log each unexpected traceback
    warnings.simplefilter("ignore")  # Pillow warns about every corrupt tag it skips
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="chromascan-fuzz-") as folder:
        report = run(all_cases(mutations=args.mutations, seed=args.seed, scale=args.scale),
                     Path(folder))  # fmt: skip
    print(report.text())
    print(f"{len(report.outcomes)} cases in {time.perf_counter() - started:.1f} s")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
