"""Typed run configuration: dataclasses loaded from YAML, with `a.b=value` overrides.

Everything is validated here, on the driver, before Ray or any worker starts: a bad key,
type or value raises one :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from biovita.frontends.image import MAX_IMAGE_PIXELS
from biovita.locations import absolute, is_remote, tracking_uri
from biovita.models.registry import MODEL_CONFIGS, ModelConfig
from biovita.errors import ConfigError
from biovita.structured import build, parse_override, set_path

# Configs shipped inside the package: `--config NAME` takes one of these or a YAML path.
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = PACKAGED_CONFIGS / "default.yaml"


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # Parquet store: local folder or s3:// / gs:// URI
    synth_if_missing: bool = False  # create the embedded synthetic dataset when root is empty
    # the synthetic set's species (seen + unseen) and seed: 0 / -1 = those of the store at root
    # (40 species, seed 0 when making one); set, and unlike the store's, the store is made again
    synth_species: int = 0
    synth_seed: int = -1
    per_species_cap: int = 20  # species-balanced epochs: at most this many clips per species
    per_species_min: int = 5  # species with fewer clips are oversampled to this many
    triplets_per_species: int = 20  # stage-2 triplets per species and epoch
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decompression-bomb guard
    full_size_images: bool = False  # decode JPEGs at full size before resizing (slower, ~exact)
    decode_cpus: float = 0.5  # logical CPUs per decode task (fractional: avoids starving Train)
    # decode workers: a training stream's actor pool, a single pass's tasks in flight;
    # 0 = (cluster CPUs at start - the training workers' CPUs) / decode_cpus
    decode_concurrency: int = 0
    decode_ahead_mb: float = 512  # decoded data that may wait for the trainer before decoding pauses


@dataclass
class StageConfig:
    """One contrastive stage (or stage-2 phase): length, batch and optimiser."""

    epochs: int = 1
    batch_size: int = 16  # per worker
    lr: float = 1e-4
    weight_decay: float = 0.05
    max_steps: int = 0  # 0 = run the epochs; >0 caps the steps (smoke tests)


@dataclass
class Stage0Config(StageConfig):
    """Embedded run only: a tiny image-text base model trained in place of BioCLIP 2."""

    enabled: bool = True  # skipped whenever the image/text towers come pretrained
    images_per_species: int = 40


@dataclass
class Stage2Config:
    phase1: StageConfig = field(default_factory=lambda: StageConfig(epochs=10, batch_size=64))
    phase2: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=10, batch_size=32, lr=1e-4, weight_decay=0.05)
    )
    w_atc: float = 0.8  # phase 1 loss weights
    w_aic: float = 0.2
    text_lr: float = 5e-6
    text_weight_decay: float = 0.01
    upper_audio: Literal["released", "last_stage"] = "released"  # phase-2 "upper" audio parameters
    upper_audio_lr: float = 1e-5
    upper_audio_weight_decay: float = 0.02
    upper_audio_unfreeze_step: int = 300
    logit_reset_temperature: float = 0.2
    logit_freeze_steps: int = 600
    lam_av_max: float = 0.1
    lam_av_ramp_steps: int = 600
    lam_vt_max: float = 0.1
    lam_vt_ramp_steps: int = 300
    guard_weight: float = 2.0
    guard_margin: float = 1.03
    baseline_batches: int = 20
    gate_alpha: float = 0.2
    gate_off_ratio: float = 1.03
    gate_on_ratio: float = 1.015
    gate_patience: int = 20
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8


@dataclass
class TrainConfig:
    num_workers: int = 1
    use_gpu: bool = False
    zero_stage: int = 2
    grad_clip: float = 1.0
    accum_freq: int = 1  # contrastive gradient accumulation (k micro-batches per step)
    prefetch_batches: int = 8  # decoded batches Ray Data reads ahead (across epoch ends too)
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at stage ends
    keep_checkpoints: int = 2
    max_failures: int = 1
    storage_path: str = "runs"  # local folder or object-store URI for Ray Train checkpoints
    run_name: str = "biovita"  # stable: a re-submitted job resumes instead of restarting
    cpus_per_worker: float = 1.0
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"  # workers on nodes
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {gpu_node: 1}: pin workers
    log_every: int = 10
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs
    compile: bool | None = None  # torch.compile the towers a step runs (None: on GPUs only)
    # a validation set (`biovita.bench.validation`): its media are held out of training and
    # every epoch is scored on it (val/top1: mean species Top-1 of the six directions)
    validation: str = ""

    def bf16(self) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)

    def compiles(self) -> bool:
        return self.use_gpu if self.compile is None else self.compile


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite in the working directory
    experiment: str = "biovita"
    enabled: bool = True
    register_model: str = "biovita"  # the final model is logged as an MLflow model and registered
    # under this name with its benchmark metrics ("" = logged, not registered)
    system_metrics: bool = True  # CPU/memory/disk/network/GPU per run (MLflow's system/...)


@dataclass
class BenchConfig:
    candidates: int = 100
    splits: str = "seen,unseen"  # the benchmarks the job scores: seen and/or unseen species
    seed: int = 0
    out: str = ""  # where the benchmark folders go ("" = <storage_path>/<run_name>): bench_<split>/

    def split_list(self) -> list[str]:
        return [s.strip() for s in self.splits.split(",") if s.strip()]


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(epochs=30, batch_size=64))
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": ...}` - what MLflow logs as parameters."""
        out: dict[str, Any] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = obj

        walk("", self.to_dict())
        return out

    def validate(self) -> "Config":
        _validate(self)
        return self


def packaged_configs(folder: Path = PACKAGED_CONFIGS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def resolve_config_path(ref: str | os.PathLike | None, folder: Path = PACKAGED_CONFIGS,
                        default: Path = DEFAULT_CONFIG) -> Path:
    """A YAML file path, or the name of a config shipped in the package (`default`,
    `bioclip2_clap`, ...): what `--config` accepts."""
    if not ref:
        return default
    path = Path(ref)
    if path.is_file():
        return path
    packaged = folder / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise ConfigError(f"config file {ref} does not exist (packaged configs: "
                      f"{', '.join(packaged_configs(folder))})")


def load_config(
    path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """Read a YAML config (a path or a packaged name; default: `default`), apply overrides,
    validate."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    for ov in overrides:
        keys, value = parse_override(ov)
        set_path(raw, keys, value)
    cfg = build(Config, raw)
    _absolute_paths(cfg)
    return cfg.validate()


def _absolute_paths(cfg: Config) -> None:
    """Local paths and the tracking URI become absolute on the driver: Ray workers and Tune
    trials run in other working directories, where a relative one means another place."""
    for obj, key in ((cfg.data, "root"), (cfg.train, "storage_path"), (cfg.train, "validation"),
                     (cfg.bench, "out")):
        setattr(obj, key, absolute(getattr(obj, key)))
    cfg.mlflow.tracking_uri = tracking_uri(cfg.mlflow.tracking_uri)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config from its dict (as `to_dict` or a YAML file gives it)."""
    return build(Config, data)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


def _plain(obj: Any) -> Any:
    """Tuples as lists, for YAML."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


# --------------------------------------------------------------------------- validation


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def sections(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Every (key path, section) of a config tree, the root first: `("stage2.phase1", ...)`."""
    out = [(prefix, obj)]
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += sections(value, f"{prefix}.{f.name}" if prefix else f.name)
    return out


def _validate(cfg: Config) -> None:
    """Each section by its type (so a section's checks name its own key path)."""
    checks = {DataConfig: _validate_data, ModelConfig: _validate_model, StageConfig: _validate_stage,
              Stage0Config: _validate_stage, Stage2Config: _validate_stage2, TrainConfig: _validate_train,
              BenchConfig: _validate_bench}
    for path, section in sections(cfg):
        if type(section) in checks:
            checks[type(section)](section, path)


def _validate_data(d: DataConfig, key: str) -> None:
    _require(d.per_species_min >= 1, f"{key}.per_species_min", f"must be >= 1, got {d.per_species_min}")
    _require(
        d.per_species_cap >= d.per_species_min,
        f"{key}.per_species_cap",
        f"must be >= {key}.per_species_min ({d.per_species_min}), got {d.per_species_cap}",
    )
    _require(d.triplets_per_species >= 1, f"{key}.triplets_per_species", "must be >= 1")
    _require(d.max_image_pixels > 0, f"{key}.max_image_pixels", "must be > 0")
    _require(0 < d.decode_cpus <= 64, f"{key}.decode_cpus", f"must be in (0, 64], got {d.decode_cpus}")
    _require(d.decode_concurrency >= 0, f"{key}.decode_concurrency", "must be >= 0")
    # below what a stream holds anyway (its inputs, a task's output) decoding never starts
    _require(d.decode_ahead_mb >= 64, f"{key}.decode_ahead_mb", f"must be >= 64, got {d.decode_ahead_mb}")
    _require(d.synth_species == 0 or d.synth_species >= 8, f"{key}.synth_species",
             f"must be >= 8 (or 0: the store's), got {d.synth_species}")
    _require(d.synth_seed >= -1, f"{key}.synth_seed", f"must be >= 0 (or -1: the store's), got {d.synth_seed}")
    if not is_remote(d.root) and not d.synth_if_missing:
        _require(
            Path(d.root).exists(),
            f"{key}.root",
            f"path {d.root} does not exist (create it with `biovita synth --out {d.root}` "
            "or set data.synth_if_missing=true)",
        )


def _validate_model(m: ModelConfig, key: str) -> None:
    _require(m.name in MODEL_CONFIGS, f"{key}.name",
             f"unknown model {m.name!r} (known: {', '.join(sorted(MODEL_CONFIGS))})")
    _require(0 < m.init_temperature < 1, f"{key}.init_temperature", "must be in (0, 1)")
    for name in ("clip_model", "audio_model", "init_checkpoint", "clap"):
        val = getattr(m, name)
        if val and (val.startswith("/") or val.startswith("./")) and not Path(val).exists():
            raise ConfigError(f"{key}.{name}: path {val} does not exist")


def _validate_stage(st: StageConfig, key: str) -> None:
    # every stage is contrastive: a batch needs negatives
    _require(st.batch_size >= 2, f"{key}.batch_size",
             f"must be >= 2 (a contrastive batch needs negatives), got {st.batch_size}")
    _require(st.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {st.epochs}")
    _require(st.lr > 0, f"{key}.lr", f"must be > 0, got {st.lr}")
    _require(st.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
    _require(st.max_steps >= 0, f"{key}.max_steps", "must be >= 0")
    if isinstance(st, Stage0Config):
        _require(st.images_per_species > 0, f"{key}.images_per_species", "must be > 0")


def _validate_stage2(s2: Stage2Config, key: str) -> None:
    _require(s2.w_atc >= 0 and s2.w_aic >= 0, f"{key}.w_atc", "loss weights must be >= 0")
    _require(s2.w_atc + s2.w_aic > 0, f"{key}.w_atc", "w_atc + w_aic must be > 0")
    for name in ("text_lr", "upper_audio_lr"):
        _require(getattr(s2, name) > 0, f"{key}.{name}", "must be > 0")
    for name in ("lam_av_ramp_steps", "lam_vt_ramp_steps", "baseline_batches", "gate_patience"):
        _require(getattr(s2, name) >= 1, f"{key}.{name}", f"must be >= 1, got {getattr(s2, name)}")
    for name in ("upper_audio_unfreeze_step", "logit_freeze_steps"):
        _require(getattr(s2, name) >= 0, f"{key}.{name}", "must be >= 0")
    _require(0 < s2.gate_alpha <= 1, f"{key}.gate_alpha", "must be in (0, 1]")
    _require(1 <= s2.gate_on_ratio <= s2.gate_off_ratio, f"{key}.gate_on_ratio",
             "must satisfy 1 <= gate_on_ratio <= gate_off_ratio")
    _require(0 < s2.logit_reset_temperature < 1, f"{key}.logit_reset_temperature", "must be in (0,1)")


def _validate_train(t: TrainConfig, key: str) -> None:
    _require(t.num_workers >= 1, f"{key}.num_workers", f"must be >= 1, got {t.num_workers}")
    _require(t.zero_stage in (0, 1, 2, 3), f"{key}.zero_stage", f"must be 0-3, got {t.zero_stage}")
    _require(t.grad_clip > 0, f"{key}.grad_clip", "must be > 0")
    _require(t.accum_freq >= 1, f"{key}.accum_freq", "must be >= 1")
    _require(t.prefetch_batches >= 1, f"{key}.prefetch_batches", "must be >= 1")
    _require(t.checkpoint_every >= 0, f"{key}.checkpoint_every", "must be >= 0")
    _require(t.keep_checkpoints >= 1, f"{key}.keep_checkpoints", "must be >= 1")
    _require(t.max_failures >= -1, f"{key}.max_failures", "must be >= -1")
    _require(t.cpus_per_worker > 0, f"{key}.cpus_per_worker", "must be > 0")
    _require(bool(t.run_name.strip()), f"{key}.run_name", "must not be empty")
    _require(t.log_every >= 1, f"{key}.log_every", "must be >= 1")
    _require(not t.validation or is_remote(t.validation) or Path(t.validation).is_file(),
             f"{key}.validation", f"no such file {t.validation!r} (build one with "
             "biovita.bench.validation.build_validation)")
    _require(t.precision != "bf16" or t.use_gpu, f"{key}.precision",
             "bf16 needs train.use_gpu=true (HTS-AT's batch norm has no CPU kernel for it)")
    _require(not (t.compiles() and t.zero_stage == 3), f"{key}.compile",
             "torch.compile runs under ZeRO 0-2 (ZeRO-3 gathers parameters around each module's "
             "forward, which a compiled graph does not call): set train.compile=false or "
             "train.zero_stage=2")


def _validate_bench(b: BenchConfig, key: str) -> None:
    _require(b.candidates >= 2, f"{key}.candidates", f"must be >= 2, got {b.candidates}")
    _require(bool(b.split_list()) and set(b.split_list()) <= {"seen", "unseen"}, f"{key}.splits",
             f"must name seen and/or unseen (comma-separated), got {b.splits!r}")
