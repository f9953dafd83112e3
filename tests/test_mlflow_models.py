"""MLflow as users expect it: a run records its store as a dataset input and system metrics;
a trained model is logged as a pyfunc (files in, taxa and embeddings out) and registered with
its benchmark metrics; the experiment opens in the model-training view; and the real MLflow
UI, in headless Chromium, shows the run, its dataset and its model."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from biovita.data.store import read_table

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def logged(synth_store, tiny_model, tmp_path_factory):
    """A job-like parent run: the store as input, system metrics, and the model logged."""
    from mlflow.tracking import MlflowClient

    from biovita.config import load_config
    from biovita.models.checkpoint import save_model
    from biovita.tracking.pyfunc import log_model
    from biovita.tracking.runs import Tracker

    root, _ = synth_store
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    taxa = read_table(root, "taxa", ["class", "order", "family", "genus", "scientific_name",
                                     "common_name"]).to_pylist()
    ckpt = tmp / "model"
    save_model(tiny_model, ckpt, metadata={"taxa": taxa})
    cfg = load_config(None, [f"mlflow.tracking_uri={uri}", "train.run_name=ui-check"])
    tracker = Tracker.for_job(cfg)
    tracker.record_store(str(root), "f" * 40)
    with tracker.parent.system_metrics(interval_s=0.5):
        time.sleep(2.0)
    tracker.parent.table([{"direction": "A2T", "level": "species", "top1": 0.5}], "bench/results_table.json")
    version = log_model(tracker.parent.run_id, uri, str(ckpt), {"bench_species_avg_top1": 0.5})
    tracker.end()
    return uri, tmp, tracker.parent.run_id, version, MlflowClient(uri), root


def test_run_has_dataset_system_metrics_table_and_registered_model(logged, synth_store):
    import mlflow.pyfunc
    import pandas as pd

    uri, tmp, run_id, version, client, root = logged
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == Path(root).name
    assert inputs[0].tags[0].value == "training"
    assert any(k.startswith("system/cpu_utilization_percentage") for k in run.data.metrics)
    assert {a.path for a in client.list_artifacts(run_id, "bench")} == {"bench/results_table.json"}
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert (version.name, str(version.version)) == ("biovita", "1")
    mv = client.get_model_version("biovita", "1")
    assert mv.run_id == run_id and mv.tags["bench_species_avg_top1"] == "0.5000"
    # the registered model predicts from files, as `biovita predict` does
    wav = tmp / "call.wav"
    wav.write_bytes(next(r["bytes"] for r in read_table(root, "audio", ["id", "bytes", "format"]).to_pylist()
                         if r["format"] == "wav" and not r["id"].startswith("bad")))
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/biovita/1")
    out = model.predict(pd.DataFrame({"path": [str(wav)]}), params={"rank": "genus", "k": 3})
    assert list(out["rank"]) == [1, 2, 3] and out["probability"].is_monotonic_decreasing
    from biovita.predict import Predictor

    want = Predictor(str(tmp / "model")).predict([str(wav)], rank="genus", k=3)
    assert list(out["genus"]) == [w["genus"] for w in want]
    assert len(out["embedding"][0]) == len(Predictor(str(tmp / "model")).embed_file(wav)[1])


def test_mlflow_ui_shows_run_dataset_and_model(logged, chromium):
    from selenium.webdriver.support.ui import WebDriverWait

    from biovita.tracking.runs import experiment_link

    uri, tmp, run_id, _, client, root = logged
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
    browser = chromium
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except Exception:
                time.sleep(1)
        exp_id = client.get_run(run_id).info.experiment_id

        def text_has(*words):
            def check(b):
                t = b.execute_script("return document.body.innerText")
                (ROOT / "test-artifacts").mkdir(exist_ok=True)
                (ROOT / "test-artifacts" / "mlflow_text.txt").write_text(b.current_url + "\n" + t)
                return all(w in t for w in words)
            return check

        # the link the job prints: the experiment in the model-training view
        browser.get(base + experiment_link(exp_id))
        WebDriverWait(browser, 90).until(text_has("ui-check", Path(root).name))  # run and dataset
        assert "Token Usage" not in browser.execute_script("return document.body.innerText")
        browser.get(f"{base}/#/experiments/{exp_id}/runs/{run_id}?workflowType=machine_learning")
        WebDriverWait(browser, 90).until(text_has(Path(root).name, "Logged models (1)", "System metrics"))
        page = browser.execute_script("return document.body.innerText")
        assert "biovita\nv1" in page  # the model, registered
        (ROOT / "test-artifacts").mkdir(exist_ok=True)
        browser.save_screenshot(str(ROOT / "test-artifacts" / "mlflow_run.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)
