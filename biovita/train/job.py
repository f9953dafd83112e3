"""The main job: validate the config, train every stage, benchmark, print the results.

`python ray_jobs/train.py [--config NAME|FILE] [key=value ...]` and `biovita train` both land here.
The training and benchmark modules (torch, Ray) are imported when the job runs: `--help` and a
config error answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

from biovita.config import load_config, packaged_configs
from biovita.errors import ConfigError, StoreError


def parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train both BioVITA stages on Ray Train + DeepSpeed, then run the benchmark. "
        "With no arguments: the embedded synthetic run on a local Ray instance.",
        epilog="examples:\n  python ray_jobs/train.py\n"
        "  python ray_jobs/train.py --config bioclip2_clap train.num_workers=16\n"
        "  ray job submit --working-dir . -- python ray_jobs/train.py train.run_name=exp1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="default",
                   help="a YAML file, or a config shipped with biovita: "
                        f"{', '.join(packaged_configs())} (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.num_workers=2 stage1.lr=1e-4")
    p.add_argument("--no-bench", action="store_true", help="train only; skip the benchmark")
    return p


def main(argv: list[str] | None = None, prog: str = "train.py") -> int:
    args = parser(prog).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)  # fails here, before Ray starts
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    try:
        results = run(cfg, bench=not args.no_bench)
    except StoreError as e:  # (checked first, before Ray starts)
        print(f"store error: {e}", file=sys.stderr)
        return 2
    if results:
        print(f"results: {results}")
    return 0


def check_data(cfg, bench: bool = True):
    """The store at `data.root` (made when it is the synthetic one and missing): refused when
    a table the run reads is absent or has a shard of another schema. Returns its health."""
    from biovita.data.validate import check_store
    from biovita.train.chain import ensure_data
    from biovita.train.stages import stages_to_run, tables_needed

    ensure_data(cfg)
    health = check_store(cfg.data.root)
    needed = tables_needed(stages_to_run(cfg)) | ({"audio", "image"} if bench else set())
    health.require(sorted(needed), "training" + (" and the benchmark" if bench else ""))
    for path, why in health.truncated.items():
        print(f"store: skipped {path}: {why}", flush=True)
    return health


def run(cfg, bench: bool = True) -> str | None:
    from biovita.runtime import configure_output, init_ray, quiet_libraries

    quiet_libraries()  # before DeepSpeed, MLflow and Ray are imported: they speak at import
    from biovita.data.stats import media_stats
    from biovita.train.chain import run_chain
    from biovita.train.stages import stages_to_run
    from biovita.train.driver import dataset_fingerprint, run_dir, save_init
    from biovita.tracking.runs import Tracker, git_commit

    t0 = time.time()
    health = check_data(cfg, bench)
    # a local instance gets 2 logical CPUs per core: the trainer's threads and the light
    # decode tasks then share the cores instead of the decode tasks waiting for a free CPU
    init_ray(num_cpus=2 * (os.cpu_count() or 1), object_store_memory=int(1e9))
    configure_output()
    tracker = Tracker.for_job(cfg)
    monitor = contextlib.nullcontext()
    if tracker.parent:
        fingerprint = dataset_fingerprint(cfg.data.root)
        tracker.parent.params({**cfg.flat(), "git_commit": git_commit(),
                               "dataset_fingerprint": fingerprint})
        tracker.record_store(cfg.data.root, fingerprint)
        tracker.parent.metrics(health.skipped_counts(), step=0)
        if cfg.mlflow.system_metrics:
            monitor = tracker.parent.system_metrics()
    try:
        with monitor:
            media_stats().reset.remote()
            models = run_chain(cfg, tracker, stages_to_run(cfg), save_init(cfg))
            out = run_benchmarks(cfg, models, tracker) if bench else None
    except BaseException:
        tracker.end("FAILED")
        raise
    if tracker.parent:
        tracker.parent.metrics({"job_seconds": time.time() - t0}, step=0)
    tracker.end()
    print(f"total time {time.time() - t0:.0f} s; run dir {run_dir(cfg)}")
    if tracker.parent:
        from biovita.tracking.runs import experiment_link

        print(f"MLflow: mlflow ui --backend-store-uri {tracker.uri}, then "
              f"http://127.0.0.1:5000{experiment_link(tracker.experiment)}", flush=True)
    return out


def run_benchmarks(cfg, models: dict[str, str], tracker) -> str:
    """Build the seen and unseen benchmarks from the store (official layout, beside the run),
    score stage 1 and stage 2 on each, print and log; `results.json` holds the final stage's
    scores keyed by split."""
    from biovita.bench.build import build_benchmark
    from biovita.bench.report import format_summary
    from biovita.bench.run import evaluate
    from biovita.locations import is_remote
    from biovita.train.driver import run_dir
    from biovita.train.stages import benchmarked

    local = Path(run_dir(cfg)) if not is_remote(run_dir(cfg)) else Path("results") / cfg.train.run_name
    base = Path(cfg.bench.out) if cfg.bench.out else local
    stages = benchmarked(models)
    scored: dict[str, dict[str, dict]] = {}  # split -> stage -> result
    for split in cfg.bench.split_list():
        bench = base / f"bench_{split}"
        if not (bench / "bench.json").exists():
            build_benchmark(cfg.data.root, bench, cfg.bench.candidates, split, cfg.bench.seed)
        suffix = "" if split == "seen" else f"_{split}"
        for stage in stages:
            name = stage.bench_name
            scored.setdefault(split, {})[stage.name] = evaluate(
                bench, models[stage.name], local / "features" / stage.name, use_gpu=cfg.train.use_gpu,
                json_out=local / f"results_{name}{suffix}.json", logger=tracker.parent,
                prefix=f"bench_{name}{suffix}", title=f"BioVITA Bench ({split}) - {name}",
                table=stage is stages[-1])  # the earlier stages: in the summary, the JSON, MLflow
    final_stage = stages[-1].name
    print()
    print(format_summary(scored))
    result = {"stage": final_stage, "checkpoint": models[final_stage],
              **{split: by_stage[final_stage] for split, by_stage in scored.items()}}
    out = local / "results.json"
    out.write_text(json.dumps(result, indent=1))
    if tracker.parent:
        tracker.parent.artifact(out, "bench")
        from biovita.bench.report import mean_top1
        from biovita.tracking.pyfunc import log_model

        summary = {f"bench{'' if split == 'seen' else '_' + split}_{lvl}_avg_top1":
                   mean_top1(by_stage[final_stage], lvl)
                   for split, by_stage in scored.items() for lvl in ("species", "genus", "family")}
        version = log_model(tracker.parent.run_id, tracker.uri, models[final_stage], summary,
                            register=cfg.mlflow.register_model or None)
        print(f"MLflow model: {getattr(version, 'name', 'model')} version "
              f"{getattr(version, 'version', '-')} (run {tracker.parent.run_id})", flush=True)
    return str(out)
