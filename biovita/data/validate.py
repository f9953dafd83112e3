"""`biovita validate`: schema check + a full decode pass on Ray Data, with counts by reason."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from biovita.data.schema import MEDIA_TABLES, SCHEMAS, check_schema
from biovita.data.store import read_schema


def check_store_schema(root: str) -> list[str]:
    problems = []
    for table in SCHEMAS:
        try:
            schema = read_schema(root, table)
        except FileNotFoundError as e:
            problems.append(str(e))
            continue
        problems += check_schema(table, schema)
    return problems


def validate_store(root: str, json_out: str | None = None, echo: bool = True) -> tuple[bool, dict]:
    """(schema ok, {"audio": {"good", "bad", "reasons"}, "image": {...}}); bad media alone is
    not an error."""
    from biovita.data.datasets import audio_dataset, image_dataset
    from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec
    from biovita.data.stats import bad_media_counts, drop_media_stats, media_stats
    from biovita.frontends.audio import AudioFrontEnd
    from biovita.frontends.image import ImageFrontEnd
    from biovita.runtime import init_ray

    problems = check_store_schema(root)
    report: dict = {"root": str(root), "schema_problems": problems}
    if problems:
        if echo:
            for p in problems:
                print(f"schema: {p}")
        if json_out:
            Path(json_out).write_text(json.dumps(report, indent=1))
        return False, report
    init_ray()
    name = f"biovita-validate-{uuid.uuid4().hex[:8]}"
    media_stats(name)
    try:
        datasets = {
            "audio": audio_dataset(root, AudioDecodeSpec(AudioFrontEnd(), mode="onset", prompts="none",
                                                         stats_name=name), split=None),
            "image": image_dataset(root, ImageDecodeSpec(ImageFrontEnd(), prompts="none",
                                                         stats_name=name), split=None),
        }
        for table in MEDIA_TABLES:
            good = 0
            for b in datasets[table].select_columns(["id"]).iter_batches(batch_size=256):
                good += len(b["id"])
            report[table] = {"good": good}
        snap = bad_media_counts(name)
    finally:
        drop_media_stats(name)
    for table in MEDIA_TABLES:
        reasons = snap["bad"].get(table, {})
        report[table].update(bad=sum(reasons.values()), reasons=reasons,
                             examples={k.split(":", 1)[1]: v for k, v in snap["examples"].items()
                                       if k.startswith(table + ":")})
        if echo:
            print(f"{table}: good {report[table]['good']}, bad {report[table]['bad']}"
                  + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    return True, report
