"""Watching a Ray Train run's checkpoints from outside it (shared by the fault tests)."""

from __future__ import annotations

import re
import time
from pathlib import Path

# Ray Train's record of the checkpoints it has registered, in the run's storage folder.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def wait_for_checkpoint(run_dir: Path, name: str, *, timeout: float = 240.0) -> None:
    """Until Ray Train has registered checkpoint ``name`` (its snapshot names it)."""
    snapshot = run_dir / SNAPSHOT
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if name in snapshot.read_text():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no {name} registered under {run_dir} after {timeout} s")


def registered_checkpoints(run_dir: Path) -> list[str]:
    """The epoch checkpoints the snapshot names, sorted."""
    return sorted(set(re.findall(r"epoch_\d{5}", (run_dir / SNAPSHOT).read_text())))
