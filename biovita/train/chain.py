"""The stage chain: init -> stage 0 (when the towers come untrained) -> stage 1 -> stage 2's
phases (`biovita.train.stages.stages_to_run`), each starting from the model the one before
exported. The main job and every sweep trial run this one function."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from biovita.config import Config
from biovita.data.store import exists
from biovita.data.synth import DEFAULT_SPECIES, WORLD, make_synthetic
from biovita.locations import is_remote
from biovita.tracking.runs import Tracker
from biovita.train.driver import run_stage
from biovita.train.stages import Stage


def run_chain(cfg: Config, tracker: Tracker, stages: list[Stage], init: str,
              **stage_kwargs) -> dict[str, str]:
    """Train `stages` in order from the model at `init`; returns stage name -> model URI.
    Extra keyword arguments go to every `run_stage` (Tune callbacks, test hooks)."""
    models, last = {}, init
    for stage in stages:
        last = models[stage.name] = run_stage(cfg, stage, last, tracker, **stage_kwargs)
    return models


def ensure_data(cfg: Config) -> None:
    """The store at `data.root`; the synthetic one is made when missing, and made again when
    an older generator made it or `data.synth_species` / `data.synth_seed` ask for another
    world (only stores `make_synthetic` wrote: another store is never touched)."""
    root, d = cfg.data.root, cfg.data
    meta = Path(root) / "meta.json" if not is_remote(root) else None
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
