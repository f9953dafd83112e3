"""The worker loop of one stage: the same code on every worker of a Ray Train run.

`train_loop_per_worker` is what `TorchTrainer` runs; it hands `StageRun` a `RayTrainIO`, the
only place that calls Ray Train (`get_context`, `get_dataset_shard`, `get_checkpoint`,
`report`). The model, the losses and the stage declarations come from the library; this
file composes them.

A step that does not log reads nothing back to the host: clips arrive as waveforms and their
log-mels are computed on the worker's device, a frozen tower's embeddings arrive with the
batch, the loss terms and metrics stay on the device until the logging step averages them
over the workers (one collective and one host read per logging interval), and phase 2's gate
decides on the device.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from biovita.bench.validation import ValidationSet, score
from biovita.data.datasets import TorchCollate
from biovita.data.stats import bad_media_counts, record_node
from biovita.config import Config
from biovita.data.store import fetch_dir, filesystem
from biovita.errors import CheckpointError
from biovita.frontends.audio import LogMel
from biovita.models.checkpoint import load_biovita
from biovita.tracking.runs import RunLogger
from biovita.train import freeze, losses, schedules
from biovita.train.engine import Engine
from biovita.train.export import export_consolidated
from biovita.train.stages import BASELINE_ATC, GATE_OPEN, GATE_OPEN_SHARE, LossInputs, Stage, get_stage


@dataclass
class StageJob:
    """What the driver sends to every worker of a stage (Ray pickles it whole: the typed
    config travels as it is)."""

    config: Config  # validated on the driver
    stage: str
    steps_per_epoch: int
    init_checkpoint: str  # model folder (or URI) the stage starts from
    export_to: str  # where the consolidated model goes at the end
    taxa: list[dict] = field(default_factory=list)  # stored with the exported model
    mlflow: RunLogger | None = None  # the stage's run: rank 0 logs there
    report_every_log: bool = False  # a metrics-only report per log line (Tune's ASHA)
    progress_to: str = ""  # where rank 0 notes the epoch of each persisted checkpoint
    interactive: bool = False  # a person watches the driver's terminal: a progress bar, not lines
    callbacks: list[Callable[["StepInfo"], None]] = field(default_factory=list)  # after each step


@dataclass
class StepInfo:
    """What step callbacks see, on every rank, after each optimizer step (`run` gives them
    the model, the engine and the state, for inspection)."""

    step: int
    epoch: int
    rank: int
    world: int
    run: Any = None


class RayTrainIO:
    """The worker's side of Ray Train."""

    def __init__(self) -> None:
        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        record_node("train")

    def device(self, use_gpu: bool) -> torch.device:
        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def batches(self, batch_size: int, prefetch: int) -> Iterator[dict]:
        """The worker's shard of the stage's stream: each epoch already in a uniformly random
        order (`biovita.data.datasets.stream_dataset`), so no shuffle buffer here."""
        shard = self.train.get_dataset_shard("train")
        return iter(shard.iter_torch_batches(batch_size=batch_size, collate_fn=TorchCollate(),
                                             drop_last=True, prefetch_batches=prefetch))

    def checkpoints(self) -> Iterator:
        """The stage's checkpoints to resume from, newest first, each a context manager giving
        a local folder: Ray Train's latest, then the older ones it kept beside it (for when the
        latest is damaged)."""
        latest = self.train.get_checkpoint()
        if latest is None:
            return
        yield latest.as_directory()
        fs, parent = latest.filesystem, latest.path.rstrip("/").rsplit("/", 1)[0]
        older = sorted((i.path for i in fs.get_file_info(pafs.FileSelector(parent))
                        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
                        and i.path.rstrip("/") != latest.path.rstrip("/")), reverse=True)
        for path in older:
            yield self.train.Checkpoint(path=path, filesystem=fs).as_directory()

    def report(self, metrics: dict, directory: str | None = None) -> None:
        ck = self.train.Checkpoint.from_directory(directory) if directory else None
        self.train.report(metrics, checkpoint=ck)

    def skipped_media(self) -> dict[str, float]:
        try:
            bad = bad_media_counts()["bad"]
        except Exception:  # no stats actor (a bare Ray Train run): nothing to add
            return {}
        return {f"skipped/{t}/{r}": n for t, reasons in bad.items() for r, n in reasons.items()}


class LocalIO:
    """The worker's side of training without Ray Train (a benchmark, a test, a notebook): the
    batches from memory, rank and world size from torch.distributed (one process without it),
    and each reported checkpoint merged (every rank writes its shard) into
    `<out>/checkpoint_<n>`; `resume` starts from such a folder."""

    def __init__(self, batches, out: str | Path, resume: str | None = None):
        self._batches, self.out, self.resume = batches, Path(out), resume
        on = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if on else (0, 1)
        self.reports = 0

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")

    def batches(self, batch_size: int, prefetch: int) -> Iterator[dict]:
        # copies: the loop pops keys, and the baseline pass and training may both read the list;
        # `epoch` as TorchCollate gives it (an int)
        for b in self._batches:
            epoch = b.get("epoch", 0)
            yield {**b, "epoch": int(epoch.min()) if isinstance(epoch, torch.Tensor) else int(epoch)}

    def checkpoints(self) -> Iterator:
        if self.resume:
            yield contextlib.nullcontext(self.resume)

    def report(self, metrics: dict, directory: str | None = None) -> None:
        if directory:
            self.reports += 1
            shutil.copytree(directory, self.out / f"checkpoint_{self.reports}", dirs_exist_ok=True)
        if self.world > 1:
            dist.barrier()

    def skipped_media(self) -> dict[str, float]:
        return {}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: `train_loop_config={"job": StageJob(...)}`."""
    run = StageRun(config["job"], RayTrainIO())
    # the training node's own CPU/GPU use, into the stage's run (rank 0 only)
    with (run.logger.system_metrics() if run.logger and run.cfg.mlflow.system_metrics
          else contextlib.nullcontext()):
        run.run()


# the tower each modality's encoder runs (`train.compile` compiles those a stage's steps run)
TOWERS = {"audio": lambda m: m.audio, "text": lambda m: m.clip.transformer,
          "image": lambda m: m.clip.visual}


class StageRun:
    """One stage on one worker: model, engine and state, restored from the last checkpoint."""

    def __init__(self, job: StageJob, io):
        self.job, self.io = job, io
        self.cfg: Config = job.config
        self.stage: Stage = get_stage(job.stage)
        self.settings = self.stage.settings(self.cfg)
        self.s2 = s2 = self.cfg.stage2
        torch.manual_seed(self.cfg.train.seed * 1000 + io.rank)  # once, before any module init
        # the stream starts now: its decoders start and decode the first batch while the model
        # loads and the engine is built (its start epoch is the driver's, not the checkpoint's)
        self.stream = started(io.batches(self.settings.batch_size, self.cfg.train.prefetch_batches))
        self.logger = job.mlflow if io.rank == 0 else None
        model = load_biovita(fetch_dir(job.init_checkpoint))
        model.train()
        if self.stage.reset_logit_scale:
            freeze.reset_logit_scale(model.logit_scale, s2.logit_reset_temperature)
        groups = freeze.param_groups(model, self.stage, self.settings, s2)
        device = io.device(self.cfg.train.use_gpu)
        self.eng = Engine(model, groups, self.cfg, self.settings.batch_size,
                          self.stage.betas(self.cfg), s2.eps, self.stage.grad_clip(self.cfg),
                          device, io.rank)
        self.module = self.eng.module
        self.tokenizer = self.module.tokenizer()
        self.log_mel = LogMel(self.module.audio_front_end, device)
        self.compiled = self._compile() if self.cfg.train.compiles() else []
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "gate": None, "baseline_atc": None,
                                      "gate_open_steps": 0}
        self._resume(io)
        self.gate = (schedules.ATCGate.from_state(self.state["gate"], device) if self.state.get("gate")
                     else self._new_gate(self.state.get("baseline_atc") or 1.0))
        self.gate_open_steps = torch.tensor(float(self.state["gate_open_steps"]), device=device)
        total = self.settings.epochs * job.steps_per_epoch
        self.total_steps = min(total, self.settings.max_steps) if self.settings.max_steps else total
        self.step_log: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.val, self.val_metrics = None, {}
        if self.cfg.train.validation:
            self.val = ValidationSet.load(self.cfg.train.validation)

    def _new_gate(self, baseline: float) -> schedules.ATCGate:
        s2 = self.s2
        return schedules.ATCGate(baseline=baseline, alpha=s2.gate_alpha, off_ratio=s2.gate_off_ratio,
                                 on_ratio=s2.gate_on_ratio, patience=s2.gate_patience,
                                 device=self.eng.device)

    def _compile(self) -> list[str]:
        """torch.compile (in place: parameter names and checkpoints unchanged) the towers
        this stage's steps run; frozen towers whose embeddings come cached run nowhere."""
        names = [m for m in self.stage.inputs if m not in self.stage.frozen]
        for m in names:
            TOWERS[m](self.module).compile()
        if self.io.rank == 0:
            print(f"[{self.stage.name}] train.compile: the {', '.join(names)} tower(s) are "
                  "compiled with torch.compile at the first step", flush=True)
        return names

    def _resume(self, io) -> None:
        """Restore the newest checkpoint that is whole; a damaged one (a file cut short or
        changed since it was written) is reported and the one before it is used."""
        damaged, loaded = 0, False
        for candidate in io.checkpoints():
            with candidate as d:
                try:
                    self.state, loaded = self.eng.load(d), True
                except CheckpointError as e:
                    damaged += 1
                    if io.rank == 0:
                        print(f"[{self.stage.name}] checkpoint damaged, not used: {e}", flush=True)
            if loaded:
                break
        if io.rank != 0 or not (loaded or damaged):
            return
        step = self.state["step"]
        print(f"[{self.stage.name}] " + (
            f"resumed from checkpoint at step {step} (data from the start of epoch "
            f"{self.state['epoch']})" if loaded else "no whole checkpoint: the stage starts over")
            + (f"; {damaged} newer damaged checkpoint(s) skipped" if damaged and loaded else ""), flush=True)
        if self.logger:
            self.logger.metrics({"resumed_from_step": step, "damaged_checkpoints": damaged}, step=step)

    # ------------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Stream the stage's batches to its last step, then checkpoint and export the model.

        One stream for the whole stage: every epoch in turn (from the checkpoint's epoch on,
        after a restart), rows tagged with their epoch. A batch counts as its oldest epoch
        (the end of one epoch can share a batch with the start of the next)."""
        cfg, s = self.cfg, self.state
        k = cfg.train.accum_freq
        batches = iter(()) if s["step"] >= self.total_steps else self.stream
        if self.stage.measures_baseline and s.get("baseline_atc") is None:
            batches = self._measure_baseline(batches)
        self.meter = _Meter(self.settings.batch_size * self.io.world * k, s["step"])
        self.last_metrics: dict[str, float] = {}
        micro: list[dict] = []
        while s["step"] < self.total_steps:
            batch = self.meter.timed(lambda: next(batches, None))
            if batch is None:
                break
            epoch = batch.pop("epoch")
            micro.append(batch)
            if len(micro) < k:
                continue
            parts = self._first_step(micro) if self.compiled and not self.meter.steps else self._train_step(micro)
            micro = []
            s["step"] += 1
            s["epoch"] = epoch
            if GATE_OPEN in parts:
                self.gate_open_steps += parts[GATE_OPEN]
            self.meter.add({key: v for key, v in parts.items() if key not in self.stage.per_step})
            if self.stage.per_step:
                self.step_log.append((s["step"], {key: parts[key] for key in self.stage.per_step}))
            for callback in self.job.callbacks:
                callback(StepInfo(s["step"], epoch, self.io.rank, self.io.world, self))
            self._after_step()
        s["epoch"] = self.settings.epochs
        if self.val is not None:
            self._validate()
        final = {**self.last_metrics, **self.val_metrics, "step": s["step"],
                 "baseline_atc": s.get("baseline_atc") or 0.0}
        if self.stage.measures_baseline and s["step"]:
            final[GATE_OPEN_SHARE] = float(self.gate_open_steps) / s["step"]
        final.setdefault("top1_batch", 0.0)
        self._save(final, final=True)

    def _first_step(self, micro: list[dict]) -> dict[str, torch.Tensor]:
        """The first step, where torch.compile compiles: a failure names the towers and the
        way out; graph breaks (parts left to eager mode) are said, not hidden."""
        try:
            parts = self._train_step(micro)
        except Exception as e:  # (dynamo's and inductor's errors have no common base class)
            raise RuntimeError(
                f"[{self.stage.name}] train.compile: torch.compile failed on the "
                f"{', '.join(self.compiled)} tower(s): {type(e).__name__}: {str(e).splitlines()[0][:300]} "
                "(train.compile=false runs them eagerly)") from e
        from torch._dynamo.utils import counters  # (here: importing dynamo costs a worker ~1 s)

        breaks = counters.get("graph_break", {})
        if self.io.rank == 0:
            detail = "; ".join(f"{n} x {str(r).splitlines()[0][:80]}" for r, n in list(breaks.items())[:3])
            print(f"[{self.stage.name}] train.compile: compiled, {sum(breaks.values())} graph "
                  f"break(s){': ' + detail if detail else ''}", flush=True)
        return parts

    def _measure_baseline(self, batches: Iterator[dict]) -> Iterator[dict]:
        """baseline_ATC (the method's phase 2): after the logit-scale reset and before any
        update, in eval mode without gradients, the mean ATC over the first
        `stage2.baseline_batches` batches of this stage's data (3.0 if none is finite). The
        batches read are then trained on. Read on the host once, before the first step."""
        head = list(itertools.islice(batches, self.s2.baseline_batches))
        n = losses.all_min(len(head))  # every rank the same number: the loss gathers across them
        self.module.eval()
        with torch.no_grad():
            scale = self.module.logit_scales()["model"].float()
            values = [self._batch_atc(b, scale) for b in head[:n]]
        self.module.train()
        finite = [v for v in values if math.isfinite(v)]
        local, count = (sum(finite) / len(finite), 1.0) if finite else (0.0, 0.0)
        total, ranks = losses.all_mean([local * count, count])
        baseline = total / ranks if ranks > 0 else 3.0
        self.state["baseline_atc"] = baseline
        self.gate = self._new_gate(baseline)
        if self.io.rank == 0:
            print(f"[{self.stage.name}] baseline ATC {baseline:.4f} (eval mode, {n} batches)",
                  flush=True)
            if self.logger:
                self.logger.metrics({BASELINE_ATC: baseline}, step=0)
        return itertools.chain(head, batches)

    def _batch_atc(self, batch: dict, scale: torch.Tensor) -> float:
        """ATC of one batch with the model as it is (no gradient bookkeeping)."""
        feats = self._features({m: batch[col] for m, col in self.stage.inputs.items()
                                if m in ("audio", "text")})
        return float(losses.atc(feats["audio"], feats["text"], scale))

    def _after_step(self) -> None:
        """Log (every `log_every` steps and at the end) and checkpoint (`checkpoint_every`)."""
        cfg, step = self.cfg.train, self.state["step"]
        checkpoint = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if step % cfg.log_every == 0 or step >= self.total_steps:
            self._log()
            if self.job.report_every_log and not checkpoint and self.val is None:
                self.io.report({**self.last_metrics, "step": step})  # for Tune's ASHA
        if (self.val is not None and step % self.job.steps_per_epoch == 0
                and step < self.total_steps):  # an epoch ended (each has steps_per_epoch steps)
            self._validate()
            self.io.report({**self.last_metrics, **self.val_metrics, "step": step})
        if checkpoint and step < self.total_steps:
            self._save({**self.last_metrics, **self.val_metrics, "step": step})

    def _validate(self) -> None:
        """Score the validation set (every rank: under ZeRO-3 a forward needs them all)."""
        module, dev, dtype = self.module, self.eng.device, self.eng.dtype
        was = module.training
        module.eval()
        res = score(self.val, {"mel": lambda x: module.encode_audio(x.to(dev, dtype)),
                               "pixels": lambda px: module.encode_image(px.to(dev)),
                               "text": lambda t: module.encode_text(self.tokenizer(t).to(dev))})
        module.train(was)
        self.val_metrics = {f"val/{k}": v for k, v in res.items()}
        if self.io.rank == 0:
            print(f"[{self.stage.name}] validation after step {self.state['step']}: mean Top-1 "
                  f"{res['top1']:.3f} (" + " ".join(f"{k} {v:.2f}" for k, v in res.items() if k != "top1")
                  + ")", flush=True)
            if self.logger:
                self.logger.metrics(self.val_metrics, step=self.state["step"])

    def _encoders(self) -> dict[str, Callable]:
        """Each modality's encoder, by the batch column the stage feeds it."""
        module, dev, dtype = self.module, self.eng.device, self.eng.dtype
        by_column = {
            "text": lambda texts: module.encode_text(self.tokenizer(texts).to(dev, non_blocking=True)),
            # float16 waveforms -> log-mels on this device (float32), then the tower's dtype
            "wave": lambda wave: module.encode_audio(self.log_mel(wave).to(dtype)),
            "pixels": lambda px: module.encode_image(px.to(dev, non_blocking=True)),  # uint8: normalised here
            # a frozen tower's embeddings, made once before the stage (`biovita.embed.cache`)
            "text_emb": lambda x: x.to(dev, non_blocking=True),
            "image_emb": lambda x: x.to(dev, non_blocking=True),
        }
        return {m: by_column[col] for m, col in self.stage.inputs.items()}

    def _features(self, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Embeddings in float32 whatever the towers ran in (NaN/inf zeroed, renormalised):
        similarities and losses are float32 (the method's numerics)."""
        encoders = self._encoders()
        return {m: _fp32(encoders[m](x)) for m, x in inputs.items()}

    def _train_step(self, micro: list[dict]) -> dict[str, torch.Tensor]:
        """Forward + backward of one optimizer step (k micro-batches), then the update."""
        stage, eng, module, step = self.stage, self.eng, self.module, self.state["step"]
        freeze.apply_delays(module, eng.optimizer, stage, step, self.s2)
        encoders = {m: (lambda enc: lambda x: _fp32(enc(x)))(enc) for m, enc in self._encoders().items()}
        mbs = [{m: b[col] for m, col in stage.inputs.items()} for b in micro]
        logged: dict[str, torch.Tensor] = {}

        def loss_fn(feats: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
            scale = module.logit_scales()[stage.scale].float()
            scale = scale if first else scale.detach()
            loss, parts = stage.loss(LossInputs(feats, scale, first, step, self.s2, self.gate))
            if first:
                logged.update(parts)
            return loss

        if len(mbs) == 1:
            eng.backward(loss_fn({m: enc(mbs[0][m]) for m, enc in encoders.items()}, True))
        else:
            losses.accumulate_contrastive(encoders, mbs, loss_fn, backward=eng.backward)
        eng.step()
        eng.clamp(module.logit_scale_param(stage.scale))  # open_clip's training clamps its scale too
        return logged

    def _learning_rates(self) -> dict[str, float]:
        """Each optimizer group's learning rate this step (0 before its delayed start)."""
        return {f"lr/{g['name']}": g["lr"] if g.get("active", True) else 0.0
                for g in self.eng.optimizer.param_groups}

    # ------------------------------------------------------------------------ output
    def _log(self) -> None:
        """The logging step: the window's means over the workers (every rank: one collective),
        read to the host once; rank 0 prints and logs them, and the per-step scalars."""
        s, module = self.state, self.module
        window = self.meter.window(s["step"])
        scale = self.eng.master_value(module.logit_scale_param(self.stage.scale))
        self.last_metrics = {**window, **self._learning_rates(), "epoch": s["epoch"],
                             "logit_scale": float(scale.exp())}
        steps, self.step_log = self.step_log, []
        if self.io.rank != 0:
            return
        self._progress(self.last_metrics)
        m = self.last_metrics
        if self.logger:
            self.logger.metrics({**m, **self.io.skipped_media()}, step=s["step"])
            self.logger.step_metrics(_host(steps))

    def _progress(self, m: dict) -> None:
        """In a terminal, the stage's bar (Ray's, drawn by the driver); in a log file, a line
        at the first logging step, then about every tenth of the stage, and at the end."""
        step = self.state["step"]
        text = (f"loss {m['loss']:.4f} {m['samples_per_s']:.1f} samples/s "
                f"(data wait {m['data_wait']:.0%})")
        if self.job.interactive:
            if not hasattr(self, "bar"):
                from ray.experimental.tqdm_ray import tqdm

                self.bar = tqdm(total=self.total_steps, desc=f"[{self.stage.name}]", unit="step")
                self.bar.update(step)
            self.bar.update(step - self.bar.n)
            self.bar.set_description(f"[{self.stage.name}] {text}")
            if step >= self.total_steps:
                self.bar.close()
            return
        every = max(self.cfg.train.log_every, self.total_steps // 10)
        if step == self.meter.first_log or step >= self.total_steps or step % every < self.cfg.train.log_every:
            eta = self.meter.eta(step, self.total_steps)
            print(f"[{self.stage.name}] step {step}/{self.total_steps} {text} "
                  f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)

    def _save(self, metrics: dict, final: bool = False) -> None:
        """Checkpoint (every rank its shard), report it, and at the end export the model."""
        s = self.state
        s["gate"] = self.gate.state_dict()
        s["gate_open_steps"] = float(self.gate_open_steps)
        with tempfile.TemporaryDirectory() as d:
            self.eng.save(d, dict(s))
            if final:
                export_consolidated(self.eng, self.module, self.job.export_to, self.stage.name, s,
                                    metrics, self.job.taxa)
            self.io.report(metrics, d)
        if self.io.rank == 0 and self.job.progress_to:  # after the checkpoint is persisted
            write_progress(self.job.progress_to, s)


def started(items: Iterator) -> Iterator:
    """`items`, its first item fetched from now on in a thread of its own."""
    first: dict[str, Any] = {}

    def fetch() -> None:
        try:
            first["item"] = next(items, None)
        except BaseException as e:  # raised where the item is asked for
            first["error"] = e

    thread = threading.Thread(target=fetch, name="biovita-first-batch", daemon=True)
    thread.start()

    def rest() -> Iterator:
        thread.join()
        if "error" in first:
            raise first["error"]
        if first["item"] is not None:
            yield first["item"]
            yield from items

    return rest()


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.nan_to_num(x.float()), dim=-1)


def _host(steps: list[tuple[int, dict[str, torch.Tensor]]]) -> list[tuple[int, dict[str, float]]]:
    """Per-step device scalars as floats, read in one transfer."""
    if not steps:
        return []
    keys = list(steps[0][1])
    values = torch.stack([torch.stack([v[k].float() for k in keys]) for _, v in steps]).tolist()
    return [(step, dict(zip(keys, row))) for (step, _), row in zip(steps, values)]


class _Meter:
    """Per-window means of the logged scalars (kept on the device until the window closes),
    throughput and the time spent waiting for data."""

    def __init__(self, samples_per_step: int, step: int):
        self.samples_per_step = samples_per_step
        self.values: dict[str, list[torch.Tensor]] = {}
        self.wait, self.steps = 0.0, 0
        self.first_log: int | None = None  # the step of the first window (the first line)
        self.t_last, self.step_last = time.time(), step
        self.t_start, self.step_start = self.t_last, step

    def timed(self, fetch):
        t = time.perf_counter()
        out = fetch()
        self.wait += time.perf_counter() - t
        return out

    def add(self, parts: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        for key, v in parts.items():
            self.values.setdefault(key, []).append(v.detach().float().reshape(()))

    def window(self, step: int) -> dict[str, float]:
        """The window's means over the workers (every rank calls it at the same steps)."""
        now = time.time()
        dt = max(now - self.t_last, 1e-6)
        keys = sorted(self.values)
        out: dict[str, float] = {}
        if keys:
            means = torch.stack([torch.stack(self.values[k]).mean() for k in keys])
            out = dict(zip(keys, losses.mean_over_ranks(means).tolist()))
        out.update(samples_per_s=(step - self.step_last) * self.samples_per_step / dt,
                   data_wait=self.wait / dt)
        self.values, self.wait, self.t_last, self.step_last = {}, 0.0, now, step
        self.first_log = step if self.first_log is None else self.first_log
        return out

    def eta(self, step: int, total: int) -> float:
        rate = (step - self.step_start) / max(time.time() - self.t_start, 1e-6)
        return (total - step) / max(rate, 1e-9)


def write_progress(uri: str, state: dict) -> None:
    """Where the last checkpoint stands in the data: the next (re)start streams from here."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"epoch": state["epoch"], "step": state["step"]}).encode())
