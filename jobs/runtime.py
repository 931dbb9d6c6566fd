"""Connecting a job to Ray: an existing cluster when asked, else a local one on this machine."""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")


def ensure_ray(address: str | None = None, *, quiet: bool = True) -> None:
    """Initialise Ray once: ``address`` or RAY_ADDRESS if set, else a local cluster.

    ``quiet`` keeps Ray's INFO chatter and progress bars off the terminal: the CLI prints its
    own progress lines, and Ray's logs stay in its session folder for debugging.
    """
    import ray
    import ray.data

    if quiet:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or None
    ray.init(
        address=target,
        include_dashboard=False if target is None else None,
        logging_level=logging.WARNING if quiet else logging.INFO,
        log_to_driver=not quiet,
    )
