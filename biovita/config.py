"""Typed run configuration: dataclasses loaded from YAML, with `a.b=value` overrides.

Everything is validated here, on the driver, before Ray or any worker starts: a bad key,
type or value raises one :class:`ConfigError` that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


@dataclass
class DataConfig:
    root: str = "data/synthetic"  # Parquet store: local folder or s3:// / gs:// URI
    synth_if_missing: bool = False  # create the embedded synthetic dataset when root is empty
    synth_species: int = 32  # species in the synthetic set (seen + unseen)
    synth_seed: int = 0
    sample_rate: int = 48_000
    clip_seconds: float = 10.0
    per_species_cap: int = 20  # species-balanced epochs: at most this many clips per species
    per_species_min: int = 5  # species with fewer clips are oversampled to this many
    triplets_per_species: int = 20  # stage-2 triplets per species and epoch
    max_image_pixels: int = 50_000_000  # decompression-bomb guard
    decode_cpus: float = 0.5  # logical CPUs per decode task (fractional: avoids starving Train)
    # decode workers: a training stream's actor pool, a single pass's tasks in flight;
    # 0 = (cluster CPUs at start - the training workers' CPUs) / decode_cpus
    decode_concurrency: int = 0
    decode_ahead_mb: float = 512  # decoded data that may wait for the trainer before decoding pauses


@dataclass
class ModelConfig:
    name: str = "tiny"  # a registered config (`biovita list-models`), filled into the fields below
    clip_model: str = ""  # open_clip name, hf-hub:org/repo, local-dir:/path or checkpoint folder
    clip_pretrained: str = ""  # open_clip pretrained tag or weights file ("" = random / from hub id)
    audio_model: str = ""  # "tiny", a hub id like laion/clap-htsat-unfused, or a save_pretrained folder
    require_pretrained: bool = False
    init_temperature: float = 0.07


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
    strategy: str = "deepspeed"  # deepspeed | ddp
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
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD | STRICT_PACK (workers on nodes)
    worker_resources: dict[str, float] = field(default_factory=dict)  # e.g. {gpu_node: 1}: pin workers
    log_every: int = 10


@dataclass
class MlflowConfig:
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite in the working directory
    experiment: str = "biovita"
    enabled: bool = True


@dataclass
class BenchConfig:
    candidates: int = 100
    split: str = "seen"
    seed: int = 0
    out: str = ""  # where the benchmark folder goes ("" = <storage_path>/<run_name>/bench)


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


# --------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is dict:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in value.items()):
            raise ConfigError(f"{key}: expected a mapping of names to numbers, got {value!r}")
        return {k: float(v) for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{key}: unknown key (valid keys here: {', '.join(sorted(names))})")
    default = cls()
    kwargs = {}
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                # merge a partial mapping over the default sub-config
                base = dataclasses.asdict(getattr(default, name))
                value = _deep_merge(base, value)
            kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.num_workers=2")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = nxt
    node[path[-1]] = value


def load_config(
    path: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()
) -> Config:
    """Read a YAML config (default: configs/default.yaml), apply overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_path(raw, keys, value)
    cfg = _build(Config, raw)
    _absolute_paths(cfg)
    return cfg.validate()


def _absolute_paths(cfg: Config) -> None:
    """Local paths become absolute on the driver: Ray workers and Tune trials run elsewhere."""
    for section, key in (("data", "root"), ("train", "storage_path"), ("bench", "out")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not _is_remote(value) and not value.startswith("file://"):
            setattr(obj, key, str(Path(value).expanduser().resolve()))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config on a worker (it was validated on the driver)."""
    return _build(Config, data)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    d = cfg.to_dict()
    d["stage2"]["betas"] = list(d["stage2"]["betas"])
    Path(path).write_text(yaml.safe_dump(d, sort_keys=False))


# --------------------------------------------------------------------------- validation


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _validate(cfg: Config) -> None:
    from biovita.models.registry import MODEL_CONFIGS  # light: no torch

    d = cfg.data
    _require(d.sample_rate > 0, "data.sample_rate", f"must be > 0, got {d.sample_rate}")
    _require(d.clip_seconds > 0, "data.clip_seconds", f"must be > 0, got {d.clip_seconds}")
    _require(d.per_species_min >= 1, "data.per_species_min", f"must be >= 1, got {d.per_species_min}")
    _require(
        d.per_species_cap >= d.per_species_min,
        "data.per_species_cap",
        f"must be >= data.per_species_min ({d.per_species_min}), got {d.per_species_cap}",
    )
    _require(d.triplets_per_species >= 1, "data.triplets_per_species", "must be >= 1")
    _require(d.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
    _require(0 < d.decode_cpus <= 64, "data.decode_cpus", f"must be in (0, 64], got {d.decode_cpus}")
    _require(d.decode_concurrency >= 0, "data.decode_concurrency", "must be >= 0")
    _require(d.decode_ahead_mb > 0, "data.decode_ahead_mb", f"must be > 0, got {d.decode_ahead_mb}")
    _require(d.synth_species >= 8, "data.synth_species", f"must be >= 8, got {d.synth_species}")
    if not _is_remote(d.root) and not d.synth_if_missing:
        _require(
            Path(d.root).exists(),
            "data.root",
            f"path {d.root} does not exist (create it with `biovita synth --out {d.root}` "
            "or set data.synth_if_missing=true)",
        )

    m = cfg.model
    _require(
        m.name in MODEL_CONFIGS,
        "model.name",
        f"unknown model {m.name!r} (known: {', '.join(sorted(MODEL_CONFIGS))})",
    )
    _require(0 < m.init_temperature < 1, "model.init_temperature", "must be in (0, 1)")
    for key in ("clip_model", "audio_model"):
        val = getattr(m, key)
        if val and (val.startswith("/") or val.startswith("./")) and not Path(val).exists():
            raise ConfigError(f"model.{key}: path {val} does not exist")

    stages = {"stage0": cfg.stage0, "stage1": cfg.stage1}
    stages.update({"stage2.phase1": cfg.stage2.phase1, "stage2.phase2": cfg.stage2.phase2})
    for name, st in stages.items():
        _require(st.batch_size > 0, f"{name}.batch_size", f"must be > 0, got {st.batch_size}")
        _require(st.epochs >= 0, f"{name}.epochs", f"must be >= 0, got {st.epochs}")
        _require(st.lr > 0, f"{name}.lr", f"must be > 0, got {st.lr}")
        _require(st.weight_decay >= 0, f"{name}.weight_decay", "must be >= 0")
        _require(st.max_steps >= 0, f"{name}.max_steps", "must be >= 0")
        if name != "stage0":
            _require(
                st.batch_size >= 2,
                f"{name}.batch_size",
                "must be >= 2 (a contrastive batch needs negatives)",
            )
    _require(cfg.stage0.images_per_species > 0, "stage0.images_per_species", "must be > 0")

    s2 = cfg.stage2
    _require(s2.w_atc >= 0 and s2.w_aic >= 0, "stage2.w_atc", "loss weights must be >= 0")
    _require(s2.w_atc + s2.w_aic > 0, "stage2.w_atc", "w_atc + w_aic must be > 0")
    for key in ("text_lr", "upper_audio_lr"):
        _require(getattr(s2, key) > 0, f"stage2.{key}", "must be > 0")
    for key in ("lam_av_ramp_steps", "lam_vt_ramp_steps", "baseline_batches", "gate_patience"):
        _require(getattr(s2, key) >= 1, f"stage2.{key}", f"must be >= 1, got {getattr(s2, key)}")
    for key in ("upper_audio_unfreeze_step", "logit_freeze_steps"):
        _require(getattr(s2, key) >= 0, f"stage2.{key}", "must be >= 0")
    _require(0 < s2.gate_alpha <= 1, "stage2.gate_alpha", "must be in (0, 1]")
    _require(
        1 <= s2.gate_on_ratio <= s2.gate_off_ratio,
        "stage2.gate_on_ratio",
        "must satisfy 1 <= gate_on_ratio <= gate_off_ratio",
    )
    _require(0 < s2.logit_reset_temperature < 1, "stage2.logit_reset_temperature", "must be in (0,1)")

    t = cfg.train
    _require(t.num_workers >= 1, "train.num_workers", f"must be >= 1, got {t.num_workers}")
    _require(t.strategy in ("deepspeed", "ddp"), "train.strategy", "must be deepspeed or ddp")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0-3, got {t.zero_stage}")
    _require(t.grad_clip > 0, "train.grad_clip", "must be > 0")
    _require(t.accum_freq >= 1, "train.accum_freq", "must be >= 1")
    _require(t.prefetch_batches >= 1, "train.prefetch_batches", "must be >= 1")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    _require(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _require(t.max_failures >= -1, "train.max_failures", "must be >= -1")
    _require(t.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
    _require(bool(t.run_name.strip()), "train.run_name", "must not be empty")
    _require(t.log_every >= 1, "train.log_every", "must be >= 1")
    _require(t.placement_strategy in ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"),
             "train.placement_strategy", "must be PACK, SPREAD, STRICT_SPREAD or STRICT_PACK")

    b = cfg.bench
    _require(b.candidates >= 2, "bench.candidates", f"must be >= 2, got {b.candidates}")
    _require(b.split in ("seen", "unseen"), "bench.split", "must be seen or unseen")
