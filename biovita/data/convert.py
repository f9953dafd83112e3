"""Convert the official BioVITA release layout into the Parquet media store.

Input: the release CSV (`download_url, source, recording_id, file_name, scientific_name,
accepted_name, class, order, family, genus, com`) whose `file_name` points to downloaded audio
(relative to `--audio-dir`, or absolute), and images in one folder per species under
`--image-dir` (folder names as `biovita.taxonomy.folder_name`).

Every medium is decoded once here; what cannot be decoded is not written and is counted by
reason, as are CSV rows with no species name or a missing file. Decoding runs in a process
pool and shards are written as they fill, so memory stays bounded.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from biovita.data.sampling import stable_hash
from biovita.data.schema import TRAIT_COLUMNS
from biovita.data.store import ShardWriter, write_table
from biovita.errors import MediaError
from biovita.frontends.audio import read_audio
from biovita.frontends.image import MAX_IMAGE_PIXELS, read_image
from biovita.taxonomy import folder_name, species_key

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
CSV_COLUMNS = ("source", "recording_id", "file_name", "scientific_name", "accepted_name",
               "class", "order", "family", "genus", "com")


@dataclass
class ConvertReport:
    written: Counter = field(default_factory=Counter)
    skipped: dict[str, Counter] = field(default_factory=lambda: {"audio": Counter(), "image": Counter(),
                                                                 "csv": Counter()})
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, table: str, reason: str, what: str) -> None:
        self.skipped[table][reason] += 1
        ex = self.examples.setdefault(f"{table}:{reason}", [])
        if len(ex) < 5:
            ex.append(what)

    def as_dict(self) -> dict:
        return {"written": dict(self.written),
                "skipped": {t: dict(c) for t, c in self.skipped.items()},
                "examples": self.examples}

    def summary(self) -> str:
        lines = [f"written: {dict(self.written)}"]
        for table, c in self.skipped.items():
            if c:
                lines.append(f"skipped {table}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())))
        return "\n".join(lines)

    def write(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=1))


def _check_audio(path: str) -> tuple[str, bytes | None, str]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return path, None, f"unreadable: {e}"
    try:
        read_audio(data)
    except MediaError as e:
        return path, None, e.reason
    return path, data, ""


def _check_image(args: tuple[str, int]) -> tuple[str, bytes | None, str]:
    path, max_pixels = args
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return path, None, f"unreadable: {e}"
    try:
        read_image(data, max_pixels)
    except MediaError as e:
        return path, None, e.reason
    return path, data, ""


def _fmt(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "tif": "tiff"}.get(ext, ext)


@dataclass(frozen=True)
class ReleaseRow:
    """One clip of the release CSV: its species key, media id and taxonomy."""

    key: str  # species key (first two words of accepted_name, else scientific_name)
    media_id: str  # {source}_{recording_id}
    source: str
    recording_id: str
    taxonomy: dict


def release_rows(csv_path: str, report: ConvertReport) -> list[tuple[int, dict, ReleaseRow]]:
    """(CSV line number, raw row, parsed row) of every row that names a species; the others
    are counted under `no_species_name`."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)
    out = []
    for n, r in enumerate(rows, start=2):
        key = species_key(r.get("accepted_name"), r.get("scientific_name"))
        if not key:
            report.skip("csv", "no_species_name", f"row {n}")
            continue
        name = " ".join((r.get("accepted_name") or r.get("scientific_name")).split()[:2])
        source = (r.get("source") or "").strip()
        rec = (r.get("recording_id") or "").strip() or Path(r.get("file_name") or "").stem
        taxonomy = {"class": r["class"], "order": r["order"], "family": r["family"],
                    "genus": r["genus"], "scientific_name": name, "common_name": r.get("com") or ""}
        media_id = f"{source}_{rec}" if source else rec
        out.append((n, r, ReleaseRow(key, media_id, source, rec, taxonomy)))
    return out


@dataclass(frozen=True)
class Splits:
    """Train/test assignment: unseen species are test only; otherwise a seeded hash of the
    media id puts `test_fraction` of the media in test (stable across re-runs and tools)."""

    seed: int = 0
    test_fraction: float = 0.1
    unseen: frozenset[str] = frozenset()

    @classmethod
    def read(cls, seed: int, test_fraction: float, unseen_file: str | None) -> "Splits":
        keys = set()
        if unseen_file:
            keys = {species_key(s, None) for s in Path(unseen_file).read_text().splitlines() if s.strip()}
        return cls(seed, test_fraction, frozenset(keys))

    def __call__(self, key: str, media_id: str) -> str:
        if key in self.unseen:
            return "test"
        hashed = stable_hash(f"{self.seed}:{media_id}") % 10_000
        return "test" if hashed < self.test_fraction * 10_000 else "train"


def species_ids(taxa: dict[str, dict]) -> dict[str, int]:
    """species_id of each species key: its index in sorted order (the same in every tool)."""
    return {k: i for i, k in enumerate(sorted(taxa))}


def write_taxa(out: str, taxa: dict[str, dict], splits: Splits) -> None:
    """The taxa table; traits are not part of the release CSV: -1 marks "unknown"."""
    ids = species_ids(taxa)
    write_table(out, "taxa", [{"species_id": ids[k], **taxa[k], "seen": k not in splits.unseen,
                               **{c: -1 for c in TRAIT_COLUMNS}} for k in sorted(taxa)])


def image_folder_jobs(image_dir: str, taxa: dict[str, dict], report: ConvertReport
                      ) -> list[tuple[str, str]]:
    """(image path, species key) for every image in a species folder the CSV knows."""
    folders = {folder_name(k): k for k in taxa}
    jobs: list[tuple[str, str]] = []
    for d in sorted(Path(image_dir).iterdir()) if Path(image_dir).is_dir() else []:
        if not d.is_dir():
            continue
        if d.name not in folders:
            report.skip("image", "unknown_species_folder", str(d))
            continue
        jobs += [(str(f), folders[d.name]) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_EXTS]
    return jobs


def convert_release(
    csv_path: str, audio_dir: str, image_dir: str, out: str, seed: int = 0,
    test_fraction: float = 0.1, unseen_species: str | None = None,
    max_image_pixels: int = MAX_IMAGE_PIXELS, rows_per_shard: int = 256, workers: int | None = None,
) -> ConvertReport:
    report = ConvertReport()
    splits = Splits.read(seed, test_fraction, unseen_species)
    taxa: dict[str, dict] = {}
    audio_jobs: list[tuple[str, ReleaseRow]] = []
    for n, r, row in release_rows(csv_path, report):
        fname = (r.get("file_name") or "").strip()
        path = fname if os.path.isabs(fname) else os.path.join(audio_dir, fname)
        if not fname or not os.path.isfile(path):
            report.skip("csv", "missing_file", f"row {n}: {fname}")
            continue
        taxa.setdefault(row.key, row.taxonomy)
        audio_jobs.append((path, row))
    ids = species_ids(taxa)
    # written in a shuffled (seeded) order: release CSVs and image folders come grouped by
    # species, and a species-sorted store would give training batches of one species each
    shuffle = random.Random(seed).shuffle
    shuffle(audio_jobs)
    image_jobs = image_folder_jobs(image_dir, taxa, report)
    shuffle(image_jobs)
    with ProcessPoolExecutor(workers or os.cpu_count() or 1) as pool:
        audio, seen_ids = ShardWriter(out, "audio", rows_per_shard), set()
        for (path, row), (_, data, reason) in zip(
                audio_jobs, pool.map(_check_audio, [p for p, _ in audio_jobs], chunksize=16)):
            if data is None or row.media_id in seen_ids:
                report.skip("audio", "duplicate_id" if data else reason.split(":")[0], path)
                continue
            seen_ids.add(row.media_id)
            audio.add({"id": row.media_id, "bytes": data, "format": _fmt(path), "source": row.source,
                       "recording_id": row.recording_id, **taxa[row.key],
                       "species_id": ids[row.key], "split": splits(row.key, row.media_id)})
            report.written["audio"] += 1
        audio.close()
        images = ShardWriter(out, "image", rows_per_shard)
        for (path, key), (_, data, reason) in zip(image_jobs, pool.map(
                _check_image, [(p, max_image_pixels) for p, _ in image_jobs], chunksize=16)):
            if data is None:
                report.skip("image", reason.split(":")[0], path)
                continue
            media_id = f"img_{folder_name(key)}_{Path(path).stem}"
            images.add({"id": media_id, "bytes": data, "format": _fmt(path), **taxa[key],
                        "species_id": ids[key], "split": splits(key, media_id)})
            report.written["image"] += 1
        images.close()
    write_taxa(out, taxa, splits)
    report.written["taxa"] = len(taxa)
    return report
