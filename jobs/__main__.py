"""``python -m jobs`` and the ``chromascan`` console script."""

from __future__ import annotations

import sys

from jobs.cli import main


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
