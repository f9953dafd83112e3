"""Ray Data pipelines: Parquet -> decoded log-mel spectrograms / uint8 images, streaming.

Decoding runs in Ray Data `map_batches`, a few Parquet row groups per call (tasks for a
single pass, a fixed actor pool for a training stream), so it spreads over every CPU of the
cluster while the GPUs train. Bad media is dropped inside the decoder and counted by reason in
a named `MediaStats` actor that the trainer and `biovita validate` read; nothing is ever
replaced by silence or a blank image.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data._internal.execution import streaming_executor_state
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.backpressure_policy import (
    ENABLED_BACKPRESSURE_POLICIES,
    ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY,
    BackpressurePolicy,
    DownstreamCapacityBackpressurePolicy,
)
from ray.data._internal.execution.operators.map_operator import MapOperator
from ray.data.collate_fn import NumpyBatchCollateFn

from biovita.audio import AudioFrontEnd, load_clip, log_mel
from biovita.data.sampling import stable_hash
from biovita.data.store import filesystem, table_files, table_uri
from biovita.errors import MediaError
from biovita.image import ImageFrontEnd, load_image
from biovita.prompts import Taxon

STATS_ACTOR = "biovita-media-stats"


@ray.remote(num_cpus=0)
class MediaStats:
    """Dropped media by table and reason. Counted once per media id, however many epochs
    decode it again; `good` counts successful decodes."""

    def __init__(self) -> None:
        self.bad: dict[str, dict[str, set[str]]] = {}
        self.good: dict[str, int] = {}
        self.nodes: dict[str, set[str]] = {}  # role (decode / train) -> Ray node ids

    def add_node(self, role: str, node_id: str) -> None:
        self.nodes.setdefault(role, set()).add(node_id)

    def add(self, table: str, good: int, bad: list[tuple[str, str]], node_id: str = "") -> None:
        if node_id:
            self.add_node("decode", node_id)
        self.good[table] = self.good.get(table, 0) + good
        per = self.bad.setdefault(table, {})
        for media_id, reason in bad:
            per.setdefault(reason, set()).add(media_id)

    def snapshot(self) -> dict[str, Any]:
        return {
            "good": dict(self.good),
            "bad": {t: {r: len(ids) for r, ids in per.items()} for t, per in self.bad.items()},
            "examples": {f"{t}:{r}": sorted(ids)[:5] for t, per in self.bad.items()
                         for r, ids in per.items()},
            "nodes": {role: sorted(ids) for role, ids in self.nodes.items()},
        }

    def reset(self) -> None:
        self.__init__()


_HANDLES: dict[str, Any] = {}


def media_stats(name: str = STATS_ACTOR):
    """The named stats actor; the driver creates it and owns it (it ends with the job). The
    handle is kept here: a named actor whose last handle goes away is destroyed."""
    if name not in _HANDLES:
        _HANDLES[name] = MediaStats.options(name=name, get_if_exists=True).remote()
    return _HANDLES[name]


def bad_media_counts(name: str = STATS_ACTOR) -> dict[str, Any]:
    return ray.get(ray.get_actor(name).snapshot.remote())


def _report(stats_name: str | None, table: str, good: int, bad: list[tuple[str, str]]) -> None:
    if not stats_name:
        return
    if stats_name not in _HANDLES:  # one lookup per worker process, not one per batch
        try:
            _HANDLES[stats_name] = ray.get_actor(stats_name)
        except ValueError:  # nobody asked for counts (no stats actor): decoding goes on regardless
            return
    _HANDLES[stats_name].add.remote(table, good, bad, ray.get_runtime_context().get_node_id())


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


# ----------------------------------------------------------------------------- decode functions


def _prompt(row: dict, spec: Any, use: int) -> str:
    """A prompt per sample: a random template (seeded per epoch, id and use) or one per species."""
    if spec.prompts == "fixed":
        rng = np.random.default_rng([spec.seed, int(row["species_id"]), 5])
    else:
        rng = np.random.default_rng([spec.seed, spec.epoch, stable_hash(str(row["id"])), use, 3])
    return Taxon.from_row(row).random_prompt(rng)


@dataclass(frozen=True)
class AudioDecodeSpec:
    front_end: AudioFrontEnd = field(default_factory=AudioFrontEnd)
    mode: str = "random"  # random (train) | onset (eval)
    seed: int = 0
    epoch: int = 0
    prompts: str = "random"  # random template per sample | fixed (one per species) | none
    stats_name: str | None = STATS_ACTOR


def decode_audio_batch(
    batch: dict[str, np.ndarray], spec: AudioDecodeSpec, plan: dict | None = None,
    image_emb: tuple[dict[str, int], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Decode a batch of clips. With a plan, each row is used as many times as the plan says
    (0 = dropped before decoding); a stage-2 plan also attaches the paired image embedding."""
    fe = spec.front_end
    waves, out_rows, bad = [], [], []
    cols = [c for c in batch if c != "bytes"]
    for i in range(len(batch["id"])):
        media_id = str(batch["id"][i])
        if plan is None:
            uses: list = [None]
        else:
            uses = plan.get(media_id, 0)
            uses = [None] * uses if isinstance(uses, int) else list(uses)
            if not uses:
                continue
        try:
            for k, extra in enumerate(uses):
                rng = np.random.default_rng([spec.seed, spec.epoch, stable_hash(media_id), k])
                waves.append(load_clip(batch["bytes"][i], fe, spec.mode, rng))
                out_rows.append((i, k, extra))
        except MediaError as e:
            bad.append((media_id, e.reason))
    _report(spec.stats_name, "audio", len({r[0] for r in out_rows}), bad)
    out: dict[str, Any] = {c: np.asarray([batch[c][i] for i, _, _ in out_rows]) for c in cols}
    if not out_rows:
        out["mel"] = np.zeros((0, 1, fe.n_frames, fe.n_mels), np.float32)
    else:
        out["mel"] = log_mel(fe)(waves).numpy()
    if spec.prompts != "none":
        out["text"] = np.asarray(
            [_prompt({c: batch[c][i] for c in cols}, spec, k) for i, k, _ in out_rows], dtype=object)
    if image_emb is not None:
        index, matrix = image_emb[0], image_emb[1]  # (id -> row, embeddings[, species])
        out["image_emb"] = (
            np.stack([matrix[index[extra]] for _, _, extra in out_rows]).astype(np.float32)
            if out_rows else np.zeros((0, matrix.shape[1]), np.float32)
        )
    return out


@dataclass(frozen=True)
class ImageDecodeSpec:
    front_end: ImageFrontEnd = field(default_factory=ImageFrontEnd)
    max_pixels: int = 50_000_000
    seed: int = 0
    epoch: int = 0
    prompts: str = "random"
    stats_name: str | None = STATS_ACTOR


def decode_image_batch(
    batch: dict[str, np.ndarray], spec: ImageDecodeSpec, plan: dict | None = None
) -> dict[str, np.ndarray]:
    fe = spec.front_end
    cols = [c for c in batch if c != "bytes"]
    pixels, rows, bad = [], [], []
    for i in range(len(batch["id"])):
        media_id = str(batch["id"][i])
        uses = 1 if plan is None else int(plan.get(media_id, 0))
        if uses == 0:
            continue
        try:
            x = load_image(batch["bytes"][i], fe, spec.max_pixels)
        except MediaError as e:
            bad.append((media_id, e.reason))
            continue
        for k in range(uses):
            pixels.append(x)
            rows.append((i, k))
    _report(spec.stats_name, "image", len({r[0] for r in rows}), bad)
    out: dict[str, Any] = {c: np.asarray([batch[c][i] for i, _ in rows]) for c in cols}
    out["pixels"] = (np.stack(pixels) if pixels else
                     np.zeros((0, 3, fe.image_size, fe.image_size), np.uint8))
    if spec.prompts != "none":
        out["text"] = np.asarray(
            [_prompt({c: batch[c][i] for c in cols}, spec, k) for i, k in rows], dtype=object)
    return out


# ----------------------------------------------------------------------------- datasets


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


def _read_row_group(f: pq.ParquetFile, index: int, split: str | None) -> dict[str, np.ndarray]:
    """The rows of one row group (of `split` only), as columns."""
    import pyarrow.compute as pc

    t = f.read_row_group(index)
    if split is not None:
        t = t.filter(pc.equal(t.column("split"), split))
    return {c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names}


def _read_then_decode(items: dict[str, np.ndarray], fs, split: str | None, decode, spec,
                      plans_box: list | None = None, image_emb_box: list | None = None):
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
        out = decode(_read_row_group(files[path], int(index), split), spec, plan, **kwargs)
        if "epoch" in items:
            out["epoch"] = np.full(len(out["id"]), epoch, np.int64)
        yield out


DECODE_AHEAD_KEY = "biovita.decode_ahead_bytes"


class DecodeAhead(BackpressurePolicy):
    """Hold back new decode tasks while decoded, not yet consumed data (queued in the
    dataset and prefetched by its consumers) exceeds `decode_ahead_bytes`; never hold back
    reading the outputs of finished tasks.

    Replaces Ray Data's downstream-capacity policy, which also stops reading finished
    outputs: those tasks then stay ready, `ray.wait` in the executor's loop returns at once,
    and the loop spins on a full core for as long as the consumer is slower than decoding
    (measured: the SplitCoordinator at ~90% CPU on 2 cores, the trainer beside it slowed
    3-6x). That policy also bounded nothing when the consumer was a plain iterator."""

    def can_add_input(self, op) -> bool:
        limit = self._data_context.get_config(DECODE_AHEAD_KEY)
        if limit is None or not isinstance(op, MapOperator):
            return True
        rm = self._resource_manager
        return rm.get_global_usage().object_store_memory + rm.get_external_consumer_bytes() < limit


class IdleWait(ExecutionCallback):
    """Sleep a scheduling-loop step that had no task to wait for.

    Ray Data's loop blocks only in `ray.wait` on running tasks; while dispatch is held back
    and no task runs (the consumer is slower than decoding, the common case when training
    on CPU) it would spin on a full core."""

    SLEEP_S = 0.05

    def on_execution_step(self, executor) -> None:
        if not any(op.get_active_tasks() for op in executor._topology):
            time.sleep(self.SLEEP_S)


BACKPRESSURE_POLICIES = [p for p in ENABLED_BACKPRESSURE_POLICIES
                         if p is not DownstreamCapacityBackpressurePolicy] + [DecodeAhead]


COMPLETION_WAIT_S = 0.02


def shorten_completion_wait() -> None:
    """Let this process's Ray Data executor hand out the next decode task within 20 ms of one
    finishing, not 100 ms.

    Its loop blocks in `ray.wait(<every running task>, timeout=0.1)`, which returns early only
    when all of them are done, and a task takes two loop steps to retire (its block, then its
    end). With two decode tasks of ~0.3 s on two CPUs each worker sat idle ~170 ms between
    tasks: a third of the CPU (measured; 128 -> 157 clips/s with 20 ms). Actor pools (training
    streams) queue a second task on each actor and never had the gap. The loop itself costs
    little per step (driver CPU 0.26 -> 0.29 s a pass)."""
    name = "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"
    current = getattr(streaming_executor_state, name, None)
    if current is None:  # a Ray upgrade moved it: decoding still works, with the gaps
        return
    setattr(streaming_executor_state, name, min(current, COMPLETION_WAIT_S))


class _StreamDecoder:
    """A decode actor of an epoch stream (see `store_dataset`)."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def __call__(self, items: dict[str, np.ndarray]):
        yield from _read_then_decode(items, **self.kwargs)


def store_dataset(root: str, table: str, decode, spec, split: str | None = None,
                  plans: list[dict] | dict[int, dict] | None = None, image_emb=None,
                  groups: list[RowGroup] | None = None, order_seed: tuple[int, ...] | None = None,
                  num_cpus: float = 0.5, decoders: int = 0, reserved_cpus: float = 0.0,
                  ahead_mb: float = 512):
    """Stream one table of the store (local folder or object-store URI) through `decode`.

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
    # Ray Data's per-operator resource reservation counts the CPU-less input operator as a
    # claimant: the decode operator then ran ~1.4 tasks on 2 CPUs. The pool size bounds the
    # decoders instead, and `DecodeAhead` how far they run ahead of the consumer.
    ds.context.op_resource_reservation_enabled = False
    ds.context.set_config(ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY, BACKPRESSURE_POLICIES)
    ds.context.set_config(DECODE_AHEAD_KEY, int(ahead_mb * 2**20))
    ds.context.custom_execution_callback_classes = [IdleWait]
    kwargs = {"fs": fs, "split": split, "decode": decode, "spec": spec,
              "plans_box": _box(plans), "image_emb_box": _box(image_emb)}
    if plans is None:
        shorten_completion_wait()  # the driver's executor runs a single pass
        return ds.map_batches(_read_then_decode, fn_kwargs=kwargs, batch_size=1,
                              batch_format="numpy", compute=TaskPoolStrategy(size=decoders),
                              num_cpus=num_cpus)
    pool = ActorPoolStrategy(size=max(1, min(decoders, len(items))))  # an actor per item at most
    return ds.map_batches(_StreamDecoder, fn_constructor_kwargs=kwargs, batch_size=1,
                          batch_format="numpy", compute=pool,
                          num_cpus=num_cpus)


def _box(obj: Any) -> list | None:
    # a one-element list keeps Ray from resolving the ref eagerly into every task's arguments
    if obj is None:
        return None
    return [obj if isinstance(obj, ray.ObjectRef) else ray.put(obj)]


def decode_audio(ds, spec: AudioDecodeSpec, batch_size: int = 16, num_cpus: float = 0.5):
    """Decode a dataset with `id` + `bytes` columns (media files) into log-mels."""
    return ds.map_batches(decode_audio_batch, fn_kwargs={"spec": spec}, batch_size=batch_size,
                          batch_format="numpy", compute=TaskPoolStrategy(), num_cpus=num_cpus)


def decode_images(ds, spec: ImageDecodeSpec, batch_size: int = 32, num_cpus: float = 0.5):
    """Decode a dataset with `id` + `bytes` columns (media files) into image tensors."""
    return ds.map_batches(decode_image_batch, fn_kwargs={"spec": spec}, batch_size=batch_size,
                          batch_format="numpy", compute=TaskPoolStrategy(), num_cpus=num_cpus)


def audio_dataset(
    root: str, spec: AudioDecodeSpec, split: str | None = "train",
    plans: list[dict] | dict[int, dict] | None = None,
    image_emb: tuple[dict[str, int], np.ndarray] | None = None, num_cpus: float = 0.5,
    groups: list[RowGroup] | None = None, order_seed: tuple[int, ...] | None = None,
    decoders: int = 0, reserved_cpus: float = 0.0, ahead_mb: float = 512,
):
    """Decoded clips: {id, taxonomy..., species_id, mel (1 x T x 64)[, text][, image_emb][, epoch]}."""
    return store_dataset(root, "audio", decode_audio_batch, spec, split, plans, image_emb, groups,
                         order_seed, num_cpus, decoders, reserved_cpus, ahead_mb)


def image_dataset(
    root: str, spec: ImageDecodeSpec, split: str | None = "train",
    plans: list[dict] | dict[int, dict] | None = None,
    num_cpus: float = 0.5, groups: list[RowGroup] | None = None,
    order_seed: tuple[int, ...] | None = None, decoders: int = 0, reserved_cpus: float = 0.0,
    ahead_mb: float = 512,
):
    """Decoded images: {id, taxonomy..., species_id, pixels (3 x S x S uint8)[, text][, epoch]}."""
    return store_dataset(root, "image", decode_image_batch, spec, split, plans, None, groups,
                         order_seed, num_cpus, decoders, reserved_cpus, ahead_mb)


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


def init_ray(num_cpus: int | None = None, object_store_memory: int | None = None, **kwargs):
    """Join the cluster when there is one (RAY_ADDRESS / a running head), else start locally."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
        return
    try:
        ray.init(address="auto", **kwargs)
    except ConnectionError:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, **kwargs)
