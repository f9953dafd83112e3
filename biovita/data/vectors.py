"""A table of embeddings keyed by id (media ids, or prompt strings), as Parquet on a local
folder or an object store. The frozen-tower cache (`biovita.embed.cache`) writes them; decode
tasks attach rows of them to the batches they decode. No Ray here."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biovita.data.store import filesystem


@dataclass
class Vectors:
    """Rows of embeddings: `ids[i]` (a media id or a prompt) has `vectors[i]` (float32,
    L2-normalised) and `species[i]` (-1 when unknown). `seconds`: the time spent making
    them (0 when read from a cache)."""

    ids: list[str]
    vectors: np.ndarray
    species: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        self.vectors = np.asarray(self.vectors, np.float32).reshape(len(self.ids), -1)
        if len(self.species) != len(self.ids):
            self.species = np.full(len(self.ids), -1, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    @cached_property
    def index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.ids)}

    def take(self, keys) -> np.ndarray:
        """The vectors of `keys`, in order (KeyError names a key that has none)."""
        index = self.index
        try:
            rows = [index[str(k)] for k in keys]
        except KeyError as e:
            raise KeyError(f"no embedding for {e.args[0]!r} among {len(self)} cached rows") from None
        return self.vectors[rows] if rows else np.zeros((0, self.vectors.shape[1]), np.float32)

    def subset(self, keep) -> "Vectors":
        """The rows whose ids are in `keep`, in this table's order."""
        keep = set(map(str, keep))
        rows = [i for i, k in enumerate(self.ids) if k in keep]
        return Vectors([self.ids[i] for i in rows], self.vectors[rows], self.species[rows], self.seconds)

    @classmethod
    def concat(cls, parts: list["Vectors"]) -> "Vectors":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls([], np.zeros((0, 0), np.float32))
        return cls([i for p in parts for i in p.ids], np.concatenate([p.vectors for p in parts]),
                   np.concatenate([p.species for p in parts]), sum(p.seconds for p in parts))


def write_vectors(v: Vectors, uri: str) -> None:
    """Write atomically where the filesystem allows (a local file is written beside and
    renamed; an object-store PUT is whole already)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    dim = v.vectors.shape[1] if v.vectors.ndim == 2 else 0
    table = pa.table({
        "id": pa.array(v.ids, pa.string()),
        "species_id": pa.array(v.species, pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.vectors.reshape(-1), pa.float32()), dim),
    })
    target = path
    if isinstance(fs, pafs.LocalFileSystem):
        path = f"{path}.tmp"
    pq.write_table(table, path, filesystem=fs)
    if path != target:
        fs.move(path, target)


def read_vectors(uri: str) -> Vectors | None:
    """The table at `uri`, or None when there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    t = pq.read_table(path, filesystem=fs)
    emb = t.column("embedding").combine_chunks()
    dim = emb.type.list_size
    vectors = emb.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim) if len(t) else np.zeros((0, dim))
    return Vectors(t.column("id").to_pylist(), vectors, t.column("species_id").to_numpy())
