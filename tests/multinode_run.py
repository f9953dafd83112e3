"""Run by tests/test_multinode.py in its own process (one Ray cluster per process): a
simulated 4-node cluster on this machine, stage 1 for a few DeepSpeed steps."""

import json
import sys

import ray
from ray.cluster_utils import Cluster


def main(root: str, storage: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 300_000_000})
    train_nodes = [cluster.add_node(num_cpus=1, resources={"trainer": 1}, object_store_memory=300_000_000)
                   for _ in range(2)]
    data_node = cluster.add_node(num_cpus=2, object_store_memory=400_000_000)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    ray.data.DataContext.get_current().enable_progress_bars = False

    from biovita.config import load_config
    from biovita.data.stats import STATS_ACTOR, bad_media_counts, media_stats
    from biovita.train.driver import run_stage, save_init
    from biovita.train.stages import STAGE1
    from biovita.tracking.runs import Tracker

    cfg = load_config(None, [
        f"data.root={root}", f"train.storage_path={storage}", "train.run_name=multinode",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.placement_strategy=STRICT_SPREAD",
        "train.worker_resources={trainer: 1}",
        "train.zero_stage=2", "stage1.epochs=1", "stage1.max_steps=3", "stage1.batch_size=4",
        "train.checkpoint_every=2", "mlflow.enabled=false"])
    media_stats(STATS_ACTOR)
    out = run_stage(cfg, STAGE1, save_init(cfg), Tracker(cfg.mlflow, "multinode", {}))
    snap = bad_media_counts(STATS_ACTOR)
    print("RESULT " + json.dumps({
        "export": out, "nodes": snap["nodes"],
        "train_node_ids": [n.node_id for n in train_nodes], "data_node_id": data_node.node_id,
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
