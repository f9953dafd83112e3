"""`benchmarks/learning.py` end to end on a tiny budget: every variant trained and scored on
both splits, the table and the JSON written, a re-run reusing the finished stages."""

import json
import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_learning_script_tiny(tmp_path):
    from test_job_e2e import TINY

    out, js = tmp_path / "learning", tmp_path / "learning.json"
    # one seed, a 16-species world, a handful of steps per stage; no stage 0 (the variants
    # start from stage 1 and phase 1; the main job's test runs stage 0); of the ablations the
    # one that retrains a single stage (phase 2 from the recipe's phase 1): each stage trained
    # here is a Ray Train run of its own, and the chaining of stages is the main job's too
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--seeds", "3", "--out", str(out),
           "--json", str(js), "data.synth_species=16", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
           *TINY, "stage0.enabled=false", "--ablations", "no_gate_guard"]
    # its own local Ray instance (short temp path: socket names), whatever else runs here
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": tempfile.mkdtemp(prefix="bvl")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(js.read_text())
    assert set(res["top1"][0]["seen"]) == {"stage1", "no_phase2", "full", "no_gate_guard"}
    assert res["top1"][0]["unseen"]["full"]["species"]["A2I"] >= 0
    assert "no_gate_guard" in r.stdout and "stage 2 - stage 1, seen species A2I" in r.stdout
    # the paired table: full - full is no row; full - stage1 is the printed stage 2 - stage 1
    assert set(res["full_minus"]) == {"stage1", "no_phase2", "no_gate_guard"}
    seen = res["top1"][0]["seen"]["full"]["species"]["A2I"] - res["top1"][0]["seen"]["stage1"]["species"]["A2I"]
    assert res["full_minus"]["stage1"]["seen/A2I"]["mean"] == pytest.approx(seen)
    assert f"stage 2 - stage 1, seen species A2I: {seen:+.1f}" in r.stdout
    top = res["top1"][0]["unseen"]
    assert res["full_minus"]["no_gate_guard"]["unseen/avg"]["mean"] == pytest.approx(
        sum(top["full"]["species"][d] - top["no_gate_guard"]["species"][d] for d in top["full"]["species"]) / 6)
    for v in ("full", "no_gate_guard"):
        assert (out / f"seed3-{v}" / "models" / "stage2.phase2" / "model.safetensors").is_file()
    assert not (out / "seed3-no_aic").exists()  # an ablation not asked for is not trained
    # the ablation starts from the recipe's phase-1 model: no stage 1 or phase 1 of its own
    assert not {"stage1", "stage2.phase1"} & {d.name for d in (out / "seed3-no_gate_guard" / "models").iterdir()}
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert r2.returncode == 0 and r2.stdout.count("already finished") >= 4, r2.stdout[-3000:]
