"""The driver side of one stage: its data (a Ray Dataset per stage) and its TorchTrainer.

Each finished stage leaves a consolidated model under `<storage_path>/<run_name>/models/<stage>`;
a re-submitted job skips finished stages and resumes an unfinished one from its last Ray Train
checkpoint (`biovita.train.chain` runs the stages in order).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from biovita.bench.validation import held_out_ids
from biovita.config import Config
from biovita.data.datasets import stream_dataset
from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec
from biovita.data.planning import row_groups
from biovita.data.schema import TAXONOMY_COLUMNS
from biovita.data.stats import bad_media_counts, media_stats
from biovita.data.store import fetch_dir, filesystem, path_exists, read_table, upload_dir
from biovita.data.vectors import Vectors
from biovita.embed.cache import prompt_embeddings, store_embeddings
from biovita.locations import absolute
from biovita.models.checkpoint import front_ends, load_model, save_model
from biovita.models.factory import RandomTowerWarning, create_model
from biovita.prompts import LEVEL_TEMPLATES, TEMPLATES, Taxon
from biovita.runtime import interactive
from biovita.tracking.runs import Tracker
from biovita.train.loop import StageJob, train_loop_per_worker
from biovita.train.stages import STAGE0, PlanInputs, Stage, get_stage


def run_dir(cfg: Config) -> str:
    return f"{absolute(cfg.train.storage_path).rstrip('/')}/{cfg.train.run_name}"


def model_uri(cfg: Config, stage: str) -> str:
    return f"{run_dir(cfg)}/models/{stage}"


def stage_done(cfg: Config, stage: str) -> bool:
    return path_exists(f"{model_uri(cfg, stage)}/biovita.json")


def trained_taxa(root: str) -> list[dict]:
    """The species a run trains on (taxonomy only): stored with every exported model."""
    cols = ["class", "order", "family", "genus", "scientific_name", "common_name", "seen"]
    return [{k: v for k, v in r.items() if k != "seen"}
            for r in read_table(root, "taxa", columns=cols).to_pylist() if r["seen"]]


def dataset_fingerprint(root: str) -> str:
    """Hash of the store's metadata (ids, species, splits): what MLflow records as the data."""
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


def stage_prompts(cfg: Config, stage: Stage) -> list[str]:
    """Every prompt the stage's decoders can draw: its templates for each taxonomy its
    training media carry (the decoders build prompts from the media rows)."""
    templates = LEVEL_TEMPLATES if stage.prompts == "levels" else TEMPLATES
    t = read_table(cfg.data.root, stage.table, [*TAXONOMY_COLUMNS, "split"]).to_pylist()
    taxa = {tuple(r[c] for c in TAXONOMY_COLUMNS): r for r in t if r["split"] == "train"}
    return sorted({p for r in taxa.values() for p in Taxon.from_row(r).prompts(templates)})


def frozen_embeddings(cfg: Config, stage: Stage, checkpoint: str) -> dict[str, Vectors]:
    """What the stage's frozen towers would compute, made once on Ray Data (or read from the
    store's cache, `biovita.embed.cache`): the training images' embeddings, the embeddings
    of every prompt the stage can draw. Training then reads vectors: its steps run neither
    tower and it decodes no image."""
    d, gpu = cfg.data, cfg.train.use_gpu
    out: dict[str, Vectors] = {}
    if "image" in stage.frozen:
        out["image"] = store_embeddings(d.root, checkpoint, "image", "train", use_gpu=gpu,
                                        decode_cpus=d.decode_cpus, reduced_images=not d.full_size_images,
                                        max_image_pixels=d.max_image_pixels)
    if "text" in stage.frozen:
        out["text"] = prompt_embeddings(d.root, checkpoint, stage_prompts(cfg, stage), use_gpu=gpu)
    for m, v in out.items():
        how = f"made in {v.seconds:.1f} s" if v.seconds else "read from the store's cache"
        print(f"[{stage.name}] frozen {m} tower: {len(v)} embeddings, {how}", flush=True)
    return out


def stage_plans(cfg: Config, stage: Stage, images: Vectors | None = None) -> list[dict]:
    """One plan per epoch, from the store's metadata alone. Deterministic: the driver and
    every (re)start of the stage's workers draw the same plans. `images`: the training
    images stage 2 pairs clips with (their ids and species)."""
    held = held_out_ids(cfg.train.validation)
    ids, species = _train_meta(cfg.data.root, stage.table)
    ids, species = [i for i in ids if i not in held], [s for i, s in zip(ids, species) if i not in held]
    data = PlanInputs(ids, species)
    if stage.pairs_images:
        pairs = [(i, int(s)) for i, s in zip(images.ids, images.species) if i not in held]
        data = PlanInputs(ids, species, [p[0] for p in pairs], [p[1] for p in pairs])
    first = stage.epoch_offset(cfg)
    return stage.plans(cfg, data, range(first, first + stage.settings(cfg).epochs))


def steps_per_epoch(cfg: Config, stage: Stage, plans: list[dict]) -> int:
    """Optimizer steps of the smallest epoch (every epoch trains the same number of steps)."""
    sizes = [sum(v if isinstance(v, int) else len(v) for v in p.values()) for p in plans]
    per_step = stage.settings(cfg).batch_size * cfg.train.num_workers * cfg.train.accum_freq
    return min(sizes) // per_step if sizes else 0


def stage_dataset(cfg: Config, stage: Stage, checkpoint: str, frozen=None, first_epoch: int = 0):
    """The stage's training data from `first_epoch` on: one lazily-executed Ray Dataset that
    streams every epoch in turn, each with its own plan and row-group order. `frozen`: the
    stage's frozen-tower embeddings (or an ObjectRef to them, passed on as is).

    One dataset for all epochs, not one per epoch: each Ray Dataset that Ray Train splits gets
    its own coordinator actor and execution start, and between two of them the idle decode
    workers were reaped, so every epoch paid for new processes importing torch."""
    d, seed = cfg.data, cfg.train.seed
    afe, ife = front_ends(fetch_dir(checkpoint))
    resolved = ray.get(frozen) if isinstance(frozen, ray.ObjectRef) else (frozen or {})
    plans = {e: p for e, p in enumerate(stage_plans(cfg, stage, resolved.get("image")))
             if e >= first_epoch}
    first = stage.epoch_offset(cfg)
    if stage.table == "image":
        spec = ImageDecodeSpec(ife, d.max_image_pixels, not d.full_size_images, seed, first,
                               prompts=stage.prompts)
    else:
        spec = AudioDecodeSpec(afe, "random", seed, first, prompts=stage.prompts)
    # the decode pool gets the CPUs the training workers leave (unless set in the config)
    return stream_dataset(
        d.root, stage.table, spec, plans, stage.settings(cfg).batch_size, seed,
        frozen=frozen if resolved else None, groups=row_groups(d.root, stage.table),
        num_cpus=d.decode_cpus, decoders=d.decode_concurrency, ahead_mb=d.decode_ahead_mb,
        reserved_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker)


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

    config: Config
    stage: str
    checkpoint: str
    frozen: Any = None  # an ObjectRef to the stage's frozen-tower embeddings (`frozen_embeddings`)
    env: dict = field(default_factory=dict)  # the driver's storage settings (s3 endpoints)

    def __call__(self):
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        return stage_dataset(self.config, get_stage(self.stage), self.checkpoint, self.frozen,
                             resume_epoch(self.config, self.stage))


# ----------------------------------------------------------------------------- one stage


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI",
                 "GOOGLE_APPLICATION_CREDENTIALS", "HF_HUB_OFFLINE", "HF_HOME")


def forwarded_env() -> dict[str, str]:
    """Storage and tracking settings of the driver, passed on to the training workers."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def worker_output_env(cfg: Config) -> dict[str, str]:
    """Each worker line printed once: Ray Train's print patch both prints and logs a line."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if not cfg.train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed warns when it has to guess
    return env


def run_stage(cfg: Config, stage: Stage | str, init: str, tracker: Tracker,
              callbacks: list | None = None, report_every_log: bool = False,
              worker_env: dict[str, str] | None = None, step_callbacks: list | None = None) -> str:
    """Train one stage with a TorchTrainer; returns the consolidated model's URI.
    `callbacks`: Ray Train callbacks (Tune's); `step_callbacks`: functions every worker calls
    with a `StepInfo` after each optimizer step."""
    stage = get_stage(stage) if isinstance(stage, str) else stage
    out = model_uri(cfg, stage.name)
    if stage_done(cfg, stage.name):
        print(f"[{stage.name}] already finished: {out}", flush=True)
        return out
    st = stage.settings(cfg)
    child = tracker.child(stage.name)
    frozen = frozen_embeddings(cfg, stage, init)
    steps = steps_per_epoch(cfg, stage, stage_plans(cfg, stage, frozen.get("image")))
    if steps == 0:
        raise ValueError(f"{stage.name}: an epoch holds fewer samples than one global batch "
                         f"({st.batch_size} x {cfg.train.num_workers} workers); lower the batch size")
    if child:
        child.params({"stage": stage.name, **{f"stage.{k}": v for k, v in asdict(st).items()},
                      "steps_per_epoch": steps})
        child.metrics({f"cache/{m}_seconds": v.seconds for m, v in frozen.items()}, step=0)
    total = st.epochs * steps if not st.max_steps else min(st.max_steps, st.epochs * steps)
    print(f"[{stage.name}] {st.epochs} epochs x {steps} steps (batch {st.batch_size} x "
          f"{cfg.train.num_workers} workers), {total} steps", flush=True)
    job = StageJob(config=cfg, stage=stage.name, steps_per_epoch=steps, init_checkpoint=init,
                   export_to=out, taxa=trained_taxa(cfg.data.root), mlflow=child,
                   report_every_log=report_every_log, progress_to=progress_uri(cfg, stage.name),
                   callbacks=list(step_callbacks or []), interactive=interactive())
    frozen_ref = ray.put(frozen) if frozen else None  # once, not per restart
    trainer = _trainer(cfg, stage, job, StageData(cfg, stage.name, init, frozen_ref, forwarded_env()),
                       callbacks, worker_env)
    before = decoded_media()
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception:
        if child:
            child.end("FAILED")
        raise
    decoded = {f"decoded/{t}": n - before.get(t, 0) for t, n in decoded_media().items()}
    print(f"[{stage.name}] decoded during training: " + ", ".join(
        f"{n} {t.split('/')[1]}" for t, n in sorted(decoded.items())), flush=True)
    if child:
        child.metrics({"stage_seconds": time.time() - t0, **decoded},
                      step=int(result.metrics.get("step", 0)))
        child.end()
    if not stage_done(cfg, stage.name):
        raise RuntimeError(f"{stage.name} finished without exporting a model to {out}")
    return out


def decoded_media() -> dict[str, int]:
    """Media decoded so far in this job, by table (the job's stats actor counts them)."""
    media_stats()  # (made here when the caller has none: a stage run on its own)
    good = bad_media_counts()["good"]
    return {t: int(good.get(t, 0)) for t in ("audio", "image")}


def _data_config() -> DataConfig:
    """Ray Train's ingest options with the stream's order kept: Train replaces a dataset's
    execution options with these, and by default blocks reach the workers as their decoders
    finish (measured: two runs with equal seeds saw the same batches in other orders from
    step 3 on)."""
    with warnings.catch_warnings():  # Ray 2.60 warns of its own use of exclude_resources here
        warnings.simplefilter("ignore", DeprecationWarning)
        opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return DataConfig(datasets_to_split="all", execution_options=opts)


def _trainer(cfg: Config, stage: Stage, job: StageJob, data: StageData, callbacks, worker_env):
    use_gpu = cfg.train.use_gpu
    fs, storage = filesystem(run_dir(cfg) + "/ray")  # resolves s3:// endpoints (MinIO, moto)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu,
            placement_strategy=cfg.train.placement_strategy,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {}),
                                  **cfg.train.worker_resources}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": data},
        dataset_config=_data_config(),
        run_config=RunConfig(
            name=f"{cfg.train.run_name}-{stage.name.replace('.', '-')}",
            storage_path=storage,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train's INFO lines (worker group starts, checkpoint reports) every restart and
            # checkpoint; retries and failures are WARNING and above
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
            worker_runtime_env={"env_vars": {**forwarded_env(), **worker_output_env(cfg),
                                             **(worker_env or {})}},
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
        ),
    )


def save_init(cfg: Config) -> str:
    """The starting weights, built once on the driver (hub downloads happen here): the model
    config's towers, or `model.init_checkpoint` in any layout biovita reads."""
    uri = model_uri(cfg, "init")
    if not stage_done(cfg, "init"):
        m = cfg.model
        # random towers (and adapters) drawn from train.seed: runs with equal seeds start alike
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RandomTowerWarning)
            torch.manual_seed(cfg.train.seed)
            model = (load_model(m.init_checkpoint, clap=m.clap or None, model=m)
                     if m.init_checkpoint else create_model(m))
        random = [str(w.message).split(" tower")[0] for w in caught if w.category is RandomTowerWarning]
        for w in caught:
            if w.category is not RandomTowerWarning:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if random:
            why = "; stage 0 trains the image-text base" if STAGE0.runs(cfg) else ""
            print(f"[init] model {m.name}: the {' and '.join(random)} tower(s) start from random "
                  f"weights{why}", flush=True)
        with tempfile.TemporaryDirectory() as d:
            save_model(model, d, metadata={"stage": "init"})
            upload_dir(d, uri)
    return uri
