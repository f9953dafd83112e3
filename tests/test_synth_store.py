import hashlib
import io

import numpy as np
import pyarrow as pa
import soundfile as sf

from biovita.data.schema import META_COLUMNS, TRAIT_COLUMNS, check_schema
from biovita.data.store import read_table, shards, table_files, write_table
from biovita.data.synth import CORRUPT_IMAGE, make_synthetic, make_taxonomy


def test_taxonomy_hierarchy_and_unseen_species():
    sp = make_taxonomy(32, seed=0)
    assert len(sp) == 32
    assert {s.klass for s in sp} == {"Aves", "Amphibia", "Insecta", "Mammalia"}
    # class -> order -> family -> genus -> species is a tree
    for lvl, parent in (("genus", "family"), ("family", "order"), ("order", "klass")):
        owners = {}
        for s in sp:
            assert owners.setdefault(getattr(s, lvl), getattr(s, parent)) == getattr(s, parent)
    assert all(s.scientific_name.split()[0] == s.genus for s in sp)
    assert len({s.common_name for s in sp}) == 32
    assert 0 < sum(not s.seen for s in sp) < 32


def test_store_contents(synth_store):
    root, manifest = synth_store
    audio = read_table(root, "audio", META_COLUMNS["audio"]).to_pylist()
    images = read_table(root, "image", META_COLUMNS["image"]).to_pylist()
    taxa = read_table(root, "taxa").to_pylist()
    assert len(audio) == manifest["audio_rows"] and len(images) == manifest["image_rows"]
    assert len(table_files(root, "audio")) > 1  # sharded
    unseen = {t["species_id"] for t in taxa if not t["seen"]}
    assert unseen and not any(r["species_id"] in unseen and r["split"] == "train" for r in audio + images)
    assert {r["format"] for r in audio} == {"wav", "flac", "ogg", "mp3"}
    assert {r["format"] for r in images} >= {"jpeg", "png", "webp"}
    assert all(set(TRAIT_COLUMNS) <= t.keys() for t in taxa)
    for table in ("audio", "image", "taxa"):
        assert all(check_schema(table, s.schema) == [] for s in shards(root, table))
    assert manifest["corrupt"]["audio"] == {"undecodable": 2, "html_page": 1, "empty_file": 1, "non_finite": 1}
    assert sum(manifest["corrupt"]["image"].values()) == len(CORRUPT_IMAGE)


def test_audio_varies_in_rate_channels_and_duration(synth_store):
    root, _ = synth_store
    rows = read_table(root, "audio", ["id", "bytes"]).to_pylist()
    rates, chans, durs = set(), set(), []
    for r in rows:
        if r["id"].startswith("bad_"):
            continue
        info = sf.info(io.BytesIO(r["bytes"]))
        rates.add(info.samplerate)
        chans.add(info.channels)
        durs.append(info.duration)
    assert min(rates) == 16_000 and max(rates) == 48_000 and len(rates) >= 4
    assert chans == {1, 2}
    assert min(durs) < 10 < max(durs)


def test_related_taxa_sound_related(synth_store):
    """Mean log-mel profiles: same family closer than same class, closer than other classes."""
    from biovita.frontends.audio import AudioFrontEnd, load_clip, log_mel

    root, _ = synth_store
    rows = [r for r in read_table(root, "audio", ["id", "bytes", "species_id", "genus", "family", "class"]).to_pylist()
            if not r["id"].startswith("bad_")]
    fe = AudioFrontEnd()
    prof = {}
    for r in rows:
        mel = log_mel(fe)(load_clip(r["bytes"], fe, "start"))[0, 0].numpy()
        prof.setdefault(r["species_id"], []).append(mel.max(0))
    meta = {r["species_id"]: r for r in rows}
    centre = {s: np.mean(v, 0) for s, v in prof.items()}
    d = {"genus": [], "family": [], "class": [], "other": []}
    for a in centre:
        for b in centre:
            if a >= b:
                continue
            dist = np.linalg.norm(centre[a] - centre[b])
            ma, mb = meta[a], meta[b]
            key = ("family" if ma["family"] == mb["family"]
                   else "class" if ma["class"] == mb["class"] else "other")
            d[key].append(dist)
    assert np.mean(d["family"]) < np.mean(d["class"]) < np.mean(d["other"])


def test_deterministic_for_a_seed(tmp_path):
    a = make_synthetic(tmp_path / "a", n_species=8, seed=5, train_clips=(1, 3), train_images=(1, 3),
                       test_clips=1, test_images=1)
    b = make_synthetic(tmp_path / "b", n_species=8, seed=5, train_clips=(1, 3), train_images=(1, 3),
                       test_clips=1, test_images=1)
    assert a == b

    def digest(root):
        """Decoded samples (an Ogg stream's serial number is random by design) + image bytes."""
        from biovita.frontends.audio import read_audio
        from biovita.errors import MediaError

        h = hashlib.sha256()
        for r in read_table(root, "audio", ["id", "bytes"]).to_pylist():
            h.update(r["id"].encode())
            try:
                h.update(read_audio(r["bytes"])[0].tobytes())
            except MediaError as e:
                h.update(e.reason.encode())
        for r in read_table(root, "image", ["id", "bytes"]).to_pylist():
            h.update(r["id"].encode() + r["bytes"])
        return h.hexdigest()
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_write_read_round_trip(tmp_path):
    rows = [{"species_id": i, "class": "Aves", "order": "O", "family": "F", "genus": "G",
             "scientific_name": f"G s{i}", "common_name": "", "seen": True,
             **{c: 0 for c in TRAIT_COLUMNS}} for i in range(5)]
    paths = write_table(tmp_path, "taxa", rows, rows_per_shard=2)
    assert len(paths) == 3
    assert read_table(tmp_path, "taxa")["species_id"].to_pylist() == list(range(5))
    bad = pa.schema([pa.field("id", pa.int64())])
    assert any("missing column 'bytes'" in p for p in check_schema("audio", bad))
    assert any("has type int64" in p for p in check_schema("audio", bad))


def test_media_shards_store_every_column_plain_in_small_row_groups(tmp_path):
    """A training read takes a small row group whole: every column plain (no decompression,
    no dictionary page to decode), no statistics of the media in the footer; small row
    groups give Ray Data small blocks to spread decoding over many tasks."""
    import pyarrow.parquet as pq

    from biovita.data.store import ROW_GROUP_ROWS

    rows = [{"id": f"a{i}", "bytes": bytes(100), "format": "wav", "source": "xc",
             "recording_id": str(i), "class": "Aves", "order": "O", "family": "F", "genus": "G",
             "scientific_name": "G s", "common_name": "", "species_id": 0, "split": "train"}
            for i in range(2 * ROW_GROUP_ROWS + 1)]
    (path,) = write_table(tmp_path, "audio", rows, rows_per_shard=len(rows))
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 3
    names = [meta.row_group(0).column(i).path_in_schema for i in range(meta.num_columns)]
    columns = {n: meta.row_group(0).column(i) for i, n in enumerate(names)}
    assert {c.compression for c in columns.values()} == {"UNCOMPRESSED"}
    assert not any("DICTIONARY" in e for c in columns.values() for e in c.encodings)
    assert not columns["bytes"].is_stats_set and columns["species_id"].statistics.max == 0
    assert read_table(tmp_path, "audio")["id"].to_pylist() == [r["id"] for r in rows]


def test_job_keeps_the_store_at_root_unless_another_world_is_asked_for(synth_store, tmp_path):
    import json

    from biovita.config import load_config
    from biovita.train.chain import ensure_data

    def files(root):
        return {p: p.stat().st_mtime_ns for p in root.rglob("*.parquet")}

    # the default config names no species count or seed: the 16-species store is used as it is
    root, _ = synth_store
    before = files(root)
    ensure_data(load_config("default", [f"data.root={root}"]))
    assert files(root) == before and json.loads((root / "meta.json").read_text())["n_species"] == 16

    small = tmp_path / "s"
    make_synthetic(small, n_species=8, seed=0, train_clips=(2, 3), train_images=(2, 3),
                   test_clips=1, test_images=1)
    before = files(small)
    ensure_data(load_config("default", [f"data.root={small}", "data.synth_species=8",
                                        "data.synth_seed=0"]))
    assert files(small) == before
    ensure_data(load_config("default", [f"data.root={small}", "data.synth_species=8",
                                        "data.synth_seed=1"]))
    meta = json.loads((small / "meta.json").read_text())
    assert (meta["n_species"], meta["seed"]) == (8, 1) and files(small) != before

    # a store make_synthetic did not write is never touched
    meta["profile"] = "realistic"
    (small / "meta.json").write_text(json.dumps(meta))
    before = files(small)
    ensure_data(load_config("default", [f"data.root={small}", "data.synth_species=12"]))
    assert files(small) == before
