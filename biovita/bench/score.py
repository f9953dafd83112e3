"""Score precomputed features on a BioVITA Bench folder, vectorised.

Features as the official extractor writes them: FEATS/{audio,image}/<id>.pt hold one vector;
FEATS/text/<id>.pt holds a dict keyed by level (species, genus, family). A candidate taxon's
score is the maximum cosine similarity between the query and any item of its gallery; Top-k
counts queries whose correct taxon ranks among the first k candidates.

Vectorised: galleries are de-duplicated, each query block is scored against every gallery
item at once (one matrix product), a segment max (`np.maximum.reduceat`) gives per-gallery
scores, and the candidates are gathered with one fancy index - no Python loop per query or
candidate.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from biovita.bench.build import TASKS
from biovita.errors import BenchmarkError
from biovita.taxonomy import LEVELS

csv.field_size_limit(sys.maxsize)
KS = (1, 5, 10)
QUERY_BLOCK = 2048


class FeatureStore:
    """Lazily loaded feature vectors by modality (and level, for text), L2-normalised."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BenchmarkError(f"feature folder {self.root} does not exist")
        self._cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def vectors(self, modality: str, ids: set[str], level: str) -> dict[str, np.ndarray]:
        import torch

        key = (modality, level if modality == "text" else "")
        cache = self._cache.setdefault(key, {})
        for i in ids - cache.keys():
            path = self.root / modality / f"{i}.pt"
            if not path.is_file():
                continue
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise BenchmarkError(f"cannot read feature file {path}: {e}") from None
            if modality == "text":
                if not isinstance(obj, dict) or level not in obj:
                    raise BenchmarkError(f"{path}: text features must be a dict with key {level!r}")
                obj = obj[level]
            v = np.asarray(obj, dtype=np.float32).reshape(-1)
            cache[i] = v / max(np.linalg.norm(v), 1e-12)
        return {i: cache[i] for i in ids if i in cache}


def read_task(path: Path) -> list[dict]:
    need = ("query_payload_id", "correct_taxon", "candidates_taxa", "candidates_target_ids")
    if not path.is_file():
        raise BenchmarkError(f"missing benchmark file {path}")
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in need if c not in (reader.fieldnames or [])]
        if missing:
            raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}")
        for n, r in enumerate(reader, start=2):
            try:
                r["candidates_taxa"] = json.loads(r["candidates_taxa"])
                r["candidates_target_ids"] = json.loads(r["candidates_target_ids"])
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{path}, row {n}: malformed JSON list ({e})") from None
            if len(r["candidates_taxa"]) != len(r["candidates_target_ids"]):
                raise BenchmarkError(f"{path}, row {n}: candidates_taxa and candidates_target_ids "
                                     "differ in length")
            rows.append(r)
    return rows


def rank_of_correct(rows: list[dict], q_vec: dict, g_vec: dict) -> tuple[np.ndarray, dict, list]:
    """Rank (0 = best) of the correct taxon for every scorable query, skip counts by reason,
    and the rows the ranks belong to."""
    skipped = defaultdict(int)
    keep, q_ids = [], []
    for r in rows:
        if r["correct_taxon"] not in r["candidates_taxa"]:
            skipped["correct_not_in_candidates"] += 1
        elif r["query_payload_id"] not in q_vec:
            skipped["query_without_feature"] += 1
        else:
            keep.append(r)
            q_ids.append(r["query_payload_id"])
    if not keep:
        return np.zeros(0, np.int64), dict(skipped), []
    # distinct galleries (filtered to items that have features)
    gal_index: dict[tuple, int] = {}
    cand_gal = []  # per query: gallery index per candidate (-1 = empty gallery)
    correct_pos = []
    for r in keep:
        row = []
        for g in r["candidates_target_ids"]:
            key = tuple(i for i in g if i in g_vec)
            if not key:
                row.append(-1)
                continue
            row.append(gal_index.setdefault(key, len(gal_index)))
        cand_gal.append(row)
        correct_pos.append(r["candidates_taxa"].index(r["correct_taxon"]))
    galleries = sorted(gal_index, key=gal_index.get)
    flat_ids = [i for g in galleries for i in g]
    starts = np.cumsum([0] + [len(g) for g in galleries[:-1]])
    G = np.stack([g_vec[i] for i in flat_ids]) if flat_ids else np.zeros((0, 1), np.float32)
    C = max(len(c) for c in cand_gal)
    cand = np.full((len(keep), C), -1, dtype=np.int64)
    for qi, row in enumerate(cand_gal):  # fills an index array; scoring below is vectorised
        cand[qi, :len(row)] = row
    Q = np.stack([q_vec[i] for i in q_ids])
    ranks = np.empty(len(keep), dtype=np.int64)
    pos = np.asarray(correct_pos)
    for s in range(0, len(keep), QUERY_BLOCK):
        e = min(s + QUERY_BLOCK, len(keep))
        sims = Q[s:e] @ G.T  # block x items
        per_gal = np.maximum.reduceat(sims, starts, axis=1) if len(galleries) else sims
        per_gal = np.concatenate([per_gal, np.full((e - s, 1), -np.inf, np.float32)], axis=1)
        scores = per_gal[np.arange(e - s)[:, None], np.where(cand[s:e] >= 0, cand[s:e], -1)]
        correct = scores[np.arange(e - s), pos[s:e]]
        ranks[s:e] = (scores > correct[:, None]).sum(1)
    no_gallery = cand[np.arange(len(keep)), pos] < 0
    if no_gallery.any():
        skipped["correct_gallery_without_feature"] += int(no_gallery.sum())
        ranks = ranks[~no_gallery]
        keep = [r for r, bad in zip(keep, no_gallery) if not bad]
    return ranks, dict(skipped), keep


def score_benchmark(bench: str | Path, feats: str | Path) -> dict:
    """level -> task code -> {top1, top5, top10, n, skipped}, plus per_class / per_taxon."""
    bench, store = Path(bench), FeatureStore(feats)
    result: dict = {}
    per_class: dict = {}
    per_taxon: dict = {}
    skipped_detail: dict = {}
    for level in LEVELS:
        for task, code in TASKS.items():
            path = bench / level / f"test_{task}.csv"
            rows = read_task(path)
            q_mod, g_mod = task.split("_to_")
            q_vec = store.vectors(q_mod, {r["query_payload_id"] for r in rows}, level)
            g_vec = store.vectors(g_mod, {i for r in rows for g in r["candidates_target_ids"]
                                          for i in g}, level)
            ranks, skipped, kept = rank_of_correct(rows, q_vec, g_vec)
            n = int(len(ranks))
            entry = {f"top{k}": float((ranks < k).mean()) if n else 0.0 for k in KS}
            entry.update(n=n, skipped=int(sum(skipped.values())))
            result.setdefault(level, {})[code] = entry
            if skipped:
                skipped_detail.setdefault(level, {})[code] = skipped
            by_cls: dict[str, list[int]] = defaultdict(list)
            by_tax: dict[str, list[int]] = defaultdict(list)
            for r, rk in zip(kept, ranks):
                by_cls[r.get("taxon_class") or "unknown"].append(int(rk))
                by_tax[r["correct_taxon"]].append(int(rk))
            per_class.setdefault(level, {})[code] = {
                c: {"top1": float(np.mean(np.array(v) < 1)), "top5": float(np.mean(np.array(v) < 5)),
                    "n": len(v)} for c, v in sorted(by_cls.items())}
            per_taxon.setdefault(level, {})[code] = {
                t: {"top1": float(np.mean(np.array(v) < 1)), "n": len(v)} for t, v in sorted(by_tax.items())}
    result["per_class"] = per_class
    result["per_taxon"] = per_taxon
    result["skipped_detail"] = skipped_detail
    return result


def chance(bench: str | Path, level: str, task: str, k: int = 1) -> float:
    """Expected Top-k of random ranking: mean over queries of min(k, C)/C."""
    rows = read_task(Path(bench) / level / f"test_{task}.csv")
    if not rows:
        return 0.0
    return float(np.mean([min(k, len(r["candidates_taxa"])) / len(r["candidates_taxa"]) for r in rows]))
