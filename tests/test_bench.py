"""Benchmark scoring on a hand-made benchmark whose answers are known by construction."""

import csv
import json

import numpy as np
import pytest
import torch

from biovita.bench.build import TASKS
from biovita.bench.score import rank_of_correct, score_benchmark
from biovita.errors import BenchmarkError
from biovita.taxonomy import LEVELS

FIELDS = ["task", "taxon_level", "query_payload_id", "correct_taxon", "candidates_taxa",
          "candidates_target_ids", "taxon_class"]


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "candidates_taxa": json.dumps(r["candidates_taxa"]),
                        "candidates_target_ids": json.dumps(r["candidates_target_ids"])})


def _vec(i, d=8):
    v = np.zeros(d, np.float32)
    v[i] = 1.0
    return torch.from_numpy(v)


@pytest.fixture
def handmade(tmp_path):
    """Taxa T0..T3 with unit-vector features e0..e3. Audio queries a0 (-> e0, correct T0,
    rank 0), a1 (-> near e2, correct T1: rank 1), a2 (correct T3, not in candidates: skipped),
    a3 (no feature file: skipped)."""
    bench, feats = tmp_path / "bench", tmp_path / "feats"
    for m in ("audio", "image", "text"):
        (feats / m).mkdir(parents=True)
    torch.save(_vec(0), feats / "audio" / "a0.pt")
    torch.save(torch.tensor([0.0, 0.6, 0.8, 0, 0, 0, 0, 0]), feats / "audio" / "a1.pt")
    torch.save(_vec(3), feats / "audio" / "a2.pt")
    for t in range(4):
        torch.save({lvl: _vec(t) for lvl in LEVELS}, feats / "text" / f"t{t}.pt")
        torch.save(_vec(t), feats / "image" / f"i{t}a.pt")
        torch.save(-_vec(t), feats / "image" / f"i{t}b.pt")  # second gallery item: far away
    cands = ["T0", "T1", "T2"]
    for lvl in LEVELS:
        for task in TASKS:
            q, g = task.split("_to_")
            rows = []
            if q == "audio":
                gal = (lambda t: [f"t{t}"]) if g == "text" else (lambda t: [f"i{t}b", f"i{t}a"])
                for qid, correct in (("a0", "T0"), ("a1", "T1"), ("a2", "T3"), ("a3", "T0")):
                    rows.append({"task": task, "taxon_level": lvl, "query_payload_id": qid,
                                 "correct_taxon": correct, "candidates_taxa": cands,
                                 "candidates_target_ids": [gal(int(c[1])) for c in cands],
                                 "taxon_class": "Aves" if qid == "a0" else "Insecta"})
            _write(bench / lvl / f"test_{task}.csv", rows)
    return bench, feats


def test_known_topk_and_skips(handmade):
    bench, feats = handmade
    res = score_benchmark(bench, feats)
    for lvl in LEVELS:
        for code in ("A2T", "A2I"):
            e = res[lvl][code]
            assert e["n"] == 2 and e["skipped"] == 2
            assert e["top1"] == 0.5 and e["top5"] == 1.0 and e["top10"] == 1.0
        assert res[lvl]["I2T"]["n"] == 0
    assert res["species"]["A2I"] == res["species"]["A2T"]
    assert res["per_class"]["species"]["A2T"] == {"Aves": {"top1": 1.0, "top5": 1.0, "n": 1},
                                                  "Insecta": {"top1": 0.0, "top5": 1.0, "n": 1}}
    assert res["skipped_detail"]["species"]["A2T"] == {"correct_not_in_candidates": 1,
                                                       "query_without_feature": 1}
    assert res["per_taxon"]["genus"]["A2T"]["T1"] == {"top1": 0.0, "n": 1}


def test_malformed_files_name_file_and_row(handmade):
    bench, feats = handmade
    p = bench / "species" / "test_audio_to_text.csv"
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["candidates_taxa"] = '["T0", "T1"'  # truncated JSON in the first data row
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(BenchmarkError, match=r"test_audio_to_text.csv, row 2: malformed JSON"):
        score_benchmark(bench, feats)
    (bench / "genus" / "test_image_to_text.csv").unlink()
    p.write_text(",".join(FIELDS) + "\n")
    with pytest.raises(BenchmarkError, match="missing benchmark file .*genus/test_image_to_text.csv"):
        score_benchmark(bench, feats)


def _reference_ranks(rows, q, g):
    """The authors' pattern: a Python loop over queries, per-candidate max."""
    out = []
    for r in rows:
        if r["correct_taxon"] not in r["candidates_taxa"] or r["query_payload_id"] not in q:
            continue
        scores = [max(float(q[r["query_payload_id"]] @ g[i]) for i in gal) for gal in r["candidates_target_ids"]]
        c = scores[r["candidates_taxa"].index(r["correct_taxon"])]
        out.append(sum(s > c for s in scores))
    return np.array(out)


def test_vectorised_equals_reference_on_random_data():
    rng = np.random.default_rng(0)
    d, n_tax, per = 16, 40, 3
    g = {f"g{t}_{k}": v / np.linalg.norm(v) for t in range(n_tax) for k in range(per)
         for v in [rng.standard_normal(d).astype(np.float32)]}
    q = {f"q{i}": v / np.linalg.norm(v) for i in range(300) for v in [rng.standard_normal(d).astype(np.float32)]}
    rows = []
    for i in range(300):
        cands = [f"T{t}" for t in rng.choice(n_tax, 25, replace=False)]
        rows.append({"query_payload_id": f"q{i}", "correct_taxon": cands[int(rng.integers(25))],
                     "candidates_taxa": cands,
                     "candidates_target_ids": [[f"g{c[1:]}_{k}" for k in range(per)] for c in cands]})
    ranks, skipped, kept = rank_of_correct(rows, q, g)
    np.testing.assert_array_equal(ranks, _reference_ranks(rows, q, g))
    assert not skipped and len(kept) == 300
