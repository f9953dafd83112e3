"""Every change biovita makes to Ray's internals, in one place, for one Ray version.

Each patch goes in through a public hook where Ray has one (`DataContext.set_config`, execution
callbacks) but relies on internal classes or constants; `tests/test_ray_patches.py` fails when
a Ray upgrade changes the behaviour patched. Importing this module on another Ray version
raises with what to do.
"""

from __future__ import annotations

import time

import ray

RAY_VERSION = "2.60.0"
if ray.__version__ != RAY_VERSION:
    raise ImportError(
        f"biovita's Ray patches (biovita/ray_patches.py) were written for Ray "
        f"{RAY_VERSION}; this environment has Ray {ray.__version__}. Install ray=={RAY_VERSION} "
        "(the pin in pyproject.toml), or port the patches and their tests to the new version.")


from ray._private import worker as ray_worker  # noqa: E402
from ray._private.ray_logging import global_worker_stdstream_dispatcher  # noqa: E402
from ray.data._internal.execution import streaming_executor_state  # noqa: E402
from ray.data._internal.execution.backpressure_policy import (  # noqa: E402
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    BackpressurePolicy,
    DownstreamCapacityBackpressurePolicy,
)
from ray.data._internal.execution.execution_callback import ExecutionCallback  # noqa: E402
from ray.data._internal.execution.operators.map_operator import MapOperator  # noqa: E402

DECODE_AHEAD_KEY = "biovita.decode_ahead_bytes"


class DecodeAhead(BackpressurePolicy):
    """Hold back new decode tasks while decoded, not yet consumed data (queued in the
    dataset and prefetched by its consumers) exceeds `decode_ahead_bytes`; never hold back
    reading the outputs of finished tasks.

    Replaces Ray Data's downstream-capacity policy, which also stops reading finished
    outputs: those tasks then stay ready, `ray.wait` in the executor's loop returns at once,
    and the loop spins on a full core for as long as the consumer is slower than decoding
    (measured: the SplitCoordinator at ~90% CPU on 2 cores, the trainer beside it slowed
    3-6x). That policy also bounded nothing when the consumer was a plain iterator."""

    def can_add_input(self, op) -> bool:
        limit = self._data_context.get_config(DECODE_AHEAD_KEY)
        if limit is None or not isinstance(op, MapOperator):
            return True
        rm = self._resource_manager
        return rm.get_global_usage().object_store_memory + rm.get_external_consumer_bytes() < limit


class IdleWait(ExecutionCallback):
    """Sleep a scheduling-loop step that had no task to wait for.

    Ray Data's loop blocks only in `ray.wait` on running tasks; while dispatch is held back
    and no task runs (the consumer is slower than decoding, the common case when training
    on CPU) it would spin on a full core."""

    SLEEP_S = 0.05

    def on_execution_step(self, executor) -> None:
        if not any(op.get_active_tasks() for op in executor._topology):
            time.sleep(self.SLEEP_S)


BACKPRESSURE_POLICIES = [p for p in ENABLED_BACKPRESSURE_POLICIES
                         if p is not DownstreamCapacityBackpressurePolicy] + [DecodeAhead]


def bound_decoding(context, ahead_bytes: int) -> None:
    """A dataset's context: decode at most `ahead_bytes` ahead of its consumer, without the
    executor spinning while it waits."""
    # Ray Data's per-operator resource reservation counts the CPU-less input operator as a
    # claimant: the decode operator then ran ~1.4 tasks on 2 CPUs. The pool size bounds the
    # decoders instead, and `DecodeAhead` how far they run ahead of the consumer.
    context.op_resource_reservation_enabled = False
    context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, BACKPRESSURE_POLICIES)
    context.set_config(DECODE_AHEAD_KEY, int(ahead_bytes))
    context.custom_execution_callback_classes = [IdleWait]


COMPLETION_WAIT_S = 0.02


def shorten_completion_wait() -> None:
    """Let the Ray Data executors of this process hand out the next decode task within 20 ms
    of one finishing, not 100 ms.

    Its loop blocks in `ray.wait(<every running task>, timeout=0.1)`, which returns early only
    when all of them are done, and a task takes two loop steps to retire (its block, then its
    end). With two decode tasks of ~0.3 s on two CPUs each worker sat idle ~170 ms between
    tasks: a third of the CPU (measured; 128 -> 157 clips/s with 20 ms). It is a module
    constant, so it applies to every executor this process runs: single passes run on the
    driver; training streams run in Ray Train's split coordinator (another process) on actor
    pools, which queue a second task per actor and never had the gap. The loop itself costs
    little per step (driver CPU 0.26 -> 0.29 s a pass)."""
    name = "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"
    current = getattr(streaming_executor_state, name)
    setattr(streaming_executor_state, name, min(current, COMPLETION_WAIT_S))


# Lines worker processes print that no logging filter reaches (C++ core logs, prints), each
# with why a user of biovita can do nothing with it; dropped from what the driver prints of
# its workers' output (they stay in the workers' log files) and, where a job's driver writes
# to a file, from its own stderr (`runtime.filter_stderr`).
FORWARDED_NOISE = {
    "has constructor arguments in the object store and max_restarts > 0":
        "Ray's core worker logs it at ERROR for every Ray Data actor pool and Ray Train's "
        "preemption watcher, which it creates itself",
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully":
        "DeepSpeed's CPU collectives loaded from the JIT cache",
    "x the maximum expected startup concurrency (":
        "the raylet compares the worker processes starting at once with the node's CPU count; "
        "on a 2-core machine the benchmark's embedding pools exceed it, and only start slower",
    "Reporting training result ":
        "Ray Train logs every report's metrics at INFO, under a logger named by its file's path "
        "that its LoggingConfig does not reach; the progress line and MLflow carry the numbers",
}


def _quiet(data: dict) -> dict:
    lines = [line for line in data.get("lines", []) if not any(n in line for n in FORWARDED_NOISE)]
    return {**data, "lines": lines}


def quiet_forwarded_lines() -> None:
    """Replace this driver's printers of what other processes send it by ones that drop
    `FORWARDED_NOISE`: its workers' output (a no-op where the driver does not print it,
    `log_to_driver=False`), and the raylet's and GCS's messages to the job (a node's warning
    on worker start-up), which Ray prints from another thread through the module's printer."""
    handlers = dict(global_worker_stdstream_dispatcher.handlers)
    printer = handlers.get("ray_print_logs")
    if printer is not None and not getattr(printer, "biovita_quiet", False):
        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
        global_worker_stdstream_dispatcher.add_handler("ray_print_logs", _quiet_printer(printer))
    if not getattr(ray_worker.print_to_stdstream, "biovita_quiet", False):
        ray_worker.print_to_stdstream = _quiet_printer(ray_worker.print_to_stdstream)


def _quiet_printer(printer):
    def quiet_printer(data: dict, **kwargs) -> None:
        data = _quiet(data)
        if data["lines"]:
            printer(data, **kwargs)

    quiet_printer.biovita_quiet = True
    return quiet_printer
