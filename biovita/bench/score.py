"""Score precomputed features on a BioVITA Bench folder, vectorised.

Features as the official extractor writes them: FEATS/{audio,image}/<id>.pt hold one vector;
FEATS/text/<id>.pt holds a dict keyed by level (species, genus, family). A candidate taxon's
score is the maximum cosine similarity between the query and any item of its gallery; Top-k
counts queries whose correct taxon ranks among the first k candidates.

How it is fast and still exact:
- a task file is encoded once when it is read: taxon names become integer codes, the
  candidates an (n, C) code matrix, and each taxon's gallery is kept once (in the release
  format a taxon's gallery is the same in every row; that is checked);
- only the dot products the metric needs are computed: each query with the gallery items of
  its own candidates (~5 % of a dense product at the release's sizes), in float32, by a
  compiled, cache-blocked kernel (`biovita.bench.kernels`) on any CPU;
- ranks count the candidates scoring strictly above the correct taxon; they are exact up to
  `cap` (the largest k reported) and clipped there.
No Python loop runs per query or per candidate.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import defaultdict
from itertools import chain
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import torch

from biovita.bench.build import TASKS
from biovita.bench.kernels import candidate_scores
from biovita.errors import BenchmarkError
from biovita.taxonomy import LEVELS

csv.field_size_limit(sys.maxsize)
KS = (1, 5, 10)
QUERY_BLOCK = 512  # queries per matrix product: keeps the (block x gallery) scores in cache


@dataclass
class Features:
    """Feature vectors of one modality: `ids[i]` owns row i of `matrix` (L2-normalised)."""

    ids: list[str]
    matrix: np.ndarray
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self):
        m = np.asarray(self.matrix, dtype=np.float32)
        norms = np.linalg.norm(m, axis=1, keepdims=True) if len(m) else 1.0
        self.matrix = m / np.maximum(norms, 1e-12)  # a new array: the caller's stays as it was
        self.index = {i: n for n, i in enumerate(self.ids)}

    @classmethod
    def from_dict(cls, vectors: dict[str, np.ndarray]) -> Features:
        ids = list(vectors)
        dim = len(next(iter(vectors.values()))) if vectors else 0
        return cls(ids, np.stack([np.asarray(vectors[i], np.float32).reshape(-1) for i in ids])
                   if ids else np.zeros((0, dim), np.float32))

    def with_zeros(self, ids: list[str], dim: int) -> "Features":
        """These features and a zero vector for each of `ids` (cosine 0 with anything)."""
        return Features(self.ids + list(ids),
                        np.concatenate([self.matrix.reshape(len(self.ids), dim),
                                        np.zeros((len(ids), dim), np.float32)]))

    def rows(self, ids: list[str]) -> np.ndarray:
        """Row of each id, -1 where the id has no feature."""
        get = self.index.get
        return np.fromiter((get(i, -1) for i in ids), np.int64, len(ids))


class FeatureStore:
    """Feature files loaded on demand and cached, by modality (and level, for text)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise BenchmarkError(f"feature folder {self.root} does not exist")
        self._cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def features(self, modality: str, ids: set[str], level: str) -> Features:
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
            cache[i] = np.asarray(obj, dtype=np.float32).reshape(-1)
        return Features.from_dict({i: cache[i] for i in ids if i in cache})


@dataclass
class Task:
    """One benchmark task file, parsed and encoded for scoring.

    `query_ids[n]`, `correct_taxa[n]`, `classes[n]` describe row n; `cand[n, j]` is the taxon
    code of its j-th candidate (-1 pads short rows); `correct[n]` is the column of the correct
    taxon (-1 when it is not among the candidates); `galleries[t]` are the gallery ids of taxon
    t, or None when some taxon's gallery differs between rows (the per-row path then scores,
    from `row_galleries()`).
    """

    query_ids: list[str]
    correct_taxa: list[str]
    classes: list[str]
    cand: np.ndarray
    correct: np.ndarray
    galleries: list[list[str]] | None
    _texts: list[list[str]] = field(default_factory=list, repr=False)  # JSON of each gallery

    def __len__(self) -> int:
        return len(self.query_ids)

    def row_galleries(self, n: int) -> list[list[str]]:
        """Row n's candidates' gallery ids (in candidate order)."""
        return [json.loads(t) for t in self._texts[n]]

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Task:
        """From rows with JSON-decoded lists (in memory)."""
        return cls.from_columns([r["query_payload_id"] for r in rows], [r["correct_taxon"] for r in rows],
                                [r.get("taxon_class") or "" for r in rows],
                                [r["candidates_taxa"] for r in rows],
                                [[json.dumps(g) for g in r["candidates_target_ids"]] for r in rows])

    @classmethod
    def from_columns(cls, query_ids: list[str], correct_taxa: list[str], classes: list[str],
                     candidates: list[list[str]], gallery_texts: list[list[str]]) -> Task:
        """Encode: taxon names become codes, each taxon's gallery is kept once when every row
        lists the same one for it (the release format), compared as JSON text."""
        code_of: dict[str, int] = {}
        n_cand = np.fromiter(map(len, candidates), np.int64, len(candidates))
        flat = list(chain.from_iterable(candidates))
        codes = np.fromiter(map(lambda t: code_of.setdefault(t, len(code_of)), flat), np.int64, len(flat))
        C = int(n_cand.max()) if len(candidates) else 0
        cand = np.full((len(candidates), C), -1, np.int64)
        off = np.concatenate([[0], np.cumsum(n_cand)])
        cand[np.repeat(np.arange(len(candidates)), n_cand), np.arange(len(codes)) - np.repeat(off[:-1], n_cand)] = codes
        correct = np.fromiter((c.index(t) if t in c else -1 for c, t in zip(candidates, correct_taxa)),
                              np.int64, len(candidates))
        texts = np.empty(len(codes), dtype=object)
        texts[:] = list(chain.from_iterable(gallery_texts))
        first = np.empty(len(code_of), np.int64)
        first[codes[::-1]] = np.arange(len(codes))[::-1]  # first occurrence of each taxon
        same = bool((texts == texts[first][codes]).all()) if len(codes) else True
        galleries = [json.loads(texts[i]) for i in first] if same else None
        return cls(list(query_ids), list(correct_taxa), list(classes), cand, correct, galleries,
                   gallery_texts)


_INNER_LIST = re.compile(r"\[[^\[\]]*\]")  # a gallery's JSON list inside a row's list of lists


def read_task(path: Path) -> Task:
    """Read a task CSV of the official layout. Fast: the CSV is parsed by Arrow, the candidate
    lists by one JSON parse per column, and each row's galleries are kept as JSON text (one
    regular-expression pass) and compared as text; only each taxon's gallery is decoded."""
    need = ("query_payload_id", "correct_taxon", "candidates_taxa", "candidates_target_ids")
    if not path.is_file():
        raise BenchmarkError(f"missing benchmark file {path}")
    with open(path, newline="") as f:
        header = next(csv.reader(f), [])
    missing = [c for c in need if c not in header]
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {', '.join(missing)}")
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=False))
    col = {c: table.column(c).to_pylist() for c in header}
    candidates = _json_lists(col["candidates_taxa"], path)
    texts = []
    for n, (cands, raw) in enumerate(zip(candidates, col["candidates_target_ids"])):
        inner = raw.strip()[1:-1]
        found = _INNER_LIST.findall(inner)
        if len(found) != len(cands):  # ids with brackets in them, or a real mismatch
            lists = _json_lists([raw], path, first_row=n + 2)[0]
            if len(lists) != len(cands):
                raise BenchmarkError(f"{path}, row {n + 2}: candidates_taxa and candidates_target_ids "
                                     "differ in length")
            found = [json.dumps(g) for g in lists]
        texts.append(found)
    classes = col.get("taxon_class") or [""] * len(candidates)
    return Task.from_columns(col["query_payload_id"], col["correct_taxon"], classes, candidates, texts)


def _json_lists(values: list[str], path: Path, first_row: int = 2) -> list:
    """JSON lists, one per row, parsed in one go; a bad row is named."""
    try:
        out = json.loads("[" + ",".join(values) + "]")
        if len(out) == len(values):
            return out
    except json.JSONDecodeError:
        pass
    for n, v in enumerate(values, start=first_row):
        try:
            json.loads(v)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}, row {n}: malformed JSON list ({e})") from None
    raise BenchmarkError(f"{path}: a JSON list cell holds more than one value")


def rank_of_correct(task: Task, queries: Features, gallery: Features, cap: int = max(KS),
                    skip_missing: bool = True) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
    """Rank (0 = best) of the correct taxon for every scorable row, exact below `cap` and
    clipped to `cap`; skip counts by reason; the indices of the scored rows.
    A query without a feature is skipped, or with `skip_missing=False` counted as a miss
    (rank `cap`: it cannot be ranked), as the authors' scorer counts it."""
    q_row = queries.rows(task.query_ids)
    no_correct = task.correct < 0
    no_query = ~no_correct & (q_row < 0)
    if not skip_missing:
        ranks, skipped, kept = rank_of_correct(task, queries, gallery, cap, skip_missing=True)
        skipped.pop("query_without_feature", None)
        misses = np.flatnonzero(no_query)
        order = np.argsort(np.concatenate([kept, misses]), kind="stable")
        return (np.concatenate([ranks, np.full(len(misses), cap)])[order], skipped,
                np.concatenate([kept, misses])[order])
    skipped = {"correct_not_in_candidates": int(no_correct.sum()),
               "query_without_feature": int(no_query.sum())}
    keep = np.flatnonzero(~no_correct & ~no_query)
    Q = queries.matrix[q_row[keep]]
    if len(keep) == 0 or len(gallery.ids) == 0:
        ranks, ok = np.zeros(len(keep), np.int64), np.zeros(len(keep), bool)
    elif task.galleries is None:
        ranks, ok = _rank_per_row(task, keep, Q, gallery)
    else:
        ranks, ok = _rank_shared(task, keep, Q, gallery, cap)
    skipped["correct_gallery_without_feature"] = int((~ok).sum())
    return np.minimum(ranks[ok], cap), {k: v for k, v in skipped.items() if v}, keep[ok]


def _rank_shared(task: Task, keep: np.ndarray, Q: np.ndarray, gallery: Features, cap: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Ranks when every taxon has one gallery (the release format): the compiled kernel
    computes just the dot products of each query with its own candidates' gallery items
    (`biovita.bench.kernels`), in float32."""
    listed = np.fromiter(map(len, task.galleries), np.int64, len(task.galleries))
    item = gallery.rows(list(chain.from_iterable(task.galleries)))  # -1: no feature
    sizes = np.bincount(np.repeat(np.arange(len(listed)), listed)[item >= 0], minlength=len(listed))
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    cand, col = task.cand[keep], task.correct[keep]
    rows = np.arange(len(keep))
    ok = sizes[cand[rows, col]] > 0
    scores = candidate_scores(Q, gallery.matrix[item[item >= 0]], ptr, cand)
    correct = scores[rows, col]
    return (scores > correct[:, None]).sum(1), ok


def _rank_per_row(task: Task, keep: np.ndarray, Q: np.ndarray, gallery: Features
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranks when galleries differ between rows: all (query, candidate, item) triples are
    flattened once; each block of queries is one matrix product against the gallery, then a
    gather and two segment reductions (max over a candidate's items, count of better ones)."""
    rows = keep
    n_cand = (task.cand[keep] >= 0).sum(1)
    correct_pos = task.correct[keep]
    galleries = list(chain.from_iterable(task.row_galleries(int(n)) for n in keep))
    n_items = np.fromiter(map(len, galleries), np.int64, len(galleries))
    item_g = gallery.rows(list(chain.from_iterable(galleries)))  # -1: no feature
    G = gallery.matrix
    cand_off = np.concatenate([[0], np.cumsum(n_cand)])  # row -> first candidate
    item_off = np.concatenate([[0], np.cumsum(n_items)])  # candidate -> first item
    ranks = np.empty(len(rows), np.int64)
    ok = np.ones(len(rows), bool)
    for s in range(0, len(rows), QUERY_BLOCK):
        e = min(s + QUERY_BLOCK, len(rows))
        c0, c1 = cand_off[s], cand_off[e]
        i0, i1 = item_off[c0], item_off[c1]
        sims = Q[s:e] @ G.T
        item_row = np.repeat(np.repeat(np.arange(e - s), n_cand[s:e]), n_items[c0:c1])
        g = item_g[i0:i1]
        item_sim = np.where(g >= 0, sims[item_row, np.maximum(g, 0)], -np.inf).astype(np.float32)
        n_it = n_items[c0:c1]
        cand_sim = np.full(c1 - c0, -np.inf, np.float32)
        if len(item_sim):
            red = np.maximum.reduceat(item_sim, np.minimum(item_off[c0:c1] - i0, len(item_sim) - 1))
            cand_sim[n_it > 0] = red[n_it > 0]
        correct = cand_sim[cand_off[s:e] - c0 + correct_pos[s:e]]
        better = (cand_sim > np.repeat(correct, n_cand[s:e])).astype(np.int64)
        ranks[s:e] = np.add.reduceat(better, cand_off[s:e] - c0)
        ok[s:e] = np.isfinite(correct)
    return ranks, ok


def score_benchmark(bench: str | Path, feats: str | Path, skip_missing: bool = False) -> dict:
    """level -> task code -> {top1, top5, top10, n, skipped, missing_query, missing_gallery},
    plus per_class / per_taxon.

    Missing features are treated as the authors' scorer treats them (a zero vector): a query
    without one still counts, as a miss; a gallery item without one scores 0 for its taxon.
    Queries whose correct taxon is not among the candidates are skipped and counted.
    `skip_missing=True` skips (and counts) queries without a feature, and leaves gallery items
    without one out of their taxon's max, as biovita did before."""
    bench, store = Path(bench), FeatureStore(feats)
    result: dict = {}
    per_class: dict = {}
    per_taxon: dict = {}
    skipped_detail: dict = {}
    for level in LEVELS:
        for name, code in TASKS.items():
            task = read_task(bench / level / f"test_{name}.csv")
            q_mod, g_mod = name.split("_to_")
            queries = store.features(q_mod, set(task.query_ids), level)
            gallery_ids = ({i for g in task.galleries for i in g} if task.galleries is not None else
                           {i for n in range(len(task)) for g in task.row_galleries(n) for i in g})
            gallery = store.features(g_mod, gallery_ids, level)
            missing_gallery = gallery_ids - set(gallery.ids)
            missing_query = set(task.query_ids) - set(queries.ids)
            if not skip_missing and missing_gallery:
                dim = queries.matrix.shape[1] if len(queries.ids) else gallery.matrix.shape[1]
                gallery = gallery.with_zeros(sorted(missing_gallery), dim)
            ranks, skipped, kept = rank_of_correct(task, queries, gallery, skip_missing=skip_missing)
            n = int(len(ranks))
            entry = {f"top{k}": float((ranks < k).mean()) if n else 0.0 for k in KS}
            entry.update(n=n, skipped=int(sum(skipped.values())), missing_query=len(missing_query),
                         missing_gallery=len(missing_gallery))
            result.setdefault(level, {})[code] = entry
            if skipped:
                skipped_detail.setdefault(level, {})[code] = skipped
            by_cls: dict[str, list[int]] = defaultdict(list)
            by_tax: dict[str, list[int]] = defaultdict(list)
            for i, rk in zip(kept.tolist(), ranks.tolist()):
                by_cls[task.classes[i] or "unknown"].append(rk)
                by_tax[task.correct_taxa[i]].append(rk)
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
    n_cand = (read_task(Path(bench) / level / f"test_{task}.csv").cand >= 0).sum(1)
    return float(np.mean(np.minimum(k, n_cand) / n_cand)) if len(n_cand) else 0.0
