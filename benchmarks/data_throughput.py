"""Decode throughput of the Ray Data pipeline vs (a) the reference pattern and (b) the raw limit.

(a) reference: a torch DataLoader whose workers handle one file per item the way the authors'
    scripts do: decode (soundfile: torchaudio.load needs FFmpeg/TorchCodec, absent here),
    mono, torchaudio.functional.resample to 48 kHz, crop/pad to 10 s, then the checkpoint's
    transformers ClapFeatureExtractor (METHOD.md: the extractor is the authors' front end);
    images: PIL + the open_clip transform;
(b) raw limit: decode + one STFT per clip in a tight loop, one process per core.
Same files, same cores; each throughput is the median of --repeat timed runs, and the runs of
(b) alternate with the pipeline's (the machine's speed drifts within minutes). Peak memory of
the whole process tree (driver + every Ray worker) at 1x and 10x rows, as the sum of PSS: RSS
would count the object store's shared pages and the shared libraries once per process.

    python benchmarks/data_throughput.py [--store DIR] [--species 32] [--cpus 2]
"""

from __future__ import annotations

import argparse
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


def ray_audio(root: str, cpus: float) -> tuple[int, float]:
    from biovita.data.datasets import audio_dataset
    from biovita.data.decode import AudioDecodeSpec

    ds = audio_dataset(root, AudioDecodeSpec(mode="onset", prompts="none", stats_name=None), split=None,
                       num_cpus=cpus)
    t = time.perf_counter()
    n = sum(len(b["id"]) for b in ds.iter_batches(batch_size=64))
    return n, time.perf_counter() - t


def ray_images(root: str, cpus: float) -> tuple[int, float]:
    from biovita.data.datasets import image_dataset
    from biovita.data.decode import ImageDecodeSpec

    ds = image_dataset(root, ImageDecodeSpec(prompts="none", stats_name=None), split=None,
                       num_cpus=cpus)
    t = time.perf_counter()
    n = sum(len(b["id"]) for b in ds.iter_batches(batch_size=64))
    return n, time.perf_counter() - t


class RefAudio:
    """torch Dataset: one file per item, decoded the way the authors' scripts do it."""

    def __init__(self, files):
        self.files = files
        self.extractor = None

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import soundfile as sf
        import torch
        import torchaudio
        from transformers import ClapFeatureExtractor

        from biovita.models.registry import CLAP_PREPROCESS

        if self.extractor is None:
            self.extractor = ClapFeatureExtractor(
                **{k: v for k, v in CLAP_PREPROCESS.items() if k != "max_length_s"})
        try:
            x, sr = sf.read(self.files[i], dtype="float32", always_2d=True)
        except Exception:
            return torch.zeros(1, 1001, 64)
        w = torch.from_numpy(x.T).mean(0)
        if sr != 48000:
            w = torchaudio.functional.resample(w, sr, 48000)
        w = torch.nn.functional.pad(w, (0, max(0, 480000 - w.shape[0])))[:480000]
        return self.extractor(w.numpy(), sampling_rate=48000, return_tensors="pt")["input_features"][0]


class RefImage:
    def __init__(self, files):
        self.files = files
        self.tf = None

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

    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=workers)
    t = time.perf_counter()
    n = sum(len(b) for b in loader)
    return n, time.perf_counter() - t


def _raw_one(path: str) -> int:
    import soundfile as sf
    import torch

    torch.set_num_threads(1)
    try:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception:
        return 0
    torch.stft(torch.from_numpy(x.mean(1)), n_fft=1024, hop_length=480,
               window=torch.hann_window(1024), return_complex=True)
    return 1


def raw_limit(files, pool) -> tuple[int, float]:
    t = time.perf_counter()
    pool.map(_raw_one, files, chunksize=8)
    return len(files), time.perf_counter() - t


def export_files(root: str, table: str, out: Path) -> list[str]:
    from biovita.data.store import read_table

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for r in read_table(root, table, ["id", "bytes", "format"]).to_pylist():
        p = out / f"{r['id']}.{r['format']}"
        p.write_bytes(r["bytes"])
        files.append(str(p))
    return files


def replicate(root: str, out: Path, times: int) -> None:
    """A store with `times` x the rows (ids made unique) to check that memory stays flat."""
    from biovita.data.store import ShardWriter, table_files

    for table in ("audio", "image", "taxa"):
        if table == "taxa":
            shutil.copytree(Path(root) / "taxa", out / "taxa", dirs_exist_ok=True)
            continue
        w = ShardWriter(out, table, rows_per_shard=64)
        import pyarrow.parquet as pq

        for k in range(times):
            for f in table_files(root, table):
                for r in pq.read_table(f).to_pylist():
                    w.add({**r, "id": f"{r['id']}_{k}"})
        w.close()


def rate(run, repeat: int) -> float:
    """Items per second: the median of `repeat` timed runs (this machine's speed drifts)."""
    return statistics.median(n / t for n, t in (run() for _ in range(repeat)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default=None, help="Parquet store (default: a fresh synthetic one)")
    p.add_argument("--species", type=int, default=32)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--scale", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3, help="timed runs per path (median)")
    a = p.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="biovita-bench-"))
    root = a.store
    if root is None:
        from biovita.data.synth import make_synthetic

        root = str(tmp / "store")
        make_synthetic(root, n_species=a.species, seed=1)
    audio_files = export_files(root, "audio", tmp / "files_audio")
    image_files = export_files(root, "image", tmp / "files_image")

    # the reference's workers fork from this process: import their libraries here, once
    import importlib

    for lib in ("open_clip", "torchaudio", "transformers"):
        importlib.import_module(lib)

    ref_a = rate(lambda: reference(RefAudio(audio_files), a.cpus), a.repeat)
    ref_i = rate(lambda: reference(RefImage(image_files), a.cpus), a.repeat)
    # the raw loop's processes come from a forkserver (safe beside Ray) and stay up, so that
    # its runs alternate with the pipeline's: the ratio pairs runs made seconds apart
    pool = mp.get_context("forkserver").Pool(a.cpus)
    raw_limit(audio_files, pool)  # warm-up: imports

    ray.init(num_cpus=a.cpus, object_store_memory=int(1e9), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_audio(root, 1.0)  # warm-up: worker processes, imports
    ray_images(root, 1.0)
    pairs = [(rate(lambda: raw_limit(audio_files, pool), 1), rate(lambda: ray_audio(root, 1.0), 1))
             for _ in range(a.repeat)]  # timed without the memory sampler (it reads every smaps)
    pool.close()
    raw_a = statistics.median(r for r, _ in pairs)
    ray_a = statistics.median(x for _, x in pairs)
    raw_ratio = statistics.median(r / x for r, x in pairs)
    ray_i = rate(lambda: ray_images(root, 1.0), a.repeat)
    with PeakMemory() as m1:
        ray_audio(root, 1.0)
    rss1 = m1.peak
    big = tmp / "store10x"
    replicate(root, big, a.scale)
    with PeakMemory() as m10:
        n10, t10 = ray_audio(str(big), 1.0)
    rss10 = m10.peak
    ray.shutdown()

    print(f"{len(audio_files)} clips, {len(image_files)} images, {a.cpus} CPUs")
    print(f"{'path':<34}{'clips/s':>10}{'images/s':>10}")
    print(f"{'Ray Data pipeline (biovita)':<34}{ray_a:>10.1f}{ray_i:>10.1f}")
    print(f"{'(a) DataLoader, file per item':<34}{ref_a:>10.1f}{ref_i:>10.1f}")
    print(f"{'(b) raw decode + 1 STFT loop':<34}{raw_a:>10.1f}{'':>10}")
    print(f"ratio vs (a): audio {ray_a / ref_a:.2f}x, images {ray_i / ref_i:.2f}x   (target >= 3x)")
    print(f"ratio vs (b): {raw_ratio:.2f}x slower than the raw limit (median of {a.repeat} paired runs: "
          f"{', '.join(f'{r / x:.2f}' for r, x in pairs)})   (target <= 1.5x)")
    print(f"peak memory (PSS): 1x rows {rss1 / 2**30:.2f} GiB, {a.scale}x rows ({n10} clips, {n10 / t10:.1f} clips/s) "
          f"{rss10 / 2**30:.2f} GiB, ratio {rss10 / rss1:.2f}   (target < 1.2)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
