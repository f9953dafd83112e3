"""A simulated multi-node Ray cluster (ray.cluster_utils.Cluster): training workers on
different nodes, decoding on a CPU node of its own, checkpoints on shared storage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_stage1_on_simulated_cluster(synth_store, tmp_path):
    root, _ = synth_store
    storage = tmp_path / "shared"
    short = Path(f"/tmp/bvmn{os.getpid()}")  # Ray's socket paths have a length limit
    short.mkdir(exist_ok=True)
    env = {**os.environ, "RAY_TMPDIR": str(short)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_run.py"), str(root), str(storage)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    train = set(res["nodes"]["train"])
    assert len(train) == 2 and train == set(res["train_node_ids"])  # one worker per node
    assert set(res["nodes"]["decode"]) == {res["data_node_id"]}  # decoding on the CPU node only
    assert (Path(res["export"]) / "model.safetensors").is_file()
    ckpts = [p for p in (storage / "multinode" / "ray" / "multinode-stage1").glob("checkpoint_*") if p.is_dir()]
    assert ckpts and all((c / "biovita_state.json").is_file() for c in ckpts)
