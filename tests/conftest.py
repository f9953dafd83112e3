"""Shared fixtures: one synthetic store and one local Ray instance per test session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

# Ray's default temp dir can be unusable in sandboxes; DeepSpeed JIT cache kept across runs.
os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="biovita-ray-"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "biovita-torch-ext"))
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEST_SPECIES = 16


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory) -> tuple[Path, dict]:
    """A small synthetic store (16 species) and its manifest."""
    from biovita.data.synth import make_synthetic

    root = tmp_path_factory.mktemp("store")
    manifest = make_synthetic(root, n_species=TEST_SPECIES, seed=0, train_clips=(2, 8),
                              train_images=(3, 7), test_clips=2, test_images=2, rows_per_shard=40)
    return root, manifest


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (4 logical CPUs on 2 cores: Ray Data's
    decode tasks must be schedulable next to the training workers). The tests' training
    streams run 2 decoders (`data.decode_concurrency=2`): the default, one per free logical
    CPU, starts 6 processes at every stage on these 2 cores."""
    import ray

    ray.init(num_cpus=4, object_store_memory=int(6e8), include_dashboard=True,
             namespace="biovita-tests", log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def gloo():
    """A one-rank gloo process group in this process (DeepSpeed engines outside Ray Train)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1", DS_ACCELERATOR="cpu")
        dist.init_process_group("gloo", rank=0, world_size=1)


@pytest.fixture(scope="session")
def tiny_model():
    from biovita.models.factory import create_model

    return create_model("tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> str:
    from biovita.models.checkpoint import save_model

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_model(tiny_model, path, metadata={"stage": "test"})
    return str(path)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real local S3-compatible server (moto in server mode) with a bucket `biovita`."""
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except Exception:
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": url}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="biovita")
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def chromium():
    """Headless Chromium driven by selenium, with Debian's chromium and chromium-driver
    (.ci/run installs them); skipped where they are missing."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_bin = shutil.which("chromedriver")
    browser_bin = shutil.which("chromium") or shutil.which("chromium-browser")
    if not driver_bin or not browser_bin:
        pytest.skip("Chromium and its driver are not installed (.ci/run installs them)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser_bin
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        opts.add_argument(a)
    browser = webdriver.Chrome(service=Service(driver_bin), options=opts)
    yield browser
    browser.quit()
