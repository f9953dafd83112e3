"""Compiled scoring kernel (numba): the max-over-gallery score of every (query, candidate taxon)
pair a benchmark task lists, computing only those dot products, in float32.

Pairs are visited by (block of queries, taxon, query): a block's query features stay in the
CPU's L2 cache while each taxon's gallery rows are read once per block and shared by four
queries at a time in registers. Measured on 2 cores (20,000 queries x 100 candidates x 5
items, dim 768): 0.21 s, against 0.52 s for torch's sampled dense-dense product of the same
pairs and 1.35 s for the dense product with every gallery item (benchmarks/bench_scoring.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

QUERY_BLOCK = 256  # 768 KB of float32 features at dim 768: half a core's L2


@njit(cache=True)
def group_pairs(cand: np.ndarray, n_taxa: int, block: int):
    """Every (query row, candidate column) pair with a taxon, ordered by (block of queries,
    taxon, query): a counting sort. Returns (start of each (block, taxon) key, rows, columns)."""
    n, c = cand.shape
    nb = (n + block - 1) // block
    starts = np.zeros(nb * n_taxa + 1, np.int64)
    for i in range(n):
        for j in range(c):
            if cand[i, j] >= 0:
                starts[(i // block) * n_taxa + cand[i, j] + 1] += 1
    for k in range(nb * n_taxa):
        starts[k + 1] += starts[k]
    fill = starts[:-1].copy()
    rows = np.empty(starts[-1], np.int64)
    cols = np.empty(starts[-1], np.int64)
    for i in range(n):
        for j in range(c):
            if cand[i, j] >= 0:
                key = (i // block) * n_taxa + cand[i, j]
                rows[fill[key]] = i
                cols[fill[key]] = j
                fill[key] += 1
    return starts, rows, cols


@njit(parallel=True, fastmath=True, cache=True)
def pair_scores(Q, G, ptr, starts, rows, cols, scores):
    """scores[i, j] = max over the gallery items G[ptr[t]:ptr[t+1]] of taxon t of Q[i] . G[k],
    for each pair (i, j) of taxon t; a taxon with no item leaves its pairs at -inf."""
    n_taxa = ptr.shape[0] - 1
    nb = (starts.shape[0] - 1) // n_taxa
    d = Q.shape[1]
    for blk in prange(nb):
        for t in range(n_taxa):
            a, b = ptr[t], ptr[t + 1]
            p, stop = starts[blk * n_taxa + t], starts[blk * n_taxa + t + 1]
            while p + 4 <= stop:  # four queries share each gallery row loaded
                i0, i1, i2, i3 = rows[p], rows[p + 1], rows[p + 2], rows[p + 3]
                b0 = b1 = b2 = b3 = np.float32(-np.inf)
                for k in range(a, b):
                    s0 = s1 = s2 = s3 = np.float32(0.0)
                    for x in range(d):
                        g = G[k, x]
                        s0 += Q[i0, x] * g
                        s1 += Q[i1, x] * g
                        s2 += Q[i2, x] * g
                        s3 += Q[i3, x] * g
                    b0, b1, b2, b3 = max(b0, s0), max(b1, s1), max(b2, s2), max(b3, s3)
                scores[i0, cols[p]] = b0
                scores[i1, cols[p + 1]] = b1
                scores[i2, cols[p + 2]] = b2
                scores[i3, cols[p + 3]] = b3
                p += 4
            while p < stop:
                i = rows[p]
                best = np.float32(-np.inf)
                for k in range(a, b):
                    s = np.float32(0.0)
                    for x in range(d):
                        s += Q[i, x] * G[k, x]
                    best = max(best, s)
                scores[i, cols[p]] = best
                p += 1


def candidate_scores(Q: np.ndarray, G: np.ndarray, ptr: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """(n, C) float32 scores: cand[i, j] is the taxon of query i's j-th candidate (-1: none;
    its score is -inf), the taxon t's gallery rows are G[ptr[t]:ptr[t+1]]."""
    Q = np.ascontiguousarray(Q, np.float32)
    G = np.ascontiguousarray(G, np.float32)
    cand = np.ascontiguousarray(cand, np.int64)
    ptr = np.ascontiguousarray(ptr, np.int64)
    starts, rows, cols = group_pairs(cand, len(ptr) - 1, QUERY_BLOCK)
    scores = np.full(cand.shape, -np.inf, np.float32)
    pair_scores(Q, G, ptr, starts, rows, cols, scores)
    return scores
