"""Which Parquet row groups a pass reads, and how they are grouped into decode tasks.

Computed on the driver from the store's metadata (ids, splits, sizes), never from media."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from biovita.data.store import filesystem, shards, table_uri


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
    for shard in shards(root, table):  # (an unreadable shard is skipped and counted)
        # both columns of the whole file in one read, then cut per row group: a field store
        # has hundreds of one-clip row groups per shard, and a read per group costs ~0.5 ms
        f = pq.ParquetFile(shard.path, filesystem=fs, metadata=shard.metadata)
        t = f.read(columns=["id", "split"], use_threads=False)
        ids, splits = t.column("id").to_pylist(), t.column("split").to_pylist()
        start = 0
        for k in range(f.num_row_groups):
            meta = shard.metadata.row_group(k)
            stop = start + meta.num_rows
            out.append(RowGroup(shard.path, k, tuple(map(str, ids[start:stop])),
                                tuple(map(str, splits[start:stop])), meta.total_byte_size))
            start = stop
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


@dataclass
class EpochOrder:
    """One epoch of a training stream: its uses in order, as indices into `StreamPlan`."""

    media: np.ndarray  # int32: index into StreamPlan.ids
    use: np.ndarray  # int32: the use number of that medium this epoch (seeds its crop)
    pair: np.ndarray | None = None  # int32: index into StreamPlan.pairs (stage 2's image)


@dataclass
class StreamPlan:
    """What the decode tasks of a training stream share (broadcast once): every epoch's
    uses in their random order, as compact arrays, and the row group that holds each
    medium. A task decodes one segment of one epoch."""

    ids: np.ndarray  # object: the media ids the stream uses
    group_of: np.ndarray  # int32: the row group of each id (index into `groups`)
    row_of: np.ndarray  # int32: the row of each id within its row group
    groups: list[tuple[str, int]]  # (Parquet file, row-group index)
    epochs: dict[int, EpochOrder]
    pairs: np.ndarray | None = None  # object: ids of paired images (stage 2)

    def segment(self, epoch: int, start: int, stop: int):
        """The uses of positions [start, stop) of an epoch: (ids, use numbers, paired ids or
        None) in order; the row groups to read, each as ((file, index), its wanted rows in
        order); and `which`: each use's position among all wanted rows, read in that order
        (a medium used twice in the segment is read once)."""
        order = self.epochs[epoch]
        media = order.media[start:stop]
        ids = self.ids[media]
        pairs = None if order.pair is None else self.pairs[order.pair[start:stop]]
        keys = np.stack([self.group_of[media], self.row_of[media]]).astype(np.int64)
        rows, which = np.unique(keys, axis=1, return_inverse=True)
        cut = np.flatnonzero(np.diff(rows[0])) + 1
        reads = [(self.groups[int(g[0, 0])], g[1].tolist())
                 for g in np.split(rows, cut, axis=1)] if len(media) else []
        return ids, order.use[start:stop], pairs, reads, which.reshape(-1)


def stream_plan(groups: list[RowGroup], orders: dict[int, list[tuple[str, int, str | None]]]
                ) -> StreamPlan:
    """Pack each epoch's ordered uses (`sampling.epoch_order`) with the row groups of `groups`."""
    where = {i: (k, r) for k, g in enumerate(groups) for r, i in enumerate(g.ids)}
    index: dict[str, int] = {}
    pair_index: dict[str, int] = {}
    epochs = {}
    for e, uses in orders.items():
        media = np.fromiter((index.setdefault(u[0], len(index)) for u in uses), np.int32, len(uses))
        use = np.fromiter((u[1] for u in uses), np.int32, len(uses))
        pair = None
        if uses and uses[0][2] is not None:
            pair = np.fromiter((pair_index.setdefault(u[2], len(pair_index)) for u in uses),
                               np.int32, len(uses))
        epochs[e] = EpochOrder(media, use, pair)
    missing = [i for i in index if i not in where]
    if missing:
        raise ValueError(f"{len(missing)} planned media are in no row group, e.g. {missing[:3]}")
    ids = np.array(list(index), dtype=object)
    located = np.array([where[i] for i in index], np.int32).reshape(-1, 2)
    pairs = np.array(list(pair_index), dtype=object) if pair_index else None
    return StreamPlan(ids, located[:, 0].copy(), located[:, 1].copy(),
                      [(g.path, g.index) for g in groups], epochs, pairs)


def segments(n_uses: int, batch_size: int, bytes_per_use: float, decoders: int) -> list[tuple[int, int]]:
    """An epoch's uses cut into decode tasks: whole batches (a batch then holds consecutive
    uses of the random order: the shuffle reaches the trainer unchanged), about `TASK_BYTES`
    of encoded media a task, and at least two tasks for every decoder."""
    if n_uses <= 0:
        return []
    batches = max(1, round(TASK_BYTES / max(1.0, batch_size * bytes_per_use)))
    per_decoder = -(-n_uses // (2 * max(1, decoders) * batch_size))
    size = batch_size * max(1, min(batches, per_decoder))
    return [(s, min(s + size, n_uses)) for s in range(0, n_uses, size)]
