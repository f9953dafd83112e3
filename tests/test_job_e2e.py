"""The main job end to end: `ray start --head`, then `ray job submit --working-dir . --
python ray_jobs/train.py ...` with a tiny budget; checks the printed results file (all 18
benchmark tasks), the MLflow parent/child runs and the exported checkpoints."""

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray_head import BIN, ray_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


TINY = ["stage0.epochs=1", "stage0.max_steps=3", "stage0.batch_size=8",
        "stage1.epochs=1", "stage1.max_steps=3", "stage1.batch_size=8",
        "stage2.phase1.epochs=1", "stage2.phase1.max_steps=2", "stage2.phase1.batch_size=8",
        "stage2.phase2.epochs=1", "stage2.phase2.max_steps=2", "stage2.phase2.batch_size=8",
        "train.log_every=1", "stage2.baseline_batches=2", "data.decode_concurrency=2"]


def test_ray_job_submit_main_job(synth_store, tmp_path):
    root, _ = synth_store
    with ray_head("bvjob") as head:
        db = tmp_path / "mlflow.db"
        cmd = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"],
               "--working-dir", str(ROOT), "--", "python", "ray_jobs/train.py",
               f"data.root={root}", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=e2e",
               f"mlflow.tracking_uri=sqlite:///{db}", f"bench.out={tmp_path / 'bench'}", *TINY]
        for _ in range(30):  # the job agent starts a little after the dashboard answers
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=head["env"], cwd=ROOT)
            out = r.stdout + r.stderr
            if "No available agent" not in out:
                break
            time.sleep(3)
        assert r.returncode == 0, out[-4000:]
    m = re.search(r"^results: (.+)$", out, re.M)
    assert m, out[-3000:]
    both = json.loads(Path(m.group(1).strip()).read_text())
    assert both["stage"] == "stage2.phase2" and both["unseen"]["species"]["A2I"]["n"] > 0
    assert (tmp_path / "bench" / "bench_unseen" / "ids" / "audio_index.csv").is_file()
    res = both["seen"]
    tasks = [(lvl, c) for lvl in ("species", "genus", "family") for c in res[lvl]]
    assert len(tasks) == 18
    for lvl, c in tasks:
        e = res[lvl][c]
        assert set(e) == {"top1", "top5", "top10", "n", "skipped", "missing_query", "missing_gallery"}
        assert 0 <= e["top1"] <= e["top5"] <= e["top10"] <= 1 and e["n"] > 0
    assert "A2T" in out and "species top1/top5" in out  # the table was printed
    # only biovita's lines and what a user can act on: none of the noise, C++ lines included
    from biovita.ray_patches import FORWARDED_NOISE

    assert not [n for n in FORWARDED_NOISE if n in out] and "core_worker.cc" not in out
    assert len(out.splitlines()) <= 120, out
    assert re.search(r"^unseen\s+stage2\.phase2", out, re.M)  # and the summary of both splits
    for stage in ("stage0", "stage1", "stage2.phase1", "stage2.phase2"):
        assert (tmp_path / "runs" / "e2e" / "models" / stage / "model.safetensors").is_file()
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("biovita")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("biovita.kind") == "job"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert {c.data.tags["biovita.stage"] for c in children} == {"stage0", "stage1", "stage2.phase1", "stage2.phase2"}
    p = parents[0].data
    assert "git_commit" in p.params and "dataset_fingerprint" in p.params and "train.zero_stage" in p.params
    assert "bench_stage2/species/A2T/top1" in p.metrics
    assert [d.dataset.name for d in parents[0].inputs.dataset_inputs] == [Path(root).name]
    assert any(k.startswith("system/") for k in p.metrics)
    mv = client.get_model_version("biovita", "1")  # the final model, registered with its scores
    assert mv.run_id == parents[0].info.run_id and "bench_species_avg_top1" in mv.tags
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    arts = {a.path for a in client.list_artifacts(parents[0].info.run_id, "bench_stage2")}
    assert any(a.endswith("_heatmap.png") for a in arts)
