"""benchmarks/gpu_step.py runs on CPU with the tiny model: every part of its report is there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_gpu_step_script_runs_on_cpu(tmp_path):
    out = tmp_path / "report.json"
    # the bare compiled loop through dynamo and AOTAutograd without inductor's code generation
    # (C++ on a CPU: ~2 minutes of a cold cache; `train.compile`'s test compiles for real)
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--model", "tiny",
                        "--batches", "4,2", "--large", "0", "--steps", "2", "--json", str(out),
                        "--compile-backend", "aot_eager"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["compile_backend"] == "aot_eager"
    got = [(r["loop"], r["stage"], r["batch"]) for r in rep["rows"]]
    assert got == [(loop, stage, batch) for stage, batch in (("stage1", 4), ("stage2.phase2", 2))
                   for loop in ("biovita", "bare eager", "bare compiled")]
    for row in rep["rows"]:
        assert row["step_s"] > 0 and row["flops_per_step"] > 0 and row["mfu"] is None
        assert row["aten_ops_per_step"] > 0 and row["kernels_per_step"] is None  # (no GPU)
    assert rep["front_end"]["max_abs_db_difference"] < 1e-2
    prec = rep["precision"]
    assert len(prec["bf16"]["atc"]) == len(prec["fp32"]["atc"]) == 3
