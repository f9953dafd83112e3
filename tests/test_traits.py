"""The trait probe: finds a trait the embedding carries, not one it does not; the CLI end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from biovita.bench.traits import macro_f1, probe
from biovita.data.schema import TRAIT_COLUMNS, TRAIT_GROUPS
from biovita.data.synth import HIDDEN_TRAITS, make_taxonomy, traits_for


def test_macro_f1_matches_its_definition():
    y, p = np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0])
    # class 0: tp 1, 2 predicted, 2 true -> 0.5; class 1: 2/(3+2)*2 = 0.8; class 2: 0
    assert macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1(y, y) == 1.0


def test_probe_finds_an_encoded_trait_and_not_a_random_one():
    rng = np.random.default_rng(0)
    n_species, per = 40, 12
    encoded, random_ = rng.permutation(np.arange(n_species) % 2), rng.permutation(np.arange(n_species) % 2)
    taxa = {"species_id": list(range(n_species))}
    for c in TRAIT_COLUMNS:
        taxa[c] = [0] * n_species
    for s in range(n_species):  # activity: encoded in the embedding; migration: not
        taxa[f"trait_activity_{TRAIT_GROUPS['activity'][encoded[s]]}"][s] = 1
        taxa[f"trait_migration_{TRAIT_GROUPS['migration'][random_[s]]}"][s] = 1
    centres = rng.normal(size=(n_species, 16))
    centres[:, 0] += 3.0 * (encoded - 0.5)
    species = np.repeat(np.arange(n_species), per)
    emb = centres[species] + 0.3 * rng.normal(size=(len(species), 16))
    res = {r.group: r for r in probe(emb, species, taxa, groups=["activity", "migration"],
                                     permutations=40)}
    assert res["activity"].found and res["activity"].f1 > 0.75 > 0.5 > res["activity"].majority_f1
    assert not res["migration"].found and res["migration"].p_value > 0.05


def test_synthetic_traits_follow_the_hidden_attributes():
    sp = make_taxonomy(40, seed=0)
    rng = np.random.default_rng(0)
    for s in sp:
        t = traits_for(s, rng)
        for group, (attr, *labels) in HIDDEN_TRAITS.items():
            assert [t[f"trait_{group}_{lab}"] for lab in labels] == [int(getattr(s, attr) == k) for k in (0, 1)]
    for attr in ("buzz", "mark", "secret"):  # balanced, and not a function of the genus
        vals = [getattr(s, attr) for s in sp]
        assert sum(vals) == 20
        assert any(len({getattr(s, attr) for s in sp if s.genus == g}) == 2 for g in {s.genus for s in sp})


@pytest.mark.slow
def test_bench_traits_cli(tmp_path, synth_store, tiny_checkpoint, ray_local):
    root, _ = synth_store
    out = tmp_path / "traits.json"
    r = subprocess.run([sys.executable, "-m", "biovita.cli", "bench", "traits", tiny_checkpoint,
                        "--data", str(root), "--json", str(out), "--permutations", "10", "--folds", "4"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["modality"] for r in rows} == {"audio", "image"}
    assert {"activity", "social", "migration"} <= {r["group"] for r in rows}
    assert all(0 <= r["f1"] <= 1 and r["media"] > 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 0 and "trait probe" in r.stdout
    assert "macro-F1" in subprocess.run([sys.executable, "-m", "biovita.cli", "bench", "traits", "--help"],
                                        capture_output=True, text=True).stdout


def test_validation_set_is_held_out_and_scores_retrieval(tmp_path, synth_store, tiny_checkpoint):
    """The sweep's validation set: decoded once, its ids kept out of every training plan,
    a perfect embedding scores 1 and a constant one scores chance."""
    from biovita.bench.validation import ValidationSet, build_validation, retrieval_top1
    from biovita.config import load_config
    from biovita.train.driver import stage_plans
    from biovita.train.stages import STAGE1

    root, _ = synth_store
    path = build_validation(str(root), tiny_checkpoint, str(tmp_path / "val.npz"), per_species=2)
    val = ValidationSet.load(path)
    assert len(val.audio_ids) > 0 and val.mel.shape[0] == len(val.audio_ids)
    assert val.pixels.shape[0] == len(val.image_ids) and set(val.audio_species) <= set(val.species)
    cfg = load_config("default", [f"data.root={root}", f"train.validation={path}"])
    planned = {i for p in stage_plans(cfg, STAGE1) for i in p}
    assert planned and not planned & set(val.audio_ids)
    cfg0 = load_config("default", [f"data.root={root}"])
    assert set(val.audio_ids) <= {i for p in stage_plans(cfg0, STAGE1) for i in p}
    onehot = lambda s: np.eye(len(val.species))[np.searchsorted(val.species, s)]  # noqa: E731
    sp = {"audio": val.audio_species, "image": val.image_species, "text": val.species}
    assert retrieval_top1({m: onehot(s) for m, s in sp.items()}, sp)["top1"] == 1.0
    flat = retrieval_top1({m: np.ones((len(s), 4)) for m, s in sp.items()}, sp)
    assert flat["A2T"] <= 1.0 / 2
    with pytest.raises(Exception, match="train.validation"):
        load_config("default", ["train.validation=/no/such.npz"])
