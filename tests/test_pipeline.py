"""Ray Data decoding on a real local Ray instance, real Parquet files and real codecs."""

import dataclasses
import time

import numpy as np
import pytest
import torch

from biovita.data import sampling
from biovita.data.datasets import TorchCollate, audio_dataset, image_dataset, stream_dataset
from biovita.data.decode import AudioDecodeSpec, ImageDecodeSpec
from biovita.data.stats import bad_media_counts, media_stats
from biovita.data.store import read_table
from biovita.frontends.audio import AudioFrontEnd
from biovita.frontends.image import ImageFrontEnd


def test_balanced_counts_cap_all_and_oversample():
    ids = [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)] + ["c0", "c1"]
    species = [0] * 30 + [1] * 10 + [2] * 2
    c = sampling.balanced_counts(ids, species, cap=20, minimum=5, seed=0, epoch=0)
    per = {s: sum(n for i, n in c.items() if i[0] == s) for s in "abc"}
    assert per == {"a": 20, "b": 10, "c": 5}
    assert all(c[f"b{i}"] == 1 for i in range(10))
    assert c["c0"] >= 1 and c["c1"] >= 1
    again = sampling.balanced_counts(ids, species, 20, 5, seed=0, epoch=0)
    other = sampling.balanced_counts(ids, species, 20, 5, seed=0, epoch=1)
    assert c == again and c != other  # reshuffled each epoch, from the seed


def test_triplet_plan_pairs_same_species():
    a_ids, a_sp = ["x1", "x2", "y1"], [0, 0, 1]
    i_ids, i_sp = ["ix", "iy1", "iy2", "iz"], [0, 1, 1, 2]
    plan = sampling.triplet_plan(a_ids, a_sp, i_ids, i_sp, per_species=20, seed=0)
    sp_of_img = dict(zip(i_ids, i_sp))
    sp_of_audio = dict(zip(a_ids, a_sp))
    assert sum(len(v) for v in plan.values()) == 40  # species 2 has no audio: left out
    for a, imgs in plan.items():
        assert all(sp_of_img[i] == sp_of_audio[a] for i in imgs)


def test_audio_pipeline_applies_plan_and_counts_bad_media(ray_local, synth_store):
    root, manifest = synth_store
    name = "test-stats-audio"
    media_stats(name)
    meta = read_table(root, "audio", ["id", "species_id", "split"]).to_pydict()
    train = [(i, s) for i, s, sp in zip(meta["id"], meta["species_id"], meta["split"]) if sp == "train"]
    plan = sampling.balanced_counts([t[0] for t in train], [t[1] for t in train], 20, 5, 0, 0)
    bad_in_plan = sum(n for i, n in plan.items() if i.startswith("bad_"))
    spec = AudioDecodeSpec(AudioFrontEnd(), "random", seed=0, epoch=0, stats_name=name)
    ds = stream_dataset(str(root), "audio", spec, {0: plan}, batch_size=16, seed=0)
    n, texts, species = 0, [], []
    for b in ds.iter_torch_batches(batch_size=16, collate_fn=TorchCollate()):
        # 10 s crops shipped as float16 waveforms (the log-mel is the consumer's, on its device)
        assert b["wave"].shape[1:] == (480_000,) and b["wave"].dtype == torch.float16
        assert b["wave"].isfinite().all() and b["wave"].abs().amax(1).min() > 0  # no silence
        n += len(b["id"])
        texts += b["text"]
        species += b["species_id"].tolist()
        assert not any(i.startswith("bad_") for i in b["id"])
    assert n == sum(plan.values()) - bad_in_plan
    snap = bad_media_counts(name)
    bad_ids_in_plan = {i for i in plan if i.startswith("bad_")}
    assert sum(snap["bad"]["audio"].values()) == len(bad_ids_in_plan)
    assert all(isinstance(t, str) and t for t in texts)


def test_full_pass_counts_every_corrupt_file_exactly(ray_local, synth_store):
    root, manifest = synth_store
    name = "test-stats-full"
    media_stats(name)
    a = audio_dataset(str(root), AudioDecodeSpec(mode="onset", prompts="none", stats_name=name), split=None)
    i = image_dataset(str(root), ImageDecodeSpec(ImageFrontEnd(64), prompts="none", stats_name=name), split=None)
    na = sum(len(b["id"]) for b in a.iter_batches(batch_size=64))
    ni = 0
    for b in i.iter_batches(batch_size=64):
        ni += len(b["id"])
        assert b["pixels"].shape[1:] == (3, 64, 64) and b["pixels"].dtype == np.uint8
        assert b["pixels"].reshape(len(b["id"]), -1).std(axis=1).min() > 0  # no blank image
    snap = bad_media_counts(name)
    assert snap["bad"]["audio"] == manifest["corrupt"]["audio"]
    assert snap["bad"]["image"] == manifest["corrupt"]["image"]
    assert na == manifest["audio_rows"] - sum(manifest["corrupt"]["audio"].values())
    assert ni == manifest["image_rows"] - sum(manifest["corrupt"]["image"].values())


def test_epoch_stream_is_each_epoch_in_turn_and_deterministic(ray_local, synth_store):
    """A stage streams all its epochs as one dataset; epoch e of the stream is exactly what a
    one-epoch dataset with epoch offset e decodes (new crops and prompts each epoch)."""
    root, _ = synth_store
    meta = read_table(root, "audio", ["id", "species_id", "split"]).to_pydict()
    plan = {i: 1 for i, sp in zip(meta["id"], meta["split"]) if sp == "test"}

    def run(plans, offset=0):
        spec = AudioDecodeSpec(seed=3, epoch=offset, stats_name=None)
        out = {}
        ds = stream_dataset(str(root), "audio", spec, dict(enumerate(plans)), batch_size=8, seed=0)
        for b in ds.iter_batches(batch_size=64):
            for k, e, w, t in zip(b["id"], b["epoch"], b["wave"], b["text"]):
                out[(int(e), k)] = (float(w.astype(np.float64).sum()), t)
        return out

    both, e0, e1 = run([plan, plan]), run([plan]), run([plan], offset=1)
    assert {k for k in both if k[0] == 0} == set(e0) and 0 < len(e0) <= len(plan)
    assert {k: v for k, v in both.items() if k[0] == 0} == e0
    assert {(0, k[1]): v for k, v in both.items() if k[0] == 1} == e1
    assert e0 != {k: e1[k] for k in e0}  # new crops and prompts each epoch


def test_a_slow_consumer_holds_decoding_back_without_spinning(ray_local, synth_store):
    """A stream decodes at most `ahead_mb` ahead of its consumer, and the executor then
    sleeps. With Ray Data's own policies this stream was decoded ahead without bound while
    its scheduling loop burnt 2.8 s of CPU in 3 s of waiting (measured)."""
    root, _ = synth_store
    name = "test-stats-slow"
    media_stats(name)
    meta = read_table(root, "audio", ["id", "split"]).to_pydict()
    plan = {i: 1 for i, sp in zip(meta["id"], meta["split"]) if sp == "train"}
    epochs = 40
    ds = stream_dataset(str(root), "audio", AudioDecodeSpec(prompts="none", stats_name=name),
                        dict(enumerate([plan] * epochs)), batch_size=8, seed=0, decoders=2,
                        ahead_mb=32)
    it = iter(ds.iter_batches(batch_size=8, prefetch_batches=1))
    next(it)

    def decoded() -> int:
        return bad_media_counts(name)["good"].get("audio", 0)

    before, now = -1, decoded()
    for _ in range(30):  # until decoding stands still
        time.sleep(1)
        before, now = now, decoded()
        if now == before:
            break
    assert now == before, "decoding never paused for the slow consumer"
    assert now < epochs * len(plan) / 4  # 32 MB is ~35 clips of 0.96 MB (10 s of float16 at 48 kHz), plus tasks in flight
    cpu = time.process_time()
    time.sleep(2)
    assert time.process_time() - cpu < 1.0  # the executor waits, it does not spin
    assert decoded() == now
    assert len(next(it)["id"]) == 8  # and the stream goes on when the consumer does


def test_row_group_selection_skips_unplanned_and_other_splits(synth_store):
    from biovita.data.planning import RowGroup, row_groups, select_row_groups

    root, manifest = synth_store
    groups = row_groups(str(root), "audio")
    assert sum(len(g.ids) for g in groups) == manifest["audio_rows"]
    assert len({(g.path, g.index) for g in groups}) == len(groups) > 1
    one = groups[1]
    plan = {one.ids[0]: 2}
    assert select_row_groups(groups, None, plan) == [one]
    assert select_row_groups(groups, "test") == [g for g in groups if "test" in g.splits]
    only_train = RowGroup("x.parquet", 0, ("a", "b"), ("train", "train"))
    assert select_row_groups([only_train, one], "test") == [one]  # never read for eval
    a, b = select_row_groups(groups, order_seed=(0, 1)), select_row_groups(groups, order_seed=(0, 2))
    assert sorted(a, key=id) == sorted(b, key=id) and a != b  # a new order each epoch
    assert select_row_groups(groups, order_seed=(0, 1)) == a


def test_decode_tasks_gather_small_row_groups_but_keep_every_decoder_busy(synth_store):
    from biovita.data.planning import TASK_BYTES, RowGroup, decode_tasks, row_groups

    root, _ = synth_store
    groups = row_groups(str(root), "image")
    assert all(g.nbytes > 0 for g in groups)

    def make(n, nbytes):
        return [RowGroup(f"{k}.parquet", 0, (str(k),), ("train",), nbytes) for k in range(n)]

    big, small = make(40, TASK_BYTES), make(40, TASK_BYTES // 8)
    assert [len(t) for t in decode_tasks(big, 4)] == [1] * 40  # a row group is enough work
    assert [len(t) for t in decode_tasks(small, 2)] == [8] * 5  # ~TASK_BYTES a task
    assert [len(t) for t in decode_tasks(small, 8)] == [3] * 13 + [1]  # >= 2 tasks a decoder
    assert [g for t in decode_tasks(small, 2) for g in t] == small  # order kept, none lost
    assert decode_tasks([], 2) == []


def test_segments_are_whole_batches_and_keep_every_decoder_busy():
    from biovita.data.planning import TASK_BYTES, segments

    cut = segments(1000, 16, TASK_BYTES / 64, decoders=2)  # 64 uses make a task's bytes
    assert all((b - a) % 16 == 0 for a, b in cut[:-1]) and cut[0] == (0, 64)
    assert [b - a for a, b in cut][:-1] == [64] * 15 and cut[-1] == (960, 1000)
    assert segments(100, 16, 1.0, decoders=4) == [(0, 16), (16, 32), (32, 48), (48, 64), (64, 80),
                                                  (80, 96), (96, 100)]  # >= 2 tasks a decoder
    assert segments(0, 16, 1.0, 2) == []


def _in_batch_pairs(ids: list[str], batch: int) -> int:
    """Pairs of rows with the same id inside the same batch of consecutive rows."""
    from collections import Counter

    return sum(n * (n - 1) // 2 for s in range(0, len(ids) - batch + 1, batch)
               for n in Counter(ids[s:s + batch]).values())


def test_stream_spreads_repeated_uses_like_a_uniform_shuffle(ray_local, synth_store):
    """A clip used several times in an epoch (an oversampled species, a clip in several
    triplets) lands anywhere in it: in-batch pairs of the same clip match a uniform shuffle of
    the epoch's plan, whose expectation is D (B - 1) / (N - 1) per epoch (N uses, D = the sum
    over clips of C(uses, 2)). Before, a clip's uses were decoded together and only a shuffle
    buffer of 4 batches stood between them: 2.1x that (measured on this plan with the old
    pipeline: 105 pairs in 5 epochs against an expected 50; this one: 58)."""
    import numpy as np

    root, _ = synth_store
    meta = read_table(root, "audio", ["id", "split"]).to_pydict()
    good = sorted(i for i, sp in zip(meta["id"], meta["split"]) if sp == "train" and not i.startswith("bad"))
    rng = np.random.default_rng(7)
    plan = {i: int(rng.integers(1, 6)) for i in good}
    B, epochs = 8, 5
    ds = stream_dataset(str(root), "audio", AudioDecodeSpec(prompts="none", stats_name=None),
                        {e: plan for e in range(epochs)}, batch_size=B, seed=0)
    rows = [(int(e), str(i)) for b in ds.iter_batches(batch_size=B, batch_format="numpy")
            for e, i in zip(b["epoch"], b["id"])]
    n = sum(plan.values())
    assert sorted(rows) == sorted((e, i) for e in range(epochs) for i in plan
                                  for _ in range(plan[i]))  # every use of every epoch, once
    observed = _in_batch_pairs(rows, B)  # the batches the consumer got
    d = sum(m * (m - 1) // 2 for m in plan.values())
    expected = epochs * d * (B - 1) / (n - 1)
    uses = [i for i, m in plan.items() for _ in range(m)]
    sim = [sum(_in_batch_pairs([uses[k] for k in rng.permutation(n)], B) for _ in range(epochs))
           for _ in range(400)]
    assert abs(np.mean(sim) - expected) < 0.05 * expected  # the formula, checked by simulation
    assert abs(observed - expected) < 4 * np.std(sim), (observed, expected, np.std(sim))


def test_stream_delivers_every_epoch_in_its_planned_order(ray_local, synth_store):
    """Segments leave the stream in the epoch's order, however their decoders finish: two
    runs with the same seeds see the same batches."""
    root, _ = synth_store
    meta = read_table(root, "audio", ["id", "split"]).to_pydict()
    plan = {i: 1 for i, sp in zip(meta["id"], meta["split"]) if sp == "train"}
    spec = AudioDecodeSpec(prompts="none", stats_name=None)
    ds = stream_dataset(str(root), "audio", spec, {0: plan, 1: plan}, batch_size=4, seed=5,
                        decoders=3)
    got = [(int(e), str(i)) for b in ds.iter_batches(batch_size=32)
           for e, i in zip(b["epoch"], b["id"])]
    want = [(e, u[0]) for e in (0, 1) for u in sampling.epoch_order(plan, 5, e)]
    kept = set(got)  # corrupt clips are dropped
    assert len(kept) >= 0.9 * len(want) and got == [w for w in want if w in kept]


def test_a_stream_segment_reads_only_the_row_groups_of_its_uses(synth_store, monkeypatch):
    """A decode actor reads the row groups that hold its segment's media, once each, and
    never a whole shard (with a store of thousands of shards a per-shard read cost up to
    ~0.1 s a clip); the rows come back in the epoch's order, a repeated use included. A
    plan that no longer matches the store fails loudly instead of decoding other media."""
    import pyarrow.parquet as pq

    from biovita.data import datasets
    from biovita.data.planning import row_groups, stream_plan
    from biovita.data.store import filesystem, table_uri

    root, _ = synth_store
    groups = row_groups(str(root), "audio")
    assert max(len(g.ids) for g in groups) > 1  # rows within a row group are told apart
    fs, _ = filesystem(table_uri(str(root), "audio"))
    species = dict(zip(*read_table(root, "audio", ["id", "species_id"]).to_pydict().values()))
    picked = [groups[1].ids[-1], groups[-1].ids[0], groups[1].ids[0], groups[1].ids[-1]]
    order = [(m, k, None) for k, m in enumerate(picked)]
    plan = stream_plan(groups, {0: order + [(groups[0].ids[0], 0, None)]})
    calls = []
    for name in ("read_row_group", "read"):
        real = getattr(pq.ParquetFile, name)
        monkeypatch.setattr(pq.ParquetFile, name, lambda self, *a, _n=name, _r=real, **k:
                            calls.append((_n, self.metadata.num_rows, a[:1])) or _r(self, *a, **k))
    datasets._FILES.clear()
    rows = datasets._segment_rows(plan, fs, 0, 0, len(order))
    assert rows["id"].tolist() == picked and rows["_use"].tolist() == [0, 1, 2, 3]
    assert rows["species_id"].tolist() == [species[i] for i in picked]
    assert rows["bytes"][0] is rows["bytes"][3] and len(rows["bytes"][0]) > 0  # read once
    assert [c for c in calls if c[0] == "read"] == []  # never a whole shard
    assert sorted(c[2][0] for c in calls) == sorted([groups[1].index, groups[-1].index])

    for shift in (1, -1):  # rows moved within their row groups since planning
        moved = dataclasses.replace(plan, row_of=np.clip(plan.row_of + shift, 0, None))
        with pytest.raises(ValueError, match="store changed"):
            datasets._segment_rows(moved, fs, 0, 0, len(order))
