"""Extract a checkpoint's features for a benchmark (Ray Data batch inference), then score:
`evaluate` is the one way the job and `biovita bench run` benchmark a model."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import torch

from biovita.bench.report import format_table, print_skipped, write_results
from biovita.bench.score import score_benchmark
from biovita.data.stats import bad_media_counts, drop_media_stats, media_stats
from biovita.data.store import exists, fetch_dir
from biovita.embed.cache import store_embeddings
from biovita.embed.service import embed_files
from biovita.errors import BenchmarkError
from biovita.models.checkpoint import load_biovita, resolve_checkpoint
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


def _built_from(bench: Path) -> tuple[str | None, dict[str, dict[str, str]]]:
    """The store a benchmark was built from, if it is still there, and the SHA-256 of each
    medium exported from it (`biovita bench build` records both)."""
    try:
        meta = json.loads((bench / "bench.json").read_text())
    except (OSError, ValueError):
        return None, {}
    store = meta.get("store")
    return (store if store and exists(store) else None), meta.get("media_sha256", {})


def _unchanged(bench: Path, row: dict, sha: str | None) -> bool:
    """Whether a benchmark file is still the medium exported from the store."""
    path = bench / row["file_path"]
    return bool(sha) and path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha


def extract_features(bench: str | Path, checkpoint: str, feats: str | Path, use_gpu: bool = False,
                     actors: int = 1, stats_name: str | None = None) -> dict[str, int]:
    """Write FEATS/{audio,image}/<id>.pt and FEATS/text/<id>.pt ({level: vector}).

    A benchmark file that is still the medium its store holds takes its embedding from the
    store's frozen-tower cache (its test split: the images the training stages embedded,
    shared by every stage with the same image tower, and by the gallery); any other file (a
    release benchmark's, or one changed or missing since the build) is embedded from the file
    on Ray Data. Resumable: ids that already have a feature file are skipped. Returns the
    number written per modality."""
    bench, feats = Path(bench), Path(feats)
    store, media = _built_from(bench)
    written = {}
    for modality in ("audio", "image"):
        out = feats / modality
        out.mkdir(parents=True, exist_ok=True)
        todo = [r for r in _index(bench, modality) if not (out / f"{r['id']}.pt").exists()]
        written[modality] = 0
        if not todo:
            continue
        shas = media.get(modality, {})
        same = [r for r in todo if store and _unchanged(bench, r, shas.get(r["id"]))]
        parts = []
        if same:
            cached = store_embeddings(store, checkpoint, modality, "test", use_gpu=use_gpu,
                                      stats_name=stats_name)
            parts = [(r["id"], cached.vectors[cached.index[r["id"]]]) for r in same
                     if r["id"] in cached.index]
        done = {i for i, _ in parts}  # (a medium the cache lacks did not decode: say why below)
        rest = [r for r in todo if r["id"] not in done]
        if rest:
            parts += [(i, v) for b in embed_files(rest, checkpoint, modality, base=str(bench),
                                                  use_gpu=use_gpu, actors=actors, stats_name=stats_name
                                                  ).iter_batches(batch_size=256, batch_format="numpy")
                      for i, v in zip(b["id"], b["embedding"])]
        for i, v in parts:
            torch.save(torch.from_numpy(np.array(v, np.float32)), out / f"{i}.pt")
            written[modality] += 1
    out = feats / "text"
    out.mkdir(parents=True, exist_ok=True)
    rows = _index(bench, "text")
    todo = [r for r in rows if not (out / f"{r['id']}.pt").exists()]
    written["text"] = len(todo)
    if todo:
        # the bare name at each level, as the authors embed them; common_name where the index has it
        levels = [*LEVELS, *(["common_name"] if "common_name" in rows[0] else [])]
        model = load_biovita(fetch_dir(checkpoint))
        per_level = {lvl: model.embed_texts([r[lvl] or "" for r in todo]) for lvl in levels}
        for n, r in enumerate(todo):
            torch.save({lvl: torch.from_numpy(per_level[lvl][n].copy()) for lvl in levels},
                       out / f"{r['id']}.pt")
    return written


def input_report(bench: str | Path, feats: str | Path, decode_failures: dict) -> dict:
    """What of the benchmark could be used: per modality the index rows, those whose file is
    missing or does not decode (by reason), those with a feature; the task files that hold
    no query (the release's family level is header-only)."""
    bench, feats = Path(bench), Path(feats)
    out: dict = {}
    for modality in ("audio", "image", "text"):
        rows = _index(bench, modality)
        have = sum((feats / modality / f"{r['id']}.pt").exists() for r in rows)
        entry = {"indexed": len(rows), "with_feature": have}
        if modality != "text":
            entry["missing_file"] = sum(not (bench / r["file_path"]).is_file() for r in rows)
            entry["failed"] = {k: v for k, v in decode_failures.get(modality, {}).items()
                               if k != "missing_file"}  # (counted above)
        out[modality] = entry
    out["task_files_without_queries"] = sorted(
        f"{p.parent.name}/{p.name}" for p in bench.glob("*/test_*.csv")
        if sum(1 for _ in open(p, newline="")) <= 1)
    return out


def print_inputs(inputs: dict, out=None) -> None:
    """One line per modality that could not be used whole: how much, and why not the rest."""
    for modality in ("audio", "image", "text"):
        e = inputs[modality]
        if e["with_feature"] == e["indexed"]:
            continue
        why = {"missing file": e.get("missing_file", 0), **e.get("failed", {})}
        detail = ", ".join(f"{k} {v}" for k, v in why.items() if v)
        print(f"{modality}: {e['with_feature']} of {e['indexed']} indexed items have a feature"
              + (f" ({detail})" if detail else ""), file=out or sys.stderr)
    if inputs["task_files_without_queries"]:
        print("task files without queries (scored n=0): " + ", ".join(inputs["task_files_without_queries"]),
              file=out or sys.stderr)


def evaluate(bench: str | Path, checkpoint: str, feats: str | Path, use_gpu: bool = False,
             json_out: str | Path | None = None, logger=None, prefix: str = "bench",
             title: str = "", skip_missing: bool = False, clap: str | None = None,
             table: bool = True) -> dict:
    """Features (resumable), scores, the printed table (`table`); with `json_out` the JSON
    and its plots beside it, logged to MLflow under `prefix` when a logger is given. Any
    checkpoint layout (`clap`: the CLAP base of the released layouts)."""
    checkpoint = resolve_checkpoint(checkpoint, clap=clap)
    name = f"biovita-bench-{uuid.uuid4().hex[:8]}"  # this run's own count of undecodable media
    media_stats(name)
    try:
        extract_features(bench, checkpoint, feats, use_gpu=use_gpu, stats_name=name)
        failures = bad_media_counts(name)["bad"]
    finally:
        drop_media_stats(name)
    result = score_benchmark(bench, feats, skip_missing=skip_missing)
    result["inputs"] = input_report(bench, feats, failures)
    if table:
        print()
        print(format_table(result, bench, title=title))
    print_skipped(result)
    print_inputs(result["inputs"])
    if json_out:
        write_results(result, json_out, logger=logger, prefix=prefix)
    return result
