"""Starting or joining Ray, and what a job prints: the one place that decides both.

A job's output is for its user: biovita's own lines (progress, stage summaries, the tables,
the links) and what they can act on. Third-party messages that say nothing a user of biovita
can act on are filtered where they are made, each by its exact text and for the reason given
beside it (`NOISE`), in the driver and (`quiet_worker`, Ray's worker setup hook) in every
worker process of the job; anything else, warnings and errors included, still shows.
"""

from __future__ import annotations

import logging
import os
import sys

# (logger, start of the message): why a user of biovita can do nothing with it
NOISE = {
    ("DeepSpeed", "Setting accelerator to CPU"):
        "processes that run no DeepSpeed engine (the driver, Ray Train's controller) import it; "
        "the training workers get DS_ACCELERATOR set",
    ("DeepSpeed", "**** You are using ZeRO with an untested optimizer"):
        "biovita's StagedAdamW is torch's AdamW, skipping the groups that have not started",
    ("torch.utils.cpp_extension", "No CUDA runtime is found"):
        "DeepSpeed's CPU collectives build on a machine without CUDA, as they should",
    ("ray.data._internal.progress", "Progress bars disabled"):
        "off on purpose where output goes to a file; the trainer's progress line reports the stream",
    ("ray", "Token authentication is enabled for this Ray cluster"):
        "the local instance's token is Ray's own; a cluster's client sets RAY_AUTH_MODE (docs/cluster.md)",
    ("mlflow.pyfunc", "Passing a Python object as `python_model`"):
        "the model class is biovita's own, and its code travels with the model (code_paths)",
}
# Loggers whose INFO lines narrate a library's own steps (a dataset's execution plan, MLflow
# creating its tables): warnings and errors still show. Ray Data sets its loggers' level
# again each time a worker runs a dataset, except where RAY_DATA_LOG_LEVEL says it.
NARRATORS = ("ray.data", "mlflow.store.db.utils", "mlflow.tracking._model_registry")
QUIET_ENV = {"RAY_DATA_LOG_LEVEL": "WARNING"}


class _Drop(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(self.starts)


def quiet_libraries() -> None:
    """Install the filters of `NOISE` and quiet the `NARRATORS` in this process."""
    by_logger: dict[str, list[str]] = {}
    for (name, start), _why in NOISE.items():
        by_logger.setdefault(name, []).append(start)
    for name, starts in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(tuple(starts)))
            for handler in logger.handlers:  # (a logger's own handlers see records first)
                handler.addFilter(_Drop(tuple(starts)))
    for name in NARRATORS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for k, v in QUIET_ENV.items():  # a user's own setting wins
        os.environ.setdefault(k, v)
    # an input example would be a media file that exists only on the machine that logs it
    import warnings

    warnings.filterwarnings("ignore", message=r".*An input example was not provided.*")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a file, not a terminal


def quiet_worker() -> None:
    """Ray's `worker_process_setup_hook`: the same filters in every worker of the job."""
    quiet_libraries()


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
    """Join the cluster when there is one (RAY_ADDRESS / a running head), else start locally;
    either way with biovita's output filters in every worker of the job."""
    import ray

    if ray.is_initialized():
        return
    quiet_libraries()
    env = kwargs.pop("runtime_env", None) or {}
    kwargs["runtime_env"] = {**env, "worker_process_setup_hook": "biovita.runtime.quiet_worker",
                             "env_vars": {**{k: os.environ[k] for k in QUIET_ENV}, **env.get("env_vars", {})}}
    address = os.environ.get("RAY_ADDRESS")
    if address == "local":  # a new local instance even where another runs (benchmarks, tests)
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
    elif address:
        ray.init(address=address, **kwargs)
    else:
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
    from biovita.ray_patches import quiet_forwarded_lines

    quiet_forwarded_lines()
