"""Planning `biovita fetch` (no Ray, no network): the URL lists read into store rows with
their ids and species, and what an existing store already holds."""

from __future__ import annotations

import csv
import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from biovita.data.convert import ConvertReport, release_rows
from biovita.data.store import filesystem, table_files, table_uri
from biovita.errors import FetchError
from biovita.taxonomy import RANKS, folder_name, species_key

IMAGE_URL_COLUMNS = ("url", "image_url", "download_url", "photo_url", "identifier")
IMAGE_SPECIES_COLUMNS = ("accepted_name", "scientific_name", "species", "taxon_name")
IMAGE_ID_COLUMNS = ("image_id", "photo_id", "id", "file_name")
LEDGER = "_fetch"  # STORE/_fetch/rejected/*.parquet: rows rejected by earlier runs
SHARD = re.compile(r"part-fetch-([0-9a-f]{12})-(\d+)\.parquet$")


@dataclass(frozen=True)
class Item:
    """One row to download: where it goes in the store and what it is."""

    table: str  # "audio" | "image"
    id: str
    url: str
    key: str  # species key
    source: str = ""
    recording_id: str = ""


def pick_column(found: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                path: str) -> str:
    """`wanted` when given (must exist), else the first candidate present; the error lists
    the columns the file has."""
    options = (wanted,) if wanted else candidates
    for c in options:
        if c in found:
            return c
    raise FetchError(f"{path}: no {what} column (looked for {', '.join(options)}; "
                     f"the file has: {', '.join(found) or 'no header'}); name it with the option")


def plan_clips(csv_path: str, report: ConvertReport) -> tuple[list[Item], dict[str, dict]]:
    """The clip list (the release's metadata.csv): items and the taxa they name."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    pick_column(header, "download_url", (), "download_url", csv_path)
    items, taxa = [], {}
    for n, r, row in release_rows(csv_path, report):
        url = (r.get("download_url") or "").strip()
        if not url:
            report.skip("csv", "no_url", f"clips row {n}")
            continue
        taxa.setdefault(row.key, row.taxonomy)
        items.append(Item("audio", row.media_id, url, row.key, row.source, row.recording_id))
    return items, taxa


def plan_images(csv_path: str, taxa: dict[str, dict], report: ConvertReport,
                url_column: str | None = None, species_column: str | None = None) -> list[Item]:
    """The image list: each row's species by the release's key (first two words of the
    name, lower-cased). A species the clip list does not name is added when the row has its
    ranks (class, order, family, genus), else the row is counted under `unknown_species`."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        found = list(reader.fieldnames or [])
        url_col = pick_column(found, url_column, IMAGE_URL_COLUMNS, "image URL", csv_path)
        sp_col = pick_column(found, species_column, IMAGE_SPECIES_COLUMNS, "species name", csv_path)
        id_col = next((c for c in IMAGE_ID_COLUMNS if c in found and c != url_col), None)
        rows = list(reader)
    ranks = all(c in found for c in RANKS[:-1])
    items = []
    for n, r in enumerate(rows, start=2):
        url = (r.get(url_col) or "").strip()
        # accepted_name wins over scientific_name, as in the clip list
        if sp_col in ("accepted_name", "scientific_name"):
            name = (r.get("accepted_name") or "").strip() or (r.get("scientific_name") or "").strip()
        else:
            name = (r.get(sp_col) or "").strip()
        key = species_key(name, None)
        if not url or not key:
            report.skip("csv", "no_url" if not url else "no_species_name", f"images row {n}")
            continue
        if key not in taxa:
            if not ranks:
                report.skip("csv", "unknown_species", f"images row {n}: {key}")
                continue
            words = " ".join(name.split()[:2])
            taxa[key] = {**{c: r[c] for c in RANKS[:-1]}, "scientific_name": words,
                         "common_name": r.get("com") or r.get("common_name") or ""}
        stem = Path((r.get(id_col) or "").strip()).stem if id_col else ""
        stem = stem or hashlib.sha1(url.encode()).hexdigest()[:16]
        items.append(Item("image", f"img_{folder_name(key)}_{stem}", url, key))
    return items


def dedupe(items: list[Item], report: ConvertReport) -> list[Item]:
    seen, out = set(), []
    for it in items:
        if (it.table, it.id) in seen:
            report.skip("csv", "duplicate_id", f"{it.table} {it.id}")
            continue
        seen.add((it.table, it.id))
        out.append(it)
    return out


def grid(items: list[Item], seed: int, chunk_rows: int) -> list[tuple[str, list[Item]]]:
    """The whole list cut into fixed chunks: a seeded shuffle (lists come grouped by species
    and host; the store should not), then `chunk_rows` at a time, each chunk named by a hash
    of its ids. The same list, seed and size give the same chunks on every run whatever is
    fetched already, so a re-run writes a chunk's rows under the name a killed run would have
    used: a late shard of the killed run replaces the re-run's (the same rows) instead of
    adding them twice. Another list or size gives other names, never a collision."""
    order = list(items)
    random.Random(seed).shuffle(order)
    out = []
    for s in range(0, len(order), chunk_rows):
        chunk = order[s:s + chunk_rows]
        digest = hashlib.sha1("\n".join(f"{i.table}:{i.id}" for i in chunk).encode()).hexdigest()
        out.append((digest[:12], chunk))
    return out


def shard_name(chunk: str, generation: int) -> str:
    """A chunk's shard: generation 0 holds its first run's good rows, 1 the rows a later run
    got of those that failed, and so on (per table)."""
    return f"part-fetch-{chunk}-{generation}.parquet"


@dataclass
class StoreState:
    """What a store holds for `fetch`: ids written per table, {id: reason} of rows rejected
    by earlier runs, and the next shard generation of each (table, chunk)."""

    done: dict[str, set[str]]
    rejected: dict[str, str]
    generations: dict[tuple[str, str], int]

    def generation(self, table: str, chunk: str) -> int:
        return self.generations.get((table, chunk), 0)


def store_state(out: str) -> StoreState:
    import pyarrow.parquet as pq

    done, generations = {}, {}
    for table in ("audio", "image"):
        fs, _ = filesystem(table_uri(out, table))
        files = table_files(out, table)
        done[table] = {i for f in files
                       for i in pq.read_table(f, columns=["id"], filesystem=fs)["id"].to_pylist()}
        for f in files:
            if m := SHARD.search(f):
                key = (table, m.group(1))
                generations[key] = max(generations.get(key, 0), int(m.group(2)) + 1)
    rejected = {}
    fs, _ = filesystem(table_uri(out, LEDGER))
    for f in table_files(out, f"{LEDGER}/rejected"):
        t = pq.read_table(f, columns=["id", "reason"], filesystem=fs)
        rejected.update(zip(t["id"].to_pylist(), t["reason"].to_pylist()))
    return StoreState(done, rejected, generations)
