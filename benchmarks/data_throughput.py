"""Decode throughput of the Ray Data pipeline against (a) the authors' pattern and (b) a bare
loop doing exactly the pipeline's own work, and its memory as the store grows.

Two store profiles: `embedded` (the default synthetic store: short clips, small images) and
`realistic` (`biovita synth --profile realistic`: 5 s - 5 min recordings as MP3/M4A/WAV/FLAC/
OGG at 22-48 kHz, 1-12 MP JPEG photos). Two paths, each timed on the same files and cores:
- single_pass (embedding, validate, the benchmark): onset crops, tasks on Ray's workers;
  reference: a torch DataLoader, one file per item, as the authors' extractor: the whole file
  loaded, resampled to 48 kHz, onset crop, transformers' ClapFeatureExtractor;
- stream (training): random crops, decoded on a fixed actor pool under the decode-ahead bound,
  one epoch of the store replicated to >= 1,200 uses (every use a row of its own, as in a real
  epoch); reference: as the authors' stage-2 loader: the file's info, then a load of only the crop's
  frames (the whole file where the decoder cannot seek: AAC), resampled, ClapFeatureExtractor.
Images on both paths: the reference is a full PIL decode + open_clip's transform.
Both biovita paths ship clips as float16 waveforms (the log-mel is computed on the training
device); the consumer drains whole rows, as the trainer does.
(b) runs biovita's decode functions (same decoders, windowed decoding, crop, resample, the
float16 waveform; the same image decode and resize) in a process pool, one process per core; its runs
alternate with the pipeline's and the ratio is the median of the pairs (this machine's speed
drifts by 10-20 % within minutes). Each throughput is the median of --repeat runs. Memory: the
summed PSS of the process tree (driver + every Ray worker) at 1x and --scale x rows.

    python benchmarks/data_throughput.py [--profile embedded|realistic] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

class PeakMemory:
    """Samples the summed PSS of this process and its descendants (Ray workers included)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _total(self):
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak = self._total()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.2)

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join()


class CpuAccount:
    """CPU seconds, by role, of this process and its descendants (Ray's own processes and
    workers) while a path runs: where the cores go when the pipeline trails the bare pool."""

    def __init__(self):
        import psutil

        self.proc, self.used = psutil.Process(), {"wall": 0.0}

    def _role(self, p) -> str:
        if p.pid == self.proc.pid:
            return "driver"
        title = (p.cmdline() or [p.name()])[0]
        if title.startswith("ray::"):  # by what the worker holds: decoders, Ray Data's helpers
            return title.split("(")[-1].rstrip(")") if "MapBatches(" in title else title[5:]
        if "forkserver" in " ".join(p.cmdline()) or "multiprocessing" in " ".join(p.cmdline()):
            return "bare pool"
        return "ray system"  # raylet, GCS, agents, the log monitor

    def _snapshot(self) -> dict:
        import psutil

        out = {}
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = (self._role(p), t.user + t.system)
            except psutil.Error:
                pass
        return out

    def __enter__(self):
        self.t0, self.before = time.perf_counter(), self._snapshot()
        return self

    def __exit__(self, *exc):
        after, wall = self._snapshot(), time.perf_counter() - self.t0
        for pid, (role, cpu) in after.items():
            self.used[role] = self.used.get(role, 0.0) + cpu - self.before.get(pid, (role, 0.0))[1]
        self.used["wall"] += wall


# ----------------------------------------------------------------------------- the pipeline


BYTES: dict[str, float] = {}  # table -> bytes per decoded row the stream hands its consumer
STARTUP: dict[str, list[float]] = {}  # table -> seconds from a stream's start to its first batch


def _drain(ds, table: str) -> list[tuple[float, int]]:
    """Consume whole rows, as the trainer does (every column crosses the object store): the
    time since the start and the rows so far, at each batch."""
    marks, n, t0 = [], 0, time.perf_counter()
    for b in ds.iter_batches(batch_size=16, batch_format="numpy"):
        n += len(b["id"])
        marks.append((time.perf_counter() - t0, n))
        if b["id"].size and table not in BYTES:
            BYTES[table] = sum(v.nbytes if v.dtype != object else sum(len(x) for x in v)
                               for v in b.values()) / len(b["id"])
    return marks


STREAM_USES = 1200  # at least this many uses in the stream's one epoch
SHORT = 4  # the short stream: a quarter of them


def _stream(root: str, table: str, spec, cpus: int, ids: list[str]) -> tuple[int, float]:
    from biovita.data.datasets import stream_dataset

    t = time.perf_counter()
    ds = stream_dataset(root, table, spec, {0: {i: 1 for i in ids}},
                        batch_size=16, seed=0, num_cpus=1.0, decoders=cpus, ahead_mb=512)
    marks = _drain(ds, table)
    STARTUP.setdefault(table, []).append(marks[0][0])
    return marks[-1][1], time.perf_counter() - t


def pipeline(root: str, table: str, path: str, cpus: int, ids: list[str]) -> tuple[int, float]:
    """Rows decoded per second by biovita's Ray Data pipeline on one path. A single pass is
    timed whole. The stream lives for a whole stage, so its rate is the steady one: the rows
    and the time of a stream of all `ids` less those of one of a quarter of them, each timed
    from its start to its last row. What both have once cancels: the decode actors' start
    (they import torch and warm up once per stage, as the bare pool's processes did before
    it is timed; the time to the first batch is kept in STARTUP), the first tasks arriving
    together, the last one an actor may sit out. Timing one stream after its first batch
    counted tasks decoded during the start-up as if decoded after it."""
    from biovita.data.datasets import audio_dataset, image_dataset
    from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec

    if path == "single_pass":
        t = time.perf_counter()
        if table == "audio":
            ds = audio_dataset(root, AudioDecodeSpec(mode="onset", prompts="none", stats_name=None),
                               split=None, num_cpus=1.0)
        else:
            ds = image_dataset(root, ImageDecodeSpec(prompts="none", stats_name=None), split=None, num_cpus=1.0)
        return _drain(ds, table)[-1][1], time.perf_counter() - t
    spec = (AudioDecodeSpec(mode="random", prompts="none", stats_name=None) if table == "audio"
            else ImageDecodeSpec(prompts="none", stats_name=None))
    n_short, t_short = _stream(root, table, spec, cpus, ids[: len(ids) // SHORT])
    n_long, t_long = _stream(root, table, spec, cpus, ids)
    return n_long - n_short, t_long - t_short


# ----------------------------------------------------------------------------- (a) the authors' pattern


def _load(path: str, crop: bool):
    """The authors' loading: soundfile (PyAV for what libsndfile cannot read); for a crop,
    the file's info first and then only the crop's frames where the format can seek."""
    import numpy as np
    import soundfile as sf

    try:
        if crop:
            info = sf.info(path)
            n = int(10 * info.samplerate)
            start = int(np.random.randint(0, max(1, info.frames - n + 1)))
            x, sr = sf.read(path, start=start, frames=n, dtype="float32", always_2d=True)
            return x.T, sr
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        return x.T, sr
    except Exception:
        from biovita.frontends.codecs import _av_read

        x, sr = _av_read(Path(path).read_bytes())
        if crop and x.shape[1] > 10 * sr:
            s = int(np.random.randint(0, x.shape[1] - 10 * sr))
            x = x[:, s:s + 10 * sr]
        return x, sr


class RefAudio:
    """torch Dataset: one file per item, decoded the way the authors' scripts do it."""

    def __init__(self, files, crop: bool):
        self.files, self.crop, self.extractor = files, crop, None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import numpy as np
        import torch
        import torchaudio
        from transformers import ClapFeatureExtractor

        from biovita.frontends.audio import onset_start
        from biovita.models.registry import CLAP_PREPROCESS

        if self.extractor is None:
            self.extractor = ClapFeatureExtractor(**{k: v for k, v in CLAP_PREPROCESS.items() if k != "max_length_s"})
        try:
            x, sr = _load(self.files[i], self.crop)
        except Exception:
            return torch.zeros(1, 1001, 64)
        w = torch.from_numpy(np.ascontiguousarray(x)).mean(0)
        if sr != 48000:
            w = torchaudio.functional.resample(w, sr, 48000)
        if not self.crop:
            w = w[onset_start(w.numpy(), 48000):]
        w = torch.nn.functional.pad(w, (0, max(0, 480000 - w.shape[0])))[:480000]
        return self.extractor(w.numpy(), sampling_rate=48000, return_tensors="pt")["input_features"][0]


class RefImage:
    def __init__(self, files):
        self.files, self.tf = files, None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch
        from PIL import Image

        from biovita.frontends.image import ImageFrontEnd, preprocess

        if self.tf is None:
            self.tf = preprocess(ImageFrontEnd())
        try:
            return self.tf(Image.open(self.files[i]).convert("RGB"))
        except Exception:
            return torch.zeros(3, 224, 224)


def reference(dataset, workers: int) -> tuple[int, float]:
    import torch

    # one item in this process first: its imports and extractor are then inherited by the
    # forked workers (a fork of this Ray-threaded process can otherwise deadlock on an import lock)
    dataset[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=workers)
    t = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n, time.perf_counter() - t


# ----------------------------------------------------------------------------- (b) the same work, bare


def _same_work(job: tuple[str, str, str]) -> int:
    """biovita's own decode of one file, outside Ray: what a pipeline could reach at best."""
    import numpy as np
    import torch

    from biovita.data.decode import WAVE_DTYPE
    from biovita.errors import MediaError
    from biovita.frontends.audio import AudioFrontEnd, load_clip
    from biovita.frontends.image import ImageFrontEnd, load_image

    torch.set_num_threads(1)
    path, table, mode = job
    data = Path(path).read_bytes()
    try:
        if table == "audio":  # what the decoders ship: the crop as a float16 waveform
            load_clip(data, AudioFrontEnd(), mode, np.random.default_rng(0)).astype(WAVE_DTYPE)
        else:
            load_image(data, ImageFrontEnd())
    except MediaError:
        return 0
    return 1


def work_split(files: list[str], n: int = 40) -> dict:
    """One process, one thread: CPU seconds per 10 s training crop for decoding + cropping +
    resampling (the decoders' work) and for the log-mel (now the training device's)."""
    import numpy as np
    import torch

    from biovita.errors import MediaError
    from biovita.frontends.audio import AudioFrontEnd, load_clip, log_mel

    torch.set_num_threads(1)
    fe, decode, mel, done = AudioFrontEnd(), 0.0, 0.0, 0
    for f in files[:n]:
        data = Path(f).read_bytes()
        t = time.process_time()
        try:
            wave = load_clip(data, fe, "random", np.random.default_rng(0))
        except MediaError:
            continue
        t2 = time.process_time()
        log_mel(fe)(wave)
        decode, mel, done = decode + t2 - t, mel + time.process_time() - t2, done + 1
    return {"clips": done, "decode_s_per_clip": decode / done, "log_mel_s_per_clip": mel / done,
            "log_mel_share": mel / (decode + mel)}


def same_work(files: list[str], table: str, path: str, pool) -> tuple[int, float]:
    mode = "onset" if path == "single_pass" else "random"
    t = time.perf_counter()
    pool.map(_same_work, [(f, table, mode) for f in files], chunksize=2)
    return len(files), time.perf_counter() - t


# ----------------------------------------------------------------------------- stores


def export_files(root: str, table: str, out: Path) -> tuple[list[str], list[str]]:
    """The store's media as files (the reference's input) and the ids of the good ones."""
    from biovita.data.store import read_table

    out.mkdir(parents=True, exist_ok=True)
    files, ids = [], []
    ext = {"jpeg": "jpg"}
    for r in read_table(root, table, ["id", "bytes", "format"]).to_pylist():
        p = out / f"{r['id']}.{ext.get(r['format'], r['format'])}"
        p.write_bytes(r["bytes"])
        files.append(str(p))
        if not r["id"].startswith("bad"):
            ids.append(r["id"])
    return files, ids


def replicate(root: str, out: Path, times: int) -> None:
    """A store with `times` x the rows (ids made unique) to check that memory stays flat."""
    import pyarrow.parquet as pq

    from biovita.data.store import ShardWriter, table_files

    shutil.copytree(Path(root) / "taxa", out / "taxa", dirs_exist_ok=True)
    for table in ("audio", "image"):
        w = ShardWriter(out, table, rows_per_shard=64)
        for k in range(times):
            for f in table_files(root, table):
                for r in pq.read_table(f).to_pylist():
                    w.add({**r, "id": f"{r['id']}_{k}"})
        w.close()


def make_store(profile: str, out: Path, species: int | None) -> str:
    if profile == "realistic":
        from biovita.data.synth_realistic import make_realistic

        make_realistic(out, n_species=species or 12, seed=1, progress=True)
    else:
        from biovita.data.synth import make_synthetic

        make_synthetic(out, n_species=species or 32, seed=1)
    return str(out)


def spilled_mb() -> float:
    """MiB the object store has spilled to disk so far (cumulative): decoded rows that spill
    cost a write and a read each, on the same cores."""
    import re

    from ray._private.internal_api import memory_summary

    found = re.search(r"Spilled ([\d.]+) MiB", memory_summary(stats_only=True))
    return float(found.group(1)) if found else 0.0


def rate(run, repeat: int) -> float:
    """Items per second: the median of `repeat` timed runs."""
    return statistics.median(n / t for n, t in (run() for _ in range(repeat)))


# ----------------------------------------------------------------------------- main


def measure_path(path: str, root: str, times: int, files: dict, ids: dict, pool, a) -> dict:
    """Rates and ratios of one path, both tables. The stream reads one epoch of the store
    replicated `times` times (ids made unique; >= STREAM_USES uses): every use a row of its
    own, as in a real epoch of ~280 k clips (epochs of this store's few dozen clips ended a
    decode task early every epoch, and a repeat within a task is read once). The bare pool
    and (a) decode the files ~600 times over on that path."""
    out: dict = {}
    for table in ("audio", "image"):
        items = files[table] * (1 if times == 1 else max(1, round(600 / len(files[table]))))
        use_ids = ids[table] if times == 1 else [f"{i}_{k}" for k in range(times) for i in ids[table]]
        ref_ds = RefAudio(items, crop=path == "stream") if table == "audio" else RefImage(items)
        ref = rate(lambda: reference(ref_ds, a.cpus), a.repeat)
        pipeline(root, table, path, a.cpus, use_ids)  # warm-up: workers, imports
        pairs, cpu, spilled = [], CpuAccount(), spilled_mb()
        for _ in range(a.repeat):
            b = rate(lambda: same_work(items, table, path, pool), 1)
            with cpu:
                pairs.append((b, rate(lambda: pipeline(root, table, path, a.cpus, use_ids), 1)))
        ours = statistics.median(x for _, x in pairs)
        out[table] = {"pipeline": ours, "reference": ref, "same_work": statistics.median(b for b, _ in pairs),
                      "vs_reference": ours / ref, "vs_same_work": statistics.median(b / x for b, x in pairs),
                      # the last run's CPU seconds by role, as shares of its wall x cores
                      "cpu_share": {k: v / (cpu.used["wall"] * a.cpus) for k, v in cpu.used.items()
                                    if k != "wall"},
                      "spilled_mb": spilled_mb() - spilled}
    return out


def memory_ratio(path: str, root: str, big: str, ids: dict, big_ids: dict, cpus: int) -> float:
    with PeakMemory() as m1:
        for table in ("audio", "image"):
            pipeline(root, table, path, cpus, ids[table])
    with PeakMemory() as m10:
        for table in ("audio", "image"):
            pipeline(big, table, path, cpus, big_ids[table])
    return m10.peak / m1.peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=("embedded", "realistic"), default="embedded")
    p.add_argument("--store", default=None, help="Parquet store (default: a fresh one of the profile)")
    p.add_argument("--species", type=int, default=None)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--scale", type=int, default=10, help="rows multiplier for the memory check")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per path (median)")
    p.add_argument("--paths", default="single_pass,stream")
    p.add_argument("--json", default=None, help="write the ratios as JSON")
    a = p.parse_args()
    import importlib

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="biovita-bench-"))
    root = a.store or make_store(a.profile, tmp / "store", a.species)
    files, ids = {}, {}
    for table in ("audio", "image"):
        files[table], ids[table] = export_files(root, table, tmp / f"files_{table}")
    for lib in ("open_clip", "torchaudio", "transformers", "av"):  # the reference's workers fork
        importlib.import_module(lib)
    pool = mp.get_context("forkserver").Pool(a.cpus)  # (b): started before Ray, kept up
    same_work(files["audio"][:2], "audio", "stream", pool)
    ray.init(num_cpus=a.cpus, object_store_memory=int(1e9), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    paths = a.paths.split(",")
    big = tmp / "store_big"
    replicate(root, big, a.scale)
    big_ids = {t: [f"{i}_{k}" for k in range(a.scale) for i in ids[t]] for t in ids}
    times = {"single_pass": 1, "stream": -(-STREAM_USES // min(len(v) for v in ids.values()))}
    replicate(root, tmp / "store_stream", times["stream"])
    stores = {"single_pass": root, "stream": str(tmp / "store_stream")}
    results = {path: measure_path(path, stores[path], times[path], files, ids, pool, a) for path in paths}
    pool.close()
    for path in paths:
        results[path]["memory_ratio"] = memory_ratio(path, root, str(big), ids, big_ids, a.cpus)
    ray.shutdown()
    split = work_split(files["audio"])
    print(f"profile {a.profile}: {len(files['audio'])} clips, {len(files['image'])} images, {a.cpus} CPUs; "
          f"median of {a.repeat} runs")
    print(f"per 10 s training crop, one core: decode + crop + resample {1000 * split['decode_s_per_clip']:.0f} ms, "
          f"log-mel {1000 * split['log_mel_s_per_clip']:.0f} ms ({split['log_mel_share']:.0%}: on the "
          f"training device now); bytes per row to the consumer: "
          + ", ".join(f"{t} {v / 2**20:.2f} MB" for t, v in sorted(BYTES.items())))
    report = {"work_split": split, "mb_per_row": {t: v / 2**20 for t, v in BYTES.items()}, "cpus": a.cpus}
    for path, r in results.items():
        print(f"[{path}]{'':<10}{'pipeline':>10}{'(a) ref':>10}{'(b) same':>10}{'vs (a)':>9}{'(b)/us':>9}")
        for table in ("audio", "image"):
            e = r[table]
            print(f"  {table + ' /s':<16}{e['pipeline']:>10.1f}{e['reference']:>10.1f}{e['same_work']:>10.1f}"
                  f"{e['vs_reference']:>8.2f}x{e['vs_same_work']:>8.2f}x")
        print(f"  peak memory (PSS) at {a.scale}x rows / 1x: {r['memory_ratio']:.2f}   "
              "(targets: vs (a) >= 3x, (b) within 1.25x, memory < 1.2)")
        print(f"  per core: audio {r['audio']['pipeline'] / a.cpus:.1f} clips/s, images "
              f"{r['image']['pipeline'] / a.cpus:.1f}/s")
        if path == "stream":
            print("  start-up to the first batch (once per stage, not in the rates): " + ", ".join(
                f"{t} {statistics.median(v):.1f} s" for t, v in sorted(STARTUP.items())))
        print("  spilled by the object store while timed: " + ", ".join(
            f"{t} {r[t]['spilled_mb']:.0f} MB" for t in ("audio", "image")))
        for table in ("audio", "image"):
            print(f"  {table} cores' time: " + ", ".join(
                f"{k} {v:.0%}" for k, v in sorted(r[table]["cpu_share"].items(), key=lambda kv: -kv[1])))
        report[path] = {"audio_vs_reference": r["audio"]["vs_reference"],
                        "audio_per_core": r["audio"]["pipeline"] / a.cpus,
                        "images_per_core": r["image"]["pipeline"] / a.cpus,
                        "audio_vs_same_work": r["audio"]["vs_same_work"],
                        "images_vs_same_work": r["image"]["vs_same_work"],
                        "images_vs_reference": r["image"]["vs_reference"],
                        "vs_same_work_loop": max(r["audio"]["vs_same_work"], r["image"]["vs_same_work"]),
                        "memory_ratio": r["memory_ratio"],
                        "cpu_share": {t: r[t]["cpu_share"] for t in ("audio", "image")},
                        "spilled_mb": {t: r[t]["spilled_mb"] for t in ("audio", "image")},
                        **({"startup_s": {t: statistics.median(v) for t, v in STARTUP.items()}}
                           if path == "stream" else {}),
                        "rates": {t: {k: r[t][k] for k in ("pipeline", "reference", "same_work")}
                                  for t in ("audio", "image")}}
    if a.json:
        Path(a.json).write_text(json.dumps({a.profile: report}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
