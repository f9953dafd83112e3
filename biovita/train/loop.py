"""The worker loop of one stage: the same code on every worker of a Ray Train run.

`train_loop_per_worker` is what `TorchTrainer` runs; it hands `StageRun` a `RayTrainIO`, the
only place that calls Ray Train (`get_context`, `get_dataset_shard`, `get_checkpoint`,
`report`). The model, the losses and the stage declarations come from the library; this
file composes them.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from biovita.config import Config, config_from_dict
from biovita.train import freeze, losses, schedules
from biovita.train.engine import Engine
from biovita.train.stages import LossInputs, Stage, get_stage
from biovita.train.tracking import RunLogger


@dataclass
class StageJob:
    """What the driver sends to every worker of a stage."""

    config: dict  # Config.to_dict(), validated on the driver
    stage: str
    steps_per_epoch: int
    init_checkpoint: str  # model folder (or URI) the stage starts from
    export_to: str  # where the consolidated model goes at the end
    taxa: list[dict] = field(default_factory=list)  # stored with the exported model
    baseline_atc: float | None = None  # phase 2: phase 1's ATC baseline
    mlflow: dict | None = None  # {"uri", "run_id"}: rank 0 logs there
    report_every_log: bool = False  # a metrics-only report per log line (Tune's ASHA)
    progress_to: str = ""  # where rank 0 notes the epoch of each persisted checkpoint
    callbacks: list[Callable[["StepInfo"], None]] = field(default_factory=list)  # after each step


@dataclass(frozen=True)
class StepInfo:
    """What step callbacks see (on every rank, after each optimizer step)."""

    step: int
    epoch: int
    rank: int
    world: int


class RayTrainIO:
    """The worker's side of Ray Train."""

    def __init__(self) -> None:
        import ray.train

        from biovita.data.stats import record_node

        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        record_node("train")

    def device(self, use_gpu: bool) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device() if use_gpu else torch.device("cpu")

    def batches(self, batch_size: int, prefetch: int, seed: int) -> Iterator[dict]:
        from biovita.data.datasets import TorchCollate

        shard = self.train.get_dataset_shard("train")
        return iter(shard.iter_torch_batches(
            batch_size=batch_size, collate_fn=TorchCollate(), drop_last=True,
            local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=seed,
            prefetch_batches=prefetch))

    @contextlib.contextmanager
    def checkpoint(self):
        ck = self.train.get_checkpoint()
        if ck is None:
            yield None
            return
        with ck.as_directory() as d:
            yield d

    def report(self, metrics: dict, directory: str | None = None) -> None:
        ck = self.train.Checkpoint.from_directory(directory) if directory else None
        self.train.report(metrics, checkpoint=ck)

    def skipped_media(self) -> dict[str, float]:
        from biovita.data.stats import bad_media_counts

        try:
            bad = bad_media_counts()["bad"]
        except Exception:  # no stats actor (a bare Ray Train run): nothing to add
            return {}
        return {f"skipped/{t}/{r}": n for t, reasons in bad.items() for r, n in reasons.items()}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point: `train_loop_config={"job": StageJob(...)}`."""
    StageRun(config["job"], RayTrainIO()).run()


class StageRun:
    """One stage on one worker: model, engine and state, restored from the last checkpoint."""

    def __init__(self, job: StageJob, io):
        from biovita.data.store import fetch_dir
        from biovita.models.checkpoint import load_model

        self.job, self.io = job, io
        self.cfg: Config = config_from_dict(job.config)
        self.stage: Stage = get_stage(job.stage)
        self.settings = self.stage.settings(self.cfg)
        self.s2 = self.cfg.stage2
        torch.manual_seed(self.cfg.train.seed * 1000 + io.rank)  # once, before any module init
        self.logger = RunLogger(**job.mlflow) if (io.rank == 0 and job.mlflow) else None
        model = load_model(fetch_dir(job.init_checkpoint))
        model.train()
        if self.stage.reset_logit_scale:
            freeze.reset_logit_scale(model.logit_scale, self.s2.logit_reset_temperature)
        groups = freeze.param_groups(model, self.stage, self.settings, self.s2)
        self.eng = Engine(model, groups, self.cfg, self.settings.batch_size, self.s2.betas,
                          self.s2.eps, io.device(self.cfg.train.use_gpu), io.rank)
        self.module = self.eng.module
        self.tokenizer = self.module.tokenizer()
        self.state: dict[str, Any] = {"epoch": 0, "step": 0, "gate": None, "atc_hist": [],
                                      "baseline_atc": job.baseline_atc}
        with io.checkpoint() as d:
            if d:
                self.state = self.eng.load(d)
                self._resumed()
        s = self.state
        s2 = self.s2
        self.gate = (schedules.ATCGate.from_state(s["gate"]) if s.get("gate") else
                     schedules.ATCGate(baseline=s["baseline_atc"] or 1.0, alpha=s2.gate_alpha,
                                       off_ratio=s2.gate_off_ratio, on_ratio=s2.gate_on_ratio,
                                       patience=s2.gate_patience))
        self.atc_hist = schedules.BaselineMeter(n=s2.baseline_batches, values=list(s.get("atc_hist", [])))
        total = self.settings.epochs * job.steps_per_epoch
        self.total_steps = min(total, self.settings.max_steps) if self.settings.max_steps else total

    def _resumed(self) -> None:
        if self.io.rank != 0:
            return
        step = self.state["step"]
        print(f"[{self.stage.name}] resumed from checkpoint at step {step} "
              f"(data from the start of epoch {self.state['epoch']})", flush=True)
        if self.logger:
            self.logger.metrics({"resumed_from_step": step}, step=step)

    # ------------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Stream the stage's batches to its last step, then checkpoint and export the model.

        One stream for the whole stage: every epoch in turn (from the checkpoint's epoch on,
        after a restart), rows tagged with their epoch. Decode tasks finish out of order, so
        the end of one epoch mixes with the start of the next; a batch counts as its oldest
        epoch."""
        cfg, s = self.cfg, self.state
        k = cfg.train.accum_freq
        batches = iter(()) if s["step"] >= self.total_steps else self.io.batches(
            self.settings.batch_size, cfg.train.prefetch_batches,
            cfg.train.seed * 7919 + s["epoch"] * 31 + self.io.rank)
        self.meter = _Meter(self.settings.batch_size * self.io.world * k, s["step"])
        self.last_metrics: dict[str, float] = {}
        micro: list[dict] = []
        while s["step"] < self.total_steps:
            batch = self.meter.timed(lambda: next(batches, None))
            if batch is None:
                break
            epoch = int(batch.pop("epoch").min())
            micro.append(batch)
            if len(micro) < k:
                continue
            parts = self._train_step(micro)
            micro = []
            s["step"] += 1
            s["epoch"] = epoch
            if "atc" in parts:
                self.atc_hist.add(parts["atc"])
            self.meter.add(parts)
            info = StepInfo(s["step"], epoch, self.io.rank, self.io.world)
            for callback in self.job.callbacks:
                callback(info)
            self._after_step()
        s["epoch"] = self.settings.epochs
        if self.stage.name == "stage2.phase1" and self.atc_hist.value is not None:
            s["baseline_atc"] = self.atc_hist.value  # phase 2's gate and guard
        final = {**self.last_metrics, "step": s["step"], "baseline_atc": s.get("baseline_atc") or 0.0}
        final.setdefault("top1_batch", 0.0)
        self._save(final, final=True)

    def _after_step(self) -> None:
        """Log (every `log_every` steps and at the end) and checkpoint (`checkpoint_every`)."""
        cfg, step = self.cfg.train, self.state["step"]
        checkpoint = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
        if step % cfg.log_every == 0 or step >= self.total_steps:
            self._log()
            if self.job.report_every_log and not checkpoint:
                self.io.report({**self.last_metrics, "step": step})  # for Tune's ASHA
        if checkpoint and step < self.total_steps:
            self._save({**self.last_metrics, "step": step})

    def _train_step(self, micro: list[dict]) -> dict[str, float]:
        """Forward + backward of one optimizer step (k micro-batches), then the update."""
        stage, eng, module, step = self.stage, self.eng, self.module, self.state["step"]
        freeze.apply_group_schedule(eng.optimizer, stage, step, self.s2)
        dev, dtype = eng.device, eng.dtype
        scale_param = module.clip.logit_scale if stage.scale == "clip" else module.logit_scale
        by_column = {
            "text": lambda texts: module.encode_text(self.tokenizer(texts).to(dev)),
            "mel": lambda mel: module.encode_audio(mel.to(dev, dtype)),
            "pixels": lambda px: module.encode_image(px.to(dev)),  # uint8: normalised on the device
            # precomputed embeddings of the frozen image tower
            "image_emb": lambda x: torch.nn.functional.normalize(x.to(dev, dtype), dim=-1),
        }
        encoders = {m: by_column[col] for m, col in stage.inputs.items()}
        mbs = [{m: b[col] for m, col in stage.inputs.items()} for b in micro]
        logged: dict[str, float] = {}

        def loss_fn(feats: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
            scale = scale_param.exp() if first else scale_param.exp().detach()
            loss, parts = stage.loss(LossInputs(feats, scale, first, step, self.s2, self.gate))
            logged.update(parts)
            return loss

        if len(mbs) == 1:
            eng.backward(loss_fn({m: enc(mbs[0][m]) for m, enc in encoders.items()}, True))
        else:
            losses.accumulate_contrastive(encoders, mbs, loss_fn, backward=eng.backward)
        if "atc" in logged:
            logged["atc"], = losses.all_mean([logged["atc"]])
        eng.step()
        if stage.scale == "model":
            with eng.gathered([module.logit_scale]):
                losses.clamp_logit_scale(module.logit_scale)
        return logged

    # ------------------------------------------------------------------------ output
    def _log(self) -> None:
        s, module = self.state, self.module
        window = self.meter.window(s["step"])
        self.last_metrics = {**window, "epoch": s["epoch"],
                             "logit_scale": float(module.logit_scale.detach().float().exp())}
        for g in self.eng.optimizer.param_groups:
            self.last_metrics[f"lr/{g['name']}"] = g["lr"]
        if self.io.rank != 0:
            return
        m = self.last_metrics
        eta = self.meter.eta(s["step"], self.total_steps)
        print(f"[{self.stage.name}] step {s['step']}/{self.total_steps} loss {m['loss']:.4f} "
              f"{m['samples_per_s']:.1f} samples/s (data wait {m['data_wait']:.0%}) "
              f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
        if self.logger:
            self.logger.metrics({**m, **self.io.skipped_media()}, step=s["step"])

    def _save(self, metrics: dict, final: bool = False) -> None:
        """Checkpoint (every rank its shard), report it, and at the end export the model."""
        from biovita.train.export import export_consolidated

        s = self.state
        s.update(gate=self.gate.state_dict(), atc_hist=list(self.atc_hist.values))
        with tempfile.TemporaryDirectory() as d:
            self.eng.save(d, dict(s))
            if final:
                export_consolidated(self.eng, self.module, self.job.export_to, self.stage.name, s,
                                    metrics, self.job.taxa)
            self.io.report(metrics, d)
        if self.io.rank == 0 and self.job.progress_to:  # after the checkpoint is persisted
            write_progress(self.job.progress_to, s)


class _Meter:
    """Per-window means of the logged scalars, throughput and the time spent waiting for data."""

    def __init__(self, samples_per_step: int, step: int):
        self.samples_per_step = samples_per_step
        self.values: dict[str, list[float]] = {}
        self.wait = 0.0
        self.t_last, self.step_last = time.time(), step
        self.t_start, self.step_start = self.t_last, step

    def timed(self, fetch):
        t = time.perf_counter()
        out = fetch()
        self.wait += time.perf_counter() - t
        return out

    def add(self, parts: dict[str, float]) -> None:
        for key, v in parts.items():
            self.values.setdefault(key, []).append(v)

    def window(self, step: int) -> dict[str, float]:
        now = time.time()
        dt = max(now - self.t_last, 1e-6)
        out = {key: float(np.mean(v)) for key, v in self.values.items()}
        out.update(samples_per_s=(step - self.step_last) * self.samples_per_step / dt,
                   data_wait=self.wait / dt)
        self.values, self.wait, self.t_last, self.step_last = {}, 0.0, now, step
        return out

    def eta(self, step: int, total: int) -> float:
        rate = (step - self.step_start) / max(time.time() - self.t_start, 1e-6)
        return (total - step) / max(rate, 1e-9)


def write_progress(uri: str, state: dict) -> None:
    """Where the last checkpoint stands in the data: the next (re)start streams from here."""
    import json

    from biovita.data.store import filesystem

    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"epoch": state["epoch"], "step": state["step"]}).encode())
