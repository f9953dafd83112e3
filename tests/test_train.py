"""Ray Train + DeepSpeed on a real local Ray instance (gloo on CPU), MLflow on SQLite."""

import sys
from pathlib import Path

import pytest
from ray import cloudpickle
from mlflow.tracking import MlflowClient

from biovita.config import load_config
from biovita.models.checkpoint import read_meta

pytestmark = pytest.mark.slow


def _cfg(root, tmp_path, *extra):
    return load_config(None, [
        f"data.root={root}", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.num_workers=2",
        "train.cpus_per_worker=1", "train.zero_stage=2", "train.log_every=2",
        "stage0.batch_size=8", "stage0.lr=1e-3", "stage0.images_per_species=12",
        "data.decode_concurrency=2", *extra])


def _history(cfg, stage, key):
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], f"tags.`biovita.stage` = '{stage}'")
    return runs, (client.get_metric_history(runs[0].info.run_id, key) if runs else [])


@pytest.mark.parametrize("zero", [2, 3])
def test_two_workers_zero_loss_falls_and_checkpoint_reported(ray_local, synth_store, tmp_path, zero):
    from biovita.train.driver import run_stage, save_init
    from biovita.tracking.runs import Tracker

    root, _ = synth_store
    cfg = _cfg(root, tmp_path, "stage0.epochs=6", "stage0.max_steps=12", f"train.run_name=zero{zero}",
               f"train.zero_stage={zero}")
    tracker = Tracker.for_job(cfg)
    out = run_stage(cfg, "stage0", save_init(cfg), tracker)
    runs, loss = _history(cfg, "stage0", "loss")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    values = [m.value for m in sorted(loss, key=lambda m: m.step)]
    assert len(values) >= 4 and values[-1] < values[0]
    ckpts = sorted(p for p in (Path(tmp_path) / "runs" / f"zero{zero}" / "ray" / f"zero{zero}-stage0").glob("checkpoint_*")
                   if p.is_dir())
    assert ckpts, "no Ray Train checkpoint was reported"
    shards = {p.name for p in (ckpts[-1] / "ds").iterdir()}
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards)
    assert read_meta(out)["metadata"]["step"] == 12
    assert read_meta(out)["metadata"]["taxa"]
    # stage 0 logs the scale it trains (open_clip's), not BioVITA's untouched one
    from biovita.models.checkpoint import load_biovita
    model = load_biovita(out)
    _, scale = _history(cfg, "stage0", "logit_scale")
    logged = max(scale, key=lambda m: m.step).value
    assert logged == pytest.approx(float(model.clip.logit_scale.exp()), rel=1e-5)
    assert logged != pytest.approx(float(model.logit_scale.exp()), rel=1e-4)


class KillOnce:
    """A step callback: SIGKILLs the worker of rank 1 (or 0 alone) once, at step `at`."""

    def __init__(self, at: int, marker: str):
        self.at, self.marker = at, marker

    def __call__(self, info) -> None:
        import os
        import signal
        import time

        if info.step != self.at or os.path.exists(self.marker):
            return
        if info.rank == min(1, info.world - 1):
            Path(self.marker).write_text(str(info.step))
            # Ray Train's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
            # a checkpoint reported just before a crash is lost, and the run resumes from the one
            # before it. Wait, so that the test knows which checkpoint it resumes from.
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)


# Ray workers cannot import this test module: its callback travels by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_killed_worker_resumes_from_checkpoint(ray_local, synth_store, tmp_path):
    from biovita.train.driver import run_stage, save_init
    from biovita.tracking.runs import Tracker

    root, _ = synth_store
    marker = tmp_path / "killed"
    cfg = _cfg(root, tmp_path, "stage0.epochs=6", "stage0.max_steps=10", "train.checkpoint_every=3",
               "train.max_failures=1", "train.run_name=faulty")
    out = run_stage(cfg, "stage0", save_init(cfg), Tracker.for_job(cfg),
                    step_callbacks=[KillOnce(5, str(marker))])
    assert marker.read_text() == "5"  # a worker process really was SIGKILLed at step 5
    assert read_meta(out)["metadata"]["step"] == 10  # ...and the run still ended at max_steps
    runs, steps = _history(cfg, "stage0", "loss")
    assert len(runs) == 1  # one MLflow run across the restart
    logged = sorted(m.step for m in steps)
    assert logged[-1] == 10 and 6 in logged  # logged before and after the failure
    assert logged.count(2) == 1  # steps before the checkpoint were not trained (or logged) again
    _, resumed = _history(cfg, "stage0", "resumed_from_step")
    assert [m.value for m in resumed] == [3]  # the checkpoint of step 3, not a fresh start


def test_runs_with_equal_seeds_train_alike(ray_local, synth_store, tmp_path):
    """Same config and seeds: the same initial weights, the same batches in the same order
    (two workers, ZeRO-2), so the same loss at every step and the same model."""
    import numpy as np
    from safetensors.numpy import load_file

    from biovita.train.driver import run_stage, save_init
    from biovita.tracking.runs import Tracker

    root, _ = synth_store
    losses, weights = [], []
    for name in ("first", "again"):
        cfg = _cfg(root, tmp_path / name, "stage0.epochs=2", "stage0.max_steps=6", "train.log_every=1",
                   "train.run_name=same-seed", "train.seed=3")
        out = run_stage(cfg, "stage0", save_init(cfg), Tracker.for_job(cfg))
        losses.append([(m.step, m.value) for m in sorted(_history(cfg, "stage0", "loss")[1],
                                                           key=lambda m: m.step)])
        weights.append(load_file(str(Path(out) / "model.safetensors")))
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_restarted_workers_stream_from_the_checkpoint_epoch(ray_local, synth_store, tmp_path):
    """Ray Train calls StageData at every (re)start: after a checkpoint in epoch 2 the stream
    starts at epoch 2, so finished epochs are not decoded again."""
    import json

    import ray

    from biovita.train.driver import StageData, progress_uri, resume_epoch, save_init
    from biovita.train.loop import write_progress

    root, _ = synth_store
    cfg = _cfg(root, tmp_path, "stage0.epochs=4", "train.run_name=restart")
    data = StageData(cfg, "stage0", save_init(cfg))
    epochs = lambda ds: {int(e) for b in ds.iter_batches(batch_size=256) for e in b["epoch"]}  # noqa: E731
    assert resume_epoch(cfg, "stage0") == 0 and epochs(data()) == {0, 1, 2, 3}
    write_progress(progress_uri(cfg, "stage0"), {"epoch": 2, "step": 17})
    assert json.loads(open(progress_uri(cfg, "stage0")).read()) == {"epoch": 2, "step": 17}
    assert epochs(data()) == {2, 3}
    assert ray.is_initialized()
