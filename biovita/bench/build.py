"""Build a BioVITA Bench folder (the official release layout) from a Parquet store.

    BENCH/ids/{audio,image}_index.csv    id, file_path (relative to BENCH)
    BENCH/ids/text_index.csv             id, species, genus, family, common_name, class
    BENCH/{species,genus,family}/test_<task>.csv
        task, taxon_level, query_payload_id, correct_taxon, candidates_taxa (JSON list),
        candidates_target_ids (JSON list of lists), taxon_class
    BENCH/media/{audio,image}/<id>.<ext>  the media the indices point to (self-contained)
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from biovita.data.store import filesystem, read_table, shards, table_uri
from biovita.data.validate import check_store
from biovita.taxonomy import LEVELS

TASKS = {
    "audio_to_text": "A2T", "text_to_audio": "T2A", "audio_to_image": "A2I",
    "image_to_audio": "I2A", "image_to_text": "I2T", "text_to_image": "T2I",
}
CODES = {v: k for k, v in TASKS.items()}
MODALITY = {"audio": "audio", "image": "image", "text": "text"}
LEVEL_COLUMN = {"species": "scientific_name", "genus": "genus", "family": "family"}


def _split_species(root: str, split: str) -> set[int]:
    taxa = read_table(root, "taxa", columns=["species_id", "seen"]).to_pydict()
    want = split == "seen"
    return {int(s) for s, seen in zip(taxa["species_id"], taxa["seen"]) if bool(seen) == want}


def _export_media(root: str, table: str, ids: set[str], out: Path) -> dict[str, tuple[str, str]]:
    """Copy the media bytes of `ids` to out/media/<table>/ (streamed shard by shard); returns
    id -> (path relative to `out`, SHA-256 of the bytes)."""
    fs, _ = filesystem(table_uri(root, table))
    folder = out / "media" / table
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for shard in shards(root, table):
        t = pq.read_table(shard.path, columns=["id", "bytes", "format"], filesystem=fs)
        t = t.filter(pc.is_in(t["id"], value_set=pa.array(sorted(ids))))
        for rid, data, fmt in zip(t["id"].to_pylist(), t["bytes"].to_pylist(), t["format"].to_pylist()):
            rel = f"media/{table}/{rid}.{fmt}"
            (out / rel).write_bytes(data)
            paths[rid] = (rel, hashlib.sha256(data).hexdigest())
    return paths


def build_benchmark(root: str, out: str | Path, candidates: int = 100, split: str = "seen",
                    seed: int = 0) -> dict:
    """Write the benchmark; returns {level: {task: n_queries}}."""
    check_store(root).require(["audio", "image", "taxa"], "a benchmark")
    out = Path(out)
    species_ok = _split_species(root, split)
    cols = ["id", "species_id", "split", "class", "family", "genus", "scientific_name", "common_name"]
    items: dict[str, list[dict]] = {}
    for table in ("audio", "image"):
        t = read_table(root, table, columns=cols).to_pylist()
        items[table] = [r for r in t if r["split"] == "test" and int(r["species_id"]) in species_ok]
    # text items: one per species of the split
    taxa = {}
    for r in items["audio"] + items["image"]:
        taxa.setdefault(int(r["species_id"]), r)
    text_rows = [{"id": f"text_{sid:06d}", "species": r["scientific_name"], "genus": r["genus"],
                  "family": r["family"], "common_name": r["common_name"], "class": r["class"]}
                 for sid, r in sorted(taxa.items())]
    items["text"] = [{"id": t["id"], "class": t["class"], "family": t["family"], "genus": t["genus"],
                      "scientific_name": t["species"]} for t in text_rows]

    (out / "ids").mkdir(parents=True, exist_ok=True)
    media: dict[str, dict[str, str]] = {}  # table -> id -> SHA-256 of the exported bytes
    for table in ("audio", "image"):
        paths = _export_media(root, table, {r["id"] for r in items[table]}, out)
        items[table] = [r for r in items[table] if r["id"] in paths]
        _write_csv(out / "ids" / f"{table}_index.csv", ["id", "file_path"],
                   [{"id": r["id"], "file_path": paths[r["id"]][0]} for r in items[table]])
        media[table] = {i: sha for i, (_, sha) in paths.items()}
    _write_csv(out / "ids" / "text_index.csv",
               ["id", "species", "genus", "family", "common_name", "class"], text_rows)

    rng = np.random.default_rng(seed)
    summary: dict[str, dict[str, int]] = {}
    for level in LEVELS:
        col = LEVEL_COLUMN[level]
        (out / level).mkdir(exist_ok=True)
        summary[level] = {}
        for task, code in TASKS.items():
            q_mod, g_mod = task.split("_to_")
            gallery: dict[str, list[str]] = defaultdict(list)
            klass: dict[str, str] = {}
            for r in items[g_mod]:
                gallery[r[col]].append(r["id"])
            for r in items[q_mod] + items[g_mod]:
                klass[r[col]] = r["class"]
            taxa_g = sorted(gallery)
            queries = items[q_mod]
            if q_mod == "text":  # one text query per taxon at this level
                seen_t: dict[str, dict] = {}
                for r in queries:
                    seen_t.setdefault(r[col], r)
                queries = list(seen_t.values())
            rows = []
            for r in queries:
                correct = r[col]
                if correct not in gallery:
                    continue
                others = [t for t in taxa_g if t != correct]
                k = min(candidates - 1, len(others))
                pick = [others[i] for i in rng.choice(len(others), size=k, replace=False)] if k else []
                cands = [correct] + pick
                order = rng.permutation(len(cands))
                cands = [cands[i] for i in order]
                rows.append({
                    "task": task, "taxon_level": level, "query_payload_id": r["id"],
                    "correct_taxon": correct, "candidates_taxa": json.dumps(cands),
                    "candidates_target_ids": json.dumps([gallery[c] for c in cands]),
                    "taxon_class": klass.get(correct, ""),
                })
            _write_csv(out / level / f"test_{task}.csv",
                       ["task", "taxon_level", "query_payload_id", "correct_taxon",
                        "candidates_taxa", "candidates_target_ids", "taxon_class"], rows)
            summary[level][code] = len(rows)
    # the store and what was exported from it: `bench run` takes an unchanged file's
    # embedding from the store's frozen-tower cache
    (out / "bench.json").write_text(json.dumps({"split": split, "candidates": candidates,
                                                "seed": seed, "queries": summary, "store": str(root),
                                                "media_sha256": media}, indent=1))
    return summary


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
