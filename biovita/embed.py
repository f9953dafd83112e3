"""Embeddings with Ray Data batch inference: one model per actor, GPU actors when GPUs exist."""

from __future__ import annotations

import numpy as np
from ray.data import ActorPoolStrategy

from biovita.data.pipeline import (
    AudioDecodeSpec,
    ImageDecodeSpec,
    audio_dataset,
    decode_audio,
    decode_images,
    image_dataset,
)
from biovita.data.store import fetch_dir
from biovita.models.checkpoint import read_meta

KEEP = ("id", "species_id")


class Embedder:
    """Callable class for `map_batches`: loads the checkpoint once per actor."""

    def __init__(self, checkpoint: str, modality: str, use_gpu: bool = False):
        import torch

        from biovita.models.checkpoint import load_model

        self.device = "cuda" if (use_gpu and torch.cuda.is_available()) else "cpu"
        self.model = load_model(fetch_dir(checkpoint)).to(self.device).eval()
        self.modality = modality

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            if self.modality == "audio":
                x = torch.as_tensor(batch["mel"]).to(self.device)
                emb = self.model.encode_audio(x)
            else:
                x = torch.as_tensor(batch["pixels"]).to(self.device)
                emb = self.model.encode_image(x)
        out = {k: batch[k] for k in KEEP if k in batch}
        out["embedding"] = emb.float().cpu().numpy()
        return out


def front_ends(checkpoint: str):
    """(audio, image) front ends of a checkpoint, from its JSON alone (no weights read)."""
    from biovita.audio import AudioFrontEnd
    from biovita.image import ImageFrontEnd

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


def eval_specs(checkpoint: str, max_image_pixels: int = 50_000_000,
               stats_name: str | None = None) -> tuple[AudioDecodeSpec, ImageDecodeSpec]:
    """Eval decoding of a checkpoint's front ends: onset crop, no prompts."""
    afe, ife = front_ends(checkpoint)
    return (AudioDecodeSpec(afe, mode="onset", prompts="none", stats_name=stats_name),
            ImageDecodeSpec(ife, max_pixels=max_image_pixels, prompts="none", stats_name=stats_name))


def decode_for_embedding(ds, checkpoint: str, modality: str, max_image_pixels: int = 50_000_000,
                         stats_name: str | None = None, decode_cpus: float = 0.5):
    """Eval decoding of a dataset of media files (`id` + `bytes` columns)."""
    aspec, ispec = eval_specs(checkpoint, max_image_pixels, stats_name)
    if modality == "audio":
        return decode_audio(ds, aspec, num_cpus=decode_cpus)
    return decode_images(ds, ispec, num_cpus=decode_cpus)


def embed_dataset(
    checkpoint: str, root: str, modality: str, split: str | None = None,
    max_image_pixels: int = 50_000_000, use_gpu: bool = False, actors: int = 1,
    batch_size: int = 32, stats_name: str | None = None, decode_cpus: float = 0.5,
):
    """{id, species_id, embedding} for one table of a store."""
    aspec, ispec = eval_specs(checkpoint, max_image_pixels, stats_name)
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


def embed_texts(model, texts: list[str], batch_size: int = 256) -> np.ndarray:
    import torch

    tok = model.tokenizer()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            out.append(model.encode_text(tok(texts[i:i + batch_size])).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)


