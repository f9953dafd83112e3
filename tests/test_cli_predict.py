import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

from biovita.data.store import read_table


def test_help_is_instant_and_lists_subcommands():
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("synth", "convert", "validate", "list-models", "train", "tune", "bench", "predict", "embed"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, biovita.cli; print('torch' in sys.modules, 'ray' in sys.modules)"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "False False"  # heavy imports are deferred


def test_list_models_cli():
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "list-models", "*clap*"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("bioclip2-clap")


@pytest.fixture
def media_files(synth_store, tmp_path):
    root, _ = synth_store
    a = next(r for r in read_table(root, "audio", ["id", "bytes", "format"]).to_pylist() if not r["id"].startswith("bad"))
    i = next(r for r in read_table(root, "image", ["id", "bytes", "format"]).to_pylist() if not r["id"].startswith("bad"))
    fa = tmp_path / f"call.{a['format']}"
    fa.write_bytes(a["bytes"])
    fi = tmp_path / f"photo.{'jpg' if i['format'] == 'jpeg' else i['format']}"
    fi.write_bytes(i["bytes"])
    return fa, fi


@pytest.fixture
def taxa_csv(synth_store, tmp_path):
    root, _ = synth_store
    taxa = read_table(root, "taxa", ["class", "order", "family", "genus", "scientific_name", "common_name"]).to_pylist()
    csv_path = tmp_path / "taxa.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(taxa[0]))
        w.writeheader()
        w.writerows(taxa)
    return csv_path, taxa


def test_predictor_ranks_taxa_and_caches_labels(tiny_checkpoint, media_files, taxa_csv):
    import biovita

    csv_path, taxa = taxa_csv
    p = biovita.Predictor(tiny_checkpoint, taxa_csv=csv_path)
    rows = p.predict([str(x) for x in media_files], rank="genus", k=3)
    assert len(rows) == 6
    assert {r["modality"] for r in rows} == {"audio", "image"}
    for f in media_files:
        mine = [r for r in rows if r["file"] == str(f)]
        assert [r["rank"] for r in mine] == [1, 2, 3]
        assert mine[0]["score"] >= mine[1]["score"] >= mine[2]["score"]
        assert all(r["genus"] in {t["genus"] for t in taxa} for r in mine)
        # softmax over every genus at the model's logit scale: ordered as the scores, <= 1 in all
        probs = [r["probability"] for r in mine]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    modality, v = p.embed_file(media_files[0])
    full = p.rank(modality, v, "genus", k=100)
    assert len(full) == len({t["genus"] for t in taxa})
    assert sum(r["probability"] for r in full) == pytest.approx(1.0, abs=1e-5)
    assert any(Path(tiny_checkpoint).glob("labels_genus_*.npy"))  # cached next to the checkpoint
    buf = io.StringIO()
    biovita.Predictor.print_rows(rows, "csv", out=buf)
    assert buf.getvalue().splitlines()[0].startswith("file,modality,rank,class")


def test_predict_cli_table(tiny_checkpoint, media_files, taxa_csv):
    csv_path, _ = taxa_csv
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "predict", tiny_checkpoint, str(media_files[0]),
                        "--taxa", str(csv_path), "--k", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["file", "modality", "rank"] and len(lines) == 3
    assert lines[0].split()[-2:] == ["score", "probability"]
