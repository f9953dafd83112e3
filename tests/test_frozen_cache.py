"""The frozen-tower cache (`biovita.embed.cache`): made once on Ray Data beside the store,
equal to running the tower, keyed by the tower's weights, and a stage that reads it trains as
one that runs the tower."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from biovita.data.decode import decode_image_batch, eval_specs
from biovita.data.store import read_table
from biovita.embed.cache import CACHE_FOLDER, prompt_embeddings, store_embeddings
from biovita.models.checkpoint import front_ends, load_biovita, save_model


@pytest.fixture()
def store(synth_store, tmp_path):
    """A copy of the session's store, so that its cache starts empty."""
    import shutil

    root, _ = synth_store
    copy = tmp_path / "store"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    return str(copy)


def test_image_cache_equals_the_tower_and_is_made_once(ray_local, store, tiny_checkpoint, tmp_path):
    first = store_embeddings(store, tiny_checkpoint, "image", "train")
    assert first.seconds > 0 and len(first) > 0
    again = store_embeddings(store, tiny_checkpoint, "image", "train")
    assert again.seconds == 0 and again.ids == first.ids  # read back, not made again
    np.testing.assert_array_equal(again.vectors, first.vectors)
    # what running the tower on the same eval-decoded images gives
    model = load_biovita(tiny_checkpoint)
    t = read_table(store, "image", ["id", "bytes", "species_id", "split"]).to_pydict()
    rows = [k for k, i in enumerate(t["id"]) if i in set(first.ids[:6])]
    batch = {c: np.asarray([t[c][k] for k in rows], dtype=object) for c in ("id", "bytes", "species_id")}
    decoded, _, _ = decode_image_batch(batch, eval_specs(*front_ends(tiny_checkpoint))[1])
    with torch.no_grad():
        direct = model.encode_image(torch.from_numpy(decoded["pixels"])).numpy()
    np.testing.assert_allclose(first.take(decoded["id"]), direct, atol=1e-5)
    assert set(first.ids) == {i for i, s in zip(t["id"], t["split"]) if s == "train"} - {
        i for i in t["id"] if i.startswith("bad")}  # every decodable training image, no more

    # keyed by the image tower: a new audio tower shares it, a new image tower does not
    with torch.no_grad():
        model.adapter.weight.mul_(2)
    save_model(model, tmp_path / "audio_changed")
    assert store_embeddings(store, str(tmp_path / "audio_changed"), "image", "train").seconds == 0
    with torch.no_grad():
        next(model.clip.visual.parameters()).add_(0.5)
    save_model(model, tmp_path / "image_changed")
    changed = store_embeddings(store, str(tmp_path / "image_changed"), "image", "train")
    assert changed.seconds > 0 and not np.allclose(changed.vectors, first.vectors)
    assert len(list((Path(store) / CACHE_FOLDER).glob("image-train-*.parquet"))) == 2


def test_prompt_cache_equals_the_text_tower(ray_local, store, tiny_checkpoint):
    prompts = ["Parus major", "Hyla arborea with common name tree frog", "Aves"]
    v = prompt_embeddings(store, tiny_checkpoint, prompts)
    direct = load_biovita(tiny_checkpoint).embed_texts(prompts)
    np.testing.assert_allclose(v.take(prompts), direct, atol=1e-5)
    assert prompt_embeddings(store, tiny_checkpoint, list(reversed(prompts))).seconds == 0


def test_a_stage_reading_the_cache_trains_as_one_running_the_tower(ray_local, store, tmp_path, gloo,
                                                                  monkeypatch):
    """Stage 1 with the prompts' cached embeddings (`text_emb`) against stage 1 running the
    frozen text tower on the prompts in every step: the same loss and the same audio-tower
    gradients at each of 3 steps (a model without dropout: both compute the same thing)."""
    from biovita.config import load_config
    from biovita.models.factory import create_model
    from biovita.train import stages
    from biovita.train.loop import LocalIO, StageJob, StageRun

    model = create_model("tiny")
    model.arch["audio_config"]["hidden_dropout_prob"] = 0.0
    init = str(save_model(model, tmp_path / "init"))
    prompts = ["Parus major", "Hyla arborea", "Bubo bubo", "Rana temporaria"]
    cached = prompt_embeddings(store, init, prompts)
    g = torch.Generator().manual_seed(0)
    batches = [{"wave": (0.25 * torch.randn(4, 480_000, generator=g)).half(), "text": prompts,
                "text_emb": torch.from_numpy(cached.take(prompts)), "epoch": 0} for _ in range(3)]
    running = dataclasses.replace(stages.STAGE1, inputs={"audio": "wave", "text": "text"})
    assert stages.STAGE1.frozen == {"text"} and running.frozen == set()
    cfg = load_config(None, ["data.synth_if_missing=true", "stage1.batch_size=4", "stage1.max_steps=3",
                             "train.log_every=1"])
    seen = {}
    for name, stage in (("cached", stages.STAGE1), ("tower", running)):
        monkeypatch.setitem(stages.BY_NAME, "stage1", stage)
        job = StageJob(config=cfg, stage="stage1", steps_per_epoch=3, init_checkpoint=init,
                       export_to=str(tmp_path / name))
        run = StageRun(job, LocalIO(batches, tmp_path))
        grads = []
        step = run.eng.step

        def recording_step(run=run, grads=grads, step=step):
            grads.append({n: run.eng.full_grad(p).clone() for n, p in run.module.audio.named_parameters()})
            step()

        run.eng.step = recording_step
        losses = []
        run.job.callbacks.append(lambda info, run=run, losses=losses:
                                 losses.append(float(run.meter.values["loss"][-1])))
        run.run()
        seen[name] = (losses, grads)
    (loss_a, grads_a), (loss_b, grads_b) = seen["cached"], seen["tower"]
    assert len(loss_a) == 3 and loss_a == pytest.approx(loss_b, abs=1e-6)
    for ga, gb in zip(grads_a, grads_b):
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], atol=1e-6, rtol=1e-5)
