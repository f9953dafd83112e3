"""Ray Data pipelines: Parquet -> decoded log-mel spectrograms / image tensors, streaming.

Decoding runs in Ray Data tasks (`map_batches` with a `TaskPoolStrategy`), so it spreads over
every CPU of the cluster while the GPUs train. Bad media is dropped inside the task and
counted by reason in a named `MediaStats` actor that the trainer and `biovita validate` read;
nothing is ever replaced by silence or a blank image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray.data import TaskPoolStrategy
from ray.data.collate_fn import NumpyBatchCollateFn

from biovita.audio import AudioFrontEnd, load_clip, log_mel
from biovita.data.sampling import stable_hash
from biovita.data.store import filesystem, table_uri
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
        _CACHE.clear()
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
    batch: dict[str, np.ndarray], spec: AudioDecodeSpec, plan_box: list | None = None,
    image_emb_box: list | None = None,
) -> dict[str, np.ndarray]:
    """Decode a batch of clips. With a plan, each row is used as many times as the plan says
    (0 = dropped before decoding); a stage-2 plan also attaches the paired image embedding."""
    plan = _get_shared(plan_box)
    image_emb = _get_shared(image_emb_box)
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
        out["mel"] = log_mel(fe)(np.stack(waves)).numpy()
    if spec.prompts != "none":
        out["text"] = np.asarray(
            [_prompt({c: batch[c][i] for c in cols}, spec, k) for i, k, _ in out_rows], dtype=object)
    if image_emb is not None:
        index, matrix = image_emb
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
    batch: dict[str, np.ndarray], spec: ImageDecodeSpec, plan_box: list | None = None
) -> dict[str, np.ndarray]:
    plan = _get_shared(plan_box)
    fe = spec.front_end
    cols = [c for c in batch if c != "bytes"]
    pixels, rows, bad = [], [], []
    for i in range(len(batch["id"])):
        media_id = str(batch["id"][i])
        uses = 1 if plan is None else int(plan.get(media_id, 0))
        if uses == 0:
            continue
        try:
            x = load_image(batch["bytes"][i], fe, spec.max_pixels).numpy()
        except MediaError as e:
            bad.append((media_id, e.reason))
            continue
        for k in range(uses):
            pixels.append(x)
            rows.append((i, k))
    _report(spec.stats_name, "image", len({r[0] for r in rows}), bad)
    out: dict[str, Any] = {c: np.asarray([batch[c][i] for i, _ in rows]) for c in cols}
    out["pixels"] = (np.stack(pixels) if pixels else
                     np.zeros((0, 3, fe.image_size, fe.image_size), np.float32))
    if spec.prompts != "none":
        out["text"] = np.asarray(
            [_prompt({c: batch[c][i] for c in cols}, spec, k) for i, k in rows], dtype=object)
    return out


# ----------------------------------------------------------------------------- datasets


def read_media(root: str, table: str, split: str | None = None, columns: list[str] | None = None):
    """Stream one table of the store (local folder or object-store URI) as a Ray Dataset."""
    from ray.data.expressions import col

    fs, path = filesystem(table_uri(root, table))
    kwargs: dict[str, Any] = {"filesystem": fs}
    if columns is not None:
        kwargs["columns"] = columns
    ds = ray.data.read_parquet(path, **kwargs)
    if split is not None:  # an Arrow predicate: Ray pushes it down into the Parquet read
        ds = ds.filter(expr=col("split") == split)
    return ds


def _box(obj: Any) -> list | None:
    # a one-element list keeps Ray from resolving the ref eagerly into every task's arguments
    return None if obj is None else [ray.put(obj)]


def decode_audio(ds, spec: AudioDecodeSpec, plan: dict | None = None,
                 image_emb: tuple[dict[str, int], np.ndarray] | None = None, batch_size: int = 16,
                 num_cpus: float = 0.5):
    """Decode a dataset with `id` + `bytes` columns into log-mels (see decode_audio_batch)."""
    return ds.map_batches(
        decode_audio_batch,
        fn_kwargs={"spec": spec, "plan_box": _box(plan), "image_emb_box": _box(image_emb)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(),
        num_cpus=num_cpus,
    )


def decode_images(ds, spec: ImageDecodeSpec, plan: dict | None = None, batch_size: int = 32,
                  num_cpus: float = 0.5):
    """Decode a dataset with `id` + `bytes` columns into image tensors."""
    return ds.map_batches(
        decode_image_batch,
        fn_kwargs={"spec": spec, "plan_box": _box(plan)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=TaskPoolStrategy(),
        num_cpus=num_cpus,
    )


def audio_dataset(
    root: str, spec: AudioDecodeSpec, split: str | None = "train", plan: dict | None = None,
    image_emb: tuple[dict[str, int], np.ndarray] | None = None, batch_size: int = 16,
    num_cpus: float = 0.5,
):
    """Decoded clips: {id, taxonomy..., species_id, mel (1 x T x 64)[, text][, image_emb]}."""
    return decode_audio(read_media(root, "audio", split), spec, plan, image_emb, batch_size, num_cpus)


def image_dataset(
    root: str, spec: ImageDecodeSpec, split: str | None = "train", plan: dict | None = None,
    batch_size: int = 32, num_cpus: float = 0.5,
):
    """Decoded images: {id, taxonomy..., species_id, pixels (3 x S x S)[, text]}."""
    return decode_images(read_media(root, "image", split), spec, plan, batch_size, num_cpus)


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
