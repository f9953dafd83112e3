"""MLflow tracking: one parent run per job (or sweep, or sweep trial) and its stage runs.

Uses MlflowClient with explicit run ids, so the driver owns the runs' life cycle and rank 0 of
any worker can log into them; a resumed job finds its unfinished parent run by name.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from biovita.locations import absolute, tracking_uri

TAG_RUN_NAME = "biovita.run_name"
TAG_STAGE = "biovita.stage"
PARENT_TAG = "mlflow.parentRunId"


# MLflow 3 opens an experiment on the GenAI traces overview unless it is marked as model training
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_link(exp_id: str) -> str:
    """The UI's path to an experiment's training runs (MLflow 3.17's UI opens on its GenAI
    overview unless the link names the model-training workflow)."""
    return f"/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:"):
        # a relative default artifact root would resolve inside each Ray worker's directory
        db = Path(uri[len("sqlite:///"):])
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags=dict([EXPERIMENT_KIND]))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except Exception:
        return ""


def find_or_create_run(
    client: MlflowClient, exp_id: str, run_name: str, tags: dict[str, str], parent_id: str | None = None,
    reuse: bool = True,
) -> str:
    """The unfinished run with these tags (a resumed job), else a new one."""
    if reuse:
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        if parent_id:
            clauses.append(f"tags.`{PARENT_TAG}` = '{parent_id}'")
        for run in client.search_runs([exp_id], " and ".join(clauses), max_results=5):
            if parent_id or run.info.status != "FINISHED":
                client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id
    all_tags = dict(tags)
    if parent_id:
        all_tags[PARENT_TAG] = parent_id
    return client.create_run(exp_id, tags=all_tags, run_name=run_name).info.run_id


class RunLogger:
    """Thin, picklable logger for one MLflow run (used on the driver and on rank 0).
    `owned=False`: a run that someone else ends (a stage logging into its trial's run); a
    failure still marks it FAILED."""

    def __init__(self, uri: str, run_id: str, owned: bool = True):
        self.uri, self.run_id, self.owned = uri, run_id, owned
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "owned": self.owned, "_client": None}

    def metrics(self, values: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for k, v in values.items() if v is not None]
        if ms:
            self.client.log_batch(self.run_id, metrics=ms)

    def step_metrics(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """Scalars recorded at many steps (phase 2's gate and weights), in few requests."""
        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step) for step, values in steps for k, v in values.items()]
        for i in range(0, len(ms), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def params(self, values: dict[str, Any]) -> None:
        existing = self.client.get_run(self.run_id).data.params
        ps = [Param(k, str(v)[:6000]) for k, v in values.items() if k not in existing]
        for i in range(0, len(ps), 100):
            self.client.log_batch(self.run_id, params=ps[i:i + 100])

    def tags(self, values: dict[str, str]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, v)

    def artifact(self, path: str | os.PathLike, subdir: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), subdir)
        else:
            self.client.log_artifact(self.run_id, str(p), subdir)

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float = 10.0):
        """This machine's CPU, memory, disk, network and (with pynvml) GPU use, logged into
        the run as MLflow's `system/...` metrics while the block runs."""
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=self.uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def dataset(self, store: str, digest: str, context: str = "training") -> None:
        """The store the run read, as an MLflow dataset input (the runs table's Dataset)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        import warnings

        uri = absolute(store)
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a folder
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        ds = MetaDataset(source, name=Path(str(store).rstrip("/")).name or str(store),
                         digest=digest[:36] or None)
        self.client.log_inputs(self.run_id, [DatasetInput(ds._to_mlflow_entity(),
                                                          [InputTag("mlflow.data.context", context)])])

    def table(self, rows: list[dict], artifact_file: str) -> None:
        """Rows as an MLflow table artifact (shown and compared in the UI's Evaluation view)."""
        import pandas as pd

        self.client.log_table(self.run_id, pd.DataFrame(rows), artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        if self.owned or status != "FINISHED":
            self.client.set_terminated(self.run_id, status=status)

    @property
    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


class Tracker:
    """A parent run (a job, a sweep or one sweep trial) and the runs of its stages.

    `per_stage`: each stage gets a child run (a job); otherwise every stage logs into the
    parent itself (a trial: one run per trial). Disabled (`mlflow.enabled=false`): no runs."""

    def __init__(self, mlflow_cfg, name: str, tags: dict[str, str], parent_id: str | None = None,
                 per_stage: bool = True):
        self.enabled = mlflow_cfg.enabled
        self.uri = tracking_uri(mlflow_cfg.tracking_uri)
        self.per_stage = per_stage
        self.parent: RunLogger | None = None
        self.store: tuple[str, str] | None = None  # (store, digest) each run records as its input
        if not self.enabled:
            return
        self.client = MlflowClient(self.uri)
        self.experiment = experiment_id(self.client, mlflow_cfg.experiment, self.uri)
        self.parent = RunLogger(self.uri, find_or_create_run(self.client, self.experiment, name,
                                                             tags, parent_id=parent_id))

    @classmethod
    def for_job(cls, cfg) -> "Tracker":
        """The main job's runs: a parent named after the run, a child per stage."""
        name = cfg.train.run_name
        return cls(cfg.mlflow, name, {TAG_RUN_NAME: name, "biovita.kind": "job"})

    def record_store(self, store: str, digest: str) -> None:
        """The store every run of this tracker reads, logged as each run's dataset input."""
        self.store = (str(store), digest)
        if self.parent:
            self.parent.dataset(*self.store)

    def child(self, stage: str) -> RunLogger | None:
        if not self.enabled:
            return None
        if not self.per_stage:
            return RunLogger(self.uri, self.parent.run_id, owned=False)
        rid = find_or_create_run(self.client, self.experiment, stage, {TAG_STAGE: stage},
                                 parent_id=self.parent.run_id)
        child = RunLogger(self.uri, rid)
        if self.store:
            child.dataset(*self.store)
        return child

    def end(self, status: str = "FINISHED") -> None:
        if self.parent:
            self.parent.end(status)


__all__ = ["RunLogger", "RunStatus", "Tracker", "experiment_id",
           "find_or_create_run", "git_commit", "TAG_RUN_NAME", "TAG_STAGE"]
