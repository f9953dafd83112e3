"""Which Parquet row groups a pass reads, and how they are grouped into decode tasks.

Computed on the driver from the store's metadata (ids, splits, sizes), never from media."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from biovita.data.store import filesystem, table_files, table_uri


@dataclass(frozen=True)
class RowGroup:
    """One Parquet row group of a store table: the unit decoding reads (see `decode_tasks`)."""

    path: str
    index: int
    ids: tuple[str, ...]
    splits: tuple[str, ...]
    nbytes: int = 0  # its encoded size (Parquet metadata): roughly what decoding it costs


def row_groups(root: str, table: str) -> list[RowGroup]:
    """Every row group of a table, with its ids and splits (read on the driver, no media)."""
    fs, _ = filesystem(table_uri(root, table))
    out = []
    for path in table_files(root, table):
        f = pq.ParquetFile(path, filesystem=fs)
        for k in range(f.num_row_groups):
            t = f.read_row_group(k, columns=["id", "split"])
            out.append(RowGroup(path, k, tuple(map(str, t.column("id").to_pylist())),
                                tuple(map(str, t.column("split").to_pylist())),
                                f.metadata.row_group(k).total_byte_size))
    return out


def select_row_groups(groups: list[RowGroup], split: str | None = None, plan: dict | None = None,
                      order_seed: tuple[int, ...] | None = None) -> list[RowGroup]:
    """The row groups holding a row of `split` and of the plan, in a seeded random order."""
    keep = [g for g in groups
            if (split is None or split in g.splits) and (plan is None or any(i in plan for i in g.ids))]
    if order_seed is not None:
        keep = [keep[i] for i in np.random.default_rng(list(order_seed)).permutation(len(keep))]
    return keep


TASK_BYTES = 4 * 2**20


def decode_tasks(groups: list[RowGroup], decoders: int) -> list[list[RowGroup]]:
    """Consecutive row groups per decode task: at least `TASK_BYTES` of encoded media (0.15-0.3 s
    of decoding on one core), as long as every decoder still gets two tasks to balance the end.

    A task has a fixed cost of ~30-90 ms (Ray Data retiring it and starting the next; measured
    here): a row group of 32 small images decodes in 40-70 ms, 32 clips in ~330 ms."""
    if not groups:
        return []
    mean = max(1.0, sum(g.nbytes for g in groups) / len(groups))
    per = max(1, min(-(-TASK_BYTES // int(mean)), -(-len(groups) // (2 * max(1, decoders)))))
    return [groups[i : i + per] for i in range(0, len(groups), per)]
