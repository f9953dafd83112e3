"""The published architecture (ViT-L-14 image/text towers + CLAP HTS-AT + adapter, random
weights) through the real worker loop: step time, peak memory and trainable parameters of a
stage-1 step and of a stage-2 phase-2 step (every phase-2 role active: the upper audio
layers and the logit scale from step 0), at a small batch on this machine's CPU.

One process (gloo, world size 1, DeepSpeed ZeRO-2), the worker loop of the job
(`biovita.train.loop.StageRun`) fed in-memory batches; the image tower's embeddings for
phase 2 are random unit vectors (the tower is frozen: training never runs it).

    python benchmarks/real_arch_step.py [--batch 2] [--steps 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path


def _batches(n: int, batch: int, dim: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(0)
    names = ["Aves Passeriformes Paridae Parus major with common name great tit",
             "Hyla arborea", "Rana temporaria with common name common frog", "Bubo bubo"]
    return [{"mel": torch.randn(batch, 1, 1001, 64, generator=g) * 10 - 40,
             "text": [names[(i + k) % len(names)] for k in range(batch)],
             "image_emb": torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1),
             "epoch": torch.zeros(batch, dtype=torch.long)} for i in range(n)]


def measure(stage: str, init: str, batch: int, steps: int, out: Path) -> dict:
    import torch

    from biovita.config import load_config
    from biovita.train.loop import LocalIO, StageJob, StageRun

    section = "stage1" if stage == "stage1" else "stage2.phase2"
    cfg = load_config(None, ["data.synth_if_missing=true", "model.name=vit-l14-htsat-random",
                             f"{section}.batch_size={batch}", f"{section}.max_steps={steps + 1}",
                             "stage2.upper_audio_unfreeze_step=0", "stage2.logit_freeze_steps=0",
                             "stage2.baseline_batches=1", "train.log_every=1000"])
    job = StageJob(config=cfg.to_dict(), stage=stage, steps_per_epoch=steps + 1, init_checkpoint=init,
                   export_to=str(out / f"model-{stage}"))
    stamps: list[float] = []
    job.callbacks.append(lambda info: stamps.append(time.perf_counter()))
    run = StageRun(job, LocalIO(_batches(steps + 2, batch, run_dim(init)), out))
    trainable = sum(p.numel() for g in run.eng.optimizer.param_groups for p in g["params"])
    start = time.perf_counter()
    run.run()
    times = [b - a for a, b in zip([start] + stamps, stamps)][1:]  # the first step warms up
    return {"stage": stage, "batch": batch, "step_s": statistics.median(times),
            "samples_per_s": batch / statistics.median(times), "trainable_params": int(trainable),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "threads": torch.get_num_threads()}


def run_dim(init: str) -> int:
    from biovita.models.checkpoint import read_meta

    return int(read_meta(init)["arch"]["clip_config"]["embed_dim"])


def main() -> None:
    import torch.distributed as dist

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--json", default=None, help="write the numbers as JSON")
    a = p.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29531", RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model

    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        model = create_model("vit-l14-htsat-random")
        total = sum(p.numel() for p in model.parameters())
        save_model(model, Path(d) / "init")
        del model
        build_s = time.perf_counter() - t
        rows = [measure(stage, str(Path(d) / "init"), a.batch, a.steps, Path(d))
                for stage in ("stage1", "stage2.phase2")]
    print(f"vit-l14-htsat-random: {total / 1e6:.1f} M parameters (built and saved in {build_s:.0f} s), "
          f"batch {a.batch}, {rows[0]['threads']} threads, median of {a.steps} steps after one")
    for r in rows:
        print(f"{r['stage']:<14} step {r['step_s']:6.2f} s  {r['samples_per_s']:5.2f} samples/s  "
              f"trainable {r['trainable_params'] / 1e6:6.1f} M  peak RSS {r['peak_rss_gib']:.1f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps({"total_params": total, "stages": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
