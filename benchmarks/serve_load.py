"""Load on `biovita serve` on loopback (the tiny model with a small synthetic gallery: the speed
of the serving path, not of a real tower; the upload is one of the gallery's WAV clips).

    python benchmarks/serve_load.py [--requests 200] [--concurrency 8] [--replicas 1,2]
        throughput: concurrent POST /identify; requests/s, p50 and p99 latency, errors
    python benchmarks/serve_load.py --overload 4 [--seconds 60] [--json OUT]
        overload: one replica's unloaded p99 and capacity, then requests arriving at 4x that
        capacity for 60 s: the excess answered at once with 503 and Retry-After, the accepted
        requests' p99 against the unloaded one, the memory of every process, and every
        request after the burst; then a replica of two killed under load: the errors, and
        every request once it is replaced.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, name: str, data: bytes) -> tuple[int, float, dict]:
    from biovita.serve.client import post

    t = time.perf_counter()
    status, res = post(url + "identify", {"k": "5"}, (name, data), timeout=300)
    return status, time.perf_counter() - t, res


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.99 * (len(values) - 1))] if values else float("nan")


def load(url: str, name: str, data: bytes, requests: int, concurrency: int) -> dict:
    """`requests` POSTs, `concurrency` at a time (a closed loop)."""
    for _ in range(concurrency):  # warm-up
        request(url, name, data)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: request(url, name, data), range(requests)))
    wall = time.perf_counter() - t0
    lat = [r[1] for r in results]
    return {"requests": requests, "concurrency": concurrency, "requests_per_s": requests / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * p99(lat),
            "errors": sum(s != 200 for s, _, _ in results)}


def memory() -> int:
    """PSS of this process and every descendant (the Ray and Serve processes)."""
    total = 0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def overload(url: str, name: str, data: bytes, factor: float, seconds: float) -> dict:
    """Unloaded p99, capacity, then an open loop at `factor` x capacity for `seconds`."""
    unloaded = [request(url, name, data)[1] for _ in range(30)]
    capacity = load(url, name, data, 60, 8)["requests_per_s"]
    rate = factor * capacity
    results: list[tuple[int, float, dict, float]] = []
    lock = threading.Lock()
    mem = {"start": memory(), "max": 0}

    def one(sent: float) -> None:
        status, lat, res = request(url, name, data)
        with lock:
            results.append((status, lat, res, sent))

    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            mem["max"] = max(mem["max"], memory())
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(256) as pool:
        n = 0
        while (now := time.perf_counter() - t0) < seconds:
            target = n / rate
            if now < target:
                time.sleep(target - now)
            pool.submit(one, time.perf_counter() - t0)
            n += 1
    stop.set()
    sampler.join()
    mem["end"] = memory()
    after = [request(url, name, data)[0] for _ in range(30)]
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 503]
    return {
        "unloaded_p99_ms": 1000 * p99(unloaded), "capacity_requests_per_s": capacity,
        "offered_requests_per_s": rate, "seconds": seconds, "sent": len(results),
        "accepted": len(ok), "rejected_503": len(rejected),
        "other_errors": len(results) - len(ok) - len(rejected),
        "rejected_with_retry_after": sum("retry_after" in r[2] for r in rejected),
        "rejection_p99_ms": 1000 * p99([r[1] for r in rejected]),
        "accepted_p99_ms": 1000 * p99([r[1] for r in ok]),
        "accepted_p99_vs_unloaded": p99([r[1] for r in ok]) / p99(unloaded),
        "memory_start_mb": mem["start"] / 2**20, "memory_max_mb": mem["max"] / 2**20,
        "memory_end_mb": mem["end"] / 2**20, "after_burst_ok": sum(s == 200 for s in after),
        "after_burst_requests": len(after)}


def replicas_running(app: str = "biovita") -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["biovita"]
    return status.replica_states.get("RUNNING", 0)


def kill_a_replica(url: str, name: str, data: bytes, requests: int = 120, concurrency: int = 8) -> dict:
    """Closed-loop load on two replicas; one is killed (SIGKILL of its actor) midway. The
    errors are the requests that replica held; once Serve has replaced it, all succeed."""
    import ray
    from ray.util.state import list_actors

    results: list[int] = []
    killed = threading.Event()

    def one(k: int) -> None:
        if k == requests // 2 and not killed.is_set():
            actor = next(a for a in list_actors(filters=[("state", "=", "ALIVE")])
                         if a.class_name.startswith("ServeReplica:biovita"))
            ray.kill(ray.get_actor(actor.name, namespace=actor.ray_namespace), no_restart=False)
            killed.set()
        results.append(request(url, name, data)[0])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(requests)))
    deadline = time.time() + 120
    while replicas_running() < 2 and time.time() < deadline:
        time.sleep(0.5)
    replaced = time.perf_counter() - t0
    after = [request(url, name, data)[0] for _ in range(40)]
    return {"requests": requests, "concurrency": concurrency,
            "errors": sum(s != 200 for s in results), "error_statuses": sorted(set(results) - {200}),
            "replicas_after": replicas_running(), "seconds_to_replaced": replaced,
            "after_ok": sum(s == 200 for s in after), "after_requests": len(after)}


def fixture(tmp: Path) -> tuple[Path, Path, bytes]:
    """A small store, the tiny model knowing its taxa, and a WAV clip to upload."""
    from biovita.data.store import read_table
    from biovita.data.synth import make_synthetic
    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model

    make_synthetic(tmp / "store", n_species=8, seed=0)
    taxa = read_table(tmp / "store", "taxa", ["class", "order", "family", "genus", "scientific_name",
                                              "common_name"]).to_pylist()
    save_model(create_model("tiny"), tmp / "model", metadata={"taxa": taxa})
    clip = next(r for r in read_table(tmp / "store", "audio", ["id", "bytes", "format"]).to_pylist()
                if r["format"] == "wav")
    return tmp / "store", tmp / "model", clip["bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--replicas", default="1,2")
    p.add_argument("--overload", type=float, default=0, help="offered load as a multiple of capacity")
    p.add_argument("--seconds", type=float, default=60, help="how long the overload lasts")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import ray
    from ray import serve

    from biovita.serve.app import ServeConfig, start

    store, model, clip = fixture(Path(tempfile.mkdtemp(prefix="biovita-serve-load-")))
    ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False)
    if a.overload:
        # admission kept small on this 2-core machine: 2 at work, 2 waiting per replica
        limits = {"max_ongoing_requests": 2, "max_queued_requests": 2, "cpus_per_replica": 1.0}
        url = start(ServeConfig(checkpoint=str(model), gallery=str(store), port=_port(), **limits))
        report = {"overload": overload(url, "call.wav", clip, a.overload, a.seconds)}
        serve.shutdown()
        url = start(ServeConfig(checkpoint=str(model), gallery=str(store), port=_port(), replicas=2,
                                **{**limits, "max_queued_requests": 8, "cpus_per_replica": 0.5}))
        report["replica_killed"] = kill_a_replica(url, "call.wav", clip)
        serve.shutdown()
        print(json.dumps(report, indent=1))
    else:
        report = []
        for n in (int(x) for x in a.replicas.split(",")):
            url = start(ServeConfig(checkpoint=str(model), gallery=str(store), port=_port(), replicas=n,
                                    cpus_per_replica=1.0))
            report.append({"replicas": n, **load(url, "call.wav", clip, a.requests, a.concurrency)})
            serve.shutdown()
        print(f"{'replicas':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
              f"   ({a.requests} requests, {a.concurrency} concurrent, loopback)")
        for r in report:
            print(f"{r['replicas']:>8} {r['requests_per_s']:>8.1f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} "
                  f"{r['errors']:>7}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
