"""`biovita synth --profile realistic`: a store shaped like the release, for measuring and
testing the pipeline on field media: recordings of 5 s to 5 minutes (log-normal, median
~40 s) as MP3, M4A/AAC, WAV, FLAC and Ogg Vorbis at 22-48 kHz, camera photos of 1-12
megapixels as JPEG with EXIF orientation, and the release's damaged files. The species,
their calls and their looks are the embedded dataset's (`biovita.data.synth`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from biovita.data.store import write_table
from biovita.data.synth import Species, make_taxonomy, traits_for
from biovita.data.synth_media import audio_bytes, synth_call, synth_image

FORMATS = ("mp3", "mp3", "mp3", "m4a", "wav", "flac", "ogg")  # MP3 dominates the release
RATES = (22050, 32000, 44100, 48000)
ORIENTATIONS = {1: None, 3: 3, 6: 2, 8: 4}  # EXIF tag -> PIL transpose that stores it (ROTATE_*)
# The release's damaged files and what biovita counts them as. A stream with garbage after
# its last frame still decodes: it is kept (and counted as good), as nothing decodable is lost.
DAMAGED_AUDIO = {"html_as_mp3": "html_page", "truncated_header": "undecodable",
                 "zero_length": "empty_file"}
DAMAGED_IMAGE = {"truncated_jpeg": "undecodable", "html_as_jpg": "html_page"}


def _clip_seconds(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.clip(rng.lognormal(np.log(40.0), 1.0), low, high))


def _photo(sp: Species, rng: np.random.Generator, megapixels: tuple[float, float]) -> bytes:
    """A JPEG of `megapixels` with an EXIF orientation: the stored pixels are turned so that
    the tag turns them upright again."""
    from PIL import Image

    small = synth_image(sp, rng)
    mp = rng.uniform(*megapixels) * 1e6
    aspect = rng.choice([4 / 3, 3 / 2, 16 / 9])
    w = int(np.sqrt(mp * aspect))
    h = int(w / aspect)
    img = small.resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 4, (-(-h // 4), -(-w // 4), 1)).repeat(4, 0).repeat(4, 1)[:h, :w]
    img = Image.fromarray(np.clip(np.asarray(img, np.float32) + grain, 0, 255).astype(np.uint8))
    tag = int(rng.choice(list(ORIENTATIONS)))
    if ORIENTATIONS[tag] is not None:
        img = img.transpose(ORIENTATIONS[tag])
    exif = Image.Exif()
    exif[0x0112] = tag
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88, exif=exif)
    return buf.getvalue()


def _damaged_audio(kind: str, good: bytes) -> tuple[bytes, str]:
    if kind == "html_as_mp3":
        return b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body></body></html>", "mp3"
    if kind == "truncated_header":
        return b"RIFF\x24\xf0\x00\x00WAVEfmt ", "wav"
    return b"", "mp3"


def make_realistic(out: str | Path, n_species: int = 12, seed: int = 0, clips: tuple[int, int] = (3, 7),
                   photos: tuple[int, int] = (3, 6), clip_seconds: tuple[float, float] = (5.0, 300.0),
                   megapixels: tuple[float, float] = (1.0, 12.0), progress: bool = False) -> dict:
    """Write the realistic store to `out`; returns its manifest (also meta.json)."""
    out = Path(out)
    species = make_taxonomy(n_species, seed)
    rng = np.random.default_rng([seed, 3])
    audio, images, lengths = [], [], []
    it = species
    if progress:
        from tqdm import tqdm

        it = tqdm(species, desc="synth (realistic)", unit="species", disable=None)
    for sp in it:
        tax = {**sp.taxonomy(), "species_id": sp.species_id}
        n_train = int(rng.integers(*clips)) if sp.seen else 0
        for k in range(n_train + 2):
            sr, fmt = int(rng.choice(RATES)), str(rng.choice(FORMATS))
            seconds = _clip_seconds(rng, *clip_seconds)
            lengths.append(seconds)
            wave = synth_call(sp, rng, sr, seconds)
            if rng.random() < 0.4:
                wave = np.stack([wave, wave * rng.uniform(0.6, 1.0)], axis=1)
            data = audio_bytes(wave, sr, fmt)
            if fmt == "mp3" and rng.random() < 0.15:  # a download with junk after the stream
                data += rng.integers(0, 256, int(rng.integers(200, 4000)), dtype=np.uint8).tobytes()
            rec = f"{sp.species_id:04d}{k:03d}"
            audio.append({"id": f"xc_{rec}", "bytes": data, "format": fmt, "source": "xc",
                          "recording_id": rec, **tax, "split": "train" if k < n_train else "test"})
        n_train = int(rng.integers(*photos)) if sp.seen else 0
        for k in range(n_train + 2):
            images.append({"id": f"img_{sp.species_id:04d}_{k:03d}", "bytes": _photo(sp, rng, megapixels),
                           "format": "jpeg", **tax, "split": "train" if k < n_train else "test"})
    seen = [s for s in species if s.seen]
    for i, kind in enumerate(DAMAGED_AUDIO):
        data, fmt = _damaged_audio(kind, audio[0]["bytes"])
        sp = seen[i % len(seen)]
        audio.append({"id": f"bad_{kind}", "bytes": data, "format": fmt, "source": "xc",
                      "recording_id": f"bad{i}", **sp.taxonomy(), "species_id": sp.species_id,
                      "split": "train"})
    for i, kind in enumerate(DAMAGED_IMAGE):
        data = images[0]["bytes"][:300] if kind == "truncated_jpeg" else b"<html><body>Not Found</body></html>"
        sp = seen[(i + 1) % len(seen)]
        images.append({"id": f"bad_img_{kind}", "bytes": data, "format": "jpeg", **sp.taxonomy(),
                       "species_id": sp.species_id, "split": "train"})
    audio = [audio[k] for k in rng.permutation(len(audio))]
    images = [images[k] for k in rng.permutation(len(images))]
    write_table(out, "audio", audio, 64)
    write_table(out, "image", images, 64)
    write_table(out, "taxa", [{"species_id": s.species_id, **s.taxonomy(), "seen": s.seen,
                               **traits_for(s, rng)} for s in species])
    reasons = lambda kinds: {r: list(kinds.values()).count(r) for r in set(kinds.values())}  # noqa: E731
    manifest = {"profile": "realistic", "seed": seed, "n_species": len(species), "n_seen": len(seen),
                "audio_rows": len(audio), "image_rows": len(images),
                "median_clip_seconds": float(np.median(lengths)),
                "corrupt": {"audio": reasons(DAMAGED_AUDIO), "image": reasons(DAMAGED_IMAGE)}}
    (out / "meta.json").write_text(json.dumps(manifest, indent=2))
    return manifest
