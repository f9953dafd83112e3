"""Ray Tune sweeps of temperature, loss weights and learning rates (Train V2 pattern).

Each trial is a driver function that builds and fits the stage TorchTrainers (DeepSpeed inside)
with `TuneReportCallback`. After every epoch a trial scores a validation benchmark (a few
held-out training clips and photos of each seen species, built once per sweep and shared:
`biovita.bench.validation`) and reports `val/top1`, the mean species Top-1 of the six
directions, which ASHA compares. MLflow: one parent run for the sweep (with every trial's
score), one child run per trial; the best trial's config is written as a YAML file that
`python ray_jobs/train.py --config` accepts.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from biovita.config import (
    PACKAGED_CONFIGS,
    Config,
    config_from_dict,
    load_config,
    resolve_config_path,
    save_config,
)
from biovita.errors import ConfigError, StoreError
from biovita.locations import absolute, is_remote
from biovita.structured import build

# Ray, torch and the training modules are imported inside the functions that use them:
# `biovita tune --help` (this module's parser) stays instant.

SPACES = PACKAGED_CONFIGS / "sweeps"  # search spaces shipped with biovita
DEFAULT_SPACE = SPACES / "default.yaml"


@dataclass
class Dist:
    """One parameter's distribution: `uniform` / `loguniform` between `low` and `high`, a
    random `choice` among `values`, or a `grid` over them."""

    type: Literal["uniform", "loguniform", "choice", "grid"] = "uniform"
    low: float | None = None
    high: float | None = None
    values: list[Any] = field(default_factory=list)

    @property
    def ranged(self) -> bool:
        return self.type in ("uniform", "loguniform")

    def check(self, key: str) -> None:
        if self.ranged:
            if self.low is None or self.high is None or not self.low < self.high:
                raise ConfigError(f"{key}: empty range (need low < high, got {self.low!r}, {self.high!r})")
            if self.type == "loguniform" and self.low <= 0:
                raise ConfigError(f"{key}: loguniform needs low > 0")
        elif not self.values:
            raise ConfigError(f"{key}: empty list of values")

    def extremes(self) -> list:
        """The values whose configs must be valid (so every drawn one is)."""
        return [self.low, self.high] if self.ranged else list(self.values)

    def tune(self):
        from ray import tune

        return {"uniform": lambda: tune.uniform(self.low, self.high),
                "loguniform": lambda: tune.loguniform(self.low, self.high),
                "choice": lambda: tune.choice(self.values),
                "grid": lambda: tune.grid_search(self.values)}[self.type]()


@dataclass
class Asha:
    grace_period: int = 1  # reports before a trial may be stopped
    reduction_factor: int = 2


@dataclass
class SweepSpec:
    base_config: str = "default"  # a training config: packaged name or YAML path
    overrides: list[str] = field(default_factory=list)  # applied to the base config
    stages: list[str] = field(default_factory=list)  # the stages each trial trains ([]: all it can)
    metric: str = "val/top1"  # or any metric the loop reports, e.g. top1_batch
    mode: Literal["max", "min"] = "max"
    validation_per_species: int = 2  # held-out clips and photos per species (0: no validation)
    searcher: Literal["random", "grid", "optuna"] = "random"
    num_samples: int = 4
    max_concurrent_trials: int = 0  # 0 = from the cluster's CPUs/GPUs
    seed: int = 0
    asha: Asha = field(default_factory=Asha)
    name: str = "biovita-sweep"
    storage_path: str = "runs/sweeps"  # made absolute on the driver
    params: dict[str, Dist] = field(default_factory=dict)


def load_space(path: str | os.PathLike, extra_overrides: list[str] = ()) -> tuple[SweepSpec, Config]:
    """Read and validate a search space; every error is raised before any trial starts."""
    raw = yaml.safe_load(resolve_config_path(path, SPACES, DEFAULT_SPACE).read_text()) or {}
    spec = build(SweepSpec, raw, "sweep")
    spec.overrides = list(spec.overrides) + list(extra_overrides)
    spec.storage_path = absolute(spec.storage_path)
    base = load_config(spec.base_config, spec.overrides)
    flat = base.flat()
    from biovita.train.stages import sweepable

    spec.stages = spec.stages or sweepable()
    if not spec.params:
        raise ConfigError("sweep.params: the search space is empty")
    if spec.num_samples < 1:
        raise ConfigError("sweep.num_samples: must be >= 1")
    if spec.metric.startswith("val/") and spec.validation_per_species < 1:
        raise ConfigError(f"sweep.metric: {spec.metric} needs validation_per_species >= 1")
    for st in spec.stages:
        if st not in sweepable():
            raise ConfigError(f"sweep.stages: {st!r} is not a stage a trial trains "
                              f"(those are: {', '.join(sweepable())})")
    for name, dist in spec.params.items():
        key = f"sweep.params.{name}"
        if name not in flat:
            raise ConfigError(f"{key}: not a config parameter (e.g. stage1.lr, model.init_temperature)")
        dist.check(key)
        for v in dist.extremes():  # each value must also make a valid config
            try:
                load_config(spec.base_config, spec.overrides + [f"{name}={v}"])
            except ConfigError as e:
                raise ConfigError(f"{key}: value {v!r} gives an invalid config ({e})") from None
    return spec, base


def param_space(spec: SweepSpec) -> dict[str, Any]:
    return {name: d.tune() for name, d in spec.params.items()}


def with_params(base: Config, params: dict[str, Any]) -> Config:
    """The base config with `params` ({"stage1.lr": 1e-4, ...}) set, validated."""
    d = copy.deepcopy(base.to_dict())
    for name, v in params.items():
        node = d
        *parents, leaf = name.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return config_from_dict(d).validate()


def trial_config(base: Config, params: dict[str, Any], trial_id: str, storage: str) -> Config:
    """The base config with a trial's parameters (its paths and tracking URI stay the
    driver's absolute ones; a failed trial is Tune's to retry, not Ray Train's)."""
    cfg = with_params(base, params)
    cfg.train.run_name = f"trial-{trial_id}"
    cfg.train.storage_path = storage
    cfg.train.max_failures = 0
    return cfg


def make_driver_fn(base: Config, spec: SweepSpec, init_model: str, parent_run: str | None):
    """The Tune trainable: one trial = the chosen stages (`run_chain`), each a TorchTrainer,
    all logged into the trial's one MLflow run under the sweep's parent run (in the store the
    driver resolved: a trial runs in a directory of its own)."""

    def driver_fn(params: dict) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        from biovita.tracking.runs import Tracker
        from biovita.train.chain import run_chain
        from biovita.train.stages import get_stage

        trial_id = tune.get_context().get_trial_id()
        cfg = trial_config(base, params, trial_id, spec.storage_path)
        cfg.mlflow.enabled = parent_run is not None
        tracker = Tracker(cfg.mlflow, f"trial-{trial_id}", {"biovita.trial": trial_id},
                          parent_id=parent_run, per_stage=False)
        if tracker.parent:
            tracker.parent.params(params)
        models = run_chain(cfg, tracker, [get_stage(s) for s in spec.stages], init_model,
                           callbacks=[TuneReportCallback()],
                           report_every_log=not cfg.train.validation)  # else once per epoch
        if tracker.parent:
            tracker.parent.tags({"biovita.final_model": models[spec.stages[-1]]})
        tracker.end()

    return driver_fn


def concurrent_trials(cfg: Config) -> int:
    import ray

    res = ray.cluster_resources()
    per = cfg.train.num_workers * (1 if cfg.train.use_gpu else cfg.train.cpus_per_worker)
    key = "GPU" if cfg.train.use_gpu else "CPU"
    # keep a CPU per trial for Ray Data decoding
    need = per + (0 if cfg.train.use_gpu else 1)
    return max(1, int(res.get(key, 1) // need))


def _shared_base(base: Config, spec: SweepSpec) -> str:
    """The trial-independent start: the init weights and (embedded run) the stage-0 model;
    the validation set every trial scores (`base.train.validation` is set to it)."""
    from biovita.bench.validation import build_validation
    from biovita.data.store import path_exists
    from biovita.tracking.runs import Tracker
    from biovita.train.chain import run_chain
    from biovita.train.driver import save_init
    from biovita.train.stages import STAGE0

    shared = copy.deepcopy(base)
    shared.train.run_name = f"{spec.name}-shared"
    shared.train.storage_path = spec.storage_path
    shared.mlflow.enabled = False
    init = save_init(shared)
    if spec.validation_per_species:  # first: stage 0 must not see its photos either
        path = f"{spec.storage_path}/{spec.name}-shared/validation.npz"
        if not path_exists(path):
            build_validation(base.data.root, init, path, spec.validation_per_species, base.train.seed)
        base.train.validation = shared.train.validation = path
        print(f"validation set: {path}", flush=True)
    if STAGE0.runs(shared):
        init = run_chain(shared, Tracker(shared.mlflow, "", {}), [STAGE0], init)[STAGE0.name]
    return init


def _tuner(spec: SweepSpec, base: Config, trainable):
    """A new Tuner, or the interrupted sweep's, restored."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    path = f"{spec.storage_path}/{spec.name}"
    if tune.Tuner.can_restore(path):
        print(f"resuming the interrupted sweep at {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=10_000,
                              grace_period=spec.asha.grace_period,
                              reduction_factor=spec.asha.reduction_factor)
    search_alg = None
    if spec.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent_trials or concurrent_trials(base),
            scheduler=scheduler, search_alg=search_alg),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_path,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def run_sweep(spec: SweepSpec, base: Config) -> dict:
    from ray import tune

    from biovita.runtime import configure_output, init_ray, quiet_libraries

    quiet_libraries()  # before DeepSpeed, MLflow and Ray are imported: they speak at import
    from biovita.tracking.runs import Tracker
    from biovita.train.job import check_data

    t0 = time.time()
    check_data(base, bench=False)
    init_ray(num_cpus=max(4, os.cpu_count() or 1), object_store_memory=int(1e9))
    configure_output()
    init = _shared_base(base, spec)
    parent = Tracker(base.mlflow, spec.name, {"biovita.sweep": spec.name}).parent
    if parent:
        parent.params({"sweep.searcher": spec.searcher, "sweep.num_samples": spec.num_samples,
                       "sweep.metric": spec.metric, "sweep.stages": ",".join(spec.stages),
                       **{f"space.{k}": v for k, v in spec.params.items()}})
    # the trial driver only waits on its TorchTrainer: it must not hold a CPU that the
    # training workers or the decode tasks need (with 4 CPUs and 2 trials it deadlocks)
    trainable = tune.with_resources(
        make_driver_fn(base, spec, init, parent.run_id if parent else None), {"CPU": 0.01})
    results = _tuner(spec, base, trainable).fit()
    rows = [{"trial": Path(r.path).name if r.path else "?", **r.config,
             spec.metric: (r.metrics or {}).get(spec.metric),
             "iterations": (r.metrics or {}).get("training_iteration"), "error": bool(r.error)}
            for r in results]
    good = sorted((r for r in rows if r[spec.metric] is not None), key=lambda r: r[spec.metric],
                  reverse=spec.mode == "max")
    if not good:
        raise RuntimeError(f"no trial reported the metric; see the trial logs under "
                           f"{spec.storage_path}/{spec.name}")
    # the base with the winning values: a trial's own settings (no Ray Train retries) stay out
    best_cfg = with_params(base, {k: good[0][k] for k in spec.params})
    best_cfg.train.run_name = f"{spec.name}-best"
    best_cfg.train.validation = ""  # the final run trains on every training medium
    out_dir = Path(spec.storage_path if not is_remote(spec.storage_path) else "results") / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)
    best_yaml = out_dir / "best_config.yaml"
    save_config(best_cfg, best_yaml)
    plot = plot_trials(rows, spec, out_dir / "trials.png")
    if parent:
        parent.metrics({f"best_{spec.metric}": good[0][spec.metric],
                        "sweep_seconds": time.time() - t0}, step=0)
        # every trial's score on the parent: a curve over trials, and the table of all of them
        for k, r in enumerate(rows):
            parent.metrics({f"trials/{spec.metric}": r[spec.metric]}, step=k)
        parent.table([{k: v for k, v in r.items()} for r in rows], "trials.json")
        parent.artifact(best_yaml)
        parent.artifact(plot)
        parent.end()
    print(format_trials(good + [r for r in rows if r[spec.metric] is None], spec))
    print(f"best config: {best_yaml}")
    return {"rows": rows, "best": good[0], "best_config": str(best_yaml), "plot": str(plot)}


def format_trials(rows: list[dict], spec: SweepSpec) -> str:
    cols = ["trial", *spec.params, spec.metric, "iterations"]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c)).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def plot_trials(rows: list[dict], spec: SweepSpec, path: Path) -> Path:
    """Parallel coordinates: one line per trial, coloured by the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(spec.params)
    ok = [r for r in rows if r[spec.metric] is not None]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(names), 4))
    if ok:
        vals = np.array([[float(r[n]) for n in names] for r in ok])
        logs = [spec.params[n].type == "loguniform" for n in names]
        vals = np.where(logs, np.log10(np.clip(vals, 1e-12, None)), vals)
        lo, hi = vals.min(0), vals.max(0)
        norm = (vals - lo) / np.where(hi > lo, hi - lo, 1)
        metric = np.array([r[spec.metric] for r in ok], dtype=float)
        cmap = plt.get_cmap("viridis")
        span = (metric.max() - metric.min()) or 1
        for row, m in zip(norm, metric):
            ax.plot(range(len(names)), row, color=cmap((m - metric.min()) / span), lw=2, alpha=0.8)
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(metric.min(), metric.min() + span))
        fig.colorbar(sm, ax=ax, label=spec.metric)
    ax.set_xticks(range(len(names)), [n + (" (log)" if spec.params[n].type == "loguniform" else "")
                                      for n in names], rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_title(f"{spec.name}: {len(ok)} trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, prog: str = "sweep.py") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Ray Tune sweep of BioVITA's temperature, "
                                "loss weights and learning rates (ASHA; MLflow parent + child runs).")
    p.add_argument("--space", default="default",
                   help="search space: a YAML file or a space shipped with biovita "
                        "(biovita/configs/sweeps/; default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the base training config, e.g. stage1.epochs=2")
    a = p.parse_args(argv)
    try:
        spec, base = load_space(a.space, a.overrides)
    except ConfigError as e:
        print(f"sweep config error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    try:
        run_sweep(spec, base)
    except StoreError as e:  # (checked first, before Ray starts)
        print(f"store error: {e}", file=sys.stderr)
        return 2
    return 0

