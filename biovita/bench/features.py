"""Feature extraction with Ray Data batch inference: one model per actor, GPU actors when GPUs
exist. The benchmark, stage 2 (frozen image embeddings) and `biovita embed` use it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from ray.data import ActorPoolStrategy

from biovita.data.datasets import audio_dataset, decode_media_files, files_dataset, image_dataset
from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec
from biovita.data.store import fetch_dir
from biovita.frontends.audio import AUDIO_EXTS
from biovita.frontends.image import MAX_IMAGE_PIXELS
from biovita.models.checkpoint import read_meta

KEEP = ("id", "species_id")


class Embedder:
    """Callable class for `map_batches`: loads the checkpoint once per actor."""

    def __init__(self, checkpoint: str, modality: str, use_gpu: bool = False):
        import torch

        from biovita.models.checkpoint import load_biovita

        self.device = "cuda" if (use_gpu and torch.cuda.is_available()) else "cpu"
        self.model = load_biovita(fetch_dir(checkpoint)).to(self.device).eval()
        self.modality = modality

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            x = torch.from_numpy(np.array(batch["mel" if self.modality == "audio" else "pixels"]))
            x = x.to(self.device)  # (Ray's buffers are read-only: copied above)
            emb = self.model.encode_audio(x) if self.modality == "audio" else self.model.encode_image(x)
        out = {k: batch[k] for k in KEEP if k in batch}
        out["embedding"] = emb.float().cpu().numpy()
        return out


def front_ends(checkpoint: str):
    """(audio, image) front ends of a checkpoint, from its JSON alone (no weights read)."""
    from biovita.frontends.audio import AudioFrontEnd
    from biovita.frontends.image import ImageFrontEnd

    arch = read_meta(fetch_dir(checkpoint))["arch"]
    img = dict(arch["image_front_end"])
    img["mean"], img["std"] = tuple(img["mean"]), tuple(img["std"])
    return AudioFrontEnd(**arch["audio_front_end"]), ImageFrontEnd(**img)


def embed(ds, checkpoint: str, modality: str, use_gpu: bool = False, actors: int = 1,
          batch_size: int = 32):
    """Decoded dataset -> {id, species_id, embedding} with an actor pool of Embedders."""
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "modality": modality, "use_gpu": use_gpu},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0.5 if not use_gpu else 1,
    )


def eval_specs(checkpoint: str, max_image_pixels: int = MAX_IMAGE_PIXELS,
               stats_name: str | None = None, reduced_images: bool = True
               ) -> tuple[AudioDecodeSpec, ImageDecodeSpec]:
    """Eval decoding of a checkpoint's front ends: onset crop, no prompts."""
    afe, ife = front_ends(checkpoint)
    return (AudioDecodeSpec(afe, mode="onset", prompts="none", stats_name=stats_name),
            ImageDecodeSpec(ife, max_pixels=max_image_pixels, reduced=reduced_images, prompts="none",
                            stats_name=stats_name))


def decode_for_embedding(ds, checkpoint: str, modality: str, max_image_pixels: int = MAX_IMAGE_PIXELS,
                         stats_name: str | None = None, decode_cpus: float = 0.5):
    """Eval decoding of a dataset of media files (`id` + `bytes` columns)."""
    aspec, ispec = eval_specs(checkpoint, max_image_pixels, stats_name)
    return decode_media_files(ds, modality, aspec if modality == "audio" else ispec,
                              num_cpus=decode_cpus)


def embed_dataset(
    checkpoint: str, root: str, modality: str, split: str | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS, use_gpu: bool = False, actors: int = 1,
    batch_size: int = 32, stats_name: str | None = None, decode_cpus: float = 0.5,
    reduced_images: bool = True,
):
    """{id, species_id, embedding} for one table of a store."""
    aspec, ispec = eval_specs(checkpoint, max_image_pixels, stats_name, reduced_images)
    ds = (audio_dataset(root, aspec, split, num_cpus=decode_cpus) if modality == "audio" else
          image_dataset(root, ispec, split, num_cpus=decode_cpus))
    return embed(ds, checkpoint, modality, use_gpu, actors, batch_size)


def collect_embeddings(ds) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
    """(id -> row, embeddings, species ids) on the driver (embeddings only, never media)."""
    ids, embs, species = [], [], []
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        ids.extend(str(i) for i in b["id"])
        embs.append(b["embedding"])
        species.append(b["species_id"])
    if not ids:
        return {}, np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return {k: i for i, k in enumerate(ids)}, np.concatenate(embs), np.concatenate(species)


def embed_to_parquet(checkpoint: str, out: str, data: str | None = None,
                     files: Sequence[str] | None = None, clap: str | None = None) -> int:
    """Embeddings of a whole store (audio + image tables) or of files, on Ray Data; any
    checkpoint layout (see `biovita.models.checkpoint.load_model`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from biovita.models.checkpoint import resolve_checkpoint
    from biovita.runtime import init_ray

    checkpoint = resolve_checkpoint(checkpoint, clap=clap)
    init_ray()
    tables = []
    for modality in ("audio", "image"):
        if data:
            ds = embed_dataset(checkpoint, data, modality)
        else:
            chosen = [f for f in files or []
                      if (Path(f).suffix.lower() in AUDIO_EXTS) == (modality == "audio")]
            if not chosen:
                continue
            rows = [{"id": str(Path(f).resolve()), "file_path": str(Path(f).resolve())} for f in chosen]
            ds = embed(decode_for_embedding(files_dataset(rows), checkpoint, modality), checkpoint, modality)
        for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
            n = len(b["id"])
            species = b["species_id"].astype(np.int32) if "species_id" in b else [-1] * n
            tables.append(pa.table({
                "id": pa.array([str(i) for i in b["id"]]),
                "modality": pa.array([modality] * n),
                "species_id": pa.array(species, pa.int32()),
                "embedding": pa.array(list(b["embedding"].astype(np.float32)), pa.list_(pa.float32())),
            }))
    table = pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})
    pq.write_table(table, out)
    return table.num_rows
