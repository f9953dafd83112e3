"""A small validation benchmark for sweeps: a few training clips and photos of every seen
species, held out of training, scored inside the trial after every epoch.

Built once on the driver (decoded as the benchmark decodes: onset crop, eval preprocessing)
into one `.npz` file that every trial reads; `train.validation` names it. The score is the
benchmark's at species level with every species a candidate: for each of the six directions
the Top-1 over taxa (a taxon's score: its best-matching gallery item), and their mean
(`val/top1`), which a sweep's ASHA compares. No Ray here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from biovita.data.decode import decode_audio_batch, decode_image_batch, eval_specs
from biovita.data.sampling import stable_hash
from biovita.data.store import fetch_dir, filesystem, read_table
from biovita.frontends.audio import log_mel
from biovita.models.checkpoint import front_ends

DIRECTIONS = ("A2T", "T2A", "A2I", "I2A", "I2T", "T2I")


@dataclass
class ValidationSet:
    audio_ids: np.ndarray
    audio_species: np.ndarray
    mel: np.ndarray
    image_ids: np.ndarray
    image_species: np.ndarray
    pixels: np.ndarray
    species: np.ndarray  # one text per species: its bare scientific name
    names: np.ndarray

    @classmethod
    def load(cls, uri: str) -> "ValidationSet":
        with _open(uri) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


def _open(uri: str):
    """The `.npz` at a local path or an object-store URI (every worker reads the one file)."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def held_out_ids(uri: str) -> set[str]:
    """The ids a validation file holds (kept out of every training plan); none without one."""
    if not uri:
        return set()
    with _open(uri) as z:
        return {str(i) for i in (*z["audio_ids"], *z["image_ids"])}


def _pick(ids: list[str], species: list[int], per_species: int, seed: int) -> list[str]:
    by: dict[int, list[str]] = {}
    for i, s in sorted(zip(ids, species), key=lambda r: stable_hash(f"{seed}:{r[0]}")):
        by.setdefault(int(s), []).append(i)
    # a species keeps most of its media for training: at most a third goes to validation
    return [i for v in by.values() for i in v[:min(per_species, len(v) // 3)]]


def build_validation(root: str, checkpoint: str, out: str, per_species: int = 2, seed: int = 0) -> str:
    """Decode `per_species` training clips and photos of every seen species into `out` (a
    path or an object-store URI)."""
    afe, ife = front_ends(fetch_dir(checkpoint))
    aspec, ispec = eval_specs(afe, ife)
    arrays: dict[str, np.ndarray] = {}
    for table, spec, decode, col in (("audio", aspec, decode_audio_batch, "wave"),
                                     ("image", ispec, decode_image_batch, "pixels")):
        meta = read_table(root, table, ["id", "species_id", "split"]).to_pydict()
        train = [(i, s) for i, s, sp in zip(meta["id"], meta["species_id"], meta["split"]) if sp == "train"]
        chosen = _pick([r[0] for r in train], [r[1] for r in train], per_species, seed)
        t = read_table(root, table, ["id", "species_id", "bytes"])
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(chosen)))
        batch = {k: np.asarray(v, dtype=object) for k, v in t.to_pydict().items()}
        decoded, _, _ = decode(batch, spec)  # an undecodable medium is left out
        arrays[f"{table}_ids"] = decoded["id"].astype(str)
        arrays[f"{table}_species"] = decoded["species_id"].astype(np.int64)
        # clips kept as log-mels (a quarter of a waveform's bytes), computed as training does
        arrays["mel" if table == "audio" else col] = (log_mel(afe)(decoded[col]).numpy()
                                                      if table == "audio" else decoded[col])
    taxa = read_table(root, "taxa", ["species_id", "scientific_name"]).to_pydict()
    present = set(arrays["audio_species"]) | set(arrays["image_species"])
    keep = [k for k, s in enumerate(taxa["species_id"]) if s in present]
    arrays["species"] = np.asarray([taxa["species_id"][k] for k in keep], np.int64)
    arrays["names"] = np.asarray([taxa["scientific_name"][k] for k in keep], dtype=str)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    fs, path = filesystem(out)
    fs.create_dir(path.rpartition("/")[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())
    return out


def retrieval_top1(emb: dict[str, np.ndarray], species: dict[str, np.ndarray]) -> dict[str, float]:
    """Top-1 over taxa in the six directions; every taxon of the gallery is a candidate."""
    code = {"A": "audio", "I": "image", "T": "text"}
    out = {}
    for d in DIRECTIONS:
        q, g = code[d[0]], code[d[2]]
        sim = emb[q] @ emb[g].T
        taxa = np.unique(species[g])
        # a taxon's score: its best gallery item
        best = np.stack([sim[:, species[g] == t].max(1) for t in taxa], axis=1)
        ok = np.isin(species[q], taxa)  # a query whose taxon has no gallery item is skipped
        out[d] = float(np.mean(taxa[best.argmax(1)][ok] == species[q][ok])) if ok.any() else 0.0
    out["top1"] = float(np.mean([out[d] for d in DIRECTIONS]))
    return out


def score(val: ValidationSet, encode: dict[str, Callable], batch: int = 64) -> dict[str, float]:
    """The validation scores of a model whose encoders by input column are `encode`
    (`mel`, `pixels`, `text`; each returns L2-normalised embeddings)."""
    import torch

    def run(col, x):
        parts = []
        for s in range(0, len(x), batch):
            chunk = x[s:s + batch] if col == "text" else torch.from_numpy(np.ascontiguousarray(x[s:s + batch]))
            parts.append(encode[col](chunk).float().cpu().numpy())
        return np.concatenate(parts)

    with torch.no_grad():
        emb = {"audio": run("mel", val.mel), "image": run("pixels", val.pixels),
               "text": run("text", [str(n) for n in val.names])}
    return retrieval_top1(emb, {"audio": val.audio_species, "image": val.image_species,
                                "text": val.species})
