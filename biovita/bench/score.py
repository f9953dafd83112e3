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


def _scorable(rows: list[dict], q_vec: dict) -> tuple[list[dict], dict[str, int]]:
    """Rows that can be scored, and the others counted by reason."""
    skipped: dict[str, int] = defaultdict(int)
    keep = []
    for r in rows:
        if r["correct_taxon"] not in r["candidates_taxa"]:
            skipped["correct_not_in_candidates"] += 1
        elif r["query_payload_id"] not in q_vec:
            skipped["query_without_feature"] += 1
        else:
            keep.append(r)
    return keep, skipped


def rank_of_correct(rows: list[dict], q_vec: dict, g_vec: dict) -> tuple[np.ndarray, dict, list]:
    """Rank (0 = best) of the correct taxon for every scorable query, skip counts by reason,
    and the rows the ranks belong to.

    In the release format a candidate's gallery is the same for every query (all items of that
    taxon). That is checked; then each block of queries is one matrix product against the
    gallery items, a segment max per taxon (`np.maximum.reduceat`), one gather of the
    candidates and one comparison - no loop per query or candidate. Benchmarks whose galleries
    vary per query take the exact per-(query, candidate) path instead.
    """
    import operator
    from itertools import chain

    import pandas as pd

    keep, skipped = _scorable(rows, q_vec)
    if not keep:
        return np.zeros(0, np.int64), dict(skipped), []
    n_cand = np.fromiter((len(r["candidates_taxa"]) for r in keep), np.int64, len(keep))
    flat_taxa = list(chain.from_iterable(r["candidates_taxa"] for r in keep))
    codes, taxa = pd.factorize(pd.Series(flat_taxa, dtype=object))
    galleries = list(chain.from_iterable(r["candidates_target_ids"] for r in keep))
    first = np.unique(codes, return_index=True)[1]
    canon = [galleries[i] for i in first]  # taxon code -> gallery
    if not all(map(operator.eq, galleries, (canon[c] for c in codes))):
        ranks, sk, kept = _rank_exact(keep, q_vec, g_vec)
        for k, v in sk.items():
            skipped[k] += v
        return ranks, dict(skipped), kept
    # gallery items with features, grouped by taxon (a taxon may have none: score -inf)
    item_ids = [[i for i in gal if i in g_vec] for gal in canon]
    sizes = np.fromiter(map(len, item_ids), np.int64, len(item_ids))
    G = (np.stack([g_vec[i] for i in chain.from_iterable(item_ids)]) if sizes.sum()
         else np.zeros((1, next(iter(q_vec.values())).shape[0]), np.float32))
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    Q = np.stack([q_vec[r["query_payload_id"]] for r in keep])
    cand_off = np.concatenate([[0], np.cumsum(n_cand)])
    correct_code = codes[cand_off[:-1] + np.fromiter(
        (r["candidates_taxa"].index(r["correct_taxon"]) for r in keep), np.int64, len(keep))]
    C = int(n_cand.max())
    cand = np.full((len(keep), C), len(taxa), np.int64)  # pad -> the -inf column
    col = np.arange(len(codes)) - np.repeat(cand_off[:-1], n_cand)
    cand[np.repeat(np.arange(len(keep)), n_cand), col] = codes
    ranks = np.empty(len(keep), np.int64)
    for s in range(0, len(keep), QUERY_BLOCK):  # blocks bound memory
        e = min(s + QUERY_BLOCK, len(keep))
        sims = Q[s:e] @ G.T
        per_taxon = np.full((e - s, len(taxa) + 1), -np.inf, np.float32)
        has = sizes > 0
        if has.any():
            red = np.maximum.reduceat(sims, np.minimum(starts, max(G.shape[0] - 1, 0)), axis=1)
            per_taxon[:, :-1][:, has] = red[:, has]
        scores = np.take_along_axis(per_taxon, cand[s:e], axis=1)
        correct = per_taxon[np.arange(e - s), correct_code[s:e]]
        ranks[s:e] = (scores > correct[:, None]).sum(1)
    ok = sizes[correct_code] > 0
    if not ok.all():
        skipped["correct_gallery_without_feature"] += int((~ok).sum())
        ranks = ranks[ok]
        keep = [r for r, good in zip(keep, ok) if good]
    return ranks, dict(skipped), keep


def _rank_exact(rows: list[dict], q_vec: dict, g_vec: dict) -> tuple[np.ndarray, dict, list]:
    """Rank (0 = best) of the correct taxon for every scorable query, skip counts by reason,
    and the rows the ranks belong to.

    All (query, candidate, gallery item) triples are flattened into arrays once; each block
    of queries is one matrix product against the distinct gallery items, then a gather and
    two segment reductions (max over a candidate's items, count of better candidates).
    """
    from itertools import chain

    keep, skipped = _scorable(rows, q_vec)
    if not keep:
        return np.zeros(0, np.int64), dict(skipped), []
    n_cand = np.fromiter((len(r["candidates_taxa"]) for r in keep), np.int64, len(keep))
    correct_pos = np.fromiter((r["candidates_taxa"].index(r["correct_taxon"]) for r in keep),
                              np.int64, len(keep))
    galleries = list(chain.from_iterable(r["candidates_target_ids"] for r in keep))
    n_items = np.fromiter(map(len, galleries), np.int64, len(galleries))
    flat_ids = np.array(list(chain.from_iterable(galleries)), dtype=object)
    # distinct gallery items -> rows of G (-1 where an item has no feature)
    uniq, inverse = np.unique(flat_ids.astype(str), return_inverse=True) if len(flat_ids) else (
        np.array([], str), np.array([], np.int64))
    has = np.fromiter((u in g_vec for u in uniq), bool, len(uniq))
    g_row = np.where(has, np.cumsum(has) - 1, -1)
    item_g = g_row[inverse] if len(inverse) else np.zeros(0, np.int64)
    G = np.stack([g_vec[u] for u in uniq[has]]) if has.any() else np.zeros((1, 1), np.float32)
    Q = np.stack([q_vec[r["query_payload_id"]] for r in keep])

    cand_off = np.concatenate([[0], np.cumsum(n_cand)])  # row -> first candidate
    item_off = np.concatenate([[0], np.cumsum(n_items)])  # candidate -> first item
    ranks = np.empty(len(keep), np.int64)
    correct_ok = np.ones(len(keep), bool)
    for s in range(0, len(keep), QUERY_BLOCK):  # blocks bound memory; no per-query loop
        e = min(s + QUERY_BLOCK, len(keep))
        c0, c1 = cand_off[s], cand_off[e]
        i0, i1 = item_off[c0], item_off[c1]
        sims = Q[s:e] @ G.T  # block x distinct items
        owner = np.repeat(np.arange(e - s), n_cand[s:e])  # candidate -> local row
        item_row = np.repeat(owner, n_items[c0:c1])  # item -> local row
        g = item_g[i0:i1]
        item_sim = np.where(g >= 0, sims[item_row, np.maximum(g, 0)], -np.inf).astype(np.float32)
        n_it = n_items[c0:c1]
        starts = (item_off[c0:c1] - i0)
        cand_sim = np.full(c1 - c0, -np.inf, np.float32)
        nonempty = n_it > 0
        if len(item_sim):
            red = np.maximum.reduceat(item_sim, np.minimum(starts, len(item_sim) - 1))
            cand_sim[nonempty] = red[nonempty]
        correct = cand_sim[cand_off[s:e] - c0 + correct_pos[s:e]]
        better = (cand_sim > np.repeat(correct, n_cand[s:e])).astype(np.int64)
        ranks[s:e] = np.add.reduceat(better, cand_off[s:e] - c0)
        correct_ok[s:e] = np.isfinite(correct)
    if not correct_ok.all():
        skipped["correct_gallery_without_feature"] += int((~correct_ok).sum())
        ranks = ranks[correct_ok]
        keep = [r for r, ok in zip(keep, correct_ok) if ok]
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
