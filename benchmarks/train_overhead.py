"""Step time of the Ray Train + DeepSpeed path vs a bare single-process loop.

Same tiny model, same global batch, same in-memory inputs (the data pipeline is measured by
data_throughput.py), same torch thread count; steady-state step time after warm-up, timed
inside the training loop.

    python benchmarks/train_overhead.py [--steps 30] [--batch 32] [--zero 2]
"""

from __future__ import annotations

import argparse
import time


def _inputs(batch: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, 1, 1001, 64, generator=g) * 20 - 40
    texts = [f"Aves Genus{i % 7} species{i}" for i in range(batch)]
    return mel, texts


def _run_steps(model, engine_step, backward, steps: int, warmup: int, batch: int, threads: int):
    import torch

    from biovita.train import losses

    torch.set_num_threads(threads)
    mel, texts = _inputs(batch)
    tokens = model.tokenizer()(texts)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        a = model.encode_audio(mel)
        with torch.no_grad():
            tx = model.encode_text(tokens)
        loss = losses.atc(a, tx, model.logit_scale.exp())
        backward(loss)
        engine_step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return sum(times) / len(times)


def bare(steps: int, warmup: int, batch: int, threads: int) -> float:
    import torch

    from biovita import schedules
    from biovita.config import Stage2Config
    from biovita.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("tiny").train()
    opt = torch.optim.AdamW(schedules.param_groups(model, "stage1", 1e-4, 0.05, Stage2Config()))

    def step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return _run_steps(model, step, lambda l: l.backward(), steps, warmup, batch, threads)


def ray_deepspeed(steps: int, warmup: int, batch: int, threads: int, zero: int) -> float:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    def loop(c):
        import torch

        from biovita import schedules
        from biovita.config import load_config
        from biovita.models.factory import create_model
        from biovita.train.loop import Engine

        cfg = load_config(None, [f"train.zero_stage={c['zero']}", "data.synth_if_missing=true"])
        torch.manual_seed(0)
        model = create_model("tiny").train()
        groups = schedules.param_groups(model, "stage1", 1e-4, 0.05, cfg.stage2)
        eng = Engine(model, groups, cfg, c["batch"], (0.9, 0.98), 1e-8)
        t = _run_steps(eng.module, eng.step, eng.backward, c["steps"], c["warmup"], c["batch"], c["threads"])
        # Train V2 keeps metrics only with checkpoints: hand the number back through a file
        open(c["out"], "w").write(str(t))

    import tempfile

    ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/step_time.txt"
        TorchTrainer(
            loop, train_loop_config={"steps": steps, "warmup": warmup, "batch": batch,
                                     "threads": threads, "zero": zero, "out": out},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            torch_config=TorchConfig(backend="gloo"),
            run_config=RunConfig(name="overhead", storage_path=d)).fit()
        t = float(open(out).read())
    ray.shutdown()
    return t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--zero", type=int, default=2)
    a = p.parse_args()
    t_bare = bare(a.steps, a.warmup, a.batch, a.threads)
    t_ray = ray_deepspeed(a.steps, a.warmup, a.batch, a.threads, a.zero)
    print(f"tiny model, global batch {a.batch}, {a.threads} threads, {a.steps} timed steps")
    print(f"bare single-process loop     : {1000 * t_bare:8.1f} ms/step")
    print(f"Ray Train + DeepSpeed ZeRO-{a.zero} : {1000 * t_ray:8.1f} ms/step")
    print(f"ratio                        : {t_ray / t_bare:8.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
