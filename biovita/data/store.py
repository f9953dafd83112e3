"""Read and write the Parquet media store on a local folder or an object store.

Paths are URIs: a plain path, `file://`, `s3://bucket/prefix` or `gs://bucket/prefix`;
pyarrow's filesystems resolve them (credentials from the usual environment variables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from biovita.data.schema import SCHEMAS
from biovita.locations import is_remote, local_path


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an object-store URI."""
    uri = str(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), local_path(uri)
    if uri.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        # S3-compatible stores (MinIO, moto, Ceph): pyarrow needs the endpoint spelt out.
        bucket_path = uri[len("s3://"):]
        fs = pafs.S3FileSystem(
            endpoint_override=os.environ["AWS_ENDPOINT_URL"],
            region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            # explicit keys travel with the (pickled) filesystem into Ray tasks
            access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            allow_bucket_creation=True,
        )
        return fs, bucket_path
    return pafs.FileSystem.from_uri(uri)


def table_uri(root: str | os.PathLike, table: str) -> str:
    return f"{str(root).rstrip('/')}/{table}"


def table_files(root: str | os.PathLike, table: str) -> list[str]:
    """The Parquet shards of one table, sorted (paths inside the filesystem)."""
    fs, base = filesystem(table_uri(root, table))
    info = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    return sorted(i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def exists(root: str | os.PathLike) -> bool:
    return all(table_files(root, t) for t in SCHEMAS)


@dataclass(frozen=True)
class Shard:
    """A readable Parquet shard of a table: its path and its footer (row groups, sizes)."""

    path: str
    metadata: pq.FileMetaData
    schema: pa.Schema


# A shard whose footer does not read (cut short by a failed upload, not Parquet): the readers
# below skip it and note it here, path -> reason, for the job to count and report.
UNREADABLE: dict[str, str] = {}
_SHARDS: dict[tuple, Shard | str] = {}


def shards(root: str | os.PathLike, table: str) -> list[Shard]:
    """The readable shards of a table (footers read once per process and file version);
    an unreadable one is skipped and recorded in `UNREADABLE`."""
    fs, base = filesystem(table_uri(root, table))
    info = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    out = []
    for i in sorted((i for i in info if i.type == pafs.FileType.File and i.path.endswith(".parquet")),
                    key=lambda i: i.path):
        key = (i.path, i.size, i.mtime_ns)
        if key not in _SHARDS:
            try:
                f = pq.ParquetFile(i.path, filesystem=fs)
                _SHARDS[key] = Shard(i.path, f.metadata, f.schema_arrow)
            except (OSError, pa.ArrowException) as e:  # (ArrowInvalid: no magic bytes, bad thrift)
                _SHARDS[key] = f"truncated or not Parquet ({str(e).splitlines()[0][:160]})"
        got = _SHARDS[key]
        if isinstance(got, str):
            UNREADABLE[i.path] = got
        else:
            out.append(got)
    return out


def unreadable_shards(root: str | os.PathLike) -> dict[str, str]:
    """The shards of a store skipped so far in this process, path -> reason."""
    base = filesystem(str(root))[1].rstrip("/") + "/"
    return {p: r for p, r in UNREADABLE.items() if p.startswith(base)}


# A row group is what a decode task reads to get at one of its rows: at most this many rows
# or about this much encoded media (a long field recording is a row group of its own), so
# that training streams in a random order read little beyond the media they decode.
ROW_GROUP_ROWS = 32
ROW_GROUP_BYTES = 1 << 20


class ShardWriter:
    """Streams rows into `root/table/part-NNNNN.parquet` shards (bounded memory)."""

    def __init__(self, root: str | os.PathLike, table: str, rows_per_shard: int = 256):
        self.schema = SCHEMAS[table]
        self.fs, self.base = filesystem(table_uri(root, table))
        self.fs.create_dir(self.base, recursive=True)
        for old in table_files(root, table):
            self.fs.delete_file(old)
        self.rows_per_shard = max(1, rows_per_shard)
        self.buffer: list[dict] = []
        self.paths: list[str] = []
        self.count = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        self.count += 1
        if len(self.buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.buffer and self.paths:
            return
        path = f"{self.base}/part-{len(self.paths):05d}.parquet"
        write_part(self.fs, path, self.schema, self.buffer)
        self.paths.append(path)
        self.buffer = []

    def close(self) -> list[str]:
        if self.buffer or not self.paths:  # an empty table still gets one (empty) shard
            self.flush()
        return self.paths


def write_part(fs: pafs.FileSystem, path: str, schema: pa.Schema, rows: list[dict],
               atomic: bool = False) -> None:
    """One Parquet shard of the store's layout. `atomic`: readers see the whole file or none
    (a local file is written beside and renamed; an object-store PUT is atomic already)."""
    target = path
    if atomic and isinstance(fs, pafs.LocalFileSystem):
        head, _, name = path.rpartition("/")
        path = f"{head}/.{name}.tmp"  # not *.parquet: never listed as a shard
    # Every column plain: a training read takes one small row group whole, where a
    # decompression and a dictionary page per column cost more than the bytes they save
    # (1.5 -> 1.1 ms per 1-row group of field media; encoded media neither compress nor
    # repeat). No statistics on `bytes`: the footer would carry a min/max of every clip.
    stats = [f.name for f in schema if f.name != "bytes"]
    with pq.ParquetWriter(path, schema, filesystem=fs, compression="none",
                          use_dictionary=False, write_statistics=stats) as w:
        for group in _row_groups(rows):
            w.write_table(pa.Table.from_pylist(group, schema=schema), row_group_size=len(group))
        if not rows:
            w.write_table(pa.Table.from_pylist([], schema=schema))
    if path != target:
        fs.move(path, target)


def _row_groups(rows: list[dict]) -> Iterable[list[dict]]:
    """Consecutive rows, cut at ROW_GROUP_ROWS rows or ~ROW_GROUP_BYTES of encoded media."""
    group: list[dict] = []
    size = 0
    for r in rows:
        n = len(r.get("bytes") or b"")
        if group and (len(group) >= ROW_GROUP_ROWS or size + n > ROW_GROUP_BYTES):
            yield group
            group, size = [], 0
        group.append(r)
        size += n
    if group:
        yield group


def write_table(
    root: str | os.PathLike, table: str, rows: Sequence[dict], rows_per_shard: int = 256
) -> list[str]:
    """Write rows as `root/table/part-NNNNN.parquet` shards, replacing what was there."""
    w = ShardWriter(root, table, rows_per_shard)
    for r in rows:
        w.add(r)
    return w.close()


def read_table(
    root: str | os.PathLike, table: str, columns: Iterable[str] | None = None
) -> pa.Table:
    """Read a whole table (on the driver: pass `columns` to leave the media bytes behind);
    unreadable shards are skipped (`shards`)."""
    fs, _ = filesystem(table_uri(root, table))
    found = shards(root, table)
    if not found:
        raise FileNotFoundError(f"no readable Parquet files under {table_uri(root, table)}")
    cols = list(columns) if columns is not None else None
    return pa.concat_tables(pq.read_table(s.path, columns=cols, filesystem=fs) for s in found)


def upload_dir(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy a local folder to a path or object-store URI (replacing files of the same name)."""
    fs, dest = filesystem(str(uri))
    fs.create_dir(dest, recursive=True)
    pafs.copy_files(str(Path(local).resolve()), dest, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def fetch_dir(uri: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """A local folder with the contents of `uri` (the folder itself when it is local)."""
    if not is_remote(str(uri)):
        return filesystem(str(uri))[1]
    import hashlib
    import tempfile

    key = hashlib.sha1(str(uri).encode()).hexdigest()[:16]
    local = Path(cache or tempfile.gettempdir()) / f"biovita-fetch-{key}"
    if not local.exists():
        tmp = local.with_suffix(".part")
        tmp.mkdir(parents=True, exist_ok=True)
        fs, src = filesystem(str(uri))
        pafs.copy_files(src, str(tmp), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
        tmp.rename(local)
    return str(local)


def path_exists(uri: str | os.PathLike) -> bool:
    fs, p = filesystem(str(uri))
    return fs.get_file_info(p).type != pafs.FileType.NotFound
