"""The driver: datasets per epoch, one TorchTrainer per stage, MLflow runs, then the benchmark.

Stages: init (the starting weights, saved once so every worker and every resume starts from
the same model) -> stage0 (embedded run only: a tiny image-text base model standing in for
BioCLIP 2) -> stage1 (ATC) -> stage2.phase1 -> stage2.phase2 -> benchmark. Each finished
stage leaves a consolidated model under `<storage_path>/<run_name>/models/<stage>`; a
re-submitted job skips finished stages and resumes an unfinished one from its last Ray Train
checkpoint.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from biovita.config import Config, StageConfig
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


def epoch_datasets(cfg: Config, stage: str, checkpoint: str, image_emb=None) -> tuple[dict, int]:
    """One lazily-executed Ray Dataset per epoch (each with its own species-balanced plan),
    and the number of optimizer steps per epoch."""
    st = stage_params(cfg, stage)
    d = cfg.data
    afe, ife = front_ends(checkpoint)
    # the metadata is read once; each epoch only draws a new plan from it
    table = "image" if stage == "stage0" else "audio"
    ids, species = _train_meta(d.root, table)
    groups = row_groups(d.root, table)
    if image_emb is not None:
        i_ids, i_sp = list(image_emb[0]), [int(s) for s in image_emb[2]]
    datasets, sizes = {}, []
    for epoch in range(st.epochs):
        if stage == "stage0":
            plan = sampling.balanced_counts(ids, species, cfg.stage0.images_per_species,
                                            d.per_species_min, cfg.train.seed, epoch)
            ds = image_dataset(d.root, ImageDecodeSpec(ife, d.max_image_pixels, cfg.train.seed, epoch),
                               plan=plan, num_cpus=d.decode_cpus, groups=groups,
                               order_seed=(cfg.train.seed, epoch))
            sizes.append(sum(plan.values()))
        elif stage == "stage1":
            plan = sampling.balanced_counts(ids, species, d.per_species_cap, d.per_species_min,
                                            cfg.train.seed, epoch)
            spec = AudioDecodeSpec(afe, "random", cfg.train.seed, epoch, prompts="random")
            ds = audio_dataset(d.root, spec, plan=plan, num_cpus=d.decode_cpus, groups=groups,
                               order_seed=(cfg.train.seed, epoch))
            sizes.append(sum(plan.values()))
        else:
            # both phases draw fresh triplets; phase 2 with epochs after phase 1's
            e = epoch + (cfg.stage2.phase1.epochs if stage == "stage2.phase2" else 0)
            plan = sampling.triplet_plan(ids, species, i_ids, i_sp, d.triplets_per_species,
                                         cfg.train.seed, e)
            spec = AudioDecodeSpec(afe, "random", cfg.train.seed, e, prompts="fixed")
            ds = audio_dataset(d.root, spec, plan=plan, image_emb=(image_emb[0], image_emb[1]),
                               num_cpus=d.decode_cpus, groups=groups, order_seed=(cfg.train.seed, e))
            sizes.append(sum(len(v) for v in plan.values()))
        datasets[f"epoch{epoch}"] = ds
    per_step = st.batch_size * cfg.train.num_workers * cfg.train.accum_freq
    steps = min(sizes) // per_step if sizes else 0
    return datasets, steps


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
    datasets, steps = epoch_datasets(cfg, stage, init, image_emb)
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
        "report_every_log": report_every_log,
    }
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
        datasets=datasets,
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
