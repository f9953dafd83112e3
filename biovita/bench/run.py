"""Extract a checkpoint's features for a benchmark (Ray Data batch inference), then score:
`evaluate` is the one way the job and `biovita bench run` benchmark a model."""

from __future__ import annotations

import csv
from pathlib import Path

from biovita.bench.features import decode_for_embedding, embed
from biovita.data.datasets import files_dataset
from biovita.errors import BenchmarkError
from biovita.taxonomy import LEVELS


def _index(bench: Path, modality: str) -> list[dict]:
    path = bench / "ids" / f"{modality}_index.csv"
    if not path.is_file():
        raise BenchmarkError(f"missing benchmark index {path}")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"id", "file_path"} if modality != "text" else {"id", *LEVELS}
    if rows and not need <= rows[0].keys():
        raise BenchmarkError(f"{path}: needs columns {', '.join(sorted(need))}")
    return rows


def extract_features(bench: str | Path, checkpoint: str, feats: str | Path, use_gpu: bool = False,
                     actors: int = 1, stats_name: str | None = None) -> dict[str, int]:
    """Write FEATS/{audio,image}/<id>.pt and FEATS/text/<id>.pt ({level: vector}).

    Resumable: ids that already have a feature file are skipped. Returns the number written
    per modality."""
    import torch

    from biovita.data.store import fetch_dir
    from biovita.models.checkpoint import load_model

    bench, feats = Path(bench), Path(feats)
    written = {}
    for modality in ("audio", "image"):
        out = feats / modality
        out.mkdir(parents=True, exist_ok=True)
        todo = [r for r in _index(bench, modality) if not (out / f"{r['id']}.pt").exists()]
        written[modality] = 0
        if not todo:
            continue
        ds = decode_for_embedding(files_dataset(todo, base=str(bench)), checkpoint, modality,
                                  stats_name=stats_name)
        for b in embed(ds, checkpoint, modality, use_gpu, actors).iter_batches(
                batch_size=256, batch_format="numpy"):
            for i, v in zip(b["id"], b["embedding"]):
                torch.save(torch.from_numpy(v.copy()), out / f"{i}.pt")
                written[modality] += 1
    out = feats / "text"
    out.mkdir(parents=True, exist_ok=True)
    todo = [r for r in _index(bench, "text") if not (out / f"{r['id']}.pt").exists()]
    written["text"] = len(todo)
    if todo:
        model = load_model(fetch_dir(checkpoint))
        per_level = {lvl: model.embed_texts([r[lvl] for r in todo]) for lvl in LEVELS}
        for n, r in enumerate(todo):
            torch.save({lvl: torch.from_numpy(per_level[lvl][n].copy()) for lvl in LEVELS},
                       out / f"{r['id']}.pt")
    return written


def evaluate(bench: str | Path, checkpoint: str, feats: str | Path, use_gpu: bool = False,
             json_out: str | Path | None = None, logger=None, prefix: str = "bench",
             title: str = "", skip_missing: bool = False) -> dict:
    """Features (resumable), scores, the printed table; with `json_out` the JSON and its
    plots beside it, logged to MLflow under `prefix` when a logger is given."""
    from biovita.bench.report import format_table, print_skipped, write_results
    from biovita.bench.score import score_benchmark

    n = extract_features(bench, checkpoint, feats, use_gpu=use_gpu)
    print(f"features written: {n} -> {feats}", flush=True)
    result = score_benchmark(bench, feats, skip_missing=skip_missing)
    print()
    print(format_table(result, bench, title=title))
    print_skipped(result)
    if json_out:
        write_results(result, json_out, logger=logger, prefix=prefix)
    return result
