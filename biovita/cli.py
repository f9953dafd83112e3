"""`biovita` console script (pybioclip-style subcommands). Heavy imports are deferred so
`--help` is instant."""

from __future__ import annotations

import argparse
import json
import sys


def _synth(a) -> int:
    from biovita.data.synth import make_synthetic

    m = make_synthetic(a.out, n_species=a.species, seed=a.seed, progress=True)
    print(json.dumps(m, indent=1))
    return 0


def _convert(a) -> int:
    from biovita.data.convert import convert_release

    report = convert_release(a.csv, a.audio_dir, a.image_dir, a.out, seed=a.seed,
                             test_fraction=a.test_fraction, unseen_species=a.unseen_species,
                             max_image_pixels=a.max_image_pixels)
    print(report.summary())
    if a.report:
        report.write(a.report)
    return 0


def _validate(a) -> int:
    from biovita.data.validate import validate_store

    ok, report = validate_store(a.root, json_out=a.json)
    return 0 if ok else 1


def _list_models(a) -> int:
    from biovita.models.registry import MODEL_CONFIGS, list_models

    for name in list_models(a.pattern):
        spec = MODEL_CONFIGS[name]
        print(f"{name:<24} {spec.description}")
        print(f"{'':<24}   image+text: {spec.clip_model}  audio: {spec.audio_model}")
    return 0


def _train(a) -> int:
    from biovita.train.job import main

    return main(a.rest, prog="biovita train")


def _tune(a) -> int:
    from biovita.train.sweep import main

    return main(a.rest, prog="biovita tune")


def _bench_build(a) -> int:
    from biovita.bench.build import build_benchmark

    summary = build_benchmark(a.data, a.out, a.candidates, a.split, a.seed)
    for level, tasks in summary.items():
        print(level, " ".join(f"{k}={v}" for k, v in tasks.items()))
    return 0


def _bench_score(a) -> int:
    from biovita.bench.report import format_table, write_results
    from biovita.bench.score import score_benchmark

    result = score_benchmark(a.bench, a.features)
    print(format_table(result, a.bench))
    _print_skipped(result)
    if a.json:
        write_results(result, a.json)
        print(f"results: {a.json}")
    return 0


def _print_skipped(result: dict) -> None:
    for level, tasks in result.get("skipped_detail", {}).items():
        for code, reasons in tasks.items():
            print(f"skipped {level}/{code}: " + ", ".join(f"{k}={v}" for k, v in reasons.items()),
                  file=sys.stderr)


def _bench_run(a) -> int:
    from pathlib import Path

    from biovita.bench.report import format_table, write_results
    from biovita.bench.run import extract_features
    from biovita.bench.score import score_benchmark
    from biovita.data.pipeline import init_ray

    init_ray()
    feats = a.features or str(Path(a.bench) / "features" / Path(a.checkpoint).name)
    n = extract_features(a.bench, a.checkpoint, feats, use_gpu=a.gpu)
    print("features written:", n, "->", feats)
    result = score_benchmark(a.bench, feats)
    print(format_table(result, a.bench))
    _print_skipped(result)
    if a.json:
        write_results(result, a.json)
        print(f"results: {a.json}")
    return 0


def _predict(a) -> int:
    from biovita.predict import Predictor

    p = Predictor(a.checkpoint, taxa_csv=a.taxa)
    rows = p.predict(a.files, rank=a.rank, k=a.k)
    Predictor.print_rows(rows, a.format)
    return 0


def _embed(a) -> int:
    from biovita.predict import embed_to_parquet

    n = embed_to_parquet(a.checkpoint, a.out, data=a.data, files=a.files)
    print(f"wrote {n} embeddings to {a.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="biovita",
        description="BioVITA: animal sounds, images and names in one embedding space.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write the embedded synthetic dataset (Parquet store)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--species", type=int, default=32, help="number of species (default 32)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_synth)

    s = sub.add_parser("convert", help="convert the official release layout to a Parquet store")
    s.add_argument("--csv", required=True, help="release CSV (download_url, source, recording_id, "
                   "file_name, scientific_name, accepted_name, class, order, family, genus, com)")
    s.add_argument("--audio-dir", required=True, help="folder that file_name is relative to")
    s.add_argument("--image-dir", required=True, help="folder with one sub-folder per species")
    s.add_argument("--out", required=True, help="output store (folder or s3:// / gs:// URI)")
    s.add_argument("--test-fraction", type=float, default=0.1, help="share of media held out for test")
    s.add_argument("--unseen-species", default=None,
                   help="text file of species (one per line) held out of training")
    s.add_argument("--max-image-pixels", type=int, default=50_000_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--report", default=None, help="also write the skip report as JSON")
    s.set_defaults(fn=_convert)

    s = sub.add_parser("validate", help="schema check + full decode pass of a store (on Ray Data)")
    s.add_argument("root", help="store folder or URI")
    s.add_argument("--json", default=None, help="write the counts as JSON")
    s.set_defaults(fn=_validate)

    s = sub.add_parser("list-models", help="list the named model configs")
    s.add_argument("pattern", nargs="?", default="*", help="glob, e.g. '*clap*'")
    s.set_defaults(fn=_list_models)

    s = sub.add_parser("train", help="the main job (same as python ray_jobs/train.py)",
                       add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_train)

    s = sub.add_parser("tune", help="Ray Tune sweep (same as python tune/sweep.py)", add_help=False)
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(fn=_tune)

    b = sub.add_parser("bench", help="BioVITA Bench: build, run, score")
    bsub = b.add_subparsers(dest="bench_cmd", required=True, metavar="STEP")
    s = bsub.add_parser("build", help="build a benchmark folder from a Parquet store")
    s.add_argument("--data", required=True, help="Parquet store")
    s.add_argument("--out", required=True, help="benchmark folder to write")
    s.add_argument("--candidates", type=int, default=100, help="candidate taxa per query")
    s.add_argument("--split", choices=("seen", "unseen"), default="seen")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_bench_build)
    s = bsub.add_parser("score", help="score precomputed features (official layout)")
    s.add_argument("--bench", required=True)
    s.add_argument("--features", required=True, help="FEATS/{audio,image,text}/<id>.pt")
    s.add_argument("--json", default=None, help="write results JSON (+ PNG plots beside it)")
    s.set_defaults(fn=_bench_score)
    s = bsub.add_parser("run", help="extract features with a checkpoint (Ray Data) and score")
    s.add_argument("--bench", required=True)
    s.add_argument("--checkpoint", required=True)
    s.add_argument("--features", default=None, help="where features go (resumable)")
    s.add_argument("--gpu", action="store_true", help="GPU inference actors")
    s.add_argument("--json", default=None)
    s.set_defaults(fn=_bench_run)

    s = sub.add_parser("predict", help="rank taxa for audio or image files")
    s.add_argument("checkpoint")
    s.add_argument("files", nargs="+", help="audio or image files (auto-detected)")
    s.add_argument("--rank", choices=("species", "genus", "family"), default="species")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--taxa", default=None, help="CSV of candidate taxa (class, order, family, "
                   "genus, scientific_name[, common_name]); default: the checkpoint's taxa")
    s.add_argument("--format", choices=("table", "csv"), default="table")
    s.set_defaults(fn=_predict)

    s = sub.add_parser("embed", help="embeddings of a store or files to Parquet (Ray Data)")
    s.add_argument("checkpoint")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", help="Parquet store")
    g.add_argument("--files", nargs="+", help="audio or image files")
    s.add_argument("--out", required=True, help="output .parquet")
    s.set_defaults(fn=_embed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from biovita.config import ConfigError
    from biovita.errors import BenchmarkError, MediaError

    try:
        return int(args.fn(args) or 0)
    except (ConfigError, BenchmarkError, MediaError, FileNotFoundError) as e:
        print(f"biovita {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
