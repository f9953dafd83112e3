"""Learning evidence on the embedded world: the recipe over seeds, and the parts of phase 2
removed one at a time.

For each seed (the synthetic world's seed and the training seed alike) the main job's recipe
runs once (stage 0, stage 1, stage 2 phase 1 and phase 2), then, from the same stage-1 and
phase-1 models:
- `no_phase2`: the phase-1 model (stage 2 without phase 2: `stage2.phase2.epochs=0`);
- `no_gate_guard`: phase 2 again with the ATC gate never shutting and no guard term
  (`stage2.gate_off_ratio=1e9 stage2.guard_weight=0`);
- `no_aic`: both phases again with ATC only (`stage2.w_aic=0 stage2.w_atc=1
  stage2.lam_av_max=0`).
Every model is scored on the seen and the unseen benchmark of its world; the script prints
mean and standard deviation over the seeds per direction and level, and paired differences
(same seed, so the world's own difficulty cancels): stage 2 - stage 1 on A2I and I2A, and the
full recipe against each variant. Finished stages are reused on a re-run (the run
folders under --out), so an interrupted run resumes. Every stage is an MLflow run in the
experiment `biovita-learning`.

    python benchmarks/learning.py [--seeds 0 1 2] [--ablations no_aic ...] [--out runs/learning] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name -> (overrides, stages retrained, the model they start from)
    "no_gate_guard": (["stage2.gate_off_ratio=1e9", "stage2.guard_weight=0"], ("stage2.phase2",),
                      "stage2.phase1"),
    "no_aic": (["stage2.w_aic=0", "stage2.w_atc=1", "stage2.lam_av_max=0"],
               ("stage2.phase1", "stage2.phase2"), "stage1"),
}
ORDER = ("stage1", "no_phase2", "full", "no_gate_guard", "no_aic")
DIRS = ("A2T", "T2A", "A2I", "I2A", "I2T", "T2I")
LEVELS = ("species", "genus", "family")


def seed_models(seed: int, out: Path, extra: list[str], ablations=tuple(VARIANTS)
                ) -> tuple[dict[str, str], object]:
    """Train the recipe and `ablations` for one seed; {variant: model URI}, the config."""
    from biovita.config import load_config
    from biovita.train.chain import ensure_data, run_chain
    from biovita.train.driver import save_init
    from biovita.train.stages import get_stage, stages_to_run
    from biovita.tracking.runs import Tracker

    base = [f"data.root={out / f'world{seed}'}", f"data.synth_seed={seed}", f"train.seed={seed}",
            f"train.storage_path={out}", "mlflow.experiment=biovita-learning", *extra]
    cfg = load_config("default", [*base, f"train.run_name=seed{seed}-full"])
    ensure_data(cfg)
    tracker = Tracker.for_job(cfg)
    models = run_chain(cfg, tracker, stages_to_run(cfg), save_init(cfg))
    tracker.end()
    got = {"stage1": models["stage1"], "no_phase2": models["stage2.phase1"],
           "full": models["stage2.phase2"]}
    for name in ablations:
        overrides, stages, start = VARIANTS[name]
        vcfg = load_config("default", [*base, *overrides, f"train.run_name=seed{seed}-{name}"])
        tracker = Tracker.for_job(vcfg)
        got[name] = run_chain(vcfg, tracker, [get_stage(s) for s in stages], models[start])[stages[-1]]
        tracker.end()
    return got, cfg


def score(cfg, models: dict[str, str], out: Path, log) -> dict:
    """{split: {variant: result}} on the world's seen and unseen benchmarks."""
    from biovita.bench.build import build_benchmark
    from biovita.bench.run import evaluate

    res: dict = {}
    for split in ("seen", "unseen"):
        bench = out / f"bench_{split}"
        if not (bench / "bench.json").exists():
            build_benchmark(cfg.data.root, bench, cfg.bench.candidates, split, cfg.bench.seed)
        for name, uri in models.items():
            with contextlib.redirect_stdout(log):  # the tables go to the log; the summary here
                res.setdefault(split, {})[name] = evaluate(
                    bench, uri, out / "features" / name, title=f"{split} {name}")
    return res


def top1(result: dict, level: str, d: str) -> float:
    """Top-1 % of one direction, or with d="avg" the mean of the six."""
    if d == "avg":
        return statistics.mean(top1(result, level, x) for x in DIRS)
    return 100 * result[level][d]["top1"]


def variants(per_seed: list[dict]) -> list[str]:
    """The variants scored, in the tables' order."""
    return [v for v in ORDER if v in per_seed[0]["seen"]]


def table(per_seed: list[dict], split: str, level: str) -> str:
    head = f"{split + ' / ' + level:<22}" + "".join(f"{d:>13}" for d in DIRS) + f"{'avg':>13}"
    lines = [head, "-" * len(head)]
    for v in variants(per_seed):
        cells = []
        for d in (*DIRS, "avg"):
            vals = [top1(r[split][v], level, d) for r in per_seed]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):>7.1f}±{sd:<5.1f}")
        lines.append(f"{v:<22}" + "".join(cells))
    return "\n".join(lines)


def paired(per_seed: list[dict], split: str, a: str, b: str, d: str, level: str = "species"):
    """Mean and standard deviation over seeds of a - b in direction `d` ("avg": of the six)."""
    diffs = [top1(r[split][a], level, d) - top1(r[split][b], level, d) for r in per_seed]
    return statistics.mean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0), diffs


def paired_table(per_seed: list[dict]) -> str:
    """The full recipe minus each other variant, species level, per seed paired."""
    cols = [(split, d) for split in ("seen", "unseen") for d in ("avg", "A2I", "I2A")]
    head = f"{'full - variant':<22}" + "".join(f"{s + ' ' + d:>14}" for s, d in cols)
    lines = [head, "-" * len(head)]
    for v in variants(per_seed):
        if v != "full":
            cells = [paired(per_seed, s, "full", v, d)[:2] for s, d in cols]
            lines.append(f"{v:<22}" + "".join(f"{m:>+8.1f}±{sd:<5.1f}" for m, sd in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "runs" / "learning"))
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "learning.json"))
    p.add_argument("--ablations", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                   help="the ablations trained beside the recipe (default: all)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="for every run (smoke tests)")
    a = p.parse_args(argv)

    from biovita.data.stats import media_stats
    from biovita.runtime import configure_output, init_ray

    init_ray(num_cpus=2 * (os.cpu_count() or 1), object_store_memory=int(1e9))  # as the job
    configure_output()
    media_stats()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    per_seed, seconds = [], {}
    with open(out / "bench_tables.log", "a") as log:
        for seed in a.seeds:
            t0 = time.time()
            models, cfg = seed_models(seed, out, a.overrides, a.ablations)
            per_seed.append(score(cfg, models, out / f"seed{seed}", log))
            seconds[seed] = round(time.time() - t0)
            print(f"seed {seed}: {seconds[seed]} s", flush=True)
    print(f"\nTop-1 % over seeds {a.seeds} (mean ± standard deviation); chance: 1 % of 100 "
          "candidates, or 1 / taxa when fewer")
    for split in ("seen", "unseen"):
        for level in LEVELS:
            print()
            print(table(per_seed, split, level))
    print("\nPaired differences, species Top-1 points (mean ± standard deviation over seeds)")
    print(paired_table(per_seed))
    print()
    for split in ("seen", "unseen"):
        for d in ("A2I", "I2A"):
            m, sd, each = paired(per_seed, split, "full", "stage1", d)
            print(f"stage 2 - stage 1, {split} species {d}: {m:+.1f} ± {sd:.1f} points "
                  f"(per seed: {', '.join(f'{x:+.1f}' for x in each)})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({
            "seeds": a.seeds, "seconds": seconds,
            "full_minus": {v: {f"{s}/{d}": dict(zip(("mean", "sd", "per_seed"), paired(per_seed, s, "full", v, d)))
                               for s in ("seen", "unseen") for d in ("avg", *DIRS)}
                           for v in variants(per_seed) if v != "full"},
            "top1": [{split: {v: {lvl: {d: top1(r[split][v], lvl, d) for d in DIRS} for lvl in LEVELS}
                              for v in variants(per_seed)} for split in ("seen", "unseen")} for r in per_seed],
            "queries": [{split: {lvl: {d: r[split]["full"][lvl][d]["n"] for d in DIRS} for lvl in LEVELS}
                         for split in ("seen", "unseen")} for r in per_seed[:1]]}, indent=1))
        print(f"results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
