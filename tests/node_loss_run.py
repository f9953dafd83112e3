"""Run by tests/test_cluster_faults.py in its own process (one Ray cluster per process): a
simulated cluster of a CPU-less head and two 2-CPU nodes, each holding one training worker
and its share of the decode pool. Stage 1 trains once undisturbed, then again while one
node is lost: every process of it SIGKILLed after a checkpoint, and a node started in its
place with `ray start --address` (as the autoscaler starts one for a lost spot node).
Prints RESULT <json>."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(node) -> list[psutil.Process]:
    """Every process of a node: its raylet and the workers and agents it started."""
    raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def _is_actor(p: psutil.Process) -> bool:
    """A worker process that holds an actor (Ray names its process `ray::ClassName`)."""
    try:
        title = p.cmdline()[0] if p.cmdline() else p.name()
    except psutil.NoSuchProcess:
        return False
    return title.startswith("ray::") and not title.startswith("ray::IDLE")


def main(root: str, storage: str) -> None:
    # Free ports, not Ray's defaults: the test session's own Ray instance holds those
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 300_000_000, "dashboard_port": _port(),
        "dashboard_agent_listen_port": _port(), "metrics_export_port": _port(),
        "runtime_env_agent_port": _port()})
    nodes = [cluster.add_node(num_cpus=2, resources={"trainer": 1}, object_store_memory=300_000_000)
             for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False

    from biovita.config import load_config
    from biovita.data.stats import STATS_ACTOR, bad_media_counts, media_stats
    from biovita.models.checkpoint import read_meta
    from biovita.tracking.runs import Tracker
    from biovita.train.driver import progress_uri, run_stage, save_init
    from biovita.train.stages import STAGE1

    def config(name: str):
        return load_config(None, [
            f"data.root={root}", f"train.storage_path={storage}", f"train.run_name={name}",
            f"mlflow.tracking_uri=sqlite:///{storage}/mlflow.db", "mlflow.system_metrics=false",
            "train.num_workers=2", "train.cpus_per_worker=1", "train.placement_strategy=STRICT_SPREAD",
            "train.worker_resources={trainer: 1}", "train.max_failures=2", "data.decode_concurrency=2",
            "stage1.epochs=3", "stage1.max_steps=12", "stage1.batch_size=4", "train.checkpoint_every=2",
            "train.log_every=1"])

    media_stats(STATS_ACTOR)
    calm = config("calm")
    init = save_init(calm)
    t0 = time.time()
    run_stage(calm, STAGE1, init, Tracker.for_job(calm))
    calm_s = time.time() - t0

    lost = config("lost")
    progress = progress_uri(lost, STAGE1.name)
    events: dict = {}

    def lose_a_node() -> None:
        while True:  # after the checkpoint of step 4 is persisted
            try:
                with open(progress) as f:
                    if json.load(f)["step"] >= 4:
                        break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        victim = nodes[1]
        procs = _processes(victim)
        actors = [p for p in procs if _is_actor(p)]  # the training worker, the decode actors
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        cluster.remove_node(victim, allow_graceful=False)  # and what Ray itself holds of it
        events.update(killed_at=time.time(), killed_actors=len(actors), lost_node=victim.node_id)
        time.sleep(3)
        # Cluster.add_node needs the main thread (it sets signal handlers); the autoscaler's way
        # needs nothing of this process
        before = {n["NodeID"] for n in ray.nodes()}
        replacement.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", f"--address={cluster.address}", "--block",
             "--num-cpus=2", '--resources={"trainer": 1}', "--object-store-memory=300000000",
             f"--dashboard-agent-listen-port={_port()}", f"--metrics-export-port={_port()}",
             f"--runtime-env-agent-port={_port()}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        while "replacement" not in events:
            new = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
            if new:
                events["replacement"] = new[0]
            time.sleep(0.5)

    media_stats(STATS_ACTOR).reset.remote()
    replacement: list[subprocess.Popen] = []
    watcher = threading.Thread(target=lose_a_node, daemon=True)
    watcher.start()
    t0 = time.time()
    out = run_stage(lost, STAGE1, init, Tracker.for_job(lost))
    lost_s = time.time() - t0
    watcher.join(timeout=10)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(lost.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(lost.mlflow.experiment).experiment_id
    runs = [r for r in client.search_runs([exp], "tags.`biovita.stage` = 'stage1'")
            if r.data.tags.get("mlflow.parentRunId") in
            {p.info.run_id for p in client.search_runs([exp], "tags.`biovita.run_name` = 'lost'")}]
    resumed = [m.value for r in runs for m in client.get_metric_history(r.info.run_id, "resumed_from_step")]
    print("RESULT " + json.dumps({
        "steps": read_meta(out)["metadata"]["step"], "stage_runs": len(runs), "resumed_from": resumed,
        "calm_seconds": calm_s, "lost_seconds": lost_s, "seconds_lost": lost_s - calm_s,
        "decode_nodes": bad_media_counts(STATS_ACTOR)["nodes"].get("decode", []),
        "train_nodes": bad_media_counts(STATS_ACTOR)["nodes"].get("train", []),
        **{k: v for k, v in events.items() if k != "killed_at"}}), flush=True)
    ray.shutdown()
    for proc in replacement:
        proc.terminate()
        proc.wait(timeout=60)
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
