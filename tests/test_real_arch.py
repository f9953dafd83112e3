"""The published architecture (ViT-L-14 + CLAP HTS-AT, random weights) trains: one optimizer
step of stage 1 and one of stage-2 phase 2 through Ray Train + DeepSpeed on CPU, batch 2."""

import shutil

import pytest

pytestmark = pytest.mark.slow


def test_real_architecture_trains_a_step_of_stage1_and_of_phase2(ray_local, tmp_path):
    from biovita.config import load_config
    from biovita.data.synth import make_synthetic
    from biovita.models.checkpoint import read_meta
    from biovita.train.driver import run_stage, save_init
    from biovita.train.stages import PHASE2, STAGE1
    from biovita.tracking.runs import Tracker

    store = tmp_path / "store"
    make_synthetic(store, n_species=8, seed=1, train_clips=(2, 3), train_images=(1, 2), test_clips=1,
                   test_images=1)
    cfg = load_config(None, [
        f"data.root={store}", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=real",
        "model.name=vit-l14-htsat-random", "mlflow.enabled=false", "train.cpus_per_worker=1",
        "stage1.epochs=1", "stage1.max_steps=1", "stage1.batch_size=2",
        "stage2.phase2.epochs=1", "stage2.phase2.max_steps=1", "stage2.phase2.batch_size=2",
        "stage2.baseline_batches=1", "train.log_every=1"])
    tracker = Tracker.for_job(cfg)
    init = save_init(cfg)
    stage1 = run_stage(cfg, STAGE1, init, tracker)
    assert read_meta(stage1)["metadata"]["step"] == 1
    phase2 = run_stage(cfg, PHASE2, stage1, tracker)  # the image tower's embeddings: made once, before
    meta = read_meta(phase2)
    assert meta["metadata"]["step"] == 1 and meta["arch"]["clip_config"]["embed_dim"] == 768
    assert meta["metadata"]["baseline_atc"] > 0
    shutil.rmtree(tmp_path / "runs")  # ~7 GiB of ViT-L/14 models and checkpoints, kept only on failure
