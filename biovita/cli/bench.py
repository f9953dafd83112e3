"""`biovita bench build | run | score | traits`: BioVITA Bench.

Each command imports what it needs when it runs (torch, Ray): `biovita --help` stays instant.
"""

from __future__ import annotations


SKIP_MISSING = ("skip queries without a feature instead of counting them as misses (and leave "
                "gallery items without one out instead of scoring them 0, as the authors do)")


def _build(a) -> int:
    from biovita.bench.build import build_benchmark

    summary = build_benchmark(a.data, a.out, a.candidates, a.split, a.seed)
    for level, tasks in summary.items():
        print(level, " ".join(f"{k}={v}" for k, v in tasks.items()))
    return 0


def _score(a) -> int:
    from biovita.bench.report import format_table, print_skipped, write_results
    from biovita.bench.score import score_benchmark

    result = score_benchmark(a.bench, a.features, skip_missing=a.skip_missing)
    print(format_table(result, a.bench))
    print_skipped(result)
    if a.json:
        write_results(result, a.json)
        print(f"results: {a.json}")
    return 0


def _run(a) -> int:
    from pathlib import Path

    from biovita.bench.run import evaluate
    from biovita.runtime import init_ray

    init_ray()
    feats = a.features or str(Path(a.bench) / "features" / Path(a.checkpoint).name)
    evaluate(a.bench, a.checkpoint, feats, use_gpu=a.gpu, json_out=a.json,
             skip_missing=a.skip_missing, clap=a.clap)
    if a.json:
        print(f"results: {a.json}")
    return 0


def _traits(a) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from biovita.bench.traits import format_probe, plot_probe, probe_checkpoint
    from biovita.models.checkpoint import resolve_checkpoint

    results = probe_checkpoint(resolve_checkpoint(a.checkpoint, clap=a.clap), a.data, folds=a.folds,
                               permutations=a.permutations, seed=a.seed, alpha=a.alpha)
    print(format_probe(results))
    if a.json:
        Path(a.json).write_text(json.dumps([{**asdict(r), "found": r.found} for r in results], indent=1))
        png = plot_probe(results, str(Path(a.json).with_suffix(".png")))
        print(f"results: {a.json} (plot: {png})")
    return 0


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="BioVITA Bench: build, run, score")
    bsub = b.add_subparsers(dest="bench_cmd", required=True, metavar="STEP")
    s = bsub.add_parser("build", help="build a benchmark folder from a Parquet store")
    s.add_argument("--data", required=True, help="Parquet store")
    s.add_argument("--out", required=True, help="benchmark folder to write")
    s.add_argument("--candidates", type=int, default=100, help="candidate taxa per query")
    s.add_argument("--split", choices=("seen", "unseen"), default="seen")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_build)
    s = bsub.add_parser("score", help="score precomputed features (official layout)")
    s.add_argument("--bench", required=True)
    s.add_argument("--features", required=True, help="FEATS/{audio,image,text}/<id>.pt")
    s.add_argument("--json", default=None, help="write results JSON (+ PNG plots beside it)")
    s.add_argument("--skip-missing", action="store_true", help=SKIP_MISSING)
    s.set_defaults(fn=_score)
    s = bsub.add_parser("run", help="extract features with a checkpoint (Ray Data) and score")
    s.add_argument("--bench", required=True)
    from biovita.cli.models import CHECKPOINT_HELP, CLAP_HELP

    s.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    s.add_argument("--clap", default=None, metavar="NAME_OR_DIR", help=CLAP_HELP)
    s.add_argument("--features", default=None, help="where features go (resumable)")
    s.add_argument("--gpu", action="store_true", help="GPU inference actors")
    s.add_argument("--json", default=None)
    s.add_argument("--skip-missing", action="store_true", help=SKIP_MISSING)
    s.set_defaults(fn=_run)
    s = bsub.add_parser(
        "traits", help="linear probe of ecological traits on frozen audio and image embeddings",
        description="For each trait group of the store's taxa table: a ridge probe on the frozen "
        "embeddings of every recording and photo, scored on species it never saw (species-"
        "disjoint folds) as macro-F1, against the majority label and a permutation null "
        "(labels shuffled among species). Embeddings are cached beside the store.",
        epilog="example:\n  biovita bench traits runs/embedded/models/stage2.phase2 --data data/synthetic "
        "--json traits.json", formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    s.add_argument("checkpoint", help=CHECKPOINT_HELP)
    s.add_argument("--data", required=True, help="Parquet store with a taxa table carrying traits")
    s.add_argument("--clap", default=None, metavar="NAME_OR_DIR", help=CLAP_HELP)
    s.add_argument("--folds", type=int, default=5, help="species-disjoint folds")
    s.add_argument("--permutations", type=int, default=100, help="shuffles for the null")
    s.add_argument("--alpha", type=float, default=1.0, help="ridge penalty (per sample)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", default=None, help="write the results as JSON (+ a PNG plot beside it)")
    s.set_defaults(fn=_traits)
