"""What a frozen tower computes, made once on Ray Data and kept beside the store.

A stage that freezes a tower need not run it in its steps: the image tower is frozen in every
stage and its eval transform is deterministic, so an image's embedding is the same in every
epoch; the text tower is frozen in stage 1 and phase 1, whose prompts are five templates per
species. Their embeddings are made once and cached as Parquet under `<store>/_embeddings/`,
keyed by the tower's weights (the SHA-256 of its tensors), its front end and the rows
embedded, so later stages, runs and sweeps, the benchmark, the gallery and the trait probe
reuse them. A trained audio tower's embeddings (onset crops, as the benchmark decodes) are
cached the same way for the benchmark, the gallery and the probe of that model.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from biovita.data.decode import STATS_ACTOR
from biovita.data.schema import SPLITS
from biovita.data.store import fetch_dir, read_table
from biovita.data.validate import check_store
from biovita.data.vectors import Vectors, read_vectors, write_vectors
from biovita.embed.service import collect, embed_dataset, embed_files, embed_texts
from biovita.frontends.audio import AUDIO_EXTS
from biovita.frontends.image import MAX_IMAGE_PIXELS
from biovita.models.checkpoint import read_meta, resolve_checkpoint, towers
from biovita.runtime import init_ray

CACHE_FOLDER = "_embeddings"
TOWER_OF_TABLE = {"audio": "audio", "image": "image"}


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_uri(root: str, name: str) -> str:
    """Beside a store: `<store>/_embeddings/<name>.parquet` (on object storage too)."""
    return f"{str(root).rstrip('/')}/{CACHE_FOLDER}/{name}.parquet"


def _fallback_uri(root: str, name: str) -> str:
    """Where a cache goes when the store is read-only to this job."""
    folder = Path.home() / ".cache" / "biovita" / "embeddings" / _digest(str(root))
    return str(folder / f"{name}.parquet")


def _cached(root: str, name: str, make) -> Vectors:
    """The cache named `name` of a store, made with `make()` (and timed) when missing."""
    for uri in (cache_uri(root, name), _fallback_uri(root, name)):
        found = read_vectors(uri)
        if found is not None:
            return found
    t0 = time.time()
    made = make()
    made.seconds = time.time() - t0
    try:
        write_vectors(made, cache_uri(root, name))
    except OSError:
        write_vectors(made, _fallback_uri(root, name))
    return made


def _workers(use_gpu: bool) -> int:
    """Embedding actors: a GPU each where asked (all the cluster has), else one."""
    return max(1, int(ray.cluster_resources().get("GPU", 0))) if use_gpu else 1


def store_embeddings(root: str, checkpoint: str, table: str, split: str | None = None, *,
                     use_gpu: bool = False, decode_cpus: float = 0.5, reduced_images: bool = True,
                     max_image_pixels: int = MAX_IMAGE_PIXELS, stats_name: str | None = STATS_ACTOR
                     ) -> Vectors:
    """The checkpoint's embeddings of every medium of one store table (`split`, or every
    split), decoded as the benchmark decodes them (onset crop, eval preprocessing). Cached
    per split under the tower's digest, its front end, the decode settings and the split's
    ids: a store that gains rows gets a new cache. Undecodable media have no row (and are
    counted in the job's media stats, `stats_name`)."""
    if split is None:
        return Vectors.concat([store_embeddings(
            root, checkpoint, table, s, use_gpu=use_gpu, decode_cpus=decode_cpus,
            reduced_images=reduced_images, max_image_pixels=max_image_pixels,
            stats_name=stats_name) for s in SPLITS])
    local = fetch_dir(checkpoint)
    tower = TOWER_OF_TABLE[table]
    meta = read_tower_meta(local, tower)
    t = read_table(root, table, ["id", "split"]).to_pydict()
    ids = sorted(i for i, s in zip(t["id"], t["split"]) if s == split)
    settings = {"reduced": reduced_images, "max_pixels": max_image_pixels} if table == "image" else {}
    name = f"{table}-{split}-{_digest(meta, settings, ids)}"

    def make() -> Vectors:
        if not ids:
            return Vectors([], [])
        init_ray()
        return collect(embed_dataset(checkpoint, root, table, split, max_image_pixels=max_image_pixels,
                                     use_gpu=use_gpu, actors=_workers(use_gpu), stats_name=stats_name,
                                     decode_cpus=decode_cpus, reduced_images=reduced_images))

    return _cached(root, name, make)


def read_tower_meta(checkpoint_dir: str, tower: str) -> dict:
    """What a tower's embeddings depend on: its weights' digest and its front end (text:
    the tokenizer's settings)."""
    arch = read_meta(checkpoint_dir)["arch"]
    front = (arch["clip_config"].get("text_cfg", {}) if tower == "text"
             else arch[f"{tower}_front_end"])
    return {"tower": tower, "weights": towers(checkpoint_dir)[tower], "front_end": front}


def prompt_embeddings(root: str, checkpoint: str, prompts: Sequence[str], use_gpu: bool = False
                      ) -> Vectors:
    """The checkpoint's text-tower embeddings of `prompts` (each id is its prompt), cached
    beside the store the prompts come from."""
    prompts = sorted(set(prompts))
    name = f"text-{_digest(read_tower_meta(fetch_dir(checkpoint), 'text'), prompts)}"

    def make() -> Vectors:
        init_ray()
        return collect(embed_texts(checkpoint, prompts, use_gpu, _workers(use_gpu)))

    return _cached(root, name, make)


def gallery_embeddings(root: str, checkpoint: str, use_gpu: bool = False) -> dict[str, Vectors]:
    """A store's recordings and photos as a checkpoint embeds them (every split): what a
    service searches and the trait probe reads; shared with the benchmark's test split and
    with training's image embeddings."""
    return {table: store_embeddings(root, checkpoint, table, use_gpu=use_gpu)
            for table in ("audio", "image")}


def embed_to_parquet(checkpoint: str, out: str, data: str | None = None,
                     files: Sequence[str] | None = None, clap: str | None = None) -> int:
    """`biovita embed`: the embeddings of a whole store (through the cache) or of files, on
    Ray Data; any checkpoint layout. One Parquet file: id, modality, species_id, embedding."""
    if data:
        check_store(data).require(["audio", "image"], "embedding")  # before Ray starts
    checkpoint = resolve_checkpoint(checkpoint, clap=clap)
    init_ray()
    tables = []
    for modality in ("audio", "image"):
        if data:
            v = store_embeddings(data, checkpoint, modality)
        else:
            chosen = [f for f in files or []
                      if (Path(f).suffix.lower() in AUDIO_EXTS) == (modality == "audio")]
            if not chosen:
                continue
            rows = [{"id": str(Path(f).resolve()), "file_path": str(Path(f).resolve())} for f in chosen]
            v = collect(embed_files(rows, checkpoint, modality))
        tables.append(pa.table({
            "id": pa.array(v.ids, pa.string()), "modality": pa.array([modality] * len(v)),
            "species_id": pa.array(v.species, pa.int32()),
            "embedding": pa.array(list(v.vectors), pa.list_(pa.float32()))}))
    table = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})
    pq.write_table(table, out)
    return table.num_rows

