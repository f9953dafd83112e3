"""Starting or joining Ray, and what a job prints: the one place that decides both.

A job's output is for its user: biovita's own lines (progress, stage summaries, the tables,
the links) and what they can act on. Third-party messages that say nothing a user of biovita
can act on are filtered where they are made, each by its exact text and for the reason given
beside it (`NOISE`), in the driver and (`quiet_worker`, Ray's worker setup hook) in every
worker process of the job; anything else, warnings and errors included, still shows.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import sys
import threading

# (logger, start of the message): why a user of biovita can do nothing with it. The logger
# is the one that makes the record: a filter on a parent logger does not see its children's.
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
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster"):
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
    """A job driver's output: Ray Data progress bars for this process's passes only in a
    terminal (written to a file, each redraw is another line: ~500 in one embedded run), and
    where stderr is a file, Ray's C++ core lines no user can act on dropped from it."""
    import ray.data

    from biovita.ray_patches import FORWARDED_NOISE

    ray.data.DataContext.get_current().enable_progress_bars = interactive()
    if not os.isatty(2):
        filter_stderr(tuple(FORWARDED_NOISE))


_stderr_filter: tuple[int, threading.Thread, threading.Event] | None = None


def filter_stderr(noise: tuple[str, ...]) -> None:
    """Drop the lines of this process's stderr (file descriptor 2) that contain one of `noise`.

    Ray's core worker in the driver writes its C++ log lines straight to the descriptor, past
    every Python filter; Ray Data's actor pools of the driver's own passes (the frozen-tower
    cache, the benchmark's embedding) make one ERROR line each that way. A thread relays
    everything else, a partial line after 50 ms of quiet, and at exit the rest (an uncaught
    exception's traceback included) before the descriptor is given back. Once per process."""
    global _stderr_filter
    if _stderr_filter is not None:
        return
    sys.stderr.flush()
    read, write = os.pipe()
    original = os.dup(2)
    os.dup2(write, 2)
    os.close(write)
    done = threading.Event()
    marks = tuple(n.encode() for n in noise)

    def relay() -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([read], [], [], 0.05)
            chunk = os.read(read, 1 << 16) if ready else b""
            if ready and not chunk:  # every writer gone
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not any(m in line for m in marks))
            if not chunk and pending:  # quiet: a prompt or a progress bar's redraw
                out, pending = out + pending, b""
            if out:
                os.write(original, out)
            if done.is_set() and not ready:
                break
        if pending:
            os.write(original, pending)

    thread = threading.Thread(target=relay, name="biovita-stderr", daemon=True)
    thread.start()
    _stderr_filter = (original, thread, done)
    atexit.register(_restore_stderr)


def _restore_stderr() -> None:
    """Relay what is still in the pipe, then give descriptor 2 back (children that inherited
    the pipe may outlive this process: the relay stops at the first quiet moment)."""
    global _stderr_filter
    if _stderr_filter is None:
        return
    original, thread, done = _stderr_filter
    sys.stderr.flush()
    done.set()
    thread.join(timeout=5)
    os.dup2(original, 2)
    os.close(original)
    _stderr_filter = None


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs) -> None:
    """Join the cluster when there is one (RAY_ADDRESS / a running head), else start locally;
    either way with biovita's output filters in every worker of the job."""
    import ray

    if ray.is_initialized():
        return
    quiet_libraries()
    env = kwargs.pop("runtime_env", None) or {}
    address = os.environ.get("RAY_ADDRESS")
    # The cluster's address for the job's workers too: Ray Train's placement-group cleaner
    # asks Ray's state API, which otherwise finds the address itself and fails (its thread
    # dies) where a machine runs two Ray instances.
    joined = {"RAY_ADDRESS": address} if address and address not in ("local", "auto") \
        and not address.startswith("ray://") else {}
    kwargs["runtime_env"] = {**env, "worker_process_setup_hook": "biovita.runtime.quiet_worker",
                             "env_vars": {**{k: os.environ[k] for k in QUIET_ENV}, **joined,
                                          **env.get("env_vars", {})}}
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
