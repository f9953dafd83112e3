"""`biovita fetch`: the release's URL lists (`train/metadata.csv`, `train/image_urls.csv`)
downloaded into a Parquet store by a Ray Data job.

- The lists are planned on the driver: clips keep the ids, taxonomy and split rule of
  `biovita convert` (`{source}_{recording_id}`); image rows map to species by the release's
  species key, so a fetched store and a converted one hold the same species ids.
- Chunks of rows go to a pool of fetcher actors; each downloads its rows on threads within a
  cluster-wide per-host schedule (one small actor: concurrency cap, request rate, Retry-After
  pauses), checks each body by decoding it, and writes the good rows as one store shard
  `part-fetch-<chunk>.parquet`, all or nothing (a local file is renamed into place; an
  object-store PUT is atomic), then the rejected rows to `_fetch/rejected/`.
- State is the store itself: a re-run skips every id already in a shard and every id rejected
  before (unless asked to retry those), and tries again what failed (timeouts, 5xx, 429 after
  its retries). A job killed at any point loses no written row and, since written ids are
  skipped, writes none twice.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import secrets
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from biovita.data.convert import ConvertReport, Splits, release_rows, species_ids, write_taxa
from biovita.data.http import Download, FetchPolicy, HostSchedule, download
from biovita.data.schema import SCHEMAS
from biovita.data.store import filesystem, table_files, table_uri, write_part
from biovita.frontends.image import MAX_IMAGE_PIXELS
from biovita.frontends.sniff import sniff
from biovita.taxonomy import RANKS, folder_name, species_key

IMAGE_URL_COLUMNS = ("url", "image_url", "download_url", "photo_url", "identifier")
IMAGE_SPECIES_COLUMNS = ("accepted_name", "scientific_name", "species", "taxon_name")
IMAGE_ID_COLUMNS = ("image_id", "photo_id", "id", "file_name")
LEDGER = "_fetch"
FORMATS = {"mp4": "m4a"}  # sniffed container -> the store's `format`


class FetchError(ValueError):
    """A URL list that cannot be fetched as given (raised before any download starts)."""


@dataclass(frozen=True)
class Item:
    """One row to download: where it goes in the store and what it is."""

    table: str  # "audio" | "image"
    id: str
    url: str
    key: str  # species key
    source: str = ""
    recording_id: str = ""


# ----------------------------------------------------------------------------- planning


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


def store_state(out: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """(ids written per table, {id: reason} of rows rejected by earlier runs)."""
    import pyarrow.parquet as pq

    done = {}
    for table in ("audio", "image"):
        fs, _ = filesystem(table_uri(out, table))
        done[table] = {i for f in table_files(out, table)
                       for i in pq.read_table(f, columns=["id"], filesystem=fs)["id"].to_pylist()}
    rejected = {}
    fs, _ = filesystem(table_uri(out, LEDGER))
    for f in table_files(out, f"{LEDGER}/rejected"):
        t = pq.read_table(f, columns=["id", "reason"], filesystem=fs)
        rejected.update(zip(t["id"].to_pylist(), t["reason"].to_pylist()))
    return done, rejected


# ----------------------------------------------------------------------------- the workers


class RayGate:
    """The cluster-wide host schedule as seen from a fetcher thread."""

    def __init__(self, handle):
        self.handle = handle

    def acquire(self, host: str) -> None:
        import ray

        ray.get(self.handle.acquire.remote(host))

    def release(self, host: str, pause_s: float = 0.0) -> None:
        self.handle.release.remote(host, pause_s)


def gate_actor(policy: FetchPolicy):
    """One small async actor holding the HostSchedule of every fetcher in the cluster."""
    import asyncio

    import ray

    @ray.remote(num_cpus=0, max_concurrency=10_000)
    class HostGate:
        def __init__(self, concurrency: int, rate: float):
            self.schedule = HostSchedule(concurrency, rate)

        async def acquire(self, host: str) -> None:
            while (wait := self.schedule.try_acquire(host, time.monotonic())) > 0:
                await asyncio.sleep(min(wait, 0.5))

        async def release(self, host: str, pause_s: float = 0.0) -> None:
            self.schedule.release(host, time.monotonic(), pause_s)

    return HostGate.remote(policy.host_concurrency, policy.host_rate)


def check_body(table: str, body: bytes, max_pixels: int) -> tuple[str, str]:
    """(store format, "") for a body that decodes as the table's media, else ("", reason)."""
    from biovita.errors import MediaError
    from biovita.frontends.audio import read_audio
    from biovita.frontends.image import read_image

    try:
        read_audio(body) if table == "audio" else read_image(body, max_pixels)
    except MediaError as e:
        return "", e.reason
    kind = sniff(body)
    return FORMATS.get(kind, kind), ""


class ChunkFetcher:
    """A Ray Data actor: downloads one chunk of rows, writes its good rows as one shard and
    its rejected rows to the ledger, and returns one outcome row per item (no media)."""

    def __init__(self, out: tuple, policy: FetchPolicy, gate, taxa: dict[str, dict],
                 splits: Splits, threads: int = 8, max_pixels: int = MAX_IMAGE_PIXELS):
        # out: (filesystem, root) made on the driver: an object store's credentials travel with it
        (self.fs, self.root), self.policy, self.gate = out, policy, RayGate(gate)
        self.taxa, self.splits, self.max_pixels = taxa, splits, max_pixels
        self.pool = ThreadPoolExecutor(threads)

    def _one(self, item: Item) -> tuple[Item, Download, str]:
        got = download(item.url, self.policy, self.gate)
        fmt = ""
        if got.outcome == "ok":
            fmt, why = check_body(item.table, got.body, self.max_pixels)
            if why:
                got = Download(got.url, "rejected", why, status=got.status, attempts=got.attempts)
        return item, got, fmt

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = {k: [] for k in ("table", "id", "host", "outcome", "reason", "attempts", "bytes")}
        for chunk, payload in zip(batch["chunk"], batch["items"]):
            items = [Item(**d) for d in json.loads(payload)]
            results = list(self.pool.map(self._one, items))
            self._write(str(chunk), results)
            for item, got, _ in results:
                for k, v in (("table", item.table), ("id", item.id), ("host", got.host),
                             ("outcome", got.outcome), ("reason", got.reason),
                             ("attempts", got.attempts), ("bytes", len(got.body or b""))):
                    rows[k].append(v)
        return {k: np.array(v) for k, v in rows.items()}

    def _write(self, chunk: str, results: list[tuple[Item, Download, str]]) -> None:
        import pyarrow as pa

        good = defaultdict(list)
        for item, got, fmt in results:
            if got.outcome != "ok":
                continue
            tax = self.taxa[item.key]
            row = {"id": item.id, "bytes": got.body, "format": fmt,
                   **{k: v for k, v in tax.items() if k not in ("species_id",)},
                   "species_id": tax["species_id"], "split": self.splits(item.key, item.id)}
            if item.table == "audio":
                row.update(source=item.source, recording_id=item.recording_id)
            good[item.table].append(row)
        for table, table_rows in good.items():  # the media first: they are the state
            base = f"{self.root}/{table}"
            self.fs.create_dir(base, recursive=True)
            write_part(self.fs, f"{base}/part-fetch-{chunk}.parquet", SCHEMAS[table], table_rows,
                       atomic=True)
        rejected = [{"id": i.id, "table": i.table, "url": i.url, "reason": g.reason}
                    for i, g, _ in results if g.outcome == "rejected"]
        if rejected:
            base = f"{self.root}/{LEDGER}/rejected"
            self.fs.create_dir(base, recursive=True)
            schema = pa.schema([(c, pa.string()) for c in ("id", "table", "url", "reason")])
            write_part(self.fs, f"{base}/{chunk}.parquet", schema, rejected, atomic=True)


# ----------------------------------------------------------------------------- the job


@dataclass
class FetchReport:
    """Counts of one run, by outcome and reason, per table and per host."""

    planned: dict[str, int] = field(default_factory=dict)
    already: dict[str, int] = field(default_factory=lambda: {"written": 0, "rejected": 0})
    outcomes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    reasons: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    hosts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    csv: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, row: dict) -> None:
        t, o = row["table"], row["outcome"]
        self.outcomes[t][o] += 1
        if row["reason"]:
            self.reasons[f"{t}:{o}"][row["reason"]] += 1
        h = self.hosts[row["host"] or "?"]
        h[o] += 1
        h["requests"] += int(row["attempts"])
        h["bytes"] += int(row["bytes"])

    def as_dict(self) -> dict:
        return {"planned": self.planned, "already": self.already, "list_rows_skipped": self.csv,
                "seconds": round(self.seconds, 1),
                **{k: {a: dict(b) for a, b in getattr(self, k).items()}
                   for k in ("outcomes", "reasons", "hosts")}}

    def summary(self) -> str:
        lines = [f"{t}: " + ", ".join(f"{o} {n}" for o, n in sorted(c.items()))
                 for t, c in sorted(self.outcomes.items())]
        lines += [f"  {k}: " + ", ".join(f"{r} {n}" for r, n in c.most_common())
                  for k, c in sorted(self.reasons.items())]
        if any(self.already.values()):
            lines.append(f"already in the store: {self.already['written']} written, "
                         f"{self.already['rejected']} rejected before (not retried)")
        if self.csv:
            lines.append("list rows skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.csv.items())))
        return "\n".join(lines) or "nothing to fetch"


def fetch_release(clips: str | None, out: str, images: str | None = None,
                  policy: FetchPolicy = FetchPolicy(), *, url_column: str | None = None,
                  species_column: str | None = None, seed: int = 0, test_fraction: float = 0.1,
                  unseen_species: str | None = None, retry_rejected: bool = False,
                  chunk_rows: int = 32, actors: int = 4, threads: int = 8,
                  max_image_pixels: int = MAX_IMAGE_PIXELS, progress: bool | None = None,
                  mlflow_uri: str | None = None) -> FetchReport:
    """Download what the store lacks of the lists into `out`; see the module docstring."""
    import ray

    from biovita.runtime import init_ray

    if not clips and not images:
        raise FetchError("nothing to fetch: give --clips and/or --images")
    t0 = time.time()
    plan_report, taxa, items = ConvertReport(), {}, []
    if clips:
        items, taxa = plan_clips(clips, plan_report)
    if images:
        items += plan_images(images, taxa, plan_report, url_column, species_column)
    items = dedupe(items, plan_report)
    splits = Splits.read(seed, test_fraction, unseen_species)
    ids = species_ids(taxa)
    write_taxa(out, taxa, splits)
    done, rejected = store_state(out)
    report = FetchReport(planned=dict(Counter(i.table for i in items)), csv=dict(plan_report.skipped["csv"]))
    todo = []
    for it in items:
        if it.id in done[it.table]:
            report.already["written"] += 1
        elif it.id in rejected and not retry_rejected:
            report.already["rejected"] += 1
        else:
            todo.append(it)
    # a seeded shuffle: lists come grouped by species (and by host), the store should not
    random.Random(seed).shuffle(todo)
    run = time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    chunks = [{"chunk": f"{run}-{n:06d}", "items": json.dumps([asdict(i) for i in todo[s:s + chunk_rows]])}
              for n, s in enumerate(range(0, len(todo), chunk_rows))]
    if chunks:
        init_ray()
        import ray.data

        taxa_ids = {k: {**v, "species_id": ids[k]} for k, v in taxa.items()}
        gate = gate_actor(policy)
        ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
            ChunkFetcher, batch_size=1, num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(chunks)))),
            fn_constructor_kwargs={"out": filesystem(out), "policy": policy, "gate": gate, "taxa": taxa_ids,
                                   "splits": splits, "threads": threads,
                                   "max_pixels": max_image_pixels})
        ds.context.enable_progress_bars = False  # ours says more: outcomes and bytes
        with Progress(len(todo), progress) as bar:
            for row in ds.iter_rows():
                report.add(row)
                bar.update(report)
        ray.kill(gate)
    report.seconds = time.time() - t0
    ledger = Path(out) / LEDGER if "://" not in out else None
    if ledger is not None:
        ledger.mkdir(parents=True, exist_ok=True)
        (ledger / f"report-{run}.json").write_text(json.dumps(report.as_dict(), indent=1))
    if mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        log_to_mlflow(report, mlflow_uri, {"clips": clips, "images": images, "out": out, **asdict(policy)})
    return report


class Progress:
    """A bar in a terminal (files done, with ok / failed / rejected and MB in its postfix);
    in a log file, one line each 10 % of the files."""

    def __init__(self, total: int, show: bool | None):
        from biovita.runtime import interactive

        self.total, self.tty = total, interactive() if show is None else show
        self.done, self.next_line, self.bar = 0, 0.1, None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="fetch", unit="file", dynamic_ncols=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def update(self, r: FetchReport) -> None:
        self.done += 1
        counts = Counter()
        for c in r.outcomes.values():
            counts.update(c)
        mb = sum(h["bytes"] for h in r.hosts.values()) / 2**20
        text = f"ok {counts['ok']} failed {counts['failed']} rejected {counts['rejected']} {mb:.1f} MB"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.done >= self.next_line * self.total or self.done == self.total:
            print(f"fetch: {self.done}/{self.total} files ({text})", file=sys.stderr, flush=True)
            self.next_line = self.done / self.total + 0.1


def log_to_mlflow(report: FetchReport, uri: str | None, params: dict) -> None:
    """A `fetch` run in the biovita experiment: its inputs, counts and the JSON report."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from biovita.train.tracking import RunLogger, experiment_id, find_or_create_run, resolve_tracking_uri

    uri = resolve_tracking_uri(uri or "")
    client = MlflowClient(uri)
    rid = find_or_create_run(client, experiment_id(client, "biovita", uri), "fetch",
                             {"biovita.kind": "fetch"}, reuse=False)
    log = RunLogger(uri, rid)
    log.params({k: v for k, v in params.items() if v is not None})
    metrics = {f"fetch/{t}_{o}": n for t, c in report.outcomes.items() for o, n in c.items()}
    metrics.update({f"fetch/already_{k}": v for k, v in report.already.items()}, **{"fetch/seconds": report.seconds})
    log.metrics(metrics, step=0)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fetch_report.json"
        p.write_text(json.dumps(report.as_dict(), indent=1))
        log.artifact(p)
    log.end()
