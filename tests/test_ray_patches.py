"""biovita's Ray patches (`biovita/ray_patches.py`) against the Ray they were written for.
The slow-consumer backpressure (`DecodeAhead`, `IdleWait`) is tested where it acts, in
tests/test_pipeline.py."""

from biovita.data.datasets import audio_dataset
from biovita.data.decode import AudioDecodeSpec


def test_single_pass_shortens_the_executor_completion_wait(ray_local, synth_store):
    """Ray Data's loop waits up to 0.1 s for every running task; single passes lower that."""
    from ray.data._internal.execution import streaming_executor_state

    from biovita.ray_patches import COMPLETION_WAIT_S

    root, _ = synth_store
    audio_dataset(str(root), AudioDecodeSpec(mode="onset", prompts="none", stats_name=None), split=None)
    assert streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == COMPLETION_WAIT_S


def test_ray_patches_refuse_another_ray_version():
    """The Ray-internal patches were written for one Ray version: on another, importing them
    says so (and what to do) instead of misbehaving."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import ray; ray.__version__ = '9.9.9'; "
                        "import biovita.ray_patches"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "written for Ray 2.60.0; this environment has Ray 9.9.9" in r.stderr


def test_forwarded_noise_is_dropped_and_the_rest_printed():
    """The driver's printer of worker output drops the lines `FORWARDED_NOISE` names, and
    only those, through the dispatcher Ray itself uses."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from biovita.ray_patches import FORWARDED_NOISE, quiet_forwarded_lines

    printed = []
    saved = list(dispatcher.handlers)
    try:
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", lambda data: printed.append(list(data["lines"])))
        quiet_forwarded_lines()
        quiet_forwarded_lines()  # idempotent
        noise = next(iter(FORWARDED_NOISE))
        dispatcher.emit({"lines": [f"actor X {noise} ...", "[stage1] step 4"], "pid": 1})
        dispatcher.emit({"lines": [f"x {noise}"], "pid": 1})
        assert printed == [["[stage1] step 4"]]
    finally:
        dispatcher.handlers = saved


def test_the_drivers_stderr_drops_the_noise_and_keeps_the_rest():
    """Ray's core worker writes its C++ lines to descriptor 2, past Python's filters: the
    filter drops exactly the noisy ones; other lines, a partial line and the traceback of an
    uncaught exception still reach the file, in order."""
    import subprocess
    import sys

    code = ("import os, sys, time\n"
            "from biovita.runtime import filter_stderr\n"
            "filter_stderr(('has constructor arguments',))\n"
            "os.write(2, b'[E core_worker.cc] actor has constructor arguments in the store\\n')\n"
            "os.write(2, b'kept 1\\n')\n"
            "print('kept 2', file=sys.stderr, flush=True)\n"
            "os.write(2, b'partial')\n"
            "time.sleep(0.3)\n"
            "os.write(2, b' line\\n')\n"
            "raise SystemExit(sys.argv[1] if len(sys.argv) > 1 else 'the real error')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr == "kept 1\nkept 2\npartial line\nthe real error\n"


def test_the_raylets_messages_to_the_job_drop_the_noise(capsys):
    """The raylet's messages to a job (printed by Ray's error listener, not the dispatcher):
    its start-up concurrency warning is dropped, anything else still printed."""
    from ray._private import worker

    from biovita.ray_patches import quiet_forwarded_lines

    quiet_forwarded_lines()
    noise = ("WARNING: 8 PYTHON worker processes have been started on node: ab12 with address: "
             "10.0.0.1, which is 4x the maximum expected startup concurrency (2). This could be ...")
    for line in (noise, "A worker died or was killed while executing a task"):
        worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "A worker died" in out and "startup concurrency" not in out
