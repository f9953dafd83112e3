"""The embedded synthetic dataset: a tri-modal store whose structure mirrors a taxonomy.

Related taxa sound and look related, so retrieval at species, genus and family level is
learnable but not trivial:

- audio: class -> call type (bird whistles/trills, frog pulsed croaks, insect broadband pulse
  trains, mammal low harmonic calls); family -> frequency band; genus -> rhythm/modulation;
  species -> fine pitch, syllable pattern and a buzz (a 4.5-6 kHz band in each
  syllable, or none). Per clip: onset, amplitude, noise, duration
  (shorter and longer than 10 s), sample rate 16-48 kHz, mono/stereo, WAV/FLAC/OGG/MP3.
- images: class -> body shape; family -> habitat background; genus -> colour; species ->
  pattern and a mark (a bright spot on the body, or none). Per image: pose, scale, position,
  noise, size, JPEG/PNG/WebP.
- hidden attributes drawn per species, across genera: `buzz` (heard, not seen), `mark` (seen,
  not heard), `secret` (neither). The taxa table's trait labels come from them (activity,
  social, migration) and from the taxonomy (the other groups), so a trait probe has something
  true to find and something it must not find.
- species spread evenly over 16 genera (4 classes x 2 families x 2 genera); one species of each
  genus that has two or more is unseen (held out of training), so every unseen species has a
  seen relative; a world of at most 16 species holds out every fourth.

Deterministic for a seed. A known number of corrupt media are written (see `CORRUPT_*`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from biovita.data.schema import TRAIT_COLUMNS, TRAIT_GROUPS
from biovita.data.store import write_table
from biovita.data.synth_media import (
    HABITATS,
    Species,
    corrupt_audio,
    corrupt_image,
    audio_bytes,
    image_bytes,
    synth_call,
    synth_image,
)

WORLD = 3  # the generator's version, in meta.json: a store made by another is made again
DEFAULT_SPECIES = 40  # 24 seen + 16 unseen (one per genus)
CLASSES = ("Aves", "Amphibia", "Insecta", "Mammalia")
COMMON_NOUN = {"Aves": "Warbler", "Amphibia": "Frog", "Insecta": "Cricket", "Mammalia": "Bat"}
SAMPLE_RATES = (16_000, 22_050, 32_000, 44_100, 48_000)
AUDIO_FORMATS = ("wav", "flac", "ogg", "mp3")
IMAGE_FORMATS = ("jpeg", "png", "webp")

# Corrupt media written into the train split, and the reason each is counted under.
CORRUPT_AUDIO = {
    "truncated": "undecodable",
    "random_bytes": "undecodable",
    "html_as_mp3": "html_page",
    "zero_length": "empty_file",
    "nan_samples": "non_finite",
}
CORRUPT_IMAGE = {
    "truncated": "undecodable",
    "random_bytes": "undecodable",
    "zero_length": "empty_file",
    "decompression_bomb": "too_large",
}

_SYL = ("ra", "to", "vi", "ne", "ca", "lo", "mu", "si", "da", "pe", "ko", "ri", "ta", "zu", "le", "mi")
_ADJ = ("Crested", "Spotted", "Lesser", "Greater", "Dusky", "Bright", "Pale", "Royal", "Little",
        "Mountain", "River", "Forest", "Marsh", "Desert", "Northern", "Southern")
_COLOURS = ("Ruby", "Amber", "Azure", "Olive", "Ivory", "Cobalt", "Copper", "Jade", "Scarlet",
            "Slate", "Golden", "Violet", "Rusty", "Sable", "Teal", "Coral")


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n))


def genus_sizes(n_species: int) -> list[int]:
    """Species per genus (16 genera), as even as can be; the extra ones go first to the first
    genus of each family of each class, so that classes stay balanced."""
    order = sorted(range(16), key=lambda g: (g % 2, (g // 2) % 2, g // 4))
    sizes = [n_species // 16] * 16
    for g in order[: n_species % 16]:
        sizes[g] += 1
    return sizes


def make_taxonomy(n_species: int, seed: int) -> list[Species]:
    """4 classes x 2 families x 2 genera, species spread evenly; see the module docstring
    for which are unseen and for the hidden attributes."""
    rng = np.random.default_rng([seed, 1])
    sizes = genus_sizes(n_species)
    used: set[str] = set()

    def unique(make):
        for _ in range(1000):
            s = make()
            if s not in used:
                used.add(s)
                return s
        raise RuntimeError("name space exhausted")

    hidden_rng = np.random.default_rng([seed, 4])
    buzz, mark, secret = (hidden_rng.permutation(np.arange(n_species) % 2) for _ in range(3))
    out: list[Species] = []
    genus_idx = 0
    for ci, klass in enumerate(CLASSES):
        order = unique(lambda: _word(rng, 2).capitalize() + "formes")
        for fi in range(2):
            family = unique(lambda: _word(rng, 2).capitalize() + "idae")
            for gi in range(2):
                genus = unique(lambda: _word(rng, 3).capitalize())
                for si in range(sizes[genus_idx]):
                    epithet = unique(lambda: _word(rng, 2) + str(rng.choice(["us", "a", "is", "um"])))
                    common = unique(
                        lambda: f"{rng.choice(_ADJ)} {_COLOURS[genus_idx % 16]} {COMMON_NOUN[klass]}"
                    )
                    k = len(out)
                    seen = (si < sizes[genus_idx] - 1) if max(sizes) > 1 else (k % 4 != 3)
                    out.append(Species(
                        species_id=k, klass=klass, order=order, family=family, genus=genus,
                        scientific_name=f"{genus} {epithet}", common_name=common, class_idx=ci,
                        family_idx=fi, genus_idx=genus_idx, genus_in_family=gi,
                        species_in_genus=si, seen=seen, buzz=int(buzz[k]), mark=int(mark[k]),
                        secret=int(secret[k])))
                genus_idx += 1
    return out


# ----------------------------------------------------------------------------- traits


# trait groups labelled from the hidden attributes: (attribute, label if 0, label if 1)
HIDDEN_TRAITS = {"activity": ("buzz", "diurnal", "nocturnal"),  # audible only
                 "social": ("mark", "solitary", "group"),  # visible only
                 "migration": ("secret", "resident", "migratory")}  # neither


def traits_for(sp: Species, rng: np.random.Generator) -> dict[str, int]:
    """Trait labels: activity, social and migration from the hidden attributes (exact); the
    other groups from the taxonomy (class/family/genus), with 5 % label noise."""
    on: set[str] = set()
    on.update({0: ("flying", "aerial"), 1: ("swimming", "aquatic"), 2: ("walking", "terrestrial"),
               3: ("flying", "arboreal")}[sp.class_idx])
    on.add(HABITATS[(sp.family_idx + 2 * sp.class_idx) % 6])
    on.add(("tropical", "temperate", "arid", "polar")[(sp.class_idx + sp.family_idx) % 4])
    on.add(TRAIT_GROUPS["diet"][sp.genus_idx % 6])
    hidden = {f"trait_{g}_{labels[sp.hidden()[attr]]}" for g, (attr, *labels) in HIDDEN_TRAITS.items()}
    labels = {}
    for col in TRAIT_COLUMNS:
        group = col.split("_", 2)[1]
        if group in HIDDEN_TRAITS:
            labels[col] = int(col in hidden)
            continue
        v = int(col.split("_", 2)[2] in on)
        if rng.random() < 0.05:
            v = 1 - v
        labels[col] = v
    return labels


# ----------------------------------------------------------------------------- writer


def _species_media(sp: Species, rng: np.random.Generator, train_clips: tuple[int, int],
                   train_images: tuple[int, int], test_clips: int, test_images: int
                   ) -> tuple[list[dict], list[dict]]:
    """A species' clips and images (train and test rows); unseen species get test rows only."""
    n_train_a = int(rng.integers(*train_clips)) if sp.seen else 0
    n_train_i = int(rng.integers(*train_images)) if sp.seen else 0
    n_test = test_clips if sp.seen else test_clips + 1
    n_test_i = test_images if sp.seen else test_images + 1
    audio, images = [], []
    for k in range(n_train_a + n_test):
        sr = int(rng.choice(SAMPLE_RATES))
        seconds = float(rng.choice([rng.uniform(3, 9.5), rng.uniform(10.5, 14)]))
        wave = synth_call(sp, rng, sr, seconds)
        if rng.random() < 0.3:
            wave = np.stack([wave, wave * rng.uniform(0.6, 1.0)], axis=1)
        fmt = str(rng.choice(AUDIO_FORMATS))
        src = str(rng.choice(["xc", "inat", "asa"]))
        rec = f"{sp.species_id:04d}{k:03d}"
        audio.append({"id": f"{src}_{rec}", "bytes": audio_bytes(wave, sr, fmt), "format": fmt,
                      "source": src, "recording_id": rec, **sp.taxonomy(),
                      "species_id": sp.species_id, "split": "train" if k < n_train_a else "test"})
    for k in range(n_train_i + n_test_i):
        fmt = str(rng.choice(IMAGE_FORMATS))
        images.append({"id": f"img_{sp.species_id:04d}_{k:03d}",
                       "bytes": image_bytes(synth_image(sp, rng), fmt), "format": fmt,
                       **sp.taxonomy(), "species_id": sp.species_id,
                       "split": "train" if k < n_train_i else "test"})
    return audio, images


def _corrupt_rows(seen: list[Species], rng: np.random.Generator, good_audio: bytes,
                  good_image: bytes) -> tuple[list[dict], list[dict]]:
    """One corrupt medium of each kind, in the train split of a seen species."""
    audio, images = [], []
    for i, kind in enumerate(CORRUPT_AUDIO):
        sp = seen[(i * 5) % len(seen)]
        data, fmt = corrupt_audio(kind, rng, good_audio)
        audio.append({"id": f"bad_{kind}", "bytes": data, "format": fmt, "source": "xc",
                      "recording_id": f"bad{i}", **sp.taxonomy(), "species_id": sp.species_id,
                      "split": "train"})
    for i, kind in enumerate(CORRUPT_IMAGE):
        sp = seen[(i * 7 + 1) % len(seen)]
        data, fmt = corrupt_image(kind, rng, good_image)
        images.append({"id": f"bad_img_{kind}", "bytes": data, "format": fmt, **sp.taxonomy(),
                       "species_id": sp.species_id, "split": "train"})
    return audio, images


def _reasons(kinds: dict[str, str]) -> dict[str, int]:
    """How many corrupt media each skip reason should count."""
    out: dict[str, int] = {}
    for reason in kinds.values():
        out[reason] = out.get(reason, 0) + 1
    return out


def make_synthetic(
    out: str | Path,
    n_species: int = DEFAULT_SPECIES,
    seed: int = 0,
    train_clips: tuple[int, int] = (3, 26),
    train_images: tuple[int, int] = (8, 21),
    test_clips: int = 3,
    test_images: int = 3,
    rows_per_shard: int = 128,
    progress: bool = False,
) -> dict:
    """Write the synthetic store to `out` and return its manifest (also written as meta.json)."""
    out = Path(out)
    species = make_taxonomy(n_species, seed)
    rng = np.random.default_rng([seed, 2])
    audio_rows: list[dict] = []
    image_rows: list[dict] = []
    it = species
    if progress:
        from tqdm import tqdm
        it = tqdm(species, desc="synth", unit="species", disable=None)  # no bar in a log file
    for sp in it:
        a, i = _species_media(sp, rng, train_clips, train_images, test_clips, test_images)
        audio_rows += a
        image_rows += i
    seen = [s for s in species if s.seen]
    a, i = _corrupt_rows(seen, rng, audio_rows[0]["bytes"], image_rows[0]["bytes"])
    # shuffle rows so shards mix species (deterministically)
    audio_rows, image_rows = audio_rows + a, image_rows + i
    audio_rows = [audio_rows[k] for k in rng.permutation(len(audio_rows))]
    image_rows = [image_rows[k] for k in rng.permutation(len(image_rows))]
    taxa_rows = [{"species_id": s.species_id, **s.taxonomy(), "seen": s.seen,
                  **traits_for(s, rng)} for s in species]
    write_table(out, "audio", audio_rows, rows_per_shard)
    write_table(out, "image", image_rows, rows_per_shard)
    write_table(out, "taxa", taxa_rows, rows_per_shard)
    manifest = {
        "world": WORLD, "seed": seed, "n_species": len(species), "n_seen": len(seen),
        "audio_rows": len(audio_rows), "image_rows": len(image_rows),
        "corrupt": {"audio": _reasons(CORRUPT_AUDIO), "image": _reasons(CORRUPT_IMAGE)},
    }
    (out / "meta.json").write_text(json.dumps(manifest, indent=2))
    return manifest
