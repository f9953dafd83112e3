"""Score precomputed features on a BioVITA Bench folder, vectorised.

Features as the official extractor writes them: FEATS/{audio,image}/<id>.pt hold one vector;
FEATS/text/<id>.pt holds a dict keyed by level (species, genus, family). A candidate taxon's
score is the maximum cosine similarity between the query and any item of its gallery; Top-k
counts queries whose correct taxon ranks among the first k candidates.

How it is fast and still exact:
- a task file is encoded once when it is read: taxon names become integer codes, the
  candidates an (n, C) code matrix, and each taxon's gallery is kept once (in the release
  format a taxon's gallery is the same in every row; that is checked);
- each block of queries is one low-precision matrix product against every gallery item
  (bfloat16 where the CPU has AMX tiles, float32 otherwise); a candidate's score is one gather
  and a max over its items;
- every low-precision score carries a rigorous error bound (input rounding, float32
  accumulation, output rounding); a candidate whose interval does not overlap the correct
  taxon's is decided, the few that overlap are recomputed in float32. Ranks are exact up to
  `cap` (the largest k reported) and clipped there, so Top-1/5/10 equal the float32 reference.
No Python loop runs per query or per candidate.
"""

from __future__ import annotations

import csv
import json
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biovita.bench.build import TASKS
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
            cache[i] = np.asarray(obj, dtype=np.float32).reshape(-1)
        return Features.from_dict({i: cache[i] for i in ids if i in cache})


@dataclass
class Task:
    """One benchmark task file, parsed and encoded for scoring.

    `rows` are the CSV rows (lists JSON-decoded); `cand[n, j]` is the taxon code of row n's
    j-th candidate (-1 pads short rows); `correct[n]` is the column of the correct taxon (-1
    when it is not among the candidates); `galleries[t]` are the gallery ids of taxon t, or
    None when some taxon's gallery differs between rows (then the exact per-row path scores).
    """

    rows: list[dict]
    cand: np.ndarray
    correct: np.ndarray
    galleries: list[list[str]] | None

    @classmethod
    def from_rows(cls, rows: list[dict]) -> Task:
        from itertools import chain

        code_of: dict[str, int] = {}
        n_cand = np.fromiter((len(r["candidates_taxa"]) for r in rows), np.int64, len(rows))
        flat = list(chain.from_iterable(r["candidates_taxa"] for r in rows))
        codes = np.fromiter(map(lambda t: code_of.setdefault(t, len(code_of)), flat), np.int64, len(flat))
        C = int(n_cand.max()) if len(rows) else 0
        cand = np.full((len(rows), C), -1, np.int64)
        off = np.concatenate([[0], np.cumsum(n_cand)])
        cand[np.repeat(np.arange(len(rows)), n_cand), np.arange(len(codes)) - np.repeat(off[:-1], n_cand)] = codes
        correct = np.fromiter((r["candidates_taxa"].index(r["correct_taxon"])
                               if r["correct_taxon"] in r["candidates_taxa"] else -1 for r in rows),
                              np.int64, len(rows))
        flat_gal = list(chain.from_iterable(r["candidates_target_ids"] for r in rows))
        first = np.empty(len(code_of), np.int64)
        first[codes[::-1]] = np.arange(len(codes))[::-1]  # first occurrence of each taxon
        canon = [flat_gal[i] for i in first]
        same = flat_gal == [canon[c] for c in codes.tolist()]
        return cls(rows, cand, correct, canon if same else None)


def read_task(path: Path) -> Task:
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
    return Task.from_rows(rows)


def rank_of_correct(task: Task, queries: Features, gallery: Features, cap: int = max(KS)
                    ) -> tuple[np.ndarray, dict[str, int], np.ndarray]:
    """Rank (0 = best) of the correct taxon for every scorable row, exact below `cap` and
    clipped to `cap`; skip counts by reason; the indices of the scored rows in `task.rows`."""
    q_row = queries.rows([r["query_payload_id"] for r in task.rows])
    no_correct = task.correct < 0
    no_query = ~no_correct & (q_row < 0)
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


def _product_dtype():
    """bfloat16 where the CPU multiplies it in hardware (AMX tiles), float32 elsewhere."""
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if amx else torch.float32


def _rank_shared(task: Task, keep: np.ndarray, Q: np.ndarray, gallery: Features, cap: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Ranks when every taxon has one gallery (the release format): a low-precision product
    with certified error bounds decides most candidates; the rest are recomputed in float32."""
    from itertools import chain

    import torch

    listed = np.fromiter(map(len, task.galleries), np.int64, len(task.galleries))
    item = gallery.rows(list(chain.from_iterable(task.galleries)))  # -1: no feature
    sizes = np.bincount(np.repeat(np.arange(len(listed)), listed)[item >= 0], minlength=len(listed))
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    cand, col = task.cand[keep], task.correct[keep]
    rows = np.arange(len(keep))
    ok = sizes[cand[rows, col]] > 0
    if not sizes.any():
        return np.zeros(len(keep), np.int64), ok
    G = torch.from_numpy(gallery.matrix[item[item >= 0]])
    # item_of[t, k]: taxon t's k-th item; short galleries repeat their items (a max is unchanged)
    m = int(sizes.max())
    item_of = torch.from_numpy(np.minimum(ptr[:-1, None] + np.arange(m) % np.maximum(sizes, 1)[:, None],
                                          len(G) - 1))
    valid = torch.from_numpy((cand >= 0) & (sizes[np.maximum(cand, 0)] > 0))  # pads, empty galleries
    cand_t = torch.from_numpy(np.maximum(cand, 0))
    Qt = torch.from_numpy(Q)
    A, e_row, u = _approx_scores(Qt, G, item_of, cand_t)
    eps = e_row[:, None] + u * A.abs()
    A.masked_fill_(~valid, -np.inf)
    eps.masked_fill_(~valid, 0.0)
    # intervals around the true cosines: a candidate is surely better, surely not, or open
    r_t, c_t = torch.from_numpy(rows), torch.from_numpy(col)
    a_c, e_c = A[r_t, c_t, None], eps[r_t, c_t, None]
    sure = (A - eps) > (a_c + e_c)
    open_ = ~sure & (A + eps >= a_c - e_c) & valid
    open_[r_t, c_t] = False
    ranks = sure.sum(1).numpy()
    need = torch.from_numpy(ranks < cap) & open_.any(1)  # ranks at or past cap need no detail
    pr, pc = torch.nonzero(open_ & need[:, None], as_tuple=True)
    nr = torch.nonzero(need).flatten()
    if len(nr):
        exact = _exact_scores(Qt, G, ptr, torch.cat([pr, nr]),
                              cand_t[torch.cat([pr, nr]), torch.cat([pc, c_t[nr]])])
        correct = torch.full((len(keep),), np.inf)
        correct[nr] = exact[len(pr):]
        better = (exact[:len(pr)] > correct[pr]).long()
        ranks = ranks + torch.zeros(len(keep), dtype=torch.long).index_add_(0, pr, better).numpy()
    return ranks, ok


def _approx_scores(Q, G, item_of, cand):
    """Candidate scores from a low-precision product, and a rigorous bound on their error:
    `e_row[n] + u * |score|` for row n.

    For q, g rounded to q', g': |q.g - q'.g'| <= |q'| |g - g'| + |q - q'| |g|; float32
    accumulation adds at most gamma_d |q'| |g'|; rounding the output adds u |s| / (1 - u).
    A max over a taxon's items moves by at most the largest item bound."""
    import torch

    dtype = _product_dtype()
    n, C = cand.shape
    m, d = item_of.shape[1], Q.shape[1]
    norm = torch.linalg.vector_norm
    Gl = G.to(dtype)
    Glf = Gl.float()
    gamma = d * 2.0 ** -24 / (1 - d * 2.0 ** -24)
    u = torch.finfo(dtype).eps / 2
    u = u / (1 - u) if dtype != torch.float32 else 0.0
    g_err = float((norm(G - Glf, dim=1) + gamma * norm(Glf, dim=1)).max())
    g_max = float(norm(G, dim=1).max())
    A, e_row = torch.empty(n, C), torch.empty(n)
    for s in range(0, n, QUERY_BLOCK):  # blocks bound memory; no loop per query
        e = min(s + QUERY_BLOCK, n)
        Ql = Q[s:e].to(dtype)
        sims = Ql @ Gl.T
        A[s:e] = sims.gather(1, item_of[cand[s:e]].view(e - s, C * m)).view(e - s, C, m).amax(-1)
        Qlf = Ql.float()
        e_row[s:e] = norm(Qlf, dim=1) * g_err + g_max * norm(Q[s:e] - Qlf, dim=1)
    return A, e_row, u


def _exact_scores(Q, G, ptr, q_rows, taxa):
    """Float32 max-over-items score of each (query row, taxon) pair: one sampled dense-dense
    product (only the needed query-item dot products) and a segment max per pair."""
    import torch

    ptr = torch.as_tensor(ptr)
    n_items = ptr[taxa + 1] - ptr[taxa]
    pair = torch.repeat_interleave(torch.arange(len(taxa)), n_items)
    item = ptr[taxa][pair] + torch.arange(len(pair)) - torch.repeat_interleave(
        torch.cumsum(n_items, 0) - n_items, n_items)
    # CSR needs sorted, distinct (row, column) entries
    key, inv = torch.unique(q_rows[pair] * len(G) + item, return_inverse=True)
    rows, cols = key // len(G), key % len(G)
    crow = torch.zeros(len(Q) + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=len(Q)), 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(len(key)), size=(len(Q), len(G)),
                                          check_invariants=False)
        dots = torch.sparse.sampled_addmm(pattern, Q, G.T, beta=0.0).values()[inv]
    return torch.full((len(taxa),), -torch.inf).scatter_reduce_(0, pair, dots, "amax")


def _rank_per_row(task: Task, keep: np.ndarray, Q: np.ndarray, gallery: Features
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact ranks when galleries differ between rows: all (query, candidate, item) triples are
    flattened once; each block of queries is one matrix product against the gallery, then a
    gather and two segment reductions (max over a candidate's items, count of better ones)."""
    from itertools import chain

    rows = [task.rows[i] for i in keep]
    n_cand = (task.cand[keep] >= 0).sum(1)
    correct_pos = task.correct[keep]
    galleries = list(chain.from_iterable(r["candidates_target_ids"] for r in rows))
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


def score_benchmark(bench: str | Path, feats: str | Path) -> dict:
    """level -> task code -> {top1, top5, top10, n, skipped}, plus per_class / per_taxon."""
    bench, store = Path(bench), FeatureStore(feats)
    result: dict = {}
    per_class: dict = {}
    per_taxon: dict = {}
    skipped_detail: dict = {}
    for level in LEVELS:
        for name, code in TASKS.items():
            task = read_task(bench / level / f"test_{name}.csv")
            q_mod, g_mod = name.split("_to_")
            queries = store.features(q_mod, {r["query_payload_id"] for r in task.rows}, level)
            gallery_ids = ({i for g in task.galleries for i in g} if task.galleries is not None else
                           {i for r in task.rows for g in r["candidates_target_ids"] for i in g})
            gallery = store.features(g_mod, gallery_ids, level)
            ranks, skipped, kept = rank_of_correct(task, queries, gallery)
            n = int(len(ranks))
            entry = {f"top{k}": float((ranks < k).mean()) if n else 0.0 for k in KS}
            entry.update(n=n, skipped=int(sum(skipped.values())))
            result.setdefault(level, {})[code] = entry
            if skipped:
                skipped_detail.setdefault(level, {})[code] = skipped
            by_cls: dict[str, list[int]] = defaultdict(list)
            by_tax: dict[str, list[int]] = defaultdict(list)
            for i, rk in zip(kept.tolist(), ranks.tolist()):
                r = task.rows[i]
                by_cls[r.get("taxon_class") or "unknown"].append(rk)
                by_tax[r["correct_taxon"]].append(rk)
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
