"""The gallery a service searches: a store's recordings and photos, embedded once by a
checkpoint (Ray Data, `biovita.bench.features.embed_to_parquet`) and cached beside the store
as `<store>/_gallery/<model key>.parquet`. No Ray here: a replica only reads the cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

SHOWN = ("scientific_name", "common_name", "genus", "family", "class")


def cache_path(store: str, checkpoint: str) -> Path:
    """Where a store's embeddings by a checkpoint are kept: beside a local store, else in
    ~/.cache/biovita/gallery. Keyed by the weights' SHA-256 when the checkpoint records it."""
    from biovita.data.store import fetch_dir, is_remote
    from biovita.models.checkpoint import read_meta

    try:
        key = read_meta(fetch_dir(checkpoint)).get("sha256") or str(checkpoint)
    except Exception:
        key = str(checkpoint)
    name = hashlib.sha1(f"{key}|{store}".encode()).hexdigest()[:16] + ".parquet"
    if is_remote(store):
        return Path.home() / ".cache" / "biovita" / "gallery" / name
    return Path(store) / "_gallery" / name


def build_gallery(store: str, checkpoint: str) -> Path:
    """Embed the store's audio and image tables once (on Ray Data) and return the cache."""
    from biovita.bench.features import embed_to_parquet

    path = cache_path(store, checkpoint)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        embed_to_parquet(checkpoint, str(tmp), data=store)
        tmp.rename(path)
    return path


class Gallery:
    """Embeddings per modality with each item's taxonomy, and where its media lie in the store
    (file and row group) so a page can play or show it."""

    def __init__(self, store: str, cache: str | Path):
        import pyarrow.parquet as pq

        from biovita.data.store import filesystem, read_table, table_files, table_uri

        self.store = store
        t = pq.read_table(cache).to_pylist()
        self.items: dict[str, list[dict]] = {"audio": [], "image": []}
        vecs: dict[str, list] = {"audio": [], "image": []}
        meta = {m: {r["id"]: r for r in read_table(store, m, ["id", *SHOWN]).to_pylist()}
                for m in ("audio", "image")}
        for r in t:
            m = r["modality"]
            info = meta[m].get(r["id"])
            if info is None:
                continue
            self.items[m].append({"id": r["id"], "modality": m, **{k: info[k] for k in SHOWN},
                                  "media": f"/media/{m}/{r['id']}"})
            vecs[m].append(r["embedding"])
        self.emb = {m: np.asarray(v, np.float32).reshape(len(v), -1) for m, v in vecs.items()}
        # id -> (file, row group): one row group is read to serve one medium
        self.where: dict[str, dict[str, tuple[str, int]]] = {"audio": {}, "image": {}}
        for m in ("audio", "image"):
            fs, _ = filesystem(table_uri(store, m))
            for f in table_files(store, m):
                pf = pq.ParquetFile(f, filesystem=fs)
                for g in range(pf.num_row_groups):
                    for i in pf.read_row_group(g, columns=["id"])["id"].to_pylist():
                        self.where[m][i] = (f, g)

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
        import pyarrow.parquet as pq

        from biovita.data.store import filesystem, table_uri

        hit = self.where.get(modality, {}).get(media_id)
        if hit is None:
            return None
        fs, _ = filesystem(table_uri(self.store, modality))
        rows = pq.ParquetFile(hit[0], filesystem=fs).read_row_group(
            hit[1], columns=["id", "bytes", "format"]).to_pylist()
        r = next((r for r in rows if r["id"] == media_id), None)
        return (r["bytes"], r["format"]) if r else None
