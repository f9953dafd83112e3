"""Starting or joining Ray, and what a job prints: the one place that decides both."""

from __future__ import annotations

import os
import sys


def interactive() -> bool:
    """Whether a person watches this process's output live (a terminal), as opposed to a
    log file (`ray job submit`, CI): progress bars only then, one line per event otherwise."""
    return sys.stdout.isatty()


def configure_output() -> None:
    """Ray Data progress bars for this process's passes only in a terminal: written to a
    file, each redraw is another line (~500 in one embedded run)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = interactive()


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs) -> None:
    """Join the cluster when there is one (RAY_ADDRESS / a running head), else start locally."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address == "local":  # a new local instance even where another runs (benchmarks, tests)
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
        return
    if address:
        ray.init(address=address, **kwargs)
        return
    try:
        ray.init(address="auto", **kwargs)
    except ConnectionError:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
