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
    from biovita.audio import decode_audio

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return path, None, f"unreadable: {e}"
    try:
        decode_audio(data)
    except MediaError as e:
        return path, None, e.reason
    return path, data, ""


def _check_image(args: tuple[str, int]) -> tuple[str, bytes | None, str]:
    from biovita.image import decode_image

    path, max_pixels = args
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return path, None, f"unreadable: {e}"
    try:
        decode_image(data, max_pixels)
    except MediaError as e:
        return path, None, e.reason
    return path, data, ""


def _fmt(path: str) -> str:
    ext = Path(path).suffix.lower().lstrip(".")
    return {"jpg": "jpeg", "tif": "tiff"}.get(ext, ext)


def convert_release(
    csv_path: str, audio_dir: str, image_dir: str, out: str, seed: int = 0,
    test_fraction: float = 0.1, unseen_species: str | None = None,
    max_image_pixels: int = 50_000_000, rows_per_shard: int = 256, workers: int | None = None,
) -> ConvertReport:
    report = ConvertReport()
    unseen = set()
    if unseen_species:
        unseen = {species_key(s, None) for s in Path(unseen_species).read_text().splitlines() if s.strip()}
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        rows = list(reader)

    taxa: dict[str, dict] = {}
    audio_jobs: list[tuple[str, dict]] = []
    for n, r in enumerate(rows, start=2):
        key = species_key(r.get("accepted_name"), r.get("scientific_name"))
        if not key:
            report.skip("csv", "no_species_name", f"row {n}")
            continue
        fname = (r.get("file_name") or "").strip()
        path = fname if os.path.isabs(fname) else os.path.join(audio_dir, fname)
        if not fname or not os.path.isfile(path):
            report.skip("csv", "missing_file", f"row {n}: {fname}")
            continue
        if key not in taxa:
            name = " ".join((r.get("accepted_name") or r.get("scientific_name")).split()[:2])
            taxa[key] = {"class": r["class"], "order": r["order"], "family": r["family"],
                         "genus": r["genus"], "scientific_name": name, "common_name": r.get("com") or ""}
        audio_jobs.append((path, {"key": key, "source": r.get("source") or "",
                                   "recording_id": r.get("recording_id") or Path(path).stem}))
    ids = {k: i for i, k in enumerate(sorted(taxa))}
    # written in a shuffled (seeded) order: release CSVs and image folders come grouped by
    # species, and a species-sorted store would give training batches of one species each
    shuffle = random.Random(seed).shuffle
    shuffle(audio_jobs)

    def split_of(key: str, media_id: str) -> str:
        if key in unseen:
            return "test"
        return "test" if stable_hash(f"{seed}:{media_id}") % 10_000 < test_fraction * 10_000 else "train"

    workers = workers or os.cpu_count() or 1
    audio = ShardWriter(out, "audio", rows_per_shard)
    seen_ids: set[str] = set()
    with ProcessPoolExecutor(workers) as pool:
        for (path, meta), (_, data, reason) in zip(
                audio_jobs, pool.map(_check_audio, [p for p, _ in audio_jobs], chunksize=16)):
            if data is None:
                report.skip("audio", reason.split(":")[0], path)
                continue
            media_id = f"{meta['source']}_{meta['recording_id']}" if meta["source"] else Path(path).stem
            if media_id in seen_ids:
                report.skip("audio", "duplicate_id", path)
                continue
            seen_ids.add(media_id)
            audio.add({"id": media_id, "bytes": data, "format": _fmt(path), "source": meta["source"],
                       "recording_id": meta["recording_id"], **taxa[meta["key"]],
                       "species_id": ids[meta["key"]], "split": split_of(meta["key"], media_id)})
            report.written["audio"] += 1
        audio.close()

        folders = {folder_name(k): k for k in taxa}
        image_jobs: list[tuple[str, str]] = []
        for d in sorted(Path(image_dir).iterdir()) if Path(image_dir).is_dir() else []:
            if not d.is_dir():
                continue
            if d.name not in folders:
                report.skip("image", "unknown_species_folder", str(d))
                continue
            for fpath in sorted(d.iterdir()):
                if fpath.suffix.lower() in IMAGE_EXTS:
                    image_jobs.append((str(fpath), folders[d.name]))
        shuffle(image_jobs)
        images = ShardWriter(out, "image", rows_per_shard)
        for (path, key), (_, data, reason) in zip(image_jobs, pool.map(
                _check_image, [(p, max_image_pixels) for p, _ in image_jobs], chunksize=16)):
            if data is None:
                report.skip("image", reason.split(":")[0], path)
                continue
            media_id = f"img_{folder_name(key)}_{Path(path).stem}"
            images.add({"id": media_id, "bytes": data, "format": _fmt(path), **taxa[key],
                        "species_id": ids[key], "split": split_of(key, media_id)})
            report.written["image"] += 1
        images.close()

    # traits are not part of the release CSV: -1 marks "unknown"
    write_table(out, "taxa", [{"species_id": ids[k], **taxa[k], "seen": k not in unseen,
                               **{c: -1 for c in TRAIT_COLUMNS}} for k in sorted(taxa)])
    report.written["taxa"] = len(taxa)
    return report
