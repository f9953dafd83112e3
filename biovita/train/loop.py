"""The Ray Train worker loop: one stage (or stage-2 phase) under DeepSpeed ZeRO (or DDP).

Runs on every worker. Uses only worker-side Ray Train calls (`get_context`,
`get_dataset_shard`, `get_checkpoint`, `report`). The model, the losses and the schedules come
from the library; this file composes them.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from biovita import losses, schedules
from biovita.config import Config, config_from_dict
from biovita.data.pipeline import TorchCollate, bad_media_counts
from biovita.tracking import RunLogger

DS_TAG = "ds"
STATE_FILE = "biovita_state.json"


# ----------------------------------------------------------------------------- engine


def deepspeed_config(cfg: Config, micro_batch: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.train.accum_freq,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": bool(cfg.train.use_gpu)},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class Engine:
    """The few operations the loop needs, over a DeepSpeed engine or plain DDP."""

    def __init__(self, model, groups: list[dict], cfg: Config, micro_batch: int, betas, eps):
        self.cfg = cfg
        self.strategy = cfg.train.strategy
        opt = torch.optim.AdamW(groups, betas=betas, eps=eps)
        device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
        self.device = device
        if self.strategy == "deepspeed":
            import deepspeed

            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=model.to(device), optimizer=opt, config=deepspeed_config(cfg, micro_batch))
            self.module = self.engine.module
        else:
            self.module = model.to(device)
            self.optimizer = opt
            self.engine = (torch.nn.parallel.DistributedDataParallel(self.module)
                           if dist.is_initialized() and dist.get_world_size() > 1 else self.module)
        self.dtype = torch.bfloat16 if (cfg.train.use_gpu and self.strategy == "deepspeed") else torch.float32

    def backward(self, loss: torch.Tensor) -> None:
        if self.strategy == "deepspeed":
            # contrastive accumulation sums k micro-batch gradients; DeepSpeed divides by k
            self.engine.backward(loss * self.cfg.train.accum_freq)
        else:
            loss.backward()

    def step(self) -> None:
        if self.strategy == "deepspeed":
            for _ in range(self.cfg.train.accum_freq):
                self.engine.step()
        else:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def gathered(self, params):
        """Context in which ZeRO-3 partitioned parameters are whole (a no-op otherwise)."""
        import contextlib

        if self.strategy == "deepspeed" and self.cfg.train.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)
        return contextlib.nullcontext()

    def save(self, directory: str, state: dict) -> None:
        if self.strategy == "deepspeed":
            self.engine.save_checkpoint(directory, tag=DS_TAG, client_state={"biovita": state})
        elif ray.train.get_context().get_world_rank() == 0:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()},
                       os.path.join(directory, "ddp.pt"))
        if ray.train.get_context().get_world_rank() == 0:
            Path(directory, STATE_FILE).write_text(json.dumps(state))

    def load(self, directory: str) -> dict:
        if self.strategy == "deepspeed":
            self.engine.load_checkpoint(directory, tag=DS_TAG)
        else:
            ck = torch.load(os.path.join(directory, "ddp.pt"), map_location="cpu", weights_only=True)
            self.module.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        return json.loads(Path(directory, STATE_FILE).read_text())


# ----------------------------------------------------------------------------- helpers


def all_mean(values: list[float]) -> list[float]:
    """Mean over workers, so every rank takes the same schedule decisions."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def batch_top1(a: torch.Tensor, b: torch.Tensor) -> float:
    """In-batch a->b retrieval Top-1 (the cheap retrieval metric checkpoints are kept by)."""
    with torch.no_grad():
        return (a @ b.T).argmax(1).eq(torch.arange(len(a), device=a.device)).float().mean().item()


def write_progress(uri: str, state: dict) -> None:
    """Where the last checkpoint stands in the data: the next (re)start streams from here."""
    from biovita.data.store import filesystem

    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps({"epoch": state["epoch"], "step": state["step"]}).encode())


def _record_node() -> None:
    """Tell the job's stats actor which node this worker trains on (placement checks)."""
    import ray

    from biovita.data.pipeline import STATS_ACTOR

    try:
        ray.get_actor(STATS_ACTOR).add_node.remote("train", ray.get_runtime_context().get_node_id())
    except ValueError:
        pass


def _maybe_inject_failure(step: int) -> None:
    """Test hook: BIOVITA_KILL_AT_STEP=N kills rank 1 (or 0 alone) once, at step N."""
    at = os.environ.get("BIOVITA_KILL_AT_STEP")
    marker = os.environ.get("BIOVITA_KILL_MARKER")
    if not at or not marker or step != int(at) or os.path.exists(marker):
        return
    ctx = ray.train.get_context()
    if ctx.get_world_rank() == min(1, ctx.get_world_size() - 1):
        Path(marker).write_text(str(step))
        # Ray Train's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S):
        # a checkpoint reported just before a crash is lost, and the run resumes from the one
        # before it. Wait, so that the test knows which checkpoint it resumes from.
        time.sleep(5)
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    from biovita.models.checkpoint import load_model
    from biovita.models.factory import create_model
    from biovita.data.store import fetch_dir
    from biovita.train.export import export_consolidated

    cfg: Config = config_from_dict(loop_cfg["config"])
    stage: str = loop_cfg["stage"]
    st = loop_cfg["stage_params"]  # epochs, batch_size, lr, weight_decay, max_steps
    steps_per_epoch: int = loop_cfg["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # once per process, before any module init
    logger = RunLogger(**loop_cfg["mlflow"]) if (rank == 0 and loop_cfg.get("mlflow")) else None
    _record_node()

    init = loop_cfg.get("init_checkpoint")
    model = load_model(fetch_dir(init)) if init else create_model(cfg.model)
    model.train()
    s2 = cfg.stage2
    if stage == "stage2.phase2":
        schedules.reset_logit_scale(model.logit_scale, s2.logit_reset_temperature)
    groups = schedules.param_groups(model, stage, st["lr"], st["weight_decay"], s2)
    eng = Engine(model, groups, cfg, st["batch_size"], s2.betas, s2.eps)
    module = eng.module
    tokenizer = module.tokenizer()

    state = {"epoch": 0, "step": 0, "gate": None, "atc_hist": [],
             "baseline_atc": loop_cfg.get("baseline_atc")}
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = eng.load(d)
        if rank == 0:
            print(f"[{stage}] resumed from checkpoint at step {state['step']} "
                  f"(data from the start of epoch {state['epoch']})", flush=True)
            if logger:
                logger.metrics({"resumed_from_step": state["step"]}, step=state["step"])
    gate = (schedules.ATCGate.from_state(state["gate"]) if state.get("gate") else
            schedules.ATCGate(baseline=state["baseline_atc"] or 1.0, alpha=s2.gate_alpha,
                              off_ratio=s2.gate_off_ratio, on_ratio=s2.gate_on_ratio,
                              patience=s2.gate_patience))
    atc_hist = schedules.BaselineMeter(n=s2.baseline_batches, values=list(state.get("atc_hist", [])))
    total_steps = st["epochs"] * steps_per_epoch
    if st["max_steps"]:
        total_steps = min(total_steps, st["max_steps"])
    B = st["batch_size"]
    k = cfg.train.accum_freq

    def save_and_report(metrics: dict, final: bool = False) -> None:
        state.update(gate=gate.state_dict(), atc_hist=list(atc_hist.values))
        with tempfile.TemporaryDirectory() as d:
            eng.save(d, dict(state))
            if final:
                export_consolidated(eng, module, loop_cfg["export_to"], stage, state, metrics,
                                    loop_cfg.get("taxa"))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if rank == 0 and loop_cfg.get("progress_to"):  # after the checkpoint is persisted
            write_progress(loop_cfg["progress_to"], state)

    window: dict[str, list[float]] = {}
    t_last, n_last = time.time(), 0
    t_start, step_start = time.time(), state["step"]
    done = state["step"] >= total_steps
    last_metrics: dict[str, float] = {}

    # One stream of batches for the whole stage: every epoch in turn (from the checkpoint's
    # epoch on, after a restart), rows tagged with their epoch. Ray Data reads
    # `prefetch_batches` batches ahead, across epoch ends too. Decode tasks finish out of
    # order, so the end of one epoch mixes with the start of the next; a batch counts as its
    # oldest epoch. A resumed stage starts its data at the beginning of the checkpoint's epoch.
    shard = ray.train.get_dataset_shard("train")
    batches = shard.iter_torch_batches(
        batch_size=B, collate_fn=TorchCollate(), drop_last=True, local_shuffle_buffer_size=4 * B,
        local_shuffle_seed=cfg.train.seed * 7919 + state["epoch"] * 31 + rank,
        prefetch_batches=cfg.train.prefetch_batches)
    micro: list[dict] = []
    it = iter([] if done else batches)
    wait = 0.0  # seconds blocked on the data stream since the last log line
    while True:
        t_wait = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t_wait
        if batch is None:
            break
        epoch = int(batch.pop("epoch").min())
        micro.append(batch)
        if len(micro) < k:
            continue
        step = state["step"]
        schedules.apply_group_schedule(eng.optimizer, stage, step, s2)
        parts = _step(stage, micro, module, eng, tokenizer, s2, gate, state, step)
        micro = []
        eng.step()
        if stage != "stage0":
            with eng.gathered([module.logit_scale]):
                losses.clamp_logit_scale(module.logit_scale)
        state["step"] += 1
        state["epoch"] = epoch
        if "atc" in parts:
            atc_hist.add(parts["atc"])
        for key, v in parts.items():
            window.setdefault(key, []).append(v)
        _maybe_inject_failure(state["step"])
        if state["step"] % cfg.train.log_every == 0 or state["step"] >= total_steps:
            now = time.time()
            sps = (state["step"] * B * world * k - n_last) / max(now - t_last, 1e-6)
            last_metrics = {key: float(np.mean(v)) for key, v in window.items()}
            window = {}
            last_metrics.update(samples_per_s=sps, epoch=epoch,
                                data_wait=wait / max(now - t_last, 1e-6),
                                logit_scale=float(module.logit_scale.detach().float().exp()))
            t_last, n_last, wait = now, state["step"] * B * world * k, 0.0
            for g in eng.optimizer.param_groups:
                last_metrics[f"lr/{g['name']}"] = g["lr"]
            if rank == 0:
                rate = (state["step"] - step_start) / max(now - t_start, 1e-6)
                eta = (total_steps - state["step"]) / max(rate, 1e-9)
                print(f"[{stage}] step {state['step']}/{total_steps} loss {last_metrics['loss']:.4f} "
                      f"{sps:.1f} samples/s (data wait {last_metrics['data_wait']:.0%}) "
                      f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", flush=True)
                if logger:
                    try:
                        bad = bad_media_counts()["bad"]
                        for table, reasons in bad.items():
                            for reason, n in reasons.items():
                                last_metrics[f"skipped/{table}/{reason}"] = n
                    except Exception:
                        pass
                    logger.metrics(last_metrics, step=state["step"])
            if loop_cfg.get("report_every_log") and not (
                    cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0):
                ray.train.report({**last_metrics, "step": state["step"]})  # for Tune's ASHA
        if cfg.train.checkpoint_every and state["step"] % cfg.train.checkpoint_every == 0 \
                and state["step"] < total_steps:
            save_and_report({**last_metrics, "step": state["step"]})
        if state["step"] >= total_steps:
            break
    state["epoch"] = st["epochs"]
    if stage == "stage2.phase1" and atc_hist.value is not None:  # phase 2's gate and guard
        state["baseline_atc"] = atc_hist.value
    final = {**last_metrics, "step": state["step"], "baseline_atc": state.get("baseline_atc") or 0.0}
    final.setdefault("top1_batch", 0.0)
    save_and_report(final, final=True)


def _step(stage, micro, module, eng, tokenizer, s2, gate, state, step) -> dict[str, float]:
    """Forward + backward of one optimizer step (k micro-batches); returns logged scalars."""
    dev, dtype = eng.device, eng.dtype

    def enc_text(texts):
        return module.encode_text(tokenizer(texts).to(dev))

    def enc_audio(mel):
        return module.encode_audio(mel.to(dev, dtype))

    def enc_image(px):  # uint8: the model normalises on the device
        return module.encode_image(px.to(dev))

    def enc_fixed(x):  # precomputed, frozen image-tower embeddings
        return torch.nn.functional.normalize(x.to(dev, dtype), dim=-1)

    if stage == "stage0":
        encoders = {"image": enc_image, "text": enc_text}
        keys = {"image": "pixels", "text": "text"}
    elif stage == "stage1":
        encoders = {"audio": enc_audio, "text": enc_text}
        keys = {"audio": "mel", "text": "text"}
    else:
        encoders = {"audio": enc_audio, "text": enc_text, "image": enc_fixed}
        keys = {"audio": "mel", "text": "text", "image": "image_emb"}
    mbs = [{m: b[keys[m]] for m in encoders} for b in micro]
    logged: dict[str, float] = {}

    def loss_fn(f: dict[str, torch.Tensor], first: bool) -> torch.Tensor:
        if stage == "stage0":
            scale = module.clip.logit_scale.exp()
            scale = scale if first else scale.detach()
            loss = losses.itc(f["image"], f["text"], scale)
            logged.update(loss=loss.item(), itc=loss.item(), top1_batch=batch_top1(f["image"], f["text"]))
            return loss
        scale = module.logit_scale.exp()
        scale = scale if first else scale.detach()
        l_atc = losses.atc(f["audio"], f["text"], scale)
        logged["top1_batch"] = batch_top1(f["audio"], f["text"])
        if stage == "stage1":
            logged.update(loss=l_atc.item(), atc=l_atc.item())
            return l_atc
        l_aic = losses.aic(f["audio"], f["image"], scale)
        if stage == "stage2.phase1":
            loss = s2.w_atc * l_atc + s2.w_aic * l_aic
            logged.update(loss=loss.item(), atc=l_atc.item(), aic=l_aic.item())
            return loss
        l_itc = losses.itc(f["image"], f["text"], scale)
        atc_m, = all_mean([l_atc.item()])
        if first:
            gate.update(atc_m)
        w = schedules.phase2_weights(step, s2, gate.open)
        loss = schedules.phase2_loss(l_atc, l_aic, l_itc, gate.baseline, w, s2)
        logged.update(loss=loss.item(), atc=l_atc.item(), aic=l_aic.item(), itc=l_itc.item(),
                      lam_av=w.lam_av, lam_vt=w.lam_vt, gate_open=float(w.gate_open),
                      gate_ema=gate.ema or 0.0)
        return loss

    if len(mbs) == 1:
        feats = {m: enc(mbs[0][m]) for m, enc in encoders.items()}
        eng.backward(loss_fn(feats, True))
    else:
        losses.accumulate_contrastive(encoders, mbs, loss_fn, backward=eng.backward)
    if "atc" in logged:
        logged["atc"], = all_mean([logged["atc"]])
    return logged
