"""The release-layout converter and `biovita validate`, on fixtures the tests write."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from biovita.data.convert import convert_release
from biovita.data.store import read_table
from biovita.taxonomy import folder_name, species_key


def test_species_key_and_folder_name():
    assert species_key("Setophaga petechia aestiva", "x y") == "setophaga petechia"
    assert species_key("", "Rana  temporaria Linnaeus") == "rana temporaria"
    assert folder_name("setophaga petechia") == "setophaga_petechia"
    assert folder_name("Ab (cd) ef--g") == "ab_cd_ef--g"
    assert folder_name("x" * 200) == "x" * 120
    assert folder_name("  _a  b_ ") == "a_b"


def _wav(seconds=1.0, sr=16000):
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 800 * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


@pytest.fixture
def release(tmp_path):
    """A tiny release: 2 species, 5 CSV rows (one with no name, one with a missing file, one
    HTML saved as .mp3), images in per-species folders (one corrupt, one unknown folder)."""
    audio = tmp_path / "audio"
    audio.mkdir()
    (audio / "xc_1.wav").write_bytes(_wav())
    (audio / "xc_2.wav").write_bytes(_wav(2.0))
    (audio / "inat_3.mp3").write_bytes(b"<html><body>Error 404</body></html>")
    absolute = tmp_path / "elsewhere_asa_4.wav"
    absolute.write_bytes(_wav())
    header = ["download_url", "source", "recording_id", "file_name", "scientific_name",
              "accepted_name", "class", "order", "family", "genus", "com"]
    rows = [
        ["u", "xc", "1", "xc_1.wav", "Rana temporaria", "", "Amphibia", "Anura", "Ranidae", "Rana", "Common frog"],
        ["u", "xc", "2", "xc_2.wav", "Old name", "Setophaga petechia", "Aves", "Passeriformes", "Parulidae", "Setophaga", "Yellow Warbler"],
        ["u", "inat", "3", "inat_3.mp3", "Rana temporaria", "", "Amphibia", "Anura", "Ranidae", "Rana", "Common frog"],
        ["u", "asa", "4", str(absolute), "Rana temporaria", "", "Amphibia", "Anura", "Ranidae", "Rana", "Common frog"],
        ["u", "xc", "5", "xc_5.wav", "", "", "Aves", "", "", "", ""],
        ["u", "xc", "6", "missing.wav", "Rana temporaria", "", "Amphibia", "Anura", "Ranidae", "Rana", "Common frog"],
    ]
    with open(tmp_path / "release.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    images = tmp_path / "images"
    for sp in ("rana_temporaria", "setophaga_petechia", "unknown_species"):
        (images / sp).mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(images / "rana_temporaria" / "1.jpg")
    Image.new("RGB", (40, 30), (10, 200, 10)).save(images / "setophaga_petechia" / "a.png")
    (images / "setophaga_petechia" / "b.webp").write_bytes(b"not an image")
    (images / "setophaga_petechia" / "notes.txt").write_text("ignored")
    return tmp_path


def test_convert_release_layout(release, tmp_path):
    out = tmp_path / "store"
    rep = convert_release(str(release / "release.csv"), str(release / "audio"),
                          str(release / "images"), str(out), test_fraction=0.0, workers=1)
    assert rep.written["audio"] == 3 and rep.written["image"] == 2 and rep.written["taxa"] == 2
    assert dict(rep.skipped["csv"]) == {"no_species_name": 1, "missing_file": 1}
    assert dict(rep.skipped["audio"]) == {"html_page": 1}  # an error page saved as audio
    assert dict(rep.skipped["image"]) == {"not_image": 1, "unknown_species_folder": 1}  # text as .webp
    audio = read_table(out, "audio", ["id", "scientific_name", "species_id", "format", "split"]).to_pylist()
    assert {a["id"] for a in audio} == {"xc_1", "xc_2", "asa_4"}
    assert {a["scientific_name"] for a in audio} == {"Rana temporaria", "Setophaga petechia"}  # accepted wins
    assert all(a["split"] == "train" for a in audio)
    taxa = read_table(out, "taxa").to_pylist()
    assert {t["common_name"] for t in taxa} == {"Common frog", "Yellow Warbler"}


def test_validate_counts_and_schema_errors(ray_local, synth_store, tmp_path):
    from biovita.data.validate import validate_store

    root, manifest = synth_store
    ok, rep = validate_store(str(root), json_out=str(tmp_path / "v.json"), echo=False)
    assert ok
    saved = json.loads((tmp_path / "v.json").read_text())
    for table in ("audio", "image"):
        assert saved[table]["bad"] == sum(manifest["corrupt"][table].values())
        assert saved[table]["reasons"] == manifest["corrupt"][table]
        assert saved[table]["good"] == manifest[f"{table}_rows"] - saved[table]["bad"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = tmp_path / "broken"
    for t in ("audio", "image", "taxa"):
        (broken / t).mkdir(parents=True)
    pq.write_table(pa.table({"id": ["x"]}), broken / "audio" / "part-00000.parquet")
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "validate", str(broken)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "missing column 'bytes'" in r.stdout
