"""The real recipe's step on one GPU: step time, samples/s, peak memory and model FLOPs
utilisation of stage 1 and of stage-2 phase 2 through the worker loop of the job (DeepSpeed
ZeRO-2, bf16), the largest batch per GPU that fits, the log-mel front end on the GPU against
the CPU one, and bf16 against fp32 on the loss and the gate's inputs.

    python benchmarks/gpu_step.py --model vit-l14-htsat-random --json report.json   # on a GPU
    python benchmarks/gpu_step.py --model tiny --batches 4,2 --steps 2               # CPU check

FLOPs: counted by torch.utils.flop_counter.FlopCounterMode over one training step of the
stage (forward and backward of every tower that runs, matmuls and convolutions; the frozen
image tower does not run: stage 2 pairs clips with precomputed image embeddings). MFU = FLOPs
per step / step time / the GPU's dense bf16 peak (a table by device name; none on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

# dense bf16 tensor-core peaks, FLOP/s (vendor datasheets)
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def batches(n: int, batch: int, dim: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    names = ["Aves Passeriformes Paridae Parus major with common name great tit", "Hyla arborea",
             "Rana temporaria with common name common frog", "Bubo bubo", "Gryllus campestris"]
    return [{"mel": torch.randn(batch, 1, 1001, 64, generator=g) * 10 - 40,
             "text": [names[(i + k) % len(names)] + f" {k}" for k in range(batch)],
             "image_emb": torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=-1),
             "epoch": torch.zeros(batch, dtype=torch.long)} for i in range(n)]


def stage_run(stage: str, init: str, model: str, batch: int, steps: int, out: Path, device: str,
              data: list[dict] | None = None, precision: str = "bf16"):
    """A StageRun of the job's worker loop on in-memory batches (phase 2 with every role on)."""
    from biovita.config import load_config
    from biovita.models.checkpoint import read_meta
    from biovita.train.loop import LocalIO, StageJob, StageRun

    section = "stage1" if stage == "stage1" else "stage2.phase2"
    cfg = load_config(None, ["data.synth_if_missing=true", f"model.name={model}",
                             f"train.use_gpu={str(device == 'cuda' and precision == 'bf16').lower()}",
                             f"{section}.batch_size={batch}", f"{section}.max_steps={steps}",
                             "stage2.upper_audio_unfreeze_step=0", "stage2.logit_freeze_steps=0",
                             "stage2.baseline_batches=1", "train.log_every=100000"])
    job = StageJob(config=cfg.to_dict(), stage=stage, steps_per_epoch=steps, init_checkpoint=init,
                   export_to=str(out / f"model-{stage}-{batch}"))
    dim = int(read_meta(init)["arch"]["clip_config"]["embed_dim"])
    io = LocalIO(data or batches(steps + 1, batch, dim), out)
    if device == "cuda":
        import torch

        io.device = lambda use_gpu: torch.device("cuda", 0)
    return StageRun(job, io)


def time_stage(stage: str, init: str, model: str, batch: int, steps: int, out: Path, device: str) -> dict:
    import torch

    stamps: list[float] = []
    run = stage_run(stage, init, model, batch, steps + 1, out, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    run.job.callbacks.append(lambda info: (sync(), stamps.append(time.perf_counter())))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run.run()
    step = statistics.median([b - a for a, b in zip(stamps, stamps[1:])])
    flops = step_flops(run, batch)
    row = {"stage": stage, "batch": batch, "step_s": step, "samples_per_s": batch / step,
           "flops_per_step": flops, "trainable_params": sum(
               p.numel() for g in run.eng.optimizer.param_groups for p in g["params"])}
    if device == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peak = peak_flops(torch.device(device))
    row["mfu"] = flops / step / peak if peak else None
    return row


def step_flops(run, batch: int) -> float:
    """FLOPs of one training step of the stage, forward + backward, as torch counts them."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    data = batches(1, batch, run.module.embed_dim)[0]
    data.pop("epoch")
    with FlopCounterMode(display=False) as counter:
        feats = run._features({m: data[col] for m, col in run.stage.inputs.items()})
        loss = sum(f.square().sum() for f in feats.values() if f.requires_grad)
        if isinstance(loss, torch.Tensor):
            loss.backward()
    run.eng.engine.zero_grad()
    return float(counter.get_total_flops())


def largest_batch(stage: str, init: str, model: str, out: Path, start: int, limit: int) -> int | None:
    """Double the batch from `start` until a step runs out of GPU memory (or `limit`)."""
    import torch

    best, batch = None, start
    while batch <= limit:
        try:
            stage_run(stage, init, model, batch, 1, out, "cuda").run()
            best, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def front_end(device: str, clips: int = 64) -> dict:
    """The CLAP log-mel computed on `device` (batched, the same math) against the CPU front end."""
    import numpy as np
    import torch

    from biovita.frontends.audio import AudioFrontEnd, LogMel

    fe = AudioFrontEnd()
    rng = np.random.default_rng(0)
    waves = (0.2 * rng.standard_normal((clips, fe.clip_samples))).astype(np.float32)
    cpu = LogMel(fe)
    t = time.perf_counter()
    ref = cpu(list(waves))
    cpu_rate = clips / (time.perf_counter() - t)
    window, fb = cpu.window.to(device), cpu.fb.to(device)
    x = torch.from_numpy(waves).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up, then timed
        sync()
        t = time.perf_counter()
        p = fe.n_fft // 2
        xp = torch.cat([x[:, 1:p + 1].flip(-1), x, x[:, -p - 1:-1].flip(-1)], -1)
        spec = torch.stft(xp, fe.n_fft, fe.hop_length, window=window, center=False, return_complex=True)
        power = spec[:, :cpu.n_bins].abs().square()
        mel = 10 * torch.log10(torch.clamp(power.transpose(-1, -2) @ fb, min=1e-10))
        sync()
        dev_rate = clips / (time.perf_counter() - t)
    return {"device": device, "clips_per_s": dev_rate, "cpu_clips_per_s": cpu_rate,
            "max_abs_db_difference": float((mel.cpu() - ref[:, 0]).abs().max())}


def precision(init: str, model: str, out: Path, device: str, steps: int = 3, batch: int = 8) -> dict:
    """Phase 2 for a few steps on the same batch in bf16 and in fp32: loss, ATC and the gate."""
    from biovita.models.checkpoint import read_meta

    dim = int(read_meta(init)["arch"]["clip_config"]["embed_dim"])
    same = batches(1, batch, dim, seed=7) * (steps + 1)
    rows = {}
    for prec in ("bf16", "fp32"):
        logged = []
        run = stage_run("stage2.phase2", init, model, batch, steps, out, device, same, prec)
        run.job.callbacks.append(  # this step's scalars: the last of the meter's window
            lambda info, run=run: logged.append({k: v[-1] for k, v in run.meter.values.items()}))
        run.run()
        rows[prec] = {"baseline_atc": run.state["baseline_atc"], "loss": [x.get("loss") for x in logged],
                      "atc": [x.get("atc") for x in logged], "atc_ema": run.gate.ema}
    diff = max(abs(a - b) for a, b in zip(rows["bf16"]["atc"], rows["fp32"]["atc"]))
    rows["max_abs_atc_difference"] = diff
    rows["baseline_relative_difference"] = abs(rows["bf16"]["baseline_atc"] / rows["fp32"]["baseline_atc"] - 1)
    return rows


def main() -> None:
    import tempfile

    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-l14-htsat-random")
    p.add_argument("--batches", default="64,32", help="per-GPU batch of stage 1, of phase 2")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch tried (GPU only)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model

    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "model": a.model, "torch": torch.__version__}
    b1, b2 = (int(x) for x in a.batches.split(","))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        save_model(create_model(a.model), out / "init")
        init = str(out / "init")
        report["steps"] = [time_stage("stage1", init, a.model, b1, a.steps, out, device),
                           time_stage("stage2.phase2", init, a.model, b2, a.steps, out, device)]
        if device == "cuda":
            report["largest_batch"] = {s: largest_batch(s, init, a.model, out, b, a.max_batch)
                                       for s, b in (("stage1", b1), ("stage2.phase2", b2))}
        report["front_end"] = front_end(device)
        report["precision"] = precision(init, a.model, out, device)
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
