"""A non-editable install (`pip install .` of the built wheel) into a fresh virtual
environment runs the CLI and finds its default config and sweep space from any directory:
nothing in the package reads files through the repository's layout."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, cwd, **kw):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r.stdout


def test_wheel_in_fresh_venv_runs_from_anywhere(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"  # a copy: building writes build/ beside it
    junk = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__")
    local = {"runs", "data", "mlflow.db", "mlartifacts"}  # what a run leaves in the checkout's root

    def ignore(folder, names):
        return set(junk(folder, names)) | (local & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, src, ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(src)], cwd=tmp_path)
    wheel, = dist.glob("biovita-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py, bindir = venv / "bin" / "python", venv / "bin"
    # the heavy dependencies come from this environment's site-packages as a plain path (a
    # .pth line): its .pth files, among them biovita's editable-install hook, are not run
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run([str(bindir / "biovita"), "list-models"], cwd=elsewhere, env=env)
    assert "bioclip2-clap" in out and "tiny" in out
    out = _run([str(bindir / "biovita"), "train", "--help"], cwd=elsewhere, env=env)
    assert "--config" in out and "--no-bench" in out and "bioclip2_clap" in out
    out = _run([str(py), "-c", (
        "import biovita; from biovita.config import load_config; from biovita.train.sweep "
        "import load_space, DEFAULT_SPACE; cfg = load_config(None); spec, base = "
        "load_space(DEFAULT_SPACE); print(biovita.__file__); print(cfg.model.name, spec.name, "
        "base.data.root)")], cwd=elsewhere, env=env)
    installed, values = out.strip().splitlines()
    assert installed.startswith(str(site)), installed  # the wheel, not the repository
    name, space, root = values.split()
    assert (name, space) == ("tiny", "biovita-sweep")
    assert Path(root) == elsewhere / "data" / "synthetic"  # relative to where it runs
    out = _run([str(py), "-c", "import importlib.resources as r; "
                "print(r.files('biovita.serve').joinpath('page.html').read_text()[:15])"],
               cwd=elsewhere, env=env)
    assert out.strip() == "<!doctype html>"  # the serving page ships in the wheel
