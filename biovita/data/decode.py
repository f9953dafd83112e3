"""Decoding a batch of store rows into model inputs, as Ray Data calls it (no Ray here).

A batch is a dict of columns (numpy) holding the encoded media in `bytes`. Bad media is
dropped and returned with its reason for the caller to count; nothing is ever replaced by
silence or a blank image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from biovita.data.sampling import stable_hash
from biovita.errors import MediaError
from biovita.frontends.audio import AudioFrontEnd, load_clip, log_mel
from biovita.frontends.image import MAX_IMAGE_PIXELS, ImageFrontEnd, load_image
from biovita.prompts import Taxon

# The job's counting actor (see `biovita.data.stats`), named here so decoding needs no Ray.
STATS_ACTOR = "biovita-media-stats"
Decoded = tuple[dict[str, np.ndarray], int, list[tuple[str, str]]]  # rows, good ids, (id, reason)


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
    stats_name: str | None = STATS_ACTOR  # where dropped media are counted (None: nowhere)


def decode_audio_batch(
    batch: dict[str, np.ndarray], spec: AudioDecodeSpec, plan: dict | None = None,
    image_emb: tuple[dict[str, int], np.ndarray] | None = None,
) -> Decoded:
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
    return out, len({r[0] for r in out_rows}), bad


@dataclass(frozen=True)
class ImageDecodeSpec:
    front_end: ImageFrontEnd = field(default_factory=ImageFrontEnd)
    max_pixels: int = MAX_IMAGE_PIXELS
    seed: int = 0
    epoch: int = 0
    prompts: str = "random"
    stats_name: str | None = STATS_ACTOR


def decode_image_batch(
    batch: dict[str, np.ndarray], spec: ImageDecodeSpec, plan: dict | None = None
) -> Decoded:
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
    out: dict[str, Any] = {c: np.asarray([batch[c][i] for i, _ in rows]) for c in cols}
    out["pixels"] = (np.stack(pixels) if pixels else
                     np.zeros((0, 3, fe.image_size, fe.image_size), np.uint8))
    if spec.prompts != "none":
        out["text"] = np.asarray(
            [_prompt({c: batch[c][i] for c in cols}, spec, k) for i, k in rows], dtype=object)
    return out, len({r[0] for r in rows}), bad


DECODERS = {"audio": decode_audio_batch, "image": decode_image_batch}
