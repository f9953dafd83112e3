"""Ray Data datasets of a store: Parquet -> decoded log-mels / uint8 images, streaming.

Decoding runs in Ray Data `map_batches` (tasks for a single pass, a fixed actor pool for a
training stream), so it spreads over every CPU of the cluster while the GPUs train. Dropped
media are counted by reason (`biovita.data.stats`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data.collate_fn import NumpyBatchCollateFn

from biovita.data import stats
from biovita.data.decode import DECODERS, AudioDecodeSpec, ImageDecodeSpec
from biovita.data.planning import (
    RowGroup,
    StreamPlan,
    decode_tasks,
    row_groups,
    segments,
    select_row_groups,
    stream_plan,
)
from biovita.data.sampling import epoch_order
from biovita.ray_patches import bound_decoding, shorten_completion_wait
from biovita.data.store import filesystem, table_uri

_CACHE: dict[str, Any] = {}


def _get_shared(ref_box: list | None):
    """Resolve a broadcast object (plan, embeddings) once per worker process."""
    if ref_box is None:
        return None
    ref = ref_box[0]
    key = ref.hex() if hasattr(ref, "hex") else str(id(ref))
    if key not in _CACHE:
        if len(_CACHE) >= 4:  # a stage uses two (plans, image embeddings): keep both
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
    return _CACHE[key]


def _box(obj: Any) -> list | None:
    # a one-element list keeps Ray from resolving the ref eagerly into every task's arguments
    if obj is None:
        return None
    return [obj if isinstance(obj, ray.ObjectRef) else ray.put(obj)]


def _decode_and_count(batch, table: str, decode, spec, *args, **kwargs) -> dict[str, np.ndarray]:
    out, good, bad = decode(batch, spec, *args, **kwargs)
    stats.report(spec.stats_name, table, good, bad)
    return out


def _read_row_group(f: pq.ParquetFile, index: int, split: str | None) -> dict[str, np.ndarray]:
    """The rows of one row group (of `split` only), as columns."""
    t = f.read_row_group(index)
    if split is not None:
        t = t.filter(pc.equal(t.column("split"), split))
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


_FILES: dict[str, pq.ParquetFile] = {}


def _parquet_file(path: str, fs) -> pq.ParquetFile:
    """Opened once per worker process (one footer read per file, on object storage too); the
    oldest of 256 goes. Arrow's pre-buffering gathers a row group's column chunks into one
    request: what object storage needs, but on a local disk an extra copy (a row group of
    field media read in 1.9 ms without it, 2.4 ms with it; measured here)."""
    if path not in _FILES:
        if len(_FILES) >= 256:
            _FILES.pop(next(iter(_FILES)))
        local = isinstance(fs, pafs.LocalFileSystem)
        _FILES[path] = pq.ParquetFile(path, filesystem=fs, pre_buffer=not local)
    return _FILES[path]


def _read_then_decode(items: dict[str, np.ndarray], fs, table: str, split: str | None, spec):
    """A single pass: one task (a list of row groups) -> a batch of decoded rows per row
    group, so a task holds one row group's media at a time."""
    decode = DECODERS[table]
    for path, index in zip(items["path"][0], items["row_group"][0]):
        rows = _read_row_group(_parquet_file(str(path), fs), int(index), split)
        yield _decode_and_count(rows, table, decode, spec)


def _segment_rows(plan: StreamPlan, fs, epoch: int, start: int, stop: int) -> dict[str, np.ndarray]:
    """The store rows of one segment of an epoch, one per use, in the epoch's order, with
    their use number (`_use`) and paired image (`_pair`).

    Only the row groups of the segment's uses are read, each whole (a field store's row
    group holds one or a few clips, stored plain: one contiguous read). Reading a shard's
    small columns once per actor instead cost 21-124 ms a shard, and with a store of
    thousands of shards every read was a new one. Each wanted clip's bytes are copied once;
    a medium used twice shares them."""
    ids, uses, pairs, reads, which = plan.segment(epoch, start, stop)
    small, media = [], []
    for (path, index), rows in reads:
        t = _parquet_file(path, fs).read_row_group(index, use_threads=False)  # one core
        if t.num_rows <= rows[-1]:
            raise ValueError(f"{path} row group {index} holds {t.num_rows} rows, the plan reads "
                             f"row {rows[-1]}: the store changed after the stage was planned")
        col = t.column("bytes")
        media += [col[r].as_py() for r in rows]
        small.append(t.drop_columns(["bytes"]).take(rows))
    table = pa.concat_tables(small).take(which)  # (a segment is never empty: `segments`)
    out = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    if not np.array_equal(out["id"].astype(str), ids.astype(str)):
        raise ValueError("the stream's row groups hold other media than planned: the store "
                         "changed after the stage was planned")
    out["bytes"] = np.empty(len(which), dtype=object)
    out["bytes"][:] = [media[k] for k in which]
    out["_use"] = np.asarray(uses, np.int64)
    if pairs is not None:
        out["_pair"] = np.asarray(pairs, dtype=object)
    return out


class _StreamDecoder:
    """A decode actor of a training stream: one task = one segment of one epoch's uses, in
    the epoch's random order, decoded with that epoch's seeds into one block."""

    def __init__(self, fs, table: str, spec, plan_box: list, frozen_box: list | None):
        self.fs, self.table, self.spec = fs, table, spec
        self.plan_box, self.frozen_box = plan_box, frozen_box

    def __call__(self, items: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plan: StreamPlan = _get_shared(self.plan_box)
        epoch, start, stop = (int(items[k][0]) for k in ("epoch", "start", "stop"))
        spec = replace(self.spec, epoch=self.spec.epoch + epoch)
        rows = _segment_rows(plan, self.fs, epoch, start, stop)
        kwargs = {"frozen": _get_shared(self.frozen_box)} if self.frozen_box else {}
        out = _decode_and_count(rows, self.table, DECODERS[self.table], spec, **kwargs)
        out["epoch"] = np.full(len(out["id"]), epoch, np.int64)
        return out


def _decoders(decoders: int, num_cpus: float, reserved_cpus: float) -> int:
    if decoders:
        return decoders
    return max(1, int((ray.cluster_resources().get("CPU", 1) - reserved_cpus) / num_cpus))


def store_dataset(root: str, table: str, spec, split: str | None = None,
                  groups: list[RowGroup] | None = None, order_seed: tuple[int, ...] | None = None,
                  num_cpus: float = 0.5, decoders: int = 0, reserved_cpus: float = 0.0):
    """A single pass over one table of the store (local folder or object-store URI), decoded:
    {id, taxonomy..., species_id, mel | pixels[, text]}.

    One Ray Data task reads and decodes a few consecutive Parquet row groups (`decode_tasks`):
    reading and decoding are a single operator, so every CPU Ray gives the dataset decodes, no
    encoded bytes travel through the object store, and row groups that hold no row of `split`
    are never read. Up to `decoders` tasks run at once on Ray's shared workers (0: the
    cluster's CPUs, counted now, minus `reserved_cpus`, over `num_cpus`)."""
    fs, _ = filesystem(table_uri(root, table))
    groups = row_groups(root, table) if groups is None else groups
    decoders = _decoders(decoders, num_cpus, reserved_cpus)
    items = [{"path": [g.path for g in task], "row_group": [g.index for g in task]}
             for task in decode_tasks(select_row_groups(groups, split, None, order_seed), decoders)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    shorten_completion_wait()  # the driver's executor runs a single pass
    # the pool size bounds the decoders; Ray's per-operator reservation would hold one of two
    # CPUs back (measured on the realistic store: 1.0 task at a time, 10.7 -> 18.9 clips/s)
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(_read_then_decode, fn_kwargs={"fs": fs, "table": table, "split": split,
                                                       "spec": spec},
                          batch_size=1, batch_format="numpy",
                          compute=TaskPoolStrategy(size=max(1, min(decoders, len(items)))),
                          num_cpus=num_cpus)


def stream_dataset(root: str, table: str, spec, plans: dict[int, dict], batch_size: int,
                   seed: int, frozen=None, groups: list[RowGroup] | None = None,
                   num_cpus: float = 0.5, decoders: int = 0, reserved_cpus: float = 0.0,
                   ahead_mb: float = 512):
    """A training stream: every epoch of `plans` (epoch -> plan, see `biovita.data.sampling`)
    in turn, rows tagged with their `epoch`.

    Each epoch's uses are put in a uniformly random order (`epoch_order`: a global shuffle)
    and cut into segments of whole `batch_size` batches; a decode task reads just the row
    groups holding its segment's media and returns the segment in order, so every batch the
    trainer gets is a run of that random order. Decoding runs on a fixed pool of `decoders`
    actors, which import torch once and keep their caches (as plain tasks, the worker
    processes sat idle whenever training was slower than decoding and the raylet killed and
    restarted them: ~3 new processes importing torch every 20 s, measured). No new task
    starts while more than `ahead_mb` of decoded data waits for the consumer. `frozen`: the
    frozen towers' embeddings by modality (`Vectors`, or an ObjectRef to such a dict) that
    rows get instead of running a tower (`biovita.data.decode.decode_audio_batch`)."""
    fs, _ = filesystem(table_uri(root, table))
    groups = row_groups(root, table) if groups is None else groups
    decoders = _decoders(decoders, num_cpus, reserved_cpus)
    orders = {e: epoch_order(plan, seed, spec.epoch + e) for e, plan in plans.items()}
    plan = stream_plan(groups, orders)
    rows = sum(len(g.ids) for g in groups)
    per_use = sum(g.nbytes for g in groups) / max(1, rows)
    items = [{"epoch": e, "start": a, "stop": b} for e, uses in orders.items()
             for a, b in segments(len(uses), batch_size, per_use, decoders)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    bound_decoding(ds.context, int(ahead_mb * 2**20))
    # segments leave in the epoch's order, not as their decoders finish: runs with equal
    # seeds see equal batches (Ray Train replaces these options with its DataConfig's, which
    # `biovita.train.driver` sets to keep the order too)
    ds.context.execution_options.preserve_order = True
    # the stream runs in Ray Train's coordinator: the trainer's progress line reports it
    ds.context.enable_progress_bars = False
    kwargs = {"fs": fs, "table": table, "spec": spec, "plan_box": _box(plan),
              "frozen_box": _box(frozen)}
    pool = ActorPoolStrategy(size=max(1, min(decoders, len(items))))  # an actor per item at most
    return ds.map_batches(_StreamDecoder, fn_constructor_kwargs=kwargs, batch_size=1,
                          batch_format="numpy", compute=pool, num_cpus=num_cpus)


def audio_dataset(root: str, spec: AudioDecodeSpec, split: str | None = "train", **kwargs):
    """Decoded clips of one split, one pass: {id, taxonomy..., species_id, wave (10 s, float16)}.
    Keyword arguments as `store_dataset`."""
    return store_dataset(root, "audio", spec, split, **kwargs)


def image_dataset(root: str, spec: ImageDecodeSpec, split: str | None = "train", **kwargs):
    """Decoded images of one split, one pass: {id, taxonomy..., species_id, pixels (3 x S x S
    uint8)}. Keyword arguments as `store_dataset`."""
    return store_dataset(root, "image", spec, split, **kwargs)


def decode_media_files(ds, table: str, spec, batch_size: int = 16, num_cpus: float = 0.5):
    """Decode a dataset whose rows hold media files (`id` + `bytes` columns, see
    `files_dataset`) into log-mels (`table="audio"`) or image pixels (`"image"`)."""
    return ds.map_batches(_decode_and_count, fn_args=(table, DECODERS[table]),
                          fn_kwargs={"spec": spec}, batch_size=batch_size, batch_format="numpy",
                          compute=TaskPoolStrategy(), num_cpus=num_cpus)


def read_files_batch(batch: dict[str, np.ndarray], base: str = "") -> dict[str, np.ndarray]:
    """Add a `bytes` column from the `file_path` column (relative to `base`). A file that is
    not there gets None, which the decoder counts as `missing_file`."""
    out = dict(batch)
    data = np.empty(len(batch["file_path"]), dtype=object)
    for k, p in enumerate(batch["file_path"]):
        try:
            with open(os.path.join(base, str(p)), "rb") as f:
                data[k] = f.read()
        except OSError:
            data[k] = None
    out["bytes"] = data
    return out


def files_dataset(rows: list[dict], base: str = "", batch_size: int = 32):
    """A dataset of media files on disk ({id, file_path} rows) with their bytes."""
    return ray.data.from_items(rows).map_batches(
        read_files_batch, fn_kwargs={"base": base}, batch_size=batch_size, batch_format="numpy",
        compute=TaskPoolStrategy(), num_cpus=0.25)


class TorchCollate(NumpyBatchCollateFn):
    """Numeric columns -> tensors; strings stay lists (iter_torch_batches cannot tensorise
    them); `epoch` becomes the batch's oldest epoch, a plain int (the loop reads it every
    step, and a tensor read would be a host sync on the device it is moved to)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for k, v in batch.items():
            if k == "epoch":
                out[k] = int(v.min())
            elif v.dtype.kind in "fiub":
                out[k] = torch.from_numpy(np.array(v))  # Ray's buffers are read-only: copy
            else:
                out[k] = [str(x) for x in v]
        return out
