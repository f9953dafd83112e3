"""Decoding a batch of store rows into model inputs, as Ray Data calls it (no Ray here).

A batch is a dict of columns (numpy) holding the encoded media in `bytes`. Bad media is
dropped and returned with its reason for the caller to count; nothing is ever replaced by
silence or a blank image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from biovita.data.sampling import stable_hash
from biovita.errors import MediaError
from biovita.data.vectors import Vectors
from biovita.frontends.audio import AudioFrontEnd, load_clip
from biovita.frontends.image import MAX_IMAGE_PIXELS, ImageFrontEnd, load_image
from biovita.prompts import LEVEL_TEMPLATES, TEMPLATES, Taxon

# The job's counting actor (see `biovita.data.stats`), named here so decoding needs no Ray.
STATS_ACTOR = "biovita-media-stats"
Decoded = tuple[dict[str, np.ndarray], int, list[tuple[str, str]]]  # rows, good ids, (id, reason)
# What decoders ship a clip as: 10 s at 48 kHz in float16, 0.94 MB (the float32 log-mel it
# replaces is 0.25 MB). Against float32 input, the log-mel of float16 waveforms differs by
# 0.012 dB on average (embedded store) and int16's by 0.016 dB; the large differences of
# either sit in bins near the -100 dB floor (benchmarks/data_throughput.py reports both).
WAVE_DTYPE = np.float16


def _prompt(row: dict, spec: Any, use: int) -> str:
    """A prompt per sample: a random template (seeded per epoch, id and use; "levels" also
    draws the bare genus or family name) or one per species ("fixed")."""
    if spec.prompts == "fixed":
        rng = np.random.default_rng([spec.seed, int(row["species_id"]), 5])
    else:
        rng = np.random.default_rng([spec.seed, spec.epoch, stable_hash(str(row["id"])), use, 3])
    return Taxon.from_row(row).random_prompt(rng, LEVEL_TEMPLATES if spec.prompts == "levels" else TEMPLATES)


@dataclass(frozen=True)
class AudioDecodeSpec:
    front_end: AudioFrontEnd = field(default_factory=AudioFrontEnd)
    mode: str = "random"  # random (train) | onset (eval)
    seed: int = 0
    epoch: int = 0
    prompts: str = "random"  # random template per sample | levels | fixed (one per species) | none
    stats_name: str | None = STATS_ACTOR  # where dropped media are counted (None: nowhere)


def _bytes(value) -> bytes | None:
    """A row's encoded media, or None where there is none (a missing file): Ray Data turns a
    column whose every value is None into floats (NaN)."""
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def _uses(batch: dict[str, np.ndarray]) -> list[int]:
    """The use number of each row: a training stream repeats a row once per use (`_use`),
    and each use gets its own crop and prompt."""
    n = len(batch["id"])
    return [int(k) for k in batch["_use"]] if "_use" in batch else [0] * n


def _columns(batch: dict[str, np.ndarray], keep: list[int]) -> dict[str, Any]:
    return {c: np.asarray([batch[c][i] for i in keep]) for c in batch
            if c not in ("bytes", "_use", "_pair")}


def _prompts(batch: dict[str, np.ndarray], keep: list[int], uses: list[int], spec) -> np.ndarray:
    cols = [c for c in batch if c not in ("bytes", "_use", "_pair")]
    return np.asarray([_prompt({c: batch[c][i] for c in cols}, spec, uses[i]) for i in keep],
                      dtype=object)


def decode_audio_batch(batch: dict[str, np.ndarray], spec: AudioDecodeSpec,
                       frozen: Mapping[str, Vectors] | None = None) -> Decoded:
    """Decode a batch of clips into 10 s waveforms (float16, `wave`: the log-mel is computed
    batched on the consumer's device), one output row per input row. A training stream's rows
    carry their use number (`_use`, seeds the crop and the prompt) and, in stage 2, the image
    they are paired with (`_pair`). `frozen`: embeddings of the frozen towers by modality;
    with "text" a row gets its prompt's embedding (`text_emb`) instead of the prompt, with
    "image" its paired image's (`image_emb`)."""
    fe = spec.front_end
    uses = _uses(batch)
    # each clip is converted into its row of the output as it comes (stacking float32 clips
    # and then converting the batch cost ~1 ms a clip more)
    waves = np.empty((len(batch["id"]), fe.clip_samples), WAVE_DTYPE)
    keep, bad = [], []
    for i in range(len(batch["id"])):
        media_id = str(batch["id"][i])
        rng = np.random.default_rng([spec.seed, spec.epoch, stable_hash(media_id), uses[i]])
        try:
            waves[len(keep)] = load_clip(_bytes(batch["bytes"][i]), fe, spec.mode, rng)
        except MediaError as e:
            bad.append((media_id, e.reason))
            continue
        keep.append(i)
    out = _columns(batch, keep)
    out["wave"] = waves[: len(keep)]
    frozen = frozen or {}
    if spec.prompts != "none":
        prompts = _prompts(batch, keep, uses, spec)
        if "text" in frozen:
            out["text_emb"] = frozen["text"].take(prompts)
        else:
            out["text"] = prompts
    if "image" in frozen:
        out["image_emb"] = frozen["image"].take([batch["_pair"][i] for i in keep])
    return out, len({str(batch["id"][i]) for i in keep}), bad


@dataclass(frozen=True)
class ImageDecodeSpec:
    front_end: ImageFrontEnd = field(default_factory=ImageFrontEnd)
    max_pixels: int = MAX_IMAGE_PIXELS
    reduced: bool = True  # large JPEGs decoded at a reduced DCT scale (False: full size)
    seed: int = 0
    epoch: int = 0
    prompts: str = "random"
    stats_name: str | None = STATS_ACTOR


def decode_image_batch(batch: dict[str, np.ndarray], spec: ImageDecodeSpec) -> Decoded:
    """Decode a batch of images to uint8 pixels, one output row per input row."""
    fe = spec.front_end
    uses = _uses(batch)
    pixels, keep, bad, done = [], [], [], {}
    for i in range(len(batch["id"])):
        media_id = str(batch["id"][i])
        try:
            if media_id not in done:  # eval preprocessing: every use of an image is the same
                done[media_id] = load_image(_bytes(batch["bytes"][i]), fe, spec.max_pixels, spec.reduced)
        except MediaError as e:
            bad.append((media_id, e.reason))
            continue
        pixels.append(done[media_id])
        keep.append(i)
    out = _columns(batch, keep)
    out["pixels"] = (np.stack(pixels) if pixels else
                     np.zeros((0, 3, fe.image_size, fe.image_size), np.uint8))
    if spec.prompts != "none":
        out["text"] = _prompts(batch, keep, uses, spec)
    return out, len(done), bad


DECODERS = {"audio": decode_audio_batch, "image": decode_image_batch}


def eval_specs(audio: AudioFrontEnd, image: ImageFrontEnd, max_image_pixels: int = MAX_IMAGE_PIXELS,
               stats_name: str | None = None, reduced_images: bool = True
               ) -> tuple[AudioDecodeSpec, ImageDecodeSpec]:
    """Evaluation decoding (the benchmark's, the caches', validation's): onset crops, eval
    preprocessing, no prompts."""
    return (AudioDecodeSpec(audio, mode="onset", prompts="none", stats_name=stats_name),
            ImageDecodeSpec(image, max_pixels=max_image_pixels, reduced=reduced_images, prompts="none",
                            stats_name=stats_name))
