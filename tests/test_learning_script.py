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
    # one that retrains two stages (no_gate_guard retrains phase 2 alone, as no_aic's second)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learning.py"), "--seeds", "3", "--out", str(out),
           "--json", str(js), "data.synth_species=16", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}",
           *TINY, "stage0.enabled=false", "--ablations", "no_aic"]
    # its own local Ray instance (short temp path: socket names), whatever else runs here
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_TMPDIR": tempfile.mkdtemp(prefix="bvl")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(js.read_text())
    assert set(res["top1"][0]["seen"]) == {"stage1", "no_phase2", "full", "no_aic"}
    assert res["top1"][0]["unseen"]["full"]["species"]["A2I"] >= 0
    assert "no_aic" in r.stdout and "stage 2 - stage 1, seen species A2I" in r.stdout
    # the paired table: full - full is no row; full - stage1 is the printed stage 2 - stage 1
    assert set(res["full_minus"]) == {"stage1", "no_phase2", "no_aic"}
    seen = res["top1"][0]["seen"]["full"]["species"]["A2I"] - res["top1"][0]["seen"]["stage1"]["species"]["A2I"]
    assert res["full_minus"]["stage1"]["seen/A2I"]["mean"] == pytest.approx(seen)
    assert f"stage 2 - stage 1, seen species A2I: {seen:+.1f}" in r.stdout
    top = res["top1"][0]["unseen"]
    assert res["full_minus"]["no_aic"]["unseen/avg"]["mean"] == pytest.approx(
        sum(top["full"]["species"][d] - top["no_aic"]["species"][d] for d in top["full"]["species"]) / 6)
    for v in ("full", "no_aic"):
        assert (out / f"seed3-{v}" / "models" / "stage2.phase2" / "model.safetensors").is_file()
    assert not (out / "seed3-no_gate_guard").exists()  # an ablation not asked for is not trained
    # the ablations start from the recipe's models: no stage 0 or stage 1 of their own
    assert not (out / "seed3-no_aic" / "models" / "stage1").exists()
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert r2.returncode == 0 and r2.stdout.count("already finished") >= 5, r2.stdout[-3000:]
