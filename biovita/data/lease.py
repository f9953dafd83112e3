"""One writing job per store: a lease file (`STORE/_fetch/lease.json`) that a job takes
before it reads the store's state and keeps fresh while it runs.

A second job refuses to start while the holder is alive: on the same host, its process
exists; elsewhere, its heartbeat is younger than `ttl_s`. A holder killed with SIGKILL
leaves the file behind: it is stale at once on its own host, after `ttl_s` elsewhere.
Workers check the lease before each write (`held_by`), so a killed job's leftover
workers stop writing once a re-run has taken the store over."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pyarrow.fs as pafs

from biovita.data.store import filesystem
from biovita.errors import FetchError

LEASE = "_fetch/lease.json"


def _read(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None


def _alive(holder: dict, ttl_s: float) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(holder.get("beat", 0)) < ttl_s


class Lease:
    """`with Lease(store, run):` holds the store for `run`; see the module docstring."""

    def __init__(self, root: str, run: str, ttl_s: float = 120.0, beat_s: float = 15.0):
        self.fs, base = filesystem(root)
        self.path, self.run, self.ttl_s, self.beat_s = f"{base}/{LEASE}", run, ttl_s, beat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self) -> None:
        self.fs.create_dir(self.path.rpartition("/")[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({"run": self.run, "host": socket.gethostname(), "pid": os.getpid(),
                                "beat": time.time()}).encode())

    def __enter__(self) -> "Lease":
        holder = _read(self.fs, self.path)
        if holder and holder.get("run") != self.run and _alive(holder, self.ttl_s):
            age = time.time() - float(holder.get("beat", 0))
            raise FetchError(
                f"another fetch is writing this store (run {holder.get('run')}, pid "
                f"{holder.get('pid')} on {holder.get('host')}, last seen {age:.0f} s ago); "
                f"wait for it to finish, or stop it (its lease goes stale {self.ttl_s:.0f} s "
                f"after its last heartbeat)")
        self._write()
        self._thread = threading.Thread(target=self._beat, name="store-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            if held_by(self.fs, self.path) != self.run:
                return  # taken over (this job was presumed dead): do not take it back
            self._write()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if held_by(self.fs, self.path) == self.run:
            self.fs.delete_file(self.path)


def held_by(fs: pafs.FileSystem, path: str) -> str | None:
    """The run id holding the lease at `path` (a filesystem path, as `Lease.path`)."""
    holder = _read(fs, path)
    return holder.get("run") if holder else None
