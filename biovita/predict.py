"""Identify a species from a recording or a photo (pybioclip-style). No Ray: a laptop, a
notebook or a web service can use it.

    from biovita import Predictor
    Predictor("runs/embedded/models/stage2.phase2").predict(["call.mp3", "frog.jpg"], rank="genus", k=3)
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np

import torch

from biovita.errors import MediaError
from biovita.frontends.audio import load_clip, log_mel
from biovita.frontends.image import MAX_IMAGE_PIXELS, load_image
from biovita.frontends.sniff import AUDIO_KINDS, IMAGE_KINDS, sniff
from biovita.models.checkpoint import load_model

TAXON_FIELDS = ("class", "order", "family", "genus", "scientific_name", "common_name")


class Rank(str, Enum):
    SPECIES = "species"
    GENUS = "genus"
    FAMILY = "family"


_LEVEL_COL = {"species": "scientific_name", "genus": "genus", "family": "family"}


def read_taxa_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    need = {"class", "order", "family", "genus", "scientific_name"}
    if not rows or not need <= rows[0].keys():
        raise ValueError(f"{path}: a taxa CSV needs the columns {', '.join(sorted(need))}")
    return [{k: r.get(k, "") or "" for k in TAXON_FIELDS} for r in rows]


class Predictor:
    """Ranks the taxa of a label set for audio or image files."""

    def __init__(self, checkpoint: str | Path, taxa_csv: str | Path | None = None,
                 taxa: Sequence[dict] | None = None, clap: str | None = None, model=None):
        """`checkpoint`: any layout `biovita.load_model` reads (a biovita folder, the released
        layout or `hf-hub:risashinoda/BioVITA`, an authors' `.pth`); `clap`: the CLAP base of
        the released layouts."""
        self.checkpoint = str(checkpoint)
        self.model = load_model(self.checkpoint, clap=clap, model=model)
        if taxa is None and taxa_csv:
            taxa = read_taxa_csv(taxa_csv)
        if taxa is None:
            taxa = self.model.checkpoint_metadata.get("taxa")
        if not taxa:
            raise ValueError(f"{checkpoint} records no taxa; pass a taxa CSV (--taxa)")
        self.taxa = [{k: str(t.get(k, "") or "") for k in TAXON_FIELDS} for t in taxa]
        self._labels: dict[str, tuple[list[dict], np.ndarray]] = {}

    # -- label embeddings, cached next to the checkpoint -------------------------------------
    def labels(self, rank: str) -> tuple[list[dict], np.ndarray]:
        if rank in self._labels:
            return self._labels[rank]
        col = _LEVEL_COL[rank]
        keep = [f for f in TAXON_FIELDS[: TAXON_FIELDS.index(col) + 1]]
        if rank == "species":
            keep.append("common_name")
        uniq: dict[str, dict] = {}
        for t in self.taxa:
            uniq.setdefault(t[col], {k: t[k] for k in keep})
        names = sorted(uniq)
        key = hashlib.sha1(json.dumps([rank, names]).encode()).hexdigest()[:12]
        cache = self._cache_dir() / f"labels_{rank}_{key}.npy"
        if cache.is_file():
            emb = np.load(cache, allow_pickle=False)
        else:
            emb = self.model.embed_texts(names)
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache, emb)
            except OSError:  # read-only checkpoint folder: just do not cache
                pass
        self._labels[rank] = ([uniq[n] for n in names], emb)
        return self._labels[rank]

    def _cache_dir(self) -> Path:
        """Label embeddings are cached beside a local checkpoint folder, else in ~/.cache."""
        if Path(self.checkpoint).is_dir():
            return Path(self.checkpoint)
        key = hashlib.sha1(self.checkpoint.encode()).hexdigest()[:12]
        return Path.home() / ".cache" / "biovita" / "labels" / key

    # -- media -----------------------------------------------------------------------------
    def decode(self, data: bytes, max_pixels: int | None = None) -> tuple[str, np.ndarray]:
        """(modality, model input: log-mel or uint8 pixels) of an encoded recording or photo;
        the modality comes from the bytes (what a file is called can lie). MediaError when
        the bytes are neither, or do not decode."""
        kind = sniff(data)
        if kind in ("empty", "html"):
            raise MediaError("empty_file" if kind == "empty" else "html_page")
        if kind not in AUDIO_KINDS and kind not in IMAGE_KINDS:
            raise MediaError("not_media", f"neither a recording nor a photo ({kind})")
        if kind in AUDIO_KINDS:
            fe = self.model.audio_front_end
            return "audio", log_mel(fe)(load_clip(data, fe, "onset"))[0].numpy()
        return "image", load_image(data, self.model.image_front_end, max_pixels or MAX_IMAGE_PIXELS)

    def encode(self, modality: str, inputs: Sequence[np.ndarray]) -> np.ndarray:
        """L2-normalised embeddings (n x d) of decoded inputs of one modality, one forward."""
        x = torch.from_numpy(np.stack(inputs))
        with torch.no_grad():
            out = self.model.encode_audio(x) if modality == "audio" else self.model.encode_image(x)
        return out.float().numpy()

    def embed_bytes(self, data: bytes, max_pixels: int | None = None) -> tuple[str, np.ndarray]:
        modality, x = self.decode(data, max_pixels)
        return modality, self.encode(modality, [x])[0]

    def embed_file(self, path: str | Path) -> tuple[str, np.ndarray]:
        return self.embed_bytes(Path(path).read_bytes())

    def scale(self, modality: str) -> float:
        """The logit scale the model was trained with for this modality against text (read
        once: it is a forward of the model)."""
        if not hasattr(self, "_scales"):
            with torch.no_grad():
                self._scales = {k: float(v) for k, v in self.model.logit_scales().items()}
        return self._scales["model" if modality == "audio" else "clip"]

    def rank(self, modality: str, v: np.ndarray, rank: str | Rank = Rank.SPECIES, k: int = 5) -> list[dict]:
        """The `k` best taxa at `rank` for an embedding: taxonomy, cosine `score` and
        `probability` (softmax over every taxon of the label set at the model's logit scale,
        as pybioclip reports it)."""
        labels, emb = self.labels(Rank(rank).value)
        sims = emb @ v
        z = self.scale(modality) * (sims - sims.max())
        probs = np.exp(z) / np.exp(z).sum()
        return [{"rank": pos + 1, **labels[i], "score": float(sims[i]), "probability": float(probs[i])}
                for pos, i in enumerate(np.argsort(-sims)[:k])]

    def predict(self, paths: Sequence[str | Path] | str, rank: str | Rank = Rank.SPECIES,
                k: int = 5) -> list[dict]:
        """One dict per (file, candidate), best first: taxonomy, score, probability."""
        if isinstance(paths, (str, Path)):
            paths = [paths]
        rows = []
        for p in paths:
            try:
                modality, v = self.embed_file(p)
            except MediaError as e:
                print(f"{p}: skipped ({e.reason})", file=sys.stderr)
                continue
            rows += [{"file": str(p), "modality": modality, **r} for r in self.rank(modality, v, rank, k)]
        return rows

    @staticmethod
    def print_rows(rows: list[dict], fmt: str = "table", out=None) -> None:
        out = out or sys.stdout
        if not rows:
            return
        cols = list(rows[0].keys())
        if fmt == "csv":
            w = csv.DictWriter(out, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
            return
        def cell(r, c):
            return f"{r[c]:.4f}" if c in ("score", "probability") else str(r[c])

        widths = {c: max(len(c), *(len(cell(r, c)) for r in rows)) for c in cols}
        print("  ".join(c.ljust(widths[c]) for c in cols), file=out)
        for r in rows:
            print("  ".join(cell(r, c).ljust(widths[c]) for c in cols), file=out)
