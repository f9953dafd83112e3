"""A 2-trial Ray Tune sweep on a tiny config: MLflow parent/child runs and a best-config file
that loads and runs."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from biovita.config import load_config
from biovita.errors import ConfigError
from biovita.train.sweep import load_space

ROOT = Path(__file__).resolve().parent.parent


def _space(tmp_path, root, params, tracking=True, **extra):
    spec = {
        "base_config": "default",
        "overrides": [f"data.root={root}",
                      *([f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"] if tracking else []),
                      f"train.storage_path={tmp_path / 'runs'}", "stage0.epochs=1", "stage0.max_steps=2",
                      "stage0.batch_size=8", "stage1.epochs=1", "stage1.max_steps=4", "stage1.batch_size=4",
                      "train.log_every=1", "data.decode_concurrency=2"],
        "stages": ["stage1"], "num_samples": 2, "max_concurrent_trials": 1,
        "asha": {"grace_period": 1, "reduction_factor": 2}, "name": "tsweep",
        "storage_path": str(tmp_path / "sweeps"), "params": params, **extra}
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_bad_spaces_rejected_before_any_trial(tmp_path, synth_store):
    root, _ = synth_store
    with pytest.raises(ConfigError, match="sweep.params.stage1.lrr: not a config parameter"):
        load_space(_space(tmp_path, root, {"stage1.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}))
    with pytest.raises(ConfigError, match="empty range"):
        load_space(_space(tmp_path, root, {"stage1.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-4}}))
    with pytest.raises(ConfigError, match="empty list"):
        load_space(_space(tmp_path, root, {"stage2.lam_av_max": {"type": "choice", "values": []}}))
    with pytest.raises(ConfigError, match="invalid config"):
        load_space(_space(tmp_path, root, {"stage1.batch_size": {"type": "choice", "values": [8, -1]}}))


@pytest.mark.slow
def test_two_trial_sweep(ray_local, synth_store, tmp_path, monkeypatch):
    """Run as a user runs it, from a directory of their own with MLflow's default store: the
    trials are child runs of the sweep's parent in that store (each trial runs in a working
    directory of Tune's, where a relative store would be another one)."""
    from biovita.train.sweep import run_sweep

    root, _ = synth_store
    user = tmp_path / "user"
    user.mkdir()
    monkeypatch.chdir(user)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec, base = load_space(_space(tmp_path, root, {
        "model.init_temperature": {"type": "grid", "values": [0.05, 0.1]}}, tracking=False,
        num_samples=1, storage_path="sweeps"))
    assert spec.storage_path == str(user / "sweeps")  # made absolute on the driver
    assert base.mlflow.tracking_uri == f"sqlite:///{user / 'mlflow.db'}"
    out = run_sweep(spec, base)
    # each trial scored the shared validation set (held out of its training) for ASHA
    assert len(out["rows"]) == 2 and all(0 <= r["val/top1"] <= 1 for r in out["rows"])
    best = load_config(out["best_config"])  # loads (and validates) as a training config
    assert best.train.validation == ""
    assert best.model.init_temperature in (0.05, 0.1)
    client = MlflowClient(f"sqlite:///{user / 'mlflow.db'}")  # the store the user opens
    exp = client.get_experiment_by_name("biovita")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get("biovita.sweep") == "tsweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(trials) == 2
    for t in trials:
        assert "model.init_temperature" in t.data.params
        assert client.get_metric_history(t.info.run_id, "loss")
        assert client.get_metric_history(t.info.run_id, "val/A2I")
    assert len(client.get_metric_history(parent[0].info.run_id, "trials/val/top1")) == 2
    arts = {a.path for a in client.list_artifacts(parent[0].info.run_id)}
    assert {"best_config.yaml", "trials.png"} <= arts
    # the best config is the sweep's base with the winning values: the driver's data, storage
    # and tracking, nothing of a trial's own (a stage from it trains as any other config does)
    # (a trial's max_failures=0 once leaked into it: a final run without worker restarts)
    changed = {k for k, v in best.flat().items() if base.flat()[k] != v}
    assert changed <= {"model.init_temperature", "train.run_name", "train.validation"}, changed
    assert best.train.run_name == "tsweep-best"
