"""The stage chain: init -> stage 0 (when the towers come untrained) -> stage 1 -> stage 2's
phases, each starting from the model the one before exported. The main job and every sweep
trial run this one function."""

from __future__ import annotations

from biovita.config import Config
from biovita.data.store import exists
from biovita.train.driver import image_embeddings, run_stage, stage_done
from biovita.train.stages import PHASE1, PHASE2, STAGE0, STAGE1, Stage
from biovita.train.tracking import Tracker


def needs_stage0(cfg: Config) -> bool:
    """Stage 0 (a tiny image-text base model) runs only when the image/text towers come
    without pretrained weights: BioCLIP 2 is the base model otherwise."""
    from biovita.models.registry import MODEL_CONFIGS

    m = cfg.model
    pretrained = bool(m.clip_model.startswith("hf-hub:") or m.clip_pretrained or m.init_checkpoint
                      or (not m.clip_model and MODEL_CONFIGS[m.name].pretrained))
    return cfg.stage0.enabled and not pretrained


def stages_to_run(cfg: Config) -> list[Stage]:
    """A full run's stages in order: stage 0 when needed, stage 1, then each stage-2 phase
    that has epochs."""
    first = [STAGE0] if needs_stage0(cfg) else []
    return first + [s for s in (STAGE1, PHASE1, PHASE2) if s is STAGE1 or s.settings(cfg).epochs > 0]


def run_chain(cfg: Config, tracker: Tracker, stages: list[Stage], init: str,
              **stage_kwargs) -> dict[str, str]:
    """Train `stages` in order from the model at `init`; returns stage name -> model URI.
    Extra keyword arguments go to every `run_stage` (Tune callbacks, test hooks)."""
    models, last, emb = {}, init, None
    for stage in stages:
        if stage.image_embeddings and emb is None and not stage_done(cfg, stage.name):
            print("[stage2] embedding training images with the frozen image tower ...", flush=True)
            emb = image_embeddings(cfg, last)
        last = models[stage.name] = run_stage(cfg, stage, last, tracker,
                                              emb if stage.image_embeddings else None, **stage_kwargs)
    return models


def ensure_data(cfg: Config) -> None:
    """The store at `data.root`; the synthetic one is made when missing, and made again when
    an older generator made it or `data.synth_species` / `data.synth_seed` ask for another
    world (only stores `make_synthetic` wrote: another store is never touched)."""
    import json
    import shutil
    from pathlib import Path

    from biovita.data.synth import DEFAULT_SPECIES, WORLD, make_synthetic

    root, d = cfg.data.root, cfg.data
    meta = Path(root) / "meta.json" if "://" not in root else None
    if exists(root):
        if meta is None or not meta.is_file() or not d.synth_if_missing:
            return
        m = json.loads(meta.read_text())
        made_here = "corrupt" in m and "profile" not in m  # make_synthetic's manifest
        other = (m.get("world", 1) != WORLD or d.synth_species not in (0, m.get("n_species"))
                 or d.synth_seed not in (-1, m.get("seed")))
        if not made_here or not other:
            return
        print(f"the synthetic dataset in {root} was made for another world ({m.get('n_species')} "
              f"species, seed {m.get('seed')}, generator {m.get('world', 1)}); making it again",
              flush=True)
        shutil.rmtree(root)
    elif not d.synth_if_missing:
        raise FileNotFoundError(f"no media store at {root}")
    print(f"creating the synthetic dataset in {root} ...", flush=True)
    make_synthetic(root, n_species=d.synth_species or DEFAULT_SPECIES, seed=max(d.synth_seed, 0),
                   progress=True)
