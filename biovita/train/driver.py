"""The driver: datasets per epoch, one TorchTrainer per stage, MLflow runs, then the benchmark.

Stages: init (the starting weights, saved once so every worker and every resume starts from
the same model) -> stage0 (embedded run only: a tiny image-text base model standing in for
BioCLIP 2) -> stage1 (ATC) -> stage2.phase1 -> stage2.phase2 -> benchmark. Each finished
stage leaves a consolidated model under `<storage_path>/<run_name>/models/<stage>`; a
re-submitted job skips finished stages and resumes an unfinished one from its last Ray Train
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from biovita.config import Config, StageConfig, config_from_dict
from biovita.data import sampling
from biovita.data.pipeline import (
    STATS_ACTOR,
    AudioDecodeSpec,
    ImageDecodeSpec,
    audio_dataset,
    image_dataset,
    media_stats,
    row_groups,
)
from biovita.data.store import (
    exists,
    fetch_dir,
    filesystem,
    is_remote,
    path_exists,
    read_table,
    upload_dir,
)
from biovita.embed import collect_embeddings, embed_dataset, front_ends
from biovita.tracking import (
    TAG_RUN_NAME,
    TAG_STAGE,
    RunLogger,
    experiment_id,
    find_or_create_run,
    git_commit,
    resolve_tracking_uri,
)
from biovita.train.loop import train_loop_per_worker

log = logging.getLogger("biovita.train")


def run_dir(cfg: Config) -> str:
    base = cfg.train.storage_path
    if not is_remote(base):
        base = str(Path(base).resolve())
    return f"{base.rstrip('/')}/{cfg.train.run_name}"


def model_uri(cfg: Config, stage: str) -> str:
    return f"{run_dir(cfg)}/models/{stage}"


def stage_done(cfg: Config, stage: str) -> bool:
    return path_exists(f"{model_uri(cfg, stage)}/biovita.json")


def stage_params(cfg: Config, stage: str) -> StageConfig:
    return {"stage0": cfg.stage0, "stage1": cfg.stage1, "stage2.phase1": cfg.stage2.phase1,
            "stage2.phase2": cfg.stage2.phase2}[stage]


def trained_taxa(root: str) -> list[dict]:
    """The species a run trains on (taxonomy only): stored with every exported model."""
    cols = ["class", "order", "family", "genus", "scientific_name", "common_name", "seen"]
    return [{k: v for k, v in r.items() if k != "seen"}
            for r in read_table(root, "taxa", columns=cols).to_pylist() if r["seen"]]


def dataset_fingerprint(root: str) -> str:
    """Hash of the store's metadata (ids, species, splits): what MLflow records as the data."""
    import hashlib

    h = hashlib.sha256()
    for table in ("audio", "image"):
        t = read_table(root, table, columns=["id", "species_id", "split"])
        for col in t.columns:
            h.update("\x00".join(map(str, col.to_pylist())).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- datasets


def _train_meta(root: str, table: str) -> tuple[list[str], list[int]]:
    t = read_table(root, table, columns=["id", "species_id", "split"]).to_pydict()
    rows = [(i, s) for i, s, sp in zip(t["id"], t["species_id"], t["split"]) if sp == "train"]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def stage_plans(cfg: Config, stage: str, image_emb=None) -> tuple[str, list[dict]]:
    """(table, one species-balanced plan per epoch), from the store's metadata alone.
    Deterministic: the driver and every (re)start of the stage's workers draw the same plans."""
    st = stage_params(cfg, stage)
    d, seed = cfg.data, cfg.train.seed
    table = "image" if stage == "stage0" else "audio"
    ids, species = _train_meta(d.root, table)  # read once; each epoch only draws a new plan
    if stage == "stage0":
        return table, [sampling.balanced_counts(ids, species, cfg.stage0.images_per_species,
                                                d.per_species_min, seed, e) for e in range(st.epochs)]
    if stage == "stage1":
        return table, [sampling.balanced_counts(ids, species, d.per_species_cap, d.per_species_min,
                                                seed, e) for e in range(st.epochs)]
    # both phases draw fresh triplets; phase 2 with epochs after phase 1's
    first = _phase_offset(cfg, stage)
    i_ids, i_sp = list(image_emb[0]), [int(s) for s in image_emb[2]]
    return table, [sampling.triplet_plan(ids, species, i_ids, i_sp, d.triplets_per_species, seed,
                                         first + e) for e in range(st.epochs)]


def _phase_offset(cfg: Config, stage: str) -> int:
    return cfg.stage2.phase1.epochs if stage == "stage2.phase2" else 0


def steps_per_epoch(cfg: Config, stage: str, plans: list[dict]) -> int:
    """Optimizer steps of the smallest epoch (every epoch trains the same number of steps)."""
    st = stage_params(cfg, stage)
    sizes = [sum(v if isinstance(v, int) else len(v) for v in p.values()) for p in plans]
    per_step = st.batch_size * cfg.train.num_workers * cfg.train.accum_freq
    return min(sizes) // per_step if sizes else 0


def stage_dataset(cfg: Config, stage: str, checkpoint: str, image_emb=None, first_epoch: int = 0):
    """The stage's training data from `first_epoch` on: one lazily-executed Ray Dataset that
    streams every epoch in turn, each with its own plan and row-group order.

    One dataset for all epochs, not one per epoch: each Ray Dataset that Ray Train splits gets
    its own coordinator actor and execution start, and between two of them the idle decode
    workers were reaped, so every epoch paid for new processes importing torch."""
    d, seed = cfg.data, cfg.train.seed
    afe, ife = front_ends(checkpoint)
    # stage 2: (id -> row, embeddings, species), or an ObjectRef to it (passed on as is)
    emb = ray.get(image_emb) if isinstance(image_emb, ray.ObjectRef) else image_emb
    table, plans = stage_plans(cfg, stage, emb)
    plans = {e: p for e, p in enumerate(plans) if e >= first_epoch}
    groups = row_groups(d.root, table)
    # the decode pool gets the CPUs the training workers leave (unless set in the config)
    decode_opts = {"decoders": d.decode_concurrency, "ahead_mb": d.decode_ahead_mb,
                   "reserved_cpus": cfg.train.num_workers * cfg.train.cpus_per_worker}
    if stage == "stage0":
        return image_dataset(d.root, ImageDecodeSpec(ife, d.max_image_pixels, seed), plans=plans,
                             num_cpus=d.decode_cpus, groups=groups, order_seed=(seed,),
                             **decode_opts)
    if stage == "stage1":
        return audio_dataset(d.root, AudioDecodeSpec(afe, "random", seed, prompts="random"),
                             plans=plans, num_cpus=d.decode_cpus, groups=groups, order_seed=(seed,),
                             **decode_opts)
    first = _phase_offset(cfg, stage)
    return audio_dataset(d.root, AudioDecodeSpec(afe, "random", seed, first, prompts="fixed"),
                         plans=plans, image_emb=image_emb, num_cpus=d.decode_cpus, groups=groups,
                         order_seed=(seed, first), **decode_opts)


def progress_uri(cfg: Config, stage: str) -> str:
    return f"{run_dir(cfg)}/progress/{stage}.json"


def resume_epoch(cfg: Config, stage: str) -> int:
    """The epoch of the stage's last checkpoint (0 without one): the worker writes it after
    each checkpoint Ray Train has persisted, so it never runs ahead of the checkpoint."""
    uri = progress_uri(cfg, stage)
    if not path_exists(uri):
        return 0
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return int(json.loads(f.read())["epoch"])


@dataclass
class StageData:
    """The `datasets` entry Ray Train calls each time it starts (or restarts) the stage's
    workers: the stream begins at the epoch of the last checkpoint, so a resumed stage does
    not decode the epochs it already finished again."""

    config: dict
    stage: str
    checkpoint: str
    image_emb: Any = None  # an ObjectRef to (id -> row, embeddings, species) for stage 2
    env: dict = field(default_factory=dict)  # the driver's storage settings (s3 endpoints)

    def __call__(self):
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        cfg = config_from_dict(self.config)
        return stage_dataset(cfg, self.stage, self.checkpoint, self.image_emb,
                             resume_epoch(cfg, self.stage))


# ----------------------------------------------------------------------------- stages


class Tracker:
    """The job's MLflow parent run and its per-stage child runs (driver side)."""

    def __init__(self, cfg: Config):
        self.enabled = cfg.mlflow.enabled
        self.uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
        self.parent: RunLogger | None = None
        if not self.enabled:
            return
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        self.exp = experiment_id(client, cfg.mlflow.experiment, self.uri)
        rid = find_or_create_run(client, self.exp, cfg.train.run_name,
                                 {TAG_RUN_NAME: cfg.train.run_name, "biovita.kind": "job"})
        self.parent = RunLogger(self.uri, rid)
        self.client = client

    def child(self, stage: str) -> RunLogger | None:
        if not self.enabled:
            return None
        rid = find_or_create_run(self.client, self.exp, stage, {TAG_STAGE: stage},
                                 parent_id=self.parent.run_id)
        return RunLogger(self.uri, rid)


def run_stage(cfg: Config, stage: str, init: str, tracker: Tracker, image_emb=None,
              baseline_atc: float | None = None, callbacks: list | None = None,
              report_every_log: bool = False, worker_env: dict[str, str] | None = None) -> str:
    """Train one stage/phase with a TorchTrainer; returns the consolidated model's URI."""
    out = model_uri(cfg, stage)
    if stage_done(cfg, stage):
        print(f"[{stage}] already finished: {out}", flush=True)
        return out
    st = stage_params(cfg, stage)
    steps = steps_per_epoch(cfg, stage, stage_plans(cfg, stage, image_emb)[1])
    if steps == 0:
        raise ValueError(f"{stage}: an epoch holds fewer samples than one global batch "
                         f"({st.batch_size} x {cfg.train.num_workers} workers); lower the batch size")
    child = tracker.child(stage)
    if child:
        child.params({"stage": stage, **{f"stage.{k}": v for k, v in asdict(st).items()},
                      "steps_per_epoch": steps})
    total = st.epochs * steps if not st.max_steps else min(st.max_steps, st.epochs * steps)
    print(f"[{stage}] {st.epochs} epochs x {steps} steps (batch {st.batch_size} x "
          f"{cfg.train.num_workers} workers), {total} steps", flush=True)
    loop_cfg = {
        "config": cfg.to_dict(), "stage": stage, "stage_params": asdict(st),
        "steps_per_epoch": steps, "init_checkpoint": init, "export_to": out,
        "baseline_atc": baseline_atc, "taxa": trained_taxa(cfg.data.root),
        "mlflow": {"uri": child.uri, "run_id": child.run_id} if child else None,
        "report_every_log": report_every_log, "progress_to": progress_uri(cfg, stage),
    }
    emb_ref = ray.put(image_emb) if image_emb is not None else None  # once, not per restart
    use_gpu = cfg.train.use_gpu
    fs, storage = filesystem(run_dir(cfg) + "/ray")  # resolves s3:// endpoints (MinIO, moto)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu,
            placement_strategy=cfg.train.placement_strategy,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                  **cfg.train.worker_resources}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": StageData(cfg.to_dict(), stage, init, emb_ref, forwarded_env())},
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=RunConfig(
            name=f"{cfg.train.run_name}-{stage.replace('.', '-')}",
            storage_path=storage,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {**forwarded_env(), **(worker_env or {})}},
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception:
        if child:
            child.end("FAILED")
        raise
    if child:
        child.metrics({"stage_seconds": time.time() - t0}, step=int(result.metrics.get("step", 0)))
        child.end()
    if not stage_done(cfg, stage):
        raise RuntimeError(f"{stage} finished without exporting a model to {out}")
    return out


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
                 "GOOGLE_APPLICATION_CREDENTIALS", "HF_HUB_OFFLINE", "HF_HOME")


def forwarded_env() -> dict[str, str]:
    """Storage and tracking settings of the driver, passed on to the training workers."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def save_init(cfg: Config) -> str:
    """The starting weights, built once on the driver (hub downloads happen here)."""
    from biovita.models.checkpoint import save_model
    from biovita.models.factory import create_model
    import tempfile

    uri = model_uri(cfg, "init")
    if not stage_done(cfg, "init"):
        model = create_model(cfg.model)
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d, metadata={"stage": "init"})
            upload_dir(d, uri)
    return uri


def image_embeddings(cfg: Config, checkpoint: str):
    """Frozen image-tower embeddings of the training images (stage 2 pairs audio with these).

    The image tower is frozen and its eval preprocess deterministic, so embedding each image
    once is exactly what re-encoding it every step would give, without the ViT forward."""
    ds = embed_dataset(checkpoint, cfg.data.root, "image", split="train",
                       max_image_pixels=cfg.data.max_image_pixels, use_gpu=cfg.train.use_gpu,
                       stats_name=None, decode_cpus=cfg.data.decode_cpus)
    return collect_embeddings(ds)


def ensure_data(cfg: Config) -> None:
    if exists(cfg.data.root):
        return
    if not cfg.data.synth_if_missing:
        raise FileNotFoundError(f"no media store at {cfg.data.root}")
    from biovita.data.synth import make_synthetic

    print(f"creating the synthetic dataset in {cfg.data.root} ...", flush=True)
    make_synthetic(cfg.data.root, n_species=cfg.data.synth_species, seed=cfg.data.synth_seed,
                   progress=True)


def run_training(cfg: Config, tracker: Tracker) -> dict[str, str]:
    """All stages in order; returns stage -> consolidated model URI."""
    from biovita.models.registry import MODEL_CONFIGS

    media_stats(STATS_ACTOR).reset.remote()
    models = {"init": save_init(cfg)}
    last = models["init"]
    pretrained = bool(cfg.model.clip_model.startswith("hf-hub:") or cfg.model.clip_pretrained
                      or (not cfg.model.clip_model and MODEL_CONFIGS[cfg.model.name].pretrained))
    if cfg.stage0.enabled and not pretrained:
        last = models["stage0"] = run_stage(cfg, "stage0", last, tracker)
    last = models["stage1"] = run_stage(cfg, "stage1", last, tracker)
    if cfg.stage2.phase1.epochs + cfg.stage2.phase2.epochs > 0:
        print("[stage2] embedding training images with the frozen image tower ...", flush=True)
        emb = image_embeddings(cfg, last)
        last = models["stage2.phase1"] = run_stage(cfg, "stage2.phase1", last, tracker, emb)
        from biovita.models.checkpoint import read_meta

        baseline = read_meta(fetch_dir(last))["metadata"].get("baseline_atc")
        models["stage2.phase2"] = run_stage(cfg, "stage2.phase2", last, tracker, emb, baseline)
    return models


def log_job_params(cfg: Config, tracker: Tracker) -> None:
    if not tracker.parent:
        return
    tracker.parent.params({**cfg.flat(), "git_commit": git_commit(),
                           "dataset_fingerprint": dataset_fingerprint(cfg.data.root)})
