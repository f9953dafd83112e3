"""The gallery a service searches: a store's recordings and photos as a checkpoint embeds
them (`biovita.embed.cache.gallery_embeddings`: made once on Ray Data, cached beside the
store), with each item's taxonomy and where its media lie in the store."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from biovita.data.store import filesystem, read_table, shards, table_uri
from biovita.data.vectors import Vectors

SHOWN = ("scientific_name", "common_name", "genus", "family", "class")


class Gallery:
    """Embeddings per modality with each item's taxonomy, and where its media lie in the store
    (file and row group) so a page can play or show it."""

    def __init__(self, store: str, embeddings: dict[str, Vectors]):
        self.store = store
        self.items: dict[str, list[dict]] = {"audio": [], "image": []}
        self.emb: dict[str, np.ndarray] = {}
        for m in ("audio", "image"):
            v = embeddings.get(m) or Vectors([], np.zeros((0, 0), np.float32))
            meta = {r["id"]: r for r in read_table(store, m, ["id", *SHOWN]).to_pylist()}
            rows = [k for k, i in enumerate(v.ids) if i in meta]
            self.items[m] = [{"id": v.ids[k], "modality": m, **{c: meta[v.ids[k]][c] for c in SHOWN},
                              "media": f"/media/{m}/{v.ids[k]}"} for k in rows]
            self.emb[m] = v.vectors[rows] if rows else np.zeros((0, 0), np.float32)
        # id -> (file, row group): one row group is read to serve one medium
        self.where: dict[str, dict[str, tuple[str, int]]] = {"audio": {}, "image": {}}
        for m in ("audio", "image"):
            fs, _ = filesystem(table_uri(store, m))
            for shard in shards(store, m):
                pf = pq.ParquetFile(shard.path, filesystem=fs)
                for g in range(pf.num_row_groups):
                    for i in pf.read_row_group(g, columns=["id"])["id"].to_pylist():
                        self.where[m][i] = (shard.path, g)

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    def nearest(self, v: np.ndarray, k: int = 5) -> dict[str, list[dict]]:
        """The `k` most similar items of each modality (cosine)."""
        out = {}
        for m, e in self.emb.items():
            if not len(e):
                out[m] = []
                continue
            sims = e @ v
            out[m] = [{**self.items[m][i], "similarity": float(sims[i])} for i in np.argsort(-sims)[:k]]
        return out

    def media(self, modality: str, media_id: str) -> tuple[bytes, str] | None:
        """(encoded bytes, format) of one gallery item, or None."""
        hit = self.where.get(modality, {}).get(media_id)
        if hit is None:
            return None
        fs, _ = filesystem(table_uri(self.store, modality))
        rows = pq.ParquetFile(hit[0], filesystem=fs).read_row_group(
            hit[1], columns=["id", "bytes", "format"]).to_pylist()
        r = next((r for r in rows if r["id"] == media_id), None)
        return (r["bytes"], r["format"]) if r else None
