"""Per-epoch sample plans, computed on the driver from metadata only (ids and species).

A plan says how many times each media id is used in an epoch (stage 2: the images each clip
is paired with); `epoch_order` turns it into the epoch's uses in a uniformly random order,
which the Ray Data decode tasks then decode segment by segment, so no media bytes ever reach
the driver.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Sequence

import numpy as np


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode())


def _by_species(ids: Sequence[str], species: Sequence[int]) -> dict[int, list[str]]:
    groups: dict[int, list[str]] = defaultdict(list)
    for i, s in zip(ids, species):
        groups[int(s)].append(str(i))
    for g in groups.values():
        g.sort()  # plan must not depend on the Parquet row order
    return dict(sorted(groups.items()))


def balanced_counts(
    ids: Sequence[str], species: Sequence[int], cap: int, minimum: int, seed: int, epoch: int
) -> dict[str, int]:
    """Species-balanced epoch: <= cap clips a species; species with < minimum are oversampled."""
    rng = np.random.default_rng([seed, epoch, 17])
    counts: dict[str, int] = {}
    for _, members in _by_species(ids, species).items():
        n = len(members)
        if n >= cap:
            chosen = rng.choice(n, size=cap, replace=False)
        elif n >= minimum:
            chosen = np.arange(n)
        else:
            chosen = np.concatenate([np.arange(n), rng.choice(n, size=minimum - n, replace=True)])
        for k in chosen:
            counts[members[k]] = counts.get(members[k], 0) + 1
    return counts


def triplet_plan(
    audio_ids: Sequence[str],
    audio_species: Sequence[int],
    image_ids: Sequence[str],
    image_species: Sequence[int],
    per_species: int,
    seed: int,
) -> dict[str, list[str]]:
    """Stage-2 triplets: `per_species` (audio, image) pairs a species, with replacement,
    drawn once for the stage (docs/method.md: only their order changes from epoch to epoch).

    Returns audio id -> the image ids it is paired with (one entry per use). Species with no
    image or no clip are left out.
    """
    rng = np.random.default_rng([seed, 29])
    audio = _by_species(audio_ids, audio_species)
    images = _by_species(image_ids, image_species)
    plan: dict[str, list[str]] = defaultdict(list)
    for sp, clips in audio.items():
        imgs = images.get(sp)
        if not imgs:
            continue
        a = rng.choice(len(clips), size=per_species, replace=len(clips) < per_species)
        b = rng.choice(len(imgs), size=per_species, replace=len(imgs) < per_species)
        for i, j in zip(a, b):
            plan[clips[i]].append(imgs[j])
    return dict(plan)


def epoch_order(plan: dict, seed: int, epoch: int) -> list[tuple[str, int, str | None]]:
    """Every use the plan asks for as (media id, use number, paired image id or None), in a
    uniformly random order: a global shuffle, so that a clip used several times (an
    oversampled species, a clip in several triplets) lands anywhere in the epoch, as with a
    DataLoader that shuffles the epoch's list, never next to its other uses."""
    uses = []
    for media_id in sorted(plan):
        v = plan[media_id]
        uses += ([(media_id, k, None) for k in range(v)] if isinstance(v, int) else
                 [(media_id, k, pair) for k, pair in enumerate(v)])
    order = np.random.default_rng([seed, epoch, 41]).permutation(len(uses))
    return [uses[i] for i in order]
