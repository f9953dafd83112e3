"""Datasets, checkpoints and MLflow artifacts on s3:// against a real local S3-compatible
server (moto in server mode, the `s3` fixture). Nothing of pyarrow or Ray is mocked."""

import pytest

from biovita.data.store import exists, path_exists, read_table, table_files, upload_dir

pytestmark = pytest.mark.slow


def test_store_on_s3_streams_through_ray_data(s3, ray_local, synth_store):
    from biovita.data.datasets import audio_dataset
    from biovita.data.decode import AudioDecodeSpec
    from biovita.data.stats import bad_media_counts, media_stats

    root, manifest = synth_store
    uri = "s3://biovita/store"
    for table in ("audio", "image", "taxa"):
        upload_dir(root / table, f"{uri}/{table}")
    assert exists(uri) and len(table_files(uri, "audio")) == len(table_files(root, "audio"))
    assert read_table(uri, "taxa").num_rows == manifest["n_species"]
    media_stats("s3-stats")
    ds = audio_dataset(uri, AudioDecodeSpec(mode="onset", prompts="none", stats_name="s3-stats"), split=None)
    n = sum(len(b["id"]) for b in ds.iter_batches(batch_size=64))
    assert n == manifest["audio_rows"] - sum(manifest["corrupt"]["audio"].values())
    assert bad_media_counts("s3-stats")["bad"]["audio"] == manifest["corrupt"]["audio"]


def test_checkpoints_and_models_on_s3(s3, ray_local, synth_store, tmp_path):
    from biovita.config import load_config
    from biovita.models.checkpoint import load_model
    from biovita.data.store import fetch_dir
    from biovita.train.driver import run_stage, save_init
    from biovita.tracking.runs import Tracker

    root, _ = synth_store
    cfg = load_config(None, [f"data.root={root}", "train.storage_path=s3://biovita/runs",
                             "train.run_name=s3run", "stage0.max_steps=3", "stage0.batch_size=8",
                             "train.checkpoint_every=2", "mlflow.enabled=false",
                             "data.decode_concurrency=2"])
    out = run_stage(cfg, "stage0", save_init(cfg), Tracker.for_job(cfg))
    assert out == "s3://biovita/runs/s3run/models/stage0"
    assert path_exists(f"{out}/model.safetensors")
    import boto3

    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=s3).list_objects_v2(
        Bucket="biovita", Prefix="runs/s3run/ray/")["Contents"]]
    assert any("/checkpoint_" in k and k.endswith("biovita_state.json") for k in keys)
    assert load_model(fetch_dir(out)).checkpoint_metadata["step"] == 3


def test_mlflow_artifacts_on_s3(s3, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("s3exp", artifact_location="s3://biovita/mlflow")
    run = client.create_run(exp).info.run_id
    f = tmp_path / "table.txt"
    f.write_text("A2T 0.9")
    client.log_artifact(run, str(f))
    import boto3

    objs = boto3.client("s3", endpoint_url=s3).list_objects_v2(Bucket="biovita", Prefix="mlflow/")
    assert any(o["Key"].endswith(f"{run}/artifacts/table.txt") for o in objs["Contents"])
