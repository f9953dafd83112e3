"""Benchmark scoring on a hand-made benchmark whose answers are known by construction."""

import csv
import json

import numpy as np
import pytest
import torch

from biovita.bench.build import TASKS
from biovita.bench.score import Features, Task, rank_of_correct, score_benchmark
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
    res = score_benchmark(bench, feats, skip_missing=True)  # biovita's earlier rule
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


def test_missing_features_count_as_the_authors_scorer_counts_them(handmade):
    """A query without a feature still counts, as a miss; a gallery item without one is a
    zero vector (cosine 0). Only a correct taxon outside the candidates skips a query."""
    bench, feats = handmade
    res = score_benchmark(bench, feats)
    for lvl in LEVELS:
        e = res[lvl]["A2T"]
        assert e["n"] == 3 and e["skipped"] == 1 and e["missing_query"] == 1  # a3 has no feature
        assert e["top1"] == pytest.approx(1 / 3) and e["top5"] == pytest.approx(2 / 3)
    assert res["skipped_detail"]["species"]["A2T"] == {"correct_not_in_candidates": 1}
    assert res["per_class"]["species"]["A2T"]["Insecta"] == {"top1": 0.0, "top5": 0.5, "n": 2}
    # a gallery item without a feature: i0a removed, taxon T0 keeps i0b = -e0 (cos -1 with a0)
    # and a zero vector (cos 0), so it scores 0 and still ranks first for a0 (T1, T2 score 0:
    # only a strictly higher score ranks above); leaving i0a out, T0 would score -1 and lose
    (feats / "image" / "i0a.pt").unlink()
    res = score_benchmark(bench, feats)
    assert res["species"]["A2I"]["missing_gallery"] == 1 and res["species"]["A2I"]["n"] == 3
    assert res["per_taxon"]["species"]["A2I"]["T0"] == {"top1": 0.5, "n": 2}  # a0 wins, a3 misses
    skip = score_benchmark(bench, feats, skip_missing=True)
    assert skip["per_taxon"]["species"]["A2I"]["T0"] == {"top1": 0.0, "n": 1}


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
    """The authors' pattern in float64: a Python loop over queries, per-candidate max; gallery
    items without a feature are left out, a candidate with none scores -inf; rows whose query
    or correct gallery has no feature are skipped."""
    out = []
    for r in rows:
        if r["correct_taxon"] not in r["candidates_taxa"] or r["query_payload_id"] not in q:
            continue
        qv = q[r["query_payload_id"]].astype(np.float64)
        scores = [max((float(qv @ g[i].astype(np.float64)) for i in gal if i in g), default=-np.inf)
                  for gal in r["candidates_target_ids"]]
        c = scores[r["candidates_taxa"].index(r["correct_taxon"])]
        if c > -np.inf:
            out.append(sum(s > c for s in scores))
    return np.array(out)


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_task(rng, d=16, n_tax=40, n_q=300, n_cand=25, per=3):
    g = {f"g{t}_{k}": v for (t, k), v in zip([(t, k) for t in range(n_tax) for k in range(per)],
                                            _unit(rng, n_tax * per, d))}
    q = {f"q{i}": v for i, v in enumerate(_unit(rng, n_q, d))}
    rows = []
    for i in range(n_q):
        cands = [f"T{t}" for t in rng.choice(n_tax, n_cand, replace=False)]
        rows.append({"query_payload_id": f"q{i}", "correct_taxon": cands[int(rng.integers(n_cand))],
                     "candidates_taxa": cands,
                     "candidates_target_ids": [[f"g{c[1:]}_{k}" for k in range(per)] for c in cands]})
    return rows, q, g


def _score(rows, q, g, cap=10):
    return rank_of_correct(Task.from_rows(rows), Features.from_dict(q), Features.from_dict(g), cap=cap)


def test_vectorised_equals_reference_on_random_data():
    rows, q, g = _random_task(np.random.default_rng(0))
    ranks, skipped, kept = _score(rows, q, g, cap=100)
    np.testing.assert_array_equal(ranks, _reference_ranks(rows, q, g))
    assert not skipped and len(kept) == 300


def test_near_ties_below_bfloat16_resolution_rank_exactly():
    """Candidate cosines 2e-4 apart (bfloat16 resolves ~4e-3, float32 ~6e-8): the certified
    bounds must send them all to the float32 recomputation, so ranks equal the reference."""
    rng = np.random.default_rng(1)
    d, n_tax = 64, 30
    b = _unit(rng, 1, d)[0].astype(np.float64)
    g, q, rows = {}, {}, []
    for t in range(n_tax):  # cos(b, g_t) = 0.5 + t * 2e-4
        w = rng.standard_normal(d)
        w -= (w @ b) * b
        c = 0.5 + t * 2e-4
        g[f"g{t}"] = (c * b + np.sqrt(1 - c * c) * w / np.linalg.norm(w)).astype(np.float32)
    for i in range(100):
        q[f"q{i}"] = b.astype(np.float32)
        cands = [f"T{t}" for t in rng.permutation(n_tax)]
        rows.append({"query_payload_id": f"q{i}", "correct_taxon": cands[0], "candidates_taxa": cands,
                     "candidates_target_ids": [[f"g{c[1:]}"] for c in cands]})
    ranks, _, _ = _score(rows, q, g, cap=n_tax)
    reference = _reference_ranks(rows, q, g)
    assert len(set(reference.tolist())) > 10  # the correct taxa really sit at many ranks
    np.testing.assert_array_equal(ranks, reference)


def test_ragged_rows_missing_features_and_cap():
    """Rows with fewer candidates, galleries of different sizes, gallery items and a whole
    gallery without features, queries without features; ranks past `cap` are clipped."""
    rng = np.random.default_rng(2)
    rows, q, g = _random_task(rng, n_tax=30, n_cand=20, per=4)
    for n, r in enumerate(rows):
        if n % 3 == 0:  # a shorter row
            keep = [j for j in range(len(r["candidates_taxa"])) if j % 4 or
                    r["candidates_taxa"][j] == r["correct_taxon"]]
            r["candidates_taxa"] = [r["candidates_taxa"][j] for j in keep]
            r["candidates_target_ids"] = [r["candidates_target_ids"][j] for j in keep]
    for t in range(30):  # galleries of 1..4 items; T7 has no features at all
        for k in range(4):
            if k >= 1 + t % 4 or t == 7:
                g.pop(f"g{t}_{k}")
    for i in range(0, 300, 10):
        q.pop(f"q{i}")
    ranks, skipped, kept = _score(rows, q, g, cap=5)
    reference = _reference_ranks(rows, q, g)
    np.testing.assert_array_equal(ranks, np.minimum(reference, 5))
    assert skipped["query_without_feature"] == 30
    assert skipped["correct_gallery_without_feature"] == sum(
        r["correct_taxon"] == "T7" for n, r in enumerate(rows) if n % 10)
    assert ranks.max() == 5 and len(kept) == len(reference)


def test_galleries_that_differ_between_rows_take_the_exact_path():
    rng = np.random.default_rng(3)
    rows, q, g = _random_task(rng)
    for r in rows[::2]:  # every other row lists only part of each gallery
        r["candidates_target_ids"] = [gal[:2] for gal in r["candidates_target_ids"]]
    task = Task.from_rows(rows)
    assert task.galleries is None
    ranks, _, _ = rank_of_correct(task, Features.from_dict(q), Features.from_dict(g), cap=100)
    np.testing.assert_array_equal(ranks, _reference_ranks(rows, q, g))


@pytest.mark.slow
def test_the_releases_benchmark_defects_score_and_are_counted(ray_local, synth_store, tiny_checkpoint,
                                                              tmp_path):
    """The public release's benchmark as it is (docs/method.md): index rows whose file is missing,
    a clip that is an HTML page saved as audio, header-only family-level task files, the
    common_name text level. It scores without error and the report counts each defect."""
    from biovita.bench.build import build_benchmark
    from biovita.bench.run import evaluate

    root, _ = synth_store
    bench = tmp_path / "bench"
    build_benchmark(str(root), bench, candidates=8, split="seen")
    with open(bench / "ids" / "audio_index.csv", newline="") as f:
        audio = list(csv.DictReader(f))
    with open(bench / "ids" / "image_index.csv", newline="") as f:
        image = list(csv.DictReader(f))
    for r in audio[:2] + image[:1]:
        (bench / r["file_path"]).unlink()
    (bench / audio[2]["file_path"]).write_bytes(b"<!DOCTYPE html><html><body>404</body></html>")
    for p in (bench / "family").glob("test_*.csv"):
        p.write_text(",".join(FIELDS) + "\n")
    result = evaluate(bench, tiny_checkpoint, tmp_path / "feats")
    inputs = result["inputs"]
    assert inputs["audio"] == {"indexed": len(audio), "with_feature": len(audio) - 3, "missing_file": 2,
                               "failed": {"html_page": 1}}
    assert inputs["image"] == {"indexed": len(image), "with_feature": len(image) - 1, "missing_file": 1,
                               "failed": {}}
    assert inputs["task_files_without_queries"] == sorted(f"family/test_{t}.csv" for t in TASKS)
    assert all(result["family"][code]["n"] == 0 for code in TASKS.values())
    a2t = result["species"]["A2T"]
    assert a2t["missing_query"] == 3 and a2t["n"] > 0  # still counted, as misses
    text = torch.load(next((tmp_path / "feats" / "text").glob("*.pt")), weights_only=True)
    assert set(text) == {"species", "genus", "family", "common_name"}
