"""The ecological trait probe: does a frozen embedding carry a species' traits?

For each trait group of the store's taxa table (diet, activity, ...; a species' label is the
first trait of the group it has) and each modality, a ridge classifier is fitted on the
embeddings of every recording (or photo) of some species and scored on the species it never
saw (species-disjoint folds), as macro-F1 over the held-out media. Two baselines: the majority
label of the training species, and the same probe with the species' labels shuffled among
species (a permutation null: what a probe finds where there is nothing to find). A group
counts as found when the probe beats the majority and its permutation p-value is < 0.05.
The embeddings come from the store's cache (`biovita.embed.cache.gallery_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biovita.data.schema import TRAIT_GROUPS
from biovita.data.store import read_table
from biovita.data.validate import check_store
from biovita.embed.cache import gallery_embeddings


def macro_f1(y: np.ndarray, p: np.ndarray) -> float:
    """Macro-F1 over the labels present in `y` or `p` (scikit-learn's definition)."""
    f1 = []
    for c in np.union1d(y, p):
        tp = np.sum((p == c) & (y == c))
        denom = np.sum(p == c) + np.sum(y == c)
        f1.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(f1)) if f1 else 0.0


def species_labels(taxa: dict[str, list], group: str) -> dict[int, int]:
    """{species_id: label index} for a trait group; species without one of its labels
    (or with unknown traits, -1) are left out."""
    cols = [f"trait_{group}_{label}" for label in TRAIT_GROUPS[group]]
    out = {}
    for k, sid in enumerate(taxa["species_id"]):
        on = [j for j, c in enumerate(cols) if int(taxa[c][k]) == 1]
        if on:
            out[int(sid)] = on[0]
    return out


def _ridge_predict(x_tr, y_tr, x_te, n_labels: int, alpha: float) -> np.ndarray:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    y = np.eye(n_labels)[y_tr]
    y = y - y.mean(0)
    w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ y)
    return (b @ w).argmax(1)


def cross_validate(x: np.ndarray, species: np.ndarray, labels: dict[int, int], folds: int,
                   seed: int, alpha: float) -> tuple[float, float]:
    """(probe macro-F1, majority macro-F1) over species-disjoint folds, media pooled."""
    ids = np.array(sorted(labels))
    fold_of = dict(zip(np.random.default_rng(seed).permutation(ids), np.arange(len(ids)) % folds))
    y = np.array([labels[int(s)] for s in species])
    f = np.array([fold_of[int(s)] for s in species])
    n_labels = max(labels.values()) + 1
    pred, base = np.empty_like(y), np.empty_like(y)
    for k in range(folds):
        tr, te = f != k, f == k
        if not te.any():
            continue
        pred[te] = _ridge_predict(x[tr], y[tr], x[te], n_labels, alpha)
        base[te] = np.bincount(y[tr], minlength=n_labels).argmax()
    return macro_f1(y, pred), macro_f1(y, base)


@dataclass
class ProbeResult:
    group: str
    modality: str
    species: int
    media: int
    f1: float
    majority_f1: float
    null_mean: float
    null_q95: float
    p_value: float

    @property
    def found(self) -> bool:
        return self.f1 > self.majority_f1 and self.p_value < 0.05


def probe(emb: np.ndarray, species: np.ndarray, taxa: dict[str, list], groups=None, folds: int = 5,
          permutations: int = 100, seed: int = 0, alpha: float = 1.0, modality: str = "") -> list[ProbeResult]:
    """The probe of every trait group with at least two labels among the species."""
    x = emb / (np.linalg.norm(emb, axis=1, keepdims=True) + 1e-12)
    out = []
    for group in groups or TRAIT_GROUPS:
        labels = species_labels(taxa, group)
        keep = np.array([int(s) in labels for s in species])
        if len(set(labels.values())) < 2 or len(labels) < folds or not keep.any():
            continue
        xs, ss = x[keep], species[keep]
        f1, maj = cross_validate(xs, ss, labels, folds, seed, alpha)
        rng = np.random.default_rng([seed, 1])
        ids, vals = list(labels), list(labels.values())
        null = np.array([cross_validate(xs, ss, dict(zip(ids, rng.permutation(vals))), folds, seed, alpha)[0]
                         for _ in range(permutations)])
        out.append(ProbeResult(group, modality, len(labels), int(keep.sum()), f1, maj,
                               float(null.mean()), float(np.quantile(null, 0.95)),
                               float((1 + np.sum(null >= f1)) / (1 + permutations))))
    return out


def probe_checkpoint(checkpoint: str, store: str, **kw) -> list[ProbeResult]:
    """Embed the store with the checkpoint (once: the gallery's cache beside it) and probe
    both modalities."""
    check_store(store).require(["audio", "image", "taxa"], "the trait probe")
    taxa = read_table(store, "taxa").to_pydict()
    results = []
    for modality, v in gallery_embeddings(store, checkpoint).items():
        if len(v):
            results += probe(v.vectors, v.species, taxa, modality=modality, **kw)
    return results


def format_probe(results: list[ProbeResult]) -> str:
    head = (f"{'trait group':<12}{'modality':<9}{'species':>8}{'media':>7}{'macro-F1':>10}"
            f"{'majority':>10}{'null mean':>11}{'null 95%':>10}{'p':>7}  found")
    lines = ["trait probe: ridge on frozen embeddings, species-disjoint folds", head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.group:<12}{r.modality:<9}{r.species:>8}{r.media:>7}{r.f1:>10.3f}"
                     f"{r.majority_f1:>10.3f}{r.null_mean:>11.3f}{r.null_q95:>10.3f}{r.p_value:>7.3f}"
                     f"  {'yes' if r.found else 'no'}")
    return "\n".join(lines)


def plot_probe(results: list[ProbeResult], path: str) -> str:
    """Bars per trait group: the audio and image probes, the majority baseline, the null's 95 %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in results))
    by = {(r.group, r.modality): r for r in results}
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 2, 3.5))
    xs = np.arange(len(groups))
    for k, m in enumerate(("audio", "image")):
        vals = [by[(g, m)].f1 if (g, m) in by else np.nan for g in groups]
        ax.bar(xs + (k - 0.5) * 0.38, vals, 0.36, label=f"{m} probe")
        nulls = [by[(g, m)].null_q95 if (g, m) in by else np.nan for g in groups]
        ax.scatter(xs + (k - 0.5) * 0.38, nulls, marker="_", s=300, color="black",
                   label="permutation null, 95 %" if k == 0 else None)
    maj = [next((by[(g, m)].majority_f1 for m in ("audio", "image") if (g, m) in by), np.nan) for g in groups]
    ax.scatter(xs, maj, marker="x", color="red", label="majority", zorder=3)
    ax.set_xticks(xs, groups, rotation=30)
    ax.set_ylabel("macro-F1 (held-out species)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
