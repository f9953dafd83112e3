"""Ray Data datasets of a store: Parquet -> decoded log-mels / uint8 images, streaming.

Decoding runs in Ray Data `map_batches`, a few Parquet row groups per call (tasks for a
single pass, a fixed actor pool for a training stream), so it spreads over every CPU of the
cluster while the GPUs train. Dropped media are counted by reason (`biovita.data.stats`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data.collate_fn import NumpyBatchCollateFn

from biovita.data import stats
from biovita.data.decode import (
    AudioDecodeSpec,
    ImageDecodeSpec,
    decode_audio_batch,
    decode_image_batch,
)
from biovita.data.planning import RowGroup, decode_tasks, row_groups, select_row_groups
from biovita.data.ray_patches import bound_decoding, shorten_completion_wait
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
    import pyarrow.compute as pc

    t = f.read_row_group(index)
    if split is not None:
        t = t.filter(pc.equal(t.column("split"), split))
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def _read_then_decode(items: dict[str, np.ndarray], fs, table: str, split: str | None, decode,
                      spec, plans_box: list | None = None, image_emb_box: list | None = None):
    """One task (one item: a list of row groups) -> a batch of decoded rows per row group, so
    a task holds one row group's media at a time. An item of an epoch stream decodes with that
    epoch's plan and seeds and tags its rows with the epoch."""
    plans = _get_shared(plans_box)
    epoch = int(items["epoch"][0]) if "epoch" in items else 0
    spec, plan = replace(spec, epoch=spec.epoch + epoch), None if plans is None else plans[epoch]
    kwargs = {"image_emb": _get_shared(image_emb_box)} if image_emb_box is not None else {}
    files: dict[str, pq.ParquetFile] = {}  # a task's row groups often share a file: one footer read
    for path, index in zip(items["path"][0], items["row_group"][0]):
        path = str(path)
        if path not in files:
            files[path] = pq.ParquetFile(path, filesystem=fs)
        rows = _read_row_group(files[path], int(index), split)
        out = _decode_and_count(rows, table, decode, spec, plan, **kwargs)
        if "epoch" in items:
            out["epoch"] = np.full(len(out["id"]), epoch, np.int64)
        yield out


class _StreamDecoder:
    """A decode actor of an epoch stream (see `store_dataset`)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, items: dict[str, np.ndarray]):
        yield from _read_then_decode(items, **self.kwargs)


def store_dataset(root: str, table: str, spec, split: str | None = None,
                  plans: list[dict] | dict[int, dict] | None = None, image_emb=None,
                  groups: list[RowGroup] | None = None, order_seed: tuple[int, ...] | None = None,
                  num_cpus: float = 0.5, decoders: int = 0, reserved_cpus: float = 0.0,
                  ahead_mb: float = 512):
    """Stream one table of the store (local folder or object-store URI), decoded.

    One Ray Data task (or actor call) reads and decodes a few consecutive Parquet row groups
    (`decode_tasks`): reading and decoding are a single operator, so every CPU Ray gives the
    dataset decodes, no encoded bytes travel through the object store, and row groups that
    hold no row of `split` or of the plan are never read.

    With `plans` (one per epoch, or epoch -> plan) the dataset is a training stream: every
    epoch in turn, each with its plan and a row-group order drawn from `order_seed` and the
    epoch, rows tagged with their `epoch`. A stream decodes on a fixed pool of `decoders`
    actors, which import torch once and keep their caches; as plain tasks, the worker
    processes sat idle whenever training was slower than decoding and the raylet killed and
    restarted them (~3 new processes importing torch every 20 s, measured). A single pass
    (no plans) runs up to `decoders` tasks at once on Ray's shared workers.
    `decoders` 0: (the cluster's CPUs, counted now, - `reserved_cpus`) / `num_cpus`; set it on
    an autoscaling cluster (a larger pool asks the autoscaler for the CPUs). No new decode
    task starts while more than `ahead_mb` of decoded data waits for the consumer."""
    fs, _ = filesystem(table_uri(root, table))
    groups = row_groups(root, table) if groups is None else groups
    if not decoders:
        cpus = ray.cluster_resources().get("CPU", 1) - reserved_cpus
        decoders = max(1, int(cpus / num_cpus))

    def task_items(selected: list[RowGroup], **extra) -> list[dict]:
        return [{"path": [g.path for g in task], "row_group": [g.index for g in task], **extra}
                for task in decode_tasks(selected, decoders)]

    if plans is None:
        items = task_items(select_row_groups(groups, split, None, order_seed))
    else:
        plans = dict(enumerate(plans)) if isinstance(plans, list) else plans  # epoch -> plan
        items = [item for e, plan in plans.items()
                 for item in task_items(select_row_groups(
                     groups, split, plan, None if order_seed is None else (*order_seed, e)), epoch=e)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    bound_decoding(ds.context, int(ahead_mb * 2**20))
    if plans is not None:  # a training stream runs in Ray Train's coordinator: the trainer's
        ds.context.enable_progress_bars = False  # progress line reports it instead
    decode = decode_audio_batch if table == "audio" else decode_image_batch
    kwargs = {"fs": fs, "table": table, "split": split, "decode": decode, "spec": spec,
              "plans_box": _box(plans), "image_emb_box": _box(image_emb)}
    if plans is None:
        shorten_completion_wait()  # the driver's executor runs a single pass
        return ds.map_batches(_read_then_decode, fn_kwargs=kwargs, batch_size=1, batch_format="numpy",
                              compute=TaskPoolStrategy(size=max(1, min(decoders, len(items)))),
                              num_cpus=num_cpus)
    pool = ActorPoolStrategy(size=max(1, min(decoders, len(items))))  # an actor per item at most
    return ds.map_batches(_StreamDecoder, fn_constructor_kwargs=kwargs, batch_size=1,
                          batch_format="numpy", compute=pool, num_cpus=num_cpus)


def audio_dataset(root: str, spec: AudioDecodeSpec, split: str | None = "train", **kwargs):
    """Decoded clips: {id, taxonomy..., species_id, mel (1 x T x 64)[, text][, image_emb][, epoch]}.
    Keyword arguments as `store_dataset`."""
    return store_dataset(root, "audio", spec, split, **kwargs)


def image_dataset(root: str, spec: ImageDecodeSpec, split: str | None = "train", **kwargs):
    """Decoded images: {id, taxonomy..., species_id, pixels (3 x S x S uint8)[, text][, epoch]}.
    Keyword arguments as `store_dataset` (no `image_emb`)."""
    return store_dataset(root, "image", spec, split, **kwargs)


def decode_media_files(ds, table: str, spec, batch_size: int = 16, num_cpus: float = 0.5):
    """Decode a dataset whose rows hold media files (`id` + `bytes` columns, see
    `files_dataset`) into log-mels (`table="audio"`) or image pixels (`"image"`)."""
    decode = decode_audio_batch if table == "audio" else decode_image_batch
    return ds.map_batches(_decode_and_count, fn_args=(table, decode),
                          fn_kwargs={"spec": spec}, batch_size=batch_size, batch_format="numpy",
                          compute=TaskPoolStrategy(), num_cpus=num_cpus)


def read_files_batch(batch: dict[str, np.ndarray], base: str = "") -> dict[str, np.ndarray]:
    """Add a `bytes` column from the `file_path` column (relative to `base`). An unreadable
    file gets empty bytes, which the decoder then counts as `empty_file`."""
    out = dict(batch)
    data = []
    for p in batch["file_path"]:
        path = os.path.join(base, str(p))
        try:
            with open(path, "rb") as f:
                data.append(f.read())
        except OSError:
            data.append(b"")
    out["bytes"] = np.asarray(data, dtype=object)
    return out


def files_dataset(rows: list[dict], base: str = "", batch_size: int = 32):
    """A dataset of media files on disk ({id, file_path} rows) with their bytes."""
    return ray.data.from_items(rows).map_batches(
        read_files_batch, fn_kwargs={"base": base}, batch_size=batch_size, batch_format="numpy",
        compute=TaskPoolStrategy(), num_cpus=0.25)


class TorchCollate(NumpyBatchCollateFn):
    """Numeric columns -> tensors; strings stay lists (iter_torch_batches cannot tensorise them)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {}
        for k, v in batch.items():
            if v.dtype.kind in "fiub":
                out[k] = torch.from_numpy(np.array(v))  # Ray's buffers are read-only: copy
            else:
                out[k] = [str(x) for x in v]
        return out
