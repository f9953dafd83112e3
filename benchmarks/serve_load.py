"""Load on `biovita serve`: a bounded number of concurrent POST /identify requests on loopback,
for 1 and 2 model replicas; requests/s, p50 and p99 latency, and the error count.

    python benchmarks/serve_load.py [--requests 200] [--concurrency 8] [--replicas 1,2]

The service runs the tiny model (random weights: the speed of the serving path, not of a real
tower) with a small synthetic gallery; the upload is one of the gallery's WAV clips.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(url: str, name: str, data: bytes, requests: int, concurrency: int) -> dict:
    from biovita.serve.client import post

    def one(_):
        t = time.perf_counter()
        status, _ = post(url + "identify", {"k": "5"}, (name, data), timeout=300)
        return status, time.perf_counter() - t

    for _ in range(concurrency):  # warm-up
        one(0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - t0
    lat = sorted(r[1] for r in results)
    return {"requests": requests, "concurrency": concurrency, "requests_per_s": requests / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
            "errors": sum(s != 200 for s, _ in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import ray
    from ray import serve

    from biovita.data.store import read_table
    from biovita.data.synth import make_synthetic
    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model
    from biovita.serve.app import ServeConfig, start

    tmp = Path(tempfile.mkdtemp(prefix="biovita-serve-load-"))
    make_synthetic(tmp / "store", n_species=8, seed=0)
    taxa = read_table(tmp / "store", "taxa", ["class", "order", "family", "genus", "scientific_name",
                                              "common_name"]).to_pylist()
    save_model(create_model("tiny"), tmp / "model", metadata={"taxa": taxa})
    clip = next(r for r in read_table(tmp / "store", "audio", ["id", "bytes", "format"]).to_pylist()
                if r["format"] == "wav")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    for n in (int(x) for x in a.replicas.split(",")):
        cfg = ServeConfig(checkpoint=str(tmp / "model"), gallery=str(tmp / "store"), port=_port(),
                          replicas=n, cpus_per_replica=1.0)
        url = start(cfg)
        rows.append({"replicas": n, **load(url, "call.wav", clip["bytes"], a.requests, a.concurrency)})
        serve.shutdown()
    print(f"{'replicas':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
          f"   ({a.requests} requests, {a.concurrency} concurrent, loopback)")
    for r in rows:
        print(f"{r['replicas']:>8} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>7}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
