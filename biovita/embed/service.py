"""The one Ray Data embedding of biovita: decoded media (or prompts) -> embeddings, with one
model per actor, on GPUs when asked. The frozen-tower cache, the benchmark, the gallery, the
trait probe and `biovita embed` all embed through it.

Clips arrive as waveforms (`wave`, float16) and the actor computes their log-mels batched on
its own device (`biovita.frontends.audio.LogMel`), as the training worker does."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import ray
from ray.data import ActorPoolStrategy

from biovita.data.datasets import audio_dataset, decode_media_files, files_dataset, image_dataset
from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec, eval_specs
from biovita.data.store import fetch_dir
from biovita.data.vectors import Vectors
from biovita.frontends.audio import LogMel
from biovita.frontends.image import MAX_IMAGE_PIXELS
from biovita.models.checkpoint import front_ends, load_biovita

KEEP = ("id", "species_id")
INPUT = {"audio": "wave", "image": "pixels", "text": "text"}  # the column each modality embeds


class Embedder:
    """Callable class for `map_batches`: loads the checkpoint once per actor, embeds one
    modality (`audio`: waveforms, `image`: uint8 pixels, `text`: strings)."""

    def __init__(self, checkpoint: str, modality: str, use_gpu: bool = False):
        import torch

        self.device = torch.device("cuda" if (use_gpu and torch.cuda.is_available()) else "cpu")
        self.model = load_biovita(fetch_dir(checkpoint)).to(self.device).eval()
        self.modality = modality
        self.log_mel = LogMel(self.model.audio_front_end, self.device) if modality == "audio" else None
        self.tokenizer = self.model.tokenizer() if modality == "text" else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        x = batch[INPUT[self.modality]]
        with torch.no_grad():
            if self.modality == "text":
                emb = self.model.encode_text(self.tokenizer([str(t) for t in x]).to(self.device))
            else:  # (Ray's buffers are read-only: copied)
                x = torch.from_numpy(np.array(x)).to(self.device)
                emb = (self.model.encode_audio(self.log_mel(x)) if self.modality == "audio"
                       else self.model.encode_image(x))
        out = {k: batch[k] for k in KEEP if k in batch}
        out["embedding"] = emb.float().cpu().numpy()
        return out


def embed(ds, checkpoint: str, modality: str, use_gpu: bool = False, actors: int = 1,
          batch_size: int = 32):
    """Decoded dataset (or one of prompts, `text`) -> {id, species_id, embedding} with an
    actor pool of Embedders."""
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "modality": modality, "use_gpu": use_gpu},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_gpus=1 if use_gpu else 0,
        num_cpus=0.5 if not use_gpu else 1,
    )


def _specs(checkpoint: str, **kwargs) -> tuple[AudioDecodeSpec, ImageDecodeSpec]:
    return eval_specs(*front_ends(fetch_dir(checkpoint)), **kwargs)


def embed_files(rows: list[dict], checkpoint: str, modality: str, base: str = "",
                use_gpu: bool = False, actors: int = 1, stats_name: str | None = None):
    """{id, species_id?, embedding} of media files ({id, file_path} rows, paths relative to
    `base`), decoded as the benchmark decodes (onset crop, eval preprocessing)."""
    aspec, ispec = _specs(checkpoint, stats_name=stats_name)
    ds = decode_media_files(files_dataset(rows, base=base), modality,
                            aspec if modality == "audio" else ispec)
    return embed(ds, checkpoint, modality, use_gpu, actors)


def embed_dataset(
    checkpoint: str, root: str, modality: str, split: str | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS, use_gpu: bool = False, actors: int = 1,
    batch_size: int = 32, stats_name: str | None = None, decode_cpus: float = 0.5,
    reduced_images: bool = True,
):
    """{id, species_id, embedding} for one table of a store (one split, or all)."""
    aspec, ispec = _specs(checkpoint, max_image_pixels=max_image_pixels, stats_name=stats_name,
                          reduced_images=reduced_images)
    ds = (audio_dataset(root, aspec, split, num_cpus=decode_cpus) if modality == "audio" else
          image_dataset(root, ispec, split, num_cpus=decode_cpus))
    return embed(ds, checkpoint, modality, use_gpu, actors, batch_size)


def embed_texts(checkpoint: str, texts: Sequence[str], use_gpu: bool = False, actors: int = 1,
                batch_size: int = 256):
    """{id (the text), embedding} of strings through the checkpoint's text tower."""
    ds = ray.data.from_items([{"id": t, "text": t} for t in texts],
                             override_num_blocks=max(1, min(len(texts) // batch_size, 64)))
    return embed(ds, checkpoint, "text", use_gpu, actors, batch_size)


def collect(ds) -> Vectors:
    """The embeddings of a dataset, on the driver (vectors only, never media)."""
    ids, embs, species = [], [], []
    for b in ds.iter_batches(batch_size=1024, batch_format="numpy"):
        ids.extend(str(i) for i in b["id"])
        embs.append(b["embedding"])
        species.append(b["species_id"] if "species_id" in b else np.full(len(b["id"]), -1))
    if not ids:
        return Vectors([], np.zeros((0, 0), np.float32))
    return Vectors(ids, np.concatenate(embs), np.concatenate(species).astype(np.int64))
