"""A Ray head started as a user starts one (`ray start --head --block`), beside the suite's own
local Ray instance, for the tests that submit jobs to a cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_head(name: str, cpus: int = 4):
    """Yields {gcs, dashboard, env} once the head takes jobs. Ports of its own (the session's
    local instance holds the defaults) and a short temp dir (Ray's socket paths have a length
    limit)."""
    gcs, dash, agent, grpc, metrics, rt = (_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", f"--num-cpus={cpus}",
         "--object-store-memory=500000000", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir=/tmp/{name}{os.getpid()}", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if subprocess.run([str(BIN / "ray"), "job", "list", "--address", dashboard],
                              capture_output=True, env=env).returncode == 0:
                break
            time.sleep(2)
        yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": dashboard, "env": env}
    finally:
        _kill_tree(proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the head and every process under it (GCS, raylet, dashboard, workers, jobs'
    drivers): a SIGTERM makes `ray start --block` stop them one by one with grace periods,
    ~32 s of the suite per head."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [*tree, proc]:
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):
            p.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=30)
