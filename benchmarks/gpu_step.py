"""The training step on one device, biovita's against bare torch loops doing the same work.

For stage 1 and stage-2 phase 2, at the paper's per-GPU batches (64, 32) and at 256:
- biovita: the job's worker loop (`StageRun`, DeepSpeed ZeRO-2, bf16 on a GPU, `train.compile`
  at its default), fed in-memory batches as its stream ships them: float16 waveforms (the
  log-mel is computed in the step, on the device) and the frozen towers' cached embeddings
  (stage 1: the prompts'; phase 2: the images');
- bare eager: one process, no DeepSpeed, no Ray: the authors' loop on the same model, with the
  frozen towers run every step under `no_grad` (stage 1: the text tower on the prompts; phase
  2: the image tower on 224 px images), log-mels from the data loader, bf16 autocast, torch's
  fused AdamW over the stage's trainable parameters, clipping at 1.0;
- bare compiled: the same with the towers that train compiled (`torch.compile`).
Each: median step time, samples/s, FLOPs per step (torch's FlopCounterMode: matmuls and
convolutions, forward and backward of every tower that runs) and MFU against the GPU's dense
bf16 peak, peak memory, and from a torch profiler window of 3 steps the kernel launches per
step and the share of the window the GPU was busy. Then the largest batch that fits (doubling
from 256, up to --max-batch), the log-mel on the device against the CPU front end, and
phase 2 in bf16 against fp32.

    python benchmarks/gpu_step.py --model vit-l14-htsat-random --json report.json   # on a GPU
    python benchmarks/gpu_step.py --model tiny --batches 4,2 --large 0 --steps 2    # CPU check
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
NAMES = ["Aves Passeriformes Paridae Parus major with common name great tit", "Hyla arborea",
         "Rana temporaria with common name common frog", "Bubo bubo", "Gryllus campestris"]


def stages() -> tuple[str, str]:
    """The stages measured: stage 1 and phase 2 (imported late: `--help` stays instant)."""
    from biovita.train.stages import PHASE2, STAGE1

    return STAGE1.name, PHASE2.name


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def batches(n: int, batch: int, model, seed: int = 0) -> list[dict]:
    """What each side is fed: waveforms, prompts, their frozen text embeddings, images as
    pixels and as frozen embeddings, and the data loader's log-mels for the bare loops."""
    import torch

    from biovita.frontends.audio import LogMel

    g = torch.Generator().manual_seed(seed)
    size = model.image_front_end.image_size
    log_mel = LogMel(model.audio_front_end)
    out = []
    for i in range(n):
        text = [NAMES[(i + k) % len(NAMES)] + f" {k}" for k in range(batch)]
        wave = (0.25 * torch.randn(batch, model.audio_front_end.clip_samples, generator=g)).half()
        pixels = torch.randint(0, 255, (batch, 3, size, size), generator=g, dtype=torch.uint8)
        with torch.no_grad():
            text_emb = model.embed_texts(text)
            image_emb = model.encode_image(pixels).float()
        out.append({"wave": wave, "mel": log_mel(wave), "text": text, "pixels": pixels,
                    "text_emb": torch.from_numpy(text_emb), "image_emb": image_emb, "epoch": 0})
    return out


# ----------------------------------------------------------------------------- biovita


def stage_run(stage: str, init: str, model: str, batch: int, steps: int, out: Path, device: str,
              data: list[dict], precision: str = "bf16", compile: bool | None = None):
    """A StageRun of the job's worker loop on in-memory batches (phase 2 with every role on)."""
    from biovita.config import load_config
    from biovita.train.loop import LocalIO, StageJob, StageRun
    from biovita.train.stages import get_stage

    gpu = device == "cuda"
    section = get_stage(stage).section
    cfg = load_config(None, ["data.synth_if_missing=true", f"model.name={model}",
                             f"train.use_gpu={str(gpu).lower()}",
                             f"train.precision={precision if gpu else 'fp32'}",
                             *([f"train.compile={str(compile).lower()}"] if compile is not None else []),
                             f"{section}.batch_size={batch}", f"{section}.max_steps={steps}",
                             "stage2.upper_audio_unfreeze_step=0", "stage2.logit_freeze_steps=0",
                             "stage2.baseline_batches=1", "train.log_every=100000"])
    job = StageJob(config=cfg, stage=stage, steps_per_epoch=steps, init_checkpoint=init,
                   export_to=str(out / f"model-{stage}-{batch}"))
    io = LocalIO(data, out)
    if gpu:
        import torch

        io.device = lambda use_gpu: torch.device("cuda", 0)
    return StageRun(job, io)


def time_biovita(stage: str, init: str, model: str, batch: int, steps: int, out: Path, device: str,
                 data: list[dict], profile: bool = True) -> dict:
    import torch

    stamps: list[float] = []
    run = stage_run(stage, init, model, batch, steps + 4, out, device, data)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    window = Window(device)
    run.job.callbacks.append(lambda info: (sync(), stamps.append(time.perf_counter()),
                                           window.at(info.step, steps + 1)))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run.run()
    step = statistics.median([b - a for a, b in zip(stamps[:steps + 1], stamps[1:steps + 1])])
    flops = count_flops(lambda: biovita_forward_backward(run, data[0]))
    return row("biovita", stage, batch, step, flops, device,
               sum(p.numel() for g in run.eng.optimizer.param_groups for p in g["params"]),
               window.result() if profile else {})


def biovita_forward_backward(run, batch: dict) -> None:
    feats = run._features({m: batch[col] for m, col in run.stage.inputs.items()})
    loss = sum(f.square().sum() for f in feats.values() if f.requires_grad)
    if hasattr(loss, "backward"):
        loss.backward()
    run.eng.engine.zero_grad()


# ----------------------------------------------------------------------------- bare loops


def bare_loop(stage: str, init: str, batch: int, device: str, backend: str | None):
    """The authors' step on the same model, its trainable towers compiled with torch.compile's
    `backend` (None: eager): (step function, trainable parameter count)."""
    import torch

    from biovita.config import Stage2Config, StageConfig
    from biovita.models.checkpoint import load_biovita
    from biovita.train import freeze, losses
    from biovita.train.stages import get_stage

    st = get_stage(stage)
    model = load_biovita(init).to(device).train()
    groups = freeze.param_groups(model, st, StageConfig(lr=1e-4), Stage2Config())
    opt = torch.optim.AdamW(groups, fused=True)
    params = [p for g in groups for p in g["params"]]
    if backend:
        model.audio.compile(backend=backend)
        if "text" not in st.frozen:  # phase 2 trains the text tower
            model.clip.transformer.compile(backend=backend)
    tok = model.tokenizer()
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step(b: dict) -> None:
        with amp:
            tokens = tok(b["text"]).to(device)
            a = torch.nn.functional.normalize(model.encode_audio(b["mel"].to(device)).float(), dim=-1)
            scale = model.logit_scale.exp().float()
            if "text" in st.frozen:  # stage 1
                with torch.no_grad():  # the frozen text tower, every step
                    t = model.encode_text(tokens).float()
                loss = losses.atc(a, t, scale)
            else:
                with torch.no_grad():  # the frozen image tower, every step
                    v = model.encode_image(b["pixels"].to(device)).float()
                t = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
                loss = losses.atc(a, t, scale) + 0.1 * losses.aic(a, v, scale) + 0.1 * losses.itc(v, t, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def time_bare(stage: str, init: str, batch: int, steps: int, device: str, data: list[dict],
              backend: str | None) -> dict:
    import torch

    step, trainable = bare_loop(stage, init, batch, device, backend)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step(data[0])  # warm-up (and compilation)
    times = []
    for b in data[1:steps + 1]:
        sync()
        t = time.perf_counter()
        step(b)
        sync()
        times.append(time.perf_counter() - t)
    window = Window(device)
    for k, b in enumerate(data[steps + 1:steps + 4]):
        window.at(k, 0)
        step(b)
        sync()
    window.at(3, 0)
    flops = count_flops(lambda: step(data[0]))
    return row("bare compiled" if backend else "bare eager", stage, batch, statistics.median(times),
               flops, device, trainable, window.result())


# ----------------------------------------------------------------------------- measuring


class Window:
    """A torch profiler over 3 steps: kernel launches per step and the GPU's busy share
    (the union of kernel intervals over the window's wall time); aten ops per step on a CPU."""

    def __init__(self, device: str):
        self.device, self.prof, self.t0, self.out = device, None, 0.0, {}

    def at(self, step: int, start: int) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        if step == start and self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self.prof = profile(activities=acts)
            self.prof.start()
            self.t0 = time.perf_counter()
        elif step == start + 3 and self.prof is not None and not self.out:
            wall = time.perf_counter() - self.t0
            self.prof.stop()
            events = self.prof.events()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            ops = [e for e in events if e.name.startswith("aten::")]
            busy = _union([(e.time_range.start, e.time_range.end) for e in kernels]) / 1e6
            self.out = {"kernels_per_step": len(kernels) / 3 if kernels else None,
                        "aten_ops_per_step": len(ops) / 3,
                        "gpu_busy_share": busy / wall if kernels else None}

    def result(self) -> dict:
        return self.out


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def count_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def row(kind: str, stage: str, batch: int, step: float, flops: float, device: str, trainable: int,
        prof: dict) -> dict:
    import torch

    out = {"loop": kind, "stage": stage, "batch": batch, "step_s": step, "samples_per_s": batch / step,
           "flops_per_step": flops, "trainable_params": int(trainable), **prof}
    peak = peak_flops(torch.device(device))
    out["mfu"] = flops / step / peak if peak else None
    out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return out


def largest_batch(stage: str, init: str, model: str, out: Path, start: int, limit: int,
                  source: list[dict]) -> int | None:
    """Double the batch from `start` until a step runs out of GPU memory (or `limit`)."""
    import torch

    best, batch = None, start
    while batch <= limit:
        data = [_tile(b, batch) for b in source[:2]]
        try:
            stage_run(stage, init, model, batch, 1, out, "cuda", data, compile=False).run()
            best, batch = batch, batch * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return best


def _tile(b: dict, n: int) -> dict:
    """A batch of `n` rows repeated from `b`."""
    import torch

    reps = -(-n // len(b["text"]))
    return {k: (v.repeat(reps, *[1] * (v.ndim - 1))[:n] if isinstance(v, torch.Tensor) else
                (v * reps)[:n] if isinstance(v, list) else v) for k, v in b.items()}


def front_end(device: str, clips: int = 64) -> dict:
    """The CLAP log-mel on `device` (`LogMel`, batched) against the CPU front end (clip by clip)."""
    import numpy as np
    import torch

    from biovita.frontends.audio import AudioFrontEnd, LogMel

    fe = AudioFrontEnd()
    waves = (0.2 * np.random.default_rng(0).standard_normal((clips, fe.clip_samples))).astype(np.float32)
    cpu = LogMel(fe)
    t = time.perf_counter()
    ref = cpu(waves)
    cpu_rate = clips / (time.perf_counter() - t)
    dev = LogMel(fe, device)
    x = torch.from_numpy(waves).half().to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up, then timed
        sync()
        t = time.perf_counter()
        mel = dev(x, batched=True)
        sync()
        dev_rate = clips / (time.perf_counter() - t)
    half = cpu(torch.from_numpy(waves).half())
    return {"device": device, "clips_per_s": dev_rate, "cpu_clips_per_s": cpu_rate,
            "max_abs_db_difference": float((mel.cpu() - half).abs().max()),
            "float16_input_mean_abs_db": float((half - ref).abs().mean())}


def precision(init: str, model: str, out: Path, device: str, data: list[dict], steps: int = 3) -> dict:
    """Phase 2 for a few steps on the same batch in bf16 and in fp32: loss, ATC and the gate."""
    same = data[:1] * (steps + 1)
    rows = {}
    for prec in ("bf16", "fp32"):
        logged = []
        run = stage_run(stages()[1], init, model, len(same[0]["text"]), steps, out, device, same,
                        prec, compile=False)
        run.job.callbacks.append(  # this step's scalars: the last of the meter's window
            lambda info, run=run: logged.append({k: float(v[-1]) for k, v in run.meter.values.items()}))
        run.run()
        rows[prec] = {"baseline_atc": run.state["baseline_atc"], "loss": [x.get("loss") for x in logged],
                      "atc": [x.get("atc") for x in logged], "atc_ema": float(run.gate.ema)}
    rows["max_abs_atc_difference"] = max(abs(a - b) for a, b in zip(rows["bf16"]["atc"], rows["fp32"]["atc"]))
    rows["baseline_relative_difference"] = abs(rows["bf16"]["baseline_atc"] / rows["fp32"]["baseline_atc"] - 1)
    return rows


def main() -> None:
    import tempfile

    import torch
    import torch.distributed as dist

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit-l14-htsat-random")
    p.add_argument("--batches", default="64,32", help="per-GPU batch of stage 1, of phase 2 (the paper's)")
    p.add_argument("--large", type=int, default=256, help="a larger batch for both (0: none)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch tried (GPU only)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the bare compiled loop (aot_eager: the same graphs "
                        "without code generation, a quick check of the script on a CPU)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1", **({} if device == "cuda" else {"DS_ACCELERATOR": "cpu"}))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    from biovita.models.checkpoint import load_biovita, save_model
    from biovita.models.factory import create_model

    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
              "model": a.model, "torch": torch.__version__, "compile_backend": a.compile_backend,
              "rows": []}
    sizes = dict(zip(stages(), (int(x) for x in a.batches.split(","))))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d)
        save_model(create_model(a.model), out / "init")
        init = str(out / "init")
        frozen = load_biovita(init).to(device).eval()
        for stage in stages():
            for batch in [sizes[stage]] + ([a.large] if a.large else []):
                data = batches(a.steps + 5, batch, frozen)
                for fn in (lambda: time_biovita(stage, init, a.model, batch, a.steps, out, device, data),
                           lambda: time_bare(stage, init, batch, a.steps, device, data, None),
                           lambda: time_bare(stage, init, batch, a.steps, device, data, a.compile_backend)):
                    report["rows"].append(fn())
                    print(json.dumps(report["rows"][-1]), flush=True)
                    save(report, a.json)  # each row as it comes: a run cut short keeps its rows
                    if device == "cuda":
                        torch.cuda.empty_cache()
        if device == "cuda":
            src = batches(2, 8, frozen)
            report["largest_batch"] = {s: largest_batch(s, init, a.model, out, max(a.large, sizes[s]),
                                                        a.max_batch, src) for s in stages()}
        report["front_end"] = front_end(device)
        report["precision"] = precision(init, a.model, out, device, batches(1, 8, frozen))
    print(json.dumps(report, indent=1))
    save(report, a.json)
    dist.destroy_process_group()


def save(report: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
