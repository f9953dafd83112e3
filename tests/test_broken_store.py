"""Damaged stores and checkpoints: a Parquet shard cut short, a shard of another schema, a table
that is absent, a checkpoint file cut short. Each is named with why; what can be skipped is
skipped and counted; what cannot is refused before Ray starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray import cloudpickle

from biovita.data.store import table_files
from biovita.data.validate import check_store

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def copy(synth_store, tmp_path):
    root, _ = synth_store
    out = tmp_path / "store"
    shutil.copytree(root, out, ignore=shutil.ignore_patterns("_embeddings"))
    return out


def _truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def _foreign_shard(table_dir: Path) -> Path:
    """A shard another tool wrote: a path and a label, nothing of the store's schema."""
    path = table_dir / "part-99999.parquet"
    pq.write_table(pa.table({"path": ["a.jpg"], "label": [3]}), path)
    return path


def test_damage_is_named_with_why(copy):
    cut = table_files(copy, "audio")[1]
    _truncate(cut)
    foreign = _foreign_shard(copy / "image")
    shutil.rmtree(copy / "taxa")
    health = check_store(str(copy))
    assert health.absent == ["taxa"]
    assert list(health.truncated) == [cut] and "truncated or not Parquet" in health.truncated[cut]
    assert list(health.schema) == [str(foreign)] and "missing column 'id'" in health.schema[str(foreign)]
    lines = health.lines()
    assert any(line.startswith("taxa: absent") for line in lines)
    assert any(line.startswith(cut) for line in lines) and any(line.startswith(str(foreign)) for line in lines)


def test_validate_cli_names_each_damaged_file_and_passes_an_audio_only_store(ray_local, copy, tmp_path):
    """`biovita validate`: a damaged store exits 1 naming each file; a store with no image
    table (what `biovita fetch` makes from a clip list alone) is whole and exits 0."""
    cut = table_files(copy, "audio")[0]
    _truncate(cut)
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "validate", str(copy)], capture_output=True,
                       text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 1 and f"store: {cut}: truncated or not Parquet" in r.stdout, r.stdout + r.stderr
    assert "audio: good" in r.stdout  # the readable shards are still decoded and counted
    audio_only = tmp_path / "audio_only"
    shutil.copytree(copy, audio_only)
    shutil.rmtree(audio_only / "image")
    Path(cut.replace(str(copy), str(audio_only))).unlink()
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "validate", str(audio_only)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "store: image: absent" in r.stdout and "audio: good" in r.stdout


def test_training_refuses_a_store_of_another_schema_before_ray_starts(copy, tmp_path):
    foreign = _foreign_shard(copy / "audio")
    r = subprocess.run([sys.executable, str(ROOT / "ray_jobs" / "train.py"), f"data.root={copy}",
                        f"train.storage_path={tmp_path / 'runs'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("store error: the store at") and f"{foreign}: schema: missing column" in r.stderr
    assert "Ray" not in r.stdout + r.stderr  # refused before Ray started
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "embed", "tiny", "--data", str(copy),
                        "--out", str(tmp_path / "e.parquet")], capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and "biovita embed: error: the store at" in r.stderr


def _cfg(root, tmp_path, *extra):
    from biovita.config import load_config

    return load_config(None, [
        f"data.root={root}", f"train.storage_path={tmp_path / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.num_workers=1",
        "train.cpus_per_worker=1", "train.log_every=1", "stage1.batch_size=4", "stage0.batch_size=8",
        "data.decode_concurrency=2", *extra])


@pytest.mark.slow
def test_a_truncated_shard_is_skipped_and_counted_not_fatal(ray_local, copy, tmp_path):
    from biovita.train.driver import run_stage, save_init
    from biovita.train.job import check_data
    from biovita.tracking.runs import Tracker

    cut = table_files(copy, "audio")[1]
    cut_ids = set(pq.read_table(cut, columns=["id"]).column("id").to_pylist())
    _truncate(cut)
    cfg = _cfg(copy, tmp_path, "stage1.epochs=1", "stage1.max_steps=3", "train.run_name=cut")
    health = check_data(cfg, bench=False)  # what the job logs into its run
    assert health.skipped_counts() == {"skipped/store/audio/truncated": 1}
    out = run_stage(cfg, "stage1", save_init(cfg), Tracker.for_job(cfg))
    from biovita.models.checkpoint import read_meta

    assert read_meta(out)["metadata"]["step"] == 3
    from biovita.train.driver import stage_plans
    from biovita.train.stages import STAGE1

    planned = {i for p in stage_plans(cfg, STAGE1) for i in p}
    assert planned and not planned & cut_ids  # nothing of the cut shard was planned


class DamageThenKill:
    """A step callback: at `at`, cut the newest persisted checkpoint's model file short, then
    SIGKILL the worker (after Ray Train's controller has the step-4 checkpoint)."""

    def __init__(self, at: int, folder: str, marker: str):
        self.at, self.folder, self.marker = at, folder, marker

    def __call__(self, info) -> None:
        import os
        import signal
        import time

        if info.step != self.at or os.path.exists(self.marker):
            return
        time.sleep(5)  # the controller collects reports every 2 s
        newest = sorted(p for p in Path(self.folder).glob("checkpoint_*") if p.is_dir())[-1]
        model = next(newest.rglob("mp_rank_00_model_states.pt"))
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
        Path(self.marker).write_text(newest.name)
        os.kill(os.getpid(), signal.SIGKILL)


cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_reported_and_the_one_before_used(ray_local, synth_store,
                                                                        tmp_path):
    from mlflow.tracking import MlflowClient

    from biovita.models.checkpoint import read_meta
    from biovita.train.driver import run_dir, run_stage, save_init
    from biovita.tracking.runs import Tracker

    root, _ = synth_store
    marker = tmp_path / "damaged"
    cfg = _cfg(root, tmp_path, "stage0.epochs=6", "stage0.max_steps=7", "train.checkpoint_every=2",
               "train.keep_checkpoints=3", "train.max_failures=1", "train.run_name=damaged")
    folder = f"{run_dir(cfg)}/ray/damaged-stage0"
    out = run_stage(cfg, "stage0", save_init(cfg), Tracker.for_job(cfg),
                    step_callbacks=[DamageThenKill(5, folder, str(marker))])
    assert marker.exists() and read_meta(out)["metadata"]["step"] == 7
    client = MlflowClient(cfg.mlflow.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("biovita").experiment_id],
                             "tags.`biovita.stage` = 'stage0'")[0]
    resumed = client.get_metric_history(run.info.run_id, "resumed_from_step")
    damaged = client.get_metric_history(run.info.run_id, "damaged_checkpoints")
    assert [m.value for m in resumed] == [2] and [m.value for m in damaged] == [1]
