"""Is a store whole? Its structure (every shard's footer and schema, which tables are there),
read from metadata alone, and `biovita validate`'s full decode pass on Ray Data."""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from biovita.data.datasets import audio_dataset, image_dataset
from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec
from biovita.data.schema import MEDIA_TABLES, SCHEMAS, check_schema
from biovita.data.stats import bad_media_counts, drop_media_stats, media_stats
from biovita.data.store import shards, table_files, table_uri, unreadable_shards
from biovita.errors import StoreError
from biovita.frontends.audio import AudioFrontEnd
from biovita.frontends.image import ImageFrontEnd
from biovita.runtime import init_ray


@dataclass
class StoreHealth:
    """What a store holds: the tables with no shard at all (`absent`: a store fetched from a
    clip list alone has no images), and each damaged shard, path -> why (`truncated`: its
    footer does not read; `schema`: its columns are not the store's)."""

    root: str
    absent: list[str] = field(default_factory=list)
    truncated: dict[str, str] = field(default_factory=dict)
    schema: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return ([f"{t}: absent (no Parquet files under {table_uri(self.root, t)})" for t in self.absent]
                + [f"{p}: {why}" for p, why in self.truncated.items()]
                + [f"{p}: schema: {why}" for p, why in self.schema.items()])

    def skipped_counts(self) -> dict[str, int]:
        """Truncated shards by table, as MLflow metrics (`skipped/store/<table>/truncated`)."""
        out: dict[str, int] = {}
        for path in self.truncated:
            table = next((t for t in SCHEMAS if f"/{t}/" in path), "other")
            out[f"skipped/store/{table}/truncated"] = out.get(f"skipped/store/{table}/truncated", 0) + 1
        return out

    def require(self, tables, what: str) -> None:
        """Refuse the store (one StoreError naming every file) when a table `what` needs is
        absent or a shard of it has another schema; a truncated shard is skipped, not refused."""
        absent = [t for t in tables if t in self.absent]
        wrong = {p: why for p, why in self.schema.items()
                 if any(f"/{t}/" in p for t in tables)}
        if absent or wrong:
            lines = ([f"{t}: absent (no Parquet files under {table_uri(self.root, t)})" for t in absent]
                     + [f"{p}: schema: {why}" for p, why in wrong.items()])
            raise StoreError(f"the store at {self.root} cannot be used for {what}:\n  "
                             + "\n  ".join(lines))


def check_store(root: str) -> StoreHealth:
    """Every shard's footer and schema, from metadata alone (no media read)."""
    health = StoreHealth(str(root))
    for table in SCHEMAS:
        if not table_files(root, table):
            health.absent.append(table)
            continue
        for shard in shards(root, table):
            problems = check_schema(table, shard.schema)
            if problems:
                health.schema[shard.path] = "; ".join(p.split(": ", 1)[1] for p in problems)
    health.truncated = unreadable_shards(root)
    return health


def validate_store(root: str, json_out: str | None = None, echo: bool = True) -> tuple[bool, dict]:
    """(usable, report): the store's structure (absent tables, damaged shards named with why)
    and a decode pass of every readable shard, good/bad counts by reason. Absent tables and
    bad media alone are no error; a damaged shard is."""
    health = check_store(root)
    report: dict = {"root": str(root), **asdict(health)}
    if echo:
        for line in health.lines():
            print(f"store: {line}")
    present = [t for t in MEDIA_TABLES if t not in health.absent]
    if present:
        init_ray()
        name = f"biovita-validate-{uuid.uuid4().hex[:8]}"
        media_stats(name)
        try:
            datasets = {
                "audio": lambda: audio_dataset(root, AudioDecodeSpec(AudioFrontEnd(), mode="onset",
                                                                     prompts="none", stats_name=name), split=None),
                "image": lambda: image_dataset(root, ImageDecodeSpec(ImageFrontEnd(), prompts="none",
                                                                     stats_name=name), split=None),
            }
            for table in present:
                good = sum(len(b["id"]) for b in datasets[table]().select_columns(["id"])
                           .iter_batches(batch_size=256))
                report[table] = {"good": good}
            snap = bad_media_counts(name)
        finally:
            drop_media_stats(name)
        for table in present:
            reasons = snap["bad"].get(table, {})
            report[table].update(bad=sum(reasons.values()), reasons=reasons,
                                 examples={k.split(":", 1)[1]: v for k, v in snap["examples"].items()
                                           if k.startswith(table + ":")})
            if echo:
                print(f"{table}: good {report[table]['good']}, bad {report[table]['bad']}"
                      + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())) + ")"
                         if reasons else ""))
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1))
    return not (health.truncated or health.schema), report
