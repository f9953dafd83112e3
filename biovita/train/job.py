"""The main job: validate the config, train every stage, benchmark, print the results.

`python ray_jobs/train.py [--config FILE] [key=value ...]` and `biovita train` both land here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from biovita.config import DEFAULT_CONFIG, ConfigError, load_config


def parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train both BioVITA stages on Ray Train + DeepSpeed, then run the benchmark. "
        "With no arguments: the embedded synthetic run on a local Ray instance.",
        epilog="examples:\n  python ray_jobs/train.py\n"
        "  python ray_jobs/train.py --config configs/bioclip2_clap.yaml train.num_workers=16\n"
        "  ray job submit --working-dir . -- python ray_jobs/train.py train.run_name=exp1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default: %(default)s)")
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
    results = run(cfg, bench=not args.no_bench)
    if results:
        print(f"results: {results}")
    return 0


def run(cfg, bench: bool = True) -> str | None:
    import ray

    from biovita.data.pipeline import init_ray
    from biovita.train.driver import Tracker, ensure_data, log_job_params, run_dir, run_training

    t0 = time.time()
    ensure_data(cfg)
    # a local instance gets 2 logical CPUs per core: the trainer's threads and the light
    # decode tasks then share the cores instead of the decode tasks waiting for a free CPU
    init_ray(num_cpus=2 * (os.cpu_count() or 1), object_store_memory=int(1e9))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the trainer prints one progress line per stage instead
    tracker = Tracker(cfg)
    log_job_params(cfg, tracker)
    try:
        models = run_training(cfg, tracker)
        out = run_benchmarks(cfg, models, tracker) if bench else None
    except BaseException:
        if tracker.parent:
            tracker.parent.end("FAILED")
        raise
    if tracker.parent:
        tracker.parent.metrics({"job_seconds": time.time() - t0}, step=0)
        tracker.parent.end()
    print(f"total time {time.time() - t0:.0f} s; run dir {run_dir(cfg)}")
    return out


def run_benchmarks(cfg, models: dict[str, str], tracker) -> str:
    """Build the benchmark from the store, score stage 1 and stage 2, print and log."""
    import json

    from biovita.bench.build import build_benchmark
    from biovita.bench.report import format_table, write_results
    from biovita.bench.run import extract_features
    from biovita.bench.score import score_benchmark
    from biovita.data.store import is_remote
    from biovita.train.driver import run_dir

    local = Path(run_dir(cfg)) if not is_remote(run_dir(cfg)) else Path("results") / cfg.train.run_name
    bench = Path(cfg.bench.out) if cfg.bench.out else local / f"bench_{cfg.bench.split}"
    if not (bench / "bench.json").exists():
        build_benchmark(cfg.data.root, bench, cfg.bench.candidates, cfg.bench.split, cfg.bench.seed)
    scored = {}
    for stage in ("stage1", "stage2.phase2"):
        if stage not in models:
            continue
        feats = local / "features" / stage
        extract_features(bench, models[stage], feats, use_gpu=cfg.train.use_gpu)
        scored[stage] = score_benchmark(bench, feats)
    final_stage = "stage2.phase2" if "stage2.phase2" in scored else "stage1"
    result = dict(scored[final_stage])
    result["stage"] = final_stage
    result["checkpoint"] = models[final_stage]
    out = local / "results.json"
    for stage, res in scored.items():
        name = "stage2" if stage == "stage2.phase2" else stage
        print()
        print(format_table(res, bench, title=f"BioVITA Bench ({cfg.bench.split}) - {name}"))
        write_results(res, local / f"results_{name}.json",
                      logger=tracker.parent, prefix=f"bench_{name}")
    out.write_text(json.dumps(result, indent=1))
    if tracker.parent:
        tracker.parent.artifact(out, "bench")
    return str(out)
