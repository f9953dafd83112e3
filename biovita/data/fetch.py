"""`biovita fetch`: the release's URL lists (`train/metadata.csv`, `train/image_urls.csv`)
downloaded into a Parquet store by a Ray Data job.

- The lists are planned on the driver: clips keep the ids, taxonomy and split rule of
  `biovita convert` (`{source}_{recording_id}`); image rows map to species by the release's
  species key, so a fetched store and a converted one hold the same species ids.
- The whole list is cut into fixed chunks (`fetch_plan.grid`: a seeded order, each chunk
  named by a hash of its ids). Chunks with rows still to fetch go to a pool of fetcher
  actors; each downloads its rows on threads within a cluster-wide per-host schedule (one
  small actor: concurrency cap, request rate, Retry-After pauses), checks each body by
  decoding it, and writes the good rows as one shard `part-fetch-<chunk>-<generation>.parquet`
  per table, all or nothing (a local file is renamed into place; an object-store PUT is
  atomic), then the rejected rows to `_fetch/rejected/`.
- State is the store itself: a re-run skips every id already in a shard and every id rejected
  before (unless asked to retry those), and tries again what failed (timeouts, 5xx, 429 after
  its retries), as the next generation of that chunk's shard.
- One fetch per store at a time (`lease.Lease`). A job killed at any point loses no written
  row and a re-run writes none twice: a shard the killed job's leftover workers still land
  has the name the re-run gives the same rows (so it replaces, never adds), and workers stop
  writing once the re-run holds the lease.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray.data
from mlflow.tracking import MlflowClient

from biovita.data.convert import ConvertReport, Splits, species_ids, write_taxa
from biovita.data.fetch_plan import (LEDGER, Item, dedupe, grid, plan_clips, plan_images, shard_name,
                                     store_state)
from biovita.data.lease import Lease, held_by
from biovita.errors import FetchError, MediaError
from biovita.data.http import Download, FetchPolicy, HostSchedule, download
from biovita.data.schema import SCHEMAS
from biovita.data.store import filesystem, write_part
from biovita.frontends.audio import read_audio
from biovita.frontends.image import MAX_IMAGE_PIXELS, read_image
from biovita.frontends.sniff import sniff
from biovita.locations import is_remote, tracking_uri
from biovita.runtime import init_ray, interactive
from biovita.tracking.runs import RunLogger, experiment_id, find_or_create_run

FORMATS = {"mp4": "m4a"}  # sniffed container -> the store's `format`


# ----------------------------------------------------------------------------- the workers


class RayGate:
    """The cluster-wide host schedule as seen from a fetcher thread."""

    def __init__(self, handle):
        self.handle = handle

    def acquire(self, host: str) -> None:
        ray.get(self.handle.acquire.remote(host))

    def release(self, host: str, pause_s: float = 0.0) -> None:
        self.handle.release.remote(host, pause_s)


def gate_actor(policy: FetchPolicy):
    """One small async actor holding the HostSchedule of every fetcher in the cluster."""

    @ray.remote(num_cpus=0, max_concurrency=10_000)
    class HostGate:
        def __init__(self, max_in_flight: int, rate: float):
            self.schedule = HostSchedule(max_in_flight, rate)

        async def acquire(self, host: str) -> None:
            while (wait := self.schedule.try_acquire(host, time.monotonic())) > 0:
                await asyncio.sleep(min(wait, 0.5))

        async def release(self, host: str, pause_s: float = 0.0) -> None:
            self.schedule.release(host, time.monotonic(), pause_s)

    return HostGate.remote(policy.host_connections, policy.host_rate)


def check_body(table: str, body: bytes, max_pixels: int) -> tuple[str, str]:
    """(store format, "") for a body that decodes as the table's media, else ("", reason)."""
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
                 splits: Splits, lease: tuple[str, str], threads: int = 8,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        # out: (filesystem, root) made on the driver: an object store's credentials travel with it
        (self.fs, self.root), self.policy, self.gate = out, policy, RayGate(gate)
        self.lease_path, self.run = lease
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
        rows = {k: [] for k in ("table", "id", "host", "outcome", "reason", "attempts", "bytes")}
        for chunk, gens, payload in zip(batch["chunk"], batch["generations"], batch["items"]):
            items = [Item(**d) for d in json.loads(payload)]
            results = list(self.pool.map(self._one, items))
            if held_by(self.fs, self.lease_path) != self.run:
                # this job was presumed dead and another took the store over: write nothing
                results = [(i, Download(g.url, "failed", "store_taken_over", status=g.status,
                                        attempts=g.attempts), f) for i, g, f in results]
            self._write(str(chunk), json.loads(gens), results)
            for item, got, _ in results:
                for k, v in (("table", item.table), ("id", item.id), ("host", got.host),
                             ("outcome", got.outcome), ("reason", got.reason),
                             ("attempts", got.attempts), ("bytes", len(got.body or b""))):
                    rows[k].append(v)
        return {k: np.array(v) for k, v in rows.items()}

    def _write(self, chunk: str, gens: dict[str, int], results: list[tuple[Item, Download, str]]) -> None:
        good = defaultdict(list)
        for item, got, fmt in results:
            if got.outcome != "ok":
                continue
            tax = self.taxa[item.key]
            row = {"id": item.id, "bytes": got.body, "format": fmt, **tax,
                   "split": self.splits(item.key, item.id)}
            if item.table == "audio":
                row.update(source=item.source, recording_id=item.recording_id)
            good[item.table].append(row)
        for table, table_rows in good.items():  # the media first: they are the state
            base = f"{self.root}/{table}"
            self.fs.create_dir(base, recursive=True)
            write_part(self.fs, f"{base}/{shard_name(chunk, gens[table])}", SCHEMAS[table],
                       table_rows, atomic=True)
        rejected = [{"id": i.id, "table": i.table, "url": i.url, "reason": g.reason}
                    for i, g, _ in results if g.outcome == "rejected"]
        if rejected:
            base = f"{self.root}/{LEDGER}/rejected"
            self.fs.create_dir(base, recursive=True)
            schema = pa.schema([(c, pa.string()) for c in ("id", "table", "url", "reason")])
            write_part(self.fs, f"{base}/{chunk}-{max(gens.values())}.parquet", schema, rejected,
                       atomic=True)


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
    report = FetchReport(planned=dict(Counter(i.table for i in items)), csv=dict(plan_report.skipped["csv"]))
    run = time.strftime("%Y%m%d%H%M%S") + secrets.token_hex(2)
    with Lease(out, run) as lease:
        write_taxa(out, taxa, splits)
        state = store_state(out)  # read under the lease: nobody else writes from here on
        chunks = []
        for name, chunk in grid(items, seed, chunk_rows):
            todo = []
            for it in chunk:
                if it.id in state.done[it.table]:
                    report.already["written"] += 1
                elif it.id in state.rejected and not retry_rejected:
                    report.already["rejected"] += 1
                else:
                    todo.append(it)
            if todo:
                gens = {t: state.generation(t, name) for t in ("audio", "image")}
                chunks.append({"chunk": name, "generations": json.dumps(gens),
                               "items": json.dumps([asdict(i) for i in todo])})
        if chunks:
            _run_chunks(chunks, out, policy, {k: {**v, "species_id": ids[k]} for k, v in taxa.items()},
                        splits, (lease.path, run), report, actors=actors, threads=threads,
                        max_pixels=max_image_pixels, progress=progress)
    report.seconds = time.time() - t0
    ledger = Path(out) / LEDGER if not is_remote(out) else None
    if ledger is not None:
        ledger.mkdir(parents=True, exist_ok=True)
        (ledger / f"report-{run}.json").write_text(json.dumps(report.as_dict(), indent=1))
    if mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        log_to_mlflow(report, mlflow_uri, {"clips": clips, "images": images, "out": out, **asdict(policy)})
    return report


def _run_chunks(chunks: list[dict], out: str, policy: FetchPolicy, taxa: dict[str, dict],
                splits: Splits, lease: tuple[str, str], report: FetchReport, *, actors: int,
                threads: int, max_pixels: int, progress: bool | None) -> None:
    """The Ray Data job: chunks to the fetcher actors, their outcome rows into `report`."""
    init_ray()
    gate = gate_actor(policy)
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        ChunkFetcher, batch_size=1, num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(chunks)))),
        fn_constructor_kwargs={"out": filesystem(out), "policy": policy, "gate": gate, "taxa": taxa,
                               "splits": splits, "lease": lease, "threads": threads,
                               "max_pixels": max_pixels})
    ds.context.enable_progress_bars = False  # ours says more: outcomes and bytes
    with Progress(sum(len(json.loads(c["items"])) for c in chunks), progress) as bar:
        for row in ds.iter_rows():
            report.add(row)
            bar.update(report)
    ray.kill(gate)


class Progress:
    """A bar in a terminal (files done, with ok / failed / rejected and MB in its postfix);
    in a log file, one line each 10 % of the files."""

    def __init__(self, total: int, show: bool | None):
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
    uri = tracking_uri(uri or "")
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
