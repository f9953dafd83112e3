"""A cluster's faults during training: a whole node lost (a simulated cluster in its own
process), the job's driver lost (SIGKILLed, and stopped with `ray job stop`) and the same
command run again. Each stage goes on from its last checkpoint; nothing is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_head import BIN, ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_a_lost_node_costs_a_restart_from_the_last_checkpoint(synth_store, tmp_path):
    root, _ = synth_store
    short = Path(f"/tmp/bvnl{os.getpid()}")  # Ray's socket paths have a length limit
    short.mkdir(exist_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "node_loss_run.py"), str(root), str(tmp_path)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, "RAY_TMPDIR": str(short)})
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    print(res)
    assert res["killed_actors"] >= 1  # at least the lost node's training worker
    assert res["steps"] == 12  # the same step count as the undisturbed run
    assert res["stage_runs"] == 1 and res["resumed_from"] and min(res["resumed_from"]) >= 2
    # (the node is lost right after step 4's checkpoint is written: the controller may not
    # have registered it yet, and the one before it, step 2, is then the last)
    assert res["replacement"] in res["decode_nodes"]  # the decode pool formed again, there too
    assert res["replacement"] in res["train_nodes"]


@pytest.fixture(scope="module")
def head():
    """A Ray head started as a user starts one (`ray start --head`)."""
    with ray_head("bvdl") as h:
        yield h


def _alive(head) -> tuple[list[str], list[str]]:
    """What a job may leave behind (Ray's state API): its live actors and created placement
    groups. Detached actors are Ray's own services (Ray Data's per-cluster helpers, Ray
    Train's placement-group cleaner and usage collector), shared by jobs or ending in their
    own time; biovita creates none, and any of its own (named `biovita-*`) counts."""
    out = {}
    for kind, state in (("actors", "ALIVE"), ("placement-groups", "CREATED")):
        r = subprocess.run([str(BIN / "ray"), "list", kind, "--address", head["dashboard"],
                            "--filter", f"state={state}", "--format", "json", "--limit", "1000",
                            "--detail"], capture_output=True, text=True, env=head["env"], timeout=120)
        assert r.returncode == 0, r.stderr
        # an empty answer is a sentence, not JSON
        out[kind] = [] if "No resource in the cluster" in r.stdout else json.loads(r.stdout)
    return ([a.get("class_name", "") for a in out["actors"]
             if not a.get("is_detached") or (a.get("name") or "").startswith("biovita")],
            [p.get("placement_group_id", "") for p in out["placement-groups"]])


def _none_left(head, timeout: float = 60) -> tuple[list[str], list[str]]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = _alive(head)
        if not any(left):
            break
        time.sleep(2)
    return left


def _args(tmp_path, name: str) -> list[str]:
    """A job of one stage (stage 1 of a tiny model), checkpointing every 2 steps."""
    return [f"train.storage_path={tmp_path / 'runs'}", f"train.run_name={name}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.system_metrics=false",
            "stage0.enabled=false", "stage1.epochs=2", "stage1.max_steps=10", "stage1.batch_size=4",
            "stage2.phase1.epochs=0", "stage2.phase2.epochs=0", "train.checkpoint_every=2",
            "train.log_every=1", "train.cpus_per_worker=1", "data.decode_concurrency=2", "--no-bench"]


def _wait_for_step(tmp_path, name: str, step: int, proc=None, timeout: float = 300) -> None:
    path = tmp_path / "runs" / name / "progress" / "stage1.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and json.loads(path.read_text())["step"] >= step:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the job ended first: {proc.stdout.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"no checkpoint of step {step} in {timeout} s")


def _stage_runs(tmp_path, name: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("biovita").experiment_id
    parents = client.search_runs([exp], f"tags.`biovita.run_name` = '{name}'")
    children = client.search_runs([exp], "tags.`biovita.stage` = 'stage1'")
    children = [c for c in children if c.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}]
    return client, parents, children


def test_a_lost_driver_resumes_when_the_same_command_runs_again(head, synth_store, tmp_path):
    """The job's driver SIGKILLed mid-stage, then the same command again: the stage resumes
    from its last checkpoint (no step trained twice past it), in the same MLflow parent and
    stage runs, and neither run leaves an actor or placement group behind."""
    root, _ = synth_store
    cmd = [sys.executable, str(ROOT / "ray_jobs" / "train.py"), f"data.root={root}", *_args(tmp_path, "lost")]
    env = {**head["env"], "RAY_ADDRESS": head["gcs"]}
    t0 = time.time()
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=tmp_path)
    _wait_for_step(tmp_path, "lost", 4, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    killed = time.time()
    assert _none_left(head) == ([], [])  # the dead driver's actors and groups went with it
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    m = re.search(r"\[stage1\] resumed from checkpoint at step (\d+)", out)
    # killed right after step 4's checkpoint was written: Ray Train may not have registered
    # it yet, and the one before it (step 2) is then the last
    assert m and int(m.group(1)) >= 2, out[-3000:]
    client, parents, children = _stage_runs(tmp_path, "lost")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    steps = sorted(x.step for x in client.get_metric_history(children[0].info.run_id, "loss"))
    assert steps[-1] == 10 and steps.count(int(m.group(1))) == 1  # past the checkpoint: once
    assert _none_left(head) == ([], [])
    print(f"driver lost: {time.time() - killed:.0f} s from the kill to the end, "
          f"{killed - t0:.0f} s before it")


def test_a_stopped_job_resumes_when_submitted_again(head, synth_store, tmp_path):
    """`ray job stop` mid-stage, then the same `ray job submit`: resumed, nothing left behind."""
    root, _ = synth_store
    submit = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--working-dir",
              str(ROOT), "--", "python", "ray_jobs/train.py", f"data.root={root}", *_args(tmp_path, "stopped")]
    r = subprocess.run(submit[:3] + ["--no-wait"] + submit[3:], capture_output=True, text=True,
                       env=head["env"], timeout=300)
    job = re.search(r"raysubmit_\w+", r.stdout + r.stderr)
    assert r.returncode == 0 and job, r.stdout + r.stderr
    _wait_for_step(tmp_path, "stopped", 2)
    t_stop = time.time()
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", head["dashboard"], job.group(0)],
                          capture_output=True, text=True, env=head["env"], timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _none_left(head) == ([], [])
    again = subprocess.run(submit, capture_output=True, text=True, env=head["env"], timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert re.search(r"\[stage1\] resumed from checkpoint at step [2-9]", out), out[-3000:]
    _, parents, children = _stage_runs(tmp_path, "stopped")
    assert len(parents) == 1 and len(children) == 1 and children[0].info.status == "FINISHED"
    assert _none_left(head) == ([], [])
    print(f"job stopped: {time.time() - t_stop:.0f} s from the stop to the end of the resubmitted job")
