"""Step time of the real worker loop (Ray Train, 2 workers, DeepSpeed ZeRO-2) vs a bare
2-process torch loop (gloo) doing the same math on the same in-memory batches.

Both train stage 1 of the tiny model from the same initial weights on what the stream ships:
the log-mel of float16 waveforms computed in the step, the audio tower, the prompts' cached
text embeddings, ATC with negatives gathered from both processes, backward, gradients
averaged, AdamW step, logit-scale clamp. The real loop is `biovita.train.loop.train_loop_per_worker` itself
(schedules, fp32 losses, clamp of the stored value, metrics and logging, the Ray Data
stream), fed from a materialised Ray Dataset so that decoding is not timed (that is
data_throughput.py's job). One torch thread per process; steady-state step time (median of
the steps after warm-up) measured on rank 0 of each.

    python benchmarks/train_overhead.py [--steps 30] [--warmup 5] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

WORKERS = 2


def _rows(rank: int, steps: int, batch: int) -> list[dict]:
    """The same per-rank rows for both loops: rank r gets rows r::2 of the dataset order."""
    import numpy as np

    rng = np.random.default_rng(rank)
    texts = ["Aves Passeriformes Paridae Parus major", "Hyla arborea with common name tree frog",
             "Rana temporaria", "Chiroptera Vespertilionidae Myotis daubentonii", "Gryllus campestris"]
    emb = rng.standard_normal((len(texts), 64)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    # as the stream ships them: a float16 waveform, the prompt's cached text embedding
    return [{"wave": (0.25 * rng.standard_normal(480_000)).astype(np.float16),
             "text_emb": emb[i % len(texts)], "epoch": 0} for i in range(steps * batch)]


def _init_model(path: Path) -> str:
    import torch

    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model

    torch.manual_seed(0)
    save_model(create_model("tiny"), path)
    return str(path)


def _bare_worker(rank, port, init, steps, warmup, batch, out):
    import numpy as np
    import torch
    import torch.distributed as dist

    from biovita.config import Stage2Config, StageConfig
    from biovita.frontends.audio import LogMel
    from biovita.models.checkpoint import load_model
    from biovita.train import freeze, losses
    from biovita.train.stages import STAGE1

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    model = load_model(init).train()
    groups = freeze.param_groups(model, STAGE1, StageConfig(lr=1e-4, weight_decay=0.05), Stage2Config())
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups)
    log_mel = LogMel(model.audio_front_end)
    rows = _rows(rank, steps + warmup, batch)
    times = []
    for i in range(steps + warmup):
        t = time.perf_counter()
        b = rows[i * batch:(i + 1) * batch]
        wave = torch.from_numpy(np.stack([r["wave"] for r in b]))
        a = torch.nn.functional.normalize(model.encode_audio(log_mel(wave)), dim=-1)
        tx = torch.from_numpy(np.stack([r["text_emb"] for r in b]))
        loss = losses.contrastive_loss(a, tx, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in params:  # what data parallelism does: average the gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= WORKERS
        opt.step()
        losses.clamp_logit_scale(model.logit_scale)
        times.append(time.perf_counter() - t)
    if rank == 0:
        Path(out).write_text(json.dumps(times[warmup:]))
    dist.destroy_process_group()


def bare(init: str, steps: int, warmup: int, batch: int) -> float:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/times.json"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_bare_worker, args=(r, port, init, steps, warmup, batch, out))
                 for r in range(WORKERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        return statistics.median(json.loads(Path(out).read_text()))


class StepClock:
    """A step callback: rank 0 appends the time of every step to a file."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, info) -> None:
        if info.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{time.perf_counter()}\n")


def real(init: str, steps: int, warmup: int, batch: int, log_every: int) -> float:
    import ray
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from biovita.config import load_config
    from biovita.train.driver import worker_output_env
    from biovita.train.loop import StageJob, train_loop_per_worker
    from biovita.train.stages import STAGE1

    total = steps + warmup
    cfg = load_config(None, ["data.synth_if_missing=true", f"train.num_workers={WORKERS}",
                             "train.zero_stage=2", f"train.log_every={log_every}",
                             f"stage1.batch_size={batch}", f"stage1.max_steps={total}",
                             "train.cpus_per_worker=1", "train.prefetch_batches=4"])
    ray.init(num_cpus=WORKERS + 1, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(1.5e9))
    # rank r of Ray Data's split gets every other block: interleave the two ranks' rows
    rows = [r for i in range(total) for rank in range(WORKERS)
            for r in _rows(rank, total, batch)[i * batch:(i + 1) * batch]]
    ds = ray.data.from_items(rows, override_num_blocks=total * WORKERS).materialize()
    with tempfile.TemporaryDirectory() as d:
        clock = f"{d}/clock.txt"
        job = StageJob(config=cfg, stage=STAGE1.name, steps_per_epoch=total,
                       init_checkpoint=init, export_to=f"{d}/model", callbacks=[StepClock(clock)])
        env = {**worker_output_env(cfg), "OMP_NUM_THREADS": "1"}
        TorchTrainer(
            train_loop_per_worker, train_loop_config={"job": job},
            scaling_config=ScalingConfig(num_workers=WORKERS, resources_per_worker={"CPU": 1}),
            torch_config=TorchConfig(backend="gloo"), datasets={"train": ds},
            dataset_config=DataConfig(datasets_to_split="all"),
            run_config=RunConfig(name="overhead", storage_path=d,
                                 worker_runtime_env={"env_vars": env})).fit()
        stamps = [float(x) for x in Path(clock).read_text().split()]
    ray.shutdown()
    step_times = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(step_times[warmup - 1:])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=16, help="per worker")
    p.add_argument("--log-every", type=int, default=10)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        init = _init_model(Path(d) / "init")
        t_bare = bare(init, a.steps, a.warmup, a.batch)
        t_real = real(init, a.steps, a.warmup, a.batch, a.log_every)
    print(f"tiny model, stage 1, {WORKERS} workers x batch {a.batch}, 1 thread each, "
          f"median of {a.steps} steps after {a.warmup}")
    print(f"bare 2-process torch loop (gloo)          : {1000 * t_bare:8.1f} ms/step")
    print(f"biovita worker loop (Ray Train, ZeRO-2)   : {1000 * t_real:8.1f} ms/step")
    print(f"ratio                                     : {t_real / t_bare:8.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
