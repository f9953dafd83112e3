"""`biovita fetch` against a real HTTP server on 127.0.0.1 that injects the field's faults."""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from biovita.data.http import FetchPolicy, HostSchedule, LocalGate, download, retry_after

ROOT = Path(__file__).resolve().parent.parent


def _media() -> dict[str, bytes]:
    from PIL import Image

    from biovita.data.synth_media import audio_bytes

    sr = 22_050
    t = np.arange(int(1.5 * sr)) / sr
    wave = (0.3 * np.sin(2 * np.pi * 880 * t) * (t > 0.3)).astype(np.float32)
    img = Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8))
    out = {"mp3": audio_bytes(wave, sr, "mp3"), "wav": audio_bytes(wave, sr, "wav")}
    for fmt, key in (("JPEG", "jpg"), ("PNG", "png")):
        b = io.BytesIO()
        img.save(b, fmt)
        out[key] = b.getvalue()
    return out


class FaultServer:
    """Serves /<kind>/<name>.<ext>; counts and timestamps every request per path.

    good: the file; 404/403: that status; 429: 429 + Retry-After: 1 once, then the file;
    500: 500 once, then the file; slow: waits past the client's timeout; short: a body cut
    short of its Content-Length; html: an HTML page; empty: zero bytes; big: over the limit;
    gooddelay: the file after 0.3 s (a job to kill mid-way)."""

    def __init__(self):
        self.media = _media()
        self.hits: dict[str, list[float]] = defaultdict(list)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path
                server.hits[path].append(time.monotonic())
                kind, name = path.strip("/").split("/", 1)
                body = server.media[name.rsplit(".", 1)[1]]
                n = len(server.hits[path])
                try:
                    if kind in ("404", "403"):
                        return self._send(int(kind), b"not here")
                    if kind == "429" and n == 1:
                        return self._send(429, b"slow down", {"Retry-After": "1"})
                    if kind == "500" and n == 1:
                        return self._send(500, b"oops")
                    if kind == "slow":
                        time.sleep(2.5)
                    if kind == "gooddelay":
                        time.sleep(0.3)
                    if kind == "short":
                        self.send_response(200)
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    if kind == "html":
                        body = b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>"
                    if kind == "empty":
                        body = b""
                    if kind == "big":
                        body = body + b"\0" * 300_000
                    self._send(200, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send(self, code, body, headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, kind: str, name: str) -> str:
        return f"{self.base}/{kind}/{name}"

    def count(self, kind: str, name: str) -> int:
        return len(self.hits[f"/{kind}/{name}"])

    def close(self):
        self.httpd.shutdown()


@pytest.fixture()
def server():
    s = FaultServer()
    yield s
    s.close()


POLICY = FetchPolicy(timeout_s=1.0, max_attempts=3, backoff_s=0.05, backoff_max_s=5.0,
                     max_bytes=200_000, host_connections=4, host_rate=100.0)
TAXA = [("Parus major", "Aves", "Passeriformes", "Paridae", "Parus", "great tit"),
        ("Hyla arborea", "Amphibia", "Anura", "Hylidae", "Hyla", "tree frog"),
        ("Gryllus campestris", "Insecta", "Orthoptera", "Gryllidae", "Gryllus", "field cricket")]
# (kind, ext, outcome expected after one run, reason)
CLIPS = [("good", "mp3", "ok", ""), ("good", "wav", "ok", ""), ("429", "mp3", "ok", ""),
         ("500", "wav", "ok", ""), ("404", "mp3", "rejected", "http_404"),
         ("slow", "mp3", "failed", "timeout"), ("short", "mp3", "failed", "short_body"),
         ("html", "mp3", "rejected", "html_page"), ("empty", "mp3", "rejected", "empty_file"),
         ("big", "wav", "rejected", "too_large")]
IMAGES = [("good", "jpg", "ok", ""), ("good", "png", "ok", ""), ("403", "jpg", "rejected", "http_403"),
          ("html", "jpg", "rejected", "html_page"), ("500", "png", "ok", "")]


def write_lists(tmp: Path, server: FaultServer, clips=CLIPS, images=IMAGES, prefix="") -> tuple[str, str]:
    cl, im = tmp / "metadata.csv", tmp / "image_urls.csv"
    with open(cl, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["download_url", "source", "recording_id", "file_name", "scientific_name",
                    "accepted_name", "class", "order", "family", "genus", "com"])
        for n, (kind, ext, *_) in enumerate(clips):
            sp, klass, order, fam, genus, com = TAXA[n % len(TAXA)]
            w.writerow([server.url(kind, f"{prefix}c{n}.{ext}"), "xc", f"{prefix}{n}", f"xc_{n}.{ext}",
                        sp + " Linnaeus", "", klass, order, fam, genus, com])
    with open(im, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_url", "accepted_name", "photo_id"])
        for n, (kind, ext, *_) in enumerate(images):
            w.writerow([server.url(kind, f"{prefix}i{n}.{ext}"), TAXA[n % len(TAXA)][0], f"{prefix}p{n}"])
    return str(cl), str(im)


def store_ids(root) -> dict[str, list[str]]:
    from biovita.data.store import read_table

    return {t: read_table(root, t, ["id"])["id"].to_pylist() for t in ("audio", "image")}


def test_download_retries_and_limits(server):
    gate = LocalGate(4, 100.0)
    got = download(server.url("429", "a.mp3"), POLICY, gate)
    assert (got.outcome, got.attempts) == ("ok", 2)
    gap = np.diff(server.hits["/429/a.mp3"])[0]
    assert gap >= 0.95, f"Retry-After: 1 not honoured ({gap:.2f} s)"
    got = download(server.url("404", "a.mp3"), POLICY, gate)
    assert (got.outcome, got.reason, server.count("404", "a.mp3")) == ("rejected", "http_404", 1)
    got = download(server.url("short", "a.mp3"), POLICY, gate)
    assert (got.outcome, got.reason, server.count("short", "a.mp3")) == ("failed", "short_body", 3)
    got = download(server.url("big", "a.wav"), POLICY, gate)
    assert (got.outcome, got.reason) == ("rejected", "too_large")
    assert download("not a url", POLICY, gate).reason == "bad_url"
    assert retry_after("7") == 7 and retry_after(None) == 0


def test_host_schedule_caps_concurrency_and_rate():
    s = HostSchedule(max_in_flight=2, rate=10.0)
    assert s.try_acquire("a", 0.0) == 0
    assert s.try_acquire("a", 0.0) > 0  # the next start is 0.1 s later
    assert s.try_acquire("b", 0.0) == 0  # another host is not held up
    assert s.try_acquire("a", 0.1) == 0
    assert s.try_acquire("a", 0.2) > 0  # two in flight
    s.release("a", 0.2, pause_s=3.0)
    assert s.try_acquire("a", 0.25) == pytest.approx(2.95)  # Retry-After pauses the host


def test_fetch_store_counts_and_resumes(tmp_path, server, ray_local):
    from biovita.data.fetch import fetch_release
    from biovita.data.store import read_table
    from biovita.data.validate import validate_store

    clips, images = write_lists(tmp_path, server)
    out = str(tmp_path / "store")
    rep = fetch_release(clips, out, images, POLICY, chunk_rows=3, actors=2, threads=3, progress=False)
    ids = store_ids(out)
    good_clips = {f"xc_{n}" for n, c in enumerate(CLIPS) if c[2] == "ok"}
    good_images = {n for n, c in enumerate(IMAGES) if c[2] == "ok"}
    assert sorted(ids["audio"]) == sorted(good_clips)  # each good clip exactly once, no bad one
    assert len(ids["image"]) == len(good_images) == len(set(ids["image"]))
    assert {i.rsplit("_", 1)[1] for i in ids["image"]} == {f"p{n}" for n in good_images}
    want = Counter((c[2], c[3]) for c in CLIPS)
    assert rep.outcomes["audio"] == Counter({o: sum(v for (oo, _), v in want.items() if oo == o)
                                             for o in ("ok", "failed", "rejected")})
    assert rep.reasons["audio:rejected"] == Counter(
        {r: n for (o, r), n in want.items() if o == "rejected"})
    assert rep.reasons["audio:failed"] == Counter({"timeout": 1, "short_body": 1})
    assert rep.reasons["image:rejected"] == Counter({"http_403": 1, "html_page": 1})
    host = server.base.split("//")[1]
    assert rep.hosts[host]["ok"] == len(good_clips) + len(good_images)
    # retries within the limits, none for a 404/403 or a rejected body
    for i, (kind, ext, *_) in enumerate(CLIPS):
        n = server.count(kind, f"c{i}.{ext}")
        limit = {"429": 2, "500": 2, "slow": 3, "short": 3}.get(kind, 1)
        assert n == limit, (kind, n)
    # taxonomy and species ids as `biovita convert` gives them
    taxa = read_table(out, "taxa", ["species_id", "scientific_name", "family"]).to_pylist()
    assert [t["scientific_name"] for t in taxa] == sorted(t[0] for t in TAXA)
    audio = {r["id"]: r for r in read_table(out, "audio", ["id", "species_id", "source", "recording_id",
                                                           "format", "common_name"]).to_pylist()}
    assert audio["xc_0"]["species_id"] == 2 and audio["xc_0"]["common_name"] == "great tit"
    assert audio["xc_1"]["format"] == "wav" and audio["xc_0"]["format"] == "mp3"
    ok, val = validate_store(out, echo=False)
    assert ok and val["audio"]["bad"] == 0 and val["image"]["bad"] == 0

    # a second run: what failed is tried again, what was rejected or written is not
    before = dict((k, len(v)) for k, v in server.hits.items())
    rep2 = fetch_release(clips, out, images, POLICY, chunk_rows=3, actors=2, threads=3, progress=False)
    assert rep2.already == {"written": len(good_clips) + len(good_images), "rejected": 6}
    assert sum(rep2.outcomes["audio"].values()) == 2  # slow + short only
    changed = {k for k, v in server.hits.items() if len(v) != before.get(k, 0)}
    assert changed == {"/slow/c5.mp3", "/short/c6.mp3"}
    assert sorted(store_ids(out)["audio"]) == sorted(good_clips)
    # --retry-rejected asks again for those too
    rep3 = fetch_release(clips, out, images, POLICY, retry_rejected=True, progress=False)
    assert rep3.already["rejected"] == 0 and rep3.outcomes["audio"]["rejected"] == 4


def test_fetch_late_shard_replaces_instead_of_adding(tmp_path, server, ray_local):
    """A killed job's shard landing after a re-run read the store (simulated: taken away
    before the re-run, put back after it) has the name the re-run gave the same rows."""
    from biovita.data.fetch import fetch_release

    clips, images = write_lists(tmp_path, server, [("good", "wav", "ok", "")] * 6, [])
    out = tmp_path / "store"
    fetch_release(clips, str(out), None, POLICY, chunk_rows=2, actors=1, progress=False)
    shards = sorted(p.name for p in (out / "audio").glob("part-fetch-*.parquet"))
    assert len(shards) == 3 and all(s.endswith("-0.parquet") for s in shards)
    late = (out / "audio" / shards[1]).rename(tmp_path / shards[1])
    rep = fetch_release(clips, str(out), None, POLICY, chunk_rows=2, actors=1, progress=False)
    assert rep.already["written"] == 4 and rep.outcomes["audio"]["ok"] == 2
    assert sorted(p.name for p in (out / "audio").glob("part-fetch-*.parquet")) == shards
    late.rename(out / "audio" / shards[1])
    from biovita.data.store import read_table

    assert sorted(read_table(out, "audio", ["id"])["id"].to_pylist()) == [f"xc_{i}" for i in range(6)]
    assert not (out / "_fetch" / "lease.json").exists()  # released at the end


def test_store_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    import json
    import socket

    from biovita.data.lease import LEASE, Lease, held_by
    from biovita.data.store import filesystem
    from biovita.errors import FetchError

    path = tmp_path / LEASE
    path.parent.mkdir(parents=True)
    fs, _ = filesystem(str(tmp_path))

    def holder(pid, host=socket.gethostname(), age=0.0):
        path.write_text(json.dumps({"run": "other", "pid": pid, "host": host,
                                    "beat": time.time() - age}))

    holder(os.getpid())  # alive on this host
    with pytest.raises(FetchError, match="another fetch is writing this store"):
        Lease(str(tmp_path), "mine").__enter__()
    holder(os.getpid(), host="elsewhere", age=10)  # a fresh heartbeat from another host
    with pytest.raises(FetchError, match="run other"):
        Lease(str(tmp_path), "mine").__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid, host, age in ((dead.pid, socket.gethostname(), 0), (1, "elsewhere", 600)):
        holder(pid, host, age)  # killed on this host / silent too long elsewhere
        with Lease(str(tmp_path), "mine", beat_s=0.05) as lease:
            assert held_by(fs, lease.path) == "mine"
            time.sleep(0.2)
            assert json.loads(path.read_text())["beat"] > time.time() - 1
        assert not path.exists()


def test_fetch_names_missing_columns(tmp_path, server):
    from biovita.data.fetch import fetch_release
    from biovita.errors import FetchError

    bad = tmp_path / "images.csv"
    bad.write_text("link,taxon\nhttp://x/a.jpg,Parus major\n")
    with pytest.raises(FetchError, match="the file has: link, taxon"):
        fetch_release(None, str(tmp_path / "s"), str(bad))
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "fetch", "--images", str(bad),
                        "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 2 and "no image URL column" in r.stderr


def _kill_ray_started_under(tmp: Path) -> None:
    """SIGKILL every process of the Ray instance whose temp dir is `tmp` (its raylet and GCS
    run in their own sessions, and the raylet's workers under them)."""
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if str(tmp) in " ".join(p.info["cmdline"] or [])]
    procs = {q for r in roots for q in [r, *r.children(recursive=True)]}
    for q in procs:
        try:
            q.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(procs), timeout=30)


@pytest.mark.slow
def test_fetch_killed_mid_job_resumes_without_duplicates(tmp_path, server):
    """SIGKILL to the whole job (driver, Ray and its workers) once some shards are written;
    the same command again completes the store, each file once."""
    n = 48
    clips, images = write_lists(tmp_path, server, [("gooddelay", "mp3", "ok", "")] * n,
                                [("gooddelay", "jpg", "ok", "")] * 8)
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "biovita.cli", "fetch", "--clips", clips, "--images", images,
           "--out", str(out), "--chunk-rows", "4", "--actors", "2", "--threads", "2",
           "--host-connections", "2", "--host-rate", "50"]
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="bvf"))  # this job's own Ray (short: socket paths)
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(ray_tmp)}
    p = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and len(list((out / "audio").glob("part-fetch-*.parquet"))) < 2:
        assert p.poll() is None, p.stdout.read().decode()[-3000:]
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    _kill_ray_started_under(ray_tmp)  # the whole job dies, as when its node is lost
    first = store_ids(out)["audio"]
    assert 0 < len(first) < n, "the job should have been killed mid-way"
    assert len(first) == len(set(first))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = store_ids(out)
    assert sorted(ids["audio"]) == sorted(f"xc_{i}" for i in range(n))
    assert len(ids["image"]) == len(set(ids["image"])) == 8
    # every good file was requested at most twice (once if it was written before the kill)
    assert max(len(v) for v in server.hits.values()) <= 2
    assert sum(len(server.hits[f"/gooddelay/c{i}.mp3"]) for i in range(n)) <= n + 2 * 4 * 2


@pytest.mark.slow
def test_fetch_into_object_storage_with_mlflow(tmp_path, server, s3, ray_local):
    """The store on s3:// (credentials travel to the fetcher actors with the filesystem), a
    re-run that finds it there, and a `fetch` run in MLflow with its counts and report."""
    from mlflow.tracking import MlflowClient

    from biovita.data.fetch import fetch_release

    clips, images = write_lists(tmp_path, server, CLIPS[:5], IMAGES[:3], prefix="s3")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rep = fetch_release(clips, "s3://biovita/fetched", images, POLICY, progress=False, mlflow_uri=uri)
    assert rep.outcomes["audio"] == Counter(ok=4, rejected=1)
    ids = store_ids("s3://biovita/fetched")
    assert sorted(ids["audio"]) == [f"xc_s3{i}" for i in range(4)] and len(ids["image"]) == 2
    again = fetch_release(clips, "s3://biovita/fetched", images, POLICY, progress=False)
    assert again.already == {"written": 6, "rejected": 2} and not again.outcomes
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("biovita").experiment_id],
                              "tags.`biovita.kind` = 'fetch'")
    assert len(runs) == 1 and runs[0].data.metrics["fetch/audio_ok"] == 4
    assert [a.path for a in client.list_artifacts(runs[0].info.run_id)] == ["fetch_report.json"]
